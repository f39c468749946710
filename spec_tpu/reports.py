"""A measurement's results.json and table.txt, and its optional plot."""

from __future__ import annotations

import json
import math
import os

from absl import logging


def pyplot(path: str):
  """matplotlib.pyplot for a plot at `path`, or None (logged) when matplotlib is not installed:
  the results and tables do not need it."""
  try:
    import matplotlib
  except ImportError:
    logging.warning("no plot %s: matplotlib is not installed (pip install -e '.[bench]')", path)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def finite(x):
  """A result tree as strict JSON takes it: NaN and infinities become None (null), keys str."""
  if isinstance(x, dict):
    return {str(k): finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_results(output_dir: str, result: dict, table: str) -> None:
  """results.json and table.txt in output_dir; the table also to stdout."""
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(finite(result), f, indent=1, default=list)
  with open(os.path.join(output_dir, "table.txt"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)


class OutputError(ValueError):
  """An output directory that cannot be written."""


def make_output_dir(flag: str, path: str) -> None:
  """Creates the directory results are written into, or an OutputError naming the flag."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OutputError(f"--{flag} {path!r}: {e.strerror or e}") from None
  if not os.access(path, os.W_OK):
    raise OutputError(f"--{flag} {path!r} is not writable")
