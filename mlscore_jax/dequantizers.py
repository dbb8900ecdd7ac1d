"""Dequantizers: integer images -> continuous points, with the density of the noise they add.

The discrete likelihood of an image k (integers in {0..L-1}^D) is bounded through any density
q(u | k) of dequantization noise u in [0, 1)^D (`../shared/reference/scoreflow.md` section 2.7,
`../shared/reference/flowpp_dequantizer.md` section 9):

    -log P(k) <= E_{u ~ q}[ -log p_model(x(u)) + log q(u | k) - log |dx/du| ]

with x(u) = 2 (k + u) / L - 1 in model space (centred). bits/dim add the constant
-log|dx/du| / (D ln 2) (`bpd.bpd_offset`, the paper's "+7"), so each dequantizer here returns
the model input x and the rest of its term, `log_q`, in nats:

* `Uniform`: u ~ U[0, 1)^D, log q = 0 (today's default; the same draws as
  `Preprocessing.for_likelihood()`, so its numbers are unchanged).
* `Variational`: u = flow_phi(eta; k) with eta ~ N(0, I), a trained Flow++ dequantizer
  (`models.flowpp`, `--mode train_deq`); log q = log q_phi(u | k).
* `TruncatedNormal` (i-DODE, Zheng et al. 2023; training free): the data point is placed at
  the smallest time eps of the likelihood as x = alpha_eps c + sigma_eps n, with c the bin
  centre and n ~ N(0, I) truncated to the bin (|sigma_eps n / alpha_eps| < half a bin in model
  space). With y = x / alpha_eps = c + tau n, tau = sigma_eps / alpha_eps, the term is
  log q(u | k) - D log alpha_eps (the density of x = alpha_eps y is alpha_eps^-D that of y):

      log q(u | k) = sum_d [ log phi(n_d) - log(Phi(a) - Phi(-a)) + log(w / tau) ],
      a = w / (2 tau),  w = bin width in model space (2 / L centred),  u = 1/2 + tau n / w.

  It suits models whose density at time eps is sharp around the bin centres (trained without
  dequantization, like the paper's CIFAR-10 models); a model trained on uniformly dequantized
  data spreads its mass over the whole bin, and uniform dequantization fits it better.

`importance_weighted` combines K draws into -log (1/K sum_k p(x_k) / q(u_k | k)), the tighter
K-sample bound (Burda et al. 2016); K = 1 is the paper's single-sample number.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy import special

from mlscore_jax import bpd
from mlscore_jax.preprocessing import Preprocessing
from mlscore_jax.sde import SDE

Array = jax.Array


class Dequantized(NamedTuple):
    """Dequantized images and the dequantizer's term of the bound."""

    x: Array  # [B, ...] model-space points at which the model's density is evaluated
    log_q: Array  # [B] nats: log q(u | k) - log |dx/dy| (0 for uniform dequantization)


def _check_images(preprocessing: Preprocessing, k: Array) -> None:
    if preprocessing.levels is None:
        raise ValueError("dequantization needs integer images; continuous data have none")
    if not jnp.issubdtype(k.dtype, jnp.integer):
        raise TypeError(f"dequantizers take integer images, got {k.dtype}")


def _to_model_space(preprocessing: Preprocessing, k: Array, u: Array) -> Array:
    """(k + u) / L in model space; u is clipped below 1 so that y < 1 as for uniform noise."""
    levels = preprocessing.levels
    u = jnp.clip(u, 0.0, 1.0 - 2.0**-24)
    y = jnp.minimum((k.astype(jnp.float32) + u) / levels, jnp.float32(1.0 - 2.0**-24))
    return bpd.to_model_space(y, preprocessing.centered)


def bin_width(preprocessing: Preprocessing) -> float:
    """Width of one integer bin in model space: 2 / L centred, 1 / L otherwise."""
    return (2.0 if preprocessing.centered else 1.0) / preprocessing.levels


@dataclasses.dataclass(frozen=True)
class Uniform:
    """u ~ U[0, 1)^D: the draws of `Preprocessing.for_likelihood()` for the same key."""

    preprocessing: Preprocessing

    def __call__(self, params: Any, key: Array, k: Array) -> Dequantized:
        del params
        x = self.preprocessing.for_likelihood()(key, k)
        return Dequantized(x, jnp.zeros((k.shape[0],), jnp.float32))


