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
from mlscore_jax.models import layers
from mlscore_jax.sde import SDE, broadcast_to_data

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

DIVERGENCES = ("rademacher", "gaussian", "exact")
MODES = ("vjp", "jvp")  # how the Hutchinson estimate is formed
VARIABLES = ("t", "logsnr", "scaled")  # what the solver integrates over
# Step-size controller of the solve: the I controller (diffrax's and scipy's); a PI controller
# (e.g. 0.3, 0.4) was no robust gain on the trained digits model (experiments/README.md)
PCOEFF = 0.0
ICOEFF = 1.0

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


def evals_of(solver: diffrax.AbstractSolver, pcoeff: float, icoeff: float) -> tuple[int, int]:
    """(start-up, per attempted step) evaluations of `solver` under a PID controller: `EVALS`,
    plus one start-up evaluation of Bosh3 that XLA merges only under the plain I controller
    (pcoeff 0, icoeff 1); counted in tests/test_likelihood.py."""
    startup, per_step = EVALS.get(type(solver), (0, 0))
    if isinstance(solver, diffrax.Bosh3) and (pcoeff, icoeff) != (0.0, 1.0):
        startup += 1
    return startup, per_step


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


def _has_closed_form_time_change(sde: SDE) -> bool:
    return type(sde).importance_inverse_cdf is not SDE.importance_inverse_cdf


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
    mode: str = "jvp",
    variable: str = "t",
    pcoeff: float = PCOEFF,
    icoeff: float = ICOEFF,
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
      pcoeff, icoeff: the controller's proportional and integral coefficients; the default, 0
        and 1, is the classic I controller (diffrax's default, and what scipy's RK45 does). A PI
        controller (0.3, 0.4) rejects fewer steps; on the trained digits model it reached the
        same accuracy in fewer evaluations in one image set and not in another
        (experiments/README.md, "Likelihood").
      divergence: 'rademacher', 'gaussian' (Hutchinson) or 'exact' (trace of the Jacobian).
      solver: diffrax solver or its name.
      max_steps: most steps per example; with throw=True exceeding it raises a runtime error
        ("The maximum number of solver steps was reached"), otherwise success is False and nll
        is NaN for that example.
      throw: raise on a failed solve.
      noise_fn: eps_hat(x, t), alternative to score_fn.
      mode: how the Hutchinson estimate v^T J v is formed: 'jvp' (one forward-mode pass: the
        drift and J v together, no transposed convolutions; the default, ~1.2x faster per
        evaluation on CPU) or 'vjp' (one reverse-mode pass, the official way). Same value up
        to float32 rounding.
      variable: what the solver integrates over (`VARIABLES`), all exact reparametrisations of
        the same ODE (`../shared/reference/checkpoints_and_likelihood.md` section B):
        't': x over t in [eps, T] (the official solve);
        'logsnr': x over s = gamma(t) - gamma(eps) in [0, Z], gamma = log(sigma^2 / alpha^2)
          (ds = g^2 / sigma^2 dt: the importance-sampling density, so t(s) is
          `sde.importance_inverse_cdf`);
        'scaled': y = x / alpha over the same s, dy/ds = -(sigma^2 / 2 alpha) s_theta(alpha y),
          with the change-of-state term D log(alpha(T) / alpha(eps)) added to log p.
        'logsnr' and 'scaled' need an SDE with closed-form `importance_inverse_cdf` (VP, subVP,
        VE); the error control then acts on other step sizes (and, for 'scaled', on y).

    Returns:
      ODELikelihoodResult. NFE counts every evaluation of the augmented vector field (one drift
      and one VJP or JVP through the network, or D JVPs for 'exact') that the compiled solve
      runs: a start-up cost plus, per attempted step (accepted or rejected), the solver's stages
      less one for first-same-as-last solvers: 1 + 6 x steps for Tsit5 and Dopri5 (table
      `EVALS`; 0 for solvers not in it).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if divergence != "exact" and key is None:
        raise ValueError(f"divergence={divergence!r} needs a PRNG key for its probes")
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if variable not in VARIABLES:
        raise ValueError(f"unknown integration variable {variable!r}; choose one of {VARIABLES}")
    if variable != "t":
        if not _has_closed_form_time_change(sde):
            raise ValueError(
                f"variable={variable!r} needs the closed-form inverse of the log-SNR "
                f"(`importance_inverse_cdf`), which {type(sde).__name__} does not define; "
                "use variable='t'"
            )
        if not eps > 0:
            raise ValueError(f"variable={variable!r} needs eps > 0 (log-SNR is -inf at 0)")
    solver_obj = get_solver(solver)
    shape = x.shape[1:]
    d = math.prod(shape)

    if divergence == "rademacher":
        probes = jax.random.rademacher(key, x.shape, x.dtype)
    elif divergence == "gaussian":
        probes = jax.random.normal(key, x.shape, x.dtype)
    else:
        probes = jnp.zeros_like(x)

    def time_of(s: Array) -> tuple[Array, Array]:
        """t(s) and dt/ds for the integration variable s."""
        if variable == "t":
            return s, jnp.ones_like(s)
        t = sde.importance_inverse_cdf(s, eps)
        return t, 1.0 / sde.importance_density_unnormalized(t)

    def field_one(state: Array, s: Array) -> Array:
        """d state / ds of one example (state: x, or y = x / alpha for 'scaled')."""
        t, dt_ds = time_of(s)
        if variable == "scaled":
            alpha, sigma = sde.marginal(t)
            sigma_s = scaled_score(score_fn, noise_fn, (alpha * state)[None], t[None], sigma[None])[
                0
            ]
            # dy/dt = -g^2 s / (2 alpha); times dt/ds = sigma^2 / g^2
            return -0.5 * (sigma / alpha) * sigma_s
        return (
            dt_ds
            * probability_flow_drift(score_fn, sde, state[None], t[None], noise_fn=noise_fn)[0]
        )

    def vector_field(s, y, probe):
        state, _ = y
        fn = lambda v: field_one(v, s)  # noqa: E731
        if divergence == "exact":
            with layers.forward_mode_convs():
                jac = jax.jacfwd(fn)(state).reshape(d, d)
            return fn(state), jnp.trace(jac)
        if mode == "jvp":
            with layers.forward_mode_convs():
                f, jv = jax.jvp(fn, (state,), (probe,))
            return f, jnp.sum(jv * probe)
        f, vjp_fn = jax.vjp(fn, state)
        return f, jnp.sum(vjp_fn(probe)[0] * probe)

    term = diffrax.ODETerm(vector_field)
    controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff)
    if variable == "t":
        s0, s1 = eps, sde.T
    else:
        s0, s1 = 0.0, sde.importance_normalizer(eps)
    alpha_0, _ = sde.marginal(jnp.asarray(eps, jnp.float32))
    alpha_1, _ = sde.marginal(jnp.asarray(sde.T, jnp.float32))

    def solve_one(xi: Array, probe: Array):
        state0 = xi / alpha_0 if variable == "scaled" else xi
        y0 = (state0, jnp.zeros((), xi.dtype))
        sol = diffrax.diffeqsolve(
            term,
            solver_obj,
            t0=s0,
            t1=s1,
            dt0=None,
            y0=y0,
            args=probe,
            stepsize_controller=controller,
            max_steps=max_steps,
            throw=throw,
        )
        state1, delta = (leaf[-1] for leaf in sol.ys)
        if variable == "scaled":  # back to x, and the change of state x -> y at both ends
            return alpha_1 * state1, delta + d * jnp.log(alpha_1 / alpha_0), sol
        return state1, delta, sol

    def solve_stats(xi, probe):
        z, delta, sol = solve_one(xi, probe)
        ok = sol.result == diffrax.RESULTS.successful
        return z, delta, sol.stats["num_steps"], ok

    z, delta, num_steps, ok = jax.vmap(solve_stats)(x, probes)
    prior_logp = sde.prior_logp(z)
    nll = jnp.where(ok, -prior_logp - delta, jnp.nan)
    startup, per_step = evals_of(solver_obj, pcoeff, icoeff)
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
