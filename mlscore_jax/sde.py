"""Forward SDEs with affine drift, as small immutable pytrees.

Every SDE here has the form

    dx = f(t) x dt + g(t) dw,        x_t = alpha(t) x_0 + sigma(t) z,   z ~ N(0, I),

(paper eq. 1; `../shared/reference/scoreflow.md` section 2.1). A subclass must give the marginal
`marginal(t) -> (alpha, sigma)`; drift and diffusion come from it by automatic differentiation,

    f(t) = d log alpha / dt,        g(t)^2 = d sigma^2 / dt - 2 f(t) sigma^2,

unless the subclass gives closed forms (VP, subVP and VE do). Importance sampling of t for the
likelihood weighting lambda = g^2 uses the proposal p(t) = g^2 / (sigma^2 Z) on [eps, T]; VP and
subVP have exact closed-form CDFs and inverse CDFs, every other SDE gets a numerical one from
tabulated quadrature on a log-spaced grid.

Shapes: x is [B, ...], t is [B] (or a scalar). Coefficients returned for t of shape [B] are [B].

A new SDE is a few lines, for example a variance-preserving SDE with linear log-SNR:

    class LinearLogSNR(SDE):
        def marginal(self, t):
            lam = 10.0 - 20.0 * t
            return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

It then works in `losses.dsm_loss`, `bound.nll_bound` and `likelihood.ode_nll` unchanged.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

Array = jax.Array

# Number of grid points of the numerical importance-sampling CDF (log-spaced in t).
_NUM_CDF_POINTS = 4097


def broadcast_to_data(c: Array, x: Array) -> Array:
    """Reshape a per-example coefficient c [B] (or a scalar) to broadcast against x [B, ...]."""
    c = jnp.asarray(c)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _sum_over_data(x: Array) -> Array:
    """Sum over every axis but the first: [B, ...] -> [B]."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


