"""bfloat16 matmuls on CPUs with AMX, reading weights packed once (amx_matmul.cc).

XLA:CPU's YNNPACK dots repack a bfloat16 weight into AMX's pair layout at every call, which at
small batch costs more than the products (docs/cpu.md). `matmul` multiplies by a weight that
`pack` laid out that way: inside a jitted decode loop the packing depends on the weights alone,
so XLA's loop-invariant code motion computes it once per program call, not once per step
(`held_off` says where it does not).

The kernel is C++ built on first use with the machine's C++ compiler ($CXX, else g++) against
jaxlib's FFI headers, cached under $XDG_CACHE_HOME/spec_tpu (else ~/.cache/spec_tpu), and used
only where it can run: Linux on x86_64 with AMX-BF16, a compiler, and the process granted
AMX's tile state. Elsewhere `available()` is False and callers keep XLA's dot.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(__file__), "amx_matmul.cc")
TARGET = "spec_tpu_amx_matmul"
K_MULTIPLE, N_MULTIPLE = 32, 64  # the kernel's tiles: 32 contracted values, 4 x 16 outputs
# Beyond this many rows YNNPACK's dot is as fast or faster: its per-call packing is paid back
# over the rows (a prefill's), where the kernel streams the weights once per 16 of them.
MAX_ROWS = 64

ENABLED = True  # False: `available()` says no (tests compare against XLA's dot)
# Per tracing thread (the engine traces on its own): `used` and `held_off` depths.
_tracing = threading.local()
# A program packs every weight once per call, about 15 decode steps' worth of weight traffic on
# the comparison pair: programs of fewer steps than this keep XLA's dot (Sampler._program).
MIN_STEPS = 64


def available() -> bool:
  """Whether `matmul` can run in this process (built, loaded, registered with XLA), the process
  has one CPU device, and what is being traced is inside `used()` and not `held_off()`.

  One device: XLA cannot partition a custom call, so in a program sharded over several
  (simulated) CPU devices it would gather every weight onto each of them."""
  return (ENABLED and _depth("used") > 0 and _depth("held_off") == 0 and _one_cpu_device()
          and _load() is not None)


def scope() -> tuple[int, int]:
  """The tracing thread's (used, held_off) depths: part of a compiled program's key."""
  return _depth("used"), _depth("held_off")


def _depth(name: str) -> int:
  return getattr(_tracing, name, 0)


@contextlib.contextmanager
def _nested(name: str):
  setattr(_tracing, name, _depth(name) + 1)
  try:
    yield
  finally:
    setattr(_tracing, name, _depth(name) - 1)


def used():
  """Products traced inside may take the kernel. For programs that run many decode steps per
  call (Sampler.generate's): the packing is paid once per call. The engine's programs run a few
  rounds per call, where packing every weight at every call made serving 2.5x slower."""
  return _nested("used")


def held_off():
  """Products traced inside keep XLA's dot, even within `used()`. For weights whose packing XLA
  would redo at every step of a decode loop, where XLA's transpose costs more than YNNPACK's
  packing: loop-invariant code motion takes a weight's packing out of the loop when the weight
  is a layer's slice of a stack of several, or a weight of its own (a head), but not when the
  stack holds one layer (its slice is a bare reshape; XLA:CPU leaves the transpose after it in
  the loop), nor out of a loop inside the decode loop (a draft's steps after its first)."""
  return _nested("held_off")


def _one_cpu_device() -> bool:
  return len(jax.devices("cpu")) == 1


def fits(m: int, k: int, n: int) -> bool:
  """Whether the kernel takes an [m, k] x [k, n] product: a decode step's few rows, on its tile
  multiples."""
  return 0 < m <= MAX_ROWS and k % K_MULTIPLE == 0 and n % N_MULTIPLE == 0


def pack(w_kn):
  """[k, n] bfloat16 -> the kernel's flat layout [n / 16][k / 2][16][2]."""
  k, n = w_kn.shape
  return (w_kn.astype(jnp.bfloat16).reshape(k // 2, 2, n // 16, 16).transpose(2, 0, 3, 1)
          .reshape(-1))


def matmul(x_mk, packed, n: int):
  """x [m, k] bfloat16 times the weight `pack` made ([k, n]): float32 [m, n], the products
  summed in float32 (AMX's bf16 tile product)."""
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x_mk.shape[0], n), jnp.float32))(
      x_mk.astype(jnp.bfloat16), packed)


def _cpu_has_amx() -> bool:
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    return False
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "").split()
  except OSError:
    return False
  return "amx_bf16" in flags and "amx_tile" in flags


def _cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "spec_tpu")


def _build(compiler: str) -> str | None:
  """The kernel's shared library, compiled once per source, jaxlib and compiler."""
  with open(SOURCE, "rb") as f:
    source = f.read()
  include = jax.ffi.include_dir()
  key = hashlib.sha256(source + jax.__version__.encode() + include.encode()
                       + compiler.encode()).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f"amx_matmul-{key}.so")
  if os.path.exists(path):
    return path
  tmp = None
  try:
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-mamx-tile",
                    "-mamx-bf16", "-mavx512f", f"-I{include}", SOURCE, "-o", tmp],
                   check=True, capture_output=True, timeout=300)
    os.replace(tmp, path)  # atomic: concurrent builders leave one whole library
  except (OSError, subprocess.SubprocessError):  # no compiler, no AMX support in it, no disk
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    return None
  return path


_LOAD_LOCK = threading.Lock()  # one build and one registration when threads trace at once


def _load():
  with _LOAD_LOCK:
    return _load_once()


@functools.cache
def _load_once():
  """The loaded library, registered as an XLA:CPU custom call; None where it cannot run."""
  if not _cpu_has_amx():
    return None
  path = _build(os.environ.get("CXX") or "g++")
  if path is None:
    return None
  lib = ctypes.cdll.LoadLibrary(path)
  if not lib.spec_tpu_amx_ready():
    return None
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, TARGET)), platform="cpu")
  return lib
