"""Flow++ variational dequantizer q(u | k) of ScoreFlow (Flax linen), both official variants.

A re-implementation, written from the definitions in `../shared/reference/flowpp_dequantizer.md`
(sections 1-7; official code: score_flow `models/flowpp/`), with exactly the official parameter
tree, so that official checkpoints load unchanged (`ckpt['params_ema']` is a ready `variables`).

The flow maps Gaussian noise eps ~ N(0, I) [B, H, W, C] to dequantization noise u in (0, 1)^D,
conditioned on the integer image k through a context network that sees x - 0.5 with
x = k * float32(1 / (levels - 1)) (the official input pipeline's x = k / 255):

    eps -> split -> n x [Norm, (Pointwise,) MixLogisticAttnCoupling, flip] -> merge -> sigmoid -> u

    variant       n  Pointwise  convs                        context net       official size
    "cifar10"     4  yes        plain, official axes layout   ShallowProcessor  3,466,976
    "imagenet32"  8  no         weight-normalised, NHWC       DeepProcessor    35,482,720

* split: even / odd **columns**, [B, H, W, C] -> 2 x [B, H, W/2, C] (the official
  "CheckerboardSplit" is not a checkerboard); merge interleaves them back.
* Norm (ActNorm): y_i = x_i * g_i + b_i per half i, g_i, b_i of shape (H, W/2, C).
* Pointwise: y_i = x_i @ W_i over channels (C x C, inverted exactly with W_i^-1).
* MixLogisticAttnCoupling (cf, ef) -> (cf, ef'): a conditioner (convs, gated residual blocks
  with the context, layer norm, multi-head self-attention over the H W/2 positions with a learnt
  position embedding) outputs per element s (through tanh), t and a K-component logistic
  mixture F; then ef' = exp(s) logit(F(ef)) + t. Its inverse inverts F by bisection
  (`mixlogistic_inv_logit_cdf`).
* The official ImageNet32 flow is 2 x [split, 4 x (Norm, coupling, flip), merge]; each group has
  an even number of flips, so the middle merge + split is the identity and is left out.

`__call__(eps, k)` returns (u, log q(u | k)) per example in nats; `__call__(u, k, inverse=True)`
returns (eps_hat, log q(u | k)) with log q = log N(eps_hat; 0, I) + sum of the inverse
log-dets -- the same quantity from the other side. (The official code returns -log q forward,
and in the inverse direction subtracts log N of its *first* argument, u; neither is
reproduced.) There is no dropout: ScoreFlow trains and evaluates the dequantizer with
dropout_p = 0. Everything is float32; differentiate in reverse mode (`jax.grad`, `jax.vjp`):
on CPU the convolutions are `layers.conv_general_dilated`, whose custom VJP keeps gradients
fast inside loops but has no forward mode (`jax.jvp`, `jax.jacfwd` raise there).

Choices where the official code leaves room. None changes what a loaded checkpoint computes
beyond float32 rounding, except where the official arithmetic saturates (noted):

* **CIFAR conv layout.** The official CIFAR convs run with dimension numbers
  ('NWHC', 'HWIO', 'NWHC') on NHWC data, so kernel axis 0 slides along the width. This module
  keeps that layout: a stored kernel W is applied as the standard NHWC/HWIO conv with
  W.transpose(1, 0, 2, 3) (exactly equivalent: 3x3, SAME, stride 1 pads symmetrically). Loading
  official weights is therefore the identity, and so is saving them. ImageNet32's weight-normalised
  convs are standard NHWC, as in the official code.
* **Data-dependent init** (`init_dequantizer`, official section 7). During init, each layer sets
  its scale and bias from the statistics of its own input on the init batch, in creation order
  (context net first, then the flow in forward order), each layer seeing the already initialised
  earlier ones. Norm: g = 1 / sqrt(v + 1e-6), b = -m g per position and channel over the batch,
  so each half leaves it standardised. Plain conv / dense: W = W0 s with W0 ~ 0.05 N(0, 1),
  s = init_scale / sqrt(v + 1e-6) from the statistics of the output of W0 over (N, H, W) (rows for
  dense), and b = -mean(output of W) from **the same W** -- cleaner than the official code, whose
  bias initialiser draws its own W0, so that every initial output is exactly zero-mean with
  standard deviation init_scale sqrt(v / (v + 1e-6)). The statistics use the conv as it runs
  (official: the unswapped CIFAR orientation). Weight-normalised conv: V ~ 0.05 N(0, 1) kept,
  g and b from the output of V / |V| (as official). init_scale is 0.1 for every gated c2, every
  attention proj2 and the coupling head, 1 elsewhere. Pointwise W = I + 0.001 N(0, 1), position
  embeddings N(0, 0.01^2), layer norm g = 1, b = 0. `init_dequantizer` takes all N(0, 1) values
  from one draw (see there). The initial values are not the official ones bitwise (those also
  depend on flax's per-parameter rng); checkpoints define the weights.
* **logit F in log space.** logit F(ef) = log F - log(1 - F) and its log-det are computed from
  log F and log(1 - F) = logsumexp(log pi + log sigmoid(-z)) directly. The official
  -safe_log(1/F - 1), -safe_log(F) - safe_log(1 - F) (safe_log = log max(., 1e-7)) give the
  same values wherever F does not round to 0 or 1; where it does, they clamp (F = 1 -> 16.1) or
  become infinite (F = 0, and then NaN downstream), here they stay exact.
* **Bisection** (official: compare F(x) with y = sigmoid(target), 200 halvings of the bracket
  means -+ 200 sum exp(logscales)): the same bracket and halvings, comparing log F with log y
  for y <= 1/2 and log(1 - F) with log(1 - y) above (resolved also near 0 and 1), stopping as
  soon as no x moves -- a fixed point, the 200-step result bitwise, after ~40-60 halvings.
* Sigmoid inverse: z = log u - log1p(-u) (official -safe_log(1/u - 1), which adds the rounding
  of 1/u), with u clipped into the open interval as below.
* Norm's log-det uses the same clamp as its map, log max(g, 1e-10) (official: the map clamps
  at 1e-10 but the log-det at 1e-7; they differ only for g < 1e-7).
* u is clipped to [float32 tiny, 1 - 2^-24]: sigmoid(z) rounds to exactly 1 for z > ~16.6 (and
  to 0 below ~-103), and u is promised to lie strictly inside (0, 1). The clip moves u by at most
  6e-8 and only where sigmoid saturates; the log-det is that of the sigmoid itself.
* Layer norm computes its channel mean and variance as products with the averaging matrix, and
  parameters are read without flax's per-apply re-evaluation of their initialisers: both only
  to keep XLA compile and trace times down (see `layer_norm`, `_param`).

Each conv and dense output is also `sow`n into the 'intermediates' collection under its
parameter prefix (a no-op unless that collection is mutable, e.g. `apply(...,
mutable=['intermediates'])`), so the promises of the init can be checked.

Parameter tree (official names; flat inside each module): `ShallowProcessor_0` or
`DeepProcessor_0`, `Norm_{i}`, `Pointwise_{i}` (cifar10), `MixLogisticAttnCoupling_{i}` with
e.g. `pos_emb`, `proj_in_W` / `c1_V`, `block{j}_conv_c1_W`, `block{j}_attn_proj1_W`,
`block{blocks-1}_proj_out_W` / `block{blocks-1}_c2_V`. `MixLogisticAttnCoupling_i` transforms
the odd columns for even i and the even columns for odd i.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlscore_jax.models.layers import conv_general_dilated

Array = jax.Array
Pair = tuple[Array, Array]

VARIANTS = ("cifar10", "imagenet32")

# Clamp of the Norm scale (official).
_NORM_G_FLOOR = 1e-10
# Data-init variance floor, rsqrt(v + 1e-6) (official score_flow; the original Flow++ used 1e-8).
_INIT_VAR_EPS = 1e-6
# Layer-norm epsilon (official).
_LN_EPS = 1e-5
# Mixture log-scales are clamped from below at -7 (official).
_MIN_LOGSCALE = -7.0
# Official bisection: bracket means +- 200 * sum exp(logscales), exactly 200 halvings.
_BISECT_BRACKET = 200.0
_BISECT_ITERS = 200
# Initial kernels ~ 0.05 N(0, 1) (official); Pointwise I + 0.001 N; position embeddings 0.01 N.
_W0_STD = 0.05
_POINTWISE_STD = 0.001
_POS_EMB_STD = 0.01
# init_scale of the last layer of each residual branch and of the coupling head (official).
_SMALL_INIT = 0.1
# u is kept inside (0, 1): the smallest normal float32 and the largest float32 below 1.
_U_MIN = float(np.finfo(np.float32).tiny)
_U_MAX = float(1.0 - 2.0**-24)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Variable collection through which `init_dequantizer` hands every layer its N(0, 1) draw.
INIT_NOISE = "init_noise"


# ---------------------------------------------------------------------------------------------
# Elementwise pieces.


def concat_elu(x: Array) -> Array:
    """elu([x, -x]) on the last axis: [..., F] -> [..., 2F]."""
    return nn.elu(jnp.concatenate([x, -x], axis=-1))


def gate(c: Array) -> Array:
    """a * sigmoid(b) for c = [a, b] on the last axis: [..., 2F] -> [..., F]."""
    a, b = jnp.split(c, 2, axis=-1)
    return a * nn.sigmoid(b)


def gaussian_logpdf(x: Array) -> Array:
    """sum log N(x; 0, I) over all but the batch axis: [B, ...] -> [B]."""
    n = math.prod(x.shape[1:])
    return -0.5 * _sum_per_example(jnp.square(x)) - np.float32(n * _HALF_LOG_2PI)


def _sum_per_example(x: Array) -> Array:
    """sum over all but the batch axis, [B, ...] -> [B], summed about the mean m: n m +
    sum(x - m).

    The same value, with less rounding: a float32 sum rounds every addition relative to its
    partial sum, which for n terms of one sign grows to n |mean| (log N and the sigmoid's
    log-det: D = 3072 terms of ~-1.5, sums ~-5000 off by ~4 ulp, more where reductions
    vectorise less); centred, the partial sums stay ~sqrt(n) std. m itself may be inexact: it
    cancels (and so does its gradient, 1 per element either way).
    """
    axes = tuple(range(1, x.ndim))
    n = math.prod(x.shape[1:])
    mean = jnp.mean(x, axis=axes, keepdims=True)
    return n * mean.reshape(x.shape[:1]) + jnp.sum(x - mean, axis=axes)


def _row(v: Array, ndim: int) -> Array:
    """A [F] vector shaped to broadcast against the last axis of a rank-`ndim` array."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