class SDE(eqx.Module):
    """Abstract forward SDE dx = f(t) x dt + g(t) dw on [0, T] with a Gaussian prior N(0, s^2 I).

    Subclasses implement `marginal`. Everything else has a generic default that subclasses may
    override with closed forms for speed or precision.
    """

    @property
    def T(self) -> float:
        """End time of the forward process."""
        return 1.0

    @property
    def prior_std(self) -> float:
        """Standard deviation s of the prior N(0, s^2 I)."""
        return 1.0

    @abc.abstractmethod
    def marginal(self, t: Array) -> tuple[Array, Array]:
        """Perturbation kernel x_t = alpha(t) x_0 + sigma(t) z.

        Args:
          t: times, [B] or scalar.

        Returns:
          (mean_coeff, std): alpha(t) and sigma(t), each shaped like t.
        """

    # ----------------------------------------------------------------------------------------
    # Drift and diffusion (generic: derived from the marginal by forward-mode autodiff).

    def drift_coeff(self, t: Array) -> Array:
        """f(t) in f(x, t) = f(t) x, i.e. d log alpha / dt; shaped like t."""
        t = jnp.asarray(t)
        _, dlog_alpha = jax.jvp(lambda s: jnp.log(self.marginal(s)[0]), (t,), (jnp.ones_like(t),))
        return dlog_alpha

    def diffusion(self, t: Array) -> Array:
        """g(t); shaped like t."""
        return jnp.sqrt(self.likelihood_weight(t))

    def likelihood_weight(self, t: Array) -> Array:
        """lambda(t) = g(t)^2, the weighting that makes score matching an NLL bound (Thm. 1)."""
        t = jnp.asarray(t)
        var, dvar = jax.jvp(lambda s: self.marginal(s)[1] ** 2, (t,), (jnp.ones_like(t),))
        return jnp.maximum(dvar - 2.0 * self.drift_coeff(t) * var, 0.0)

    def drift(self, x: Array, t: Array) -> Array:
        """f(x, t) = f(t) x for x [B, ...], t [B]."""
        return broadcast_to_data(self.drift_coeff(t), x) * x

    def drift_divergence(self, x: Array, t: Array) -> Array:
        """div_x f(x, t) = f(t) * D, exact for the affine drift; [B]."""
        d = math.prod(x.shape[1:])
        return self.drift_coeff(t) * d * jnp.ones(x.shape[:1], x.dtype)

    # ----------------------------------------------------------------------------------------
    # Prior.

    def prior_sample(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        """A sample of the prior N(0, s^2 I) of the given shape [B, ...]."""
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_logp(self, z: Array) -> Array:
        """log N(z; 0, s^2 I) summed over data dimensions: [B, ...] -> [B]."""
        d = math.prod(z.shape[1:])
        s2 = self.prior_std**2
        return -0.5 * d * math.log(2.0 * math.pi * s2) - 0.5 * _sum_over_data(z**2) / s2

    def prior_cross_entropy(self, x0: Array) -> Array:
        """E_z[-log prior(alpha(T) x0 + sigma(T) z)] in closed form, per example; [B]."""
        d = math.prod(x0.shape[1:])
        alpha, sigma = self.marginal(jnp.full(x0.shape[:1], self.T, x0.dtype))
        s2 = self.prior_std**2
        sq = alpha**2 * _sum_over_data(x0**2) + d * sigma**2
        return 0.5 * d * math.log(2.0 * math.pi * s2) + 0.5 * sq / s2

    # ----------------------------------------------------------------------------------------
    # Importance sampling of t for the likelihood weighting: p(t) = g^2 / (sigma^2 Z) on [eps, T].

    def importance_density_unnormalized(self, t: Array) -> Array:
        """g(t)^2 / sigma(t)^2; shaped like t."""
        _, sigma = self.marginal(t)
        return self.likelihood_weight(t) / sigma**2

    def _cdf_table(self, eps: float) -> tuple[Array, Array]:
        """(log t grid, F(t) on it): cumulative Simpson quadrature in u = log t."""
        if not eps > 0:
            raise ValueError(f"importance sampling needs eps > 0, got eps={eps}")
        n = _NUM_CDF_POINTS
        log_t = jnp.linspace(math.log(eps), math.log(self.T), n, dtype=jnp.float32)
        # Integrate h(t) dt = h(e^u) e^u du; Simpson on each pair of intervals, trapezoid
        # within a pair for the midpoints (their error is second order but they are only used
        # for interpolation, not for Z).
        mids = 0.5 * (log_t[1:] + log_t[:-1])
        h = self.importance_density_unnormalized(jnp.exp(log_t)) * jnp.exp(log_t)
        hm = self.importance_density_unnormalized(jnp.exp(mids)) * jnp.exp(mids)
        du = log_t[1:] - log_t[:-1]
        seg = du / 6.0 * (h[:-1] + 4.0 * hm + h[1:])
        cdf = jnp.concatenate([jnp.zeros((1,), seg.dtype), jnp.cumsum(seg)])
        return log_t, cdf

    def importance_cdf(self, t: Array, eps: float) -> Array:
        """Unnormalised CDF F(t) = int_eps^t g^2 / sigma^2 ds; shaped like t."""
        log_t, cdf = self._cdf_table(eps)
        return jnp.interp(jnp.log(t), log_t, cdf)

    def importance_normalizer(self, eps: float) -> Array:
        """Z = F(T) = int_eps^T g^2 / sigma^2 dt."""
        return self._cdf_table(eps)[1][-1]

    def importance_inverse_cdf(self, u: Array, eps: float) -> Array:
        """t with F(t) = u, for u in [0, Z]; shaped like u."""
        log_t, cdf = self._cdf_table(eps)
        return jnp.clip(jnp.exp(jnp.interp(u, cdf, log_t)), eps, self.T)

    def sample_importance_time(self, key: Array, shape: tuple[int, ...], eps: float) -> Array:
        """Draw t ~ p(t) = g^2 / (sigma^2 Z) on [eps, T] by inverse CDF."""
        z = self.importance_normalizer(eps)
        u = jax.random.uniform(key, shape, jnp.float32) * z
        return self.importance_inverse_cdf(u, eps)


class _LinearBetaSDE(SDE):
    """Shared algebra of VP and subVP: beta(t) = b0 + t (b1 - b0), B(t) = int_0^t beta."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Array) -> Array:
        """B(t) = b0 t + (b1 - b0) t^2 / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def time_from_integrated_beta(self, b: Array) -> Array:
        """Inverse of B(t), written to avoid cancellation at small B."""
        db = self.beta_max - self.beta_min
        return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * db * b))

    def drift_coeff(self, t: Array) -> Array:
        return -0.5 * self.beta(jnp.asarray(t))


