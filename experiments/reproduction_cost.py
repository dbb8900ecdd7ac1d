"""What a reproduction of the paper's likelihoods costs: FLOPs per ODE evaluation, and an ESTIMATE
of accelerator time per 10,000 test images.

    .venv/bin/python experiments/reproduction_cost.py [--nfe 500] [--tflops 50]

For each paper network (DDPM++ cont. and deep; CIFAR-10 and ImageNet 32 share them) it counts,
with XLA's cost analysis of the lowered program (no compile, nothing allocated), the FLOPs of one
vector-field evaluation of `likelihood.ode_nll` for one image: the probability-flow drift and one
VJP for the Hutchinson divergence (what every ODE step stage costs), and of one bound time draw
(one forward), plus the Flow++ dequantizers' forward. Then

    time per 10,000 images ~= 10,000 * repeats * NFE * FLOPs per evaluation / throughput

with NFE and the achieved throughput GIVEN, not measured: no released checkpoint and no
accelerator were at hand when this was written. The default NFE, 500, is what the trained digits
DDPM++ needs at rtol = atol = 1e-5 (experiments/README.md, "Likelihood": 490 mean for Dopri5);
a CIFAR-10 model's NFE at that tolerance has not been published (reference part B) and may well
differ by 2x either way. 50 TFLOP/s is an assumed float32 throughput of a current data-centre
GPU on convolutions (TF32 tensor cores allowed). Replace both with measured numbers when a
checkpoint and a GPU are at hand: `--mode eval` logs the NFE (metrics.json: ode.nfe), and the
time per image follows from its wall time.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs.vp.cifar10_ddpmpp_continuous as cifar10  # noqa: E402
import configs.vp.cifar10_ddpmpp_deep_continuous as cifar10_deep  # noqa: E402
from mlscore_jax import experiment, likelihood, models  # noqa: E402
from mlscore_jax.models import flowpp  # noqa: E402


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def score_network_costs(config) -> dict[str, float]:
    exp = experiment.from_config(config, source="paper config", require_data=False)
    shape = (1, *exp.example_shape)
    params = models.abstract_variables(exp.model, shape)["params"]
    score = models.ScoreModel(exp.model, exp.sde)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)

    def evaluation(p, x, t, v):  # drift and v^T J v by one VJP, as ode_nll evaluates it
        def drift(x):
            return likelihood.probability_flow_drift(score.bind(p), exp.sde, x, t)

        out, vjp = jax.vjp(drift, x)
        return out, jnp.sum(vjp(v)[0] * v)

    def forward(p, x, t):
        return score(p, x, t)

    return {
        "params": models.param_count(params),
        "ode_eval": _flops(evaluation, params, x, t, x),
        "forward": _flops(forward, params, x, t),
    }


def dequantizer_cost(module, shape) -> tuple[int, float]:
    k = jax.ShapeDtypeStruct(shape, jnp.uint8)
    variables = jax.eval_shape(
        lambda key, k: flowpp.init_dequantizer(module, key, k), jax.random.key(0), k
    )
    eps = jax.ShapeDtypeStruct(shape, jnp.float32)
    return models.param_count(variables), _flops(
        lambda v, e, k: module.apply(v, e, k), variables, eps, k
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=float, default=500, help="ODE NFE per image (assumed)")
    parser.add_argument("--tflops", type=float, default=50, help="achieved TFLOP/s (assumed)")
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    rate = args.tflops * 1e12

    print(f"jax {jax.__version__}; FLOPs by XLA cost analysis of the lowered programs, batch 1")
    print(f"ESTIMATE at NFE {args.nfe:g} and {args.tflops:g} TFLOP/s achieved (both assumed)\n")
    print(
        "| network | parameters | GFLOP per ODE evaluation (drift + VJP) | GFLOP per forward "
        f"| ODE: GPU hours per {args.images:,} images and repeat (estimate) "
        f"| bound, 1000 time draws: GPU hours per {args.images:,} images (estimate) |"
    )
    print("|---|---|---|---|---|---|")
    for name, cfg in (
        ("DDPM++ cont. (CIFAR-10 / ImageNet 32)", cifar10.get_config()),
        ("DDPM++ cont. deep (CIFAR-10 / ImageNet 32)", cifar10_deep.get_config()),
    ):
        c = score_network_costs(cfg)
        ode_h = args.images * args.nfe * c["ode_eval"] / rate / 3600
        bound_h = args.images * 1000 * c["forward"] / rate / 3600
        print(
            f"| {name} | {c['params']:,} | {c['ode_eval'] / 1e9:.1f} | {c['forward'] / 1e9:.1f} "
            f"| {ode_h:.2f} | {bound_h:.2f} |"
        )
    print("\n| dequantizer | parameters | GFLOP per forward (one draw) |")
    print("|---|---|---|")
    for name, module in (
        ("Flow++ CIFAR-10 (official sizes)", flowpp.cifar10_dequantizer()),
        ("Flow++ ImageNet 32 (official sizes)", flowpp.imagenet32_dequantizer()),
    ):
        n, f = dequantizer_cost(module, (1, 32, 32, 3))
        print(f"| {name} | {n:,} | {f / 1e9:.2f} |")


if __name__ == "__main__":
    main()
