"""Bits/dim of your own image files under a trained model, one number per image.

    python -m mlscore_jax.nll --config configs/cpu/digits_mlp.py --workdir runs/digits_mlp \\
        [--method ode|bound] [--num_repeats K] [--csv OUT.csv] [--config.eval.xxx=...] \\
        FILE [FILE ...]

The score model is restored from WORKDIR exactly as `--mode eval` restores it
(`train.restore_params`: checkpoint `eval.ckpt_step`, EMA parameters per `eval.use_ema`), with
the dequantization of `eval.dequantization` (`evaluate.dequantizer_of`: 'variational' reads
WORKDIR/dequantizer). `--method ode` (the default) computes the probability-flow ODE bits/dim
only, `--method bound` the variational bound only; `--num_repeats K` replaces
`eval.num_repeats`. Every other setting (batch size, seed, tolerances, ...) is the config's.

Inputs (`read_images`):

* any file Pillow reads (PNG, JPEG, ...): one image. 1-channel models take grayscale files,
  3-channel models RGB files; palette, alpha (fully opaque only), bilevel and CMYK files are
  converted to grayscale / RGB. A file whose content has the other channel count is an error,
  except an RGB file whose three channels are equal, which a 1-channel model reads as
  grayscale. Pixel values are used as stored: an 8-bit PNG of `digits` (17 levels) holds the
  values 0..16, not 0..255. JPEG is lossy: its pixels are what the decoder gives.
* `.npz` (the array `x`, else the only array) or `.npy`: integer images [N, H, W, C], one image
  [H, W, C], or [N, H, W] / [H, W] for 1-channel models; named FILE[i].

Images are never resized or converted in a way that changes their values: a wrong size or
channel count, a transparent pixel or a value >= the data set's levels is an error naming the
file (exit status 2, one line, as in `mlscore_jax.main`). Files that are not images at all (a
text file, a truncated PNG) are reported on stderr as skipped and the others evaluated.

The images, stacked in the order given into one uint8 array, go through
`evaluate.evaluate_split` with the configured settings, so every number equals what the
evaluation path gives for the same array (same batches, same keys, bit for bit). The
per-batch results live in WORKDIR/nll/<dir>, <dir> named from the checkpoint step, EMA/raw,
the method and a digest of the pixels and the settings: a rerun resumes and never mixes
results of other images, checkpoints or settings.

The table on stdout (also written as CSV: WORKDIR/nll/<dir>/nll.csv, or --csv) has per image
the bits/dim (mean over the K repeats), its Monte-Carlo standard error (std over repeats /
sqrt(K) for K > 1; for K = 1 the bound's own error from its time draws, '-' for the ODE) and
the NFE: vector-field evaluations of that image's adaptive ODE solve, counted as in
`likelihood.ode_nll` (start-up plus the solver's stages per attempted step, each one drift and
one VJP through the network; mean over repeats; '-' for the bound). A last row gives the
means over the images, with the Monte-Carlo error of the mean.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import os
import sys
import zipfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from mlscore_jax import experiment
from mlscore_jax.settings import BpdSettings

logger = logging.getLogger(__name__)

METHODS = ("ode", "bound")
ARRAY_SUFFIXES = (".npz", ".npy")


class NotAnImage(Exception):
    """The file is not an image (or image array) at all: it is skipped, not an error."""


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------


def _fmt(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _check_values(name: str, x: np.ndarray, levels: int) -> np.ndarray:
    """x (integers) as uint8, or ValueError if a value lies outside 0..levels-1."""
    if x.dtype.kind not in "ui":
        raise ValueError(
            f"{name}: pixels must be integers (uint8), got {x.dtype}; bits/dim are only "
            "meaningful for the exact integer pixel values"
        )
    if x.size and int(x.min()) < 0:
        raise ValueError(f"{name}: negative pixel value {int(x.min())}")
    if x.size and int(x.max()) >= levels:
        hint = f" (this data set's pixels are 0..{levels - 1}" + (
            ", not 0..255)" if levels < 256 else ")"
        )
        raise ValueError(f"{name}: pixel value {int(x.max())} >= levels={levels}{hint}")
    return x.astype(np.uint8)


def _decode(path: str) -> np.ndarray:
    """The pixels of an image file as Pillow stores them: [H, W] or [H, W, C] (C = 2, 3, 4 with
    alpha last), palette / bilevel / CMYK-like modes converted; NotAnImage if it is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ValueError(
                    f"{path}: {frames} frames; save them as separate files or one .npz"
                )
            if img.mode in ("P", "PA"):
                has_alpha = img.mode == "PA" or "transparency" in img.info
                img = img.convert("RGBA" if has_alpha else "RGB")
            elif img.mode == "1":
                img = img.convert("L")  # as displayed: 0 / 255
            elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif img.mode in ("La", "RGBa"):  # premultiplied alpha
                img = img.convert(img.mode[:-1] + "A")
            mode = img.mode
            x = np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        if isinstance(e, FileNotFoundError | IsADirectoryError):
            raise
        raise NotAnImage(f"not a readable image ({e})") from e
    if mode == "F":
        raise ValueError(f"{path}: floating-point pixels (mode F); integer pixels are needed")
    if mode in ("LA", "RGBA"):
        alpha = x[..., -1]
        if not (alpha == 255).all():
            raise ValueError(
                f"{path}: transparent pixels (mode {mode}, alpha < 255 in {(alpha != 255).sum()} "
                "pixels); the model has no alpha channel: flatten the image first"
            )
        x = x[..., :-1]
        if x.shape[-1] == 1:
            x = x[..., 0]
    return x


