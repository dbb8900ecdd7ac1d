"""Probability-flow ODE NLL: this project's diffrax-in-jit solve against the official scipy RK45.

The official code (score_flow `likelihood.py`, `../shared/reference/scoreflow.md` sections 1.5,
2.6, 5) integrates one joint ODE for the whole batch on the host: `scipy.integrate.solve_ivp(
method='RK45')` over the float64 state [flatten(x), delta (one per example)], calling a jitted
device function for every right-hand side (drift and Hutchinson divergence from one VJP). This
project integrates in-graph: `likelihood.ode_nll`, one `diffrax.diffeqsolve` per example under
`jax.vmap` inside `jax.jit`, each example with its own step sizes.

Both solve the same problem here: the same trained network (EMA parameters of the newest
checkpoint of `--workdir`; trained first if there is none), the same uniformly dequantized test
images, the same Rademacher probes (drawn as `ode_nll` draws them from its key), the same eps and
tolerances. The run prints, side by side in one process:

1. the main table: scipy RK45 (the baseline), diffrax Tsit5 / Dopri5 at the same tolerances, a
   tight-tolerance reference, and diffrax Dopri5 on the joint batch system (the official
   formulation, but in-graph: separates "host vs in-graph" from "joint vs per-example control");
2. solvers at matched accuracy: for Tsit5, Dopri5, Heun (and scipy RK45) the loosest
   rtol = atol on a grid whose max |bpd - reference| over the images is below `--target`;
3. where the time goes: one drift + VJP evaluation of the batch in straight-line jit, the same
   evaluation vmapped per example as `ode_nll` writes it, the same inside a `lax.fori_loop`, and
   the per-evaluation cost implied by the wall time of `ode_nll` and of scipy.

NFE counts evaluations of the augmented vector field (drift + one VJP) per image. scipy solves
the batch as one system, so each image costs `sol.nfev` (joint error norm). diffrax counts per
example (`ODELikelihoodResult.nfe` = 1 + 6 x attempted steps for Tsit5/Dopri5, 2 x steps for
Heun); under `vmap` the while loop runs in lockstep until the slowest example is done, so the
batch pays `lockstep` = start-up + stages x max(steps) batched evaluations.

    .venv/bin/python experiments/bench_likelihood.py --workdir runs/demo
    .venv/bin/python experiments/bench_likelihood.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlscore_jax  # noqa: F401  (sets the XLA:CPU flag before any computation)

# isort: split

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

from mlscore_jax import (
    bpd,
    evaluate,
    experiment,
    likelihood,
    models,
    parallel,
    preprocessing,
    train,
)
from mlscore_jax.models import layers

REPO = Path(__file__).resolve().parents[1]
Array = jax.Array


def load_experiment(train_steps: int) -> experiment.Experiment:
    sys.path.insert(0, str(REPO))
    from configs.cpu import digits_ddpmpp

    exp = experiment.from_config(digits_ddpmpp.get_config(), source="configs/cpu/digits_ddpmpp.py")
    return exp.replace(train=dataclasses.replace(exp.train, n_iters=train_steps))


def restore_or_train(
    exp: experiment.Experiment, workdir: str
) -> tuple[experiment.Experiment, Any, int, float]:
    """(experiment, EMA params, checkpoint step, seconds spent training (0 if restored))."""
    mesh = parallel.make_mesh()
    train_s = 0.0
    try:
        params, step = evaluate.restore_params(exp, workdir, mesh)
    except FileNotFoundError:
        print(f"no checkpoint in {workdir}: training {exp.train.n_iters} steps first")
        start = time.perf_counter()
        train.train_and_evaluate(exp, workdir, progress=False)
        train_s = time.perf_counter() - start
        params, step = evaluate.restore_params(exp, workdir, mesh)
    return exp, params, step, train_s


# ---------------------------------------------------------------------------------------------
# The official method: scipy RK45 on the host, one jitted drift + divergence per RHS.


def make_drift_div(exp: experiment.Experiment, batch: int) -> Callable:
    """Jitted (params, x_flat [B*D], t [], probes [B, ...]) -> (drift [B*D], div [B]).

    The whole batch at once with ONE VJP: div_i = v_i^T (d f~ / dx_i) v_i (examples do not
    interact in the network, so the VJP of the batch drift with the probes is per example).
    """
    shape = (batch,) + exp.example_shape

    def drift_div(params, x_flat, t, probes):
        x = x_flat.reshape(shape)
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)
        vec_t = jnp.full((batch,), t, x.dtype)
        f, vjp_fn = jax.vjp(
            lambda v: likelihood.probability_flow_drift(score_fn, exp.sde, v, vec_t), x
        )
        (g,) = vjp_fn(probes)
        return f.reshape(-1), jnp.sum((g * probes).reshape(batch, -1), axis=1)

    return jax.jit(drift_div)


@dataclasses.dataclass
class Run:
    """One solve of the batch; all per-image arrays are numpy [B]."""

    method: str
    solver: str
    tol: tuple[float, float]
    nfe: np.ndarray  # per image
    seconds: float  # wall time of the whole batch, compile excluded
    bpd: np.ndarray
    lockstep: int | None = None  # batched evaluations the vmapped loop ran (diffrax only)
    ok: bool = True


def scipy_rk45(
    drift_div: Callable, params, exp, x: Array, probes: Array, *, eps, rtol, atol
) -> Run:
    """score_flow `get_likelihood_fn`: float64 host state [flatten(x), delta], RK45 from eps."""
    batch = x.shape[0]
    num_dims = math.prod(x.shape[1:])

    def ode_func(t, y):
        x_dev = jnp.asarray(y[:-batch], jnp.float32)
        f, div = drift_div(params, x_dev, np.float32(t), probes)
        return np.concatenate([np.asarray(f, np.float64), np.asarray(div, np.float64)])

    init = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(batch)])
    start = time.perf_counter()
    sol = scipy.integrate.solve_ivp(
        ode_func, (eps, exp.sde.T), init, rtol=rtol, atol=atol, method="RK45"
    )
    seconds = time.perf_counter() - start
    zp = sol.y[:, -1]
    z = jnp.asarray(zp[:-batch].reshape(x.shape), jnp.float32)
    delta = zp[-batch:]
    nll = -(np.asarray(exp.sde.prior_logp(z), np.float64) + delta)
    bits = np.asarray(bpd.nats_to_bpd(nll, num_dims, levels=exp.dataset.levels, centered=True))
    return Run(
        "scipy (official)",
        "RK45",
        (rtol, atol),
        np.full(batch, sol.nfev),
        seconds,
        bits,
        ok=bool(sol.success),
    )


# ---------------------------------------------------------------------------------------------
# This project: likelihood.ode_nll (diffrax inside jit, per example, vmapped).


def make_ode_nll(
    exp: experiment.Experiment,
    solver: str,
    eps: float,
    max_steps: int,
    mode: str = "vjp",
    variable: str = "t",
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
) -> Callable:
    """Jitted (params, x, key, rtol, atol) -> ODELikelihoodResult; tolerances are traced."""

    def fn(params, x, key, rtol, atol):
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)
        return likelihood.ode_nll(
            score_fn,
            exp.sde,
            x,
            key,
            eps=eps,
            rtol=rtol,
            atol=atol,
            solver=solver,
            max_steps=max_steps,
            throw=False,
            mode=mode,
            variable=variable,
            pcoeff=pcoeff,
            icoeff=icoeff,
        )

    return jax.jit(fn)


def make_joint_dopri5(exp: experiment.Experiment, eps: float, max_steps: int) -> Callable:
    """The official formulation in-graph: one diffeqsolve of the whole batch, joint RMS norm.

    Bench-only diagnostic. Dopri5 is RK45's tableau; returns (nll [B], NFE of the batch).
    """

    def fn(params, x, probes, rtol, atol):
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)
        batch = x.shape[0]

        def vector_field(t, y, args):
            xb, _ = y
            vec_t = jnp.full((batch,), t, xb.dtype)
            f, vjp_fn = jax.vjp(
                lambda v: likelihood.probability_flow_drift(score_fn, exp.sde, v, vec_t), xb
            )
            (g,) = vjp_fn(probes)
            return f, jnp.sum((g * probes).reshape(batch, -1), axis=1)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Dopri5(),
            t0=eps,
            t1=exp.sde.T,
            dt0=None,
            y0=(x, jnp.zeros((batch,), x.dtype)),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
            throw=False,
        )
        z, delta = (leaf[-1] for leaf in sol.ys)
        startup, per_step = likelihood.EVALS[diffrax.Dopri5]
        nll = -exp.sde.prior_logp(z) - delta
        ok = sol.result == diffrax.RESULTS.successful
        return jnp.where(ok, nll, jnp.nan), startup + per_step * sol.stats["num_steps"]

    return jax.jit(fn)


def compile_seconds(fn: Callable, *args) -> tuple[Callable, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def to_bpd(exp, nll) -> np.ndarray:
    num_dims = math.prod(exp.example_shape)
    return np.asarray(bpd.nats_to_bpd(nll, num_dims, levels=exp.dataset.levels, centered=True))


def run_ode_nll(compiled, params, x, key, exp, solver, rtol, atol, name) -> Run:
    tols = (jnp.float32(rtol), jnp.float32(atol))
    start = time.perf_counter()
    r = jax.block_until_ready(compiled(params, x, key, *tols))
    seconds = time.perf_counter() - start
    return Run(
        name,
        solver,
        (rtol, atol),
        np.asarray(r.nfe),
        seconds,
        to_bpd(exp, r.nll),
        lockstep=int(np.max(np.asarray(r.nfe))),  # the slowest example's evaluations
        ok=bool(np.all(np.asarray(r.success))),
    )


# ---------------------------------------------------------------------------------------------
# Where the time goes: one evaluation in straight-line jit, vmapped, and inside a loop.


def time_calls(fn: Callable, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def per_eval_costs(exp, params, x, probes, drift_div, *, reps: int, loop_n: int) -> dict:
    """Seconds per batched drift + VJP evaluation, four ways (best of three repetitions)."""
    batch = x.shape[0]
    x_flat = x.reshape(-1)
    t = jnp.float32(0.5)

    def vmapped_field(params, x, t, probes):
        # likelihood.ode_nll's vector field, verbatim in structure: per example, vmapped
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)

        def one(xi, probe):
            def drift_one(v):
                return likelihood.probability_flow_drift(score_fn, exp.sde, v[None], t[None])[0]

            f, vjp_fn = jax.vjp(drift_one, xi)
            return f, jnp.sum(vjp_fn(probe)[0] * probe)

        return jax.vmap(one)(x, probes)

    vmapped = jax.jit(vmapped_field)

    def vmapped_field_jvp(params, x, t, probes):
        # the same by one JVP (ode_nll mode='jvp')
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)

        def one(xi, probe):
            def drift_one(v):
                return likelihood.probability_flow_drift(score_fn, exp.sde, v[None], t[None])[0]

            with layers.forward_mode_convs():
                f, jv = jax.jvp(drift_one, (xi,), (probe,))
            return f, jnp.sum(jv * probe)

        return jax.vmap(one)(x, probes)

    vmapped_jvp = jax.jit(vmapped_field_jvp)

    def looped(params, x, probes):
        def body(i, carry):
            xc, acc = carry
            tc = 0.1 + 0.8 * i.astype(jnp.float32) / loop_n  # new t every pass: nothing hoists
            f, div = vmapped_field(params, xc, tc, probes)
            return xc + 1e-4 * f, acc + div

        return jax.lax.fori_loop(0, loop_n, body, (x, jnp.zeros((batch,), x.dtype)))

    def looped_batched(params, x, probes):
        def body(i, carry):
            xc, acc = carry
            tc = 0.1 + 0.8 * i.astype(jnp.float32) / loop_n
            f, div = drift_div(params, xc.reshape(-1), tc, probes)
            return xc + 1e-4 * f.reshape(xc.shape), acc + div

        return jax.lax.fori_loop(0, loop_n, body, (x, jnp.zeros((batch,), x.dtype)))

    looped_jit = jax.jit(looped)
    looped_batched_jit = jax.jit(looped_batched)

    def host_rhs(y):  # what scipy's ode_func does around the device call
        f, div = drift_div(params, jnp.asarray(y, jnp.float32), np.float32(0.5), probes)
        return np.concatenate([np.asarray(f, np.float64), np.asarray(div, np.float64)])

    y_host = np.asarray(x_flat, np.float64)
    return {
        "straight": time_calls(drift_div, params, x_flat, t, probes, reps=reps),
        "straight_vmapped": time_calls(vmapped, params, x, t, probes, reps=reps),
        "straight_vmapped_jvp": time_calls(vmapped_jvp, params, x, t, probes, reps=reps),
        "loop_batched": time_calls(looped_batched_jit, params, x, probes, reps=1) / loop_n,
        "loop_vmapped": time_calls(looped_jit, params, x, probes, reps=1) / loop_n,
        "host_rhs": time_calls(host_rhs, y_host, reps=reps),
    }


# ---------------------------------------------------------------------------------------------
# Report


def fmt_tol(tol: tuple[float, float]) -> str:
    return f"{tol[0]:.2g}/{tol[1]:.2g}"


def table(runs: list[Run], baseline: Run, batch: int) -> str:
    lines = [
        "| method | solver | rtol/atol | NFE/image mean [min-max] | lockstep evals | "
        "wall s/image | bpd mean | max abs bpd - baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lock = "-" if r.lockstep is None else str(r.lockstep)
        flag = "" if r.ok else " (FAILED)"
        lines.append(
            f"| {r.method}{flag} | {r.solver} | {fmt_tol(r.tol)} | {r.nfe.mean():.0f} "
            f"[{r.nfe.min():.0f}-{r.nfe.max():.0f}] | {lock} | {r.seconds / batch:.4f} | "
            f"{np.nanmean(r.bpd):.4f} | {np.nanmax(np.abs(r.bpd - baseline.bpd)):.1e} |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running `likelihood.ode_nll`."""

    solver: str
    mode: str = "jvp"
    variable: str = "t"
    pcoeff: float = likelihood.PCOEFF
    icoeff: float = likelihood.ICOEFF

    @property
    def name(self) -> str:
        pi = (self.pcoeff, self.icoeff)
        ctrl = "I" if pi == (0.0, 1.0) else f"PI {self.pcoeff}/{self.icoeff}"
        return f"{self.solver}, {self.mode}, {self.variable}, {ctrl}"


