"""Images named in chat requests (OpenAI `image_url` content parts) -> their encoded bytes.

data: URLs (base64) are read inline. Local files (file:// URLs or absolute paths) only under the
directories the server was started with (an allow-list; none by default), resolved after
symlinks, so a request cannot read anything else on the host. Remote (http, https) URLs are
refused: fetching them would let any client make the server call out."""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from typing import Sequence

MAX_BYTES = 32 << 20  # one image's encoded size at most


def read(url, allowed_dirs: Sequence[str] = (), what: str = "image") -> bytes:
  """The encoded image a URL names, or a ValueError saying why it is refused."""
  if not isinstance(url, str) or not url:
    raise ValueError(f"{what}: image_url.url must be a non-empty string")
  scheme = url.split(":", 1)[0].lower() if ":" in url else ""
  if scheme == "data":
    head, sep, data = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
      raise ValueError(f"{what}: a data: URL must be base64 (data:image/png;base64,...)")
    if len(data) > MAX_BYTES * 4 // 3 + 4:
      raise ValueError(f"{what} is larger than {MAX_BYTES >> 20} MiB")
    try:
      return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
      raise ValueError(f"{what}: the data: URL holds invalid base64") from None
  if scheme in ("http", "https", "ftp"):
    raise ValueError(f"{what}: remote image URLs are not fetched; send the image inline as a "
                     "data: URL (data:image/png;base64,...)")
  if scheme == "file":
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
  elif url.startswith("/"):
    path = url
  else:
    raise ValueError(f"{what}: unsupported image URL (use a data: URL)")
  return _read_allowed(path, allowed_dirs, what)


def _read_allowed(path: str, allowed_dirs: Sequence[str], what: str) -> bytes:
  if not allowed_dirs:
    raise ValueError(f"{what}: local image paths are refused (the server reads files only "
                     "under directories given to it as image_dirs)")
  real = os.path.realpath(path)
  roots = [os.path.realpath(d) for d in allowed_dirs]
  if not any(os.path.commonpath([real, root]) == root for root in roots):
    raise ValueError(f"{what}: {path!r} is outside the directories images may be read from")
  try:
    if os.path.getsize(real) > MAX_BYTES:
      raise ValueError(f"{what} is larger than {MAX_BYTES >> 20} MiB")
    with open(real, "rb") as fh:
      return fh.read()
  except OSError as e:
    raise ValueError(f"{what}: cannot read {path!r}: {e.strerror}") from None
