"""Isotropic Gaussian data: a model with an exact score and closed-form likelihoods.

For x_0 ~ N(mu, s^2 I) every marginal of a forward SDE is Gaussian,
p_t = N(alpha(t) mu, v(t) I) with v(t) = alpha(t)^2 s^2 + sigma(t)^2, so the score is exact and

* the probability-flow ODE maps x at time eps affinely to
  z = alpha(T) mu + sqrt(v(T) / v(eps)) (x - alpha(eps) mu), and
  -log p^ODE(x) = -log pi(z) - (D/2) log(v(T) / v(eps));
* the expected variational bound (no offset) is H(p_eps) + KL(p_T || pi).

Tests and the evaluation path use it as an oracle.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from mlscore_jax.sde import SDE, broadcast_to_data

Array = jax.Array


class GaussianData(eqx.Module):
    """x_0 ~ N(mean, std^2 I) with mean of shape [D...] (the data shape)."""

    mean: Array
    std: float

    def sample(self, key: Array, n: int) -> Array:
        """[n, *data_shape] samples."""
        return self.mean[None] + self.std * jax.random.normal(key, (n,) + self.mean.shape)

    def marginal_var(self, sde: SDE, t: Array) -> Array:
        """v(t) = alpha^2 s^2 + sigma^2, shaped like t."""
        alpha, sigma = sde.marginal(t)
        return alpha**2 * self.std**2 + sigma**2

    def score_fn(self, sde: SDE):
        """The exact score of p_t: score(x [B, ...], t [B]) = -(x - alpha mu) / v."""

        def score(x: Array, t: Array) -> Array:
            alpha, _ = sde.marginal(t)
            v = self.marginal_var(sde, t)
            mean = jnp.broadcast_to(self.mean, x.shape)
            return -(x - broadcast_to_data(alpha, x) * mean) / broadcast_to_data(v, x)

        return score

    def ode_nll(self, sde: SDE, x: Array, eps: float) -> Array:
        """Closed-form -log p^ODE(x) for x [B, ...] placed at time eps; [B]."""
        d = math.prod(self.mean.shape)
        alpha_e, _ = sde.marginal(jnp.asarray(eps))
        alpha_t, _ = sde.marginal(jnp.asarray(sde.T))
        v_e = self.marginal_var(sde, jnp.asarray(eps))
        v_t = self.marginal_var(sde, jnp.asarray(sde.T))
        mean = jnp.broadcast_to(self.mean, x.shape)
        z = alpha_t * mean + jnp.sqrt(v_t / v_e) * (x - alpha_e * mean)
        return -sde.prior_logp(z) - 0.5 * d * jnp.log(v_t / v_e)

    def expected_bound(self, sde: SDE, eps: float) -> Array:
        """H(p_eps) + KL(p_T || prior): the mean over x_0 of the bound without offset."""
        d = math.prod(self.mean.shape)
        v_e = self.marginal_var(sde, jnp.asarray(eps))
        alpha_t, _ = sde.marginal(jnp.asarray(sde.T))
        v_t = self.marginal_var(sde, jnp.asarray(sde.T))
        p2 = sde.prior_std**2
        entropy = 0.5 * d * jnp.log(2.0 * math.pi * math.e * v_e)
        kl = 0.5 * (
            d * (v_t / p2 - 1.0 - jnp.log(v_t / p2)) + alpha_t**2 * jnp.sum(self.mean**2) / p2
        )
        return entropy + kl

    def data_nll(self, x: Array) -> Array:
        """-log N(x; mean, std^2 I) of the data distribution itself; [B]."""
        d = math.prod(self.mean.shape)
        sq = jnp.sum(
            ((x - jnp.broadcast_to(self.mean, x.shape)) ** 2).reshape(x.shape[0], -1), axis=-1
        )
        return 0.5 * d * math.log(2.0 * math.pi * self.std**2) + 0.5 * sq / self.std**2
