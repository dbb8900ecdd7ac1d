"""The one edge where a configuration becomes typed objects.

`from_config(config, source=...)` reads an ml_collections ConfigDict once and returns an
`Experiment`: the SDE, the network, the data set, the preprocessing and the loss, next to the
typed settings of training, optimizer, evaluation and sampling (`settings`). Training
(`train.train_and_evaluate(exp, workdir)`), evaluation (`evaluate.evaluate(exp, workdir)`) and
sampling take the Experiment or its parts; no other module reads a ConfigDict.

Every key of every section is checked. A key that nothing reads is an error naming the key and
the config file (a typo in a config file must not be silently dropped). Options that belong to
another data set, model or SDE family (the shared defaults carry them all, e.g. `model.nf` in an
MLP config, `data.train_file` for CIFAR-10) are ignored by name and listed in
`Experiment.ignored`; for a data set, such an option set to anything but its neutral default is
an error, since it would otherwise have no effect.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from mlscore_jax import datasets, models
from mlscore_jax.preprocessing import Preprocessing
from mlscore_jax.sde import SDE, VESDE, VPSDE, SubVPSDE
from mlscore_jax.settings import (
    BpdSettings,
    DequantizerSettings,
    EvalSettings,
    OptimizerSettings,
    SamplingSettings,
    TrainSettings,
)

logger = logging.getLogger(__name__)

SECTIONS = ("training", "data", "model", "optim", "eval", "sampling")
OPTIONAL_SECTIONS = ("deq",)  # absent: no variational dequantizer
TFDS_DATASETS = ("cifar10", "imagenet32", "imagenet_resized32", "mnist", "fashion_mnist")

# data.* options that apply to some data sets only, with their neutral (unset) values.
_DATA_OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "data_dir": (TFDS_DATASETS, ""),
    "download": (TFDS_DATASETS, False),
    "train_file": (("npz",), ""),
    "test_file": (("npz",), ""),
    "levels": (("npz",), 256),
    "distribution": (("toy2d",), "checkerboard"),
}
# model.* keys of the SDE families: (training.sde names, keys)
_SDE_KEYS = {
    "beta_min": ("vpsde", "subvpsde"),
    "beta_max": ("vpsde", "subvpsde"),
    "sigma_min": ("vesde", "linearvesde"),
    "sigma_max": ("vesde", "linearvesde"),
}


class ConfigError(ValueError):
    """A config holds a key that nothing reads, lacks one, or has a value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Options of `losses.dsm_loss` for training."""

    weighting: str  # 'score' (lambda = sigma^2) or 'likelihood' (lambda = g^2)
    importance_sampling: bool
    eps: float  # smallest time
    reduce: str  # 'mean' or 'sum' over the data dimensions


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs, typed; built by `from_config` or directly in Python."""

    sde: SDE
    model: nn.Module
    dataset: datasets.Dataset
    preprocessing: Preprocessing
    loss: LossSpec
    train: TrainSettings = TrainSettings()
    optim: OptimizerSettings = OptimizerSettings()
    eval: EvalSettings = EvalSettings()
    sampling: SamplingSettings = SamplingSettings()
    source: str = "<python>"  # the config file it came from
    ignored: tuple[str, ...] = ()  # config keys that belong to another data set / model / SDE
    # the variational dequantizer q(u | x) (`models.flowpp`; None: the config has no `deq`
    # section or the data are continuous) and its training stage (`--mode train_deq`)
    dequantizer: nn.Module | None = None
    deq: DequantizerSettings = DequantizerSettings()

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.dataset.example_shape

    def replace(self, **changes: Any) -> Experiment:
        """A copy with some fields replaced, e.g. `exp.replace(train=...)`."""
        return dataclasses.replace(self, **changes)


