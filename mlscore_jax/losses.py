"""Per-example denoising score matching with the paper's three weightings.

With x_t = alpha(t) x_0 + sigma(t) z and score s = s_theta(x_t, t)
(`../shared/reference/scoreflow.md` section 2.3):

| weighting        | t ~             | per-example loss            | lambda(t) |
|------------------|-----------------|-----------------------------|-----------|
| 'score'          | U[eps, T]       | R(||sigma s + z||^2)        | sigma^2   |
| 'likelihood'     | U[eps, T]       | R(g^2 ||s + z / sigma||^2)  | g^2       |
| 'likelihood', IS | p ~ g^2/sigma^2 | c R(||sigma s + z||^2)      | g^2       |

R is the mean (`reduce='mean'`) or the sum (`reduce='sum'`) over data dimensions. With importance
sampling the constant c = Z / (T - eps) makes the expectation equal to the 'likelihood' row
(E_p[Z sigma^2 / g^2 (.)] = int (.) dt = (T - eps) E_U[(.)]); `normalize_importance=False` drops
c, which is what the official code trains on (the constant changes the effective gradient scale
and so interacts with gradient clipping).

The scaled form ||sigma s + z||^2 = ||z - eps_hat||^2 is computed directly when the network
predicts noise (`noise_fn`), so no 1/sigma^2 ~ 1e6 factors appear.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mlscore_jax.sde import SDE, broadcast_to_data

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

WEIGHTINGS = ("score", "likelihood")


def sample_time(
    sde: SDE, key: Array, batch: int, *, eps: float, importance_sampling: bool
) -> Array:
    """t [batch] ~ U[eps, T], or ~ p(t) = g^2 / (sigma^2 Z) with importance sampling."""
    if importance_sampling:
        return sde.sample_importance_time(key, (batch,), eps)
    return jax.random.uniform(key, (batch,), jnp.float32, eps, sde.T)


def scaled_score(
    score_fn: ScoreFn | None, noise_fn: ScoreFn | None, x: Array, t: Array, sigma: Array
) -> Array:
    """sigma(t) * s(x, t) = -eps_hat(x, t), from either a score or a noise network; [B, ...]."""
    if (score_fn is None) == (noise_fn is None):
        raise ValueError("give exactly one of score_fn and noise_fn")
    if noise_fn is not None:
        return -noise_fn(x, t)
    return broadcast_to_data(sigma, x) * score_fn(x, t)


def dsm_loss(
    score_fn: ScoreFn | None,
    sde: SDE,
    x0: Array,
    key: Array,
    *,
    weighting: str = "likelihood",
    importance_sampling: bool = False,
    eps: float = 1e-5,
    reduce: str = "mean",
    noise_fn: ScoreFn | None = None,
    normalize_importance: bool = True,
) -> Array:
    """Denoising score matching loss per example.

    Args:
      score_fn: s_theta(x [B, ...], t [B]) -> [B, ...]. Pass None and give `noise_fn` instead to
        use a noise-predicting network eps_hat directly (s = -eps_hat / sigma).
      sde: the forward SDE.
      x0: [B, ...] data in model space.
      key: PRNG key (times and noise).
      weighting: 'score' (lambda = sigma^2) or 'likelihood' (lambda = g^2).
      importance_sampling: draw t from p(t) ~ g^2 / sigma^2 (only with weighting='likelihood').
      eps: smallest time.
      reduce: 'mean' or 'sum' over data dimensions.
      noise_fn: eps_hat(x, t), alternative to score_fn.
      normalize_importance: with importance sampling, multiply by Z / (T - eps) so the expectation
        equals the non-IS likelihood-weighted loss.

    Returns:
      [B] per-example losses.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if importance_sampling and weighting != "likelihood":
        raise ValueError("importance_sampling only applies to weighting='likelihood'")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")

    key_t, key_z = jax.random.split(key)
    batch = x0.shape[0]
    t = sample_time(sde, key_t, batch, eps=eps, importance_sampling=importance_sampling)
    z = jax.random.normal(key_z, x0.shape, x0.dtype)
    alpha, sigma = sde.marginal(t)
    xt = broadcast_to_data(alpha, x0) * x0 + broadcast_to_data(sigma, x0) * z

    residual = scaled_score(score_fn, noise_fn, xt, t, sigma) + z
    flat = residual.reshape(batch, -1) ** 2
    per_example = jnp.mean(flat, axis=-1) if reduce == "mean" else jnp.sum(flat, axis=-1)

    if weighting == "score":
        return per_example
    if importance_sampling:
        if normalize_importance:
            per_example = per_example * sde.importance_normalizer(eps) / (sde.T - eps)
        return per_example
    # ||s + z / sigma||^2 g^2 = ||sigma s + z||^2 g^2 / sigma^2
    return per_example * sde.likelihood_weight(t) / sigma**2
