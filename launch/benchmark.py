"""Autoregressive vs speculative sampling on the same models and prompts, swept over K and batch.

    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench
    python -m launch.benchmark --config=configs/llama_7b_bench.py --output_dir=/tmp/bench_llama \
        --ks=0,1,2,4,6,8 --batches=1,8
    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench_int8 \
        --ks=0,4 --batches=1,8 --quantize=none,int8
    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench_sources \
        --draft_kinds=none,ngram,model,hybrid --batches=4

Per (batch, K) point: ms per token (wall time of the on-device loop / new tokens per row),
tokens/s, acceptance rate a, cost ratio c = draft step / target step (both timed as jitted
single-token steps at the same context length), measured speedup vs K=0 at the same batch, the
ideal speedup (1 - a^(K+1)) / ((1 - a)(K c + 1)) (Leviathan et al. 2023, Thm 3.8) and their ratio,
verification cost (target forward of K+1 tokens / 1-token target step), and memory-bandwidth
utilisation of the target step: bytes of weights + KV cache (its filled blocks, where it is
longer than one attention block) each device reads per step / step
time, against the bandwidth each device gets when all of them read at once the way a decode
step reads its weights (a matrix-vector product over a weight matrix sharded across every device
of the mesh, too large for any cache). A utilisation above 100% cannot be a memory bandwidth: the
weights came from cache (a model small enough to fit); the table marks it and says so.

Generation ignores EOS (every row makes max_new_tokens), so all points do the same work.
Prompts: the config's run.prompts through its tokenizer (cycled to fill a batch); without a
tokenizer, random tokens of run.prompt_len. Compilation and a warm-up run are excluded from
every timing. Writes results.json, a table (stdout and table.txt) and speedup_vs_k.png.
`--quantize=none,int8` runs the whole sweep once per weight form (target and draft alike) in one
process, each into its own subdirectory, and ends with a side-by-side table (quantize.txt):
ms/token of each form at every (batch, K), and the weight bytes a target step reads per device.
`--draft_kinds` instead compares draft sources at K = sampling.k and the first batch size
(spec_tpu/decoding/source_bench.py) on two workloads: "rewrite" (a held-out stdlib function, then
its first line again: the continuation repeats the prompt) and "open" (the config's prompts).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

from absl import flags
from absl import logging

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/default.py", "Setup to run.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json and the plot go.")
_KS = flags.DEFINE_list("ks", ["0", "1", "2", "4", "6", "8"], "Draft tokens per round to sweep.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes to sweep.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "New tokens per row (default: config).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (the fastest is kept).")
_STEP_REPEATS = flags.DEFINE_integer("step_repeats", 20, "Steps per timed step loop.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 0, "Cache slots of every program (0: what the "
                                  "prompts and new tokens need); a long max context that the "
                                  "tokens fill only in part.")
_QUANTIZE = flags.DEFINE_list("quantize", None, "Weight forms to benchmark in turn, target and "
                              "draft alike: none (float) and/or int8 (default: the config's).")
_DRAFT_KINDS = flags.DEFINE_list("draft_kinds", None, "Compare draft sources instead of "
                                 "sweeping K: none (autoregressive), ngram, model, hybrid.")
flags.mark_flag_as_required("output_dir")


# ---------------------------------------------------------------- step timing

def _per_device_bytes(tree_of_structs, shardings) -> int:
  import jax
  import numpy as np
  leaves = jax.tree.leaves(tree_of_structs)
  shards = jax.tree.leaves(shardings)
  return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, shards)))


def _read_cache_bytes(abstract, cache_sh, context: int) -> int:
  """Bytes of the cache one step at `context` reads per device: a KV cache longer than one
  attention block is read only up to the filled blocks (model.ATTENTION_BLOCK slots each)."""
  from spec_tpu.models import cache as cache_lib, model
  block = model.ATTENTION_BLOCK
  total = 0
  for entry, sh in zip(abstract.groups + abstract.remainder, cache_sh.groups + cache_sh.remainder):
    nbytes = _per_device_bytes(entry, sh)
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
    self.cache_bytes = _read_cache_bytes(abstract, cache_sh, context)
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
        sampler.compiler_options(platform, bool(self.cfg.quantize)))

    def timed(n):
      best = float("inf")
      for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(compiled(self.params, tokens, n))
        best = min(best, time.perf_counter() - start)
      return best

    timed(1)  # warm-up
    return max(timed(repeats) - timed(0), 1e-9) / repeats


_OPTIMISED_CPU = {"xla_backend_optimization_level": 2, "xla_llvm_disable_expensive_passes": False}


def measure_bandwidth(mesh, nbytes: int, repeats: int = 5) -> float:
  """Bytes/s each device reads while every device of `mesh` reads at once, as a decode step
  reads its weights: a matrix-vector product (one row, float32) over an nbytes weight matrix
  sharded across all the devices. Weights are read once per step and not written, and a step
  runs on every device (and every thread) the program uses, so a probe that copies an array on
  one device measures something else (on a 2-core CPU, a sixth of what numpy's copy moves)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
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
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matvec(x, weights))
    best = min(best, time.perf_counter() - start)
  return weights.nbytes / n / best


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
  ks = sorted(set(cli.int_list("ks", ks)))
  batches = cli.int_list("batches", batches)
  if any(k < 0 for k in ks) or 0 not in ks:
    raise cli.UserError(f"--ks must be >= 0 and include 0 (the baseline), got "
                        f"{','.join(map(str, ks))}")
  if not batches or any(b <= 0 for b in batches):
    raise cli.UserError(f"--batches must be positive, got {','.join(map(str, batches))}")
  for name, value, least in (("repeats", repeats, 1), ("step_repeats", step_repeats, 1),
                             ("max_new_tokens", 1 if max_new is None else max_new, 1),
                             ("cache_len", cache_len, 0)):
    if value < least:
      raise cli.UserError(f"--{name} must be >= {least}, got {value}")
  import jax
  from launch import common

  setup = common.resolve(config, need_weights=True, k=max(ks))
  max_new = int(config.sampling.max_new_tokens if max_new is None else max_new)
  prompt_sets = {b: prompts_for(config, setup, b) for b in batches}  # tokenizer errors here
  lengths = [len(p) for ps in prompt_sets.values() for p in ps]
  if not min(lengths):
    raise common.SetupError("a prompt is empty (run.prompts, or run.prompt_len random tokens)")
  if cache_len and max(lengths) + max_new + max(ks) + 1 > cache_len:
    raise common.SetupError(f"--cache_len={cache_len} cannot hold the longest prompt "
                            f"({max(lengths)} tokens), {max_new} new tokens and "
                            f"{max(ks) + 1} for verification")
  cli.make_output_dir("output_dir", output_dir)

  mesh = common.build_mesh(config)
  if max(ks) == 0:
    setup = dataclasses.replace(setup, draft=None)
  for m in (setup.target, setup.draft):
    if m is not None:
      logging.info("%s", m.describe())
  # No EOS: every row generates max_new tokens, so every point does the same work.
  sampler = common.build_sampler(setup, mesh, eos_id=None, pad_id=0, cache_len=cache_len)
  bandwidth = measure_bandwidth(mesh, (1 << 30) if jax.devices()[0].platform != "cpu"
                                else (1 << 28))
  logging.info("measured bandwidth: %.1f GB/s per device (%d devices reading at once)",
               bandwidth / 1e9, mesh.size)

  points = []
  for b in batches:
    prompts = prompt_sets[b]
    prompt_len = max(len(p) for p in prompts)
    context = prompt_len + max_new // 2  # the middle of generation
    target_timer = StepTimer(sampler.target_params, setup.target.cfg, setup.target.rules, mesh,
                             b, context, max(ks) + 1, cache_len)
    t_target = target_timer.seconds_per_step(1, step_repeats)
    c, t_draft = float("nan"), float("nan")
    if max(ks) > 0 and setup.draft is not None:  # n-gram drafts: no draft step
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
                   target_mib_per_step=step_bytes / (1 << 20),
                   bandwidth_utilisation=step_bytes / t_target / bandwidth,
                   tokens_per_target_call=runs[0].tokens_per_call())
      points.append(point)
      logging.info("batch %d k %d: %.2f ms/token, speedup %.2f", b, k, point["ms_per_token"],
                   measured)
    del res
  result = dict(
      quantize=setup.target.cfg.quantize or "none",
      target=setup.target.describe(), draft=setup.draft.describe() if setup.draft else None,
      draft_kind=setup.draft_source.kind, random_weights=setup.any_random, device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(), mesh=dict(mesh.shape), max_new_tokens=max_new,
      cache_len=cache_len or None,
      sampling=dict(temperature=setup.sampling.temperature, top_p=setup.sampling.top_p,
                    top_k=setup.sampling.top_k),
      bandwidth_bytes_per_s=bandwidth, points=points)
  if any(_above_memory(p) for p in points):
    result["bandwidth_note"] = CACHED_NOTE
  common.write_results(output_dir, result, format_table(result))
  plot(result, os.path.join(output_dir, "speedup_vs_k.png"))
  return result


