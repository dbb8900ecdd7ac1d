"""Evaluation: closed-form NLLs through the full eval path, error bars, resumption, EMA-only
restore, one compile for every checkpoint, and `main --mode eval`."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multiprocess_worker import subprocess_xla_flags
from conftest import NUM_TEST_DEVICES
from jax import monitoring
from PIL import Image

from mlscore_jax import checkpoint, evaluate, experiment, train
from mlscore_jax.gaussian import GaussianData
from mlscore_jax.preprocessing import Preprocessing
from mlscore_jax.sde import VPSDE, SubVPSDE
from mlscore_jax.settings import BpdSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, 6), std=0.4)
CONTINUOUS = Preprocessing(levels=None)  # float data: results in nats
N = 40  # 3 batches of 16, the last one padded
# Gaussian probes: for isotropic Gaussian data the Jacobian of the drift is a multiple of the
# identity, so Rademacher probes (v^T v = D) would make the ODE estimate exact and not random.
SETTINGS = BpdSettings(batch_size=16, num_repeats=4, num_t=64, divergence="gaussian", seed=3)


def points() -> np.ndarray:
    return np.asarray(DATA.sample(jax.random.key(11), N))


def exact_score(sde):
    """The closed-form score in evaluate_split's form score(params, x, t) (params unused)."""
    score = DATA.score_fn(sde)
    return lambda params, x, t: score(x, t)


def evaluate_split(score, sde, preprocessing, x, settings, out_dir, **kwargs):
    return evaluate.evaluate_split(score, sde, preprocessing, x, settings, out_dir, **kwargs)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_exact_score_gives_the_closed_form_nll_by_ode_and_by_bound(tmp_path, sde):
    x = points()
    m = evaluate_split(exact_score(sde), sde, CONTINUOUS, x, SETTINGS, str(tmp_path))
    assert m["unit"] == "nats" and m["num_images"] == N and m["num_repeats"] == 4

    # ODE: the exact -log p_eps^ODE of these very points; only the Hutchinson probes are random.
    exact = float(jnp.mean(DATA.ode_nll(sde, jnp.asarray(x), SETTINGS.eps)))
    ode = m["ode"]
    assert ode["mc_stderr"] > 0
    # 4 standard errors of the probes' noise, plus the solve's own error: rtol = atol = 1e-5 on
    # an affine ODE in D = 6 over some 10-50 steps keeps delta_logp within ~1e-4 nats; 1e-3
    # leaves a margin of 10 for the error estimate's optimism.
    assert abs(ode["mean"] - exact) < 4 * ode["mc_stderr"] + 1e-3, (ode, exact)
    # Bound: its expectation over the data is H(p_eps) + KL(p_T || prior); these 40 points are a
    # sample of the data, so the error bar is the spread over images.
    expected = float(DATA.expected_bound(sde, SETTINGS.eps))
    bnd = m["bound"]
    assert abs(bnd["mean"] - expected) < 4 * bnd["stderr_images"], (bnd, expected)
    # ... and the bound lies above the exact NLL of the same points (exact score: it is tight up
    # to the gap of the bound at eps, which is small but positive).
    assert bnd["mean"] > exact - 4 * bnd["mc_stderr_from_draws"]

    per = np.load(tmp_path / "per_image.npz")
    assert per["ode"].shape == per["bound"].shape == per["ode_nfe"].shape == (4, N)
    nfe = m["ode"]["nfe"]
    assert 7 <= nfe["min"] <= nfe["mean"] <= nfe["max"] < SETTINGS.max_steps
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["ode"]["mean"] == ode["mean"]


def test_exact_trace_matches_the_closed_form_per_image(tmp_path):
    """With the exact divergence nothing is random: every image, every repeat, to 1e-3 nats."""
    sde, x = VPSDE(), points()
    settings = dataclasses.replace(SETTINGS, divergence="exact", bound=False, num_repeats=2)
    evaluate_split(exact_score(sde), sde, CONTINUOUS, x, settings, str(tmp_path))
    per = np.load(tmp_path / "per_image.npz")
    exact = np.asarray(DATA.ode_nll(sde, jnp.asarray(x), settings.eps))
    # the solve's error alone (see above): ~1e-4 nats expected, 1e-3 allowed
    np.testing.assert_allclose(per["ode"], np.broadcast_to(exact, (2, N)), atol=1e-3)
    np.testing.assert_array_equal(per["ode"][0], per["ode"][1])


