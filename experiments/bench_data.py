"""Throughput of the data path: host batch assembly + jitted preprocessing, in images/s.

    .venv/bin/python experiments/bench_data.py [--num-examples 50000] [--seconds 2.0]

Uses CIFAR-sized random data (uint8 [50000, 32, 32, 3] in memory), so it runs anywhere without a
download. Prints a markdown table. The reference: the paper's DDPM++ model trains at O(1000)
images/s on one accelerator host (batch 128, a few steps per second), so the data path must be
much faster than that to never be the bottleneck, and it runs on the host CPU while the
accelerator trains.

On a CPU-only machine "device" is the same few CPU cores: there the uniform dequantization's
H*W*C random numbers per image (threefry) dominate; on an accelerator they are a negligible
part of the training step. Other processes on the machine make the numbers noisy.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from mlscore_jax import batches, preprocessing

REFERENCE_IMAGES_PER_S = 1000  # order of magnitude the training step consumes


def images_per_second(fn: Callable[[int], object], images_per_call: int, seconds: float) -> float:
    """Calls fn(i) for i = 0, 1, ... (after two warm-up calls) for about `seconds`."""
    for i in range(2):
        jax.block_until_ready(fn(i))
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        jax.block_until_ready(fn(calls + 2))
        calls += 1
    return calls * images_per_call / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per row")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_examples, 32, 32, 3), dtype=np.uint8)
    key = jax.random.key(0)

    rows = []
    host_rates: dict[tuple[int, int], float] = {}
    for batch_size, n_steps, uniform, flip in [
        (128, 1, False, False),  # the paper's training configs: bin centres, no flips
        (128, 1, True, False),
        (128, 1, True, True),
        (128, 5, True, False),  # n_jitted_steps = 5, as in the official code
        (1024, 1, True, False),  # an evaluation-sized batch
    ]:
        per_call = batch_size * n_steps

        def host(i, batch_size=batch_size, n_steps=n_steps):
            return batches.train_batches(
                images,
                seed=0,
                first_step=i * n_steps,
                num_steps=n_steps,
                global_batch_size=batch_size,
            )

        if (batch_size, n_steps) not in host_rates:
            host_rates[batch_size, n_steps] = images_per_second(host, per_call, args.seconds)
        prep = jax.jit(
            functools.partial(
                preprocessing.preprocess,
                levels=256,
                uniform_dequantization=uniform,
                centered=True,
                random_flip=flip,
            )
        )
        resident = jax.device_put(host(0))

        def device(i, prep=prep, resident=resident):
            return prep(jax.random.fold_in(key, i), resident)

        def both(i, prep=prep, host=host):
            return prep(jax.random.fold_in(key, i), jax.device_put(host(i)))

        rows.append(
            (
                batch_size,
                n_steps,
                "uniform" if uniform else "bin centre",
                flip,
                host_rates[batch_size, n_steps],
                images_per_second(device, per_call, args.seconds),
                images_per_second(both, per_call, args.seconds),
            )
        )

    backend = jax.default_backend()
    print(
        f"Data path throughput: uint8 [{args.num_examples}, 32, 32, 3] in memory; "
        f"JAX {jax.__version__} on {backend} ({jax.device_count()} device(s)), "
        f"{os.cpu_count()} host CPU(s).\n"
        "host = `train_batches` (numpy gather); device = jitted `preprocess` (dequantization, "
        "centring, optional flips) on a resident batch; end to end = both, plus "
        f"`device_put`. Reference: training consumes O({REFERENCE_IMAGES_PER_S}) images/s.\n"
    )
    print(
        "| global batch | steps per call | dequantization | flips | host images/s "
        "| device images/s | end-to-end images/s | end to end / 1000 |"
    )
    print("|---:|---:|:---|:---:|---:|---:|---:|---:|")
    for batch_size, n_steps, deq, flip, host_rate, device_rate, both_rate in rows:
        print(
            f"| {batch_size} | {n_steps} | {deq} | {'on' if flip else 'off'} | {host_rate:,.0f} "
            f"| {device_rate:,.0f} | {both_rate:,.0f} "
            f"| {both_rate / REFERENCE_IMAGES_PER_S:,.0f}x |"
        )


if __name__ == "__main__":
    main()
