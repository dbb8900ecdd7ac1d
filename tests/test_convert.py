"""Released checkpoints in: the converter against the checkpoints the official code wrote.

`../shared/fixtures/official/` holds a score_sde_pytorch `.pth`, a score_flow `State` and two
`DeqState`s with random weights, and the official networks' outputs for them. A converted network
must reproduce those outputs (DDPM++ noise prediction to 1e-4 absolute in float32; the official
float32 forward is itself ~1e-5 off a float64 one), and the non-EMA weights must give the
non-EMA outputs, so taking the wrong copy fails.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multiprocess_worker import subprocess_xla_flags
from conftest import NUM_TEST_DEVICES
from test_train import _set

import configs.default_imagenet32
import configs.vp.cifar10_ddpmpp_continuous
from mlscore_jax import checkpoint, convert, evaluate, experiment, parallel, train, train_deq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "official"
CIFAR_TEST = SHARED / "data" / "cifar10_test_first1000.npz"

# The fixtures' networks: DDPM++ cont. nf 16, ch_mult (1, 2), 1 residual block; Flow++ filters
# 16, components 4, blocks 1, heads 2 (fixtures README).
FIXTURE_CONFIG = [
    "model.nf=16",
    "model.num_res_blocks=1",
    "deq.filters=16",
    "deq.components=4",
    "deq.blocks=1",
    "deq.heads=2",
]
CLI_FIXTURE_FLAGS = [f"--config.{kv}" for kv in FIXTURE_CONFIG] + ["--config.model.ch_mult=(1, 2)"]


def _require(*paths):
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} not found (../shared beside the repository)")


def _config(*overrides, imagenet=False):
    cfg = (
        configs.default_imagenet32.get_config()
        if imagenet
        else configs.vp.cifar10_ddpmpp_continuous.get_config()
    )
    cfg.model.ch_mult = (1, 2)
    for kv in FIXTURE_CONFIG + list(overrides):
        key, value = kv.split("=", 1)
        _set(cfg, key, value)
    return cfg


def _exp(*overrides, imagenet=False, images=None):
    """The fixture network on a stand-in data set (`images`: the test split)."""
    from mlscore_jax import datasets

    test = np.zeros((0, 32, 32, 3), np.uint8) if images is None else images
    name = "imagenet32" if imagenet else "cifar10"
    ds = datasets.Dataset(name=name, train=test, test=test, levels=256)
    return experiment.from_config(
        _config(*overrides, imagenet=imagenet), source="fixture config", dataset=ds
    )


def _noise(exp, params, ref):
    out = exp.model.apply(
        {"params": params}, jnp.asarray(ref["x"]), jnp.asarray(ref["t"]), train=False
    )
    return np.asarray(out)


@pytest.mark.parametrize("source", ["torch", "flax"])
def test_converted_ddpmpp_reproduces_the_official_output(source):
    path = FIXTURES / ("ddpmpp_torch.pth" if source == "torch" else "ddpmpp_flax/checkpoint_1")
    _require(path)
    ref = np.load(FIXTURES / f"ddpmpp_{source}.npz")
    exp = _exp()
    params, info = convert.read_score_checkpoint(str(path), exp, with_info=True)
    assert info.format == ("torch" if source == "torch" else "flax-msgpack")
    assert (info.kind, info.step, info.copy, info.num_params) == ("score", 1, "ema", 189_347)
    out = _noise(exp, params, ref)
    np.testing.assert_allclose(out, ref["output"], rtol=0, atol=1e-4)
    # The score s = -eps_hat / sigma: float32 cancellation in sigma at t = 1e-3 (fixtures README).
    _, sigma = exp.sde.marginal(jnp.asarray(ref["t"]))
    np.testing.assert_allclose(ref["std"], sigma, rtol=2e-3)
    # The raw weights give the official non-EMA output, and that differs from the EMA one.
    raw, info_raw = convert.read_score_checkpoint(str(path), exp, raw=True, with_info=True)
    assert info_raw.copy == "raw"
    np.testing.assert_allclose(_noise(exp, raw, ref), ref["output_nonema"], rtol=0, atol=1e-4)
    assert np.abs(ref["output_nonema"] - ref["output"]).max() > 0.5


def test_the_msgpack_reader_equals_flax():
    path = FIXTURES / "ddpmpp_flax" / "checkpoint_1"
    _require(path)
    ours = convert.read_flax_msgpack(str(path))
    theirs = flax.serialization.msgpack_restore(path.read_bytes())
    flat_ours = jax.tree_util.tree_flatten_with_path(ours)[0]
    flat_theirs = jax.tree_util.tree_flatten_with_path(theirs)[0]
    assert [p for p, _ in flat_ours] == [p for p, _ in flat_theirs]
    for (_, a), (_, b) in zip(flat_ours, flat_theirs, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)
    assert list(ours) == ["step", "optimizer", "lr", "model_state", "ema_rate", "params_ema", "rng"]


@pytest.mark.parametrize("variant", ["cifar10", "imagenet32"])
def test_converted_dequantizer_reproduces_the_official_output(variant):
    path = FIXTURES / f"deq_{variant}_flax" / "checkpoint_1"
    _require(path)
    ref = np.load(FIXTURES / f"deq_{variant}_flax.npz")
    exp = _exp(imagenet=variant == "imagenet32")
    results = {}
    for raw in (False, True):
        variables, info = convert.read_dequantizer_checkpoint(
            str(path), exp, raw=raw, with_info=True
        )
        assert (info.kind, info.step) == ("dequantizer", 1)
        u, log_q = exp.dequantizer.apply(variables, ref["eps"], ref["x_uint8"])
        results[raw] = np.asarray(u), np.asarray(log_q)
    # Tolerances of the fixtures (the official float32 forward: |du| <= 6.3e-7 and |d log q|
    # <= 8e-4 off float64).
    np.testing.assert_allclose(results[False][0], ref["u"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(results[False][1], -ref["neg_log_q"], rtol=0, atol=1e-2)
    np.testing.assert_allclose(results[True][0], ref["u_nonema"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(results[True][1], -ref["neg_log_q_nonema"], rtol=0, atol=1e-2)


def test_mismatching_network_names_the_first_path_and_both_shapes():
    _require(FIXTURES / "ddpmpp_torch.pth")
    for path in (FIXTURES / "ddpmpp_torch.pth", FIXTURES / "ddpmpp_flax" / "checkpoint_1"):
        with pytest.raises(convert.ConversionError) as e:
            convert.read_score_checkpoint(str(path), _exp("model.nf=32"))
        message = str(e.value)
        assert "\n" not in message
        assert "AttnBlockpp_0/GroupNorm_0/bias: checkpoint (32,), network (64,)" in message
        assert "nf=16" in message and "no paper config matches it" in message
    with pytest.raises(convert.ConversionError, match=r"deq.filters=16.*deq.components=4"):
        convert.read_dequantizer_checkpoint(
            str(FIXTURES / "deq_cifar10_flax" / "checkpoint_1"), _exp("deq.filters=32")
        )


def test_a_matching_paper_config_is_suggested():
    """CIFAR-10 and ImageNet 32 DDPM++ share the network (dropout aside): all four match."""
    from mlscore_jax import models

    cfg = configs.vp.cifar10_ddpmpp_continuous.get_config()
    network = convert.experiment_for(cfg).model  # TFDS CIFAR-10 is not prepared: a stand-in
    shapes = convert._shapes(models.abstract_variables(network, (1, 32, 32, 3))["params"])
    assert convert._suggest_configs(shapes) == [
        "configs/vp/cifar10_ddpmpp_continuous.py",
        "configs/subvp/cifar10_ddpmpp_continuous.py",
        "configs/vp/imagenet32_ddpmpp_continuous.py",
        "configs/subvp/imagenet32_ddpmpp_continuous.py",
    ]


def test_wrong_kind_truncated_and_foreign_files_are_one_line_errors(tmp_path, monkeypatch):
    _require(FIXTURES / "ddpmpp_torch.pth")
    exp = _exp()
    deq_file = str(FIXTURES / "deq_cifar10_flax" / "checkpoint_1")
    with pytest.raises(
        convert.ConversionError, match="holds a Flow\\+\\+ dequantizer.*--dequantiz"
    ):
        convert.read_score_checkpoint(deq_file, exp)
    score_file = str(FIXTURES / "ddpmpp_flax" / "checkpoint_1")
    with pytest.raises(convert.ConversionError, match="holds a score model.*pass it as --score"):
        convert.read_dequantizer_checkpoint(score_file, exp)
    with pytest.raises(convert.ConversionError, match="holds a score model.*pass it as --score"):
        convert.read_dequantizer_checkpoint(str(FIXTURES / "ddpmpp_torch.pth"), exp)

    for name, source in (
        ("flax_cut", score_file),
        ("torch_cut.pth", FIXTURES / "ddpmpp_torch.pth"),
    ):
        blob = Path(source).read_bytes()
        (tmp_path / name).write_bytes(blob[: len(blob) // 2])
        with pytest.raises(convert.ConversionError, match="truncated") as e:
            convert.read_score_checkpoint(str(tmp_path / name), exp)
        assert "\n" not in str(e.value)
    (tmp_path / "notes.txt").write_text("hello, this is not a checkpoint\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "list").write_bytes(b"\x93\x01\x02\x03")  # msgpack [1, 2, 3]
    for name, match in (("notes.txt", "not a flax msgpack"), ("empty", "empty"), ("list", "list")):
        with pytest.raises(convert.ConversionError, match=match):
            convert.read_score_checkpoint(str(tmp_path / name), exp)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.read_score_checkpoint(str(tmp_path / "nothing"), exp)

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(convert.ConversionError, match=r"needs torch.*pip install -e '\.\[torch\]'"):
        convert.read_score_checkpoint(str(FIXTURES / "ddpmpp_torch.pth"), exp)


def test_a_directory_stands_for_its_newest_checkpoint(tmp_path):
    _require(FIXTURES / "ddpmpp_flax")
    for n in (2, 10):
        shutil.copy(FIXTURES / "ddpmpp_flax" / "checkpoint_1", tmp_path / f"checkpoint_{n}")
    (tmp_path / "checkpoint_10.tmp").write_text("partial")
    _, info = convert.read_score_checkpoint(str(tmp_path), _exp(), with_info=True)
    assert info.path.endswith("checkpoint_10")


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = subprocess_xla_flags(NUM_TEST_DEVICES)
    return env


def _convert_cli(workdir, *flags):
    cmd = [
        sys.executable, "-m", "mlscore_jax.convert",
        "--config=configs/vp/cifar10_ddpmpp_continuous.py", f"--workdir={workdir}",
        *CLI_FIXTURE_FLAGS, *flags,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())


def test_command_line_converts_and_reports_errors_in_one_line(tmp_path):
    _require(FIXTURES / "ddpmpp_torch.pth")
    p = _convert_cli(
        tmp_path / "w",
        f"--score={FIXTURES / 'ddpmpp_torch.pth'}",
        f"--dequantizer={FIXTURES / 'deq_cifar10_flax' / 'checkpoint_1'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "score model step 1 from torch, dequantizer step 1" in p.stdout
    meta = json.loads((tmp_path / "w" / convert.META_FILE).read_text())
    assert meta["score"]["copy"] == "ema" and meta["score"]["num_params"] == 189_347
    assert meta["score"]["sha256"].startswith("b2423ce2")  # the fixtures README's hash
    assert meta["dequantizer"]["num_params"] == 284_080
    # Again, in process: nothing to do. Into a workdir holding another model: refused.
    again = convert.convert(
        _exp(), str(tmp_path / "w"), score=str(FIXTURES / "ddpmpp_torch.pth"),
        dequantizer=str(FIXTURES / "deq_cifar10_flax" / "checkpoint_1"),
    )  # fmt: skip
    assert again == meta
    with pytest.raises(convert.ConversionError, match=r"already holds checkpoints \(steps \[1\]\)"):
        convert.convert(
            _exp(), str(tmp_path / "w"), score=str(FIXTURES / "ddpmpp_flax" / "checkpoint_1")
        )

    bad = _convert_cli(
        tmp_path / "bad", f"--score={FIXTURES / 'ddpmpp_torch.pth'}", "--config.model.nf=32"
    )
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if "does not fit" in line]
    assert len(lines) == 1 and "checkpoint (32,), network (64,)" in lines[0]
    assert "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A workdir converted from the torch score fixture and the CIFAR dequantizer fixture."""
    _require(FIXTURES / "ddpmpp_torch.pth", CIFAR_TEST)
    workdir = tmp_path_factory.mktemp("converted") / "run"
    convert.convert(
        _exp(),
        str(workdir),
        score=str(FIXTURES / "ddpmpp_torch.pth"),
        dequantizer=str(FIXTURES / "deq_cifar10_flax" / "checkpoint_1"),
    )
    return workdir


