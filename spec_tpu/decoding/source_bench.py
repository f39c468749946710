"""Draft sources compared on one Sampler: autoregressive, n-gram, draft model, hybrid, on
workloads that repeat their prompt and workloads that do not.

    rows = compare_sources(sampler, {"rewrite": rewrite, "open": open_ended}, k=4,
                           max_new_tokens=64, sampling=SamplingParams(temperature=0.8))
    print(format_table(rows))

Each (workload, source) point is timed as the fastest of `repeats` runs after a compiling
warm-up (Sampler.generate times the device program only) and reports tokens per target call
(prefill included, as Result.tokens_per_call) and tokens/s, with the acceptance of each
source's proposals.
"""

from __future__ import annotations

import ast
from typing import Sequence

from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.decoding.sampling import SamplingParams

SOURCES = ("none", "ngram", "model", "hybrid")  # none: autoregressive (K = 0)

REWRITE_HEADER = "# Rewrite this function with clearer names.\n"


def rewrite_prompts(files, tokenizer, count: int, max_tokens: int = 96) -> list[str]:
  """'Rewrite this function' prompts: a whole function from `files` (Python sources), then its
  first line again, ending in the body's indentation, so a good continuation repeats most of
  the prompt. Functions are taken in file order; each prompt encodes to <= max_tokens."""
  out = []
  for path in files:
    try:
      source = open(path, encoding="utf-8").read()
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    lines = source.splitlines()
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef) or node.col_offset:
        continue
      body = "\n".join(lines[node.lineno - 1:node.end_lineno])
      head = lines[node.lineno - 1]
      if not head.rstrip().endswith(":") or body.count("\n") < 3:
        continue
      prompt = f"{REWRITE_HEADER}{body}\n\n\n{head}\n    "
      if len(tokenizer.encode(prompt)) <= max_tokens:
        out.append(prompt)
        if len(out) == count:
          return out
  if not out:
    raise ValueError("no function in the given files fits a rewrite prompt")
  return out


def compare_sources(sampler, workloads: dict[str, Sequence[Sequence[int]]], *, k: int,
                    max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                    sources: Sequence[str] = SOURCES, ngram_max: int = 4, ngram_min: int = 2,
                    repeats: int = 2, seed: int = 0) -> list[dict]:
  """One row per (workload, source): tokens per target call, tokens/s, speedup over "none" on
  the same workload (when it ran), acceptance overall and per proposing source."""
  unknown = set(sources) - set(SOURCES)
  if unknown:
    raise ValueError(f"unknown draft sources {sorted(unknown)}; choose from {', '.join(SOURCES)}")
  if k < 1:
    raise ValueError(f"k must be >= 1 to compare draft sources, got {k}")
  rows = []
  for name, prompts in workloads.items():
    base_tps = None
    for src in sources:
      kk = 0 if src == "none" else k
      source = DraftSource(src if kk else "model", ngram_max, ngram_min)
      run = lambda s: sampler.generate(prompts, max_new_tokens=max_new_tokens, k=kk,
                                       sampling=sampling, seed=s, draft_source=source)
      run(seed)  # compiles
      results = [run(seed + 1 + r) for r in range(repeats)]
      best = min(results, key=lambda r: r.seconds)
      tps = best.num_generated / best.seconds
      if src == "none":
        base_tps = tps
      by = best.source_acceptance() if kk else {}
      rate = lambda d: d["accepted"] / d["judged"] if d.get("judged") else float("nan")
      rows.append(dict(
          workload=name, source=src, k=kk, rows=len(prompts),
          tokens_per_target_call=best.tokens_per_call(), tokens_per_s=tps,
          speedup=tps / base_tps if base_tps else float("nan"),
          acceptance=best.acceptance_rate() if kk else float("nan"),
          ngram_acceptance=rate(by.get("ngram", {})),
          model_acceptance=rate(by.get("model", {})),
          ngram_share=(by["ngram"]["judged"] / max(1, sum(d["judged"] for d in by.values()))
                       if kk else float("nan"))))
  return rows


COLUMNS = [("workload", "workload", "{}"), ("source", "source", "{}"), ("k", "K", "{:d}"),
           ("tokens_per_target_call", "tok/call", "{:.2f}"), ("tokens_per_s", "tok/s", "{:.1f}"),
           ("speedup", "vs AR", "{:.2f}"), ("acceptance", "a", "{:.3f}"),
           ("ngram_acceptance", "a ngram", "{:.3f}"), ("model_acceptance", "a model", "{:.3f}"),
           ("ngram_share", "ngram share", "{:.0%}")]


def format_table(rows: list[dict]) -> str:
  def cell(value, fmt):
    if isinstance(value, float) and value != value:
      return "n/a"
    return fmt.format(value)
  table = [[head for _, head, _ in COLUMNS]]
  table += [[cell(r[key], fmt) for key, _, fmt in COLUMNS] for r in rows]
  widths = [max(len(t[i]) for t in table) for i in range(len(COLUMNS))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(t, widths)) for t in table)
