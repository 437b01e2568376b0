"""Single-image file I/O for the CLI: read one image, write a PNG grid.

* `load_image_file(path, resolution)`: (resolution, resolution, 3) float32 in
  [-1, 1], with the evaluation transform (shorter side to
  round(resolution * 1.125), LANCZOS, centre crop).
* `save_image_grid(images, path, nrow)`: (N, H, W, 3) in [-1, 1] -> one PNG.
* `to_uint8(images)`: [-1, 1] -> uint8 as floor(127.5 (x + 1) + 0.5), clipped;
  the inverse of `transforms.to_model_input` on uint8 inputs.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from imagefolder_jax.data import transforms as T


def load_image_file(
    path: str | os.PathLike[str],
    resolution: int,
    *,
    resize_ratio: float = 1.125,
    resample: str = "lanczos",
) -> np.ndarray:
  """Reads an image file as model input.

  Returns:
    (resolution, resolution, 3) float32 in [-1, 1].

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file cannot be decoded as an image (message names it).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file {path!r} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    image = T.decode_image(data)
  except ValueError as e:
    raise ValueError(f"cannot read image file {path!r}: {e}") from e
  image = T.center_crop_resize(image, resolution, resize_ratio=resize_ratio, resample=resample)
  return T.to_model_input(image)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """(..., 3) float in [-1, 1] -> uint8 floor(127.5 (x + 1) + 0.5), clipped to [0, 255] (the ADM
  evaluator's rounding: halves go up)."""
  x = np.floor(127.5 * (np.asarray(images, np.float32) + 1.0) + 0.5)
  return np.clip(x, 0, 255).astype(np.uint8)


def image_grid(
    images: np.ndarray,
    nrow: int,
    *,
    padding: int = 2,
    pad_value: float = 1.0,
) -> np.ndarray:
  """Tiles images row-major, `nrow` images per row (torchvision's make_grid layout).

  Args:
    images: (N, H, W, 3) float in [-1, 1].
    nrow: images per row; rows = ceil(N / nrow).
    padding: pixels between and around tiles.
    pad_value: border colour in [-1, 1] (1.0 is white).

  Returns:
    (rows * (H + padding) + padding, cols * (W + padding) + padding, 3) uint8
    with cols = min(nrow, N);
    tile (r, c) starts at (padding + r * (H + padding), padding + c * (W + padding)).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
  if nrow < 1:
    raise ValueError(f"nrow must be >= 1, got {nrow}")
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}")
  n, h, w, _ = images.shape
  cols, rows = min(nrow, max(n, 1)), math.ceil(n / nrow)
  grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3),
                 to_uint8(np.float32(pad_value)), np.uint8)
  tiles = to_uint8(images)
  for i in range(n):
    r, c = divmod(i, nrow)
    top, left = padding + r * (h + padding), padding + c * (w + padding)
    grid[top:top + h, left:left + w] = tiles[i]
  return grid


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike[str],
    nrow: int = 8,
    *,
    padding: int = 2,
    pad_value: float = 1.0,
) -> None:
  """Writes (N, H, W, 3) images in [-1, 1] as one PNG grid (see `image_grid`)."""
  grid = image_grid(images, nrow, padding=padding, pad_value=pad_value)
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(grid).save(path, format="PNG")
