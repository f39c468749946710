"""Test-wide JAX setup; runs before any JAX op initialises a backend.

Eight simulated CPU devices for every test (CPU only, even where libtpu is installed), and a
cheaper XLA:CPU backend: tests check behaviour, not speed, and most of their time is
compilation on a 2-core machine.
"""

import os

# With libtpu installed (the test extra installs it for launch.plan --tpu), JAX would probe for a
# TPU at start-up; these tests run on CPU devices only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
