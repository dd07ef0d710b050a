"""Image grids and PNG output for samples in [-1, 1] (NHWC)."""
from __future__ import annotations

import os

import numpy as np


def to_uint8(x) -> np.ndarray:
    """[..., H, W, C] floats in [-1, 1] -> uint8 in [0, 255] (clipped)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, ncol: int, *, pad: int = 1, pad_value: float = 1.0, upscale: int = 1) -> np.ndarray:
    """Tile images [N, H, W, C] (in [-1, 1]) into one uint8 image [rows*(H+pad)+pad, ..., C].

    Missing cells (N not a multiple of ncol) are left as padding. ``upscale`` repeats pixels
    (nearest neighbour) so 32x32 samples stay legible.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects [N, H, W, C], got shape {images.shape}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return to_uint8(grid)


def save_png(path: str, image_uint8: np.ndarray) -> str:
    """Write a uint8 [H, W, C] array as PNG (atomically: write then rename). Returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8
    tmp = path + ".tmp.png"
    Image.fromarray(img).save(tmp)
    os.replace(tmp, path)
    return path
