"""XLA:CPU: convolution gradients inside loop bodies, cause and workaround, measured side by side.

Symptom (jaxlib 0.10.2, CPU): the gradient of the DDPM++ U-Net wrt its parameters runs ~25x slower
inside a `lax.fori_loop` / `lax.scan` / `lax.while_loop` body than in straight-line jitted code, and
its VJP wrt the input ~3x slower; forward passes are equally fast in both.

Cause: XLA:CPU's `ConvCanonicalization` pass (xla/service/cpu/conv_canonicalization.cc) rewrites
every convolution whose dimension numbers are not NHWC x HWIO -> NHWC into transposes plus an
NHWC/HWIO convolution, which then runs on the Eigen convolution kernel. The pass only walks
`module->entry_computation()`. A convolution inside a while body (fori_loop, scan, while_loop,
diffrax's diffeqsolve), a conditional branch or any other called computation keeps its original
dimension numbers and, not being Eigen-compatible, is emitted as a naive elemental loop (you can see
it in `jax.jit(f).lower(...).compile().as_text()`: the convolution keeps e.g.
`dim_labels=f01b_i01o->01bf` and gets `backend_config={"outer_dimension_partitions":...}`). The
forward convolution of an NHWC network is already canonical, so forward passes are unaffected, but
JAX's transpose rules emit non-canonical convolutions: the filter gradient as `f01b_i01o->01bf`
(batch as the contraction dimension) and the input gradient as `b01f_01oi->b01f` (I/O swapped).
Any non-canonical conv in a loop is slow, e.g. an NCHW forward conv too. Known upstream as
jax-ml/jax#12868 (open).

Workaround (pure JAX, no flags; none of the XLA:CPU flags of this jaxlib helps): give the
convolution a custom VJP whose two backward convolutions are themselves NHWC x HWIO -> NHWC, with
the transposes written explicitly (exactly what `ConvCanonicalization` would have inserted), see
`mlscore_jax.models.layers.nhwc_conv` (which the DDPM++ network uses on CPU by default,
`cpu_conv_grads=True`). `canonicalize_convs(f)` applies it to any function without touching the
model: it traces `f` to a jaxpr and re-evaluates it with every NHWC/HWIO `conv_general_dilated`
replaced by `canonical_conv` (the forward is the same op; gradients agree to float32 rounding).
The library does it per layer:
`nn.Conv(..., conv_general_dilated=layers.conv_general_dilated)`.

The table: per-iteration wall time of forward / grad wrt params / VJP wrt x, straight-line
`jax.jit` vs the same computation as the body of a `lax.fori_loop` (time / iterations), with JAX's
own convolution VJP ("lax") and with the workaround ("canonical"); a single 3x3 conv on
[64, 8, 8, 32] (the minimal reproducer); and one probability-flow vector-field evaluation (drift +
one Hutchinson VJP wrt x) inside a fixed-step diffrax Tsit5 `diffeqsolve` (per evaluation:
solve time / (1 + 6 steps)), plus, without --quick, the project's adaptive `likelihood.ode_nll`.

    .venv/bin/python experiments/bench_cpu_loops.py --quick    # ~2 min
    .venv/bin/python experiments/bench_cpu_loops.py            # ~3 min
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import mlscore_jax  # noqa: F401  (sets the XLA:CPU flag before any computation)

# isort: split

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core

from mlscore_jax import likelihood, models
from mlscore_jax.models import DDPMpp
from mlscore_jax.models.layers import nhwc_conv
from mlscore_jax.sde import VPSDE

# ----------------------------------------------------------------------------------------------
# The workaround
# ----------------------------------------------------------------------------------------------

# The custom-VJP convolution lives in the library (mlscore_jax/models/layers.py); the DDPM++
# network uses it on CPU unless built with cpu_conv_grads=False, as the "lax" rows here are.
canonical_conv = nhwc_conv
DN = ("NHWC", "HWIO", "NHWC")

_NHWC_HWIO_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _is_nhwc_hwio_2d(params) -> bool:
    dn = params["dimension_numbers"]
    specs = tuple(tuple(s) for s in (dn.lhs_spec, dn.rhs_spec, dn.out_spec))
    return (
        specs == _NHWC_HWIO_SPECS
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and params["precision"] is None
        and params["preferred_element_type"] is None
    )


def _eval_jaxpr(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    for v, a in zip(jaxpr.constvars, consts, strict=True):
        env[v] = a
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "conv_general_dilated" and _is_nhwc_hwio_2d(eqn.params):
            p = eqn.params
            outs = [
                canonical_conv(
                    *invals,
                    tuple(p["window_strides"]),
                    tuple(map(tuple, p["padding"])),
                    tuple(p["lhs_dilation"]),
                    tuple(p["rhs_dilation"]),
                )
            ]
        elif name in ("jit", "pjit", "closed_call"):  # inline nested jits (flax/jnp helpers)
            sub = eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]
            outs = _eval_jaxpr(sub.jaxpr, sub.consts, invals)
        else:  # everything else (incl. custom_jvp, remat, loops) is re-bound unchanged
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jax_core.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def canonicalize_convs(f: Callable) -> Callable:
    """`f` (array-pytree arguments only; close over static ones) with every 2-D NHWC x HWIO conv
    replaced by `canonical_conv`. Convs nested in remat/custom_jvp/loops inside `f` are left as is.
    """

    def wrapped(*args):
        flat, tree = jax.tree.flatten(args)
        closed, out_shape = jax.make_jaxpr(
            lambda *fl: f(*jax.tree.unflatten(tree, fl)), return_shape=True
        )(*flat)
        out = _eval_jaxpr(closed.jaxpr, closed.consts, flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def time_fn(fn: Callable, *args, reps: int, warmup: bool = True):
    """(best-of-`reps` wall seconds of one call of jit(fn), its output); compiling not timed."""
    compiled = jax.jit(fn).lower(*args).compile()
    if warmup:
        jax.block_until_ready(compiled(*args))
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best, out


def straight_and_loop(
    step: Callable, init, n: int, reps: int, loop_reps: int, straight_fn: Callable | None = None
):
    """Seconds per application of `step` (carry -> carry): straight-line jit (of `straight_fn`,
    default `step`) vs as a fori_loop body; and the straight-line output."""
    straight, out = time_fn(straight_fn or step, init, reps=reps)
    looped, _ = time_fn(
        lambda c: lax.fori_loop(0, n, lambda i, c: step(c), c),
        init,
        reps=loop_reps,
        warmup=loop_reps > 1,
    )
    return (straight, looped / n), out


def bench_conv(wrap: Callable, xc, wc, n: int, reps: int) -> dict[str, tuple[float, float]]:
    """The minimal reproducer: one NHWC x HWIO 3x3 conv, forward and gradients."""
    conv = wrap(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))

    def loss(w, x):
        return jnp.sum(conv(x, w) ** 2)

    out = {}
    out["fwd"], _ = straight_and_loop(lambda x: conv(x, wc), xc, n, reps, 2)
    out["gw"], _ = straight_and_loop(lambda w: w - 1e-3 * jax.grad(loss)(w, xc), wc, n, reps, 2)
    out["gx"], _ = straight_and_loop(lambda x: x - 1e-3 * jax.grad(loss, 1)(wc, x), xc, n, reps, 2)
    return out


def bench_net(wrap: Callable, m, v, x, t, n: int, reps: int, loop_reps: int):
    """DDPM++ forward / grad wrt params / VJP wrt x; returns the timings and the gradient."""
    apply = wrap(lambda v, x: m.apply(v, x, t, train=False))
    grad_p = jax.grad(lambda v: jnp.sum(apply(v, x) ** 2))

    def vjp_x(y):
        _, f = jax.vjp(lambda u: apply(v, u), y)
        return f(y)[0]

    out = {}
    out["fwd"], _ = straight_and_loop(lambda y: apply(v, y), x, n, reps, loop_reps)
    # straight line: the gradient; loop body: the gradient and an SGD update of the params
    out["grad"], grads = straight_and_loop(
        lambda p: jax.tree.map(lambda a, g: a - 1e-3 * g, p, grad_p(p)),
        v,
        n,
        reps,
        loop_reps,
        straight_fn=grad_p,
    )
    out["vjp"], _ = straight_and_loop(vjp_x, x, n, reps, loop_reps)
    return out, grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations/repeats (~1-2 min)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    quick = args.quick
    n_loop = 2 if quick else 5
    reps = 3 if quick else 5
    loop_reps = 1 if quick else 2
    ode_steps = 2 if quick else 4
    B = args.batch
    t_start = time.perf_counter()

    variants = {"lax": lambda f: f, "canonical": canonicalize_convs}
    rows: list[tuple[str, dict[str, tuple[float, float]]]] = []

    # --- minimal reproducer: one 3x3 conv, [64, 8, 8, 32] ----------------------------------
    k1, k2 = jax.random.split(jax.random.key(0))
    xc = jax.random.normal(k1, (64, 8, 8, 32))
    wc = 0.05 * jax.random.normal(k2, (3, 3, 32, 32))
    conv_rows: dict[str, dict[str, tuple[float, float]]] = {"fwd": {}, "gw": {}, "gx": {}}
    n_conv = 10 if quick else 20
    for vname, wrap in variants.items():
        for op, r in bench_conv(wrap, xc, wc, n_conv, reps).items():
            conv_rows[op][vname] = r
    rows += [
        ("conv 3x3 [64,8,8,32]: forward", conv_rows["fwd"]),
        ("conv 3x3 [64,8,8,32]: grad wrt kernel", conv_rows["gw"]),
        ("conv 3x3 [64,8,8,32]: grad wrt input", conv_rows["gx"]),
    ]
    print(f"[{time.perf_counter() - t_start:.0f}s] single conv done", flush=True)

    # --- DDPM++ -------------------------------------------------------------------------------
    m = DDPMpp(
        nf=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        cpu_conv_grads=False,  # JAX's own conv VJP; the "canonical" variant rewrites it
    )
    kx, kv, kp = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (B, 8, 8, 1))
    t = jnp.linspace(0.05, 1.0, B)
    v = m.init(jax.random.key(0), x, t, train=False)
    # perturb so that the zero-initialised (init_scale) kernels do not hide anything
    v = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(kv, a.shape, a.dtype), v)
    net_rows: dict[str, dict[str, tuple[float, float]]] = {"fwd": {}, "grad": {}, "vjp": {}}
    grads = {}
    for vname, wrap in variants.items():
        res, grads[vname] = bench_net(wrap, m, v, x, t, n_loop, reps, loop_reps)
        for op, r in res.items():
            net_rows[op][vname] = r
        print(f"[{time.perf_counter() - t_start:.0f}s] DDPM++ {vname} done", flush=True)
    rel = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
        for a, b in zip(
            jax.tree.leaves(grads["lax"]), jax.tree.leaves(grads["canonical"]), strict=True
        )
    )
    rows += [
        (f"DDPM++ nf=32 [{B},8,8,1]: forward", net_rows["fwd"]),
        (f"DDPM++ nf=32 [{B},8,8,1]: grad wrt params", net_rows["grad"]),
        (f"DDPM++ nf=32 [{B},8,8,1]: VJP wrt x", net_rows["vjp"]),
    ]

    # --- probability-flow ODE: drift + Hutchinson VJP in diffrax -----------------------------
    sde = VPSDE()
    probes = jax.random.rademacher(kp, x.shape, x.dtype)
    ode_rows: dict[str, tuple[float, float]] = {}
    ode_outs = {}
    for vname, wrap in variants.items():

        def field(tt, y, params=v, wrap=wrap):
            score_fn = wrap(models.get_score_fn(m, params, sde))
            xb, _ = y
            vec_t = jnp.full((xb.shape[0],), tt, xb.dtype)
            f, vjp_fn = jax.vjp(
                lambda u: likelihood.probability_flow_drift(score_fn, sde, u, vec_t), xb
            )
            return f, jnp.sum(vjp_fn(probes)[0] * probes, axis=(1, 2, 3))

        y0 = (x, jnp.zeros((B,), x.dtype))

        def solve(y0, field=field):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda tt, y, a: field(tt, y)),
                diffrax.Tsit5(),
                t0=1e-5,
                t1=1.0,
                dt0=(1.0 - 1e-5) / ode_steps,
                y0=y0,
                stepsize_controller=diffrax.ConstantStepSize(),
                max_steps=ode_steps + 1,
            )
            return jax.tree.map(lambda a: a[-1], sol.ys)

        nfe = 1 + 6 * ode_steps  # Tsit5: one start-up evaluation + 6 per step (FSAL)
        straight, _ = time_fn(lambda y: field(0.5, y), y0, reps=reps)
        looped, ode_outs[vname] = time_fn(solve, y0, reps=loop_reps, warmup=False)
        ode_rows[vname] = (straight, looped / nfe)
        print(f"[{time.perf_counter() - t_start:.0f}s] diffrax {vname} done", flush=True)
    rows.append(
        (f"PF-ODE field (drift + VJP) [{B},8,8,1], diffrax Tsit5 {ode_steps} steps", ode_rows)
    )
    ode_diff = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
        for a, b in zip(
            jax.tree.leaves(ode_outs["lax"]), jax.tree.leaves(ode_outs["canonical"]), strict=True
        )
    )

    # --- table ---------------------------------------------------------------------------------
    print()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {jax.local_device_count()} "
        f"device(s); loops: lax.fori_loop ({n_loop} iterations for DDPM++, {n_conv} for the "
        f"conv), time per iteration; straight: jit, best of {reps}. ms."
    )
    print()
    print(
        "| computation | lax: straight | lax: in loop | lax: loop/straight "
        "| canonical: straight | canonical: in loop | canonical: loop/straight "
        "| in-loop speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        (ls, ll), (cs, cl) = r["lax"], r["canonical"]
        print(
            f"| {name} | {ls * 1e3:.2f} | {ll * 1e3:.2f} | {ll / ls:.1f}x | {cs * 1e3:.2f} "
            f"| {cl * 1e3:.2f} | {cl / cs:.1f}x | {ll / cl:.1f}x |"
        )
    print()
    print(f"max relative difference of the DDPM++ parameter gradient, lax vs canonical: {rel:.1e}")
    print(
        f"max relative difference of the fixed-step ODE solution (x, delta), lax vs canonical: "
        f"{ode_diff:.1e}"
    )

    # --- the project's adaptive ode_nll (per-example vmap inside the while loop) -------------
    if not quick:
        nb, tol = 4, 1e-3
        xs = 0.5 * x[:nb]
        print()
        print(f"likelihood.ode_nll (Tsit5, rtol = atol = {tol}, {nb} images, vmapped per example):")
        print()
        print("| convs | run s | max NFE | ms per lockstep batched evaluation | NLL |")
        print("|---|---:|---:|---:|---|")
        for vname, wrap in variants.items():
            fn = jax.jit(
                lambda p, xx, wrap=wrap: likelihood.ode_nll(
                    wrap(models.get_score_fn(m, p, sde)),
                    sde,
                    xx,
                    jax.random.key(2),
                    rtol=tol,
                    atol=tol,
                )
            )
            compiled = fn.lower(v, xs).compile()
            res = jax.block_until_ready(compiled(v, xs))
            t0 = time.perf_counter()
            res = jax.block_until_ready(compiled(v, xs))
            dt = time.perf_counter() - t0
            nfe = int(np.max(res.nfe))
            print(
                f"| {vname} | {dt:.2f} | {nfe} | {dt / nfe * 1e3:.1f} | "
                f"{np.array2string(np.asarray(res.nll), precision=1)} |"
            )
        print()
        print(
            "(NLLs of this random network differ between the two at loose tolerance because "
            "the adaptive steps differ by float rounding; the vector fields agree exactly.)"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
