"""Training: exact resume after SIGKILL, multi-process equivalence, guard rails, configs."""

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
import numpy as np
import pytest

from mlscore_jax import checkpoint, data, experiment, train

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


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _main(workdir, *args, module="mlscore_jax.main", devices=1, **popen):
    cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *TINY, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), **popen)


def _run(workdir, *args, devices=1, timeout=300):
    p = _main(workdir, *args, devices=devices, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out.decode()[-4000:]
    return out.decode()


def _logged_steps(workdir) -> list[int]:
    path = Path(workdir) / "train_log.txt"
    if not path.exists():
        return []
    return [int(m) for m in re.findall(r"^step=(\d+)", path.read_text(), re.M)]


def _final_state(workdir, config_args=()):
    """The newest checkpoint of a finished run, restored on the host."""
    from ml_collections import config_flags  # noqa: F401  (config parsing below)

    cfg = _config(*config_args)
    exp = experiment.from_config(cfg)
    tx, _ = train.optimizer_from_config(cfg)
    abstract = jax.eval_shape(lambda k: train.init_state(exp, tx, k), jax.random.key(0))
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        state, step = ckpt.restore_latest(abstract)
    return state, step


def _config(*overrides):
    cfg = importlib.import_module("configs.cpu.digits_mlp").get_config()
    for arg in list(TINY[2:]) + list(overrides):
        key, value = arg[len("--config.") :].split("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    return cfg


def test_exact_resume_after_three_sigkills(tmp_path):
    n_iters = "--config.training.n_iters=300"
    ref_dir, int_dir = tmp_path / "ref", tmp_path / "interrupted"
    _run(ref_dir, n_iters)

    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(2):  # two kills at random moments of training
        p = _main(int_dir, n_iters, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        start = max(_logged_steps(int_dir), default=0)
        while max(_logged_steps(int_dir), default=0) <= start and p.poll() is None:
            assert time.time() < deadline, "training made no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    # a third kill inside a checkpoint write, just before orbax commits it
    env_kill = {"KILL_AT_CHECKPOINT_COMMIT": "3"}
    p = subprocess.run(
        [sys.executable, "tests/_kill_in_checkpoint.py", f"--workdir={int_dir}", *TINY, n_iters],
        cwd=ROOT,
        env={**_env(), **env_kill},
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:]
    kills += 1
    assert glob.glob(str(int_dir / "checkpoints*" / "*orbax-checkpoint-tmp*")), "no torn write"
    _run(int_dir, n_iters)
    assert kills == 3

    ref, ref_step = _final_state(ref_dir)
    got, got_step = _final_state(int_dir)
    assert ref_step == got_step == 300
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(ref.ema_params), jax.tree.leaves(got.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    steps = "--config.training.n_iters=20"
    one = tmp_path / "one"
    _run(one, steps, devices=4)
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

    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    a, _ = _final_state(one)
    b, _ = _final_state(two)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_nan_in_batch_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = importlib.import_module("configs.cpu.toy2d_mlp").get_config()
    cfg.training.batch_size = 32
    cfg.training.n_iters = 100
    cfg.training.snapshot_freq_for_preemption = 10
    cfg.training.log_freq = 10
    cfg.training.eval_freq = 100
    cfg.model.width = 32
    ds = data.load("toy2d", num_train=5000, num_test=100)
    train_points = np.array(ds.train)
    # poison the example that step 37 (0-based: the 37th step, taking state 36 -> 37) reads
    idx = data.train_indices(
        ds.train.shape[0], seed=cfg.seed, first_step=36, num_steps=1, global_batch_size=32
    )[0, 3]
    train_points[idx] = np.nan
    earlier = data.train_indices(
        ds.train.shape[0], seed=cfg.seed, first_step=0, num_steps=36, global_batch_size=32
    )
    assert idx not in earlier
    poisoned = data.Dataset("toy2d", train_points, np.array(ds.test), None)
    exp = experiment.from_config(cfg, dataset=poisoned)
    with pytest.raises(train.NonFiniteError, match="step 37"):
        train.train_and_evaluate(cfg, str(tmp_path), progress=False, exp=exp)
    tx, _ = train.optimizer_from_config(cfg)
    abstract = jax.eval_shape(lambda k: train.init_state(exp, tx, k), jax.random.key(0))
    with checkpoint.Checkpointer(str(tmp_path), read_only=True) as ckpt:
        state, step = ckpt.restore_latest(abstract)
    assert step == 30
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_misspelt_override_names_the_key(tmp_path):
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
)


@pytest.mark.parametrize("module", CONFIGS)
def test_every_config_builds(module):
    cfg = importlib.import_module(module).get_config()
    for key in (
        "training.likelihood_weighting",
        "training.importance_weighting",
        "training.smallest_time",
        "training.n_jitted_steps",
        "data.random_flip",
        "data.uniform_dequantization",
        "model.ema_rate",
        "optim.lr",
        "optim.warmup",
        "optim.grad_clip",
    ):
        section, name = key.split(".")
        assert name in cfg[section], key
    train._check_config(cfg)
    experiment.build_sde(cfg)
    experiment.build_model(cfg)
    experiment.loss_spec(cfg)
    train.optimizer_from_config(cfg)


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
