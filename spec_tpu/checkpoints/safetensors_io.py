"""Read Hugging Face safetensors files tensor by tensor, without torch and without executing code.

The format: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then raw
little-endian data; offsets count from the first byte after the header. We parse it ourselves
because safetensors' numpy `safe_open` cannot return bfloat16 (numpy has no such dtype; ml_dtypes
does). Every header is checked when the index opens, so damage is reported before any weight is
converted, and `get` reads exactly one tensor's bytes (memory stays near one tensor).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # the reference implementation's limit; guards against a garbage length

# Safetensors dtype names -> numpy dtypes, all little-endian as the format requires.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class SafetensorsError(ValueError):
  """A safetensors file or index is missing, malformed, or damaged."""


class _Entry:
  __slots__ = ("file", "dtype", "shape", "start", "nbytes")

  def __init__(self, file: str, dtype: np.dtype, shape: tuple[int, ...], start: int, nbytes: int):
    self.file, self.dtype, self.shape, self.start, self.nbytes = file, dtype, shape, start, nbytes


def _no_duplicates(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    dup = next(k for k in keys if keys.count(k) > 1)
    raise SafetensorsError(f"duplicate key {dup!r}")
  return dict(pairs)


def read_header(file: str) -> dict[str, _Entry]:
  """Parses and validates one file's header; returns name -> entry with absolute offsets."""
  def bad(problem: str, name: str | None = None) -> SafetensorsError:
    where = f"tensor {name!r} in {file!r}" if name else f"{file!r}"
    return SafetensorsError(f"safetensors {where}: {problem}")

  size = os.path.getsize(file)
  with open(file, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"file has {size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise bad(f"header length {n} is larger than the file ({size} bytes): truncated or not "
                "a safetensors file")
    if n > _MAX_HEADER:
      raise bad(f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
  except (UnicodeDecodeError, ValueError) as e:
    raise bad(f"header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")

  data_start, data_len = 8 + n, size - 8 - n
  entries, spans = {}, []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
      shape = tuple(int(d) for d in shape)
      begin, end = (int(o) for o in offsets)
    except (KeyError, TypeError, ValueError):
      raise bad(f"entry {info!r} lacks dtype/shape/data_offsets [begin, end]", name) from None
    if dtype_name not in DTYPES:
      raise bad(f"unknown dtype {dtype_name!r} (supported: {sorted(DTYPES)})", name)
    dtype = DTYPES[dtype_name]
    if any(d < 0 for d in shape):
      raise bad(f"negative dimension in shape {list(shape)}", name)
    if not 0 <= begin <= end:
      raise bad(f"data offsets [{begin}, {end}] are not an ordered range within the file", name)
    if end > data_len:
      raise bad(f"data offsets [{begin}, {end}] run past the end of the data ({data_len} bytes): "
                "file truncated or offsets corrupt", name)
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
      raise bad(f"holds {end - begin} bytes but shape {list(shape)} x {dtype_name} "
                f"({dtype.itemsize} bytes) needs {want}", name)
    entries[name] = _Entry(file, dtype, shape, data_start + begin, want)
    if want:
      spans.append((begin, end, name))
  spans.sort()
  for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
    if begin < prev_end:
      raise bad(f"data overlaps tensor {prev!r}", name)
  return entries


class SafetensorsIndex:
  """All tensors of a model directory (single file or sharded with an index), loaded on demand.

  `path` is a directory holding model.safetensors.index.json or model.safetensors, or one
  .safetensors file.
  """

  def __init__(self, path):
    path = os.fspath(path)
    self.path = path
    self._entries: dict[str, _Entry] = {}
    self.metadata: dict[str, Any] = {}  # the index's "metadata" (e.g. total_size), if any
    if os.path.isfile(path):
      self._entries = read_header(path)
      return
    if not os.path.isdir(path):
      raise SafetensorsError(f"safetensors: no such file or directory {path!r}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      self._open_index(index)
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
      self._entries = read_header(os.path.join(path, SINGLE_FILE))
    else:
      found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      raise SafetensorsError(f"safetensors: {path!r} has neither {INDEX_FILE} nor {SINGLE_FILE}"
                             + (f" (found {found}; pass one file's path)" if found else ""))

  def _open_index(self, index: str) -> None:
    try:
      with open(index) as f:
        doc = json.load(f)
      weight_map = doc["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
      raise SafetensorsError(f"safetensors index {index!r} is invalid ({e!r})") from None
    self.metadata = doc.get("metadata") or {}
    headers = {}
    # Lexically inside the directory (a hub cache links each file to a blob elsewhere).
    root = os.path.normpath(self.path)
    for name, rel in sorted(weight_map.items(), key=lambda item: item[0]):
      file = os.path.normpath(os.path.join(root, rel)) if isinstance(rel, str) else None
      if file is None or not file.startswith(root + os.sep):
        raise SafetensorsError(f"safetensors index {index!r}: tensor {name!r} maps to {rel!r}, "
                               "not the name of a file in the model directory")
      if file not in headers:
        if not os.path.isfile(file):
          raise SafetensorsError(f"safetensors index {index!r}: tensor {name!r} refers to missing "
                                 f"file {rel!r}")
        headers[file] = read_header(file)
      if name not in headers[file]:
        raise SafetensorsError(f"safetensors index {index!r}: tensor {name!r} is not in {rel!r}")
      self._entries[name] = headers[file][name]

  def _entry(self, name: str) -> _Entry:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"tensor {name!r} not in {self.path!r} ({len(self._entries)} tensors)") from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._entry(name).dtype

  def file(self, name: str) -> str:
    return self._entry(name).file

  def get(self, name: str) -> np.ndarray:
    """Reads one tensor into a fresh array (no memmap: the file may change or go away later)."""
    e = self._entry(name)
    out = np.empty(e.shape, e.dtype)
    buf = out.reshape(-1).view(np.uint8)
    with open(e.file, "rb") as f:
      f.seek(e.start)
      got = f.readinto(buf) if e.nbytes else 0
    if got != e.nbytes:
      raise SafetensorsError(f"safetensors tensor {name!r} in {e.file!r}: read {got} of "
                             f"{e.nbytes} bytes (file changed or truncated since it was opened)")
    return out