def test_standard_error_estimates_the_repeat_noise_and_shrinks_with_repeats(tmp_path):
    """mc_stderr (spread of the R repeat means / sqrt R) agrees with the per-image Monte-Carlo
    variances, sqrt(mean_i var_i / (N R)), and falls as 1 / sqrt(R)."""
    sde, x = VPSDE(), points()
    settings = dataclasses.replace(SETTINGS, num_repeats=12, bound=True)
    m = evaluate_split(exact_score(sde), sde, CONTINUOUS, x, settings, str(tmp_path / "12"))
    per = np.load(tmp_path / "12" / "per_image.npz")
    for name in ("ode", "bound"):
        predicted = math.sqrt(per[name].var(axis=0, ddof=1).mean() / (N * 12))
        # a standard deviation estimated from R = 12 repeat means has a relative standard
        # error of 1/sqrt(2 (R - 1)) = 0.21: (0.45, 1.8) is beyond 2.5 of them either way
        assert 0.45 < m[name]["mc_stderr"] / predicted < 1.8, (name, m[name], predicted)
    # The bound's own error bar from its time draws predicts the same thing for any R.
    ratio = m["bound"]["mc_stderr_from_draws"] / m["bound"]["mc_stderr"]
    assert 0.45 < ratio < 2.2, ratio
    # Fewer repeats, same first 3 (the keys depend on (repeat, batch) only): a larger error bar.
    m3 = evaluate_split(
        exact_score(sde),
        sde,
        CONTINUOUS,
        x,
        dataclasses.replace(settings, num_repeats=3),
        str(tmp_path / "3"),
    )
    assert m3["ode"]["repeat_means"] == m["ode"]["repeat_means"][:3]
    ratio = m3["bound"]["mc_stderr_from_draws"] / m["bound"]["mc_stderr_from_draws"]
    # sqrt(12 / 3) = 2 exactly in expectation; the two draws-based estimates share their first
    # 3 repeats, and each averages N x R per-image variances, so the ratio is within ~0.1 of 2
    assert abs(ratio - 2.0) < 0.3, ratio


class Interrupted(Exception):
    pass


