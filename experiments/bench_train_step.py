"""Training throughput of `--mode train`, side by side with an older commit of this suite.

    .venv/bin/python experiments/bench_train_step.py [--baseline a1bbe1d] [--configs cifar,digits]
        [--steps 60] [--repeats 2]

For each configuration below it runs `python -m mlscore_jax.main --mode train` for `--steps`
steps in a fresh temporary workdir, once with this working tree and (with `--baseline REV`) once
with REV checked out as a git worktree, alternating A, B, A, B (`--repeats`), so both see the
same machine load. Each run's numbers come from its own `train_log.txt`: images/s and the
FLOP/s the logger reports, the median over the logged intervals after the first (the first
includes compilation). The configurations pin every network setting on the command line, so
both commits train the same network on the same data even where a config file changed:

* `cifar`: `configs/vp/cifar10_ddpmpp_continuous.py`, DDPM++ cont. nf 32, ch_mult (1, 2, 2), 2
  residual blocks, attention at 16x16, dropout 0.1 (1,754,147 parameters), batch 32, real CIFAR-10
  images (`../shared/data/cifar10_train_first4000.npz`; random uint8 images if absent), the
  paper's loss (likelihood weighting + importance sampling), Adam + warm-up + clipping + EMA,
  `n_jitted_steps` 5: the network of the speed issue.
* `digits`: `configs/cpu/digits_ddpmpp.py` at nf 16 (the demo's network), batch 64.
* `mnist`: `configs/cpu/mnist_ddpmpp.py` (nf 32, ch_mult (1, 2, 2)), batch 64, on
  `../shared/data/mnist_*.npz` (skipped if absent).

Also printed: XLA's cost analysis of one training step (this tree; `train.step_flops`), the
achieved FLOP/s it implies at the measured images/s (it must equal what the logger reports:
the logger counts the scanned step's body `n_jitted_steps` times), and a matmul ceiling of the
machine (a 2048 x 2048 float32 matmul, measured in the same run).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import provenance  # experiments/provenance.py (jax-free: the benchmark's parent runs no jax)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _cifar_data(tmp: str) -> list[str]:
    path = os.path.join(SHARED, "cifar10_train_first4000.npz")
    if not os.path.exists(path):  # same shape, random pixels: the speed does not depend on them
        path = os.path.join(tmp, "cifar_random.npz")
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8))
    return [
        "--config.data.dataset=npz",
        f"--config.data.train_file={path}",
        f"--config.data.test_file={path}",
    ]


CONFIGS = {
    "cifar": (
        "configs/vp/cifar10_ddpmpp_continuous.py",
        [
            "--config.model.nf=32",
            "--config.model.ch_mult=(1, 2, 2)",
            "--config.model.num_res_blocks=2",
            "--config.model.attn_resolutions=(16,)",
            "--config.model.dropout=0.1",
            "--config.training.batch_size=32",
            "--config.training.n_jitted_steps=5",
            "--config.training.likelihood_weighting=True",
            "--config.training.importance_weighting=True",
        ],
        32,
    ),
    "digits": (
        "configs/cpu/digits_ddpmpp.py",
        [
            "--config.model.nf=16",
            "--config.model.ch_mult=(1, 2)",
            "--config.model.num_res_blocks=2",
            "--config.training.batch_size=64",
            "--config.training.n_jitted_steps=5",
        ],
        64,
    ),
    "mnist": (
        "configs/cpu/mnist_ddpmpp.py",
        [
            "--config.model.nf=32",
            "--config.model.ch_mult=(1, 2, 2)",
            "--config.training.batch_size=64",
            "--config.training.n_jitted_steps=5",
            "--config.data.dataset=npz",
            f"--config.data.train_file={os.path.join(SHARED, 'mnist_train.npz')}",
            f"--config.data.test_file={os.path.join(SHARED, 'mnist_test.npz')}",
        ],
        64,
    ),
}


def _frequencies(n_jit: int, steps: int) -> list[str]:
    big = 1_000_000 * n_jit
    return [
        f"--config.training.n_iters={steps}",
        f"--config.training.log_freq={n_jit}",
        f"--config.training.eval_freq={big}",
        f"--config.training.snapshot_freq={big}",
        f"--config.training.snapshot_freq_for_preemption={big}",
    ]


def _n_jit(flags: list[str], default: int) -> int:
    for f in flags:
        if f.startswith("--config.training.n_jitted_steps="):
            return int(f.split("=")[1])
    return default


def run_training(tree: str, config: str, flags: list[str], steps: int, n_jit: int) -> dict:
    """One `--mode train` run in `tree`; medians of its logged intervals after the first."""
    workdir = tempfile.mkdtemp(prefix="bench_train_step_")
    cmd = [
        sys.executable, "-m", "mlscore_jax.main", "--mode=train", f"--config={config}",
        f"--workdir={workdir}", "--progress=false", *flags, *_frequencies(n_jit, steps),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=tree)
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise RuntimeError(f"training in {tree} failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(workdir, "train_log.txt")) as f:
        lines = [dict(re.findall(r"(\w+)=([-\d.e+]+)", line)) for line in f if "step=" in line]
    shutil.rmtree(workdir, ignore_errors=True)
    lines = [d for d in lines if "images_per_s" in d][1:]  # the first interval compiles
    if len(lines) < 3:
        raise RuntimeError(f"too few logged intervals ({len(lines)}): raise --steps")
    images = [float(d["images_per_s"]) for d in lines]
    flops = [float(d["flops_per_s"]) for d in lines if "flops_per_s" in d]
    return {
        "images_per_s": statistics.median(images),
        "flops_per_s": statistics.median(flops) if flops else None,
        "intervals": len(images),
        "wall_s": wall,
    }


def matmul_ceiling() -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t))
    return best


def _load_config(config: str, flags: list[str]):
    """The config file with the `--config.a.b=value` overrides of `flags` applied (values read
    as Python literals where they are ones, as ml_collections' flags read them)."""
    import ast
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, config))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for flag in flags:
        if not flag.startswith("--config."):
            continue
        key, value = flag[len("--config.") :].split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        node[leaf] = parsed
    return cfg


