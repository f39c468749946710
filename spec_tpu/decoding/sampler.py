"""The user-facing sampler: validates input on the host, then runs one compiled program per
(shapes, K, static sampling options) with the target and draft on their own shardings.

    sampler = Sampler(Pair(target_params, target_cfg, mesh=mesh, draft_params=..., draft_cfg=...))
    result = sampler.generate(prompts, max_new_tokens=64, k=4, sampling=SamplingParams(...))
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu.decoding import decode, prompts as prompts_lib
from spec_tpu import sharding
from spec_tpu.models.config import ModelConfig
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.pair import Pair, integer


@dataclasses.dataclass
class Result:
  tokens: list[list[int]]     # generated tokens per prompt (EOS included when hit)
  rounds: np.ndarray          # target calls per row after prefill
  accepted: np.ndarray        # accepted draft tokens per row
  reached: np.ndarray         # b K: rounds where draft position j was judged
  accepted_at: np.ndarray     # b K: rounds where draft position j was accepted
  k: int
  seconds: float              # wall time of the device program (compile excluded)

  @property
  def num_generated(self) -> int:
    return sum(len(t) for t in self.tokens)

  def acceptance_rate(self, row: int | None = None) -> float:
    """Accepted / judged draft tokens: the a of the expected-speedup formula. (Drafts after a
    rejection are proposed but never judged, so accepted / proposed would understate a.)"""
    sl = slice(None) if row is None else slice(row, row + 1)
    judged = self.reached[sl].sum() if self.k else 0
    return float(self.accepted[sl].sum() / judged) if judged else float("nan")

  def tokens_per_call(self, row: int | None = None) -> float:
    """Generated tokens per target call (the prefill counts as one call)."""
    rows = range(len(self.tokens)) if row is None else [row]
    n = sum(len(self.tokens[r]) for r in rows)
    calls = sum(int(self.rounds[r]) + 1 for r in rows)
    return n / calls

  def acceptance_by_position(self) -> np.ndarray:
    reached = self.reached.sum(0)
    return np.where(reached > 0, self.accepted_at.sum(0) / np.maximum(reached, 1), np.nan)

  def row_stats(self, row: int) -> dict:
    return {"new_tokens": len(self.tokens[row]), "target_calls": int(self.rounds[row]) + 1,
            "accepted": int(self.accepted[row]), "acceptance_rate": self.acceptance_rate(row),
            "tokens_per_target_call": self.tokens_per_call(row)}


class Sampler:
  """Whole batches over a Pair: one compiled decode program per (shapes, K, static sampling
  options), kept per Sampler."""

  def __init__(self, pair: Pair, *, max_cache_len: int | None = None,
               cache_len: int | None = None):
    self.pair = pair
    # cache_len: every program's cache has exactly this many slots (benchmarks of long max
    # contexts); None: what the prompt bucket and new tokens need, capped by max_cache_len.
    self.max_cache_len, self.cache_len = max_cache_len, cache_len
    if cache_len is not None:
      self.max_cache_len = cache_len if max_cache_len is None else min(cache_len, max_cache_len)
    self._programs = {}

  @classmethod
  def from_params(cls, target_params, target_cfg: ModelConfig, *,
                  max_cache_len: int | None = None, cache_len: int | None = None,
                  **pair_options) -> "Sampler":
    """Sampler(Pair(target_params, target_cfg, **pair_options), ...) in one call."""
    return cls(Pair(target_params, target_cfg, **pair_options), max_cache_len=max_cache_len,
               cache_len=cache_len)

  # The pair's fields, read through the Sampler.
  target_params = property(lambda self: self.pair.target_params)
  draft_params = property(lambda self: self.pair.draft_params)
  target_cfg = property(lambda self: self.pair.target_cfg)
  draft_cfg = property(lambda self: self.pair.draft_cfg)
  target_rules = property(lambda self: self.pair.target_rules)
  mesh = property(lambda self: self.pair.mesh)
  eos_id = property(lambda self: self.pair.eos_id)
  pad_id = property(lambda self: self.pair.pad_id)

  def _spec(self, k, top_k, max_new, prompt_len) -> decode.LoopSpec:
    # Positions written reach prompt + max_new + k; prompt_len is the padded bucket, so the
    # cache is capped at max_cache_len (already checked against the real prompt lengths).
    max_len = prompt_len + max_new + k + 1 if self.cache_len is None else self.cache_len
    if self.max_cache_len is not None:
      max_len = min(max_len, self.max_cache_len)
    return decode.LoopSpec(target=self.target_cfg, draft=self.draft_cfg if k else None, k=k,
                           k_max=k, max_top_k=top_k, max_len=max_len, out_len=max_new + k,
                           eos_id=self.eos_id, pad_id=self.pad_id)

  def _compiled(self, spec: decode.LoopSpec, batch: int, prompt_len: int):
    """The compiled program for one (static spec, batch, prompt bucket), kept per Sampler."""
    key = (spec, batch, prompt_len)
    if key not in self._programs:
      self._programs[key] = self._compile(spec, batch, prompt_len)
    return self._programs[key]

  def _compile(self, spec: decode.LoopSpec, batch: int, prompt_len: int):
    mesh = self.mesh
    tp, dp = self.pair.param_shardings(spec.k > 0)
    rows = lambda *shape: sharding.batch_sharding(mesh, shape, self.target_rules)
    rep = sharding.replicated(mesh)
    n = max(spec.k, 1)
    max_new = spec.out_len - spec.k
    fn = functools.partial(decode.generate, spec)
    # The state lives and dies inside the program (created at prefill, carried by the while
    # loop), so nothing needs donating; the compiler updates it in place.
    jitted = jax.jit(fn, in_shardings=(tp, dp, rows(batch, 1), rows(batch), rep, rep, rep, rep),
                     out_shardings=(rows(batch, max_new), rows(batch),
                                    decode.Stats(rows(batch), rows(batch), rows(batch, n),
                                                 rows(batch, n))))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    args = (self.target_params, self.draft_params if spec.k else None,
            jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), scalar(jnp.float32), scalar(jnp.float32),
            scalar(jnp.int32), scalar(jnp.uint32))
    return jitted.lower(*args).compile(self.pair.compiler_options())

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, k: int = 0,
               sampling: SamplingParams = SamplingParams(), seed: int = 0) -> Result:
    """Samples max_new_tokens (fewer after EOS) for every prompt. Row i draws from the random
    stream (seed, i): the stream a serving Engine request with seed `seed + i * 2**32` uses."""
    sampling.validate()
    k = integer("k (draft tokens per round)", k, 0)
    max_new_tokens = integer("max_new_tokens", max_new_tokens, 1)
    # Streams take 32-bit seeds; a larger one would alias a smaller one's stream.
    seed = integer("seed", seed, 0, 2**32 - 1)
    if k > 0 and self.draft_cfg is None:
      raise ValueError(f"k={k} needs a draft model; this Sampler has none (use k=0)")
    tokens, lengths = prompts_lib.pack(prompts, self.target_cfg.num_tokens, self.pad_id)
    prompts_lib.check_fits(int(lengths.max()), max_new_tokens, self.max_cache_len, extra=k + 1)
    top_k = sampling.effective_top_k(self.target_cfg.num_tokens)
    spec = self._spec(k, top_k, max_new_tokens, tokens.shape[1])
    compiled = self._compiled(spec, *tokens.shape)
    # Host arrays, the same on every process: with several processes jit places on each one's
    # devices the rows they hold along the mesh's data axis.
    args = (self.target_params, self.draft_params if k else None, tokens, lengths,
            np.float32(sampling.temperature), np.float32(sampling.top_p), np.int32(top_k),
            np.uint32(seed))
    start = time.perf_counter()
    out, num, stats = jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    out, num, stats = to_host((out, num, stats))
    n = max(k, 1)
    return Result(tokens=[out[i, :num[i]].tolist() for i in range(len(prompts))],
                  rounds=stats.rounds_b, accepted=stats.accepted_b,
                  reached=stats.reached_bn[:, :n], accepted_at=stats.accepted_bn[:, :n], k=k,
                  seconds=seconds)


def to_host(tree):
  """Program outputs as numpy on every process (gathered when rows live on other processes)."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