@dataclasses.dataclass(frozen=True)
class TruncatedNormal:
    """x = alpha_eps c + sigma_eps n, n ~ N(0, I) truncated to the bin (module docstring)."""

    preprocessing: Preprocessing
    sde: SDE
    eps: float  # the time at which the likelihood places the data (BpdSettings.eps)

    def scales(self) -> tuple[float, float, float]:
        """(alpha_eps, tau = sigma_eps / alpha_eps, a = half bin / tau), as Python floats."""
        with jax.ensure_compile_time_eval():  # constants, also while tracing
            alpha, sigma = self.sde.marginal(jnp.full((1,), self.eps, jnp.float32))
            alpha, sigma = float(alpha[0]), float(sigma[0])
        tau = sigma / alpha
        return alpha, tau, bin_width(self.preprocessing) / (2.0 * tau)

    def __call__(self, params: Any, key: Array, k: Array) -> Dequantized:
        del params
        _check_images(self.preprocessing, k)
        alpha, tau, a = self.scales()
        w = bin_width(self.preprocessing)
        mass = math.erf(a / math.sqrt(2.0))  # Phi(a) - Phi(-a)
        # inverse-CDF draw of the truncated normal, symmetric about 1/2 so no tail cancels
        v = jax.random.uniform(key, k.shape, jnp.float32, 2.0**-24, 1.0)
        n = jnp.clip(special.ndtri(0.5 + (v - 0.5) * mass), -a, a)
        u = 0.5 + (tau / w) * n
        num_dims = math.prod(k.shape[1:])
        log_density = -0.5 * n**2 - 0.5 * math.log(2.0 * math.pi)
        log_q = jnp.sum(log_density.reshape(k.shape[0], -1), axis=-1) + num_dims * (
            math.log(w / tau) - math.log(mass) - math.log(alpha)
        )
        x = alpha * _to_model_space(self.preprocessing, k, u)
        return Dequantized(x, log_q)


@dataclasses.dataclass(frozen=True)
class Variational:
    """u = flow_phi(eta; k), eta ~ N(0, I): a Flow++ dequantizer with parameters `params`."""

    module: nn.Module  # models.flowpp.FlowppDequantizer
    preprocessing: Preprocessing

    def __call__(self, params: Any, key: Array, k: Array) -> Dequantized:
        _check_images(self.preprocessing, k)
        eta = jax.random.normal(key, k.shape, jnp.float32)
        u, log_q = self.module.apply({"params": params}, eta, k)
        return Dequantized(_to_model_space(self.preprocessing, k, u), log_q)


def make(
    kind: str,
    preprocessing: Preprocessing,
    *,
    sde: SDE | None = None,
    eps: float | None = None,
    module: nn.Module | None = None,
) -> Dequantizer:
    """The dequantizer named `kind` ('uniform', 'truncated_normal', 'variational')."""
    if kind == "uniform":
        return Uniform(preprocessing)
    if preprocessing.levels is None:
        raise ValueError(f"dequantization={kind!r} needs integer images; the data are continuous")
    if kind == "truncated_normal":
        if sde is None or eps is None:
            raise ValueError("truncated-normal dequantization needs the SDE and eps")
        return TruncatedNormal(preprocessing, sde, float(eps))
    if kind == "variational":
        if module is None:
            raise ValueError("variational dequantization needs the dequantizer network")
        return Variational(module, preprocessing)
    raise ValueError(f"unknown dequantization {kind!r}")


Dequantizer = Uniform | TruncatedNormal | Variational
_KINDS = {Uniform: "uniform", TruncatedNormal: "truncated_normal", Variational: "variational"}


def kind_of(dequantizer: Dequantizer) -> str:
    """Its name in `settings.DEQUANTIZATIONS` ('uniform', 'truncated_normal', 'variational')."""
    return _KINDS[type(dequantizer)]


def importance_weighted(total: Array, stderr: Array | None = None) -> tuple[Array, Array | None]:
    """K single-sample bounds [K, B] (nats: nll_k + log_q_k) -> the K-sample bound [B].

    -log (1/K sum_k exp(-total_k)) <= mean_k total_k (Jensen), and it tends to -log P(k) as K
    grows. With per-sample standard errors [K, B] (the bound's own Monte-Carlo error), the
    error of the combination to first order, sum_k w_k s_k with w = softmax(-total): the K
    estimates share their random numbers (`evaluate`), so their errors are taken as fully
    correlated (the conservative choice; independent errors would give sqrt(sum (w_k s_k)^2)).
    """
    num = total.shape[0]
    if num == 1:
        return total[0], None if stderr is None else stderr[0]
    estimate = -(jax.nn.logsumexp(-total, axis=0) - math.log(num))
    if stderr is None:
        return estimate, None
    w = jax.nn.softmax(-total, axis=0)
    return estimate, jnp.sum(w * stderr, axis=0)