class _Section:
    """The keys of one config section; every key must be read or ignored by name."""

    def __init__(self, config: ml_collections.ConfigDict, name: str, source: str):
        if name not in config:
            raise ConfigError(f"{source}: the config has no section {name!r}")
        self.name, self.source = name, source
        self.values: dict[str, Any] = dict(config[name].items())
        self.seen: set[str] = set()
        self.ignored: list[str] = []

    def __getitem__(self, key: str) -> Any:
        if key not in self.values:
            raise ConfigError(f"{self.source}: missing key {self.name}.{key}")
        self.seen.add(key)
        value = self.values[key]
        return tuple(value) if isinstance(value, list) else value

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def ignore(self, key: str, why: str) -> None:
        if key in self.values and key not in self.seen:
            self.seen.add(key)
            self.ignored.append(f"{self.name}.{key} ({why})")

    def finish(self) -> list[str]:
        unknown = sorted(set(self.values) - self.seen)
        if unknown:
            key = unknown[0]
            near = difflib.get_close_matches(key, sorted(self.seen), n=1)
            hint = f"; did you mean {self.name}.{near[0]}?" if near else ""
            raise ConfigError(
                f"{self.source}: unknown key {self.name}.{key}: nothing reads it{hint} "
                f"(known keys of {self.name}: {', '.join(sorted(self.seen))})"
                + (f"; other unknown keys: {', '.join(unknown[1:])}" if len(unknown) > 1 else "")
            )
        return self.ignored


def _build_sde(name: str, model: _Section) -> SDE:
    name = name.lower()
    for key, families in _SDE_KEYS.items():
        if name not in families:
            model.ignore(key, f"for training.sde in {families}")
    if name == "vpsde":
        return VPSDE(beta_min=model["beta_min"], beta_max=model["beta_max"])
    if name == "subvpsde":
        return SubVPSDE(beta_min=model["beta_min"], beta_max=model["beta_max"])
    if name in ("vesde", "linearvesde"):
        return VESDE(
            sigma_min=model["sigma_min"],
            sigma_max=model["sigma_max"],
            linear=name == "linearvesde",
        )
    raise ConfigError(
        f"{model.source}: unknown training.sde {name!r}; choose vpsde, subvpsde, vesde, "
        "linearvesde (or build an Experiment with your own SDE in Python)"
    )