# ---------------------------------------------------------------------------------------------
# Parameter-free flow layers: column split / merge, flip, sigmoid.


def checkerboard_split(x: Array) -> Pair:
    """[B, H, W, C] -> (even columns, odd columns), each [B, H, W/2, C] (official name; W even)."""
    b, h, w, c = x.shape
    if w % 2:
        raise ValueError(f"the width must be even, got shape {x.shape}")
    y = x.reshape(b, h, w // 2, 2, c)
    return y[:, :, :, 0], y[:, :, :, 1]


def checkerboard_merge(a: Array, b: Array) -> Array:
    """Inverse of `checkerboard_split`: 2 x [B, H, W/2, C] -> [B, H, W, C]."""
    n, h, w2, c = a.shape
    return jnp.stack([a, b], axis=3).reshape(n, h, 2 * w2, c)


def sigmoid_flow(x: Array, inverse: bool = False) -> tuple[Array, Array]:
    """Forward u = sigmoid(z) (clipped into (0, 1), see module docstring); inverse z = logit(u).

    Args:
      x: [B, ...]; z forward, u in (0, 1) inverse.
      inverse: direction.

    Returns:
      (output shaped like x, log|det| [B] of the direction taken).
    """
    if not inverse:
        u = jnp.clip(nn.sigmoid(x), _U_MIN, _U_MAX)
        return u, _sum_per_example(-nn.softplus(x) - nn.softplus(-x))
    # log u - log(1 - u): 1 - u is exact in float32 for u near 1, where the official
    # -safe_log(1/u - 1) adds the rounding of 1/u, relative ulp(1) / (1 - u).
    u = jnp.clip(x, _U_MIN, _U_MAX)
    log_u, log_1mu = jnp.log(u), jnp.log1p(-u)
    return log_u - log_1mu, _sum_per_example(-log_u - log_1mu)


# ---------------------------------------------------------------------------------------------
# Mixture of logistics: CDF, log-density, and the official bisection inverse.
# Arguments: x [...], logits / means / logscales [..., K].


def _mix_prep(logits: Array, means: Array, logscales: Array) -> tuple[Array, Array, Array]:
    """(log pi, means, exp(-l)) with l = max(logscales, -7): what F needs besides x."""
    inv_scale = jnp.exp(-jnp.maximum(logscales, _MIN_LOGSCALE))
    return jax.nn.log_softmax(logits, axis=-1), means, inv_scale


def _mix_log_cdfs(x: Array, log_pi: Array, means: Array, inv_scale: Array) -> tuple[Array, Array]:
    """(log F(x), log(1 - F(x))), each [...], both from log-sigmoids: 1 - sigmoid(z) =
    sigmoid(-z) and log sigmoid(-z) = log sigmoid(z) - z, so neither saturates or cancels."""
    z = (x[..., None] - means) * inv_scale
    log_sig = jax.nn.log_sigmoid(z)
    return (
        jax.nn.logsumexp(log_pi + log_sig, axis=-1),
        jax.nn.logsumexp(log_pi + log_sig - z, axis=-1),
    )


def mixlogistic_cdf(x: Array, logits: Array, means: Array, logscales: Array) -> Array:
    """F(x) = sum_k pi_k sigmoid((x - mu_k) exp(-l_k)), l_k = max(logscales_k, -7): [...].

    Computed as the official exp(logsumexp(log pi + log sigmoid(z))).
    """
    return jnp.exp(_mix_log_cdfs(x, *_mix_prep(logits, means, logscales))[0])


def mixlogistic_logpdf(x: Array, logits: Array, means: Array, logscales: Array) -> Array:
    """log F'(x) = log sum_k pi_k p_k(x), log p_k = z_k - l_k - 2 softplus(z_k): [...]."""
    logscales = jnp.maximum(logscales, _MIN_LOGSCALE)
    z = (x[..., None] - means) * jnp.exp(-logscales)
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    return jax.nn.logsumexp(log_pi + z - logscales - 2.0 * nn.softplus(z), axis=-1)


def mixlogistic_inv_logit_cdf(
    target: Array, logits: Array, means: Array, logscales: Array, iters: int = _BISECT_ITERS
) -> Array:
    """x with logit F(x) = target, by the official bisection: [...].

    The bracket is [min_k mu_k - 200 S, max_k mu_k + 200 S] with S = sum_k exp(l_k) (every
    component is below sigmoid(-200) ~ 0 at its left end and above 1 - sigmoid(-200) at its
    right end); starting from x = 0, if F(x) > y the upper end moves to x, else the lower one,
    and x goes to the middle of the new bracket. After the official 200 halvings the bracket
    has shrunk to float32 spacing: x is then limited only by the rounding of the comparison,
    |dx| ~ ulp / (logit F)'(x). The official code compares F(x) with y = sigmoid(target),
    which loses targets near 1 (and 0) to rounding; here targets y <= 1/2 compare log F(x) with
    log y and targets y > 1/2 compare log(1 - F(x)) with log(1 - y), both -softplus(|target|):
    the same decisions, resolved on both sides, at one logsumexp per step.

    The loop stops early once no x moves: then each bracket is down to adjacent floats and x
    is a fixed point of the step, so the result is that of all `iters` steps (bitwise), reached
    after ~40-60 halvings instead of 200.
    """
    log_pi, means, inv_scale = _mix_prep(logits, means, logscales)  # loop invariants
    spread = _BISECT_BRACKET * jnp.sum(1.0 / inv_scale, axis=-1, keepdims=True)
    lb = jnp.min(means - spread, axis=-1)
    ub = jnp.max(means + spread, axis=-1)
    upper = target > 0  # compare the upper tail, log(1 - F)
    threshold = -nn.softplus(jnp.abs(target))  # log y or log(1 - y)
    tail_shift = jnp.where(upper, 1.0, 0.0)[..., None]

    def step(carry):
        i, x, lb, ub, _ = carry
        z = (x[..., None] - means) * inv_scale
        # log sigmoid(z) for F, log sigmoid(-z) = log sigmoid(z) - z for 1 - F
        log_tail = jax.nn.logsumexp(log_pi + jax.nn.log_sigmoid(z) - tail_shift * z, axis=-1)
        above = jnp.where(upper, log_tail < threshold, log_tail > threshold)  # F(x) > y
        new_x = jnp.where(above, 0.5 * (x + lb), 0.5 * (x + ub))
        lb, ub = jnp.where(above, lb, x), jnp.where(above, x, ub)
        return i + 1, new_x, lb, ub, jnp.any(new_x != x)

    def keep_going(carry):
        i, *_, moved = carry
        return (i < iters) & moved

    x = jnp.zeros_like(target)
    _, x, _, _, _ = jax.lax.while_loop(keep_going, step, (0, x, lb, ub, jnp.array(True)))
    return x


def mixlogistic_invcdf(
    y: Array, logits: Array, means: Array, logscales: Array, iters: int = _BISECT_ITERS
) -> Array:
    """x with F(x) = y, y clipped to [0, 1] (as official), by bisection
    (`mixlogistic_inv_logit_cdf` of logit y; y = 0 and 1 go to the ends of the bracket): [...].
    """
    y = jnp.clip(y, 0.0, 1.0)
    return mixlogistic_inv_logit_cdf(jnp.log(y) - jnp.log1p(-y), logits, means, logscales, iters)


# ---------------------------------------------------------------------------------------------
# Layers with flat, officially named parameters, created on a parent module `m` (so that a
# conditioner's parameters sit side by side as `block0_conv_c1_W`, ...). Each one initialises
# itself from its input during `init` (module docstring).


def _param(m: nn.Module, name: str, shape: tuple[int, ...], init: Callable[[Array], Array]):
    """The parameter `name` of module m: created by init(key) if absent (during `init`; the
    data-dependent initialisers close over the layer's input), else read and its shape checked.

    (Reading it directly rather than through `m.param` skips flax's check, which re-runs the
    initialiser abstractly, `jax.eval_shape`, for every parameter at every apply: one more
    trace per parameter -- 1164 of them at ImageNet32's full size -- in every traced call.)
    """
    if not m.has_variable("params", name):
        return m.param(name, init)
    value = m.get_variable("params", name)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"parameter {m.scope.path_text}/{name} has shape {tuple(value.shape)}, the module "
            f"expects {tuple(shape)} (another configuration or input size?)"
        )
    return value


