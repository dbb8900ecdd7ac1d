"""Training: exact resume after SIGKILL and SIGTERM, multi-process equivalence, guard rails,
the optimizer schedule, and every config file checked key by key."""

import glob
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from _multiprocess_worker import subprocess_xla_flags
from conftest import NUM_TEST_DEVICES

from mlscore_jax import batches, checkpoint, datasets, experiment, train
from mlscore_jax.settings import OptimizerSettings

ROOT = Path(__file__).resolve().parents[1]

# A tiny MLP on digits: compiles in seconds, trains at hundreds of steps per second.
TINY = [
    "--config=configs/cpu/digits_mlp.py",
    "--progress=false",
    "--config.training.batch_size=16",
    "--config.model.width=64",
    "--config.model.num_blocks=2",
    "--config.training.log_freq=10",
    "--config.training.eval_freq=50",
    "--config.training.snapshot_freq=100",
    "--config.training.snapshot_freq_for_preemption=10",
]


def config_with(overrides, module="digits_mlp"):
    """`configs/cpu/<module>.py`'s config with `--config.a.b=value` overrides applied as the
    command line would apply them (`_set`); the tests' one way to build a tiny config."""
    import importlib

    cfg = importlib.import_module(f"configs.cpu.{module}").get_config()
    for arg in overrides:
        key, value = arg[len("--config.") :].split("=", 1)
        _set(cfg, key, value)
    return cfg