def step_flops(config: str, flags: list[str], batch: int) -> float | None:
    """XLA's cost analysis of one training step of this tree (tracing only)."""
    import jax

    from mlscore_jax import experiment, train

    exp = experiment.from_config(_load_config(config, flags), source=config)
    tx, schedule = train.make_optimizer(exp.optim)
    state = jax.eval_shape(lambda k: train.init_state(exp, tx, k), jax.random.key(0))
    return train.step_flops(
        train.score_loss(exp),
        tx,
        schedule,
        state,
        (batch, *exp.example_shape),
        exp.dataset.train.dtype,
        ema_rate=exp.train.ema_rate,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="a commit to measure side by side")
    parser.add_argument("--configs", default="cifar,digits,mnist")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_train_step_data_")
    trees = {"this tree": ROOT}
    if args.baseline:
        worktree = os.path.join(tmp, f"baseline_{args.baseline}")
        subprocess.run(
            ["git", "worktree", "add", "--detach", worktree, args.baseline],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        trees[args.baseline] = worktree
    try:
        ceiling = matmul_ceiling()
        tree = provenance.commit(("mlscore_jax",))
        print(f"this tree: {tree}; matmul ceiling {ceiling / 1e9:.0f} GFLOP/s "
              "(2048^2 float32, best of 5)\n")  # fmt: skip
        rows = []
        for name in args.configs.split(","):
            config, flags, batch = CONFIGS[name]
            if name == "cifar":
                flags = flags + _cifar_data(tmp)
            if name == "mnist" and not os.path.exists(os.path.join(SHARED, "mnist_train.npz")):
                print(f"{name}: skipped (no ../shared/data/mnist_train.npz)")
                continue
            n_jit = _n_jit(flags, 1)
            steps = max(args.steps // n_jit, 4) * n_jit
            results: dict[str, list[dict]] = {label: [] for label in trees}
            for _ in range(args.repeats):
                for label, tree in trees.items():
                    results[label].append(run_training(tree, config, flags, steps, n_jit))
            flops = step_flops(config, flags, batch)
            for label, runs in results.items():
                ips = statistics.median(r["images_per_s"] for r in runs)
                logged = [r["flops_per_s"] for r in runs if r["flops_per_s"] is not None]
                rows.append((name, label, ips, runs, flops, logged))
        print(
            "| config | code | images/s (median of runs) | runs | logged GFLOP/s | "
            "cost-analysis GFLOP/step x steps/s | of matmul ceiling | speed-up vs baseline |"
        )
        print("|---|---|---|---|---|---|---|---|")
        base = {r[0]: r[2] for r in rows if r[1] == args.baseline}
        for name, label, ips, runs, flops, logged in rows:
            batch = CONFIGS[name][2]
            achieved = flops * ips / batch if flops else None
            ratio = f"{ips / base[name]:.2f}x" if name in base and label != args.baseline else "-"
            logged_s = f"{statistics.median(logged) / 1e9:.1f}" if logged else "-"
            ach = f"{achieved / 1e9:.1f}" if achieved and label == "this tree" else "-"
            frac = f"{achieved / ceiling:.0%}" if achieved and label == "this tree" else "-"
            per_run = ", ".join(f"{r['images_per_s']:.1f}" for r in runs)
            print(f"| {name} | {label} | {ips:.1f} | {per_run} | {logged_s} | {ach} | {frac} "
                  f"| {ratio} |")  # fmt: skip
    finally:
        if args.baseline:
            subprocess.run(
                ["git", "worktree", "remove", "--force", trees[args.baseline]],
                cwd=ROOT, capture_output=True,
            )  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
