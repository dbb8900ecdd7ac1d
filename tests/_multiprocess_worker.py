"""Jobs that tests run in fresh processes (own device count, SIGTERM, jax.distributed).

``python tests/_multiprocess_worker.py JOB [options]`` runs one job; its last stdout line is
``RESULT <json>``. The tests import :func:`run_jobs` from here to launch jobs with a deadline.

Jobs:
  sharded-restore  4 CPU devices: save, then restore replicated / batch-sharded over a mesh.
  sigterm-loop     a training-like loop under PreemptionGuard; saves and exits 0 on SIGTERM.
  mesh             4 CPU devices, one process: mesh, shardings, shard_batch.
  dist-parallel    one of several jax.distributed processes: global reductions of shard_batch.
  dist-checkpoint  one of several jax.distributed processes: synchronised pre-emption, save,
                   restore of a replicated state.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------
# Launching (used by the tests)


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise AssertionError(f"no RESULT line\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")
        return json.loads(lines[-1][len("RESULT ") :])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def subprocess_xla_flags(num_devices: int) -> str:
    """XLA_FLAGS for a child process: this process's flags (e.g. --xla_cpu_max_isa=AVX2, so a
    child computes like its parent) plus `num_devices` host devices."""
    flags = [
        f for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]  # fmt: skip
    return " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])


def job_env(num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = subprocess_xla_flags(num_devices)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


class Jobs:
    """Processes started with ``start``; ``wait`` enforces one deadline and kills stragglers."""

    def __init__(self, jobs: list[list[str]], *, num_devices: int = 1) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.procs = []
        self.outputs = []
        for i, args in enumerate(jobs):
            out = open(os.path.join(self._tmp.name, f"{i}.out"), "w+")  # noqa: SIM115
            err = open(os.path.join(self._tmp.name, f"{i}.err"), "w+")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "_multiprocess_worker.py"), *args],
                stdout=out,
                stderr=err,
                env=job_env(num_devices),
                cwd=REPO,
            )
            self.procs.append(proc)
            self.outputs.append((out, err))

    def stdout(self, i: int) -> str:
        with open(self.outputs[i][0].name) as f:
            return f.read()

    def stderr(self, i: int) -> str:
        with open(self.outputs[i][1].name) as f:
            return f.read()

    def wait(self, timeout: float) -> list[JobResult]:
        """Waits for all; one failing stops the others; TimeoutError past ``timeout`` s."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if any(p.poll() not in (None, 0) for p in self.procs):
                    time.sleep(2.0)  # let the others report their own failure, then stop them
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"jobs did not finish in {timeout} s:\n{self.report()}")
                time.sleep(0.05)
        finally:
            self.kill()
        return [
            JobResult(p.returncode, self.stdout(i), self.stderr(i))
            for i, p in enumerate(self.procs)
        ]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def report(self) -> str:
        parts = []
        for i, p in enumerate(self.procs):
            with open(self.outputs[i][1].name) as f:
                err = f.read()
            parts.append(f"--- job {i} rc={p.poll()}\n{self.stdout(i)}\n{err[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        self.kill()
        for out, err in self.outputs:
            out.close()
            err.close()
        self._tmp.cleanup()


def run_jobs(jobs: list[list[str]], *, num_devices: int, timeout: float) -> list[JobResult]:
    """Runs the jobs concurrently; asserts that each exits 0; returns their outputs."""
    runner = Jobs(jobs, num_devices=num_devices)
    try:
        results = runner.wait(timeout)
        for i, r in enumerate(results):
            assert r.returncode == 0, f"job {i} ({jobs[i]}) failed:\n{runner.report()}"
        return results
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------
# Jobs (run in the child process)


def _setup_jax(num_devices: int):
    """JAX with `num_devices` CPU devices: configured in a fresh child process; in a test
    process (conftest already set them, backend started) only checked."""
    import jax

    if jax.config.jax_num_cpu_devices != num_devices:  # nothing may touch the backend before
        jax.config.update("jax_platforms", "cpu")  # jax.distributed.initialize in the child
        jax.config.update("jax_num_cpu_devices", num_devices)
    return jax


def _state(jax, seed: int):
    import jax.numpy as jnp
    import optax

    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k1, (8, 4)), "b": jax.random.normal(k2, (4,))}
    opt = optax.adam(1e-3)
    return {
        "params": params,
        "opt_state": opt.init(params),
        "ema": params,
        "key": jax.random.key(seed + 1),
        "step": jnp.int32(seed),
        "batch_stat": jnp.arange(8.0),
    }