def _cifar_exp(*overrides):
    with np.load(CIFAR_TEST) as f:
        images = f["x"][:4]
    tiny = [
        "eval.batch_size=4", "eval.num_repeats=1", "eval.rtol=1e-2", "eval.atol=1e-2",
        "eval.bound=False", "training.batch_size=4", "training.n_jitted_steps=1",
        "training.snapshot_freq=2", "training.snapshot_freq_for_preemption=2",
        "training.log_freq=1", "training.eval_freq=2", "training.n_iters=3",
    ]  # fmt: skip
    return _exp(*tiny, *overrides, images=images)


def test_converted_workdir_evaluates_with_the_converted_dequantizer(converted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(converted, workdir)
    exp = _cifar_exp()
    params, step = train.restore_params(exp, str(workdir), parallel.make_mesh())
    reference = convert.read_score_checkpoint(str(FIXTURES / "ddpmpp_torch.pth"), exp)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    assert step == 1

    # Both converted networks at once: the score model and the dequantizer (the uniform path
    # is the same program without the flow; tests/test_evaluate.py covers it).
    m = evaluate.evaluate(_cifar_exp("eval.dequantization=variational"), str(workdir))
    assert m["step"] == 1 and m["deq_step"] == 1 and m["num_images"] == 4
    # random weights: a poor density (~16 bits/dim), but finite
    assert np.isfinite(m["ode"]["mean"]) and np.isfinite(m["log_q"]["mean"])
    table = (workdir / "results.md").read_text()
    assert "| cifar10 | test | 1 | 4 x 1 | variational step 1 (1) | bits/dim |" in table


def test_converted_workdir_fine_tunes_from_its_step(converted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(converted, workdir)
    exp = _cifar_exp()
    state = train.train_and_evaluate(exp, str(workdir), progress=False)
    assert int(state.step) == 3  # from the source step 1, two more steps
    before = convert.read_score_checkpoint(str(FIXTURES / "ddpmpp_torch.pth"), exp)
    moved = [
        float(np.abs(np.asarray(a) - b).max())
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True)
    ]
    assert max(moved) > 0
    # A fresh optimizer: Adam's count restarted at the conversion (2 updates, not 3).
    counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
    assert counts and all(c == 2 for c in counts)
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    assert ckpt.snapshot_steps() == [1, 2] and 3 in ckpt.steps("preemption")
    ckpt.close()
    # The dequantizer directory is an ordinary train_deq workdir: it restores.
    mesh = parallel.make_mesh()
    _, deq_step = train_deq.restore_dequantizer(
        _cifar_exp("eval.dequantization=variational"), str(workdir), mesh
    )
    assert deq_step == 1


def test_every_reproduction_target_names_a_paper_config():
    makefile = (ROOT / "Makefile").read_text()
    rows = dict(re.findall(r"^(reproduce-score\S+?):\s*;.*CONFIG=(\S+)", makefile, flags=re.M))
    assert len(rows) == 12
    for name, config in rows.items():
        assert (ROOT / config).exists(), (name, config)
        assert f"make {name} SCORE=" in (ROOT / config).read_text(), (name, config)