def _standard_normal(m: nn.Module, name: str, key: Array, shape: tuple[int, ...]) -> Array:
    """N(0, 1) values for the initial value of parameter `name`: its slice of the one draw that
    `init_dequantizer` provides in the INIT_NOISE collection, else a draw of its own."""
    if m.has_variable(INIT_NOISE, name):
        return m.get_variable(INIT_NOISE, name)
    return jax.random.normal(key, shape, jnp.float32)


def _std_scale(y: Array, axes: tuple[int, ...], init_scale: float) -> Array:
    """init_scale / sqrt(var + 1e-6) over `axes`: the scale that standardises y."""
    return init_scale * jax.lax.rsqrt(jnp.var(y, axis=axes) + _INIT_VAR_EPS)


def _conv3x3(x: Array, w: Array) -> Array:
    """3x3, SAME, stride 1 NHWC/HWIO conv [B, H, W, I] -> [B, H, W, O].

    On CPU via `layers.conv_general_dilated` (same values; canonical convolutions also in the
    gradients, which keeps them fast inside loops: see layers.py).
    """
    conv = conv_general_dilated if jax.default_backend() == "cpu" else jax.lax.conv_general_dilated
    return conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _swapped(w: Array) -> Array:
    """Official CIFAR kernel (axis 0 slides along the width) -> standard HWIO kernel."""
    return jnp.transpose(w, (1, 0, 2, 3))


