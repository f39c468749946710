"""The drafter-invariant coupling of speculative sampling (Gumbel-max with shared noise).

The token at absolute position t of a row is argmax_i (log q_t(i) + G_t(i)): q_t the target's
filtered distribution there, G_t i.i.d. standard Gumbel noise drawn from the row's (seed, stream)
and t alone. That is an exact sample of q_t (Gumbel-max), and a function of the seed, the prompt
and the target only: whatever K, the draft, the batch, the slot, the mesh or a resume, the same
seed gives the same tokens (plain decoding, K = 0, included).

The draft proposes argmax_i (log p_t(i) + G_t(i)) with the same noise, so it agrees with the
target wherever the two laws pick the same token under one draw. Verification keeps the longest
prefix where proposal and target token agree and emits the target's token at the first
disagreement (or the bonus token after K agreements). Acceptance is at least (1 - TV)/(1 + TV)
(Daliri, Musco and Suresh 2024) against 1 - TV for the rejection coupling (rejection.py).

Computed as the equivalent exponential race: with E_t(i) = exp(-G_t(i)) ~ Exp(1), the token
is argmin_i E_t(i) / q_t(i). That needs one log per vocabulary entry where the Gumbel form
needs two and a log of q (6x faster on CPU: 1.8 vs 10.7 ms for an 8 x 5 x 2048 block). E is
-log u with u on the float32 grid (j + 1/2) 2^-23, never 0 or 1: a zero E would win whatever
its token's probability (jax.random.exponential can return 0, with probability 2^-23 per
entry, which over a 256k vocabulary is a few % per token).

Greedy (temperature 0) is unchanged: the filtered law is one-hot, tokens of probability 0 are
never chosen, and the noise is finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spec_tpu.decoding import sampling

# A domain tag folded in before the position, so that this coupling's noise never shares a key
# with the rejection coupling's per-round keys of the same stream (sampling.row_keys).
_TAG = 0x6A0B5EED


def noise(seeds_b2, positions_bm, num_tokens: int):
  """Exp(1) noise b m v (float32, > 0) for the tokens at absolute positions positions_bm of
  each row: a function of (seed, stream, position) alone."""
  def one(seed, position):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), _TAG)
    bits = jax.random.bits(jax.random.fold_in(key, position), (num_tokens,), jnp.uint32)
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)  # exact: 24 bits at most
    return -jnp.log(u)
  per_row = jax.vmap(one, in_axes=(None, 0))
  return jax.vmap(per_row)(jnp.asarray(seeds_b2, jnp.uint32), positions_bm.astype(jnp.uint32))


def choose(probs, noise_v):
  """argmin_i noise(i) / probs(i) over the last axis (int32), i.e. argmax_i log probs(i) + G(i);
  zero-probability tokens are never chosen."""
  race = jnp.where(probs > 0, noise_v / jnp.where(probs > 0, probs, 1.0), jnp.inf)
  return sampling.argmax(-race)


def verify(draft_bn, q_bmv, noise_bmv, num_b=None):
  """Returns (n_b agreeing draft tokens in 0..K, next_b the target's token after them).

  draft_bn: b K proposals (made with noise_bmv[:, :K], or deterministic ones: n-gram lookup);
  q_bmv: b K+1 v target distributions at the same positions; noise_bmv: b K+1 v the positions'
  noise. num_b: proposals per row (default K): positions from num_b on are never accepted."""
  k = draft_bn.shape[1]
  target_bm = choose(q_bmv, noise_bmv)
  agree = draft_bn == target_bm[:, :k]
  if num_b is not None:
    agree &= jnp.arange(k)[None, :] < num_b[:, None]
  agree = agree.astype(jnp.int32)
  n = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
  return n.astype(jnp.int32), jnp.take_along_axis(target_bm, n[:, None], axis=1)[:, 0]