def _read_image_file(path: str, example_shape: tuple[int, ...], levels: int) -> np.ndarray:
    """One image file as uint8 [H, W, C] of example_shape (see `read_images`)."""
    x = _decode(path)
    h, w, c = example_shape
    grayscale = x.ndim == 2
    shown = x.shape + (1,) if grayscale else x.shape
    if shown[:2] != (h, w):
        raise ValueError(
            f"{path}: image of shape {_fmt(shown)}, but the model takes {_fmt(example_shape)} "
            "(images are not resized)"
        )
    if c == 1 and not grayscale:
        if not (x == x[..., :1]).all():
            raise ValueError(
                f"{path}: colour image of shape {_fmt(shown)} (its channels differ), but the "
                f"model takes grayscale images of shape {_fmt(example_shape)}"
            )
        x = x[..., 0]  # an RGB file of a grayscale image
    elif c == 3 and grayscale:
        raise ValueError(
            f"{path}: grayscale image of shape {_fmt(shown)}, but the model takes RGB images of "
            f"shape {_fmt(example_shape)}"
        )
    elif c not in (1, 3):
        raise ValueError(
            f"{path}: image of shape {_fmt(shown)}, but the model takes {_fmt(example_shape)}: "
            "image files give 1 or 3 channels; pass the images as an .npz or .npy"
        )
    x = x[..., None] if x.ndim == 2 else x
    return _check_values(path, x, levels)


def _read_array_file(path: str, example_shape: tuple[int, ...], levels: int) -> np.ndarray:
    """The images of an .npz / .npy as uint8 [N, H, W, C] of example_shape (see `read_images`)."""
    if path.lower().endswith(".npz"):
        if not zipfile.is_zipfile(path):
            raise NotAnImage("not an .npz (zip) file")
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.files)
                key = "x" if "x" in keys else keys[0] if len(keys) == 1 else None
                x = f[key] if key is not None else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise NotAnImage(f"not a readable .npz ({e})") from e
        if not keys:
            raise NotAnImage("holds no arrays")
        if x is None:
            raise ValueError(
                f"{path}: holds the arrays {keys} and none is named 'x': which are the images? "
                "save them as numpy.savez(path, x=images)"
            )
    else:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise NotAnImage("not a .npy file")
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise NotAnImage(f"not a readable .npy ({e})") from e
    h, w, c = example_shape
    shape = x.shape
    if x.ndim == 3 and shape == (h, w, c):
        x = x[None]
    elif x.ndim == 3 and c == 1 and shape[1:] == (h, w):
        x = x[..., None]
    elif x.ndim == 2 and c == 1 and shape == (h, w):
        x = x[None, ..., None]
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        raise ValueError(
            f"{path}: images of shape {_fmt(shape)}, but the model takes {_fmt(example_shape)} "
            "(an array [N, H, W, C], [H, W, C] or, for one channel, [N, H, W]; no resizing)"
        )
    if x.shape[0] == 0:
        raise NotAnImage("holds no images")
    if x.dtype.kind in "ui":  # name the first image with a bad value
        flat = x.reshape(x.shape[0], -1)
        bad = (flat.min(axis=1) < 0) | (flat.max(axis=1) >= levels)
        if bad.any():
            first = int(np.argmax(bad))
            _check_values(f"{path}[{first}]", x[first], levels)
    return _check_values(path, x, levels)


