"""Residual MLP noise predictor for 2-D toy data and flattened small images (8x8 digits).

    temb = Dense(act(Dense(sinusoidal(999 t, embedding_dim))))           [B, 4 embedding_dim]
    h    = Dense(flattened x)                                               [B, width]
    num_blocks x:  h = h + Dense(Dropout(act(LN(Dense(act(LN(h))) + Dense(act(temb))))))
    out  = Dense(act(LN(h)))  (init_scale), reshaped to x's shape

The time embedding is the one DDPM++ uses; the last layer of every block and the output layer
use `default_init(init_scale)` as the U-Net's last convolutions do (scale 0 means 1e-10), so the
blocks start close to the identity and the output close to zero.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from mlscore_jax.models.layers import activation, default_init, sinusoidal_embedding, time_labels

Array = jax.Array


def _dense(features: int, init_scale: float = 1.0, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, kernel_init=default_init(init_scale), name=name)


class ResidualDenseBlock(nn.Module):
    """Pre-norm residual block with a time-embedding bias; [B, width] -> [B, width]."""

    dropout: float = 0.0
    init_scale: float = 0.0
    nonlinearity: str = "swish"

    @nn.compact
    def __call__(self, h: Array, temb: Array, train: bool) -> Array:
        act = activation(self.nonlinearity)
        width = h.shape[-1]
        r = _dense(width)(act(nn.LayerNorm()(h)))
        r = r + _dense(width)(act(temb))
        r = act(nn.LayerNorm()(r))
        r = nn.Dropout(self.dropout)(r, deterministic=not train)
        return h + _dense(width, self.init_scale)(r)


class MLP(nn.Module):
    """Noise-predicting residual MLP: eps_hat(x [B, ...], t [B]) -> [B, ...].

    Attributes:
      width: hidden units.
      num_blocks: residual blocks.
      embedding_dim: width of the sinusoidal time embedding (the time MLP has 4x this).
      dropout: dropout rate in the blocks (active only with train=True).
      init_scale: variance scale of each block's last layer and of the output layer (0 -> 1e-10).
      nonlinearity: 'swish', 'relu', 'elu' or 'lrelu'.
    """

    width: int = 256
    num_blocks: int = 3
    embedding_dim: int = 64
    dropout: float = 0.0
    init_scale: float = 0.0
    nonlinearity: str = "swish"

    @nn.compact
    def __call__(self, x: Array, t: Array, train: bool) -> Array:
        """Predict the noise.

        Args:
          x: [B, ...] noisy input (any trailing shape; it is flattened).
          t: [B] (or scalar) continuous time in [0, 1]; the network embeds 999 t.
          train: enables dropout (needs `rngs={'dropout': key}` when dropout > 0).

        Returns:
          eps_hat with the shape of x.
        """
        act = activation(self.nonlinearity)
        batch = x.shape[0]
        dim = math.prod(x.shape[1:])

        temb = sinusoidal_embedding(time_labels(t, batch), self.embedding_dim)
        temb = _dense(4 * self.embedding_dim)(temb)
        temb = _dense(4 * self.embedding_dim)(act(temb))

        h = _dense(self.width)(x.reshape(batch, dim))
        for _ in range(self.num_blocks):
            h = ResidualDenseBlock(self.dropout, self.init_scale, self.nonlinearity)(h, temb, train)
        out = _dense(dim, self.init_scale)(act(nn.LayerNorm()(h)))
        return out.reshape(x.shape)
