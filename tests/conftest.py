"""Test-wide JAX setup; runs before any JAX op initialises a backend.

Eight simulated CPU devices for every test (CPU only, even where libtpu is installed), and a
cheaper XLA:CPU backend: tests check behaviour, not speed, and most of their time is
compilation on a 2-core machine. The launchers tests start inherit the same XLA_FLAGS.
"""

import os

# With libtpu installed (the test extra installs it for launch.plan --tpu), JAX would probe for a
# TPU at start-up; these tests run on CPU devices only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One LLVM module per program rather than pieces compiled in parallel: on 2 cores the pieces'
# overhead outweighs the parallelism (a representative set of decode programs: 10% less backend
# compile time, 5-7% less CPU). The generated code is the same.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_parallel_codegen_split_count=1")
# XLA:CPU's older elemental emitters compile these programs 1.5-3x faster than its fusion
# emitters (measured: tests/test_recurrent.py 96 s -> 63 s, a decode loop 4.5 s -> 2.1 s). An
# XLA that no longer knows the flag would abort, so a child process tries it first.
_OLDER_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flag: str) -> bool:
  import subprocess
  import sys
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag),
                         capture_output=True, timeout=300)
  return probe.returncode == 0


# Set once, by the first process (pytest-xdist's workers and the launchers that tests start
# inherit XLA_FLAGS).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  flags = _FAST_COMPILE + (" " + _OLDER_EMITTERS if _xla_knows(_OLDER_EMITTERS) else "")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()

# One persistent compilation cache for the whole run, in a fresh directory removed when the run
# ends: a program compiled once (same HLO, devices, options and XLA flags) is loaded by the other
# tests, xdist workers and launched processes that compile it, and no launcher reads or writes
# the user's cache (configs' run.compile_cache), so no run depends on an earlier one's programs.
# Set by the first process, like XLA_FLAGS; a cache the caller names is used instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _CACHE_DIR = tempfile.mkdtemp(prefix="spec_tpu_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
