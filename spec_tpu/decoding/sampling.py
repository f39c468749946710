"""Sampling distributions: temperature, top-k, top-p, all in float32.

The speculative acceptance rule is exact only if the draft's p and the target's q come from the
same transform, so both go through `probabilities`.

Semantics (tie-symmetric, so a reference can reproduce them exactly):
  temperature 0: all mass on the argmax (lowest index among ties), i.e. greedy.
  top_k = k > 0: keep tokens whose logit is >= the k-th largest logit (ties at the edge kept).
  top_p < 1: keep token i iff the mass of tokens strictly more probable than i is < top_p,
    measured after temperature and top-k; top_p = 1 keeps everything.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0 = greedy; traced, so changing it does not recompile
  top_k: int = 0            # 0 = off; static (shapes depend on it)
  top_p: float = 1.0        # 1 = off; traced

  def validate(self, vocab_size: int | None = None) -> "SamplingParams":
    if not self.temperature >= 0:  # also catches NaN
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
    return self

  def effective_top_k(self, vocab_size: int) -> int:
    """top_k as a static int; k >= vocab is the same as off."""
    return 0 if self.top_k >= vocab_size else int(self.top_k)


def probabilities(logits_bv, temperature, top_k: int, top_p):
  """Filtered distribution (b v, float32; rows sum to 1)."""
  logits = logits_bv.astype(F32)
  v = logits.shape[-1]
  temperature = jnp.asarray(temperature, F32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  if 0 < top_k < v:
    kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
  probs = jax.nn.softmax(scaled, axis=-1)
  probs = _top_p(probs, top_k, jnp.asarray(top_p, F32))
  greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), v, dtype=F32)
  return jnp.where(temperature > 0, probs, greedy)


def _top_p(probs_bv, top_k: int, top_p):
  # top_p is traced (no recompile per value), so "off" is a runtime branch: the common top_p = 1
  # costs nothing instead of a sort per call.
  return jax.lax.cond(top_p < 1.0, lambda p: _top_p_cut(p, top_k, top_p), lambda p: p, probs_bv)


def _top_p_cut(probs_bv, top_k: int, top_p):
  v = probs_bv.shape[-1]
  if 0 < top_k < v:
    # Only k candidates can survive: sorting those is cheap.
    desc = jax.lax.top_k(probs_bv, top_k)[0]
    mass_before = jnp.cumsum(desc, axis=-1) - desc
    num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1 since top_p > 0
    keep = probs_bv >= jnp.take_along_axis(desc, num_kept - 1, axis=-1)
  else:
    keep = _top_p_keep(probs_bv, top_p)
  kept = jnp.where(keep, probs_bv, 0.0)
  return kept / jnp.sum(kept, axis=-1, keepdims=True)


def _top_p_keep(probs_bv, top_p):
  """Which tokens top-p keeps (b v bool), found through the smallest float32 t per row with
  mass(p > t) < top_p: token i is kept iff p_i >= t.

  That is the rule above without a sort of the vocabulary (slow on every backend, very slow on
  CPU): if p_i >= t then mass(p > p_i) <= mass(p > t) < top_p, and if p_i < t then
  mass(p > p_i) >= top_p because t is the smallest such float. Non-negative float32s are ordered
  like their bit patterns, so a bisection over the int32 bits finds t exactly: probabilities in
  [0, 1] span fewer than 2^30 bit patterns, so the 32 halvings below always reach it.
  """
  bits = jax.lax.bitcast_convert_type(probs_bv, jnp.int32)

  def mass_above(t):
    return jnp.sum(jnp.where(bits > t, probs_bv, 0.0), axis=-1, keepdims=True)

  # Invariant: mass_above(lo) >= top_p (lo = -1 stands for "below every float"), and
  # mass_above(hi) < top_p (nothing is above the largest probability, and top_p > 0).
  lo = jnp.full(bits.shape[:-1] + (1,), -1, jnp.int32)
  hi = jnp.max(bits, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    below = mass_above(mid) < top_p
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return bits >= hi  # hi = -1 (all mass below top_p after rounding) keeps every token


def sample(key, probs_bv):
  """One token per row from a distribution (zero-probability tokens are never drawn).

  Inverse CDF: one uniform per row against the running sum, rather than Gumbel-max's one random
  number and one log per vocabulary entry (3x faster on CPU, where random bits are expensive).
  The first token whose running sum exceeds u * total is drawn; tokens of zero mass are skipped
  explicitly, so no rounding in the sum can select one, and if rounding leaves u * total at or
  past the last sum the last token with mass is drawn.
  """
  v = probs_bv.shape[-1]
  cdf = jnp.cumsum(probs_bv.astype(F32), axis=-1)
  r = jax.random.uniform(key, probs_bv.shape[:-1] + (1,), F32) * cdf[..., -1:]
  has_mass = probs_bv > 0
  hit = (cdf > r) & has_mass
  first = jnp.argmax(hit, axis=-1)
  last_with_mass = v - 1 - jnp.argmax(has_mass[..., ::-1], axis=-1)
  return jnp.where(jnp.any(hit, axis=-1), first, last_with_mass).astype(jnp.int32)
