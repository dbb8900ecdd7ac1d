"""The one place where pixels become model inputs and nats become bits per dimension.

Conventions (`../shared/reference/scoreflow.md` section 2.7):

* Images are integers k in {0, ..., L-1} with L quantization levels (256 for 8-bit images, 17 for
  scikit-learn's digits).
* Uniform dequantization: y = (k + u) / L in [0, 1), u ~ U[0, 1)^D. Without dequantization the
  bin centre y = (k + 1/2) / L is used, so training and evaluation inputs live on the same grid.
* Model space: x = y (uncentred) or x = 2 y - 1 (centred, every ScoreFlow config).
* bits/dim of the discrete image:

      bpd = NLL_x / (D ln 2) - log2(dx/dy) + log2(L) [+ log q(u|k) / (D ln 2)]

  where NLL_x is the model's negative log-density of x in nats. The -log2(dx/dy) term is -1 for
  centred data; log2(L) is 8 for 8-bit images; together they give the paper's "+7". The last term
  is the variational dequantizer's (Flow++), zero for uniform dequantization.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def scale_log2(centered: bool) -> float:
    """log2 of the slope dx/dy of the map from [0, 1) to model space (1 if centred, else 0)."""
    return 1.0 if centered else 0.0


def bpd_offset(levels: int = 256, centered: bool = True) -> float:
    """The additive constant of bits/dim: log2(levels) - log2(dx/dy). 7.0 for 8-bit centred data."""
    _check_levels(levels)
    return math.log2(levels) - scale_log2(centered)


def _check_levels(levels: int) -> None:
    if int(levels) != levels or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")


def dequantize(key: Array | None, k: Array, levels: int = 256) -> Array:
    """Integers k in {0..levels-1} -> y in [0, 1).

    Args:
      key: PRNG key for uniform dequantization y = (k + u) / levels, u ~ U[0, 1); None for the
        deterministic bin centre y = (k + 1/2) / levels.
      k: integer array (any shape, e.g. uint8 [B, H, W, C]).
      levels: number of quantization levels.

    Returns:
      float32 array shaped like k.
    """
    _check_levels(levels)
    k = jnp.asarray(k).astype(jnp.float32)
    if key is None:
        u = 0.5
    else:
        u = jax.random.uniform(key, k.shape, jnp.float32)
    # (k + u) / L can round to 1.0 in float32 only for u within 2^-24 of 1; clip keeps y < 1.
    return jnp.minimum((k + u) / levels, jnp.float32(1.0 - 2.0**-24))


def to_model_space(y: Array, centered: bool = True) -> Array:
    """y in [0, 1) -> x in model space ([-1, 1) if centred)."""
    return 2.0 * y - 1.0 if centered else y


def from_model_space(x: Array, centered: bool = True) -> Array:
    """Inverse of `to_model_space`."""
    return (x + 1.0) / 2.0 if centered else x


def to_uint(x: Array, levels: int = 256, centered: bool = True) -> Array:
    """Model-space values (e.g. samples) -> nearest integer level, as uint8 (levels <= 256)."""
    y = from_model_space(x, centered)
    k = jnp.floor(jnp.clip(y, 0.0, 1.0 - 1e-7) * levels)
    return k.astype(jnp.uint8 if levels <= 256 else jnp.int32)


def bits_per_dim_scale(num_dims: int) -> float:
    """1 / (D ln 2): the factor that turns nats (a difference or a standard error) into bits/dim."""
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    return 1.0 / (num_dims * math.log(2.0))


def nats_to_bpd(
    nll: Array,
    num_dims: int,
    *,
    levels: int = 256,
    centered: bool = True,
    log_q_dequant: Array | None = None,
) -> Array:
    """Per-example NLL of the model-space density (nats) -> bits/dim of the discrete data.

    Args:
      nll: [B] negative log-density of x in nats (from `bound.nll_bound` or `likelihood.ode_nll`).
      num_dims: D, the number of data dimensions (H * W * C).
      levels: quantization levels of the data.
      centered: whether model space is [-1, 1] (2y - 1) rather than [0, 1].
      log_q_dequant: [B] log q(u | k) of a variational dequantizer, in nats; None for uniform.

    Returns:
      [B] bits per dimension.
    """
    scale = bits_per_dim_scale(num_dims)
    bpd = jnp.asarray(nll) * scale + bpd_offset(levels, centered)
    if log_q_dequant is not None:
        bpd = bpd + jnp.asarray(log_q_dequant) * scale
    return bpd