def _same(jax, a, b) -> bool:
    import numpy as np

    def bits(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes()

    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and bits(x) == bits(y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def job_sharded_restore(args: argparse.Namespace) -> dict:
    jax = _setup_jax(4)

    from mlscore_jax import checkpoint, parallel

    state = _state(jax, 3)
    ckpt = checkpoint.Checkpointer(args.workdir, snapshot_freq=2)
    ckpt.maybe_save(2, state)
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    shardings = jax.tree.map(lambda _: repl, state)
    shardings["batch_stat"] = parallel.data_sharding(mesh)  # an [8] leaf split over 4 devices
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    restored = ckpt.restore(2, abstract)
    ckpt.close()
    return {
        "num_devices": len(jax.devices()),
        "same": _same(jax, restored, state),
        "shardings_ok": all(
            x.sharding == s
            for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True)
        ),
        "key_sharding": str(restored["key"].sharding),
        "key_dtype": str(restored["key"].dtype),
        "sharded_leaf_devices": len(restored["batch_stat"].addressable_shards),
        "sharded_leaf_shard_shape": list(restored["batch_stat"].addressable_shards[0].data.shape),
    }


def job_sigterm_loop(args: argparse.Namespace) -> dict:
    jax = _setup_jax(1)
    import jax.numpy as jnp

    from mlscore_jax import checkpoint

    state = _state(jax, 0)
    ckpt = checkpoint.Checkpointer(args.workdir, snapshot_freq=1000, preemption_freq=1000)

    @jax.jit
    def train_step(state):
        return {**state, "step": state["step"] + 1, "ema": jax.tree.map(jnp.sin, state["ema"])}

    step = 0
    with checkpoint.PreemptionGuard() as guard:
        while step < 100_000:
            state = train_step(state)
            step += 1
            ckpt.maybe_save(step, state)
            if step == 1:
                print("READY", flush=True)
            if guard.requested_by_any_process():
                saved = ckpt.maybe_save(step, state, force=True)
                break
            time.sleep(0.01)
    ckpt.close()
    return {"step": step, "saved": saved, "state_step": int(state["step"])}


def job_mesh(args: argparse.Namespace) -> dict:
    jax = _setup_jax(4)
    import numpy as np

    from mlscore_jax import parallel

    parallel.initialize_distributed()  # nothing set: auto-detection finds no cluster -> no-op
    mesh = parallel.make_mesh()
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    g = parallel.shard_batch(x, mesh)
    steps = np.arange(5 * 8 * 3, dtype=np.float32).reshape(5, 8, 3)
    gs = parallel.shard_batch({"image": steps, "label": steps[..., 0]}, mesh, batch_axis=1)
    errors = {}
    try:
        parallel.shard_batch(np.zeros((6, 3)), mesh)
    except ValueError as e:
        errors["shard_batch"] = str(e)
    try:
        parallel.per_process_batch_size(6, mesh)
    except ValueError as e:
        errors["per_process_batch_size"] = str(e)
    return {
        "distributed": jax.distributed.is_initialized(),
        "mesh_shape": dict(mesh.shape),
        "mesh_devices": mesh.devices.size,
        "shape": list(g.shape),
        "spec": str(g.sharding.spec),
        "is_data_sharding": g.sharding == parallel.data_sharding(mesh),
        "shard_rows": [np.asarray(s.data)[:, 0].tolist() for s in g.addressable_shards],
        "same": bool(np.array_equal(np.asarray(g), x)),
        "scan_shape": list(gs["image"].shape),
        "scan_spec": str(gs["image"].sharding.spec),
        "scan_shard_shape": list(gs["image"].addressable_shards[0].data.shape),
        "scan_label_spec": str(gs["label"].sharding.spec),
        "scan_same": bool(np.array_equal(np.asarray(gs["image"]), steps)),
        "per_process_batch_size": parallel.per_process_batch_size(8, mesh),
        "errors": errors,
    }


def _global_data(num_processes: int, local_b: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.normal(size=(num_processes * local_b, 3)).astype(np.float32)


def _reductions(jax):
    import jax.numpy as jnp

    def f(x):
        weights = jnp.arange(x.shape[0], dtype=x.dtype)[:, None]  # order-sensitive
        return {"sum": jnp.sum(x), "mean": jnp.mean(x), "weighted": jnp.sum(weights * x)}

    return f


def _init_dist(args: argparse.Namespace):
    jax = _setup_jax(args.local_devices)
    from mlscore_jax import parallel

    parallel.initialize_distributed(
        f"localhost:{args.port}",
        args.num_processes,
        args.process_id,
        initialization_timeout=args.init_timeout,
    )
    return jax, parallel


def job_dist_parallel(args: argparse.Namespace) -> dict:
    jax, parallel = _init_dist(args)
    import numpy as np
    from jax.experimental import multihost_utils

    p, n = jax.process_index(), jax.process_count()
    mesh = parallel.make_mesh()
    local_b = 4
    full = _global_data(n, local_b)
    local = full[p * local_b : (p + 1) * local_b]
    g = parallel.shard_batch(local, mesh)
    f = _reductions(jax)
    out = jax.jit(f, out_shardings=parallel.replicated(mesh))(g)
    reference = jax.jit(f)(jax.device_put(full, jax.local_devices()[0]))
    gathered = multihost_utils.process_allgather(g, tiled=True)
    # [n_steps, B, ...] with the batch on axis 1
    stacked = np.stack([local, 2 * local])
    gs = parallel.shard_batch(stacked, mesh, batch_axis=1)
    gs_sum = jax.jit(lambda x: x.sum(axis=(1, 2)), out_shardings=parallel.replicated(mesh))(gs)
    return {
        "process_index": p,
        "process_count": n,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh_devices": mesh.devices.size,
        "global_shape": list(g.shape),
        "spec": str(g.sharding.spec),
        "result": {k: float(v) for k, v in out.items()},
        "reference": {k: float(v) for k, v in reference.items()},
        "gathered_same": bool(np.array_equal(np.asarray(gathered), full)),
        "scan_shape": list(gs.shape),
        "scan_sums": np.asarray(gs_sum).tolist(),
        "scan_reference": [float(full.sum()), float(2 * full.sum())],
    }


def job_dist_checkpoint(args: argparse.Namespace) -> dict:
    jax, parallel = _init_dist(args)
    import signal

    import jax.numpy as jnp

    from mlscore_jax import checkpoint

    p = jax.process_index()
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    state = jax.jit(lambda: _state(jax, 5), out_shardings=repl)()  # sharded from creation
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    ckpt = checkpoint.Checkpointer(args.workdir, snapshot_freq=2, preemption_freq=1000)

    @jax.jit
    def train_step(state, batch):
        w = state["params"]["w"] + 1e-3 * jnp.mean(batch)
        return {**state, "params": {**state["params"], "w": w}, "step": state["step"] + 1}

    step = 0
    with checkpoint.PreemptionGuard() as guard:
        while step < 50:
            local = _global_data(jax.process_count(), 4)[p * 4 : (p + 1) * 4] + step
            state = train_step(state, parallel.shard_batch(local, mesh))
            step += 1
            ckpt.maybe_save(step, state)
            if step == 3 and p == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is "pre-empted"
            if guard.requested_by_any_process():
                ckpt.maybe_save(step, state, force=True)
                break
        local_flag = guard.requested()
    ckpt.wait_until_finished()
    restored, restored_step = ckpt.restore_latest(abstract)
    snapshot = ckpt.restore(2, abstract)
    snapshot_steps = ckpt.snapshot_steps()
    ckpt.close()
    return {
        "process_index": p,
        "stopped_at": step,
        "local_flag": local_flag,
        "restored_step": restored_step,
        "same": _same(jax, restored, state),
        "shardings_ok": all(x.sharding == repl for x in jax.tree.leaves(restored)),
        "snapshot_step": int(snapshot["step"]),
        "snapshot_steps": snapshot_steps,
    }


JOBS = {
    "sharded-restore": job_sharded_restore,
    "sigterm-loop": job_sigterm_loop,
    "mesh": job_mesh,
    "dist-parallel": job_dist_parallel,
    "dist-checkpoint": job_dist_checkpoint,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--workdir")
    parser.add_argument("--port", type=int)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--init-timeout", type=int, default=60)
    args = parser.parse_args()
    result = JOBS[args.job](args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
