"""Data sets: the whole train and test splits as exact arrays, by name.

`load(name, **options) -> Dataset`: the splits exactly as released (uint8 NHWC images, no
resizing or re-encoding), held in memory or memory-mapped. Names are the keys of `DATASETS`:

===================  ======================================================  ======  ======
name                 source                                                  levels  shape
===================  ======================================================  ======  ======
cifar10              TFDS `cifar10` (train / test)                           256     32x32x3
imagenet32           TFDS `downsampled_imagenet/32x32` (train / validation)  256     32x32x3
imagenet_resized32   TFDS `imagenet_resized/32x32` (train / validation)      256     32x32x3
mnist                TFDS `mnist` (train / test)                             256     28x28x1
fashion_mnist        TFDS `fashion_mnist` (train / test)                     256     28x28x1
digits               scikit-learn's bundled 8x8 digits (offline)             17      8x8x1
npz                  the user's own uint8 [N, H, W, C] files (key `x`)       option  any
toy2d                checkerboard / 8gaussians / moons / swissroll           None    2
===================  ======================================================  ======  ======

`imagenet32` is the paper's data (van den Oord et al. 2016). `imagenet_resized32` is the later
Chrabaszcz et al. (2017) down-sampling: a different data set whose NLLs are NOT comparable to
the paper's ImageNet 32x32 numbers.

TFDS data sets are never downloaded unless `download=True`: without prepared files `load`
fails at once with a message naming the two ways out. The first load of a split streams it
into `<data_dir>/mlscore_jax_cache/<tfds name>/<version>/<split>.npy`; later loads memory-map
that file (ImageNet 32 train is 3.9 GB as uint8) and do not import TensorFlow.

Batches are built by `batches`, model inputs by `preprocessing`. TensorFlow (slow to import) and
scikit-learn are imported lazily, inside the loaders that need them, so `import
mlscore_jax.datasets` and the `digits`/`npz`/`toy2d` paths never import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

logger = logging.getLogger(__name__)

# The digits split: sklearn order, first 1497 images train, last 300 test (see `_load_digits`).
DIGITS_NUM_TRAIN = 1497
DIGITS_NUM_TEST = 300

TOY2D_DISTRIBUTIONS = ("checkerboard", "8gaussians", "moons", "swissroll")

# Examples per chunk when streaming a TFDS split into the .npy cache.
_TFDS_CHUNK = 4096


# ------------------------------------------------------------------------------------------------
# The data set object
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set's two splits, exactly as released, plus what bits/dim need to know.

    Attributes:
      name: the key in `DATASETS` that built it.
      train: uint8 [N_train, H, W, C] images (possibly a read-only memmap), or float32
        [N_train, 2] points for continuous data.
      test: same layout as `train`, [N_test, ...]; N_test may be 0 (an `npz` without test file).
      levels: quantization levels of the pixels (256 for 8-bit, 17 for digits); None for
        continuous data, where bits/dim do not apply and NLLs are reported in nats.
      description: one human-readable line: source, version, splits (for logs).
    """

    name: str
    train: np.ndarray = dataclasses.field(repr=False)
    test: np.ndarray = dataclasses.field(repr=False)
    levels: int | None
    description: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, split)
            if not isinstance(x, np.ndarray):
                raise TypeError(f"{self.name}: {split} must be a numpy array, got {type(x)}")
            if self.levels is None:
                if x.dtype != np.float32 or x.ndim != 2:
                    raise ValueError(
                        f"{self.name}: continuous data (levels=None) must be float32 [N, D], "
                        f"got {split} {x.dtype}{list(x.shape)}"
                    )
            elif x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(
                    f"{self.name}: images must be uint8 [N, H, W, C], got {split} "
                    f"{x.dtype}{list(x.shape)}"
                )
        if self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test examples differ in shape: "
                f"{self.train.shape[1:]} vs {self.test.shape[1:]}"
            )
        if self.levels is not None and not (
            int(self.levels) == self.levels and 2 <= self.levels <= 256
        ):
            raise ValueError(f"{self.name}: levels must be an integer in [2, 256] or None")

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one example: (H, W, C) for images, (2,) for toy2d."""
        return tuple(self.train.shape[1:])

    @property
    def num_dims(self) -> int:
        """D, the number of dimensions of one example (H * W * C), as `bpd.nats_to_bpd` wants."""
        return math.prod(self.example_shape)

    @property
    def is_image(self) -> bool:
        """True for quantized images (bits/dim apply), False for continuous data."""
        return self.levels is not None

    def __repr__(self) -> str:
        def fmt(x: np.ndarray) -> str:
            return f"{x.dtype}{list(x.shape)}"

        return (
            f"Dataset(name={self.name!r}, train={fmt(self.train)}, test={fmt(self.test)}, "
            f"levels={self.levels}, description={self.description!r})"
        )


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set is not prepared in data_dir and downloading was not allowed."""


