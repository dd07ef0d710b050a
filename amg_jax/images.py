"""Image grids and PNG output for samples in [-1, 1] (NHWC)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(x) -> np.ndarray:
    """[..., H, W, C] floats in [-1, 1] -> uint8 in [0, 255] (clipped; NaN -> gray, not an undefined cast)."""
    x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0)
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


def label_rows(grid_uint8: np.ndarray, labels, *, cell: int, pad: int = 1, header=None,
               margin: int = 72) -> np.ndarray:
    """Add a white left margin with one text label per grid row (rows ``cell + pad`` apart, as
    ``image_grid`` lays them out) and, optionally, a top ``header`` line. uint8 [H', W', C]."""
    g = np.asarray(grid_uint8, np.uint8)
    top = 14 if header else 0
    canvas = Image.new("RGB", (g.shape[1] + margin, g.shape[0] + top), (255, 255, 255))
    canvas.paste(Image.fromarray(g if g.shape[-1] == 3 else np.repeat(g[..., :1], 3, axis=-1)), (margin, top))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(labels):
        draw.text((3, top + pad + r * (cell + pad) + cell // 2 - 5), str(text), fill=(0, 0, 0))
    if header:
        draw.text((margin + 2, 1), str(header), fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png(path: str, image_uint8: np.ndarray) -> str:
    """Write a uint8 [H, W, C] array as PNG (atomically: write then rename). Returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8
    tmp = path + ".tmp.png"
    Image.fromarray(img).save(tmp)
    os.replace(tmp, path)
    return path