def dense(m: nn.Module, name: str, x: Array, features: int, init_scale: float = 1.0) -> Array:
    """x @ W + b on the last axis ("nin"), params `{name}_W` [F_in, features], `{name}_b`."""
    shape = (x.shape[-1], features)

    def init_w(key):
        w0 = _W0_STD * _standard_normal(m, f"{name}_W", key, shape)
        y0 = (x @ w0).reshape(-1, features)
        return w0 * _row(_std_scale(y0, (0,), init_scale), 2)

    w = _param(m, f"{name}_W", shape, init_w)
    y = x @ w
    b = _param(m, f"{name}_b", (features,), lambda _: -jnp.mean(y.reshape(-1, features), axis=0))
    y = y + _row(b, y.ndim)
    m.sow("intermediates", name, y)
    return y


def conv(m: nn.Module, name: str, x: Array, features: int, init_scale: float = 1.0) -> Array:
    """Plain 3x3 conv of the CIFAR variant, official swapped-axes kernel `{name}_W`, `{name}_b`."""
    shape = (3, 3, x.shape[-1], features)

    def init_w(key):
        w0 = _W0_STD * _standard_normal(m, f"{name}_W", key, shape)
        y0 = _conv3x3(x, _swapped(w0))
        return w0 * _row(_std_scale(y0, (0, 1, 2), init_scale), 4)

    w = _param(m, f"{name}_W", shape, init_w)
    y = _conv3x3(x, _swapped(w))
    b = _param(m, f"{name}_b", (features,), lambda _: -jnp.mean(y, axis=(0, 1, 2)))
    y = y + _row(b, 4)
    m.sow("intermediates", name, y)
    return y


