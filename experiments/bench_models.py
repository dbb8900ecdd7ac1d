"""Speed of the score networks on this machine, side by side, as a markdown table.

For every configuration: parameter count, compile time and time per image of the forward pass
(train=False), compile time and time per image of one training step (forward + backward of the
likelihood-weighted, importance-sampled DSM loss + Adam update, dropout on), and the FLOPs XLA's
cost analysis reports for that compiled training step.

    .venv/bin/python experiments/bench_models.py            # all rows
    .venv/bin/python experiments/bench_models.py --quick    # fewer repetitions, no deep model
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mlscore_jax import losses
from mlscore_jax.models import MLP, DDPMpp, get_noise_fn, init_variables, param_count
from mlscore_jax.sde import VPSDE


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    model: nn.Module
    shape: tuple[int, ...]  # (B, ...), B = benchmark batch


def rows(quick: bool) -> list[Row]:
    out = [
        Row("mlp, 8x8 digits (64-D)", MLP(width=256, num_blocks=3), (64, 8, 8)),
        Row(
            "ddpmpp 8x8x1, nf=32, ch_mult=(1,2), 2 blocks, attn 4",
            DDPMpp(nf=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,)),
            (16, 8, 8, 1),
        ),
        Row(
            "ddpmpp 28x28x1, nf=32, ch_mult=(1,2,2), 2 blocks, attn 7",
            DDPMpp(nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,)),
            (8, 28, 28, 1),
        ),
        Row("ddpmpp CIFAR-10 (paper, 4 blocks)", DDPMpp(), (1, 32, 32, 3)),
    ]
    if not quick:
        out.append(
            Row("ddpmpp CIFAR-10 deep (paper, 8 blocks)", DDPMpp(num_res_blocks=8), (1, 32, 32, 3))
        )
    return out


def _compile(fn: Callable, *args) -> tuple[Callable, float, float]:
    """(compiled, seconds to lower + compile, XLA flops)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per device
        cost = cost[0]
    return compiled, seconds, float((cost or {}).get("flops", float("nan")))


def _time_per_call(fn: Callable, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / reps


def bench(row: Row, reps: int) -> dict[str, float]:
    model, shape = row.model, row.shape
    batch = shape[0]
    sde = VPSDE()
    optimizer = optax.adam(2e-4)
    params = init_variables(model, jax.random.key(0), (1, *shape[1:]))["params"]
    opt_state = optimizer.init(params)
    x = jax.random.normal(jax.random.key(1), shape)
    t = jax.random.uniform(jax.random.key(2), (batch,))
    key = jax.random.key(3)

    def forward(params, x, t):
        return model.apply({"params": params}, x, t, train=False)

    def train_step(params, opt_state, x0, key):
        key_loss, key_dropout = jax.random.split(key)

        def loss_fn(p):
            noise_fn = get_noise_fn(model, {"params": p}, train=True, rng=key_dropout)
            per_example = losses.dsm_loss(
                None, sde, x0, key_loss, importance_sampling=True, noise_fn=noise_fn
            )
            return jnp.mean(per_example)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fwd, fwd_compile, fwd_flops = _compile(forward, params, x, t)
    step, step_compile, step_flops = _compile(train_step, params, opt_state, x, key)
    return {
        "params": param_count(params),
        "fwd_compile": fwd_compile,
        "fwd_ms": 1e3 * _time_per_call(fwd, params, x, t, reps=reps) / batch,
        "fwd_gflops": fwd_flops / batch / 1e9,
        "step_compile": step_compile,
        "step_ms": 1e3 * _time_per_call(step, params, opt_state, x, key, reps=reps) / batch,
        "step_gflops": step_flops / 1e9,
        "step_gflops_img": step_flops / batch / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no deep model")
    args = parser.parse_args()
    reps = 2 if args.quick else 5

    print(f"jax {jax.__version__}, devices: {jax.devices()}, repetitions: {reps}\n")
    print(
        "| model | input [B, ...] | params | fwd compile (s) | fwd ms/img | fwd GFLOP/img "
        "| train-step compile (s) | fwd+bwd+Adam ms/img | train-step GFLOP (XLA) | GFLOP/img |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows(args.quick):
        r = bench(row, reps)
        print(
            f"| {row.name} | {list(row.shape)} | {r['params']:,} | {r['fwd_compile']:.1f} "
            f"| {r['fwd_ms']:.2f} | {r['fwd_gflops']:.3f} | {r['step_compile']:.1f} "
            f"| {r['step_ms']:.2f} | {r['step_gflops']:.2f} | {r['step_gflops_img']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
