"""DDPM++ (continuous), the NCSN++-family U-Net that every ScoreFlow config trains.

It is the official `NCSNpp` module (score_flow `models/ncsnpp.py`, `layerspp.py`) restricted to the
settings of the paper's configs (`../shared/reference/scoreflow.md` sections 1.12 and 3.2):
resblock_type='biggan', progressive='none', progressive_input='none', fir=False,
embedding_type='positional', attention_type='ddpm', conditional=True, scale_by_sigma=False,
skip_rescale=True, centred input. Written from what that code computes, not copied from it.

Layout for ch_mult of length L (level l has nf * ch_mult[l] channels and resolution H / 2^l):

    temb  = Dense_1(act(Dense_0(sinusoidal(999 t, nf))))                      [B, 4 nf]
    h     = Conv_0(x)                                                          3x3, nf channels
    down: per level, num_res_blocks x (ResBlock, then Attn if H/2^l in attn_resolutions);
          between levels a ResBlock(down=True); every output is kept as a skip
    mid:  ResBlock, Attn, ResBlock
    up:   per level (reversed), (num_res_blocks + 1) x ResBlock(concat(h, skip)); then Attn if
          at an attention resolution; between levels a ResBlock(up=True)
    out   = Conv_1(act(GroupNorm_0(h)))                                        3x3, C channels

ResBlock (BigGAN-style, `ResnetBlockBigGANpp`):
    h = act(GroupNorm_0(x)); [nearest 2x up or 2x2 mean-pool down of both h and x]
    h = Conv_0(h) + Dense_0(act(temb)); h = act(GroupNorm_1(h)); h = Dropout(h)
    h = Conv_1(h)                                  <- init_scale (tiny at init)
    x = Conv_2(x) (1x1) if the channels change or it resamples
    return (x + h) / sqrt(2)

Attn (`AttnBlockpp`): single-head self-attention over the H W positions with 1x1 projections
NIN_0..2 (q, k, v) and output NIN_3 (init_scale), then (x + h) / sqrt(2).

Resampling: with BigGAN blocks the official `resamp_with_conv=True` has no effect (its
Upsample/Downsample modules are only used by 'ddpm' blocks). Resampling happens inside the
up/down ResBlocks, parameter-free (nearest neighbour / 2x2 average), followed by the block's 3x3
convolution and the 1x1 convolution on the skip path.

Initialisation: every kernel is `default_init(1)` except the last convolution of each ResBlock,
the attention output NIN_3 and the output Conv_1, which use `default_init(init_scale)`; with the
paper's init_scale = 0 that is variance scale 1e-10, not 0. All biases start at zero, GroupNorm
scales at one. So at initialisation each residual branch and the network output are tiny
(~1e-5), not exactly zero.

Parameter names: the tree mirrors the official one exactly (flat, auto-numbered in call order:
Dense_0, Dense_1, Conv_0, ResnetBlockBigGANpp_0.., AttnBlockpp_0.., GroupNorm_0, Conv_1; inside
the blocks GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2 and GroupNorm_0, NIN_0..3
with parameters W [C_in, C_out], b), so released checkpoints map one-to-one.
`tests/fixtures/ddpmpp_cifar10_params.txt` lists every path and shape of the CIFAR-10 config.
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlscore_jax.models.layers import (
    activation,
    conv_general_dilated,
    default_init,
    sinusoidal_embedding,
    time_labels,
)

Array = jax.Array

_SQRT2 = math.sqrt(2.0)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups, as in the official network."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32))


def _conv(features: int, size: int, init_scale: float = 1.0, cpu_grads: bool = True) -> nn.Conv:
    """size x size convolution, SAME padding, DDPM kernel init, zero bias.

    With cpu_grads, on CPU its gradients go through `layers.conv_general_dilated` (same values,
    canonical convolutions, fast inside loops such as the ODE solver's: see layers.py);
    elsewhere, or without cpu_grads, lax's own.
    """
    return nn.Conv(
        features,
        (size, size),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        conv_general_dilated=(
            conv_general_dilated if cpu_grads and jax.default_backend() == "cpu" else None
        ),
    )


def upsample_nearest(x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_mean(x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C], mean over 2x2 blocks."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class NIN(nn.Module):
    """Per-position linear map over channels: [..., C_in] -> [..., features] (params W, b)."""

    features: int
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.features))
        b = self.param("b", nn.initializers.zeros, (self.features,))
        y = jnp.einsum("...c,cd->...d", x, w)
        return y + b.reshape((1,) * (y.ndim - 1) + (-1,))  # explicit rank: no implicit promotion


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block with time conditioning; [B, H, W, C] -> [B, H', W', out_ch].

    H' = 2H with up=True, H/2 with down=True, else H. out_ch=None keeps C.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0
    nonlinearity: str = "swish"
    cpu_conv_grads: bool = True

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
        act = activation(self.nonlinearity)
        c_in = x.shape[-1]
        out_ch = self.out_ch or c_in
        h = act(_group_norm(c_in)(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_mean(h), downsample_mean(x)
        h = _conv(out_ch, 3, cpu_grads=self.cpu_conv_grads)(h)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init())(act(temb))[:, None, None, :]
        h = act(_group_norm(out_ch)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = _conv(out_ch, 3, self.init_scale, self.cpu_conv_grads)(h)
        if c_in != out_ch or self.up or self.down:
            x = _conv(out_ch, 1, cpu_grads=self.cpu_conv_grads)(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over spatial positions (DDPM style); [B, H, W, C] -> same."""

    skip_rescale: bool = True
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = _group_norm(c)(x)
        q, k, v = NIN(c)(h), NIN(c)(h), NIN(c)(h)
        q, k, v = (a.reshape(b, height * width, c) for a in (q, k, v))
        logits = jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c)
        h = jnp.einsum("bij,bjc->bic", jax.nn.softmax(logits, axis=-1), v)
        h = NIN(c, init_scale=self.init_scale)(h.reshape(b, height, width, c))
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class DDPMpp(nn.Module):
    """Noise-predicting DDPM++ cont. U-Net: eps_hat(x [B, H, W, C], t [B]) -> [B, H, W, C].

    Defaults are the CIFAR-10 / ImageNet 32 configs of the paper (set num_res_blocks=8 for the
    deep variant, dropout=0.0 for ImageNet 32).

    Attributes:
      nf: channels of the first level; the time embedding has 4 nf units.
      ch_mult: channel multiplier per resolution level (L levels, H must be divisible by
        2^(L - 1)).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes at which self-attention follows the residual blocks.
      dropout: dropout rate inside the residual blocks (active only with train=True).
      skip_rescale: divide every residual sum by sqrt(2).
      init_scale: variance scale of the last conv of each block, the attention output and the
        output conv; 0 means 1e-10 (official convention).
      conditional: condition on time (False drops the time MLP and the per-block Dense).
      nonlinearity: 'swish', 'relu', 'elu' or 'lrelu'.
      cpu_conv_grads: on the CPU backend, differentiate the convolutions through
        `layers.conv_general_dilated` (identical values; ~3x faster input VJPs inside the ODE
        solver's loop, see experiments/bench_cpu_loops.py). No effect on GPU/TPU.
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0
    conditional: bool = True
    nonlinearity: str = "swish"
    cpu_conv_grads: bool = True

    @nn.compact
    def __call__(self, x: Array, t: Array, train: bool) -> Array:
        """Predict the noise.

        Args:
          x: [B, H, W, C] noisy input in model space (data centred in [-1, 1]), H == W.
          t: [B] (or scalar) continuous time in [0, 1]; the network embeds 999 t.
          train: enables dropout (needs `rngs={'dropout': key}` when dropout > 0).

        Returns:
          eps_hat: [B, H, W, C].
        """
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"x must be [B, H, H, C] (NHWC, square), got shape {x.shape}")
        levels = len(self.ch_mult)
        if x.shape[1] % 2 ** (levels - 1):
            raise ValueError(
                f"image size {x.shape[1]} is not divisible by 2^{levels - 1} "
                f"(ch_mult={self.ch_mult} has {levels} levels)"
            )
        act = activation(self.nonlinearity)

        # Explicit names reproduce the official auto-numbering (ResnetBlockBigGANpp_i, ...).
        res_ids, attn_ids = itertools.count(), itertools.count()

        def res_block(h: Array, out_ch: int | None = None, **kw) -> Array:
            block = ResnetBlockBigGAN(
                out_ch=out_ch,
                dropout=self.dropout,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                nonlinearity=self.nonlinearity,
                cpu_conv_grads=self.cpu_conv_grads,
                name=f"ResnetBlockBigGANpp_{next(res_ids)}",
                **kw,
            )
            return block(h, temb, train)

        def attn_block(h: Array) -> Array:
            block = AttentionBlock(
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                name=f"AttnBlockpp_{next(attn_ids)}",
            )
            return block(h)

        temb = None
        if self.conditional:
            temb = sinusoidal_embedding(time_labels(t, x.shape[0]), self.nf)
            temb = nn.Dense(4 * self.nf, kernel_init=default_init())(temb)
            temb = nn.Dense(4 * self.nf, kernel_init=default_init())(act(temb))

        # Down.
        skips = [_conv(self.nf, 3, cpu_grads=self.cpu_conv_grads)(x)]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = res_block(skips[-1], self.nf * mult)
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h)
                skips.append(h)
            if level != levels - 1:
                skips.append(res_block(skips[-1], down=True))

        # Middle.
        h = res_block(skips[-1])
        h = attn_block(h)
        h = res_block(h)

        # Up.
        for level in reversed(range(levels)):
            for _ in range(self.num_res_blocks + 1):
                h = res_block(
                    jnp.concatenate([h, skips.pop()], axis=-1), self.nf * self.ch_mult[level]
                )
            if h.shape[1] in self.attn_resolutions:
                h = attn_block(h)
            if level != 0:
                h = res_block(h, up=True)
        assert not skips

        h = act(_group_norm(h.shape[-1])(h))
        return _conv(x.shape[-1], 3, self.init_scale, self.cpu_conv_grads)(h)
