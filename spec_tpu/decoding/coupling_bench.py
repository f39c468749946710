"""The two couplings side by side: acceptance and tokens/s of one Sampler's pair under each, at
several sampling settings, with the acceptance each should reach on the same text.

    rows = compare(sampler, prompts, k=4, couplings=("rejection", "gumbel"),
                   samplings=[SamplingParams(temperature=t) for t in (0.6, 1.0)],
                   max_new_tokens=64)
    print(format_table(rows))

Expected acceptance, from the target's q and the draft's p (both filtered) at every generated
position after the first (the contexts drafts are judged in): the rejection step accepts with
probability 1 - TV(p, q); the gumbel coupling's draft agrees with probability
sum_i 1 / sum_j max(p_j / p_i, q_j / q_i) (exponential races: both pick i when every other
clock loses to i's under both rates), which is at least (1 - TV) / (1 + TV) (Daliri, Musco and
Suresh 2024). Measured acceptance is accepted / judged draft tokens (Result.acceptance_rate).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu.decoding import sampling as sampling_lib
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import model


def compare(sampler, prompts: Sequence[Sequence[int]], *, k: int, couplings: Sequence[str],
            samplings: Sequence[SamplingParams], max_new_tokens: int, seed: int = 0,
            repeats: int = 3) -> list[dict]:
  """One row per (sampling, coupling): tokens/s (fastest of `repeats` timed runs after an
  untimed one that compiles; the couplings' runs interleaved) in wall time and per second of
  this process's CPU time (on the CPU backend, what other processes on a shared machine do not
  inflate; host work included), acceptance, tokens per target
  call, and the expected acceptances on the text the first coupling generated (the same law:
  any coupling's text will do)."""
  if k < 1 or sampler.draft_cfg is None:
    raise ValueError("comparing couplings needs a draft and k >= 1")
  rows = []
  for sp in samplings:
    def run(coupling, seed):
      start = time.process_time()
      result = sampler.generate(prompts, max_new_tokens=max_new_tokens, k=k, sampling=sp,
                                coupling=coupling, seed=seed)
      return result, time.process_time() - start
    first = {c: run(c, seed)[0] for c in couplings}
    # Timed runs interleaved, fastest kept: a busy spell of the machine hits every coupling.
    runs = {c: [] for c in couplings}
    for r in range(repeats):
      for c in couplings:
        runs[c].append(run(c, seed + 1 + r))
    expected = expected_acceptance(sampler, prompts, first[couplings[0]].tokens, sp)
    for c in couplings:
      cpu_s = min(t for _, t in runs[c])
      runs[c] = [r for r, _ in runs[c]]
      accepted = sum(int(r.accepted.sum()) for r in runs[c])
      judged = sum(int(r.reached.sum()) for r in runs[c])
      rows.append(dict(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                       coupling=c, k=k, tokens_per_s=runs[c][0].num_generated
                       / min(r.seconds for r in runs[c]),
                       tokens_per_cpu_s=runs[c][0].num_generated / cpu_s,
                       acceptance=accepted / judged if judged else float("nan"),
                       tokens_per_target_call=float(np.mean([r.tokens_per_call()
                                                             for r in runs[c]])),
                       **expected))
  return rows


def expected_acceptance(sampler, prompts, tokens, sp: SamplingParams) -> dict:
  """Mean 1 - TV, (1 - TV) / (1 + TV) and the exact gumbel agreement over the positions of
  `tokens` after each row's first (the draft and target distributions given the row's own
  prefix)."""
  n = max(len(t) for t in tokens)
  seqs = np.zeros((len(prompts), max(map(len, prompts)) + n), np.int32)
  at, real = np.zeros((len(prompts), n - 1), np.int32), np.zeros((len(prompts), n - 1), bool)
  for i, (p, t) in enumerate(zip(prompts, tokens)):
    seqs[i, :len(p) + len(t)] = list(p) + list(t)
    at[i] = len(p) + np.arange(n - 1)  # the context ends with generated token j, j < n - 1
    real[i, :max(len(t) - 1, 0)] = True
  top_k = sp.effective_top_k(sampler.target_cfg.num_tokens)
  args = (seqs, at, np.float32(sp.temperature), np.float32(sp.top_p), top_k)
  q = _filtered(sampler.target_params, sampler.target_cfg, *args)
  p = _filtered(sampler.draft_params, sampler.draft_cfg, *args)
  tv, agree = (np.asarray(x).reshape(real.shape)[real]
               for x in _agreement(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])))
  return dict(expected_rejection=float(np.mean(1 - tv)),
              gumbel_bound=float(np.mean((1 - tv) / (1 + tv))),
              expected_gumbel=float(np.mean(agree)))


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def _filtered(params, cfg, seqs_bt, at_bm, temperature, top_p, top_k):
  logits = model.forward_full(params, cfg, seqs_bt)
  logits = jnp.take_along_axis(logits, at_bm[..., None], axis=1)[..., :cfg.num_tokens]
  return sampling_lib.probabilities(logits, temperature, top_k, top_p)


@jax.jit
def _agreement(p_nv, q_nv):
  """TV(p, q) and P(gumbel draft == gumbel target) per row (n v distributions)."""
  def one(pq):
    p, q = pq
    both = (p > 0) & (q > 0)
    safe_p, safe_q = jnp.where(both, p, 1.0), jnp.where(both, q, 1.0)
    races = jnp.maximum(p[None, :] / safe_p[:, None], q[None, :] / safe_q[:, None]).sum(-1)
    return 0.5 * jnp.abs(p - q).sum(), jnp.sum(jnp.where(both, 1.0 / races, 0.0))
  return jax.lax.map(one, (p_nv, q_nv))


COLUMNS = [("temperature", "T", "{:.2f}"), ("coupling", "coupling", "{}"), ("k", "K", "{:d}"),
           ("tokens_per_s", "tok/s", "{:.1f}"), ("tokens_per_cpu_s", "tok/cpu-s", "{:.1f}"),
           ("acceptance", "a", "{:.3f}"),
           ("tokens_per_target_call", "tok/call", "{:.2f}"),
           ("expected_rejection", "1-TV", "{:.3f}"),
           ("expected_gumbel", "gumbel exact", "{:.3f}"),
           ("gumbel_bound", "(1-TV)/(1+TV)", "{:.3f}")]


def format_table(rows: list[dict]) -> str:
  """A text table of compare()'s rows (with a batch column when they carry one)."""
  columns = ([("batch", "B", "{:d}")] if rows and "batch" in rows[0] else []) + COLUMNS
  table = [[title for _, title, _ in columns]]
  table += [[fmt.format(r[key]) for key, _, fmt in columns] for r in rows]
  widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table)
