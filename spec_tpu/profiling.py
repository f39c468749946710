"""Measuring what programs cost: per-device bytes, step timing, memory bandwidth, and the clock
the engine's calibration times rounds with. Used by launch.benchmark, launch.plan and
spec_tpu/serving/engine.py."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from spec_tpu import pair as pair_lib, sharding
from spec_tpu.models import cache as cache_lib, model


def best_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
  """The fastest of `repeats` calls of fn (its results waited for), by `clock`: interference
  from other work only adds time."""
  best = float("inf")
  for _ in range(repeats):
    start = clock()
    jax.block_until_ready(fn())
    best = min(best, clock() - start)
  return best


def cost_clock(platform: str):
  """The clock a round's cost is measured by. On the CPU backend, process CPU time: other
  processes on a shared machine do not inflate it (wall-clock ratios between K's swung by 2x
  under load; CPU-time ratios by a few %). Elsewhere the device's wall time is the cost."""
  return time.process_time if platform == "cpu" else time.perf_counter


def per_device_bytes(tree_of_structs, shardings) -> int:
  """Bytes one device holds of these arrays (or ShapeDtypeStructs) under these shardings."""
  leaves = jax.tree.leaves(tree_of_structs)
  shards = jax.tree.leaves(shardings)
  return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, shards)))


def read_cache_bytes(abstract, cache_sh, context: int) -> int:
  """Bytes of the cache one step at `context` reads per device: a KV cache longer than one
  attention block is read only up to the filled blocks (model.ATTENTION_BLOCK slots each)."""
  block = model.ATTENTION_BLOCK
  total = 0
  for entry, sh in zip(abstract.groups + abstract.remainder, cache_sh.groups + cache_sh.remainder):
    nbytes = per_device_bytes(entry, sh)
    if isinstance(entry, cache_lib.KVCache):
      slots = entry.k.shape[-2]
      if slots > block:
        nbytes = nbytes * min(slots, -(-context // block) * block) // slots  # blocks of `context`
    total += nbytes
  return total


class StepTimer:
  """Times jitted forward steps of one model at a fixed context length.

  The steps run in a fori_loop inside one program (no host round-trip per step, and no pile of
  dispatched programs with collectives, which deadlocks simulated CPU devices); the cache length
  is reset after every step so each one sees the same context.
  """

  def __init__(self, params, cfg, rules, mesh, batch: int, context: int, max_tokens: int,
               cache_len: int = 0):
    self.cfg, self.batch, self.context = cfg, batch, context
    buffer_len = max(cache_len, context + max_tokens)
    abstract = cache_lib.abstract_cache(cfg, batch, buffer_len, max_tokens)
    cache_sh = sharding.cache_shardings(abstract, mesh, rules)
    param_sh = sharding.param_shardings(cfg, mesh, rules, params)
    self.param_bytes = per_device_bytes(params, param_sh)
    self.cache_bytes = read_cache_bytes(abstract, cache_sh, context)
    self.params = params

    def steps(params, tokens_bt, n):
      cache = cache_lib.init_cache(cfg, batch, buffer_len, max_tokens)
      cache = jax.lax.with_sharding_constraint(cache, cache_sh)
      cache = cache._replace(length=jnp.full((batch,), context, jnp.int32))

      def body(i, carry):
        c, acc = carry
        logits, new = model.forward(params, cfg, tokens_bt, c)
        return new._replace(length=c.length), acc + logits[:, -1, 0].sum()

      return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

    self._fn = jax.jit(steps)

  def seconds_per_step(self, num_tokens: int, repeats: int) -> float:
    """Wall time of one forward of num_tokens tokens per row, loop overhead subtracted."""
    tokens = np.full((self.batch, num_tokens), 4, np.int32)
    # The same XLA options as the decode programs, so steps are timed as the loop runs them.
    platform = next(iter(jax.tree.leaves(self.params)[0].sharding.device_set)).platform
    compiled = self._fn.lower(self.params, tokens, 0).compile(
        pair_lib.compiler_options(platform, bool(self.cfg.quantize)))
    timed = lambda n: best_seconds(lambda: compiled(self.params, tokens, n), 2)
    timed(1)  # warm-up
    return max(timed(repeats) - timed(0), 1e-9) / repeats


_OPTIMISED_CPU = {"xla_backend_optimization_level": 2, "xla_llvm_disable_expensive_passes": False}


def measure_bandwidth(mesh, nbytes: int, repeats: int = 5) -> float:
  """Bytes/s each device reads while every device of `mesh` reads at once, as a decode step
  reads its weights: a matrix-vector product (one row, float32) over an nbytes weight matrix
  sharded across all the devices. Weights are read once per step and not written, and a step
  runs on every device (and every thread) the program uses, so a probe that copies an array on
  one device measures something else (on a 2-core CPU, a sixth of what numpy's copy moves)."""
  n = mesh.size
  rows = 4096
  cols = max(1, nbytes // (4 * rows * n)) * n
  spread = NamedSharding(mesh, PartitionSpec(None, mesh.axis_names))
  weights = jax.jit(lambda: jnp.ones((rows, cols), jnp.float32), out_shardings=spread)()
  x = jax.device_put(jnp.ones((1, rows), jnp.float32), NamedSharding(mesh, PartitionSpec()))
  # The figure is the machine's, not the compiler settings': on CPU, flags that trade code
  # quality for compile time (as the test suite sets) must not slow the probe.
  options = _OPTIMISED_CPU if jax.devices()[0].platform == "cpu" else None
  matvec = jax.jit(lambda x, w: x @ w, out_shardings=spread).lower(x, weights).compile(options)
  jax.block_until_ready(matvec(x, weights))
  return weights.nbytes / n / best_seconds(lambda: matvec(x, weights), repeats)
