"""Preprocessing: integer batches -> model inputs, one object for training and evaluation.

`Preprocessing(levels, centered, uniform_dequantization, random_flip)` is the jittable map from
uint8 batches to model-space floats, through `bpd.dequantize` and `bpd.to_model_space` (the
single source of the bits/dim conventions). Training calls it as configured; evaluation calls
`Preprocessing.for_likelihood()`: the same map with uniform dequantization on (the density that
bits/dim measure) and flips off.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mlscore_jax import bpd

Array = jax.Array


def preprocess(
    key: Array | None,
    x: Array,
    *,
    levels: int | None,
    uniform_dequantization: bool = False,
    centered: bool = True,
    random_flip: bool = False,
) -> Array:
    """Integer pixels -> model inputs; pure and jittable (the keyword options are static).

    Steps, in order: optional horizontal flip of each image (on the integers, so it is exact);
    y = (k + u) / levels with u ~ U[0, 1) (`uniform_dequantization`) or the bin centre
    y = (k + 1/2) / levels (`bpd.dequantize`); x = 2y - 1 if `centered` (`bpd.to_model_space`).
    The bits/dim of a model trained on these inputs come from
    `bpd.nats_to_bpd(nll, D, levels=levels, centered=centered)`.

    Args:
      key: PRNG key; needed when uniform_dequantization or random_flip, else may be None.
      x: integer images [..., H, W, C] (e.g. uint8 [B, H, W, C] or [n_steps, B, H, W, C]); for
        continuous data (levels None) float points [..., D], returned as float32 unchanged.
      levels: the data set's quantization levels (`Dataset.levels`); None for continuous data.
      uniform_dequantization: add u ~ U[0, 1) instead of 1/2 (off in the paper's training
        configs, on for likelihood evaluation).
      centered: map [0, 1) to [-1, 1) (every ScoreFlow config). Ignored for continuous data.
      random_flip: flip each image left-right with probability 1/2. Off by default: the paper's
        headline numbers are "without data augmentation".

    Returns:
      float32 array shaped like x.
    """
    if levels is None:
        if uniform_dequantization or random_flip:
            raise ValueError("continuous data (levels=None): no dequantization and no flips")
        return jnp.asarray(x, jnp.float32)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"preprocess expects integer pixels (uint8), got {x.dtype}")
    if x.ndim < 3:
        raise ValueError(f"preprocess expects images [..., H, W, C], got shape {x.shape}")
    if (uniform_dequantization or random_flip) and key is None:
        raise ValueError("uniform_dequantization and random_flip need a PRNG key")
    if random_flip:
        key, flip_key = jax.random.split(key)
        flip = jax.random.bernoulli(flip_key, 0.5, x.shape[:-3])[..., None, None, None]
        x = jnp.where(flip, jnp.flip(x, axis=-2), x)
    y = bpd.dequantize(key if uniform_dequantization else None, x, levels)
    return bpd.to_model_space(y, centered)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How integer batches become model inputs: `preprocess` with fixed options (hashable).

    Attributes:
      levels: the data set's quantization levels (`Dataset.levels`); None for continuous data.
      centered: model space [-1, 1) rather than [0, 1).
      uniform_dequantization: y = (k + u) / levels (else the bin centre).
      random_flip: flip each image left-right with probability 1/2 (training augmentation).
    """

    levels: int | None
    centered: bool = True
    uniform_dequantization: bool = False
    random_flip: bool = False

    def __call__(self, key: Array | None, x: Array) -> Array:
        """float32 model inputs shaped like x (see `preprocess`)."""
        return preprocess(
            key,
            x,
            levels=self.levels,
            uniform_dequantization=self.uniform_dequantization,
            centered=self.centered,
            random_flip=self.random_flip,
        )

    def for_likelihood(self) -> Preprocessing:
        """The map that likelihood evaluation uses: uniform dequantization for quantized data
        (the density bits/dim measure), never flips."""
        return dataclasses.replace(
            self, uniform_dequantization=self.levels is not None, random_flip=False
        )

    def nats_to_bpd(self, nll: Array, num_dims: int) -> Array:
        """Per-example NLL in nats of the model-space density -> bits/dim of the discrete data
        (`bpd.nats_to_bpd`); continuous data (levels None) stay in nats."""
        if self.levels is None:
            return nll
        return bpd.nats_to_bpd(nll, num_dims, levels=self.levels, centered=self.centered)

    def nats_scale(self, num_dims: int) -> float:
        """The factor that turns a difference or standard error in nats into bits/dim."""
        return 1.0 if self.levels is None else bpd.bits_per_dim_scale(num_dims)
