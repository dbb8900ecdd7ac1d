"""The dequantizer stage: `--mode train_deq` against a frozen score model, its checkpoints,
bit-for-bit resumption, evaluation with `eval.dequantization='variational'`, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _multiprocess_worker import subprocess_xla_flags
from conftest import NUM_TEST_DEVICES

from mlscore_jax import (
    bound,
    checkpoint,
    datasets,
    dequantizers,
    evaluate,
    experiment,
    models,
    train,
    train_deq,
)

ROOT = Path(__file__).resolve().parents[1]
# the tiny digits MLP of tests/test_train.py, and a tiny Flow++ dequantizer (CIFAR variant)
TINY = [
    "--config.training.batch_size=16",
    "--config.training.n_iters=10",
    "--config.model.width=64",
    "--config.model.num_blocks=2",
    "--config.training.log_freq=5",
    "--config.training.eval_freq=5",
    "--config.training.snapshot_freq=10",
    "--config.training.snapshot_freq_for_preemption=5",
    "--config.deq.filters=8",
    "--config.deq.components=2",
    "--config.deq.blocks=1",
    "--config.deq.heads=2",
    "--config.deq.context_channels=8",
    "--config.deq.n_iters=10",
    "--config.eval.batch_size=100",
    "--config.eval.num_repeats=1",
    "--config.eval.ode=False",
    "--config.eval.num_t=8",
]


def _config(*overrides):
    from test_train import config_with

    return config_with([*TINY, *overrides])


def _exp(*overrides, dataset=None):
    return experiment.from_config(
        _config(*overrides), source="configs/cpu/digits_mlp.py", dataset=dataset
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A workdir with a 10-step tiny digits score model."""
    workdir = tmp_path_factory.mktemp("scored") / "run"
    train.train_and_evaluate(_exp(), str(workdir), progress=False)
    return workdir


@pytest.fixture(scope="module")
def deq_trained(scored, tmp_path_factory):
    """The same workdir with a 10-step dequantizer."""
    workdir = tmp_path_factory.mktemp("deq") / "run"
    shutil.copytree(scored, workdir)
    train_deq.train_dequantizer(_exp(), str(workdir), progress=False)
    return workdir