def _read_only(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)
    return x


# ------------------------------------------------------------------------------------------------
# TFDS data sets
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    name: str
    tfds_name: str
    train_split: str
    test_split: str
    shape: tuple[int, int, int]
    note: str = ""


_IMAGENET32_NOTE = (
    "This is the paper's ImageNet 32x32 (van den Oord et al. 2016); TFDS fetches it from "
    "http://image-net.org/small/ (train_32x32.tar, valid_32x32.tar). Do not substitute "
    "'imagenet_resized32' (Chrabaszcz et al. 2017): its NLLs are not comparable."
)
_IMAGENET_RESIZED32_NOTE = (
    "This is Chrabaszcz et al. (2017)'s down-sampled ImageNet, NOT the paper's ImageNet 32x32 "
    "('imagenet32'); NLLs on it are not comparable to the paper's."
)


def _tfds_root(data_dir: PathLike | None) -> Path:
    """The TFDS data directory: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return Path(data_dir).expanduser()


def _not_prepared_message(spec: _TfdsSpec, root: Path, builder: Any, cache_dir: Path) -> str:
    h, w, c = spec.shape
    lines = [
        f"Data set {spec.name!r} (TFDS {spec.tfds_name!r}, version {builder.version}) is not "
        f"prepared in data_dir {str(root)!r}:",
        f"  looked for the prepared TFDS files in {builder.data_dir}",
        f"  and for cached arrays in {cache_dir}.",
        "Nothing was downloaded (download=False). Two ways out:",
        "  1. Prepare it with TFDS on a machine with network access:",
        f"       python -c \"import tensorflow_datasets as tfds; tfds.builder('{spec.tfds_name}', "
        f"data_dir='{root}').download_and_prepare()\"",
        f"     or: tfds build {spec.tfds_name} --data_dir={root}",
        f"     then copy the folder {root / spec.tfds_name.split('/')[0]} it made to the same "
        "place here. (Where this machine has network access, load(..., download=True), i.e. "
        "--config.data.download=True, does it in place.)",
        f"  2. Use your own lossless copy as data set 'npz': uint8 images [N, {h}, {w}, {c}] "
        "saved under the key 'x', e.g. numpy.savez('train.npz', x=images), then",
        "       datasets.load('npz', train_file='train.npz', test_file='test.npz')",
        "     i.e. --config.data.dataset=npz --config.data.train_file=train.npz "
        "--config.data.test_file=test.npz",
    ]
    if spec.note:
        lines.append(f"Note: {spec.note}")
    return "\n".join(lines)


def _load_tfds(
    spec: _TfdsSpec,
    *,
    data_dir: PathLike | None = None,
    download: bool = False,
    cache: bool = True,
) -> Dataset:
    """Loads a TFDS image data set as uint8 arrays (see the module docstring).

    Args:
      spec: which data set (bound by `DATASETS`).
      data_dir: TFDS data directory; default $TFDS_DATA_DIR or ~/tensorflow_datasets.
      download: allow `download_and_prepare` (needs network) when the data set is not prepared.
      cache: keep the decoded uint8 splits as .npy under data_dir and memory-map them.
    """
    import tensorflow_datasets as tfds  # Lazy: TFDS is only needed here.

    root = _tfds_root(data_dir)
    builder = tfds.builder(spec.tfds_name, data_dir=str(root))
    cache_dir = root / "mlscore_jax_cache" / spec.tfds_name / str(builder.version)
    splits = (spec.train_split, spec.test_split)
    cached = cache and all((cache_dir / f"{s}.npy").is_file() for s in splits)
    # Look for prepared files BEFORE anything can touch the network.
    if not cached and not builder.is_prepared():
        if not download:
            raise DatasetNotPreparedError(_not_prepared_message(spec, root, builder, cache_dir))
        logger.info("Downloading and preparing %s into %s", spec.tfds_name, root)
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise RuntimeError(
                f"Downloading {spec.name!r} (TFDS {spec.tfds_name!r}) into {str(root)!r} failed: "
                f"{type(e).__name__}: {e}\n{spec.note}"
            ) from e
    arrays = [
        _tfds_split(builder, spec, split, cache_dir / f"{split}.npy" if cache else None)
        for split in splits
    ]
    return Dataset(
        name=spec.name,
        train=arrays[0],
        test=arrays[1],
        levels=256,
        description=f"TFDS {spec.tfds_name} {builder.version}, splits {'/'.join(splits)}",
    )


def _tfds_split(builder: Any, spec: _TfdsSpec, split: str, cache_path: Path | None) -> np.ndarray:
    """One split as uint8 [N, H, W, C], in TFDS's file order, memory-mapped from the cache."""
    if cache_path is not None and cache_path.is_file():
        return np.load(cache_path, mmap_mode="r")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    shape = spec.shape
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: tf.ensure_shape(ex["image"], shape))
    num = int(ds.cardinality())
    if num < 0:
        raise ValueError(f"{spec.name}/{split}: TFDS does not know the number of examples")
    out, tmp_path = None, None
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                dir=cache_path.parent, prefix=f".{split}.", suffix=".npy", delete=False
            ) as f:
                tmp_path = Path(f.name)
            out = np.lib.format.open_memmap(tmp_path, "w+", np.uint8, (num, *shape))
        except OSError as e:
            logger.warning(
                "Cannot cache %s/%s in %s (%s); keeping it in memory",
                spec.name,
                split,
                cache_path.parent,
                e,
            )
            if tmp_path is not None:
                tmp_path.unlink(missing_ok=True)
            out, tmp_path = None, None
    if out is None:
        out = np.empty((num, *shape), np.uint8)
    i = 0
    try:
        for chunk in tfds.as_numpy(ds.batch(_TFDS_CHUNK)):
            if i + len(chunk) > num:
                raise ValueError(f"{spec.name}/{split}: TFDS yielded more than {num} examples")
            out[i : i + len(chunk)] = chunk
            i += len(chunk)
        if i != num:
            raise ValueError(f"{spec.name}/{split}: TFDS yielded {i} examples, expected {num}")
    except tf.errors.InvalidArgumentError as e:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise ValueError(
            f"{spec.name}/{split}: TFDS yielded an image that is not {list(shape)}: {e.message}"
        ) from e
    except BaseException:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise
    if tmp_path is None:
        return _read_only(out)
    out.flush()
    del out
    os.replace(tmp_path, cache_path)  # Atomic: a reader never sees a half-written cache.
    return np.load(cache_path, mmap_mode="r")


