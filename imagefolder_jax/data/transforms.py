"""Per-record grain transforms: decode, augment, normalise.

A record from any source in `imagefolder_jax.data.sources` is a dict
`{'image': encoded bytes | (H, W[, C]) uint8, 'label': int, 'id': str}`.
The pipeline (see `pipeline.make_loader`) applies, in order:

1. `DecodeImage` (MapTransform): PIL decode, convert grayscale / RGBA /
   palette / CMYK to RGB -> (H, W, 3) uint8. A record that cannot be read or
   decoded becomes `None`; it is counted in a `SkipCounter` and logged.
2. `DropSkipped` (FilterTransform): drops those `None` records, so one corrupt
   file never stops training and batches stay full.
3. Train: `RandomCropFlip` (RandomMapTransform). A square crop whose side is
   `round(sqrt(U(min_area, max_area)) * short_side)` (area fraction 0.8-1 of
   the largest centred square by default) at a uniformly random position, PIL
   resize to `resolution` (LANCZOS by default), then a horizontal flip with
   probability 0.5.
   Eval: `CenterCropResize` (MapTransform): the torchvision validation
   transform `Resize(round(resolution * resize_ratio), LANCZOS)` +
   `CenterCrop(resolution)`, i.e. Resize(288) + CenterCrop(256) at 256 px.
4. `ToModelInput` (MapTransform): `{'image': (H, W, 3) float32 in [-1, 1]
   (x / 127.5 - 1), 'label': int32}`; every other key is dropped.

The pure functions behind the transforms (`decode_image`, `sample_crop_box`,
`random_crop_flip`, `center_crop_resize`, `to_model_input`) are public so the
CLI and tests reuse exactly the same numerics.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import threading
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image

_log = logging.getLogger(__name__)

# PIL filters by name, so configs can hold strings.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _resample(name: str) -> Image.Resampling:
  try:
    return RESAMPLE[name]
  except KeyError:
    raise ValueError(
        f"unknown resample filter {name!r}; expected one of {sorted(RESAMPLE)}"
    ) from None


class SkipCounter:
  """Thread-safe count of records dropped because they could not be decoded.

  The first `log_first` skips are logged with `logging.warning` naming the
  record id and the error; later ones are only counted.

  With `worker_count=0` the decode runs in threads of this process and
  `count` is exact. With multiprocess workers (`worker_count > 0`) each worker
  holds its own copy of the counter (it is pickled into the worker), so the
  parent's `count` stays 0; the workers' warnings still reach the log.
  """

  def __init__(self, log_first: int = 10):
    self.log_first = log_first
    self._count = 0
    self._lock = threading.Lock()

  @property
  def count(self) -> int:
    """Number of records skipped so far in this process."""
    with self._lock:
      return self._count

  def record(self, record_id: str, error: str) -> None:
    """Counts one skipped record and logs it if among the first `log_first`."""
    with self._lock:
      self._count += 1
      n = self._count
    if n <= self.log_first:
      _log.warning("skipping unreadable image %s: %s (skip #%d)", record_id, error, n)
      if n == self.log_first:
        _log.warning("further skipped images are counted but not logged")

  def reset(self) -> None:
    with self._lock:
      self._count = 0

  # Locks do not pickle; a worker gets a fresh lock and a copy of the count.
  def __getstate__(self) -> dict[str, Any]:
    return {"log_first": self.log_first, "_count": self.count}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.log_first = state["log_first"]
    self._count = state["_count"]
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"SkipCounter(count={self.count})"


# Process-wide default counter used when `make_loader` gets none.
SKIPPED_RECORDS = SkipCounter()


def decode_image(image: bytes | np.ndarray) -> np.ndarray:
  """Decodes encoded bytes or converts an array to RGB.

  Args:
    image: encoded image bytes (any PIL format), or a uint8 array of shape
      (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).

  Returns:
    (H, W, 3) uint8 RGB.

  Raises:
    ValueError: the data cannot be decoded (PIL's errors are chained).
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image array must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim == 2:
      return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
      return image
    if image.ndim == 3 and image.shape[-1] == 4:
      return np.asarray(Image.fromarray(image, "RGBA").convert("RGB"))
    raise ValueError(f"image array has unsupported shape {image.shape}")
  if not isinstance(image, (bytes, bytearray, memoryview)):
    raise ValueError(f"image must be bytes or a uint8 array, got {type(image).__name__}")
  if len(image) == 0:
    raise ValueError("empty image data")
  try:
    with Image.open(io.BytesIO(image)) as pil:
      # load() forces the full decode so truncated files fail here, not later.
      pil.load()
      if pil.mode != "RGB":
        # Palette images with transparency must go through RGBA first.
        if pil.mode == "P" and "transparency" in pil.info:
          pil = pil.convert("RGBA")
        pil = pil.convert("RGB")
      return np.asarray(pil)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area_range: tuple[float, float] = (0.8, 1.0),
) -> tuple[int, int, int]:
  """Samples a square crop for training augmentation.

  The side is `round(sqrt(a) * min(height, width))` with `a ~ U(area_range)`,
  so the crop covers an area fraction `a` of the largest square that fits;
  the top-left corner is uniform over all valid positions.

  Returns:
    (top, left, side) in pixels, with 1 <= side <= min(height, width).
  """
  lo, hi = area_range
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"area_range must satisfy 0 < lo <= hi <= 1, got {area_range}")
  short = min(height, width)
  area = rng.uniform(lo, hi)
  side = int(min(short, max(1, round(math.sqrt(area) * short))))
  top = int(rng.integers(0, height - side + 1))
  left = int(rng.integers(0, width - side + 1))
  return top, left, side