def wn_conv(m: nn.Module, name: str, x: Array, features: int, init_scale: float = 1.0) -> Array:
    """Weight-normalised 3x3 NHWC conv of ImageNet32: W = g V / |V|, `{name}_V`, `_g`, `_b`."""
    shape = (3, 3, x.shape[-1], features)
    v = _param(
        m, f"{name}_V", shape, lambda k: _W0_STD * _standard_normal(m, f"{name}_V", k, shape)
    )
    sq = jnp.sum(jnp.square(v), axis=(0, 1, 2))
    v_hat = v * _row(jax.lax.rsqrt(jnp.maximum(sq, 1e-12)), 4)  # unit norm per output channel
    y_hat = _conv3x3(x, v_hat)
    g = _param(m, f"{name}_g", (features,), lambda _: _std_scale(y_hat, (0, 1, 2), init_scale))
    y = y_hat * _row(g, 4)
    b = _param(m, f"{name}_b", (features,), lambda _: -jnp.mean(y, axis=(0, 1, 2)))
    y = y + _row(b, 4)
    m.sow("intermediates", name, y)
    return y


def layer_norm(m: nn.Module, name: str, x: Array) -> Array:
    """(x - mean) rsqrt(var + 1e-5) g + b over channels; `{name}_g`, `{name}_b` (1, 1, 1, F)."""
    f = x.shape[-1]
    shape = (1, 1, 1, f)
    g = _param(m, f"{name}_g", shape, lambda _: jnp.ones(shape, jnp.float32))
    b = _param(m, f"{name}_b", shape, lambda _: jnp.zeros(shape, jnp.float32))
    # Channel means as products with the averaging matrix J / F (so already broadcast to
    # [..., F]), not reductions: XLA:CPU fuses a reduction's cheap elementwise producers into it,
    # and through the residual paths those are all the earlier layer norms, recomputed in every
    # later one -- code size and compile time quadratic in depth (32 layer norms in a row
    # compiled ~10x slower than as products). A matmul is a fusion boundary. HIGHEST: full
    # float32 also where matmuls default to lower precision (TF32 on recent GPUs).
    avg = jnp.full((f, f), 1.0 / f, jnp.float32)
    mu = jnp.matmul(x, avg, precision=jax.lax.Precision.HIGHEST)
    var = jnp.matmul(jnp.square(x - mu), avg, precision=jax.lax.Precision.HIGHEST)
    return (x - mu) * jax.lax.rsqrt(var + _LN_EPS) * g + b


def gated_residual(
    m: nn.Module,
    name: str,
    x: Array,
    context: Array | None,
    use_nin: bool,
    weight_norm: bool,
) -> Array:
    """x + gate(c2(concat_elu(c1(concat_elu(x)) [+ a_proj(concat_elu(context))]))).

    The official gated_conv (CIFAR, plain convs) and gated_resnet (ImageNet32, weight-normalised
    convs); dense layers are plain in both. c1: 3x3 conv 2F -> F; a_proj: dense -> F; c2: dense
    (use_nin) or 3x3 conv 2F -> 2F with init_scale 0.1. x [B, H, W, F] -> [B, H, W, F].
    """
    f = x.shape[-1]
    conv_fn = wn_conv if weight_norm else conv
    c = conv_fn(m, f"{name}_c1", concat_elu(x), f)
    if context is not None:
        c = c + dense(m, f"{name}_a_proj", concat_elu(context), f)
    c = concat_elu(c)
    c2_fn = dense if use_nin else conv_fn
    c = c2_fn(m, f"{name}_c2", c, 2 * f, init_scale=_SMALL_INIT)
    return x + gate(c)