PI = dict(pcoeff=0.3, icoeff=0.4)
DEFAULT = Variant("bosh3")  # what evaluation uses (configs/default_cifar10.py), at 5e-5
OLD_DEFAULT = Variant("dopri5", mode="vjp")  # before this study (at 1e-5)
VARIANTS = [
    OLD_DEFAULT,
    Variant("dopri5"),
    Variant("dopri5", mode="vjp", **PI),
    Variant("dopri5", **PI),
    Variant("dopri5", variable="logsnr", **PI),
    Variant("dopri5", variable="scaled", **PI),
    Variant("tsit5", **PI),
    Variant("bosh3", **PI),
    Variant("dopri8", **PI),
    DEFAULT,
]
QUICK_VARIANTS = [OLD_DEFAULT, DEFAULT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench_likelihood_digits"))
    parser.add_argument("--train_steps", type=int, default=1500, help="if no checkpoint exists")
    parser.add_argument("--batch", type=int, default=None, help="test images (default 16; 8)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--ref_tol", type=float, default=1e-7, help="Dopri8 reference rtol=atol")
    parser.add_argument("--target", type=float, default=None, help="bpd error (default 1e-3)")
    parser.add_argument("--max_steps", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 images, fewer rows (~3 min)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated row numbers of VARIANTS (0-based) to run; default all",
    )
    parser.add_argument(
        "--grid", default=None, help="comma-separated tolerances of section 2 (default 1e-3..1e-6)"
    )
    args = parser.parse_args()
    quick = args.quick
    batch = args.batch or (8 if quick else 16)
    target = args.target or (3e-3 if quick else 1e-3)
    variants = QUICK_VARIANTS if quick else VARIANTS
    if args.variants:
        variants = [VARIANTS[int(i)] for i in args.variants.split(",")]

    exp, params, step, train_s = restore_or_train(load_experiment(args.train_steps), args.workdir)
    images = exp.dataset.test[:batch]
    k_deq, k_probe = jax.random.split(jax.random.key(args.seed))
    x = preprocessing.preprocess(
        k_deq, jnp.asarray(images), levels=exp.dataset.levels, uniform_dequantization=True
    )
    probes = jax.random.rademacher(k_probe, x.shape, x.dtype)  # exactly as ode_nll draws them
    print(
        f"# probability-flow ODE NLL, {exp.dataset.name} {exp.example_shape}, checkpoint step "
        f"{step} of {args.workdir}" + (f" (trained now in {train_s:.0f} s)" if train_s else "")
    )
    print(
        f"batch={batch} eps={args.eps} rtol={args.rtol} atol={args.atol} backend="
        f"{jax.default_backend()} devices={jax.device_count()}\n"
    )

    # -- compile everything first (compile time reported separately) --------------------------
    compile_s: dict[str, float] = {}
    drift_div = make_drift_div(exp, batch)
    t32 = jnp.float32(0.5)
    drift_div_c, compile_s["scipy: jitted drift+div"] = compile_seconds(
        drift_div, params, x.reshape(-1), t32, probes
    )
    tol0 = (jnp.float32(args.rtol), jnp.float32(args.atol))
    reference = Variant("dopri8")
    compiled: dict[Variant, Callable] = {}
    for v in [reference, *variants]:
        fn = make_ode_nll(
            exp, v.solver, args.eps, args.max_steps, v.mode, v.variable, v.pcoeff, v.icoeff
        )
        compiled[v], compile_s[f"ode_nll {v.name}"] = compile_seconds(fn, params, x, k_probe, *tol0)
    joint = None
    if not quick:
        joint, compile_s["joint dopri5"] = compile_seconds(
            make_joint_dopri5(exp, args.eps, args.max_steps), params, x, probes, *tol0
        )

    # -- warm up (first execution) ------------------------------------------------------------
    jax.block_until_ready(drift_div_c(params, x.reshape(-1), t32, probes))
    for v in compiled:
        jax.block_until_ready(compiled[v](params, x, k_probe, *(jnp.float32(1e-2),) * 2))

    def scipy_run(rtol: float, atol: float) -> Run:
        return scipy_rk45(drift_div_c, params, exp, x, probes, eps=args.eps, rtol=rtol, atol=atol)

    def ours(v: Variant, rtol: float, atol: float, name: str | None = None) -> Run:
        return run_ode_nll(
            compiled[v], params, x, k_probe, exp, v.solver, rtol, atol, name or v.name
        )

    # -- 1. same tolerances -------------------------------------------------------------------
    base = scipy_run(args.rtol, args.atol)
    runs = [base] + [ours(v, args.rtol, args.atol) for v in variants]
    if joint is not None:
        start = time.perf_counter()
        nll, nfe = jax.block_until_ready(joint(params, x, probes, *tol0))
        seconds = time.perf_counter() - start
        runs.append(
            Run(
                "joint system in jit (diag.), vjp, I",
                "dopri5",
                (args.rtol, args.atol),
                np.full(batch, int(nfe)),
                seconds,
                to_bpd(exp, nll),
                lockstep=int(nfe),
                ok=bool(np.all(np.isfinite(np.asarray(nll)))),
            )
        )
    ref = ours(reference, args.ref_tol, args.ref_tol, f"reference ({reference.name})")
    runs.append(ref)
    print(f"## 1. Same tolerances (rtol={args.rtol}, atol={args.atol}), {batch} images\n")
    print(table(runs, base, batch))
    print(
        "\nmethod: solver, Hutchinson mode, integration variable, step-size controller (I: "
        "pcoeff 0, icoeff 1, scipy's and diffrax's default; PI: pcoeff/icoeff). NFE: evaluations "
        "of drift + one VJP or JVP per image (scipy: sol.nfev of the joint system; ours: per "
        "example). lockstep: batched evaluations the vmapped while loop ran (start-up + stages x "
        "max steps over the batch). |bpd - reference| of the baseline: "
        f"{np.max(np.abs(base.bpd - ref.bpd)):.1e}."
    )
    print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()) + "\n")

    # -- 2. matched accuracy ------------------------------------------------------------------
    grid = [1e-3, 3e-4, 1e-4, 5e-5, 3e-5, 2e-5, 1.5e-5, 1e-5, 7e-6, 5e-6, 3e-6, 2e-6, 1e-6]
    if args.grid:
        grid = sorted((float(g) for g in args.grid.split(",")), reverse=True)
    matched: dict[str, Run] = {}
    sweep_lines = []
    for v in [*variants, "scipy"]:
        label = "scipy (official)" if v == "scipy" else v.name
        for tol in grid:
            r = scipy_run(tol, tol) if v == "scipy" else ours(v, tol, tol)
            err = float(np.max(np.abs(r.bpd - ref.bpd)))
            sweep_lines.append(f"{label}@{tol:.2g}: err {err:.1e} nfe {r.nfe.mean():.0f}")
            if r.ok and err <= target:
                matched[label] = r
                break
        else:
            sweep_lines.append(f"{label}: no tolerance on the grid reaches {target:.0e}")
    print(
        f"## 2. Matched accuracy: loosest rtol=atol on {grid[0]:.0e}..{grid[-1]:.0e} with max "
        f"|bpd - reference| <= {target:.0e} over the {batch} images\n"
    )
    print(table(list(matched.values()), ref, batch).replace("baseline", "reference"))
    print("\nsweep: " + "; ".join(sweep_lines) + "\n")

    # -- 3. where the time goes ---------------------------------------------------------------
    loop_n = 10 if quick else 30
    costs = per_eval_costs(exp, params, x, probes, drift_div, reps=10, loop_n=loop_n)
    same = {r.method: r for r in runs}
    implied = {
        v.name: same[v.name].seconds / same[v.name].lockstep
        for v in (OLD_DEFAULT, DEFAULT)
        if v.name in same
    }
    scipy_per_eval = base.seconds / base.nfe[0]
    ms = 1e3
    print(f"## 3. Cost of one batched evaluation ({batch} images), ms\n")
    print("| where | ms/eval | x straight-line |")
    print("|---|---|---|")
    rows = [
        ("straight-line jit, batched drift + VJP (scipy's RHS, device only)", costs["straight"]),
        ("straight-line jit, vmapped per example, VJP", costs["straight_vmapped"]),
        ("straight-line jit, vmapped per example, JVP", costs["straight_vmapped_jvp"]),
        (f"inside lax.fori_loop ({loop_n}), batched, VJP", costs["loop_batched"]),
        (f"inside lax.fori_loop ({loop_n}), vmapped per example, VJP", costs["loop_vmapped"]),
        ("scipy RHS incl. host round trip (ode_func)", costs["host_rhs"]),
        ("scipy solve: wall / nfev", scipy_per_eval),
        *((f"ode_nll {name}: wall / lockstep evals", sec) for name, sec in implied.items()),
    ]
    for label, sec in rows:
        print(f"| {label} | {sec * ms:.2f} | {sec / costs['straight']:.2f} |")

    # -- verdict ------------------------------------------------------------------------------
    print("\n## Verdict\n")
    official = matched.get("scipy (official)")
    for v in (DEFAULT, OLD_DEFAULT):
        ours_run = matched.get(v.name)
        if official is None or ours_run is None:
            print(f"{v.name}: no matched-accuracy pair on the grid")
            continue
        print(
            f"At matched accuracy (max |bpd - reference| <= {target:.0e}), ode_nll ({v.name}) "
            f"takes {ours_run.seconds / batch:.3f} s/image at rtol=atol={ours_run.tol[0]:.2g} "
            f"({ours_run.nfe.mean():.0f} NFE mean, {ours_run.lockstep} lockstep), the official "
            f"scipy RK45 {official.seconds / batch:.3f} s/image at {official.tol[0]:.2g} "
            f"({official.nfe[0]} NFE): **{official.seconds / ours_run.seconds:.2f}x** its speed."
        )


if __name__ == "__main__":
    main()
