"""Compiled programs shared by every Engine and Sampler of a process.

Building an Engine or a Sampler traces, lowers and compiles its programs: seconds each on a
CPU, and tracing and lowering are paid even when JAX's persistent compilation cache
(compile_cache.py) then loads the binary. A second Engine or Sampler over the same models and
settings in one process (serve_bench's engines, the offline runner called twice, a notebook
re-running a cell, the test suite) takes them from here instead.

A program is `fn(*static, *args)` under jax.jit with the given shardings and donation,
compiled with the given compiler options. Its key holds everything the executable depends on:
fn itself (a module-level function), the static values (hashable: a LoopSpec, flags, a
ModelConfig), each argument's tree structure and every leaf's shape, dtype, weak type and
sharding, the jit options (in and out shardings, donated arguments), the compiler options,
JAX's tracing configuration and whether the AMX kernel may be traced in (kernels/amx.py).
Programs that differ in any of these never share an entry; fn must
close over nothing else (no Engine: an entry would keep its device state alive). The code is
checked too: an entry is used only while every module-level name of spec_tpu's modules still
holds the object it held when the entry was traced (a monkeypatched function or constant, a
reloaded module, model.accelerator_forms make new entries); not seen: changes to other
packages' code, class attributes rebound, the contents of a module-level dict or list changed in
place, a module dropped from sys.modules and imported again. Static values compare by ==, so a
setting given as 1, 1.0 or True is one key. Entries are dropped least recently used first past `max_size`;
an Engine or Sampler keeps the programs it took for its own lifetime anyway.
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
from typing import Callable

import jax

from spec_tpu.kernels import amx
# The configuration values jit's own caches key on (x64, matmul precision, ...).
from jax._src.config import trace_context as _trace_context


class ProgramCache:
  """Compiled programs by key (the module docstring's), at most max_size, least recently used
  dropped first. Thread-safe: engines on their own threads may compile at once."""

  def __init__(self, max_size: int = 64):
    self.max_size = max_size  # compiled executables hold code, not weights
    self.hits = self.misses = 0  # lookups (a miss traces, lowers and compiles)
    self._programs: collections.OrderedDict = collections.OrderedDict()  # key -> (program, code)
    self._code = ()  # the latest code snapshot, shared by the entries made under it
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._programs)

  def compiled(self, fn: Callable, static: tuple, args: tuple, *,
               compiler_options: dict | None = None, **jit_options):
    """jax.jit(functools.partial(fn, *static), **jit_options).lower(*args)
    .compile(compiler_options), made once per key. args: arrays or jax.ShapeDtypeStructs (None
    for an absent tree); jit_options: in_shardings, out_shardings, donate_argnums."""
    key = (fn, tuple(static), _signature(args),
           tuple(sorted((name, _tree(value)) for name, value in jit_options.items())),
           None if compiler_options is None else tuple(sorted(compiler_options.items())),
           _trace_context(), amx.scope())
    with self._lock:
      entry = self._programs.get(key)
      if entry is not None and _unchanged(entry[1]):
        self._programs.move_to_end(key)
        self.hits += 1
        return entry[0]
      self.misses += 1
    # Compiled outside the lock: one engine's lookups do not wait for another's compile.
    program = jax.jit(functools.partial(fn, *static), **jit_options).lower(*args).compile(
        compiler_options)
    with self._lock:
      # The code as traced (after any import the trace made).
      if len(self._code) != len(_modules()) or not _unchanged(self._code):
        self._code = _snapshot()
      self._programs[key] = (program, self._code)
      self._programs.move_to_end(key)
      while len(self._programs) > self.max_size:
        self._programs.popitem(last=False)
    return program

  def clear(self) -> None:
    """Drops every kept program (Engines and Samplers keep the ones they took)."""
    with self._lock:
      self._programs.clear()


PROGRAMS = ProgramCache()  # the process's, which Engines and Samplers use
compiled = PROGRAMS.compiled


def _modules():
  return [m for name, m in list(sys.modules.items())
          if m is not None and (name == "spec_tpu" or name.startswith("spec_tpu."))]


def _snapshot():
  """Every module-level name of spec_tpu's loaded modules with its value: the functions and
  constants a trace reads through them (a test's monkeypatch, model.accelerator_forms and a
  reloaded module rebind them)."""
  return tuple((vars(m), tuple(vars(m).items())) for m in _modules())


def _unchanged(code) -> bool:
  """Each name still holds the very object it held (the snapshot keeps those alive, so no
  other object can take one's id)."""
  missing = object()
  return all(names.get(name, missing) is value for names, items in code for name, value in items)


def _leaf(x):
  if not hasattr(x, "shape"):  # a Python scalar traces as a weakly typed value of its type
    return (type(x),)
  return (tuple(x.shape), x.dtype, bool(getattr(x, "weak_type", False)),
          getattr(x, "sharding", None))


def _signature(args):
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple(_leaf(x) for x in leaves)


def _tree(value):
  """A hashable form of a jit option: shardings trees (None leaves kept), argnum tuples."""
  leaves, treedef = jax.tree.flatten(value, is_leaf=lambda x: x is None)
  return treedef, tuple(leaves)
