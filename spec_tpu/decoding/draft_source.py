"""Where a round's proposals come from: a draft model, prompt lookup (n-gram), both, or
Gemma 4's assistant drafter.

  model   the draft model samples K tokens autoregressively (its distributions p are the
          proposal distributions).
  ngram   prompt lookup, no model: the last n tokens of the row (n from ngram_max down to
          ngram_min) are looked up in the row's own tokens (prompt and output); the tokens that
          followed their latest earlier occurrence are proposed, up to K, fewer (down to none)
          where the buffer ends or nothing matches. A deterministic proposal is a one-hot p,
          so the rejection step accepts token x with probability q(x) and on a rejection draws
          from q without x, renormalised: exact at any temperature. Positions without a
          proposal are not judged; a row with none takes one target token per round.
  hybrid  per row and round: the n-gram proposal where the lookup matched, then the draft
          model continues from it to K tokens (fed the proposed tokens, so its cache holds
          exactly what the target may keep); rows without a match take the draft's K. The
          draft runs every round, so its cache never lags and one round costs what a model
          round costs.
  assistant  Gemma 4's assistant drafter (models/assistant.py; the pair's draft is an
          AssistantConfig): query-only layers over the target's own caches and final hidden
          state, K tokens sampled from its filtered q (acceptance sum min(p, q)), or with
          greedy=True its argmax, a one-hot p (to compare). It keeps no cache: nothing lags,
          nothing rolls back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KINDS = ("model", "ngram", "hybrid", "assistant")


@dataclasses.dataclass(frozen=True)
class DraftSource:
  kind: str = "model"
  ngram_max: int = 4  # longest suffix looked up
  ngram_min: int = 2  # shortest suffix that counts as a match
  greedy: bool = False  # assistant: propose its argmax (a one-hot p) instead of a sample

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"draft kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
    if not 1 <= self.ngram_min <= self.ngram_max:
      raise ValueError(f"need 1 <= ngram_min <= ngram_max, got ngram_min={self.ngram_min}, "
                       f"ngram_max={self.ngram_max}")

    if self.greedy and self.kind != "assistant":
      raise ValueError("greedy drafts are an option of the draft kind 'assistant'")

  @property
  def uses_model(self) -> bool:
    """Proposals come from the draft checkpoint (a draft model or an assistant)."""
    return self.kind != "ngram"

  @property
  def uses_ngram(self) -> bool:
    return self.kind in ("ngram", "hybrid")

  @property
  def uses_assistant(self) -> bool:
    return self.kind == "assistant"


def ngram_proposals(tokens_bs, last_b, k: int, ngram_max: int, ngram_min: int):
  """Prompt-lookup proposals: (tokens_bk, count_b).

  tokens_bs: each row's tokens by position; positions 0..last_b are known (last_b the newest).
  The row's suffix of n tokens ending at last_b is looked for among earlier windows ending at
  e < last_b; for the largest n in [ngram_min, ngram_max] with a match, the latest such e
  wins, and tokens e+1.. are proposed: count_b = min(k, last_b - e) (they are known up to
  last_b). No match: count 0. tokens_bk beyond count_b are unspecified.

  Elementwise over (b, s) per suffix length: compares against shifted copies of the buffer,
  no scatter, no sort.
  """
  b, s = tokens_bs.shape
  big = ngram_max
  # suffix_bm[:, m] = token at last - m (m < ngram_max); positions before 0 never match.
  at = last_b[:, None] - jnp.arange(big)[None, :]
  suffix_bm = jnp.where(at >= 0, jnp.take_along_axis(tokens_bs, jnp.maximum(at, 0), axis=1), -1)
  e = jnp.arange(s)[None, :]
  match_bs = jnp.ones((b, s), bool)
  best_e = jnp.full((b,), -1, jnp.int32)
  found = jnp.zeros((b,), bool)
  matches = []  # matches[n - 1][b, e]: the n tokens ending at e equal the row's suffix
  for m in range(big):
    # tokens_bs shifted right by m: shifted[:, e] = tokens[:, e - m] (-2 before the start,
    # which no suffix token equals).
    shifted = jnp.pad(tokens_bs, ((0, 0), (m, 0)), constant_values=-2)[:, :s]
    match_bs &= shifted == suffix_bm[:, m:m + 1]
    matches.append(match_bs)
  for n in range(ngram_max, ngram_min - 1, -1):
    ok = matches[n - 1] & (e < last_b[:, None]) & (e >= n - 1)
    latest = jnp.max(jnp.where(ok, e, -1), axis=1)
    take = ~found & (latest >= 0)
    best_e = jnp.where(take, latest, best_e)
    found |= take
  count_b = jnp.where(found, jnp.clip(last_b - best_e, 0, k), 0).astype(jnp.int32)
  at = jnp.clip(best_e[:, None] + 1 + jnp.arange(k)[None, :], 0, s - 1)
  return jnp.take_along_axis(tokens_bs, at, axis=1), count_b
