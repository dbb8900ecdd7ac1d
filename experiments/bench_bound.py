"""The variational bound's cost at equal standard error: i.i.d. vs stratified time draws.

    .venv/bin/python experiments/bench_bound.py [--workdir runs/demo] [--images 16] [--repeats 8]

On a trained model (the EMA parameters of the newest checkpoint of `--workdir`; the digits
config's DDPM++ is trained first if there is none, as in `bench_likelihood.py`), the first
`--images` test images, uniformly dequantized once (fixed), get `bound.nll_bound` (importance-
sampled times; without the [0, eps] offset term, whose own draws do not depend on num_t)
`--repeats` times with independent keys, for num_t = 8 ... 1024 time draws and both
`time_sampling`s.

For each image, the spread of its repeats is the estimator's real standard error at that num_t
(not the estimator's own stderr, which is also printed: for stratified draws it is a
conservative pairing estimate). Draws needed for a 0.01 bits/dim standard error: the smallest
num_t on the grid whose spread is below it, interpolated log-log between grid points (the
median and the worst image). Also: the mean over images of each sampling at the largest num_t
(both are unbiased for the same bound, so they must agree within their errors).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import mlscore_jax  # noqa: F401  (sets the XLA:CPU flag before any computation)

# isort: split

import jax
import jax.numpy as jnp
import numpy as np

from mlscore_jax import bound, bpd, models, preprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_likelihood import load_experiment, restore_or_train  # noqa: E402

GRID = [8, 16, 32, 64, 128, 256, 512, 1024]
TARGET = 0.01  # bits/dim


def draws_needed(grid: list[int], sd: np.ndarray, target: float) -> np.ndarray:
    """Per image: num_t where the spread crosses `target`, log-log interpolated; beyond the
    grid, extrapolated from its largest num_t as 1 / sqrt(num_t) (both samplings' variance
    decays like 1 / num_t once the strata are narrow: the noise z within a stratum remains)."""
    out = grid[-1] * (sd[-1] / target) ** 2
    log_n = np.log(grid)
    for j in range(sd.shape[1]):
        s = np.log(sd[:, j])
        below = np.nonzero(sd[:, j] <= target)[0]
        if len(below) == 0:
            continue
        i = below[0]
        if i == 0:
            # extrapolate with the first segment's slope (or 1 / sqrt(n) if it is flat)
            slope = min((s[1] - s[0]) / (log_n[1] - log_n[0]), -0.5)
            out[j] = math.exp(log_n[0] + (math.log(target) - s[0]) / slope)
            continue
        frac = (math.log(target) - s[i - 1]) / (s[i] - s[i - 1])
        out[j] = math.exp(log_n[i - 1] + frac * (log_n[i] - log_n[i - 1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--train_steps", type=int, default=1500, help="if no checkpoint exists")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    exp, params, step, _ = restore_or_train(load_experiment(args.train_steps), args.workdir)
    images = exp.dataset.test[: args.images]
    x = preprocessing.preprocess(
        jax.random.key(args.seed),
        jnp.asarray(images),
        levels=exp.dataset.levels,
        uniform_dequantization=True,
    )
    num_dims = math.prod(exp.example_shape)
    scale = 1.0 / (num_dims * math.log(2.0))  # nats -> bits/dim, for spreads
    eps = exp.eval.bpd.eps
    print(
        f"# bound standard error vs time draws: {exp.dataset.name}, checkpoint step {step} of "
        f"{args.workdir}, {args.images} test images, {args.repeats} repeats per cell, "
        f"importance-sampled t, no offset term, eps={eps}\n"
    )

    def make(num_t: int, sampling: str):
        def fn(params, x, key):
            score = models.get_score_fn(exp.model, {"params": params}, exp.sde)
            r = bound.nll_bound(
                score,
                exp.sde,
                x,
                key,
                eps=eps,
                num_t=num_t,
                time_sampling=sampling,
                offset=False,
            )
            return r.nll, r.stderr

        return jax.jit(fn)

    keys = jax.random.split(jax.random.key(args.seed + 1), args.repeats)
    samplings = ["iid", "stratified"]
    sd = {s: np.zeros((len(GRID), args.images)) for s in samplings}
    est = {s: np.zeros((len(GRID), args.images)) for s in samplings}
    means = {}
    seconds = {}
    for s in samplings:
        for gi, num_t in enumerate(GRID):
            fn = make(num_t, s)
            jax.block_until_ready(fn(params, x, keys[0]))
            start = time.perf_counter()
            outs = [jax.block_until_ready(fn(params, x, k)) for k in keys]
            seconds[(s, num_t)] = (time.perf_counter() - start) / args.repeats
            nll = np.stack([np.asarray(o[0], np.float64) for o in outs]) * scale
            se = np.stack([np.asarray(o[1], np.float64) for o in outs]) * scale
            sd[s][gi] = nll.std(0, ddof=1)
            est[s][gi] = np.sqrt((se**2).mean(0))
            if num_t == GRID[-1]:  # per image, over repeats, in bits/dim of the data
                bits = bpd.nats_to_bpd(
                    jnp.asarray(nll.mean(0) / scale),
                    num_dims,
                    levels=exp.dataset.levels,
                    centered=True,
                )
                means[s] = np.asarray(bits, np.float64)

    print(
        "| time draws | "
        + " | ".join(f"{s}: spread med / max | {s}: own stderr med" for s in samplings)
        + " | s per call |"
    )
    print("|---|" + "---|---|" * len(samplings) + "---|")
    for gi, num_t in enumerate(GRID):
        cells = []
        for s in samplings:
            cells.append(f"{np.median(sd[s][gi]):.4f} / {sd[s][gi].max():.4f}")
            cells.append(f"{np.median(est[s][gi]):.4f}")
        print(f"| {num_t} | " + " | ".join(cells) + f" | {seconds[('iid', num_t)]:.3f} |")

    need = {s: draws_needed(GRID, sd[s], TARGET) for s in samplings}
    print(f"\n## Draws for a {TARGET} bits/dim standard error per image\n")
    print("| sampling | median over images | worst image |")
    print("|---|---|---|")
    for s in samplings:
        print(f"| {s} | {np.median(need[s]):.0f} | {need[s].max():.0f} |")
    ratio = need["iid"] / need["stratified"]
    diff = means["stratified"] - means["iid"]
    diff_se = np.sqrt((sd["stratified"][-1] ** 2 + sd["iid"][-1] ** 2) / args.repeats)
    z = diff.mean() / (np.sqrt((diff_se**2).sum()) / len(diff))
    print(
        f"\nStratified needs {np.median(ratio):.1f}x fewer draws (median over images; "
        f"range {ratio.min():.1f}-{ratio.max():.1f}x). Unbiased: at {GRID[-1]} draws the mean "
        f"over images differs by {diff.mean():+.5f} bits/dim, {z:+.2f} standard errors "
        f"(iid {means['iid'].mean():.4f}, stratified {means['stratified'].mean():.4f})."
    )


if __name__ == "__main__":
    main()