def gated_attention(m: nn.Module, name: str, x: Array, pos_emb: Array, heads: int) -> Array:
    """x + gate(proj2(MHA(proj1(x + pos_emb)))): self-attention over all H W positions.

    proj1 channels are ordered (q/k/v, head, dim); scores q.k / sqrt(F / heads), softmax over
    every key position. x [B, H, W, F], pos_emb [H, W, F] -> [B, H, W, F].
    """
    b, h, w, f = x.shape
    if f % heads:
        raise ValueError(f"{f} channels do not split into {heads} heads")
    d = f // heads
    qkv = dense(m, f"{name}_proj1", x + pos_emb[None], 3 * f)
    qkv = qkv.reshape(b, h * w, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, heads, d]
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    attn = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)
    out = dense(m, f"{name}_proj2", attn.reshape(b, h, w, f), 2 * f, init_scale=_SMALL_INIT)
    return x + gate(out)


def _pos_emb(m: nn.Module, name: str, shape: tuple[int, ...]) -> Array:
    return _param(m, name, shape, lambda k: _POS_EMB_STD * _standard_normal(m, name, k, shape))


# ---------------------------------------------------------------------------------------------
# Context networks: the integer image, seen once, as a feature map every coupling reads.


class ShallowProcessor(nn.Module):
    """CIFAR context: proj (3x3 conv 2C -> channels), then 3 gated convs `c0..c2` (3x3 c2).

    x: [B, H, W/2, 2C] (the split halves of x - 0.5 side by side) -> [B, H, W/2, channels].
    """

    channels: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv(self, "proj", x, self.channels)
        for i in range(3):
            h = gated_residual(self, f"c{i}", h, None, use_nin=False, weight_norm=False)
        return h


class DeepProcessor(nn.Module):
    """ImageNet32 context: proj (WN conv), then `blocks` x [gated resnet `c{i}` (WN convs),
    layer norm `dqln{i}`, attention `dqattn{i}` (shared `pos_emb_dq`), layer norm `ln{i}`].

    x: [B, H, W/2, 2C] -> [B, H, W/2, channels].
    """

    channels: int = 32
    blocks: int = 8
    heads: int = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, h_, w_, _ = x.shape
        h = wn_conv(self, "proj", x, self.channels)
        pos_emb = _pos_emb(self, "pos_emb_dq", (h_, w_, self.channels))
        for i in range(self.blocks):
            h = gated_residual(self, f"c{i}", h, None, use_nin=False, weight_norm=True)
            h = layer_norm(self, f"dqln{i}", h)
            h = gated_attention(self, f"dqattn{i}", h, pos_emb, self.heads)
            h = layer_norm(self, f"ln{i}", h)
        return h


# ---------------------------------------------------------------------------------------------
# Flow layers on pairs of halves: (x0, x1) -> ((y0, y1), log|det| [B]).


class Norm(nn.Module):
    """ActNorm per half i: y_i = x_i max(g_i, 1e-10) + b_i; `norm{i}_g`, `norm{i}_b` (H, W/2, C).

    Data init: g_i = 1 / sqrt(v + 1e-6), b_i = -m g_i from the batch mean m and variance v per
    position and channel, so that the init batch leaves standardised.
    """

    @nn.compact
    def __call__(self, xs: Pair, inverse: bool = False) -> tuple[Pair, Array]:
        if inverse and self.is_initializing():
            raise ValueError("initialise in the forward direction")
        out, logdet = [], 0.0
        for i, x in enumerate(xs):
            g = _param(self, f"norm{i}_g", x.shape[1:], lambda _, x=x: _std_scale(x, (0,), 1.0))
            # the init g is the unclamped 1 / std, so b standardises exactly
            b = _param(self, f"norm{i}_b", x.shape[1:], lambda _, x=x, g=g: -jnp.mean(x, 0) * g)
            g = jnp.maximum(g, _NORM_G_FLOOR)
            out.append((x - b[None]) / g[None] if inverse else x * g[None] + b[None])
            logdet = logdet + jnp.sum(jnp.log(g))
        logdet = jnp.broadcast_to(-logdet if inverse else logdet, xs[0].shape[:1])
        return (out[0], out[1]), logdet


class Pointwise(nn.Module):
    """Invertible 1x1 conv per half i: y_i = x_i @ W_i over channels; `W{i}` [C, C].

    log|det| = H (W/2) log|det W_i| per half; init W_i = I + 0.001 N(0, 1).
    """

    @nn.compact
    def __call__(self, xs: Pair, inverse: bool = False) -> tuple[Pair, Array]:
        if inverse and self.is_initializing():
            raise ValueError("initialise in the forward direction")
        out, logdet = [], 0.0
        for i, x in enumerate(xs):
            c = x.shape[-1]
            w = _param(
                self,
                f"W{i}",
                (c, c),
                lambda k, c=c, i=i: (
                    jnp.eye(c, dtype=jnp.float32)
                    + _POINTWISE_STD * _standard_normal(self, f"W{i}", k, (c, c))
                ),
            )
            out.append(x @ jnp.linalg.inv(w) if inverse else x @ w)
            logdet = logdet + math.prod(x.shape[1:3]) * jnp.linalg.slogdet(w)[1]
        logdet = jnp.broadcast_to(-logdet if inverse else logdet, xs[0].shape[:1])
        return (out[0], out[1]), logdet


