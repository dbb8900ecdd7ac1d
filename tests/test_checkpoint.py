"""Checkpointer and PreemptionGuard: round trip, keep policy, resume, damage, NaN, SIGTERM."""

import argparse
import logging
import os
import shutil
import signal
import time

import _multiprocess_worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _multiprocess_worker import Jobs, free_port, run_jobs
from _multiprocess_worker import _state as worker_state

from mlscore_jax.checkpoint import (
    PREEMPTION_DIR,
    SNAPSHOT_DIR,
    Checkpointer,
    CheckpointError,
    NonFiniteStateError,
    PreemptionGuard,
    StateMismatchError,
)


def make_state(seed: int) -> dict:
    """A training-state-like pytree: params, adam state after one update, EMA, typed keys, step."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.full((4,), 0.1)},
        "dense": jax.random.normal(k2, (16, 8)).astype(jnp.bfloat16),
    }
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * seed, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "ema": jax.tree.map(lambda p: p * 0.5, params),
        "key": jax.random.key(seed + 100),
        "rbg_keys": jax.random.split(jax.random.key(seed, impl="rbg"), 3),
        "step": jnp.int32(seed),
    }


def abstract_of(state):
    return jax.eval_shape(lambda: state)


def bits(x) -> bytes:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).tobytes()


def assert_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert bits(x) == bits(y)


def listed(path: str) -> list[str]:
    return sorted(os.listdir(path), key=lambda s: (len(s), s))


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bit_identical(tmp_path, async_save):
    state = make_state(3)
    expected = jax.tree.map(lambda x: x.copy(), state)
    ckpt = Checkpointer(tmp_path, snapshot_freq=5, preemption_freq=2, async_save=async_save)
    assert ckpt.maybe_save(5, state)
    if async_save:  # the caller may donate its buffers as soon as maybe_save returns
        jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(5, abstract_of(expected))
    assert_identical(restored, expected)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert restored["key"].dtype == jax.random.key(0).dtype
    assert restored["rbg_keys"].dtype == jax.random.key(0, impl="rbg").dtype
    # keys still work as keys, and give the same numbers
    assert bits(jax.random.normal(restored["key"], (3,))) == bits(
        jax.random.normal(expected["key"], (3,))
    )
    ckpt.close()


def test_keep_policy_and_layout(tmp_path):
    ckpt = Checkpointer(tmp_path, snapshot_freq=4, preemption_freq=2)
    saved = [step for step in range(0, 13) if ckpt.maybe_save(step, make_state(step))]
    assert saved == [2, 4, 6, 8, 10, 12]
    assert ckpt.snapshot_steps() == [4, 8, 12]  # kept forever
    assert ckpt.steps("preemption") == [10]  # one deep; step 12 went to the snapshot
    assert listed(tmp_path / SNAPSHOT_DIR) == ["4", "8", "12"]
    assert listed(tmp_path / PREEMPTION_DIR) == ["10"]
    # forced (SIGTERM / end of training) off the schedule: a pre-emption checkpoint
    assert ckpt.maybe_save(13, make_state(13), force=True)
    assert listed(tmp_path / PREEMPTION_DIR) == ["13"]
    # forcing a step that already has its checkpoint writes nothing
    assert not ckpt.maybe_save(13, make_state(13), force=True)
    assert not ckpt.maybe_save(12, make_state(12), force=True)
    ckpt.close()


def test_restore_latest_picks_newest_of_both_kinds(tmp_path):
    ckpt = Checkpointer(tmp_path, snapshot_freq=3, preemption_freq=2)
    assert ckpt.restore_latest(abstract_of(make_state(0))) is None
    for step in range(1, 6):
        ckpt.maybe_save(step, make_state(step))
    assert (ckpt.snapshot_steps(), ckpt.steps("preemption")) == ([3], [4])
    state, step = ckpt.restore_latest(abstract_of(make_state(0)))
    assert step == 4
    assert_identical(state, make_state(4))
    ckpt.maybe_save(6, make_state(6))  # a snapshot newer than the pre-emption checkpoint
    state, step = ckpt.restore_latest(abstract_of(make_state(0)))
    assert step == 6
    assert_identical(state, make_state(6))
    ckpt.close()
    # a fresh process resuming sees the same
    state, step = Checkpointer(tmp_path, snapshot_freq=3, preemption_freq=2).restore_latest(
        abstract_of(make_state(0))
    )
    assert step == 6


# When tensorstore fails to read a damaged file, orbax's restore raises while some of its
# asyncio callbacks are still pending; they later report "Event loop is closed" as unraisable
# exceptions. That is noise from orbax, not a failure of the behaviour under test.


def _damage(step_dir: str, how: str) -> list[str]:
    """Damages every array data file (files under a ``d/`` directory) of a checkpoint."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(root) == "d"
    ]
    assert files
    for f in files:
        if how == "delete":
            os.remove(f)
        elif how == "truncate":
            os.truncate(f, os.path.getsize(f) // 2)
        else:  # flip one bit in the middle
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2] ^= 0x10
            open(f, "wb").write(bytes(data))
    return files