def _model_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _build_model(model: _Section) -> nn.Module:
    name = model["name"]
    if name not in models.MODELS:
        raise ConfigError(
            f"{model.source}: unknown model.name {name!r}; choose one of {sorted(models.MODELS)}"
        )
    kwargs = {key: model[key] for key in _model_fields(models.MODELS[name]) if key in model}
    for other, cls in models.MODELS.items():
        if other != name:
            for key in _model_fields(cls):
                model.ignore(key, f"a {other} option; model.name is {name!r}")
    try:
        return models.get_model(name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{model.source}: model {name!r}: {e}") from e


def network_from_config(
    config: ml_collections.ConfigDict, *, source: str = "<config>"
) -> tuple[nn.Module, tuple[int, ...]]:
    """The score network of `config.model` and the image shape (H, W, C) of `config.data`, from
    those two sections alone: no data set is loaded and the other sections are not checked
    (what `convert` needs to match a checkpoint against the paper configs)."""
    model = _build_model(_Section(config, "model", source))
    data = config.data
    return model, (int(data.image_size), int(data.image_size), int(data.num_channels))


def _load_dataset(data: _Section) -> datasets.Dataset:
    name = data["dataset"]
    if name not in datasets.DATASETS:
        raise ConfigError(
            f"{data.source}: unknown data.dataset {name!r}; choose one of "
            f"{', '.join(datasets.DATASETS)}"
        )
    options = {}
    for key, (owners, neutral) in _DATA_OPTIONS.items():
        if name in owners:
            value = data[key]
            options[key] = None if value == "" else value
        elif key in data:
            if data.values[key] != neutral:
                raise ConfigError(
                    f"{data.source}: data.{key}={data.values[key]!r} applies only to "
                    f"data.dataset in {owners}, not {name!r}; remove it or set it to {neutral!r}"
                )
            data.ignore(key, f"for data.dataset in {owners}")
    if name == "npz" and not options.get("train_file"):
        raise ConfigError(f"{data.source}: data.dataset='npz' needs data.train_file=PATH.npz")
    if name in TFDS_DATASETS:
        options["download"] = bool(options["download"])
    return datasets.load(name, **options)


def _check_image_shape(data: _Section, ds: datasets.Dataset) -> None:
    if not ds.is_image:
        data.ignore("image_size", "continuous data")
        data.ignore("num_channels", "continuous data")
        return
    h, w, c = ds.example_shape
    if (data["image_size"], data["image_size"], data["num_channels"]) != (h, w, c):
        raise ConfigError(
            f"{data.source}: data set {ds.name!r} has images {h}x{w}x{c}, but the config says "
            f"data.image_size={data['image_size']}, data.num_channels={data['num_channels']}"
        )


def _loss_spec(t: _Section) -> LossSpec:
    if not t["continuous"]:
        raise ConfigError(
            f"{t.source}: training.continuous=False (discrete DDPM/SMLD losses) is not supported"
        )
    if t["importance_weighting"] and not t["likelihood_weighting"]:
        raise ConfigError(
            f"{t.source}: training.importance_weighting=True needs "
            "training.likelihood_weighting=True: the importance distribution p(t) ~ g^2/sigma^2 "
            "belongs to the likelihood weighting"
        )
    return LossSpec(
        weighting="likelihood" if t["likelihood_weighting"] else "score",
        importance_sampling=bool(t["importance_weighting"]),
        eps=float(t["smallest_time"]),
        reduce="mean" if t["reduce_mean"] else "sum",
    )


def _build_dequantizer(
    deq: _Section, ds: datasets.Dataset
) -> tuple[nn.Module | None, DequantizerSettings]:
    """The Flow++ dequantizer of `config.deq` (None for continuous data) and its training."""
    from mlscore_jax.models import flowpp

    settings = _typed(
        DequantizerSettings,
        deq.source,
        n_iters=int(deq["n_iters"]),
        ema_rate=float(deq["ema_rate"]),
        offset=bool(deq["offset"]),
    )
    name = deq["name"]
    if name not in flowpp.DEQUANTIZERS:
        raise ConfigError(
            f"{deq.source}: unknown deq.name {name!r}; choose one of {sorted(flowpp.DEQUANTIZERS)}"
        )
    keys = [k for k in _model_fields(flowpp.FlowppDequantizer) if k not in ("variant", "levels")]
    if not ds.is_image:
        for key in keys:
            deq.ignore(key, "continuous data have no dequantizer")
        return None, settings
    kwargs = {key: deq[key] for key in keys if key in deq}
    try:
        module = flowpp.DEQUANTIZERS[name](levels=ds.levels, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{deq.source}: dequantizer {name!r}: {e}") from e
    return module, settings


def _stand_in_dataset(data: _Section) -> datasets.Dataset:
    """Empty splits with the config's name, image shape and levels (`require_data=False`)."""
    name = data["dataset"]
    levels = int(data["levels"]) if name == "npz" else 256
    for key in _DATA_OPTIONS:
        data.ignore(key, "the data set is not at hand")
    empty = np.zeros((0, data["image_size"], data["image_size"], data["num_channels"]), np.uint8)
    return datasets.Dataset(
        name=name, train=empty, test=empty, levels=levels, description="not at hand: no images"
    )


def _typed(cls: type, source: str, **kwargs: Any) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


def from_config(
    config: ml_collections.ConfigDict,
    *,
    source: str = "<config>",
    dataset: datasets.Dataset | None = None,
    require_data: bool = True,
) -> Experiment:
    """Build the Experiment of `config`, checking every key (loads the data set unless given).

    Args:
      config: a ConfigDict with the sections of `SECTIONS` and `seed` (see configs/).
      source: the config file's name, for error messages.
      require_data: with False, a data set that is not at hand (TFDS CIFAR-10 not prepared on
        this machine, a missing npz file) is stood in for by empty splits of the config's name,
        image shape and levels (256, or data.levels for npz), with a log line: for what needs
        the networks and the image shape but not the data (`convert`, `nll`).
      dataset: a data set to use instead of loading `data.dataset` (tests); its shape is still
        checked against `data.image_size` / `data.num_channels`.

    Raises:
      ConfigError: a key nothing reads (naming it and the file), a missing key, an option of
        another data set set to a non-neutral value, or a value the settings reject.
    """
    unknown = sorted(set(config.keys()) - set(SECTIONS) - set(OPTIONAL_SECTIONS) - {"seed"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {unknown}; a config has seed and the sections "
            f"{', '.join(SECTIONS)} (and optionally {', '.join(OPTIONAL_SECTIONS)})"
        )
    if "seed" not in config:
        raise ConfigError(f"{source}: missing key seed")
    seed = int(config.seed)
    s = {name: _Section(config, name, source) for name in SECTIONS}
    t, d, m, o, e, smp = (s[name] for name in SECTIONS)
    if "deq" in config:
        s["deq"] = _Section(config, "deq", source)

    sde = _build_sde(t["sde"], m)
    model = _build_model(m)
    if dataset is None:
        try:
            ds = _load_dataset(d)
        except (datasets.DatasetNotPreparedError, FileNotFoundError) as missing:
            if require_data:
                raise
            ds = _stand_in_dataset(d)
            logger.info("%s; going on without the data (%s)", str(missing).splitlines()[0], ds)
    else:
        ds = dataset
        for key in _DATA_OPTIONS:
            d.ignore(key, "a data set was passed in")
        d.ignore("dataset", "a data set was passed in")
    _check_image_shape(d, ds)
    preprocessing = Preprocessing(
        levels=ds.levels,
        centered=bool(d["centered"]),
        uniform_dequantization=bool(d["uniform_dequantization"]),
        random_flip=bool(d["random_flip"]),
    )
    loss = _loss_spec(t)
    train = _typed(
        TrainSettings,
        source,
        batch_size=t["batch_size"],
        n_iters=t["n_iters"],
        snapshot_freq=t["snapshot_freq"],
        snapshot_freq_for_preemption=t["snapshot_freq_for_preemption"],
        log_freq=t["log_freq"],
        eval_freq=t["eval_freq"],
        n_jitted_steps=t["n_jitted_steps"],
        ema_rate=float(m["ema_rate"]),
        seed=seed,
    )
    if str(o["optimizer"]).lower() != "adam":
        raise ConfigError(f"{source}: optim.optimizer={o['optimizer']!r}: only 'Adam' is supported")
    optim = _typed(
        OptimizerSettings,
        source,
        lr=float(o["lr"]),
        beta1=float(o["beta1"]),
        eps=float(o["eps"]),
        weight_decay=float(o["weight_decay"]),
        warmup=int(o["warmup"]),
        grad_clip=float(o["grad_clip"]),
    )
    bpd_settings = _typed(
        BpdSettings,
        source,
        split=e["bpd_dataset"],
        batch_size=e["batch_size"],
        num_repeats=e["num_repeats"],
        ode=bool(e["ode"]),
        bound=bool(e["bound"]),
        eps=float(t["smallest_time"]),
        rtol=float(e["rtol"]),
        atol=float(e["atol"]),
        solver=e["solver"],
        divergence=e["divergence"],
        max_steps=e["max_steps"],
        mode=e["hutchinson"],
        variable=e["variable"],
        pcoeff=float(e["pcoeff"]),
        icoeff=float(e["icoeff"]),
        num_t=e["num_t"],
        time_sampling=e["time_sampling"],
        draws_per_call=e["draws_per_call"],
        offset=bool(e["offset"]),
        estimator="dsm" if e["dsm"] else "ssm",
        seed=seed,
        dequantization=e["dequantization"] if ds.is_image else "uniform",
        num_dequant_samples=int(e["num_dequant_samples"]) if ds.is_image else 1,
    )
    if not ds.is_image:
        e.ignore("dequantization", "continuous data")
        e.ignore("num_dequant_samples", "continuous data")
    if "deq" in s:
        dequantizer, deq_settings = _build_dequantizer(s["deq"], ds)
    else:
        dequantizer, deq_settings = None, DequantizerSettings()
    if bpd_settings.dequantization == "variational" and dequantizer is None:
        raise ConfigError(
            f"{source}: eval.dequantization='variational' needs a `deq` section (the Flow++ "
            "dequantizer; see configs/default_cifar10.py)"
        )
    evaluation = _typed(
        EvalSettings,
        source,
        bpd=bpd_settings,
        ckpt_step=int(e["ckpt_step"]),
        deq_ckpt_step=int(e["deq_ckpt_step"]),
        use_ema=bool(e["use_ema"]),
        enable_bpd=bool(e["enable_bpd"]),
        enable_sampling=bool(e["enable_sampling"]),
        num_samples=int(e["num_samples"]),
    )
    sampling = _typed(
        SamplingSettings,
        source,
        **{f.name: smp[f.name] for f in dataclasses.fields(SamplingSettings)},
    )
    ignored = tuple(item for section in s.values() for item in section.finish())
    return Experiment(
        sde=sde,
        model=model,
        dataset=ds,
        preprocessing=preprocessing,
        loss=loss,
        train=train,
        optim=optim,
        eval=evaluation,
        sampling=sampling,
        source=source,
        ignored=ignored,
        dequantizer=dequantizer,
        deq=deq_settings,
    )
