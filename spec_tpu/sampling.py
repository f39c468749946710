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
  v = probs_bv.shape[-1]
  # With top-k on, only k candidates can survive: sort those instead of the vocabulary.
  if 0 < top_k < v:
    desc = jax.lax.top_k(probs_bv, top_k)[0]
  else:
    desc = -jnp.sort(-probs_bv, axis=-1)
  mass_before = jnp.cumsum(desc, axis=-1) - desc
  num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1 since top_p > 0
  cutoff = jnp.take_along_axis(desc, num_kept - 1, axis=-1)
  keep = (probs_bv >= cutoff) | (top_p >= 1.0)
  kept = jnp.where(keep, probs_bv, 0.0)
  return kept / jnp.sum(kept, axis=-1, keepdims=True)


def sample(key, probs_bv):
  """One token per row from a distribution (zero-probability tokens are never drawn)."""
  return jax.random.categorical(key, jnp.log(probs_bv), axis=-1).astype(jnp.int32)