_TFDS_SPECS = (
    _TfdsSpec("cifar10", "cifar10", "train", "test", (32, 32, 3)),
    _TfdsSpec(
        "imagenet32",
        "downsampled_imagenet/32x32",
        "train",
        "validation",
        (32, 32, 3),
        _IMAGENET32_NOTE,
    ),
    _TfdsSpec(
        "imagenet_resized32",
        "imagenet_resized/32x32",
        "train",
        "validation",
        (32, 32, 3),
        _IMAGENET_RESIZED32_NOTE,
    ),
    _TfdsSpec("mnist", "mnist", "train", "test", (28, 28, 1)),
    _TfdsSpec("fashion_mnist", "fashion_mnist", "train", "test", (28, 28, 1)),
)


# ------------------------------------------------------------------------------------------------
# Offline data sets: digits, npz, toy2d
# ------------------------------------------------------------------------------------------------


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: uint8 [N, 8, 8, 1] with 17 levels (0..16).

    1797 images in scikit-learn's order; the first 1497 are the training split, the last 300
    the test split. A contiguous split does not depend on any random number generator, so it
    is the same with every numpy version; the images are ordered roughly by writer, so the test
    digits come mostly from writers not seen in training. Every digit has 27..33 test images.
    """
    from sklearn.datasets import load_digits  # Lazy: scikit-learn takes ~1 s to import.

    images = load_digits().images  # float64 [1797, 8, 8], integers 0..16
    x = images.astype(np.uint8)[..., None]
    if x.shape[0] != DIGITS_NUM_TRAIN + DIGITS_NUM_TEST or not np.array_equal(x[..., 0], images):
        raise ValueError(f"unexpected scikit-learn digits: {images.shape}, not integers 0..16")
    return Dataset(
        name="digits",
        train=_read_only(x[:DIGITS_NUM_TRAIN].copy()),
        test=_read_only(x[DIGITS_NUM_TRAIN:].copy()),
        levels=17,
        description="scikit-learn digits, first 1497 train / last 300 test",
    )


def _read_images(path: PathLike, what: str, levels: int) -> np.ndarray:
    """Reads uint8 [N, H, W, C] images from key 'x' of an .npz (or from a .npy, memory-mapped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz data set: {what} file not found: {path}")
    if path.suffix == ".npy":
        x = np.load(path, mmap_mode="r")
    else:
        with np.load(path) as f:
            if "x" not in f.files:
                raise ValueError(
                    f"{path}: no array 'x' (it holds {f.files}); save images with "
                    "numpy.savez(path, x=images), images uint8 [N, H, W, C]"
                )
            x = f["x"]
    if x.dtype != np.uint8:
        raise ValueError(
            f"{path}: images 'x' must be uint8 (the exact integer pixels), got {x.dtype}; "
            "bits/dim are only meaningful for the original integer values"
        )
    if x.ndim != 4:
        hint = " (add the channel axis: x[..., None])" if x.ndim == 3 else ""
        raise ValueError(f"{path}: images 'x' must be [N, H, W, C], got shape {x.shape}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{path}: no images")
    if levels < 256 and int(x.max()) >= levels:
        raise ValueError(f"{path}: pixel value {int(x.max())} >= levels={levels}")
    return x if isinstance(x, np.memmap) else _read_only(x)


def _load_npz(
    *,
    train_file: PathLike,
    test_file: PathLike | None = None,
    levels: int = 256,
) -> Dataset:
    """The user's own images: uint8 [N, H, W, C] under key 'x' of an .npz (or a plain .npy).

    Args:
      train_file: training images.
      test_file: test images with the same H, W, C; without it the test split is empty.
      levels: quantization levels of the pixels (values must lie in 0..levels-1).
    """
    train = _read_images(train_file, "train", levels)
    if test_file is None:
        test = _read_only(np.zeros((0, *train.shape[1:]), np.uint8))
    else:
        test = _read_images(test_file, "test", levels)
        if test.shape[1:] != train.shape[1:]:
            raise ValueError(
                f"npz data set: test images {list(test.shape[1:])} ({test_file}) differ from "
                f"train images {list(train.shape[1:])} ({train_file})"
            )
    return Dataset(
        name="npz",
        train=train,
        test=test,
        levels=levels,
        description=f"npz train={train_file} test={test_file}",
    )


def _checkerboard(rng: np.random.Generator, num: int) -> np.ndarray:
    x1 = rng.random(num) * 4 - 2
    x2 = rng.random(num) - rng.integers(0, 2, num) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2  # 8 squares of side 2 in [-4, 4]^2


def _eight_gaussians(rng: np.random.Generator, num: int) -> np.ndarray:
    angles = np.arange(8) * (np.pi / 4)
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    x = 0.5 * rng.standard_normal((num, 2)) + centers[rng.integers(0, 8, num)]
    return x / np.sqrt(2.0)


def _moons(rng: np.random.Generator, num: int) -> np.ndarray:
    t = rng.uniform(0.0, np.pi, num)
    inner = rng.integers(0, 2, num).astype(bool)
    x = np.where(inner, 1 - np.cos(t), np.cos(t))
    y = np.where(inner, 0.5 - np.sin(t), np.sin(t))
    pts = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((num, 2))
    return pts * 2 + np.array([-1.0, -0.2])


def _swissroll(rng: np.random.Generator, num: int) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.random(num))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.standard_normal((num, 2))
    return pts / 5


