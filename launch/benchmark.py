"""Autoregressive vs speculative sampling on the same models and prompts, swept over K and batch.

    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench
    python -m launch.benchmark --config=configs/llama_7b_bench.py --output_dir=/tmp/bench_llama \
        --ks=0,1,2,4,6,8 --batches=1,8

Per (batch, K) point: ms per token (wall time of the on-device loop / new tokens per row),
tokens/s, acceptance rate a, cost ratio c = draft step / target step (both timed as jitted
single-token steps at the same context length), measured speedup vs K=0 at the same batch, the
ideal speedup (1 - a^(K+1)) / ((1 - a)(K c + 1)) (Leviathan et al. 2023, Thm 3.8) and their ratio,
verification cost (target forward of K+1 tokens / 1-token target step), and memory-bandwidth
utilisation of the target step: bytes of weights + KV cache each device reads per step / step
time, against a bandwidth measured by timing a large array copy on one device.

Generation ignores EOS (every row makes max_new_tokens), so all points do the same work.
Prompts: the config's run.prompts through its tokenizer (cycled to fill a batch); without a
tokenizer, random tokens of run.prompt_len. Compilation and a warm-up run are excluded from
every timing. Writes results.json, a table (stdout and table.txt) and speedup_vs_k.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Setup to run.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json and the plot go.")
_KS = flags.DEFINE_list("ks", ["0", "1", "2", "4", "6", "8"], "Draft tokens per round to sweep.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes to sweep.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "New tokens per row (default: config).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (the fastest is kept).")
_STEP_REPEATS = flags.DEFINE_integer("step_repeats", 20, "Steps per timed step loop.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 0, "Cache slots of every program (0: what the "
                                  "prompts and new tokens need); a long max context that the "
                                  "tokens fill only in part.")
flags.mark_flag_as_required("output_dir")


# ---------------------------------------------------------------- step timing

def _per_device_bytes(tree_of_structs, shardings) -> int:
  import jax
  import numpy as np
  leaves = jax.tree.leaves(tree_of_structs)
  shards = jax.tree.leaves(shardings)
  return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, shards)))


class StepTimer:
  """Times jitted forward steps of one model at a fixed context length.

  The steps run in a fori_loop inside one program (no host round-trip per step, and no pile of
  dispatched programs with collectives, which deadlocks simulated CPU devices); the cache length
  is reset after every step so each one sees the same context.
  """

  def __init__(self, params, cfg, rules, mesh, batch: int, context: int, max_tokens: int,
               cache_len: int = 0):
    import jax
    import jax.numpy as jnp
    from spec_tpu.models import cache as cache_lib, model
    from spec_tpu import sharding
    self.cfg, self.batch, self.context = cfg, batch, context
    buffer_len = max(cache_len, context + max_tokens)
    abstract = cache_lib.abstract_cache(cfg, batch, buffer_len, max_tokens)
    cache_sh = sharding.cache_shardings(abstract, mesh, rules)
    param_sh = sharding.param_shardings(cfg, mesh, rules, params)
    self.param_bytes = _per_device_bytes(params, param_sh)
    self.cache_bytes = _per_device_bytes(abstract, cache_sh)
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
    import jax
    import numpy as np
    tokens = np.full((self.batch, num_tokens), 4, np.int32)
    from spec_tpu.decoding import sampler
    # The same XLA options as the decode programs, so steps are timed as the loop runs them.
    platform = next(iter(jax.tree.leaves(self.params)[0].sharding.device_set)).platform
    compiled = self._fn.lower(self.params, tokens, 0).compile(
        sampler.compiler_options(platform))

    def timed(n):
      best = float("inf")
      for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(compiled(self.params, tokens, n))
        best = min(best, time.perf_counter() - start)
      return best

    timed(1)  # warm-up
    return max(timed(repeats) - timed(0), 1e-9) / repeats


def measure_bandwidth(device, nbytes: int) -> float:
  """Bytes/s of a large elementwise copy (read + write) on one device."""
  import jax
  import jax.numpy as jnp
  x = jax.device_put(jnp.zeros((nbytes // 4,), jnp.float32), device)
  fn = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(fn(x))
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best


# ---------------------------------------------------------------- the sweep

def prompts_for(config, setup, batch: int) -> list[list[int]]:
  from launch import common
  tok = common.load_tokenizer(config, setup)
  if tok is not None and len(config.run.prompts):
    encoded = [tok.encode(p, add_bos=bool(config.run.add_bos)) for p in config.run.prompts]
    return [encoded[i % len(encoded)] for i in range(batch)]
  return common.synthetic_prompts(batch, int(config.run.prompt_len), setup.target.cfg.num_tokens)


def run(config, output_dir: str, ks, batches, max_new: int | None, repeats: int,
        step_repeats: int, cache_len: int = 0) -> dict:
  import jax
  from launch import common

  ks = sorted({int(k) for k in ks})
  batches = [int(b) for b in batches]
  if any(k < 0 for k in ks) or any(b <= 0 for b in batches) or 0 not in ks:
    raise common.SetupError(f"--ks must be >= 0 and include 0 (the baseline), --batches > 0; "
                            f"got {ks}, {batches}")
  setup = common.resolve(config, need_weights=True, k=max(ks))
  max_new = int(max_new or config.sampling.max_new_tokens)
  os.makedirs(output_dir, exist_ok=True)
  if not os.access(output_dir, os.W_OK):
    raise common.SetupError(f"--output_dir {output_dir!r} is not writable")
  prompt_sets = {b: prompts_for(config, setup, b) for b in batches}  # tokenizer errors here

  mesh = common.build_mesh(config)
  if max(ks) == 0:
    setup = dataclasses.replace(setup, draft=None)
  for m in (setup.target, setup.draft):
    if m is not None:
      logging.info("%s", m.describe())
  # No EOS: every row generates max_new tokens, so every point does the same work.
  sampler = common.build_sampler(setup, mesh, eos_id=None, pad_id=0, cache_len=cache_len)
  bandwidth = measure_bandwidth(jax.devices()[0], (1 << 30) if jax.devices()[0].platform != "cpu"
                                else (1 << 27))
  logging.info("measured bandwidth: %.1f GB/s per device", bandwidth / 1e9)

  points = []
  for b in batches:
    prompts = prompt_sets[b]
    prompt_len = max(len(p) for p in prompts)
    context = prompt_len + max_new // 2  # the middle of generation
    target_timer = StepTimer(sampler.target_params, setup.target.cfg, setup.target.rules, mesh,
                             b, context, max(ks) + 1, cache_len)
    t_target = target_timer.seconds_per_step(1, step_repeats)
    c, t_draft = float("nan"), float("nan")
    if max(ks) > 0:
      draft_timer = StepTimer(sampler.draft_params, setup.draft.cfg, setup.draft.rules, mesh, b,
                              context, max(ks) + 1, cache_len)
      t_draft = draft_timer.seconds_per_step(1, step_repeats)
      c = t_draft / t_target
    step_bytes = target_timer.param_bytes + target_timer.cache_bytes
    baseline_tps = None
    for k in ks:
      res = sampler.generate(prompts, max_new_tokens=max_new, k=k, sampling=setup.sampling,
                             seed=int(config.sampling.seed))  # warm-up (compiles)
      runs = [sampler.generate(prompts, max_new_tokens=max_new, k=k, sampling=setup.sampling,
                               seed=int(config.sampling.seed) + 1 + r) for r in range(repeats)]
      seconds = min(r.seconds for r in runs)
      tokens = runs[0].num_generated
      tps = tokens / seconds
      if k == 0:
        baseline_tps = tps
      judged = sum(r.reached.sum() for r in runs) if k else 0
      a = float(sum(r.accepted.sum() for r in runs) / judged) if judged else float("nan")
      ideal = common.ideal_speedup(a, c, k)
      t_verify = target_timer.seconds_per_step(k + 1, step_repeats) if k else t_target
      measured = tps / baseline_tps
      point = dict(batch=b, k=k, ms_per_token=1e3 * seconds / max_new, tokens_per_s=tps,
                   acceptance=a, cost_ratio_c=c, speedup=measured, ideal_speedup=ideal,
                   measured_over_ideal=measured / ideal if ideal else float("nan"),
                   verify_cost=t_verify / t_target,
                   target_step_ms=1e3 * t_target, draft_step_ms=1e3 * t_draft,
                   target_bytes_per_step_per_device=step_bytes,
                   bandwidth_utilisation=step_bytes / t_target / bandwidth,
                   tokens_per_target_call=runs[0].tokens_per_call())
      points.append(point)
      logging.info("batch %d k %d: %.2f ms/token, speedup %.2f", b, k, point["ms_per_token"],
                   measured)
    del res
  result = dict(
      target=setup.target.describe(), draft=setup.draft.describe() if setup.draft else None,
      random_weights=setup.any_random, device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(), mesh=dict(mesh.shape), max_new_tokens=max_new,
      cache_len=cache_len or None,
      sampling=dict(temperature=setup.sampling.temperature, top_p=setup.sampling.top_p,
                    top_k=setup.sampling.top_k),
      bandwidth_bytes_per_s=bandwidth, points=points)
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(_finite(result), f, indent=1)
  table = format_table(result)
  with open(os.path.join(output_dir, "table.txt"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)
  plot(result, os.path.join(output_dir, "speedup_vs_k.png"))
  return result


def _finite(x):
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


COLUMNS = [("batch", "B", "{:d}"), ("k", "K", "{:d}"), ("ms_per_token", "ms/tok", "{:.2f}"),
           ("tokens_per_s", "tok/s", "{:.1f}"), ("acceptance", "a", "{:.3f}"),
           ("cost_ratio_c", "c", "{:.3f}"), ("speedup", "speedup", "{:.2f}"),
           ("ideal_speedup", "ideal", "{:.2f}"), ("measured_over_ideal", "meas/ideal", "{:.2f}"),
           ("verify_cost", "verify", "{:.2f}"), ("bandwidth_utilisation", "bw util", "{:.1%}")]


def format_table(result: dict) -> str:
  head = [f"target: {result['target']}", f"draft:  {result['draft']}",
          f"device: {result['num_devices']} x {result['device']}, mesh {result['mesh']}, "
          f"bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s per device"
          + (f", caches of {result['cache_len']} slots" if result.get("cache_len") else "")]
  if result["random_weights"]:
    head.append("RANDOM WEIGHTS: acceptance (and so speedup) is not meaningful")
  rows = [[name for _, name, _ in COLUMNS]]
  for p in result["points"]:
    rows.append([("n/a" if not isinstance(p[key], (int, float)) or
                  (isinstance(p[key], float) and not math.isfinite(p[key]))
                  else fmt.format(p[key])) for key, _, fmt in COLUMNS])
  widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
  return "\n".join(head + [""] + lines)


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for b in sorted({p["batch"] for p in result["points"]}):
    pts = [p for p in result["points"] if p["batch"] == b]
    line, = ax.plot([p["k"] for p in pts], [p["speedup"] for p in pts], "o-",
                    label=f"batch {b} (measured)")
    ax.plot([p["k"] for p in pts], [p["ideal_speedup"] for p in pts], "--",
            color=line.get_color(), alpha=0.6, label=f"batch {b} (ideal)")
  ax.set_xticks(sorted({p["k"] for p in result["points"]}))
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xlabel("K (draft tokens per round)")
  ax.set_ylabel("speedup vs autoregressive")
  title = "speculative sampling speedup"
  if result["random_weights"]:
    title += " (random weights)"
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from launch import common
  from spec_tpu.checkpoints import checkpoint
  cache_dir = common.use_compile_cache(_CONFIG.value)
  try:
    run(_CONFIG.value, _OUTPUT_DIR.value, _KS.value, _BATCHES.value, _MAX_NEW.value,
        _REPEATS.value, _STEP_REPEATS.value, _CACHE_LEN.value)
  except (common.SetupError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  logging.info("%s", common.compile_cache_summary(cache_dir))


if __name__ == "__main__":
  app.run(main)
