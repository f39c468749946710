"""JAX's persistent compilation cache, turned on before anything compiles, with a count of the
programs it loaded and stored."""

from __future__ import annotations

import os

import jax

_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}
counts = {"hits": 0, "misses": 0}  # this process's lookups since use()
_listening = []


def _count_cache_event(event: str, **_) -> None:
  if event in _CACHE_EVENTS:
    counts[_CACHE_EVENTS[event]] += 1


def use(path: str | None) -> str | None:
  """Turns on the persistent compilation cache in `path` ('' or None = off);
  JAX_COMPILATION_CACHE_DIR, when set, names the directory instead. Returns the directory in
  use, or None.

  A compiled decode program is stored under a key of its HLO, devices, compiler options and
  versions, so a second run of the same setup (same shapes, K, topology) loads it instead of
  compiling. Only process 0 of a multi-host job writes entries; every process reads them, so a
  pod shares one directory that all hosts can read.
  """
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(path or "")
  if not path:
    return None
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_compilation_cache_dir", path)
  if not _listening:
    jax.monitoring.register_event_listener(_count_cache_event)
    _listening.append(True)
  return path


def summary(path: str | None) -> str:
  if path is None:
    return "persistent compilation cache off (run.compile_cache is empty)"
  return (f"compilation cache {path}: {counts['hits']} programs loaded, {counts['misses']} "
          "compiled and stored")