class MixLogisticAttnCoupling(nn.Module):
    """(cf, ef) -> (cf, exp(s) logit(MixLogCDF(ef)) + t), everything else a function of cf and
    the context.

    Conditioner (cifar10): proj_in (conv C -> F); `blocks` x [gated conv with the context
    (dense c2), ln1, attention with `pos_emb`, ln2]; `block{blocks-1}_proj_out` (conv F ->
    C (2 + 3K), init_scale 0.1). imagenet32: `c1` (WN conv) instead of proj_in, WN c1 in the
    gated resnets, and concat_elu then `block{blocks-1}_c2` (WN conv 2F -> C (2 + 3K)) as the head.
    The head is grouped per data channel: [s, t, K logits, K means, K log-scales], s -> tanh s.

    Args (call): xs = (cf, ef), each [B, H, W/2, C]; context [B, H, W/2, Cc]; inverse.
    Returns ((cf, ef'), log|det| [B]).
    """

    variant: str = "cifar10"
    filters: int = 96
    components: int = 32
    blocks: int = 2
    heads: int = 4

    def _conditioner(self, cf: Array, context: Array):
        b, h_, w_, c = cf.shape
        f, k = self.filters, self.components
        cifar = self.variant == "cifar10"
        pos_emb = _pos_emb(self, "pos_emb", (h_, w_, f))
        h = conv(self, "proj_in", cf, f) if cifar else wn_conv(self, "c1", cf, f)
        for i in range(self.blocks):
            h = gated_residual(
                self, f"block{i}_conv", h, context, use_nin=True, weight_norm=not cifar
            )
            h = layer_norm(self, f"block{i}_ln1", h)
            h = gated_attention(self, f"block{i}_attn", h, pos_emb, self.heads)
            h = layer_norm(self, f"block{i}_ln2", h)
        last = f"block{self.blocks - 1}"  # the official name reuses the last loop index
        width = c * (2 + 3 * k)
        if cifar:
            out = conv(self, f"{last}_proj_out", h, width, init_scale=_SMALL_INIT)
        else:
            out = wn_conv(self, f"{last}_c2", concat_elu(h), width, init_scale=_SMALL_INIT)
        out = out.reshape(b, h_, w_, c, 2 + 3 * k)
        s = jnp.tanh(out[..., 0])
        t = out[..., 1]
        mixture = (out[..., 2 : 2 + k], out[..., 2 + k : 2 + 2 * k], out[..., 2 + 2 * k :])
        return s, t, mixture

    @nn.compact
    def __call__(self, xs: Pair, context: Array, inverse: bool = False) -> tuple[Pair, Array]:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if inverse and self.is_initializing():
            raise ValueError("initialise in the forward direction")
        cf, ef = xs
        s, t, mixture = self._conditioner(cf, context)
        if not inverse:
            # logit(F(ef)) and its log-det from log F and log(1 - F) directly (the official
            # -safe_log(1/F - 1), -safe_log(F) - safe_log(1 - F): the same values wherever F
            # does not round to 0 or 1, where those clamp or become infinite).
            log_f, log_1mf = _mix_log_cdfs(ef, *_mix_prep(*mixture))
            y = jnp.exp(s) * (log_f - log_1mf) + t
            logdet = mixlogistic_logpdf(ef, *mixture) - log_f - log_1mf + s
            return (cf, y), _sum_per_example(logdet)
        h2 = (ef - t) * jnp.exp(-s)
        x = mixlogistic_inv_logit_cdf(h2, *mixture)
        # sigmoid's log-det at h2 (log F + log(1 - F) there), then the mixture CDF's inverse.
        logdet = -s - nn.softplus(h2) - nn.softplus(-h2) - mixlogistic_logpdf(x, *mixture)
        return (cf, x), _sum_per_example(logdet)


# ---------------------------------------------------------------------------------------------
# The dequantizer.


