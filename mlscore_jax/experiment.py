"""The edge where a configuration becomes typed objects.

`from_config(config)` reads an ml_collections ConfigDict once and returns an `Experiment`: the
SDE, the network, the data set and the options of preprocessing and of the loss, each a plain
typed object. Training and evaluation take the Experiment; the math core (`sde`, `losses`,
`bound`, `likelihood`, `models`) never sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from mlscore_jax import data, models
from mlscore_jax.sde import SDE, VESDE, VPSDE, SubVPSDE

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How integer batches become model inputs (`data.preprocess` options)."""

    levels: int | None
    centered: bool = True
    uniform_dequantization: bool = False
    random_flip: bool = False

    def __call__(self, key: Array | None, x: Array) -> Array:
        return data.preprocess(
            key,
            x,
            levels=self.levels,
            uniform_dequantization=self.uniform_dequantization,
            centered=self.centered,
            random_flip=self.random_flip,
        )


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Options of `losses.dsm_loss` for training."""

    weighting: str  # 'score' or 'likelihood'
    importance_sampling: bool
    eps: float
    reduce: str  # 'mean' or 'sum'


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs besides the config's loop settings."""

    sde: SDE
    model: nn.Module
    dataset: data.Dataset
    preprocessing: Preprocessing
    loss: LossSpec

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.dataset.example_shape


def build_sde(config: ml_collections.ConfigDict) -> SDE:
    """The forward SDE named by `training.sde`, with the `model.beta_*` / `model.sigma_*` values."""
    name = config.training.sde.lower()
    m = config.model
    if name == "vpsde":
        return VPSDE(beta_min=m.beta_min, beta_max=m.beta_max)
    if name == "subvpsde":
        return SubVPSDE(beta_min=m.beta_min, beta_max=m.beta_max)
    if name in ("vesde", "linearvesde"):
        return VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, linear=name == "linearvesde")
    raise ValueError(
        f"unknown training.sde {config.training.sde!r}; choose vpsde, subvpsde, vesde, linearvesde"
    )


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network `model.name`, with every `model.*` key that is one of its constructor fields."""
    name = config.model.name
    if name not in models.MODELS:
        raise ValueError(f"unknown model.name {name!r}; choose one of {sorted(models.MODELS)}")
    fields = {f.name for f in dataclasses.fields(models.MODELS[name])} - {"parent", "name"}
    kwargs: dict[str, Any] = {}
    for key in fields:
        if key in config.model:
            value = config.model[key]
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return models.get_model(name, **kwargs)


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
    """The data set `data.dataset` with the options that apply to it."""
    d = config.data
    name = d.dataset
    if name in ("cifar10", "imagenet32", "imagenet_resized32", "mnist", "fashion_mnist"):
        options = dict(data_dir=d.data_dir or None, download=d.download)
    elif name == "npz":
        if not d.train_file:
            raise ValueError("data.dataset='npz' needs --config.data.train_file=PATH.npz")
        options = dict(train_file=d.train_file, test_file=d.test_file or None, levels=d.levels)
    elif name == "toy2d":
        options = dict(distribution=d.distribution)
    else:
        options = {}
    ds = data.load(name, **options)
    if ds.is_image:
        h, w, c = ds.example_shape
        if (d.image_size, d.image_size, d.num_channels) != (h, w, c):
            raise ValueError(
                f"data set {name!r} has images {h}x{w}x{c}, but the config says "
                f"data.image_size={d.image_size}, data.num_channels={d.num_channels}"
            )
    return ds


def loss_spec(config: ml_collections.ConfigDict) -> LossSpec:
    t = config.training
    if not t.continuous:
        raise ValueError("training.continuous=False (discrete DDPM/SMLD losses) is not supported")
    if t.importance_weighting and not t.likelihood_weighting:
        raise ValueError(
            "training.importance_weighting=True needs training.likelihood_weighting=True: the "
            "importance distribution p(t) ~ g^2/sigma^2 belongs to the likelihood weighting"
        )
    return LossSpec(
        weighting="likelihood" if t.likelihood_weighting else "score",
        importance_sampling=bool(t.importance_weighting),
        eps=float(t.smallest_time),
        reduce="mean" if t.reduce_mean else "sum",
    )


def from_config(config: ml_collections.ConfigDict, *, dataset: data.Dataset | None = None):
    """Build the Experiment of `config` (loads the data set unless one is given)."""
    ds = dataset if dataset is not None else load_dataset(config)
    return Experiment(
        sde=build_sde(config),
        model=build_model(config),
        dataset=ds,
        preprocessing=Preprocessing(
            levels=ds.levels,
            centered=bool(config.data.centered),
            uniform_dequantization=bool(config.data.uniform_dequantization),
            random_flip=bool(config.data.random_flip),
        ),
        loss=loss_spec(config),
    )