def read_images(
    paths: Sequence[str | os.PathLike], example_shape: Sequence[int], levels: int
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Read image files for a model of images `example_shape` (H, W, C) with `levels` levels.

    Args:
      paths: image files (anything Pillow reads: one image each) and `.npz` (array `x`, else
        the only array) / `.npy` files of integer images [N, H, W, C] ([H, W, C]: one image;
        [N, H, W] or [H, W] for C = 1), in the order to evaluate them.
      example_shape: (H, W, C) of the model's images (`Experiment.example_shape`).
      levels: quantization levels (`Experiment.preprocessing.levels`); pixels must be
        0..levels-1.

    Returns:
      (names, images, skipped): a name per image (the path; FILE[i] for the i-th image of an
      array file), uint8 [N, H, W, C] images in that order, and (path, reason) of every file
      that is not an image at all (skipped).

    Raises:
      FileNotFoundError: a path does not exist or is not a file.
      ValueError: an image of another size or channel count (naming the file, its shape and
        example_shape), with transparent pixels, or with values outside 0..levels-1; an .npz
        with several arrays and none named 'x'.
    """
    example_shape = tuple(int(s) for s in example_shape)
    if len(example_shape) != 3:
        raise ValueError(
            f"image files need a model of images [H, W, C]; this one takes {_fmt(example_shape)}"
        )
    names: list[str] = []
    arrays: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        path = os.fspath(p)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            if path.lower().endswith(ARRAY_SUFFIXES):
                x = _read_array_file(path, example_shape, levels)
                names += [f"{path}[{i}]" for i in range(x.shape[0])]
                arrays.append(x)
            else:
                arrays.append(_read_image_file(path, example_shape, levels)[None])
                names.append(path)
        except NotAnImage as e:
            skipped.append((path, str(e)))
    images = np.concatenate(arrays) if arrays else np.zeros((0, *example_shape), np.uint8)
    return names, images, skipped


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def settings_for(
    bpd: BpdSettings, method: str = "ode", num_repeats: int | None = None
) -> BpdSettings:
    """The configured bits/dim settings computing only `method` ('ode' or 'bound'), with
    `num_repeats` repeats (None: the configured number)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    changes: dict[str, Any] = {"ode": method == "ode", "bound": method == "bound"}
    if num_repeats is not None:
        changes["num_repeats"] = int(num_repeats)
    return dataclasses.replace(bpd, **changes)


def images_digest(images: np.ndarray) -> str:
    """sha256 (hex) of the pixels, their order, dtype and shape."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{images.dtype.str}{list(images.shape)}".encode())
    h.update(images.tobytes())
    return h.hexdigest()


def output_dir(
    workdir: str,
    images: np.ndarray,
    settings: BpdSettings,
    *,
    step: int,
    use_ema: bool,
    deq_step: int | None = None,
) -> str:
    """WORKDIR/nll/step<step>[_deq<deq step>]_<ema|raw>_<method>_<digest>: the digest covers the
    pixels and every setting, so other images or settings never share a directory."""
    method = "+".join(m for m in METHODS if getattr(settings, m))
    digest = hashlib.sha256(f"{images_digest(images)} {settings.digest()}".encode()).hexdigest()
    deq = f"_deq{deq_step}" if deq_step is not None else ""
    kind = "ema" if use_ema else "raw"
    return os.path.join(workdir, "nll", f"step{step}{deq}_{kind}_{method}_{digest[:12]}")


class ImagesResult(NamedTuple):
    """What `evaluate_images` computed."""

    out_dir: str  # the per-batch results, per_image.npz and metrics.json
    settings: BpdSettings
    step: int  # the checkpoint's step
    per: dict[str, np.ndarray]  # per-image arrays [R, N] ('ode', 'ode_nfe', 'bound', ...)
    metrics: dict[str, Any]  # evaluate_split's metrics


def evaluate_images(
    exp: experiment.Experiment,
    workdir: str,
    images: np.ndarray,
    *,
    method: str = "ode",
    num_repeats: int | None = None,
    names: Sequence[str] | None = None,
    mesh: Any = None,
    progress: bool = False,
) -> ImagesResult:
    """Bits/dim of `images` (uint8 [N, H, W, C]) under the checkpoint of `workdir`.

    The model and dequantizer are restored as `evaluate.evaluate` restores them; the images go
    through `evaluate.evaluate_split` with `settings_for(exp.eval.bpd, method, num_repeats)`
    into `output_dir(...)` (resumed if it exists). `names` are recorded in metrics.json.
    """
    from mlscore_jax import evaluate, parallel
    from mlscore_jax.train import restore_params

    if exp.preprocessing.levels is None:
        raise ValueError(
            f"{exp.dataset.name} is continuous data: bits/dim of image files need an image model"
        )
    if images.shape[0] == 0:
        raise ValueError("no images to evaluate")
    settings = settings_for(exp.eval.bpd, method, num_repeats)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    params, step = restore_params(exp, workdir, mesh)
    metrics = evaluate.bits_per_dim(
        exp,
        workdir,
        images,
        settings,
        lambda deq_step: output_dir(
            workdir, images, settings, step=step, use_ema=exp.eval.use_ema, deq_step=deq_step
        ),
        params=params,
        step=step,
        mesh=mesh,
        info={"files": list(names)} if names is not None else None,
        progress=progress,
    )
    out_dir = metrics["dir"]
    with np.load(os.path.join(out_dir, "per_image.npz")) as f:
        per = {k: f[k] for k in f.files}
    return ImagesResult(out_dir, settings, step, per, metrics)


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


class Row(NamedTuple):
    """One line of the table: None where a number does not apply ('-')."""

    file: str
    bpd: float
    stderr: float | None
    nfe: float | None


def per_image_table(names: Sequence[str], per: dict[str, np.ndarray], method: str) -> list[Row]:
    """Rows per image, then a 'mean' row, from evaluate_split's per-image arrays.

    Args:
      names: one per image.
      per: arrays [R, N] of per_image.npz: `method` ('ode' or 'bound'), 'ode_nfe' for the ODE,
        'bound_stderr' for the bound.
      method: 'ode' or 'bound'.

    Returns:
      Per image: bits/dim = the mean over the R repeats; stderr = the std over repeats (ddof 1)
      / sqrt(R) for R > 1, for R = 1 the bound's own Monte-Carlo error (sqrt(sum_r se_r^2) / R)
      and None for the ODE; nfe = the mean ODE NFE (None for the bound). The last row, 'mean',
      has the mean over images, the Monte-Carlo error of that mean (of the R repeat means, or
      from the bound's draws) and the mean NFE: the numbers of evaluate's metrics.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    values = per[method].astype(np.float64)  # [R, N]
    num_repeats, num = values.shape
    if len(names) != num:
        raise ValueError(f"{len(names)} names for {num} images")
    draws = per.get(f"{method}_stderr")
    var = None if draws is None else draws.astype(np.float64) ** 2
    nfe = per["ode_nfe"].astype(np.float64) if method == "ode" else None

    def stderr(v: np.ndarray, var_sum: np.ndarray | None, count: int) -> np.ndarray | None:
        """v: [R, ...] repeat values; var_sum: summed draw variances of count estimates."""
        if num_repeats > 1:
            return v.std(axis=0, ddof=1) / math.sqrt(num_repeats)
        if var_sum is not None:
            return np.sqrt(var_sum) / count
        return None

    se = stderr(values, None if var is None else var.sum(axis=0), num_repeats)
    rows = [
        Row(
            str(name),
            float(values[:, i].mean()),
            None if se is None else float(se[i]),
            None if nfe is None else float(nfe[:, i].mean()),
        )
        for i, name in enumerate(names)
    ]
    se_mean = stderr(values.mean(axis=1), None if var is None else var.sum(), num_repeats * num)
    rows.append(
        Row(
            "mean",
            float(values.mean()),
            None if se_mean is None else float(se_mean),
            None if nfe is None else float(nfe.mean()),
        )
    )
    return rows


def format_table(rows: Sequence[Row], unit: str = "bits/dim") -> str:
    """The rows as an aligned text table (file, bits/dim, stderr, NFE; '-' where none)."""

    def num(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    cells = [("file", unit, "stderr", "NFE")]
    cells += [(r.file, num(r.bpd, 4), num(r.stderr, 4), num(r.nfe, 1)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for k, c in enumerate(cells):
        if k == len(cells) - 1 and len(cells) > 2:
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join([c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in (1, 2, 3)])
        )
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: str) -> None:
    """The rows as CSV (file, bits_per_dim, stderr, nfe): full precision, empty where none."""

    def num(v: float | None) -> str:
        return "" if v is None else repr(v)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file", "bits_per_dim", "stderr", "nfe"])
        for r in rows:
            out.writerow([r.file, num(r.bpd), num(r.stderr), num(r.nfe)])


class FilesResult(NamedTuple):
    """What `nll_of_files` computed and wrote."""

    rows: list[Row]  # per image, then 'mean'
    skipped: list[tuple[str, str]]  # (path, reason) of the files that are not images
    csv_path: str
    images: ImagesResult


def nll_of_files(
    exp: experiment.Experiment,
    workdir: str,
    paths: Sequence[str | os.PathLike],
    *,
    method: str = "ode",
    num_repeats: int | None = None,
    csv_path: str | None = None,
    progress: bool = False,
) -> FilesResult:
    """What the command does, without printing: read the files (`read_images`; skipped ones are
    logged as warnings), evaluate them (`evaluate_images`), build the table (`per_image_table`)
    and write it as CSV to `csv_path` (default <output dir>/nll.csv).

    Raises:
      ValueError: a bad image (see `read_images`), or no image left after skipping.
    """
    settings_for(exp.eval.bpd, method, num_repeats)  # bad arguments fail before reading
    if exp.preprocessing.levels is None:
        raise ValueError(
            f"{exp.dataset.name} is continuous data: bits/dim of image files need an image model"
        )
    names, images, skipped = read_images(paths, exp.example_shape, exp.preprocessing.levels)
    for path, reason in skipped:
        logger.warning("skipped %s: %s", path, reason)
    if images.shape[0] == 0:
        raise ValueError(f"no images to evaluate: all {len(skipped)} files were skipped")
    logger.info(
        "%d images from %d files (%d skipped), method %s", len(names), len(paths), len(skipped),
        method,
    )  # fmt: skip
    result = evaluate_images(
        exp,
        workdir,
        images,
        method=method,
        num_repeats=num_repeats,
        names=names,
        progress=progress,
    )
    rows = per_image_table(names, result.per, method)
    csv_path = csv_path or os.path.join(result.out_dir, "nll.csv")
    write_csv(rows, csv_path)
    return FilesResult(rows, skipped, csv_path, result)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def _define_flags() -> None:
    """The flags, defined only when run as a program (importing this module defines none, so
    it can be imported next to `mlscore_jax.main`)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The training run's directory (results in WORKDIR/nll).")
    flags.DEFINE_enum(
        "method", "ode", list(METHODS), "ode: probability-flow ODE bits/dim; bound: the bound."
    )
    flags.DEFINE_integer("num_repeats", None, "Repeats per image (default: eval.num_repeats).")
    flags.DEFINE_string("csv", None, "Where to write the table as CSV (default: in WORKDIR/nll).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool("verbose", False, "Show tracebacks and every log record's origin.")
    flags.mark_flags_as_required(["config", "workdir"])


def _main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from mlscore_jax import logs

    FLAGS = flags.FLAGS
    paths = argv[1:]
    if not paths:
        raise app.UsageError("no image files given: python -m mlscore_jax.nll ... FILE [FILE ...]")
    log_file = os.path.join(FLAGS.workdir, "nll", "log.txt")
    logs.setup(log_file, verbose=FLAGS.verbose)
    logger.info("command: %s", " ".join(sys.argv))
    with logs.user_errors(log_file, verbose=FLAGS.verbose):
        if FLAGS.num_repeats is not None and FLAGS.num_repeats < 1:
            raise ValueError(f"--num_repeats must be >= 1, got {FLAGS.num_repeats}")
        config_file = config_flags.get_config_filename(FLAGS["config"])
        exp = experiment.from_config(FLAGS.config, source=config_file, require_data=False)
        result = nll_of_files(
            exp,
            FLAGS.workdir,
            paths,
            method=FLAGS.method,
            num_repeats=FLAGS.num_repeats,
            csv_path=FLAGS.csv,
            progress=FLAGS.progress,
        )
    s = result.images.settings
    logger.info(
        "%s bits/dim, checkpoint step %d (%s), %s dequantization, %d repeat(s)",
        FLAGS.method, result.images.step, "EMA" if exp.eval.use_ema else "raw",
        s.dequantization, s.num_repeats,
    )  # fmt: skip
    print(format_table(result.rows, f"{FLAGS.method} bits/dim"), flush=True)
    logger.info("CSV written to %s (results in %s)", result.csv_path, result.images.out_dir)


def cli() -> None:
    """Entry point: `python -m mlscore_jax.nll`."""
    from absl import app

    _define_flags()
    app.run(_main)


if __name__ == "__main__":
    cli()
