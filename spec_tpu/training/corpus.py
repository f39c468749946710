"""The training corpus: the Python standard library's own source, present on every machine.

The files differ a little between Python versions, so what is fixed is the *rule* that selects them:
a sorted list of `.py` files under the stdlib directory, minus tests, installed packages and generated
files, and a held-out split decided by a hash of each file's relative path (so adding or removing a
file never moves another file between splits).
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

# Directory names never descended into: installed packages, bytecode, and test suites (tests are
# repetitive fixtures and sometimes deliberately malformed source).
_EXCLUDED_DIRS = frozenset({
  "site-packages", "dist-packages", "__pycache__",
  "test", "tests", "idle_test",
})
# Files larger than this are generated tables or docs, not code worth modelling (pydoc_data/topics.py).
MAX_FILE_BYTES = 256 * 1024
# Markers of machine-generated files near the top of a file (codec tables from gencodec.py, token.py,
# stringprep.py, ...). Only comment lines count, so a docstring that *mentions* generation is kept.
_GENERATED = re.compile(rb"(?im)^#.*(auto-?generated|do not edit)|with gencodec\.py")
_HEADER_BYTES = 1024

HELDOUT_MODULUS = 20   # 1 file in 20 is held out
DEFAULT_SEPARATOR = "\n\n"


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def _is_generated(path: Path) -> bool:
  if path.name.startswith("_sysconfigdata"):  # describes the build machine, not Python
    return True
  with open(path, "rb") as f:
    return bool(_GENERATED.search(f.read(_HEADER_BYTES)))


def stdlib_files(root: str | Path | None = None) -> list[Path]:
  """Selected `.py` files under `root` (default: this interpreter's stdlib), sorted by relative path."""
  root = Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise FileNotFoundError(f"stdlib directory not found: {root}")
  selected = []
  # os.walk so excluded directories are pruned, not walked (test/ is a third of the stdlib), and so
  # symlinked directories are never followed.
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    for name in filenames:
      path = Path(dirpath) / name
      if (not name.endswith(".py") or not path.is_file()
          or path.stat().st_size > MAX_FILE_BYTES or _is_generated(path)):
        continue
      selected.append(path)
  # Sort by the POSIX relative path so the order does not depend on the filesystem or the OS.
  selected.sort(key=lambda p: p.relative_to(root).as_posix())
  return selected


def _relative_key(path: Path, root: Path | None) -> str:
  root = root if root is not None else stdlib_root()
  try:
    return path.relative_to(root).as_posix()
  except ValueError:
    # Hashing an absolute path would make the split depend on where Python is installed.
    raise ValueError(f"{path} is not under {root}; pass the root its files were selected from") from None


def is_heldout(relative_path: str) -> bool:
  """The fixed split: sha1 of the POSIX relative path, mod 20 == 0."""
  digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest, "big") % HELDOUT_MODULUS == 0


def split(files: Iterable[Path], root: str | Path | None = None) -> tuple[list[Path], list[Path]]:
  """(train_files, heldout_files), order preserved. Paths are hashed relative to `root` (the stdlib)."""
  root = Path(root) if root is not None else None
  train, heldout = [], []
  for path in files:
    (heldout if is_heldout(_relative_key(Path(path), root)) else train).append(Path(path))
  return train, heldout


def read_text(files: Iterable[Path], max_bytes: int | None = None,
              separator: str = DEFAULT_SEPARATOR) -> str:
  """Concatenate files as UTF-8 text joined by `separator`, skipping files that do not decode.

  Stops before the first file that would take the total past `max_bytes` (counted in UTF-8 bytes),
  so the result is a prefix of whole files and stays deterministic.
  """
  parts, total = [], 0
  sep_bytes = len(separator.encode("utf-8"))
  for path in files:
    try:
      text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    size = len(text.encode("utf-8")) + (sep_bytes if parts else 0)
    if max_bytes is not None and total + size > max_bytes:
      break
    parts.append(text)
    total += size
  return separator.join(parts)


def token_stream(tokenizer, files: Iterable[Path], max_bytes: int | None = None) -> np.ndarray:
  """1-D int32 token stream for LM training: each file encoded on its own, followed by eos.

  Files are encoded separately (sentencepiece slows down on multi-megabyte strings) and the eos
  marks the document boundary. `tokenizer` needs `encode_batch` and `eos_id` (see tokenizer.py).
  """
  texts, total = [], 0
  for path in files:
    text = read_text([path])
    if not text:
      continue  # undecodable or empty
    total += len(text.encode("utf-8"))
    if max_bytes is not None and total > max_bytes:
      break
    texts.append(text)
  if not texts:
    raise ValueError("no readable files to tokenize")
  eos = np.array([tokenizer.eos_id], np.int32)
  parts = []
  for ids in tokenizer.encode_batch(texts):
    parts += [np.asarray(ids, np.int32), eos]
  return np.concatenate(parts)


def token_batches(ids: np.ndarray, batch: int, seq_len: int,
                  rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Endless (batch, seq_len + 1) int32 windows of `ids`, start offsets uniform at random.

  The extra column is the shifted target: inputs are `w[:, :-1]`, labels `w[:, 1:]`.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"token stream must be 1-D, got shape {ids.shape}")
  if batch < 1 or seq_len < 1:
    raise ValueError(f"batch and seq_len must be positive, got batch={batch} seq_len={seq_len}")
  span = seq_len + 1
  if ids.shape[0] < span:
    raise ValueError(f"token stream of {ids.shape[0]} tokens is shorter than one window ({span})")
  ids = ids.astype(np.int32, copy=False)
  offsets_1t = np.arange(span)[None, :]
  while True:
    starts_b1 = rng.integers(0, ids.shape[0] - span + 1, size=(batch, 1))
    yield ids[starts_b1 + offsets_1t]


def heldout_windows(ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """Deterministic non-overlapping (n, seq_len + 1) int32 windows from the start of `ids`.

  Consecutive windows share no tokens, so every label is scored once; a short tail is dropped.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"token stream must be 1-D, got shape {ids.shape}")
  span = seq_len + 1
  n = ids.shape[0] // span
  if max_windows is not None:
    n = min(n, max_windows)
  if n == 0:
    raise ValueError(f"token stream of {ids.shape[0]} tokens is shorter than one window ({span})")
  return ids[: n * span].astype(np.int32).reshape(n, span)
