"""Image bytes in and out of the server.

Uploads are checked before any pixel is decoded: the byte count is capped by the app (HTTP 413),
and here the header's width x height is compared with `max_pixels` (PIL reads only the header on
`Image.open`), so a small file that would decode to gigabytes (a decompression bomb) is refused
before it is expanded. Only common still-image formats are accepted. Accepted uploads go through
the CLI's own transform (`load_image_file`: shorter side to 1.125 x resolution, LANCZOS, centre
crop), so an uploaded file gives the tokens `imagefolder-jax sample --reference FILE` gives.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from imagefolder_jax.data import to_uint8
from imagefolder_jax.data import transforms as T

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000


class BadImage(ValueError):
  """An upload that is not a usable image (HTTP 400); the message is one line naming the problem."""


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """(width, height) from the header of an encoded image; BadImage when it is no image of an
  accepted format or has more than `max_pixels` pixels. Decodes no pixel data."""
  if not data:
    raise BadImage("the upload is empty")
  try:
    with warnings.catch_warnings():
      # PIL warns (and beyond twice its own limit raises) on large headers; the limit here is ours.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as pil:
        width, height = pil.size
  except Image.DecompressionBombError as e:
    # PIL refuses headers beyond twice its own limit before returning the size; its message has the count.
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
    raise BadImage(f"the image is {size}, more than the {max_pixels / 1e6:g}-megapixel limit") from None
  except UnidentifiedImageError:
    formats = ", ".join(ACCEPTED_FORMATS)
    raise BadImage(f"the upload is not an image in a supported format ({formats})") from None
  except Exception as e:  # PIL raises SyntaxError, ValueError, OSError... on malformed headers
    raise BadImage(f"the image header is unreadable ({type(e).__name__})") from None
  if width * height > max_pixels:
    raise BadImage(f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, more than the "
                   f"{max_pixels / 1e6:g}-megapixel limit")
  return width, height


def decode_upload(data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded image bytes -> (resolution, resolution, 3) float32 in [-1, 1] (the CLI's transform).

  Raises BadImage (one line) for non-images, truncated or malformed files and oversized images."""
  check_header(data, max_pixels)
  try:
    # The header passed our own limit, which is below PIL's; its warning would only repeat it.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = T.decode_image(bytes(data))
  except ValueError as e:
    text = " ".join(str(e).split())
    if "truncated" in text.lower() or "EOF" in text:
      raise BadImage(f"the image is truncated or damaged ({text[:160]})") from None
    raise BadImage(f"the image cannot be decoded ({text[:160]})") from None
  return model_input(image, resolution)


def model_input(image: np.ndarray, resolution: int) -> np.ndarray:
  """(H, W, 3) uint8 -> (resolution, resolution, 3) float32 in [-1, 1], as `load_image_file`."""
  return T.to_model_input(T.center_crop_resize(image, resolution))


def png_bytes(image: np.ndarray) -> bytes:
  """(H, W, 3) float in [-1, 1] or uint8 -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = to_uint8(image)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()