COLUMNS = [("batch", "B", "{:d}"), ("k", "K", "{:d}"), ("ms_per_token", "ms/tok", "{:.2f}"),
           ("tokens_per_s", "tok/s", "{:.1f}"), ("acceptance", "a", "{:.3f}"),
           ("cost_ratio_c", "c", "{:.3f}"), ("speedup", "speedup", "{:.2f}"),
           ("ideal_speedup", "ideal", "{:.2f}"), ("measured_over_ideal", "meas/ideal", "{:.2f}"),
           ("verify_cost", "verify", "{:.2f}"), ("bandwidth_utilisation", "bw util", "{:.1%}"),
           ("target_mib_per_step", "MiB/step", "{:.2f}")]


CACHED_NOTE = ("* bw util above 100%: the step read its weights faster than memory can deliver "
               "them, so they came from cache (the model fits in it); that figure is not a "
               "memory-bandwidth utilisation")


def _above_memory(point: dict) -> bool:
  return (point.get("bandwidth_utilisation") or 0) > 1


def _cell(p: dict, key: str, fmt: str) -> str:
  value = p[key]
  if not isinstance(value, (int, float)) or isinstance(value, float) and not math.isfinite(value):
    return "n/a"
  text = fmt.format(value)
  return text + "*" if key == "bandwidth_utilisation" and _above_memory(p) else text