def random_crop_flip(
    image: np.ndarray,
    rng: np.random.Generator,
    resolution: int,
    *,
    area_range: tuple[float, float] = (0.8, 1.0),
    flip_prob: float = 0.5,
    resample: str = "lanczos",
) -> np.ndarray:
  """Train augmentation: random square crop, resize, random horizontal flip.

  Args:
    image: (H, W, 3) uint8.
    rng: consumed in the order crop area, top, left, flip.
    resolution: output side in pixels.

  Returns:
    (resolution, resolution, 3) uint8.
  """
  top, left, side = sample_crop_box(rng, image.shape[0], image.shape[1], area_range)
  crop = Image.fromarray(image[top:top + side, left:left + side])
  if side != resolution:
    crop = crop.resize((resolution, resolution), _resample(resample))
  out = np.asarray(crop)
  if rng.uniform() < flip_prob:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def center_crop_resize(
    image: np.ndarray,
    resolution: int,
    *,
    resize_ratio: float = 1.125,
    resample: str = "lanczos",
) -> np.ndarray:
  """Evaluation transform, torchvision's Resize(s, LANCZOS) + CenterCrop(resolution).

  The shorter side is resized to `s = round(resolution * resize_ratio)`, the
  longer to `int(s * long / short)` (torchvision truncates), then the centre
  `resolution` square is cut with torchvision's offset `round((n - resolution) / 2)`.

  Args:
    image: (H, W, 3) uint8.

  Returns:
    (resolution, resolution, 3) uint8.
  """
  if resize_ratio < 1.0:
    raise ValueError(f"resize_ratio must be >= 1, got {resize_ratio}")
  h, w = image.shape[:2]
  short_target = round(resolution * resize_ratio)
  if h <= w:
    new_h, new_w = short_target, int(short_target * w / h)
  else:
    new_h, new_w = int(short_target * h / w), short_target
  pil = Image.fromarray(image)
  if (new_h, new_w) != (h, w):
    pil = pil.resize((new_w, new_h), _resample(resample))
  top = int(round((new_h - resolution) / 2.0))
  left = int(round((new_w - resolution) / 2.0))
  return np.asarray(pil.crop((left, top, left + resolution, top + resolution)))


def to_model_input(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 -> (H, W, 3) float32 in [-1, 1] as x / 127.5 - 1."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


@dataclasses.dataclass
class DecodeImage(grain.MapTransform):
  """Decodes `element['image']` to (H, W, 3) uint8; undecodable -> None (counted).

  keep_invalid: instead of None, return the record with a black 1x1 image and `valid=False`
  (evaluation: every process then yields the same number of rows, and the row is dropped after
  the step, still counted as skipped).
  """

  skip_counter: SkipCounter = dataclasses.field(default_factory=lambda: SKIPPED_RECORDS)
  keep_invalid: bool = False

  def map(self, element: dict[str, Any]) -> dict[str, Any] | None:
    record_id = str(element.get("id", "?"))
    image = element.get("image")
    reason = None
    if image is None:
      reason = element.get("error", "unreadable")
    else:
      try:
        return {**element, "image": decode_image(image)}
      except ValueError as e:
        reason = str(e)
    self.skip_counter.record(record_id, reason)
    if self.keep_invalid:
      return {**element, "image": np.zeros((1, 1, 3), np.uint8), "valid": False}
    return None


class DropSkipped(grain.FilterTransform):
  """Drops records that `DecodeImage` turned into None."""

  def filter(self, element: Any) -> bool:
    return element is not None


@dataclasses.dataclass
class RandomCropFlip(grain.RandomMapTransform):
  """Train augmentation; see `random_crop_flip`."""

  resolution: int
  area_range: tuple[float, float] = (0.8, 1.0)
  flip_prob: float = 0.5
  resample: str = "lanczos"

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = random_crop_flip(
        element["image"], rng, self.resolution, area_range=self.area_range,
        flip_prob=self.flip_prob, resample=self.resample)
    return {**element, "image": image}


@dataclasses.dataclass
class CenterCropResize(grain.MapTransform):
  """Evaluation transform; see `center_crop_resize`."""

  resolution: int
  resize_ratio: float = 1.125
  resample: str = "lanczos"

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = center_crop_resize(
        element["image"], self.resolution, resize_ratio=self.resize_ratio,
        resample=self.resample)
    return {**element, "image": image}


class ToModelInput(grain.MapTransform):
  """-> {'image': (H, W, 3) float32 in [-1, 1], 'label': int32}, plus 'index' (int64) and 'valid'
  (bool) when the record carries them (evaluation order); other keys dropped."""

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {
        "image": to_model_input(element["image"]),
        "label": np.asarray(element["label"], np.int32),
    }
    if "index" in element:
      out["index"] = np.asarray(element["index"], np.int64)
      out["valid"] = np.asarray(element["valid"], bool)
    return out