class FlowppDequantizer(nn.Module):
    """q(u | k): Flow++ dequantization noise u in (0, 1)^D given an integer image k.

    Attributes:
      variant: "cifar10" (4 x [Norm, Pointwise, coupling], plain convs in the official
        swapped-axes layout, ShallowProcessor) or "imagenet32" (8 x [Norm, coupling],
        weight-normalised convs, DeepProcessor).
      levels: integer levels of the data; the context sees k * float32(1 / (levels - 1)) - 0.5.
      filters, components, blocks, heads: width F, mixture components K, blocks and attention
        heads of each coupling (official defaults: `cifar10_dequantizer`,
        `imagenet32_dequantizer`).
      context_channels: channels of the context net (official: 32 in both variants).
      context_blocks, context_heads: DeepProcessor blocks and heads (official 8 and 4; unused by
        the ShallowProcessor, which always has 3 gated convs).

    No dropout (ScoreFlow runs the dequantizer with dropout_p = 0). Any H and even W; Norm and
    position-embedding shapes follow the input (H, W/2, .).
    """

    variant: str = "cifar10"
    levels: int = 256
    filters: int = 96
    components: int = 32
    blocks: int = 2
    heads: int = 4
    context_channels: int = 32
    context_blocks: int = 8
    context_heads: int = 4

    @nn.compact
    def __call__(self, eps: Array, k: Array, inverse: bool = False) -> tuple[Array, Array]:
        """Forward: eps [B, H, W, C] ~ N(0, I), k [B, H, W, C] integers in [0, levels) ->
        (u [B, H, W, C] in (0, 1), log q(u | k) [B] in nats).

        Inverse (inverse=True): the first argument is u -> (eps_hat, log q(u | k) [B]) with
        log q = log N(eps_hat; 0, I) + sum of the inverse log-dets.
        """
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if eps.ndim != 4 or eps.shape != k.shape:
            raise ValueError(f"eps and k must both be [B, H, W, C], got {eps.shape}, {k.shape}")
        if inverse and self.is_initializing():
            raise ValueError("initialise in the forward direction")
        cifar = self.variant == "cifar10"
        eps = eps.astype(jnp.float32)

        x = k.astype(jnp.float32) * np.float32(1.0 / (self.levels - 1)) - 0.5
        context_in = jnp.concatenate(checkerboard_split(x), axis=-1)
        if cifar:
            context = ShallowProcessor(self.context_channels, name="ShallowProcessor_0")(context_in)
        else:
            context = DeepProcessor(
                self.context_channels,
                self.context_blocks,
                self.context_heads,
                name="DeepProcessor_0",
            )(context_in)

        # Each step: Norm, (Pointwise,) coupling, then the halves swap.
        steps = []
        for i in range(4 if cifar else 8):
            layers = [Norm(name=f"Norm_{i}")]
            if cifar:
                layers.append(Pointwise(name=f"Pointwise_{i}"))
            coupling = MixLogisticAttnCoupling(
                self.variant,
                self.filters,
                self.components,
                self.blocks,
                self.heads,
                name=f"MixLogisticAttnCoupling_{i}",
            )
            layers.append(lambda xs, inverse, c=coupling: c(xs, context, inverse))
            steps.append(layers)

        if not inverse:
            xs, logdet = checkerboard_split(eps), 0.0
            for layers in steps:
                for layer in layers:
                    xs, ld = layer(xs, inverse=False)
                    logdet = logdet + ld
                xs = (xs[1], xs[0])
            u, ld = sigmoid_flow(checkerboard_merge(*xs))
            return u, gaussian_logpdf(eps) - (logdet + ld)

        z, logdet = sigmoid_flow(eps, inverse=True)
        xs = checkerboard_split(z)
        for layers in reversed(steps):
            xs = (xs[1], xs[0])
            for layer in reversed(layers):
                xs, ld = layer(xs, inverse=True)
                logdet = logdet + ld
        eps_hat = checkerboard_merge(*xs)
        return eps_hat, gaussian_logpdf(eps_hat) + logdet


def cifar10_dequantizer(**overrides: Any) -> FlowppDequantizer:
    """The official CIFAR-10 dequantizer (filters 96, K 32, 2 blocks, 4 heads): 3,466,976
    parameters at 32x32x3. Keyword arguments override any attribute."""
    kwargs = dict(variant="cifar10", filters=96, components=32, blocks=2, heads=4)
    return FlowppDequantizer(**{**kwargs, **overrides})


def imagenet32_dequantizer(**overrides: Any) -> FlowppDequantizer:
    """The official ImageNet32 dequantizer (filters 128, K 32, 8 blocks, 4 heads): 35,482,720
    parameters at 32x32x3. Keyword arguments override any attribute."""
    kwargs = dict(variant="imagenet32", filters=128, components=32, blocks=8, heads=4)
    return FlowppDequantizer(**{**kwargs, **overrides})


DEQUANTIZERS: dict[str, Callable[..., FlowppDequantizer]] = {
    "flowpp_cifar10": cifar10_dequantizer,
    "flowpp_imagenet32": imagenet32_dequantizer,
}


def init_dequantizer(
    module: FlowppDequantizer, key: Array, k_batch: Array, eps_batch: Array | None = None
) -> dict:
    """Data-dependent initialisation on a first batch (module docstring): {'params': ...}.

    The same as `module.init({'params': ...}, eps_batch, k_batch)`, except that the random
    initial values (the 0.05 N(0, 1) kernels, position embeddings, Pointwise perturbations)
    are slices of one N(0, 1) draw over the whole parameter tree, handed to the layers through
    the INIT_NOISE collection: on XLA:CPU every random draw compiles to kernels of its own
    (~0.15 s each, hundreds in a flow), one draw compiles once.

    Args:
      module: the dequantizer.
      key: PRNG key; without eps_batch, eps ~ N(0, I) is drawn from a key split off it.
      k_batch: [B, H, W, C] integer images (the official code uses its first training batch).
      eps_batch: optional [B, H, W, C] noise.

    Deterministic given (key, data) and jit-able (module static: `jax.jit(init_dequantizer,
    static_argnums=0)`).
    """
    param_key, eps_key, noise_key = jax.random.split(key, 3)
    if eps_batch is None:
        eps_batch = jax.random.normal(eps_key, k_batch.shape, jnp.float32)
    shapes = jax.eval_shape(lambda: module.init({"params": param_key}, eps_batch, k_batch))
    leaves, treedef = jax.tree.flatten(shapes["params"])
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    draw = jax.random.normal(noise_key, (sum(sizes),), jnp.float32)
    ends = np.cumsum(sizes)
    noise = treedef.unflatten(
        [
            draw[end - n : end].reshape(leaf.shape)
            for leaf, n, end in zip(leaves, sizes, ends, strict=True)
        ]
    )
    _, variables = module.apply(
        {INIT_NOISE: noise}, eps_batch, k_batch, rngs={"params": param_key}, mutable=["params"]
    )
    return {"params": variables["params"]}
