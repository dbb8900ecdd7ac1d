"""Samplers: the probability-flow ODE (one diffrax solve) and predictor-corrector SDE samplers.

Both draw x(T) from the prior and run the reverse process down to the data
(`../shared/reference/scoreflow.md` sections 1.7 and 2.1):

* `ode_sample` integrates the probability-flow ODE dx/dt = f(x, t) - g(t)^2 s(x, t) / 2 from T
  down to eps, the inverse of the path `likelihood.ode_nll` takes, optionally followed by one
  Tweedie denoising step at eps;
* `pc_sample` runs N steps of a predictor (a discretisation of the reverse-time SDE
  dx = [f - g^2 s] dt + g dw_bar) on the grid linspace(T, eps, N), each preceded by Langevin
  corrector steps at the same time.

`sample(score_fn, sde, shape, key, settings)` runs the sampler that `settings.SamplingSettings`
names. Writing samples to files is `outputs`' job.

score_fn(x [B, ...], t [B]) -> [B, ...] is the (model) score; all functions are pure and
jittable, e.g. `jax.jit(lambda params, key: pc_sample(make_score(params), sde, shape, key))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from mlscore_jax.likelihood import EVALS, get_solver, probability_flow_drift
from mlscore_jax.sde import SDE, broadcast_to_data
from mlscore_jax.settings import SamplingSettings

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "none")
CORRECTORS = ("langevin", "none")


class SampleResult(NamedTuple):
    """Samples and their cost."""

    x: Array  # [B, ...] samples in model space
    nfe: Array  # [B] score evaluations spent on each sample


def _times(t: Array, x: Array) -> Array:
    """A scalar time broadcast to the batch of x: [B]."""
    return jnp.full(x.shape[:1], t, x.dtype)


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: Array, t: Array | float) -> Array:
    """E[x_0 | x_t] = (x_t + sigma(t)^2 s(x_t, t)) / alpha(t) (Tweedie's formula); [B, ...].

    Exact for the true score. For VP at t = eps it equals the official "noise removal" (one
    reverse-diffusion step with the DDPM discretisation, x + beta_0 s with beta_0 = beta(0) / N)
    up to first order in the step: both are x + O(sigma(eps)^2) s.
    """
    t = _times(jnp.asarray(t), x)
    alpha, sigma = sde.marginal(t)
    x0 = x + broadcast_to_data(sigma**2, x) * score_fn(x, t)
    return x0 / broadcast_to_data(alpha, x)


def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    key: Array | None,
    *,
    z: Array | None = None,
    eps: float = 1e-3,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str | diffrax.AbstractSolver = "tsit5",
    max_steps: int = 4096,
    denoise: bool = True,
    throw: bool = True,
) -> SampleResult:
    """Samples by the probability-flow ODE, integrated from T down to eps.

        x(T) = z ~ prior,   dx/dt = f(x, t) - g(t)^2 s(x, t) / 2,   returned: x(eps)
        (denoise=True: (x(eps) + sigma(eps)^2 s(x(eps), eps)) / alpha(eps)).

    One `diffrax.diffeqsolve` per example (`jax.vmap`), as in `likelihood.ode_nll`: every sample
    has its own adaptive steps, error control (RMS over its own dimensions) and NFE, and does not
    depend on the other samples in the batch; with the same z it is the exact inverse of the
    path `ode_nll` integrates (up to the tolerances). A vmapped solve runs until its slowest
    sample finishes, so the wall time follows the largest NFE in the batch.

    Args:
      score_fn: s(x [N, ...], t [N]) -> [N, ...].
      sde: the forward SDE.
      shape: [B, ...] shape of the batch of samples.
      key: PRNG key for the prior draw; unused (may be None) when z is given.
      z: optional [B, ...] starting latent x(T) (e.g. `ode_nll(...).z`), shaped `shape`.
      eps: end time of the integration (official `sampling.smallest_time`: VP 1e-3, subVP 1e-2).
      rtol, atol: tolerances of the PID step-size controller.
      solver: diffrax solver or its name (`likelihood.SOLVERS`).
      max_steps: most steps per sample; beyond it a runtime error with throw=True, otherwise the
        sample is NaN.
      denoise: finish with one Tweedie step at t = eps (`tweedie_denoise`): the official
        `sampling.noise_removal`, which the ScoreFlow configs turn on.
      throw: raise on a failed solve.

    Returns:
      SampleResult(x [B, ...], nfe [B]). NFE counts the score evaluations of the solve as
      `likelihood.ode_nll` does (start-up + stages x attempted steps, table `EVALS`; e.g.
      1 + 6 x steps for Tsit5 and Dopri5; 0 for solvers not in the table), plus one for the
      denoising step.
    """
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps}")
    if z is None:
        if key is None:
            raise ValueError("give a PRNG key for the prior draw, or the latent z")
        z = sde.prior_sample(key, shape)
    elif tuple(z.shape) != tuple(shape):
        raise ValueError(f"z has shape {z.shape}, but shape={shape}")
    solver_obj = get_solver(solver)

    def vector_field(t, xi, args):
        return probability_flow_drift(score_fn, sde, xi[None], t[None])[0]

    term = diffrax.ODETerm(vector_field)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    def solve_one(zi: Array):
        sol = diffrax.diffeqsolve(
            term,
            solver_obj,
            t0=sde.T,
            t1=eps,
            dt0=None,  # reverse time: the controller picks a first (negative) step
            y0=zi,
            stepsize_controller=controller,
            max_steps=max_steps,
            throw=throw,
        )
        ok = sol.result == diffrax.RESULTS.successful
        return sol.ys[-1], sol.stats["num_steps"], ok

    x, num_steps, ok = jax.vmap(solve_one)(z)
    x = jnp.where(broadcast_to_data(ok, x), x, jnp.nan)
    startup, per_step = EVALS.get(type(solver_obj), (0, 0))
    nfe = startup + per_step * num_steps
    if denoise:
        x = tweedie_denoise(score_fn, sde, x, eps)
        nfe = nfe + 1
    return SampleResult(x=x, nfe=nfe)


def _transition(sde: SDE, t: Array, s: Array) -> tuple[Array, Array]:
    """Forward transition from time s to t > s: x_t = a x_s + G z; returns (a, G^2), scalars.

    Exact for the affine SDEs here: a = alpha(t) / alpha(s), G^2 = sigma(t)^2 - a^2 sigma(s)^2.
    For VP this is the DDPM chain, a = sqrt(1 - beta_i), G^2 = beta_i with
    beta_i = 1 - exp(-int_s^t beta); for VE it is the SMLD chain, a = 1,
    G^2 = sigma(t)^2 - sigma(s)^2.
    """
    alpha_t, sigma_t = sde.marginal(t)
    alpha_s, sigma_s = sde.marginal(s)
    a = alpha_t / alpha_s
    return a, jnp.maximum(sigma_t**2 - (a * sigma_s) ** 2, 0.0)


def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    key: Array,
    *,
    eps: float = 1e-3,
    num_steps: int = 1000,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_steps_each: int = 1,
    denoise: bool = True,
) -> SampleResult:
    """Predictor-corrector samples of the reverse-time SDE dx = [f - g^2 s] dt + g dw_bar.

    Time grid: t_0 = T > t_1 > ... > t_{N-1} = eps (linspace(T, eps, N)) and t_N = 0. Step i
    runs the corrector at t_i, then the predictor from t_i to t_{i+1}, with h_i = t_i - t_{i+1}
    (the last step, from eps to 0, is eps long; the official code uses h = T / N for every step).
    The score is never evaluated at t = 0. With x the state, s = s(x, t_i), z ~ N(0, I):

    * 'euler_maruyama': x_mean = x - [f(x, t_i) - g(t_i)^2 s] h_i,  x = x_mean + g(t_i) sqrt(h_i) z.
    * 'reverse_diffusion' (score-SDE paper eq. 46): with the exact forward transition over the
      step, x_{t_i} = a_i x_{t_{i+1}} + G_i z (`_transition`),
          x_mean = x - (a_i - 1) x + G_i^2 s,  x = x_mean + G_i z.
      For VP and VE this is the official DDPM / SMLD discretisation (the official uses
      beta_i = beta(t) / N, here beta_i = 1 - exp(-int beta) over the step); for subVP the
      official falls back to Euler-Maruyama, here the same exact-transition rule applies.
    * 'langevin' corrector, n_steps_each times at t_i:
          step = 2 r_i (snr ||z|| / ||s||)^2,  x_mean = x + step s,  x = x_mean + sqrt(2 step) z,
      where ||.|| is the mean over the batch of the per-example norms, as in the official code
      (its `pmean` over devices is here the global mean of a sharded batch), and
      r_i = a_i^2 = (alpha(t_i) / alpha(t_{i+1}))^2: the official `sde.alphas[i]` = 1 - beta_i
      for VP, 1 for VE, and for subVP the VP value, since its drift (hence alpha(t)) is VP's.
      (The official reads `sde.alphas`, which subVP lacks, and raises AttributeError there.)
      The batch mean couples the samples of a batch through one scalar. Per-example norms would
      not, but their (||z|| / ||s||)^2 is heavy-tailed in low dimension: on Gaussian data with
      the exact score (N = 200, reverse_diffusion + langevin, 2000 samples) they inflate the
      sample variance by 52% at D = 8, 8% at D = 64 and 3% at D = 512; the batch mean by 2-3%
      at every D.
    * 'none': no predictor / no corrector.

    Args:
      score_fn: s(x [B, ...], t [B]) -> [B, ...].
      sde: the forward SDE.
      shape: [B, ...] shape of the batch of samples.
      key: PRNG key (prior draw and all noise).
      eps: smallest time of the grid, > 0.
      num_steps: N, the number of predictor-corrector steps (official `model.num_scales`).
      predictor: 'euler_maruyama', 'reverse_diffusion' or 'none'.
      corrector: 'langevin' or 'none'.
      snr: signal-to-noise ratio of the Langevin corrector.
      n_steps_each: corrector steps per time step.
      denoise: return the noise-free mean x_mean of the last update, as the official does with
        `sampling.noise_removal=True` (costs nothing); otherwise the last noisy state x.

    Returns:
      SampleResult(x [B, ...], nfe [B]) with nfe = N x (n_steps_each [corrector] + 1 [predictor])
      score evaluations, each term dropped for 'none' (the official counts them regardless).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {PREDICTORS}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; choose one of {CORRECTORS}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    if num_steps < 1 or n_steps_each < 0:
        raise ValueError(f"need num_steps >= 1, n_steps_each >= 0; got {num_steps}, {n_steps_each}")
    n_corrector = n_steps_each if corrector == "langevin" else 0
    n_predictor = 0 if predictor == "none" else 1

    key_prior, key_steps = jax.random.split(key)
    x = sde.prior_sample(key_prior, shape)
    grid = jnp.linspace(sde.T, eps, num_steps, dtype=x.dtype)
    t_next = jnp.concatenate([grid[1:], jnp.zeros((1,), x.dtype)])

    def mean_norm(v: Array) -> Array:
        # Mean over the batch of the per-example norms; a global mean when x is sharded.
        return jnp.mean(jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1)))

    def langevin(x: Array, t: Array, r: Array, key: Array) -> tuple[Array, Array]:
        s = score_fn(x, _times(t, x))
        noise = jax.random.normal(key, x.shape, x.dtype)
        step = 2.0 * r * (snr * mean_norm(noise) / mean_norm(s)) ** 2
        x_mean = x + step * s
        return x_mean + jnp.sqrt(2.0 * step) * noise, x_mean

    def predict(x: Array, t: Array, t1: Array, a: Array, g2: Array, key: Array):
        s = score_fn(x, _times(t, x))
        noise = jax.random.normal(key, x.shape, x.dtype)
        if predictor == "euler_maruyama":
            h = t - t1
            tb = _times(t, x)
            g2 = sde.likelihood_weight(t)
            x_mean = x - (sde.drift(x, tb) - g2 * s) * h
            return x_mean + jnp.sqrt(g2 * h) * noise, x_mean
        # reverse_diffusion
        x_mean = x - (a - 1.0) * x + g2 * s
        return x_mean + jnp.sqrt(g2) * noise, x_mean

    def step(x: Array, inputs) -> tuple[Array, Array]:
        t, t1, k = inputs
        a, g2 = _transition(sde, t, t1)
        x_mean = x
        keys = jax.random.split(k, n_corrector + 1)
        for j in range(n_corrector):  # unrolled: n_steps_each is small (official: 1)
            x, x_mean = langevin(x, t, a**2, keys[j])
        if n_predictor:
            x, x_mean = predict(x, t, t1, a, g2, keys[-1])
        return x, x_mean

    def body(carry, inputs):
        x, _ = carry
        return step(x, inputs), None

    keys = jax.random.split(key_steps, num_steps)
    (x, x_mean), _ = jax.lax.scan(body, (x, x), (grid, t_next, keys))
    nfe = jnp.full(shape[:1], num_steps * (n_corrector + n_predictor), jnp.int32)
    return SampleResult(x=x_mean if denoise else x, nfe=nfe)


def sample(
    score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], key: Array, settings: SamplingSettings
) -> SampleResult:
    """Samples with the sampler `settings` names ('ode': `ode_sample`, 'pc': `pc_sample`).

    Pure and jittable: `jax.jit(lambda params, key: sample(make_score(params), ...))`.
    """
    c = settings
    if c.method == "ode":
        return ode_sample(
            score_fn,
            sde,
            shape,
            key,
            eps=c.smallest_time,
            rtol=c.rtol,
            atol=c.atol,
            denoise=c.noise_removal,
        )
    if c.method == "pc":
        return pc_sample(
            score_fn,
            sde,
            shape,
            key,
            eps=c.smallest_time,
            num_steps=c.num_scales,
            predictor=c.predictor,
            corrector=c.corrector,
            snr=c.snr,
            n_steps_each=c.n_steps_each,
            denoise=c.noise_removal,
        )
    raise ValueError(f"unknown sampling method {c.method!r}; choose 'ode' or 'pc'")
