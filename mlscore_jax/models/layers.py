"""Pieces shared by the score networks: DDPM initialiser, time embedding, nonlinearities.

Both follow what the official NCSN++ computes (score_sde/score_flow `models/layers.py`), written
from the formulas:

* `default_init(scale)` is variance scaling with fan_avg = (fan_in + fan_out) / 2 and a uniform
  distribution, i.e. W ~ U(-a, a) with a = sqrt(3 scale / fan_avg). **scale = 0 is replaced by
  1e-10**, so the "zero-initialised" layers of the paper's network start tiny (|W| ~ 1e-5 / sqrt(
  fan_avg)), not at exactly zero.
* `sinusoidal_embedding(labels, dim)` is the Transformer/DDPM embedding
  [sin(labels w_k), cos(labels w_k)], w_k = 10000^(-k / (dim / 2 - 1)), k = 0 .. dim / 2 - 1.
  The networks feed it labels = 999 t (continuous-time DDPM++, `TIME_SCALE`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = jax.nn.initializers.Initializer

# Continuous time t in [0, 1] is embedded as the DDPM step index 999 t (official get_score_fn).
TIME_SCALE = 999.0
# Largest period of the sinusoidal embedding (the "magic number" of the Transformer).
MAX_POSITIONS = 10000

# Nonlinearities by their official config names (model.nonlinearity).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "swish": nn.swish,
    "relu": nn.relu,
    "elu": nn.elu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
}

# What the official initialiser substitutes for init_scale = 0.
_ZERO_SCALE_SUBSTITUTE = 1e-10


def default_init(scale: float = 1.0) -> Initializer:
    """DDPM initialiser: variance scaling, fan_avg, uniform; scale 0 means 1e-10 (not zero)."""
    scale = _ZERO_SCALE_SUBSTITUTE if scale == 0 else scale
    return jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def sinusoidal_embedding(labels: Array, dim: int, max_positions: int = MAX_POSITIONS) -> Array:
    """Sinusoidal embedding of real-valued labels.

    Args:
      labels: [B] (for the networks here: 999 t).
      dim: embedding width; odd widths get one trailing zero.
      max_positions: longest period.

    Returns:
      [B, dim]: first half sines, second half cosines.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be [B], got shape {labels.shape}")
    half = dim // 2
    if half < 2:
        raise ValueError(f"embedding width must be at least 4, got {dim}")
    log_step = math.log(max_positions) / (half - 1)
    freqs = jnp.exp(-log_step * jnp.arange(half, dtype=jnp.float32))
    angles = labels.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def time_labels(t: Array, batch: int) -> Array:
    """999 t as a [batch] vector; t may be [batch] or a scalar (as ODE solvers pass it)."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
        raise ValueError(f"t must be a scalar or have shape [{batch}], got {t.shape}")
    return TIME_SCALE * jnp.broadcast_to(t, (batch,))


def activation(name: str) -> Callable[[Array], Array]:
    """The nonlinearity called `name` (a key of ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