def format_table(result: dict) -> str:
  head = [f"target: {result['target']}", f"draft:  {result['draft']}",
          f"device: {result['num_devices']} x {result['device']}, mesh {result['mesh']}, "
          f"bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s per device (all reading)"
          + (f", caches of {result['cache_len']} slots" if result.get("cache_len") else "")]
  if result["random_weights"]:
    head.append("RANDOM WEIGHTS: acceptance (and so speedup) is not meaningful")
  rows = [[name for _, name, _ in COLUMNS]]
  for p in result["points"]:
    rows.append([_cell(p, key, fmt) for key, _, fmt in COLUMNS])
  widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
  cached = any(_above_memory(p) for p in result["points"])
  return "\n".join(head + [""] + lines + (["", CACHED_NOTE] if cached else []))


def plot(result: dict, path: str) -> None:
  from launch import common
  plt = common.pyplot(path)
  if plt is None:
    return
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
  del argv  # cli.run refuses positional arguments
  from launch import common
  modes = [None] if _QUANTIZE.value is None else [m.strip() for m in _QUANTIZE.value]
  if not modes or len(set(modes)) < len(modes):
    raise cli.UserError(f"--quantize takes distinct forms (none, int8), got "
                        f"{','.join(_QUANTIZE.value)!r}")
  # Every form's setup is checked before the first one runs for minutes.
  configs = [common.with_quantize(_CONFIG.value, mode) for mode in modes]
  for config in configs:
    common.resolve(config, need_weights=True, k=0)
  cache_dir = common.use_compile_cache(_CONFIG.value)
  if _DRAFT_KINDS.value is not None:
    run_draft_kinds(_CONFIG.value, _OUTPUT_DIR.value, _DRAFT_KINDS.value, _BATCHES.value,
                    _MAX_NEW.value, _REPEATS.value)
    return
  results = []
  for mode, config in zip(modes, configs):
    out = _OUTPUT_DIR.value if len(modes) == 1 else os.path.join(_OUTPUT_DIR.value, mode)
    results.append(run(config, out, _KS.value, _BATCHES.value, _MAX_NEW.value, _REPEATS.value,
                       _STEP_REPEATS.value, _CACHE_LEN.value))
  logging.info("%s", common.compile_cache_summary(cache_dir))
  if len(results) > 1:
    table = format_comparison(results)
    with open(os.path.join(_OUTPUT_DIR.value, "quantize.txt"), "w") as f:
      f.write(table + "\n")
    print("\n" + table, flush=True)