class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE: dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (DDPM in the limit)."""

    def marginal(self, t: Array) -> tuple[Array, Array]:
        b = self.integrated_beta(jnp.asarray(t))
        return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

    def likelihood_weight(self, t: Array) -> Array:
        return self.beta(jnp.asarray(t))

    def importance_density_unnormalized(self, t: Array) -> Array:
        b = self.integrated_beta(jnp.asarray(t))
        return self.beta(t) / -jnp.expm1(-b)

    def _log_expm1_b(self, t):
        return jnp.log(jnp.expm1(self.integrated_beta(jnp.asarray(t, jnp.float32))))

    def importance_cdf(self, t: Array, eps: float) -> Array:
        # F(t) = log(e^B(t) - 1) - log(e^B(eps) - 1)
        return self._log_expm1_b(t) - self._log_expm1_b(eps)

    def importance_normalizer(self, eps: float) -> Array:
        return self.importance_cdf(self.T, eps)

    def importance_inverse_cdf(self, u: Array, eps: float) -> Array:
        # B* = log(1 + e^u (e^B(eps) - 1)), computed as log1p(exp(u + log(e^B(eps) - 1))).
        b = jnp.log1p(jnp.exp(u + self._log_expm1_b(eps)))
        return jnp.clip(self.time_from_integrated_beta(b), eps, self.T)


class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE: dx = -beta/2 x dt + sqrt(beta (1 - e^{-2B})) dw; std sigma = 1 - e^{-B}."""

    def marginal(self, t: Array) -> tuple[Array, Array]:
        b = self.integrated_beta(jnp.asarray(t))
        return jnp.exp(-0.5 * b), -jnp.expm1(-b)

    def likelihood_weight(self, t: Array) -> Array:
        t = jnp.asarray(t)
        return self.beta(t) * -jnp.expm1(-2.0 * self.integrated_beta(t))

    def importance_density_unnormalized(self, t: Array) -> Array:
        b = self.integrated_beta(jnp.asarray(t))
        # beta (1 - e^{-2B}) / (1 - e^{-B})^2 = beta (1 + e^{-B}) / (1 - e^{-B})
        return self.beta(t) * (1.0 + jnp.exp(-b)) / -jnp.expm1(-b)

    def _antiderivative(self, t):
        b = self.integrated_beta(jnp.asarray(t, jnp.float32))
        return 2.0 * jnp.log(jnp.expm1(b)) - b

    def importance_cdf(self, t: Array, eps: float) -> Array:
        # F(t) = [2 log(e^B - 1) - B]_eps^t
        return self._antiderivative(t) - self._antiderivative(eps)

    def importance_normalizer(self, eps: float) -> Array:
        return self.importance_cdf(self.T, eps)

    def importance_inverse_cdf(self, u: Array, eps: float) -> Array:
        # With c = u + F0(eps) and k = 2 + e^c: e^B = (k + sqrt(k^2 - 4)) / 2, i.e.
        # B = log1p((e^c + sqrt(e^c (4 + e^c))) / 2), free of cancellation for small e^c.
        ec = jnp.exp(u + self._antiderivative(eps))
        b = jnp.log1p(0.5 * (ec + jnp.sqrt(ec * (4.0 + ec))))
        return jnp.clip(self.time_from_integrated_beta(b), eps, self.T)


class VESDE(SDE):
    """Variance-exploding SDE: dx = g(t) dw, x_t = x_0 + sigma(t) z, prior N(0, sigma_max^2 I).

    Geometric: sigma(t) = sigma_min (sigma_max / sigma_min)^t. Linear (`linear=True`, ScoreFlow's
    "linearvesde"): sigma(t) = sigma_max t. As in the official code, sigma(t) itself is the
    marginal std (not sqrt(sigma(t)^2 - sigma(0)^2)).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    linear: bool = eqx.field(default=False, static=True)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def marginal(self, t: Array) -> tuple[Array, Array]:
        t = jnp.asarray(t)
        if self.linear:
            sigma = self.sigma_max * t
        else:
            sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return jnp.ones_like(sigma), sigma

    def drift_coeff(self, t: Array) -> Array:
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def likelihood_weight(self, t: Array) -> Array:
        t = jnp.asarray(t)
        if self.linear:
            return 2.0 * self.sigma_max**2 * t
        sigma = self.marginal(t)[1]
        return sigma**2 * 2.0 * math.log(self.sigma_max / self.sigma_min)

    # g^2 / sigma^2 = d log sigma^2 / dt: 2 / t (linear), the constant 2 log(sigma_max / sigma_min)
    # (geometric: importance sampling is uniform in t), so F and its inverse are closed forms.

    def importance_cdf(self, t: Array, eps: float) -> Array:
        if not eps > 0:
            raise ValueError(f"importance sampling needs eps > 0, got eps={eps}")
        t = jnp.asarray(t, jnp.float32)
        if self.linear:
            return 2.0 * jnp.log(t / eps)
        return 2.0 * math.log(self.sigma_max / self.sigma_min) * (t - eps)

    def importance_normalizer(self, eps: float) -> Array:
        return self.importance_cdf(jnp.asarray(self.T, jnp.float32), eps)

    def importance_inverse_cdf(self, u: Array, eps: float) -> Array:
        u = jnp.asarray(u, jnp.float32)
        if self.linear:
            t = eps * jnp.exp(0.5 * u)
        else:
            t = eps + u / (2.0 * math.log(self.sigma_max / self.sigma_min))
        return jnp.clip(t, eps, self.T)


SDES: dict[str, type[SDE]] = {"vpsde": VPSDE, "subvpsde": SubVPSDE, "vesde": VESDE}


def get_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by its (official-code) name: 'vpsde', 'subvpsde' or 'vesde'."""
    try:
        cls = SDES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown SDE {name!r}; choose one of {sorted(SDES)}") from None
    return cls(**kwargs)
