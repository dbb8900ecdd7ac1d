"""Files a run writes for people to look at: PNG grids of images and sample archives.

`save_image_grid` writes a batch of uint8 images as one PNG; `write_samples` stores samples in
model space (`.npz`, with their NFE) and, for quantized images, as a PNG grid of their levels.
"""

from __future__ import annotations

import io
import math
from typing import Any

import jax
import numpy as np
from etils import epath
from PIL import Image

from mlscore_jax import bpd

Array = jax.Array


def save_image_grid(
    path: str | epath.PathLike,
    images: Array | np.ndarray,
    nrow: int | None = None,
    *,
    padding: int = 2,
    scale: int | None = None,
) -> tuple[int, int]:
    """Write uint8 images [B, H, W, C] (C = 1 or 3) as one PNG grid; returns its (width, height).

    Images are laid out row-major, `nrow` per row (default ceil(sqrt(B))), each scaled up by the
    integer `scale` with nearest-neighbour repetition (default: the smallest making every image at
    least 32 px on its shorter side, so 8x8 samples stay viewable), separated and framed by
    `padding` black pixels. The grid is (ncol (W scale + p) + p) wide and (nrows (H scale + p) + p)
    high. Parent directories are created.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images [B, H, W, 1 or 3], got {images.dtype} {images.shape};"
            " convert model-space samples with bpd.to_uint"
        )
    b, h, w, c = images.shape
    if scale is None:
        scale = max(1, math.ceil(32 / min(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = min(b, nrow or math.ceil(math.sqrt(b)))
    nrows = math.ceil(b / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = image
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)  # "L" or "RGB"
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return pil.size


def write_samples(
    prefix: str,
    x: Array | np.ndarray,
    nfe: Array | np.ndarray,
    *,
    levels: int | None,
    centered: bool = True,
) -> dict[str, Any]:
    """Write samples `x` [B, ...] (model space) to prefix.npz and, for images, prefix.png.

    Args:
      prefix: path without extension; parent directories are created.
      x: samples in model space ([B, H, W, C] images or [B, D] points).
      nfe: [B] score evaluations per sample.
      levels: quantization levels of the data (None: continuous, no PNG).
      centered: whether model space is [-1, 1).

    Returns:
      {'npz': path, 'png': path or absent}.
    """
    x = np.asarray(x)
    path = epath.Path(prefix + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, nfe=np.asarray(nfe))
    path.write_bytes(buffer.getvalue())
    out: dict[str, Any] = {"npz": str(path)}
    if levels is not None and x.ndim == 4:
        images = np.asarray(bpd.to_uint(x, levels=levels, centered=centered), np.float64)
        # Show the levels as intensities 0..255 (digits have 17 levels).
        images = np.round(images * (255.0 / (levels - 1))).astype(np.uint8)
        save_image_grid(prefix + ".png", images)
        out["png"] = prefix + ".png"
    return out
