"""The jitted multi-step training function, rolled (`lax.scan`) vs unrolled, side by side.

For a config (default `configs/cpu/digits_ddpmpp.py`), compiles `train.train_steps` over
`training.n_jitted_steps` steps both ways and prints compile time, time per training step (best
of `--reps` repetitions of `--calls` calls) and the last loss (close, not equal: the two
programs round differently).
Training uses the rolled loop on every backend; this script is the evidence on CPU.

    .venv/bin/python experiments/bench_train_loop.py [--config configs/cpu/digits_ddpmpp.py]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import mlscore_jax  # noqa: F401  (sets the XLA:CPU flag before any computation)

# isort: split

import jax

from mlscore_jax import batches, experiment, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/digits_ddpmpp.py")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    module = args.config.removesuffix(".py").replace("/", ".")
    config = importlib.import_module(module).get_config()
    exp = experiment.from_config(config, source=args.config)
    tx, schedule = train.make_optimizer(exp.optim)
    n = exp.train.n_jitted_steps
    stack = batches.train_batches(
        exp.dataset.train,
        seed=0,
        first_step=0,
        num_steps=n,
        global_batch_size=exp.train.batch_size,
        process_index=0,
        process_count=1,
    )
    state0 = train.init_state(exp, tx, jax.random.key(0))
    rows = []
    for unroll in (False, True):
        fn = jax.jit(
            lambda s, b, unroll=unroll: train.train_steps(
                s,
                b,
                loss_fn=train.score_loss(exp),
                tx=tx,
                schedule=schedule,
                ema_rate=exp.train.ema_rate,
                unroll=unroll,
            )
        )
        start = time.perf_counter()
        compiled = fn.lower(state0, stack).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state0, stack)
        jax.block_until_ready(state)
        best = float("inf")
        for _ in range(args.reps):
            start = time.perf_counter()
            for _ in range(args.calls):
                state, metrics = compiled(state, stack)
            jax.block_until_ready(state)
            best = min(best, (time.perf_counter() - start) / (args.calls * n))
        rows.append((unroll, compile_s, best, float(metrics["loss"][-1])))
    print(
        f"{args.config}: batch {exp.train.batch_size}, {n} steps per call, "
        f"{jax.default_backend()} ({jax.device_count()} device(s))\n"
    )
    print("| scan | compile s | ms per step | last loss |")
    print("|---|---:|---:|---:|")
    for unroll, compile_s, step_s, loss in rows:
        name = "unrolled" if unroll else "rolled (used)"
        print(f"| {name} | {compile_s:.1f} | {step_s * 1e3:.1f} | {loss:.6f} |")


if __name__ == "__main__":
    main()
