"""Per-example NLL through the probability-flow ODE, integrated in-graph with diffrax.

The probability-flow ODE dx/dt = f~(x, t) = f(x, t) - g(t)^2 s_theta(x, t) / 2 carries the data,
placed at time eps, to x(T) = z. With the instantaneous change of variables
(`../shared/reference/scoreflow.md` section 2.6)

    d/dt [x, delta] = [f~(x, t), div_x f~(x, t)],   x(eps) = x_data, delta(eps) = 0,
    NLL = -log pi(z) - delta(T).

One `diffrax.diffeqsolve` integrates the augmented state (x, delta) of one example; the batch is
`jax.vmap`-ped, so every example has its own adaptive step sizes and its own NFE. The divergence is
a Hutchinson estimate v^T (d f~/dx) v with one probe v per example held fixed over the solve and
one VJP per evaluation (Rademacher or Gaussian probes), or the exact trace (D JVPs; small D only).
As in the official code there is no [0, eps] offset term on this path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from mlscore_jax.losses import scaled_score
from mlscore_jax.sde import SDE, broadcast_to_data

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

DIVERGENCES = ("rademacher", "gaussian", "exact")

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun,
}

# Vector-field evaluations of a solve: (start-up, per attempted step). Per step: the explicit
# RK stages, minus one for first-same-as-last solvers. Start-up: the first stage and the initial
# step-size guess, less what XLA merges with the first step (the guess's two evaluations coincide
# with Heun's two stages). Counted evaluation by evaluation in tests/test_likelihood.py.
EVALS: dict[type, tuple[int, int]] = {
    diffrax.Tsit5: (1, 6),
    diffrax.Dopri5: (1, 6),
    diffrax.Dopri8: (1, 13),
    diffrax.Bosh3: (3, 3),
    diffrax.Heun: (0, 2),
}


class ODELikelihoodResult(NamedTuple):
    """Per-example result of `ode_nll`."""

    nll: Array  # [B] -log p(x) in nats (model space)
    z: Array  # [B, ...] latent x(T)
    nfe: Array  # [B] vector-field evaluations spent (see `ode_nll`)
    num_steps: Array  # [B] attempted steps (accepted + rejected)
    delta_logp: Array  # [B] int_eps^T div f~ dt
    prior_logp: Array  # [B] log pi(z)
    success: Array  # [B] bool: the solve finished within max_steps


def get_solver(solver: str | diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """A diffrax solver from its name ('tsit5', 'dopri5', 'dopri8', 'bosh3', 'heun') or itself."""
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    try:
        return SOLVERS[solver.lower()]()
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None


def probability_flow_drift(
    score_fn: ScoreFn | None, sde: SDE, x: Array, t: Array, *, noise_fn: ScoreFn | None = None
) -> Array:
    """f~(x, t) = f(x, t) - g^2 s / 2 for x [B, ...], t [B]."""
    _, sigma = sde.marginal(t)
    half_g2_over_sigma = 0.5 * sde.likelihood_weight(t) / sigma
    sigma_s = scaled_score(score_fn, noise_fn, x, t, sigma)
    return sde.drift(x, t) - broadcast_to_data(half_g2_over_sigma, x) * sigma_s


def ode_nll(
    score_fn: ScoreFn | None,
    sde: SDE,
    x: Array,
    key: Array | None,
    *,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "rademacher",
    solver: str | diffrax.AbstractSolver = "tsit5",
    max_steps: int = 4096,
    throw: bool = True,
    noise_fn: ScoreFn | None = None,
) -> ODELikelihoodResult:
    """Negative log-likelihood per example by the probability-flow ODE.

    Jittable and vmappable; a batch sharded over devices stays sharded (each example is solved
    independently). Meshes with `AxisType.Auto` axes (what `parallel.make_mesh` builds) are
    supported; diffrax 0.7 fails inside `diffeqsolve` on explicitly sharded inputs.

    Args:
      score_fn: s_theta(x [N, ...], t [N]) -> [N, ...]; or None with `noise_fn` given.
      sde: the forward SDE.
      x: [B, ...] data in model space, placed at time eps.
      key: PRNG key for the Hutchinson probes (unused, may be None, for divergence='exact').
      eps: start time of the integration.
      rtol, atol: tolerances of the PID step-size controller (error in the RMS norm over the
        augmented state of one example).
      divergence: 'rademacher', 'gaussian' (Hutchinson) or 'exact' (trace of the Jacobian).
      solver: diffrax solver or its name.
      max_steps: most steps per example; with throw=True exceeding it raises a runtime error
        ("The maximum number of solver steps was reached"), otherwise success is False and nll
        is NaN for that example.
      throw: raise on a failed solve.
      noise_fn: eps_hat(x, t), alternative to score_fn.

    Returns:
      ODELikelihoodResult. NFE counts every evaluation of the augmented vector field (one drift
      and one VJP through the network, or D JVPs for 'exact') that the compiled solve runs:
      a start-up cost plus, per attempted step (accepted or rejected), the solver's stages less
      one for first-same-as-last solvers: 1 + 6 x steps for Tsit5 and Dopri5 (table `EVALS`;
      0 for solvers not in it).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if divergence != "exact" and key is None:
        raise ValueError(f"divergence={divergence!r} needs a PRNG key for its probes")
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps}")
    solver_obj = get_solver(solver)
    shape = x.shape[1:]
    d = math.prod(shape)

    if divergence == "rademacher":
        probes = jax.random.rademacher(key, x.shape, x.dtype)
    elif divergence == "gaussian":
        probes = jax.random.normal(key, x.shape, x.dtype)
    else:
        probes = jnp.zeros_like(x)

    def drift_one(xi: Array, t: Array) -> Array:
        return probability_flow_drift(score_fn, sde, xi[None], t[None], noise_fn=noise_fn)[0]

    def vector_field(t, y, probe):
        xi, _ = y
        if divergence == "exact":
            f = drift_one(xi, t)
            jac = jax.jacfwd(drift_one)(xi, t).reshape(d, d)
            div = jnp.trace(jac)
        else:
            f, vjp_fn = jax.vjp(lambda v: drift_one(v, t), xi)
            div = jnp.sum(vjp_fn(probe)[0] * probe)
        return f, div

    term = diffrax.ODETerm(vector_field)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    def solve_one(xi: Array, probe: Array):
        y0 = (xi, jnp.zeros((), xi.dtype))
        sol = diffrax.diffeqsolve(
            term,
            solver_obj,
            t0=eps,
            t1=sde.T,
            dt0=None,
            y0=y0,
            args=probe,
            stepsize_controller=controller,
            max_steps=max_steps,
            throw=throw,
        )
        z, delta = (leaf[-1] for leaf in sol.ys)
        ok = sol.result == diffrax.RESULTS.successful
        return z, delta, sol.stats["num_steps"], ok

    z, delta, num_steps, ok = jax.vmap(solve_one)(x, probes)
    prior_logp = sde.prior_logp(z)
    nll = jnp.where(ok, -prior_logp - delta, jnp.nan)
    startup, per_step = EVALS.get(type(solver_obj), (0, 0))
    nfe = startup + per_step * num_steps
    return ODELikelihoodResult(
        nll=nll,
        z=z,
        nfe=nfe,
        num_steps=num_steps,
        delta_logp=delta,
        prior_logp=prior_logp,
        success=ok,
    )
