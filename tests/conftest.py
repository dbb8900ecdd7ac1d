"""Test harness: strict JAX numerics and 4 CPU devices in every test process.

* `jax_numpy_rank_promotion = "raise"`: an implicit broadcast between arrays of different rank
  (the classic [B] + [B, 1] -> [B, B] bug) is an error in tests, not a silent wrong answer.
* Compiled programs are cached on disk (`.pytest_cache/jax_compilation_cache`, also for the
  processes the tests start: the environment variables are inherited): many tests train and
  evaluate the same tiny models, and a fresh `jax.jit` of an identical program would otherwise
  compile again. The cache key covers the program, the jax/jaxlib versions and the XLA flags,
  so an ISA cap (XLA_FLAGS) or another device count never reuses another's executable.
* 4 CPU devices in process (`jax_num_cpu_devices`), so sharding over a mesh is tested without a
  subprocess; only tests that need several *processes* (gloo collectives, SIGKILL, SIGTERM)
  start them. It must be set before the backend starts, so it is set at import of this file,
  before any test module runs a computation.
"""

import os
from pathlib import Path

import jax
import pytest

NUM_TEST_DEVICES = 4
COMPILATION_CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
jax.config.update("jax_numpy_rank_promotion", "raise")

# -- test tiers --------------------------------------------------------------------------------
# `make test` runs the fast tier (`-m "not slow"`), `make test-slow` the rest; CI (`.ci/run`)
# runs both. The slow tier holds the end-to-end runs (subprocesses, SIGKILL/SIGTERM and resume,
# several processes, the paper-size networks of the conversions) and the remaining cases of the
# closed-form grids, one case of which per SDE / mode / variable stays fast. Chosen from
# `pytest --durations=0` on the 2-core AMD EPYC beside a two-process training run: the whole
# suite took 34 min there, the fast tier 9 min.
SLOW = {
    # whole tests
    "test_paper_table.py::test_killed_table_resumes_without_retraining_finished_rows",
    "test_convert.py::test_converted_workdir_fine_tunes_from_its_step",
    "test_convert.py::test_converted_workdir_evaluates_with_the_converted_dequantizer",
    "test_convert.py::test_command_line_converts_and_reports_errors_in_one_line",
    "test_convert.py::test_converted_ddpmpp_reproduces_the_official_output[torch]",
    "test_convert.py::test_a_matching_paper_config_is_suggested",
    "test_convert.py::test_converted_dequantizer_reproduces_the_official_output[imagenet32]",
    "test_flowpp.py::test_flow_round_trip[imagenet32]",
    "test_flowpp.py::test_official_forward[imagenet32]",
    "test_train.py::test_exact_resume_after_sigkills",
    "test_train.py::test_two_processes_match_one_process",
    "test_train.py::test_sigterm_saves_a_checkpoint_stops_and_the_resumed_run_is_exact",
    "test_train.py::test_nan_in_batch_stops_with_step_and_keeps_last_good_checkpoint",
    "test_train_deq.py",  # the module: its fixtures train a score model and a dequantizer
    "test_likelihood.py::test_forward_mode_through_a_convolutional_network",
    "test_likelihood.py::test_nfe_counts_every_vector_field_evaluation",
    "test_likelihood.py::test_jit_and_vmap_give_the_same_numbers",
    "test_likelihood.py::test_max_steps_exceeded_is_a_clear_error_or_a_flag",
    "test_likelihood.py::test_sharded_over_four_cpu_devices",
    "test_evaluate.py::test_eval_mode_end_to_end_on_digits",
    "test_evaluate.py::test_sigkilled_eval_resumes_to_the_numbers_of_an_uninterrupted_one",
    "test_evaluate.py::test_evaluation_reads_only_the_ema_parameters_and_compiles_once",
    "test_evaluate.py::test_interrupted_evaluation_resumes_to_identical_numbers",
    "test_evaluate.py::test_user_errors_are_one_line_without_traceback",
    "test_models.py::test_time_conditioning_after_one_gradient_step",
    "test_models.py::test_ddpmpp_cpu_conv_grads_change_nothing_but_speed",
    "test_models.py::test_tiny_ddpmpp_learns_gaussian_data_with_likelihood_weighting",
    "test_nll.py::test_the_command_prints_the_same_numbers_and_skips_non_images",
    "test_nll.py::test_files_give_the_numbers_of_the_evaluation_path[ode-2]",
    "test_dequantization.py::test_an_exactly_uniform_variational_dequantizer_gives_the_uniform_numbers",
    "test_checkpoint.py::test_two_processes_agree_on_preemption_and_checkpoint",
    "test_checkpoint.py::test_sigterm_saves_and_exits_cleanly",
}
# parametrized grids: these cases stay in the fast tier, the others are slow
FAST_CASES = {
    "test_likelihood.py::test_integration_variables_and_modes_match_closed_form": {
        "vp-jvp-t",
        "subvp-vjp-logsnr",
        "ve-jvp-scaled",
    },
    "test_bound.py::test_mean_bound_equals_entropy_plus_prior_kl": {
        "stratified-True-sde0-1e-05",
        "iid-False-sde1-0.01",
        "stratified-False-sde2-0.001",
    },
    "test_bound.py::test_inexact_score_the_bound_bounds_the_sde_model_not_the_ode_model": {
        "vp-0.8",
        "subvp-1.25",
    },
    "test_sampling.py::test_ode_samples_follow_the_marginal_at_eps_and_the_data_after_denoising": {
        "vp"
    },
    "test_sampling.py::test_ode_sampler_inverts_the_likelihood_path": {"vp"},
    "test_sampling.py::test_pc_samples_reproduce_the_data": {
        "vp-rd-langevin",
        "subvp-em-none",
        "ve-em-langevin",
    },
    "test_models.py::test_loop_friendly_conv_matches_lax_values_and_gradients": {
        "8-1-strides1-SAME-None-None",
        "6-3-strides4-padding4-lhs_dil4-rhs_dil4",
    },
}


def _is_slow(item) -> bool:
    module = Path(str(item.path)).name
    name = f"{module}::{item.name}"
    function = f"{module}::{item.originalname}"
    if module in SLOW or name in SLOW or function in SLOW:
        return True
    fast = FAST_CASES.get(function)
    return (
        fast is not None
        and getattr(item, "callspec", None) is not None
        and (item.callspec.id not in fast)
    )


def _check_names(items) -> None:
    """Every entry of SLOW / FAST_CASES names a collected test (a renamed test would otherwise
    drop out of its tier silently); only entries of modules that were collected are checked."""
    modules = {Path(str(i.path)).name for i in items}
    names = {f"{Path(str(i.path)).name}::{n}" for i in items for n in (i.name, i.originalname)}
    ids = {
        (f"{Path(str(i.path)).name}::{i.originalname}", i.callspec.id)
        for i in items
        if hasattr(i, "callspec")
    }
    wrong = [e for e in SLOW if e.split("::")[0] in modules and "::" in e and e not in names]
    wrong += [
        f"{f}[{case}]"
        for f, cases in FAST_CASES.items()
        if f.split("::")[0] in modules
        for case in cases
        if (f, case) not in ids
    ]
    if wrong:
        raise pytest.UsageError(f"tests/conftest.py names tests that were not collected: {wrong}")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marker
def pytest_collection_modifyitems(config, items):
    # a selection by node id or -k collects part of a module: nothing to check then
    if not config.option.keyword and all("::" not in a for a in config.args):
        _check_names(items)
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