def _same_state(a, b):
    for name in ("params", "ema_params", "opt_state"):
        for x, y in zip(
            jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_train_deq_resumes_bit_for_bit(scored, deq_trained, tmp_path):
    """20 steps at once vs 10 steps (the fixture's) + 10 more after a restart: same bits. The
    score model is frozen: its checkpoint is untouched and its EMA parameters are read."""
    straight = tmp_path / "straight"
    shutil.copytree(scored, straight)
    a = train_deq.train_dequantizer(_exp("--config.deq.n_iters=20"), str(straight), progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(deq_trained, resumed)
    b = train_deq.train_dequantizer(_exp("--config.deq.n_iters=20"), str(resumed), progress=False)
    assert int(a.step) == int(b.step) == 20
    _same_state(a, b)

    deq_dir = Path(train_deq.dequantizer_dir(str(resumed)))
    assert sorted(p.name for p in (deq_dir / "checkpoints").iterdir()) == ["10", "20"]
    meta = json.loads((deq_dir / train_deq.META_FILE).read_text())
    assert meta["dataset"] == "digits" and meta["score_step"] == 10
    assert meta["fields"]["filters"] == 8 and meta["example_shape"] == [8, 8, 1]
    log = (deq_dir / "train_log.txt").read_text()
    assert "start dequantizer step=10" in log and " bpd=" in log
    # the logged bits/dim are those of the interval's mean loss (printed to 6 significant
    # digits: both sides round at 5e-6 relative)
    lines = [
        dict(kv.split("=") for kv in ln.split()) for ln in log.splitlines() if ln[:5] == "step="
    ]
    num_dims = int(np.prod(meta["example_shape"]))
    for ln in lines:
        want = float(_exp().preprocessing.nats_to_bpd(np.asarray(float(ln["loss_mean"])), num_dims))
        np.testing.assert_allclose(float(ln["bpd"]), want, rtol=2e-5)
    # the score model's own checkpoints are those of its training run, unchanged
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["10"]


def test_the_loss_is_the_one_sample_bound_plus_log_q(scored):
    """The training loss averaged over many keys agrees with the evaluation's bound (many time
    draws) of the same dequantizer: both estimate E_q[B(x) + log q]."""
    exp = _exp()
    mesh = evaluate.parallel.make_mesh()
    score_params, _ = evaluate.restore_params(exp, str(scored), mesh)
    batch = exp.dataset.test[:16]
    state = jax.jit(train_deq.init_fn(exp))(jax.random.key(0), batch)
    loss = train_deq.dequantizer_loss(exp)
    keys = jax.random.split(jax.random.key(1), 256)
    draws = np.asarray(
        jax.jit(jax.vmap(lambda k: loss(state.params, score_params, batch, k, False).mean()))(keys)
    )
    deq = dequantizers.Variational(exp.dequantizer, exp.preprocessing)

    def many(key):
        x, log_q = deq(state.params, jax.random.fold_in(key, 1), batch)
        b = bound.nll_bound(
            models.ScoreModel(exp.model, exp.sde).bind(score_params), exp.sde, x, key, num_t=256
        )
        return (b.nll + log_q).mean()

    ref = np.asarray(jax.jit(jax.vmap(many))(jax.random.split(jax.random.key(2), 8)))
    se = np.sqrt(draws.var(ddof=1) / draws.size + ref.var(ddof=1) / ref.size)
    assert abs(draws.mean() - ref.mean()) < 4.5 * se, (draws.mean(), ref.mean(), se)


def test_variational_evaluation_reads_the_trained_dequantizer(deq_trained):
    exp = _exp("--config.eval.dequantization=variational", "--config.eval.num_dequant_samples=2")
    m = evaluate.evaluate(exp, str(deq_trained))
    assert m["dequantization"] == "variational" and m["deq_step"] == 10
    assert "_deq10_" in m["dir"]
    assert m["num_images"] == 300 and m["bound"]["mean"] < m["bound_single"]["mean"]
    assert np.isfinite(m["log_q"]["mean"])
    row = (deq_trained / "results.md").read_text().splitlines()[-1]
    assert "variational step 10 (2)" in row


def test_bad_dequantizer_input_is_a_clear_error(scored, deq_trained, tmp_path):
    # variational evaluation without a trained dequantizer says how to train one
    with pytest.raises(FileNotFoundError, match="--mode train_deq"):
        train_deq.restore_dequantizer(_exp(), str(scored), evaluate.parallel.make_mesh())
    # a dequantizer of other sizes: the parameter path and both shapes, and the setting
    with pytest.raises(
        checkpoint.StateMismatchError,
        match=r"block0_conv_c1_W'\]: checkpoint \(3, 3, 16, 8\) float32, target \(3, 3, 32, 16\)"
        r".*deq.filters: checkpoint 8, config 16",
    ):
        train_deq.restore_dequantizer(
            _exp("--config.deq.filters=16"), str(deq_trained), evaluate.parallel.make_mesh()
        )
    # ... of another data set of the same shape
    digits = datasets.load("digits")
    other = datasets.Dataset(
        name="other", train=digits.train, test=digits.test, levels=17, description="x"
    )
    with pytest.raises(checkpoint.CheckpointError, match="dataset: checkpoint 'digits'"):
        train_deq.restore_dequantizer(
            _exp(dataset=other), str(deq_trained), evaluate.parallel.make_mesh()
        )
    with pytest.raises(checkpoint.CheckpointError, match="another data set or network"):
        train_deq.train_dequantizer(_exp(dataset=other), str(deq_trained), progress=False)
    # no score model to train against
    with pytest.raises(FileNotFoundError, match="train first"):
        train_deq.train_dequantizer(_exp(), str(tmp_path / "empty"), progress=False)


def test_config_errors():
    cfg = _config("--config.eval.dequantization=variational")
    del cfg["deq"]
    with pytest.raises(experiment.ConfigError, match="needs a `deq` section"):
        experiment.from_config(cfg, source="x.py")
    cfg = _config()
    cfg.deq.filtres = 3
    with pytest.raises(experiment.ConfigError, match="did you mean deq.filters"):
        experiment.from_config(cfg, source="x.py")
    with pytest.raises(experiment.ConfigError, match="eval.dequantization must be one of"):
        _exp("--config.eval.dequantization=gaussian")
    with pytest.raises(experiment.ConfigError, match="unknown deq.name"):
        _exp("--config.deq.name=realnvp")


def test_main_train_deq_mode(scored, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(scored, workdir)
    cmd = [
        sys.executable, "-m", "mlscore_jax.main", f"--workdir={workdir}",
        "--config=configs/cpu/digits_mlp.py", "--progress=false", "--mode=train_deq",
        *TINY, "--config.deq.n_iters=5",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": subprocess_xla_flags(NUM_TEST_DEVICES),
    }
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert (workdir / "dequantizer" / "checkpoints-meta" / "5").is_dir()
