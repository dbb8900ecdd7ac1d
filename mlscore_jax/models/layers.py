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

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

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


# ---------------------------------------------------------------------------------------------
# Convolutions whose gradients stay fast inside loops on XLA:CPU.
#
# XLA:CPU rewrites a convolution that is not NHWC x HWIO -> NHWC into transposes plus an
# NHWC/HWIO one (the ConvCanonicalization pass), but only in the entry computation. JAX's
# transpose rules emit non-canonical convolutions for the gradients (input gradient: I/O swapped
# in the dimension numbers; filter gradient: batch as the contracted dimension), so inside a
# while loop (lax.scan, fori_loop, diffrax.diffeqsolve) they run as naive loops: ~3x slower for
# the input VJP of the probability-flow ODE, ~25x for parameter gradients (jax-ml/jax#12868;
# experiments/bench_cpu_loops.py measures it). `nhwc_conv` below is the same forward
# convolution with a custom VJP that writes those transposes explicitly, so every convolution
# it emits is canonical wherever it sits.

# `nhwc_conv` has a custom VJP, so it cannot be pushed forward (jax.jvp); functions traced inside
# `forward_mode_convs()` use lax's own convolution instead, whose JVP is the same canonical
# forward convolution applied to the tangent (fast in loops too). The flag is read when a network
# is traced, not when it runs.
_FORWARD_MODE = [False]


@contextlib.contextmanager
def forward_mode_convs() -> Iterator[None]:
    """Trace the networks' convolutions as plain `lax.conv_general_dilated` (forward-mode AD)."""
    previous = _FORWARD_MODE[0]
    _FORWARD_MODE[0] = True
    try:
        yield
    finally:
        _FORWARD_MODE[0] = previous


_NHWC = ("NHWC", "HWIO", "NHWC")
_NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # the same, as dimension indices


def _conv_nhwc(x, w, strides, padding, lhs_dilation, rhs_dilation):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers=_NHWC
    )


def _dilated(size: int, dilation: int) -> int:
    return 0 if size == 0 else (size - 1) * dilation + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def nhwc_conv(x, w, strides, padding, lhs_dilation, rhs_dilation):
    """2-D convolution, x [N, H, W, Ci] * w [kh, kw, Ci, Co] -> [N, H', W', Co].

    strides, lhs_dilation, rhs_dilation: 2-tuples of ints; padding: ((lo, hi), (lo, hi)).
    Same values as `lax.conv_general_dilated`; its VJP uses only NHWC x HWIO -> NHWC
    convolutions (see above).
    """
    return _conv_nhwc(x, w, strides, padding, lhs_dilation, rhs_dilation)


def _nhwc_conv_fwd(x, w, strides, padding, lhs_dilation, rhs_dilation):
    return _conv_nhwc(x, w, strides, padding, lhs_dilation, rhs_dilation), (x, w)


def _nhwc_conv_bwd(strides, padding, lhs_dilation, rhs_dilation, res, g):
    x, w = res
    pad_x, pad_w = [], []
    for d in range(2):
        x_d = _dilated(x.shape[1 + d], lhs_dilation[d])
        k_d = _dilated(w.shape[d], rhs_dilation[d])
        g_d = _dilated(g.shape[1 + d], strides[d])
        lo = padding[d][0]
        before = k_d - lo - 1
        pad_x.append((before, x_d + k_d - 1 - g_d - before))
        pad_w.append((lo, (g_d - x_d) + (k_d - lo - 1)))
    # dx: g (dilated by the strides) convolved with the flipped kernel, I and O swapped.
    w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
    dx = _conv_nhwc(g, w_t, lhs_dilation, pad_x, strides, rhs_dilation)
    # dw: the batch is contracted. x -> [Ci, H, W, N] read as NHWC, g -> [H', W', N, Co] read as
    # HWIO; the result [Ci, kh, kw, Co] is transposed to HWIO.
    dw = _conv_nhwc(
        jnp.transpose(x, (3, 1, 2, 0)),
        jnp.transpose(g, (1, 2, 0, 3)),
        rhs_dilation,
        pad_w,
        lhs_dilation,
        strides,
    )
    return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


nhwc_conv.defvjp(_nhwc_conv_fwd, _nhwc_conv_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated` with loop-friendly gradients for plain 2-D NHWC convolutions
    (flax `nn.Conv(conv_general_dilated=...)`); anything else goes to lax unchanged."""
    plain = (
        lhs.ndim == 4
        and dimension_numbers is not None
        and tuple(
            map(tuple, jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers))
        )
        == _NHWC_SPECS
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and not _FORWARD_MODE[0]
    )
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    lhs_dilation = tuple(lhs_dilation or (1, 1))
    rhs_dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(
            [_dilated(s, d) for s, d in zip(lhs.shape[1:3], lhs_dilation, strict=True)],
            [_dilated(s, d) for s, d in zip(rhs.shape[:2], rhs_dilation, strict=True)],
            window_strides,
            padding,
        )
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return nhwc_conv(lhs, rhs, tuple(window_strides), padding, lhs_dilation, rhs_dilation)
