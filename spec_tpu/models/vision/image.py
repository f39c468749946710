"""Images from what users hand over (PIL images, arrays, encoded bytes, files) to the encoder's
input: RGB, bilinear resize to image_size x image_size, values scaled to [-1, 1] (x / 127.5 - 1),
as transformers' Gemma3ImageProcessor and the gemma library prepare them. Pan & Scan
(`pan_and_scan`: crops of a wide or tall image, each encoded as an image of its own) is an
option, off by default as in transformers. Decoding is Pillow's."""

from __future__ import annotations

import io
import math
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


def pan_and_scan_boxes(width: int, height: int, min_crop_size: int = 256,
                       max_num_crops: int = 4, min_ratio_to_activate: float = 1.2
                       ) -> list[tuple[int, int, int, int]]:
  """Pan & Scan's crop boxes (left, top, right, bottom) of a width x height image, with
  transformers' Gemma3ImageProcessor arithmetic: none unless the long side is at least
  min_ratio_to_activate times the short one; else about long/short crops (at least 2, at most
  max_num_crops) along the long side, none when a crop would be under min_crop_size. The last
  crop is cut at the image's edge (ceil-sized crops, as transformers slices)."""
  if width >= height:
    if width / height < min_ratio_to_activate:
      return []
    n = min(math.floor(width / min_crop_size), math.floor(width / height + 0.5))
    num_w, num_h = min(max_num_crops, max(2, n)), 1
  else:
    if height / width < min_ratio_to_activate:
      return []
    n = min(math.floor(height / min_crop_size), math.floor(height / width + 0.5))
    num_w, num_h = 1, min(max_num_crops, max(2, n))
  crop_w, crop_h = math.ceil(width / num_w), math.ceil(height / num_h)
  if min(crop_w, crop_h) < min_crop_size:
    return []
  return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
          for y in range(0, crop_h * num_h, crop_h) for x in range(0, crop_w * num_w, crop_w)]


def pan_and_scan(image, min_crop_size: int = 256, max_num_crops: int = 4,
                 min_ratio_to_activate: float = 1.2, what: str = "image") -> list:
  """One image as [original, crops...] (PIL RGB images; just [original] when Pan & Scan does
  not apply): each goes through `prepare` and the encoder as an image of its own, and the
  prompt lays them out with prompt.expand's `crops`."""
  if min_crop_size < 1 or max_num_crops < 2 or min_ratio_to_activate < 1:
    raise ValueError("Pan & Scan needs min_crop_size >= 1, max_num_crops >= 2 and "
                     "min_ratio_to_activate >= 1")
  img = to_pil(image, what)
  boxes = pan_and_scan_boxes(img.width, img.height, min_crop_size, max_num_crops,
                             min_ratio_to_activate)
  return [img] + [img.crop(box) for box in boxes]