def test_interrupted_evaluation_resumes_to_identical_numbers(tmp_path, monkeypatch):
    sde, x = SubVPSDE(), points()
    score = exact_score(sde)
    full = evaluate_split(score, sde, CONTINUOUS, x, SETTINGS, str(tmp_path / "full"))

    real = evaluate.batches.eval_batches
    served = []

    def dying_batches(*args, **kwargs):  # the process dies after 5 of the 12 batch results
        for item in real(*args, **kwargs):
            if len(served) == 5:
                raise Interrupted
            served.append(1)
            yield item

    monkeypatch.setattr(evaluate.batches, "eval_batches", dying_batches)
    with pytest.raises(Interrupted):
        evaluate_split(score, sde, CONTINUOUS, x, SETTINGS, str(tmp_path / "resumed"))
    done = sorted(p.name for p in (tmp_path / "resumed").glob("repeat*.npz"))
    assert len(done) == 5 and not list((tmp_path / "resumed").glob("*.tmp*"))
    monkeypatch.setattr(evaluate.batches, "eval_batches", real)

    computed = []
    original_savez = np.savez
    monkeypatch.setattr(
        evaluate.np, "savez", lambda path, **kw: (computed.append(path), original_savez(path, **kw))
    )
    resumed = evaluate_split(score, sde, CONTINUOUS, x, SETTINGS, str(tmp_path / "resumed"))
    assert len([p for p in computed if "repeat" in str(p)]) == 12 - 5  # only the missing ones
    for name in ("ode", "bound"):
        assert resumed[name] == full[name]
    a, b = np.load(tmp_path / "full" / "per_image.npz"), np.load(tmp_path / "resumed/per_image.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_bad_settings_are_errors(tmp_path):
    sde, x = VPSDE(), points()
    with pytest.raises(ValueError, match="num_repeats"):
        dataclasses.replace(SETTINGS, num_repeats=0)
    with pytest.raises(ValueError, match="bpd_dataset"):
        dataclasses.replace(SETTINGS, split="validation")
    with pytest.raises(ValueError, match="both False"):
        evaluate_split(
            exact_score(sde),
            sde,
            CONTINUOUS,
            x,
            dataclasses.replace(SETTINGS, ode=False, bound=False),
            str(tmp_path),
        )
    with pytest.raises(ValueError, match="no images"):
        evaluate_split(exact_score(sde), sde, CONTINUOUS, x[:0], SETTINGS, str(tmp_path))


# A tiny MLP on digits, trained in process for 20 steps (checkpoints at 10 and 20).
TINY = [
    "--config.training.batch_size=16",
    "--config.model.width=64",
    "--config.model.num_blocks=2",
    "--config.training.n_iters=20",
    "--config.training.log_freq=10",
    "--config.training.eval_freq=10",
    "--config.training.snapshot_freq=10",
    "--config.training.snapshot_freq_for_preemption=10",
    "--config.eval.batch_size=100",
    "--config.eval.num_repeats=2",
    "--config.eval.num_t=16",
    "--config.eval.rtol=1e-3",
    "--config.eval.atol=1e-3",
    "--config.eval.enable_sampling=True",
    "--config.eval.num_samples=9",
]


def _config(*overrides):
    from test_train import config_with

    return config_with([*TINY, *overrides])


def _exp(*overrides):
    return experiment.from_config(_config(*overrides), source="configs/cpu/digits_mlp.py")


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = subprocess_xla_flags(NUM_TEST_DEVICES)
    return env


def _main(workdir, *args, check=True):
    cmd = [
        sys.executable, "-m", "mlscore_jax.main", f"--workdir={workdir}",
        "--config=configs/cpu/digits_mlp.py", "--progress=false", *TINY, *args,
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    if check:
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a 20-step tiny digits MLP (checkpoints at steps 10 and 20)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train_and_evaluate(_exp(), str(workdir), progress=False)
    return workdir


def test_eval_mode_end_to_end_on_digits(trained, tmp_path):
    """main --mode eval on a (barely) trained digits model: whole test split, files, table."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    _main(workdir, "--mode=eval")
    raw10 = ["--config.eval.ckpt_step=10", "--config.eval.use_ema=False", "--config.eval.ode=False"]
    evaluate.evaluate(_exp(*raw10, "--config.eval.enable_sampling=False"), workdir)

    dirs = sorted(p.name for p in (workdir / "eval").iterdir() if p.is_dir())
    assert len(dirs) == 2 and dirs[0].startswith("test_step10_raw_") and "step20_ema" in dirs[1]
    m = json.loads((workdir / "eval" / dirs[1] / "metrics.json").read_text())
    assert m["unit"] == "bits/dim" and m["num_images"] == 300 and m["step"] == 20
    assert m["ema"] is True and len(m["ode"]["repeat_means"]) == 2
    per = np.load(workdir / "eval" / dirs[1] / "per_image.npz")
    assert per["ode"].shape == per["bound"].shape == (2, 300)
    # An almost untrained network: both numbers finite and far above a good model's ~1.5-2 bpd.
    assert np.isfinite(per["ode"]).all() and np.isfinite(per["bound"]).all()
    assert m["ode"]["mean"] > 2.0 and m["bound"]["mean"] > 2.0
    table = (workdir / "results.md").read_text().splitlines()
    assert (
        len(table) == 2 + 2
        and "| digits | test | 20 | 300 x 2 | uniform (1) | bits/dim |" in table[2]
    )
    with Image.open(workdir / "eval" / "samples_step20.png") as png:
        assert png.size == (3 * 34 + 2, 3 * 34 + 2)
    samples = np.load(workdir / "eval" / "samples_step20.npz")
    assert samples["x"].shape == (9, 8, 8, 1) and np.isfinite(samples["x"]).all()
    assert "Given directory is read only" in (workdir / "log.txt").read_text()  # file, not console

    with pytest.raises(FileNotFoundError, match="no checkpoint of step 15"):
        evaluate.evaluate(_exp("--config.eval.ckpt_step=15"), workdir)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    p = _main(tmp_path / "empty", "--mode=eval", check=False)
    assert p.returncode == 2
    assert "error: no checkpoint in" in p.stderr and "train first" in p.stderr
    assert "Traceback" not in p.stderr and "Traceback" in (tmp_path / "empty/log.txt").read_text()
    p = _main(tmp_path / "empty", "--mode=eval", "--verbose", check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_evaluation_reads_only_the_ema_parameters_and_compiles_once(trained, tmp_path):
    """Changing optimizer flags at evaluation time (a different optimizer state structure:
    AdamW instead of Adam, no clipping) does not break the restore, and a second checkpoint of
    the same model reuses the compiled ODE + bound program."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    other_optimizer = ["--config.optim.weight_decay=0.1", "--config.optim.grad_clip=-1.0"]
    small = ["--config.eval.batch_size=20", "--config.eval.num_repeats=1"]
    small += ["--config.eval.enable_sampling=False"]
    exp10 = _exp(*other_optimizer, *small, "--config.eval.ckpt_step=10")
    exp20 = _exp(*other_optimizer, *small, "--config.eval.ckpt_step=20")
    # the premise: the whole train state of that run does not fit these optimizer settings
    tx, _ = train.make_optimizer(exp10.optim)
    abstract = jax.eval_shape(lambda k: train.init_state(exp10, tx, k), jax.random.key(0))
    with checkpoint.Checkpointer(str(workdir), read_only=True) as ckpt:
        with pytest.raises(checkpoint.StateMismatchError):
            ckpt.restore_latest(abstract)

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listener)
    try:
        first = evaluate.evaluate(exp10, workdir)
        n_first = list(compiles)
        start = time.perf_counter()
        second = evaluate.evaluate(exp20, workdir)
        second_s = time.perf_counter() - start
    finally:
        monitoring.clear_event_listeners()
    assert first["step"] == 10 and second["step"] == 20
    assert second["ode"]["mean"] != first["ode"]["mean"]  # other parameters, other numbers

    def batch_fn_compiles(names):
        return [n for n in names if n and "bits_per_dim_batch" in n]

    assert batch_fn_compiles(n_first)
    assert not batch_fn_compiles(compiles[len(n_first) :]), compiles[len(n_first) :]
    print(f"second checkpoint evaluated in {second_s:.1f} s without compiling")


def test_sigkilled_eval_resumes_to_the_numbers_of_an_uninterrupted_one(trained, tmp_path):
    small = ["--config.eval.batch_size=20", "--config.eval.enable_sampling=False"]
    small += ["--config.eval.num_repeats=1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(trained, ref)
    shutil.copytree(trained, killed)
    evaluate.evaluate(_exp(*small), ref)

    cmd = [
        sys.executable, "-m", "mlscore_jax.main", f"--workdir={killed}",
        "--config=configs/cpu/digits_mlp.py", "--progress=false", "--mode=eval", *TINY, *small,
    ]  # fmt: skip
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("eval/*/repeat*.npz"))) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list(killed.glob("eval/*/repeat*.npz")))
    assert 3 <= done < 15, done  # killed part-way through the 15 batches
    evaluate.evaluate(_exp(*small), killed)

    (ref_dir,) = ref.glob("eval/test_*")
    (killed_dir,) = killed.glob("eval/test_*")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref_dir, killed_dir))
    for name in ("ode", "bound"):
        assert a[name] == b[name]
    pa, pb = np.load(ref_dir / "per_image.npz"), np.load(killed_dir / "per_image.npz")
    for k in pa.files:
        np.testing.assert_array_equal(pa[k], pb[k])