def run_draft_kinds(config, output_dir: str, kinds, batches, max_new: int | None,
                    repeats: int) -> list[dict]:
  """Draft sources on a prompt-repeating and an open-ended workload (one batch size)."""
  from launch import common
  from spec_tpu.decoding import source_bench
  from spec_tpu.training import corpus
  kinds = [k.strip() for k in kinds]
  batch = cli.int_list("batches", batches)[0]
  setup = common.resolve(config, need_weights=True)
  tok = common.load_tokenizer(config, setup)
  if tok is None or not len(config.run.prompts):
    raise common.SetupError("--draft_kinds needs a tokenizer and run.prompts (the workloads "
                            "are text)")
  if setup.k < 1:
    raise common.SetupError(f"--draft_kinds compares at K = sampling.k, got {setup.k}")
  if setup.draft is None and {"model", "hybrid"} & set(kinds):
    raise common.SetupError("draft kinds model and hybrid need a draft model (draft.checkpoint "
                            "or draft.preset)")
  cli.make_output_dir("output_dir", output_dir)
  _, heldout = corpus.split(corpus.stdlib_files())
  encode = lambda ps: [tok.encode(p, add_bos=bool(config.run.add_bos)) for p in ps]
  workloads = {"rewrite": encode(source_bench.rewrite_prompts(heldout, tok, batch)),
               "open": encode([config.run.prompts[i % len(config.run.prompts)]
                               for i in range(batch)])}
  sampler = common.build_sampler(setup, common.build_mesh(config), eos_id=None, pad_id=0)
  max_new = int(config.sampling.max_new_tokens if max_new is None else max_new)
  try:
    rows = source_bench.compare_sources(
        sampler, workloads, k=setup.k, max_new_tokens=max_new, sampling=setup.sampling,
        sources=kinds, ngram_max=setup.draft_source.ngram_max,
        ngram_min=setup.draft_source.ngram_min, repeats=repeats, seed=int(config.sampling.seed))
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  head = [f"target: {setup.target.describe()}",
          f"draft:  {setup.draft.describe() if setup.draft else None}",
          f"batch {batch}, K = {setup.k}, {max_new} new tokens, device "
          f"{jax_device_kind()}"]
  common.write_results(output_dir, dict(batch=batch, k=setup.k, max_new_tokens=max_new,
                                        random_weights=setup.any_random, points=rows),
                       "\n".join(head + [""]) + source_bench.format_table(rows))
  return rows


def jax_device_kind() -> str:
  import jax
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


def format_comparison(results: list[dict]) -> str:
  """ms/token of each weight form at every (batch, K), side by side, with the target's bytes
  read per step (weights + KV cache, per device) and each form's time relative to the first."""
  forms = [r["quantize"] for r in results]
  by_form = [{(p["batch"], p["k"]): p for p in r["points"]} for r in results]
  head = ["B", "K"] + [f"{f} ms/tok" for f in forms] + [f"{f} / {forms[0]}" for f in forms[1:]] \
      + [f"{f} MiB/step" for f in forms]
  rows = [head]
  for key in by_form[0]:
    if not all(key in points for points in by_form):
      continue
    ms = [points[key]["ms_per_token"] for points in by_form]
    rows.append([str(key[0]), str(key[1])] + [f"{m:.2f}" for m in ms]
                + [f"{m / ms[0]:.2f}" for m in ms[1:]]
                + [f"{points[key]['target_mib_per_step']:.2f}" for points in by_form])
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


if __name__ == "__main__":
  cli.run(main)