@pytest.mark.parametrize("how", ["delete", "truncate", "bitflip"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see _damage
def test_damaged_checkpoint_is_skipped_with_warning(tmp_path, caplog, how):
    ckpt = Checkpointer(tmp_path, snapshot_freq=2, preemption_freq=1)
    for step in range(1, 4):
        ckpt.maybe_save(step, make_state(step))
    assert (ckpt.snapshot_steps(), ckpt.steps("preemption")) == ([2], [3])
    damaged = os.path.join(tmp_path, PREEMPTION_DIR, "3")
    _damage(damaged, how)

    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore_latest(abstract_of(make_state(0)))
    assert step == 2
    assert_identical(state, make_state(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Skipping damaged checkpoint" in w and damaged in w for w in warnings), warnings
    # moved aside, so step 3 can be written again
    assert ckpt.steps("preemption") == []
    (moved,) = os.listdir(tmp_path / "checkpoints-damaged")
    assert moved.startswith("checkpoints-meta-3-")
    assert ckpt.maybe_save(3, make_state(3))
    ckpt.close()


def test_wrong_contents_that_orbax_reads_happily_are_detected(tmp_path, caplog):
    # files of another write put in place of the right ones: every file is intact, so only the
    # fingerprints recorded at save time can tell
    ckpt = Checkpointer(tmp_path, snapshot_freq=1)
    for step in (1, 2, 3):
        ckpt.maybe_save(step, make_state(step))
    target = os.path.join(tmp_path, SNAPSHOT_DIR, "3", "state")
    shutil.rmtree(target)
    shutil.copytree(os.path.join(tmp_path, SNAPSHOT_DIR, "2", "state"), target)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        ckpt.restore(3, abstract_of(make_state(0)))
    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore_latest(abstract_of(make_state(0)))
    assert step == 2
    assert_identical(state, make_state(2))
    assert "checkpoints/3: contents differ" in caplog.text
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see _damage
def test_damaged_snapshot_restore_by_step_raises(tmp_path):
    ckpt = Checkpointer(tmp_path, snapshot_freq=1)
    ckpt.maybe_save(1, make_state(1))
    _damage(os.path.join(tmp_path, SNAPSHOT_DIR, "1"), "truncate")
    reader = Checkpointer(tmp_path, read_only=True)
    with pytest.raises(CheckpointError, match="checkpoints/1"):
        reader.restore(1, abstract_of(make_state(0)))
    with pytest.raises(CheckpointError, match="damaged"):
        reader.restore_latest(abstract_of(make_state(0)))
    assert reader.snapshot_steps() == [1]  # read-only: nothing is moved
    with pytest.raises(CheckpointError, match="damaged"):
        ckpt.restore_latest(abstract_of(make_state(0)))
    assert ckpt.snapshot_steps() == [1]  # nothing usable: left in place, a restart fails again
    with pytest.raises(CheckpointError, match="no complete snapshot checkpoint of step 7"):
        reader.restore(7, abstract_of(make_state(0)))


def test_unfinished_tmp_directory_is_ignored(tmp_path, caplog):
    writer = Checkpointer(tmp_path, snapshot_freq=2, preemption_freq=2)
    writer.maybe_save(2, make_state(2))
    writer.close()
    # a save that died half way: orbax's temporary name, some files missing or cut short
    half = os.path.join(tmp_path, SNAPSHOT_DIR, "4.orbax-checkpoint-tmp-1712345678")
    shutil.copytree(os.path.join(tmp_path, SNAPSHOT_DIR, "2"), half)
    _damage(half, "truncate")
    junk = os.path.join(tmp_path, PREEMPTION_DIR, "6.orbax-checkpoint-tmp-1712345679")
    os.makedirs(os.path.join(junk, "state"))

    reader = Checkpointer(tmp_path, read_only=True)  # e.g. evaluation while training runs
    with caplog.at_level(logging.WARNING):
        state, step = reader.restore_latest(abstract_of(make_state(0)))
    assert step == 2
    assert_identical(state, make_state(2))
    assert reader.snapshot_steps() == [2]
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert half in warnings and junk in warnings
    assert os.path.isdir(half)  # a reader never deletes anything

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        writer = Checkpointer(tmp_path, snapshot_freq=2, preemption_freq=2)  # resuming trainer
    assert half in caplog.text
    assert writer.maybe_save(4, make_state(4))  # orbax removes leftovers before its first save
    assert not os.path.exists(half) and not os.path.exists(junk)
    assert writer.snapshot_steps() == [2, 4]
    writer.close()


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_state_is_refused(tmp_path, bad):
    state = make_state(1)
    state["ema"]["conv"]["bias"] = state["ema"]["conv"]["bias"].at[2].set(bad)
    ckpt = Checkpointer(tmp_path, snapshot_freq=7)
    with pytest.raises(NonFiniteStateError, match=r"step 7.*\['ema'\]\['conv'\]\['bias'\]"):
        ckpt.maybe_save(7, state)
    assert ckpt.snapshot_steps() == []
    assert not os.path.exists(os.path.join(tmp_path, SNAPSHOT_DIR, "7"))


def test_mismatched_target_is_an_error_not_damage(tmp_path):
    ckpt = Checkpointer(tmp_path, snapshot_freq=1)
    ckpt.maybe_save(1, make_state(1))
    target = abstract_of(make_state(0))
    target["params"]["dense"] = jax.ShapeDtypeStruct((16, 9), jnp.bfloat16)
    with pytest.raises(StateMismatchError, match=r"\['params'\]\['dense'\]"):
        ckpt.restore_latest(target)
    target = abstract_of(make_state(0))
    del target["ema"]
    with pytest.raises(StateMismatchError, match="different trees"):
        ckpt.restore(1, target)
    assert ckpt.snapshot_steps() == [1]


def test_read_only_sees_new_snapshots(tmp_path):
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.snapshot_steps() == []
    assert reader.restore_latest(abstract_of(make_state(0))) is None
    assert not os.path.exists(tmp_path / SNAPSHOT_DIR)
    writer = Checkpointer(tmp_path, snapshot_freq=1)
    writer.maybe_save(1, make_state(1))
    assert reader.snapshot_steps() == [1]
    writer.maybe_save(2, make_state(2))
    assert reader.snapshot_steps() == [1, 2]
    assert_identical(reader.restore(2, abstract_of(make_state(0))), make_state(2))
    with pytest.raises(CheckpointError, match="read-only"):
        reader.maybe_save(3, make_state(3), force=True)
    writer.close()


def test_preemption_guard_sets_flag_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested() and not guard.requested_by_any_process()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert guard.requested() and guard.requested_by_any_process()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_sharded_restore_over_four_devices(tmp_path):
    # in process: the test process has 4 CPU devices (conftest)
    r = _multiprocess_worker.job_sharded_restore(argparse.Namespace(workdir=str(tmp_path)))
    assert r["num_devices"] == 4
    assert r["same"] and r["shardings_ok"]
    assert "spec=P()" in r["key_sharding"] and r["key_dtype"] == "key<fry>"
    assert r["sharded_leaf_devices"] == 4 and r["sharded_leaf_shard_shape"] == [2]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    jobs = Jobs([["sigterm-loop", "--workdir", str(tmp_path)]])
    try:
        deadline = time.monotonic() + 60
        while "READY" not in jobs.stdout(0):
            assert jobs.procs[0].poll() is None, jobs.report()
            assert time.monotonic() < deadline, jobs.report()
            time.sleep(0.05)
        jobs.procs[0].send_signal(signal.SIGTERM)
        (job,) = jobs.wait(timeout=60)
        assert job.returncode == 0, jobs.report()
    finally:
        jobs.close()
    r = job.result
    assert r["saved"] and r["step"] == r["state_step"] >= 1
    ckpt = Checkpointer(tmp_path, read_only=True)
    assert ckpt.steps("preemption") == [r["step"]]
    state, step = ckpt.restore_latest(abstract_of(worker_state(jax, 0)))
    assert step == r["step"] and int(state["step"]) == r["step"]


def test_two_processes_agree_on_preemption_and_checkpoint(tmp_path):
    port = free_port()
    jobs = [
        [
            "dist-checkpoint",
            "--workdir",
            str(tmp_path),
            "--port",
            str(port),
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--local-devices",
            "2",
        ]
        for i in range(2)
    ]
    results = [job.result for job in run_jobs(jobs, num_devices=2, timeout=120)]
    assert [r["local_flag"] for r in results] == [False, True]  # only process 1 got SIGTERM
    for r in results:
        assert r["stopped_at"] == 3 and r["restored_step"] == 3
        assert r["same"] and r["shardings_ok"]
        assert r["snapshot_steps"] == [2] and r["snapshot_step"] == 5 + 2
    assert listed(tmp_path / PREEMPTION_DIR) == ["3"]


def test_relative_workdir_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    """`make train WORKDIR=runs/x` passes a relative path; orbax itself only takes absolute ones."""
    monkeypatch.chdir(tmp_path)
    state = make_state(0)
    with Checkpointer("runs/rel", snapshot_freq=10) as ckpt:
        assert ckpt.maybe_save(10, state)
    monkeypatch.chdir("/")
    with Checkpointer(tmp_path / "runs" / "rel", read_only=True) as ckpt:
        restored, step = ckpt.restore_latest(abstract_of(state))
    assert step == 10
    assert_identical(restored, state)
