"""Images from what users hand over (PIL images, arrays, encoded bytes, files) to the encoder's
input: RGB, bilinear resize to image_size x image_size, values scaled to [-1, 1] (x / 127.5 - 1),
as transformers' Gemma3ImageProcessor and the gemma library prepare them (Pan & Scan crops,
off by default there, are not made). Decoding is Pillow's."""

from __future__ import annotations

import io
import os

import numpy as np

# Refuse decompression bombs before decoding: Pillow's own limit warns only up to twice this.
MAX_PIXELS = 1 << 26


def _pil():
  try:
    from PIL import Image
  except ImportError:  # pragma: no cover - pillow is a dependency
    raise ValueError("reading images needs Pillow (pip install pillow)") from None
  return Image


def decode(data: bytes, what: str = "image"):
  """A PIL image (RGB) from an encoded file's bytes, or a ValueError saying what is wrong."""
  Image = _pil()
  from PIL import UnidentifiedImageError
  try:
    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_PIXELS:
      raise ValueError(f"{what} is {img.width}x{img.height} pixels, more than the "
                       f"{MAX_PIXELS} accepted")
    img.load()  # decodes now: a truncated or corrupt file fails here, not later
  except UnidentifiedImageError:
    raise ValueError(f"{what} is not in an image format Pillow reads (PNG, JPEG, WebP, GIF, "
                     "BMP, ...)") from None
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{what} cannot be decoded (corrupt or truncated?): {e}") from None
  return img.convert("RGB")


def to_pil(image, what: str = "image"):
  """A PIL image (RGB) from a PIL image, an array (H W 3 or H W; uint8, or floats in [0, 1]),
  encoded bytes or a file path."""
  Image = _pil()
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  if isinstance(image, (bytes, bytearray, memoryview)):
    return decode(bytes(image), what)
  if isinstance(image, (str, os.PathLike)):
    try:
      with open(image, "rb") as fh:
        data = fh.read()
    except OSError as e:
      raise ValueError(f"{what}: cannot read {os.fspath(image)!r}: {e.strerror}") from None
    return decode(data, f"{what} ({os.fspath(image)})")
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or 0 in arr.shape:
    raise ValueError(f"{what} has shape {arr.shape}; expected H x W x 3 (RGB), H x W x 4 or "
                     "H x W (grey)")
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
      raise ValueError(f"{what}: float pixel values must lie in [0, 1]")
    arr = np.round(arr * 255)
  elif arr.dtype != np.uint8:
    raise ValueError(f"{what} has dtype {arr.dtype}; expected uint8 or floats in [0, 1]")
  return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def prepare(image, size: int, what: str = "image") -> np.ndarray:
  """The encoder's input for one image: size x size x 3 float32 in [-1, 1]."""
  Image = _pil()
  img = to_pil(image, what).resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(img, np.float32) / 127.5 - 1.0
