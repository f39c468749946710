"""launch.benchmark's sweep: autoregressive vs speculative sampling on the same models and
prompts, over K and batch.

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
With draft.kind = ngram no draft model runs: c is n/a and K's rounds cost one verification.

`run_draft_kinds` (`--draft_kinds`) instead compares draft sources at K = engine.k and one batch
size (spec_tpu/decoding/source_bench.py) on two workloads: "rewrite" (a held-out stdlib
function, then its first line again: the continuation repeats the prompt) and "open" (the
config's prompts).
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging
import jax

from spec_tpu import profiling, reports, setup as common
from spec_tpu.decoding import k_policy
from spec_tpu.decoding.prompts import synthetic as prompts_synthetic
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.setup import SetupError


# ---------------------------------------------------------------- the sweep

def prompts_for(config, setup, batch: int) -> list[list[int]]:
  tok = common.load_tokenizer(config, setup)
  if tok is not None and len(config.run.prompts):
    encoded = [tok.encode(p, add_bos=bool(config.run.add_bos)) for p in config.run.prompts]
    return [encoded[i % len(encoded)] for i in range(batch)]
  return prompts_synthetic(batch, int(config.run.prompt_len), setup.target.cfg.num_tokens)


def run(config, output_dir: str, ks, batches, max_new: int | None, repeats: int,
        step_repeats: int, cache_len: int = 0) -> dict:
  ks, batches = sorted(set(ks)), list(batches)
  if any(k < 0 for k in ks) or 0 not in ks:
    raise SetupError(f"--ks must be >= 0 and include 0 (the baseline), got "
                        f"{','.join(map(str, ks))}")
  if not batches or any(b <= 0 for b in batches):
    raise SetupError(f"--batches must be positive, got {','.join(map(str, batches))}")
  for name, value, least in (("repeats", repeats, 1), ("step_repeats", step_repeats, 1),
                             ("max_new_tokens", 1 if max_new is None else max_new, 1),
                             ("cache_len", cache_len, 0)):
    if value < least:
      raise SetupError(f"--{name} must be >= {least}, got {value}")
  setup = common.resolve(config, need_weights=True, k=max(ks))
  max_new = int(config.sampling.max_new_tokens if max_new is None else max_new)
  prompt_sets = {b: prompts_for(config, setup, b) for b in batches}  # tokenizer errors here
  lengths = [len(p) for ps in prompt_sets.values() for p in ps]
  if not min(lengths):
    raise SetupError("a prompt is empty (run.prompts, or run.prompt_len random tokens)")
  if cache_len and max(lengths) + max_new + max(ks) + 1 > cache_len:
    raise SetupError(f"--cache_len={cache_len} cannot hold the longest prompt "
                            f"({max(lengths)} tokens), {max_new} new tokens and "
                            f"{max(ks) + 1} for verification")
  reports.make_output_dir("output_dir", output_dir)

  mesh = common.build_mesh(config)
  if max(ks) == 0:
    setup = dataclasses.replace(setup, draft=None)
  for m in (setup.target, setup.draft):
    if m is not None:
      logging.info("%s", m.describe())
  # No EOS: every row generates max_new tokens, so every point does the same work.
  sampler = Sampler(common.build_pair(setup, mesh, eos_ids=(), pad_id=0),
                    cache_len=cache_len or None, coupling=setup.coupling)
  bandwidth = profiling.measure_bandwidth(mesh, (1 << 30) if jax.devices()[0].platform != "cpu"
                                else (1 << 28))
  logging.info("measured bandwidth: %.1f GB/s per device (%d devices reading at once)",
               bandwidth / 1e9, mesh.size)

  points = []
  for b in batches:
    prompts = prompt_sets[b]
    prompt_len = max(len(p) for p in prompts)
    context = prompt_len + max_new // 2  # the middle of generation
    target_timer = profiling.StepTimer(sampler.target_params, setup.target.cfg, setup.target.rules, mesh,
                             b, context, max(ks) + 1, cache_len)
    t_target = target_timer.seconds_per_step(1, step_repeats)
    c, t_draft = float("nan"), float("nan")
    if max(ks) > 0 and setup.draft is not None:  # n-gram drafts: no draft step
      draft_timer = profiling.StepTimer(sampler.draft_params, setup.draft.cfg, setup.draft.rules, mesh, b,
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
      ideal = k_policy.ideal_speedup(a, c, k)
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
      draft_kind=setup.draft_source.kind, random_weights=setup.any_random,
      device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(), mesh=dict(mesh.shape), max_new_tokens=max_new,
      cache_len=cache_len or None,
      sampling=dict(temperature=setup.sampling.temperature, top_p=setup.sampling.top_p,
                    top_k=setup.sampling.top_k),
      bandwidth_bytes_per_s=bandwidth, points=points)
  if any(_above_memory(p) for p in points):
    result["bandwidth_note"] = CACHED_NOTE
  reports.write_results(output_dir, result, format_table(result))
  plot(result, os.path.join(output_dir, "speedup_vs_k.png"))
  return result


def run_draft_kinds(config, output_dir: str, kinds, batch: int, max_new: int | None,
                    repeats: int) -> list[dict]:
  """Draft sources (none = autoregressive, ngram, model, hybrid) on a prompt-repeating and an
  open-ended workload at one batch size; results.json and table.txt in output_dir."""
  from spec_tpu.decoding import source_bench
  from spec_tpu.training import corpus
  kinds = [k.strip() for k in kinds]
  if batch < 1 or repeats < 1:
    raise SetupError(f"--batches and --repeats must be >= 1, got {batch} and {repeats}")
  setup = common.resolve(config, need_weights=True)
  tok = common.load_tokenizer(config, setup)
  if tok is None or not len(config.run.prompts):
    raise SetupError("--draft_kinds needs a tokenizer and run.prompts (the workloads are text)")
  if setup.k < 1:
    raise SetupError(f"--draft_kinds compares at K = engine.k, got {setup.k}")
  if setup.draft is None and {"model", "hybrid"} & set(kinds):
    raise SetupError("draft kinds model and hybrid need a draft model (draft.checkpoint or "
                     "draft.preset, and draft.kind model or hybrid)")
  reports.make_output_dir("output_dir", output_dir)
  _, heldout = corpus.split(corpus.stdlib_files())
  encode = lambda ps: [tok.encode(p, add_bos=bool(config.run.add_bos)) for p in ps]
  workloads = {"rewrite": encode(source_bench.rewrite_prompts(heldout, tok, batch)),
               "open": encode([config.run.prompts[i % len(config.run.prompts)]
                               for i in range(batch)])}
  # No EOS: every row generates max_new tokens, so every source does the same work.
  sampler = Sampler(common.build_pair(setup, common.build_mesh(config), eos_ids=(), pad_id=0))
  max_new = int(config.sampling.max_new_tokens if max_new is None else max_new)
  try:
    rows = source_bench.compare_sources(
        sampler, workloads, k=setup.k, max_new_tokens=max_new, sampling=setup.sampling,
        sources=kinds, ngram_max=setup.draft_source.ngram_max,
        ngram_min=setup.draft_source.ngram_min, repeats=repeats, seed=int(config.sampling.seed))
  except ValueError as e:
    raise SetupError(str(e)) from None
  head = [f"target: {setup.target.describe()}",
          f"draft:  {setup.draft.describe() if setup.draft else None}",
          f"batch {batch}, K = {setup.k}, {max_new} new tokens, device "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}"]
  reports.write_results(output_dir, dict(batch=batch, k=setup.k, max_new_tokens=max_new,
                                         random_weights=setup.any_random, points=rows),
                        "\n".join(head + [""]) + source_bench.format_table(rows))
  return rows


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
  plt = reports.pyplot(path)
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


def run_couplings(config, output_dir: str, couplings, temperatures, batches,
                  max_new: int | None, repeats: int) -> list[dict]:
  """The couplings side by side (coupling_bench.compare) at K = sampling.k, for every batch and
  temperature (None: the config's); writes results.json and table.txt."""
  from spec_tpu.decoding import coupling_bench, decode
  for c in couplings:
    try:
      decode.check_coupling(c)
    except ValueError as e:
      raise SetupError(f"--couplings: {e}") from None
  if not batches or min(batches) < 1:
    raise SetupError(f"--batches must be positive, got {','.join(map(str, batches))}")
  temps = [float(config.sampling.temperature)] if temperatures is None else list(temperatures)
  if not temps or not all(t > 0 for t in temps):
    raise SetupError(f"--temperatures must be > 0, got {','.join(map(str, temps))}")
  setup = common.resolve(config, need_weights=True)
  if setup.k < 1:
    raise SetupError(f"--couplings compares speculative decoding: it needs engine.k >= 1, got "
                     f"{setup.k}")
  samplings = [dataclasses.replace(setup.sampling, temperature=t) for t in temps]
  max_new = int(config.sampling.max_new_tokens if max_new is None else max_new)
  reports.make_output_dir("output_dir", output_dir)
  sampler = Sampler(common.build_pair(setup, common.build_mesh(config), eos_ids=(), pad_id=0))
  rows = []
  for b in batches:
    for row in coupling_bench.compare(sampler, prompts_for(config, setup, b), k=setup.k,
                                      couplings=couplings, samplings=samplings,
                                      max_new_tokens=max_new, seed=int(config.sampling.seed),
                                      repeats=repeats):
      rows.append(dict(batch=b, **row))
  reports.write_results(output_dir, dict(target=setup.target.describe(),
                                         draft=setup.draft.describe(), max_new_tokens=max_new,
                                         random_weights=setup.any_random, rows=rows),
                        coupling_bench.format_table(rows))
  return rows


def run_images(config, output_dir: str, counts, repeats: int) -> list[dict]:
  """The vision encoder's time per image and the time to first token with each count of images
  in the prompt (serving/image_bench.py), through a one-slot engine running the target alone
  at K = 0 (encoding and the prefill are the target's), with Pan & Scan where
  run.pan_and_scan; writes results.json and table.txt."""
  from spec_tpu.serving import Engine, image_bench
  counts = sorted(set(counts))
  if not counts or counts[0] < 0 or repeats < 1:
    raise SetupError(f"--images takes counts >= 0 and --repeats must be >= 1, got "
                     f"{','.join(map(str, counts))} and {repeats}")
  setup = common.resolve(config, need_weights=True, k=0)
  vision = setup.target.cfg.vision
  if vision is None:
    raise SetupError(f"--images: target {setup.target.cfg.name!r} has no vision encoder "
                     "(e.g. --config.model.preset=tiny_vision)")
  crop_text = None
  if bool(config.run.pan_and_scan):
    tok = common.load_tokenizer(config, setup)
    if tok is None:
      raise SetupError("run.pan_and_scan needs a tokenizer (model.tokenizer) for Pan & Scan's "
                       "words")
    from spec_tpu.models.vision import prompt as image_prompt
    crop_text = image_prompt.crop_text_ids(tok.encode)
  blocks = {vision.start_id, vision.end_id, vision.newline_id, vision.image_id}
  prompt = [t for t in prompts_for(config, setup, 1)[0] if t not in blocks]
  reports.make_output_dir("output_dir", output_dir)
  pair = common.build_pair(setup, common.build_mesh(config), eos_ids=(), pad_id=0,
                           use_draft=False)
  seed = int(config.sampling.seed)
  longest = image_bench.bench_request(prompt, counts[-1], vision, seed, crop_text)[2]
  engine = Engine(pair, num_slots=1, k=0, adaptive_k=False, max_len=len(longest) + 8)
  rows = image_bench.measure(engine, prompt, counts, repeats, seed=seed, pan_and_scan=crop_text)
  reports.write_results(output_dir, dict(target=setup.target.describe(),
                                         device=str(jax.devices()[0]),
                                         num_devices=jax.device_count(),
                                         random_weights=setup.any_random, repeats=repeats,
                                         pan_and_scan=crop_text is not None, rows=rows),
                        image_bench.format_table(rows))
  return rows