_TOY2D_SAMPLERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "swissroll": _swissroll,
}


def sample_toy2d(rng: np.random.Generator, distribution: str, num: int) -> np.ndarray:
    """Draws `num` points of a 2-D toy distribution (the FFJORD `toy_data.py` definitions).

    Args:
      rng: numpy Generator (the draw is a deterministic function of its state).
      distribution: one of `TOY2D_DISTRIBUTIONS`: 'checkerboard' (uniform on 8 squares of
        [-4, 4]^2), '8gaussians' (std 0.5/sqrt 2 around 8 points at radius 4/sqrt 2), 'moons'
        (two half circles, noise 0.1, scaled by 2), 'swissroll' (noise 1, scaled by 1/5).
      num: number of points.

    Returns:
      float32 [num, 2].
    """
    if distribution not in _TOY2D_SAMPLERS:
        raise ValueError(
            f"unknown toy2d distribution {distribution!r}; choose one of {TOY2D_DISTRIBUTIONS}"
        )
    return _TOY2D_SAMPLERS[distribution](rng, num).astype(np.float32)


def _load_toy2d(
    *,
    distribution: str = "checkerboard",
    num_train: int = 50_000,
    num_test: int = 10_000,
    seed: int = 0,
) -> Dataset:
    """Continuous 2-D toy data: float32 [N, 2], levels None (NLL in nats, no bits/dim).

    Train and test are independent draws from numpy Generators seeded with (seed, 0) and
    (seed, 1).
    """
    if distribution not in TOY2D_DISTRIBUTIONS:
        raise ValueError(
            f"unknown toy2d distribution {distribution!r}; choose one of {TOY2D_DISTRIBUTIONS}"
        )
    train = sample_toy2d(np.random.default_rng([seed, 0]), distribution, num_train)
    test = sample_toy2d(np.random.default_rng([seed, 1]), distribution, num_test)
    return Dataset(
        name="toy2d",
        train=_read_only(train),
        test=_read_only(test),
        levels=None,
        description=f"toy2d {distribution}, seed {seed}",
    )