def _env(devices: int = NUM_TEST_DEVICES) -> dict:
    """A subprocess with as many CPU devices as this test process: the same compiled program,
    so its checkpoints are bit-identical to an in-process run's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = subprocess_xla_flags(devices)
    return env


def _main(workdir, *args, module="mlscore_jax.main", devices=NUM_TEST_DEVICES, **popen):
    cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *TINY, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), **popen)


def _run(workdir, *args, devices=NUM_TEST_DEVICES, timeout=300):
    p = _main(workdir, *args, devices=devices, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out.decode()[-4000:]
    return out.decode()


def _logged_steps(workdir) -> list[int]:
    path = Path(workdir) / "train_log.txt"
    if not path.exists():
        return []
    return [int(m) for m in re.findall(r"^step=(\d+)", path.read_text(), re.M)]


def _set(cfg: ml_collections.ConfigDict, key: str, value: str) -> None:
    """Apply one `--config.a.b=value` override the way ml_collections' flag parser does:
    the value is parsed as the type of the existing field (booleans by name, not bool(str))."""
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{key}={value!r} is not a boolean")
        node[leaf] = value.lower() == "true"
    else:
        node[leaf] = type(old)(value)


def _config(*overrides):
    cfg = importlib.import_module("configs.cpu.digits_mlp").get_config()
    for arg in [a for a in TINY if a.startswith("--config.")] + list(overrides):
        key, value = arg[len("--config.") :].split("=")
        _set(cfg, key, value)
    return cfg


def _exp(*overrides) -> experiment.Experiment:
    return experiment.from_config(_config(*overrides), source="configs/cpu/digits_mlp.py")


def _final_state(workdir, *overrides):
    """The newest checkpoint of a finished run (the whole train state)."""
    exp = _exp(*overrides)
    tx, _ = train.make_optimizer(exp.optim)
    abstract = jax.eval_shape(lambda k: train.init_state(exp, tx, k), jax.random.key(0))
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        state, step = ckpt.restore_latest(abstract)
    return state, step


def _assert_same_state(a, b):
    for name in ("params", "ema_params", "opt_state"):
        for x, y in zip(
            jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_the_override_helper_parses_booleans_by_name():
    cfg = _config("--config.data.random_flip=False", "--config.training.n_iters=7")
    assert cfg.data.random_flip is False and cfg.training.n_iters == 7
    cfg = _config("--config.data.random_flip=True")
    assert cfg.data.random_flip is True
    with pytest.raises(ValueError, match="not a boolean"):
        _config("--config.data.random_flip=0")


def test_exact_resume_after_sigkills(tmp_path):
    """A reference run in process; an interrupted run killed twice (in the middle of training,
    between checkpoints, and inside a checkpoint write just before orbax commits it), then
    resumed in process: the final train state is the same to the bit."""
    n_iters = "--config.training.n_iters=100"
    ref_dir, int_dir = tmp_path / "ref", tmp_path / "interrupted"
    train.train_and_evaluate(_exp(n_iters), str(ref_dir), progress=False)

    p = _main(int_dir, n_iters, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while max(_logged_steps(int_dir), default=0) < 20 and p.poll() is None:
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.01)
    assert p.poll() is None, "training finished before it could be killed"
    p.send_signal(signal.SIGKILL)  # somewhere after step 20, with steps in flight
    p.wait()
    killed_at = max(_logged_steps(int_dir))
    assert 20 <= killed_at < 100
    # a second kill inside a checkpoint write, just before orbax commits it (the third rename
    # of a finished write after the restart)
    p = subprocess.run(
        [sys.executable, "tests/_kill_in_checkpoint.py", f"--workdir={int_dir}", *TINY, n_iters],
        cwd=ROOT,
        env={**_env(), "KILL_AT_CHECKPOINT_COMMIT": "3"},
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:]
    assert glob.glob(str(int_dir / "checkpoints*" / "*orbax-checkpoint-tmp*")), "no torn write"

    train.train_and_evaluate(_exp(n_iters), str(int_dir), progress=False)
    ref, ref_step = _final_state(ref_dir)
    got, got_step = _final_state(int_dir)
    assert ref_step == got_step == 100
    _assert_same_state(ref, got)


def test_sigterm_saves_a_checkpoint_stops_and_the_resumed_run_is_exact(tmp_path, monkeypatch):
    """The pre-emption path of train_and_evaluate: SIGTERM (sent to this process while step 20
    is being checkpointed) -> a forced pre-emption checkpoint -> a clean return; the resumed
    run ends in the state of an uninterrupted one."""
    exp = _exp("--config.training.n_iters=40")
    ref = train.train_and_evaluate(exp, str(tmp_path / "ref"), progress=False)

    real = checkpoint.Checkpointer.maybe_save

    def maybe_save(self, step, state, *, force=False):
        if step == 20 and not force:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard only sets a flag
        return real(self, step, state, force=force)

    monkeypatch.setattr(checkpoint.Checkpointer, "maybe_save", maybe_save)
    stopped = train.train_and_evaluate(exp, str(tmp_path / "run"), progress=False)
    assert int(stopped.step) == 20
    assert "pre-emption requested: saving step 20" in (tmp_path / "run/train_log.txt").read_text()
    with checkpoint.Checkpointer(str(tmp_path / "run"), read_only=True) as ckpt:
        assert 20 in ckpt.steps("preemption")
    monkeypatch.setattr(checkpoint.Checkpointer, "maybe_save", real)
    resumed = train.train_and_evaluate(exp, str(tmp_path / "run"), progress=False)
    assert int(resumed.step) == 40
    _assert_same_state(jax.device_get(ref), jax.device_get(resumed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """2 processes x 2 devices (gloo) train like 1 process x 4 devices (in process)."""
    steps = "--config.training.n_iters=20"
    one = tmp_path / "one"
    train.train_and_evaluate(_exp(steps), str(one), progress=False)
    two = tmp_path / "two"
    port = _free_port()
    procs = [
        _main(
            two,
            steps,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            devices=2,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert "processes=2" in (two / "train_log.txt").read_text()

    def losses(d):
        return [
            float(x) for x in re.findall(r" loss=([\d.e+-]+)", (d / "train_log.txt").read_text())
        ]

    # Same program split differently over devices: the all-reduce of the gradients sums in
    # another order, so the runs agree to float32 rounding amplified over 20 Adam steps, not
    # to the bit. Adam's first steps move each parameter by about lr (sign-like updates), so a
    # rounding-level difference in a gradient changes a parameter by at most ~lr * few ulps;
    # 1e-5 relative (plus 1e-6 absolute for parameters near 0) holds that with a wide margin.
    assert len(losses(two)) == len(losses(one)) == 2
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    a, _ = _final_state(one)
    b, _ = _final_state(two)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_nan_in_batch_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = importlib.import_module("configs.cpu.toy2d_mlp").get_config()
    cfg.training.batch_size = 32
    cfg.training.n_iters = 50
    cfg.training.snapshot_freq_for_preemption = 10
    cfg.training.log_freq = 10
    cfg.training.eval_freq = 50
    cfg.model.width = 32
    ds = datasets.load("toy2d", num_train=5000, num_test=100)
    train_points = np.array(ds.train)
    # poison the example that step 37 (0-based: the 37th step, taking state 36 -> 37) reads
    idx = batches.train_indices(
        ds.train.shape[0], seed=cfg.seed, first_step=36, num_steps=1, global_batch_size=32
    )[0, 3]
    train_points[idx] = np.nan
    earlier = batches.train_indices(
        ds.train.shape[0], seed=cfg.seed, first_step=0, num_steps=36, global_batch_size=32
    )
    assert idx not in earlier
    poisoned = datasets.Dataset("toy2d", train_points, np.array(ds.test), None)
    exp = experiment.from_config(cfg, dataset=poisoned)
    with pytest.raises(train.NonFiniteError, match="step 37"):
        train.train_and_evaluate(exp, str(tmp_path), progress=False)
    tx, _ = train.make_optimizer(exp.optim)
    abstract = jax.eval_shape(lambda k: train.init_state(exp, tx, k), jax.random.key(0))
    with checkpoint.Checkpointer(str(tmp_path), read_only=True) as ckpt:
        state, step = ckpt.restore_latest(abstract)
    assert step == 30
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_warmup_schedule_and_gradient_clipping():
    tx, schedule = train.make_optimizer(OptimizerSettings(lr=1e-3, warmup=100, grad_clip=1.0))
    lrs = [float(schedule(s)) for s in (0, 25, 50, 100, 1000)]
    np.testing.assert_allclose(lrs, [0.0, 2.5e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    params = {"w": jnp.zeros(4)}
    g = {"w": jnp.array([6.0, 8.0, 0.0, 0.0])}  # global norm 10
    state = tx.init(params)
    _, state = tx.update(g, state, params)
    # Adam's first moment after one step is (1 - b1) * (clipped gradient): clipped to norm 1
    mu = optax.tree_utils.tree_get(state, "mu")["w"]
    np.testing.assert_allclose(mu, 0.1 * np.array([0.6, 0.8, 0.0, 0.0]), rtol=1e-6)
    small = {"w": jnp.array([0.3, 0.4, 0.0, 0.0])}  # norm 0.5 < 1: untouched
    _, state = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], 0.1 * small["w"])
    # without clipping the large gradient enters Adam unchanged
    tx, _ = train.make_optimizer(OptimizerSettings(lr=1e-3, warmup=0, grad_clip=0.0))
    _, state = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], 0.1 * g["w"])
    # the first update moves the parameter by lr * sign(g) in the warm-up-free case
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(updates["w"][:2], [-1e-3, -1e-3], rtol=1e-4)


def test_logged_flops_count_every_step_of_the_scan():
    """flops_per_s counts the FLOPs of one step times the steps: equal to XLA's count of the
    same n steps unrolled (the rolled scan's cost analysis counts its body once)."""
    exp = _exp("--config.training.n_jitted_steps=5")
    tx, schedule = train.make_optimizer(exp.optim)
    state = jax.eval_shape(lambda k: train.init_state(exp, tx, k), jax.random.key(0))
    per_step = train.step_flops(
        train.score_loss(exp), tx, schedule, state, (16, 8, 8, 1), np.uint8, ema_rate=0.9
    )
    stacked = jax.ShapeDtypeStruct((5, 16, 8, 8, 1), np.uint8)

    def run(unroll):
        fn = jax.jit(
            lambda s, b: train.train_steps(
                s,
                b,
                unroll=unroll,
                loss_fn=train.score_loss(exp),
                tx=tx,
                schedule=schedule,
                ema_rate=0.9,
            )
        )
        return fn.lower(state, stacked).cost_analysis()["flops"]

    assert per_step > 0
    np.testing.assert_allclose(run(True), 5 * per_step, rtol=1e-3)
    assert run(False) < 1.5 * per_step  # what the old count divided by n_jitted_steps


def test_misspelt_override_is_one_line_without_traceback(tmp_path):
    p = _main(
        tmp_path,
        "--config.training.likelihood_weigting=True",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "likelihood_weigting" in out.decode()
    assert not (tmp_path / "train_log.txt").exists()


CONFIGS = sorted(
    str(p.relative_to(ROOT))[:-3].replace(os.sep, ".")
    for p in (ROOT / "configs").rglob("*.py")
    if p.name != "__init__.py"
    and not p.name.startswith("default_")
    # the builder of the table's row configs (configs/table/<dataset>_<row>.py), not a config
    and p.relative_to(ROOT) != Path("configs/table/rows.py")
)


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("module", CONFIGS)
def test_every_config_builds_with_every_key_read(module, monkeypatch):
    """Every config file passes the key-by-key check and builds its SDE, network, loss and
    settings (the data set is replaced by a stand-in of the configured shape: TFDS data is
    not prepared here)."""
    cfg = importlib.import_module(module).get_config()
    d = cfg.data
    if d.dataset == "toy2d":
        stand_in = datasets.load("toy2d", num_train=8, num_test=8)
    else:
        shape = (4, d.image_size, d.image_size, d.num_channels)
        levels = 17 if d.dataset == "digits" else 256
        stand_in = datasets.Dataset(
            d.dataset, np.zeros(shape, np.uint8), np.zeros(shape, np.uint8), levels
        )
    exp = experiment.from_config(cfg, source=module, dataset=stand_in)
    assert exp.train.batch_size == cfg.training.batch_size
    assert exp.loss.weighting == ("likelihood" if cfg.training.likelihood_weighting else "score")
    assert exp.eval.bpd.num_repeats == cfg.eval.num_repeats
    assert exp.sampling.method == cfg.sampling.method
    train.make_optimizer(exp.optim)

    # and the real loader gets the configured options (stopped before reading any data)
    def fake_load(name, **options):
        assert name == d.dataset
        raise _Loaded(options)

    monkeypatch.setattr(datasets, "load", fake_load)
    with pytest.raises(_Loaded):
        experiment.from_config(cfg, source=module)


def test_unknown_config_key_is_an_error_naming_the_key_and_the_file():
    cfg = _config()
    cfg.model.widht = 128  # a typo in a config file (files, unlike flags, may add keys)
    with pytest.raises(experiment.ConfigError) as e:
        experiment.from_config(cfg, source="configs/cpu/digits_mlp.py")
    message = str(e.value)
    assert "configs/cpu/digits_mlp.py" in message and "model.widht" in message
    assert "did you mean model.width" in message
    cfg = _config()
    cfg.sampling.snrr = 0.1
    with pytest.raises(experiment.ConfigError, match="sampling.snrr"):
        experiment.from_config(cfg)
    cfg = _config()
    cfg.extra = ml_collections.ConfigDict({"a": 1})
    with pytest.raises(experiment.ConfigError, match="extra"):
        experiment.from_config(cfg)


def test_options_of_other_models_and_data_sets_are_ignored_by_name_or_rejected():
    exp = _exp()  # an MLP config on the shared defaults, which carry DDPM++ keys
    assert any(item.startswith("model.nf ") for item in exp.ignored)
    assert any(item.startswith("data.train_file ") for item in exp.ignored)
    assert not any(item.startswith("model.width") for item in exp.ignored)
    cfg = _config()
    cfg.data.train_file = "mine.npz"  # set, but digits would not read it
    with pytest.raises(experiment.ConfigError, match="data.train_file.*only to data.dataset"):
        experiment.from_config(cfg)
    cfg = _config()
    cfg.training.importance_weighting, cfg.training.likelihood_weighting = True, False
    with pytest.raises(experiment.ConfigError, match="needs training.likelihood_weighting"):
        experiment.from_config(cfg)
    cfg = _config()
    cfg.training.log_freq = 7  # not a multiple of n_jitted_steps = 5
    with pytest.raises(experiment.ConfigError, match="log_freq=7"):
        experiment.from_config(cfg)


def test_paper_configs_have_paper_settings():
    for sde in ("vp", "subvp"):
        for ds in ("cifar10", "imagenet32"):
            for deep in (False, True):
                name = f"configs.{sde}.{ds}_ddpmpp_{'deep_' if deep else ''}continuous"
                cfg = importlib.import_module(name).get_config()
                assert cfg.training.batch_size == 128 and cfg.optim.lr == 2e-4
                assert cfg.optim.warmup == 5000 and cfg.optim.grad_clip == 1.0
                assert cfg.model.ema_rate == 0.9999
                assert (cfg.model.beta_min, cfg.model.beta_max) == (0.1, 20.0)
                assert cfg.training.smallest_time == (1e-5 if sde == "vp" else 1e-2)
                assert cfg.model.num_res_blocks == (8 if deep else 4)
                assert cfg.training.n_iters == (950_001 if deep else 1_300_001)
                assert cfg.model.dropout == (0.1 if ds == "cifar10" else 0.0)
                assert not cfg.data.random_flip


def test_step_logs_the_batch_variance_of_the_per_example_losses():
    """metrics['loss_var'] is the variance (ddof = 1) across the batch of the per-example losses
    the step minimises the mean of, and metrics['loss'] is that mean."""
    exp = _exp()
    tx, schedule = train.make_optimizer(exp.optim)
    state = train.init_state(exp, tx, jax.random.key(0))
    batch = jnp.asarray(exp.dataset.train[:16])
    loss_fn = train.score_loss(exp)
    key = jax.random.fold_in(state.key, state.step)
    per_example = np.asarray(loss_fn(state.params, None, batch, key, True), np.float64)
    _, metrics = jax.jit(
        lambda s, b: train.train_step(s, b, loss_fn=loss_fn, tx=tx, schedule=schedule, ema_rate=0.9)
    )(state, batch)
    assert per_example.shape == (16,)
    # float32 sums of 16 terms of size ~1: rounding ~1e-6 relative
    np.testing.assert_allclose(float(metrics["loss"]), per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_var"]), per_example.var(ddof=1), rtol=1e-4)