# ------------------------------------------------------------------------------------------------
# Data sets by name
# ------------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., Dataset]] = {
    **{spec.name: functools.partial(_load_tfds, spec) for spec in _TFDS_SPECS},
    "digits": _load_digits,
    "npz": _load_npz,
    "toy2d": _load_toy2d,
}


def load(name: str, **options: Any) -> Dataset:
    """Loads a data set by name.

    Options per name (all keyword):
      cifar10, imagenet32, imagenet_resized32, mnist, fashion_mnist:
        data_dir=None (TFDS data dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets),
        download=False (allow TFDS to download and prepare; needs network),
        cache=True (decode once into <data_dir>/mlscore_jax_cache/... .npy and memory-map it).
      digits: none.
      npz: train_file (required), test_file=None, levels=256.
      toy2d: distribution='checkerboard' (one of TOY2D_DISTRIBUTIONS), num_train=50_000,
        num_test=10_000, seed=0.

    Raises:
      ValueError: unknown name (the message lists the choices) or bad data.
      TypeError: an option the data set does not take, or a missing required one.
      DatasetNotPreparedError: a TFDS data set is not prepared in data_dir and download=False.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    loader = DATASETS[name]
    params = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        takes = ", ".join(sorted(params)) or "no options"
        raise TypeError(f"data set {name!r} does not take option(s) {unknown}; it takes: {takes}")
    missing = [p for p, v in params.items() if v.default is v.empty and p not in options]
    if missing:
        raise TypeError(f"data set {name!r} needs option(s) {missing}")
    return loader(**options)
