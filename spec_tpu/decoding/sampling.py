"""Sampling distributions: temperature, top-k, top-p, all in float32.

The speculative acceptance rule is exact only if the draft's p and the target's q come from the
same transform, so both go through `probabilities`.

Semantics (tie-symmetric, so a reference can reproduce them exactly):
  temperature 0: all mass on the argmax (lowest index among ties), i.e. greedy.
  top_k = k > 0: keep tokens whose logit is >= the k-th largest logit (ties at the edge kept).
  min_p > 0: keep tokens whose probability (after temperature and top-k) is >= min_p times the
    most probable one's; then top-p measures what is left.
  top_p < 1: keep token i iff the mass of tokens strictly more probable than i is < top_p,
    measured after temperature, top-k and min_p; top_p = 1 keeps everything.
Before all of them `penalize` may shift the logits (logit_bias, then the repetition, frequency
and presence penalties), from the counts of the tokens before the position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0 = greedy; traced, so changing it does not recompile
  top_k: int = 0            # 0 = off; Sampler: static (shapes depend on it); engine: per row
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


def probabilities(logits, temperature, top_k, top_p, max_top_k: int | None = None,
                  min_p=None):
  """Filtered distribution (... v, float32; sums to 1 over v).

  temperature, top_p: one value for every row, or one per row: an array with the leading
    dimensions of `logits` (b for b v logits; b for b t v logits too, where a row's setting
    applies to all its positions).
  top_k: a static int for every row; or one int per row (an array, as above) with `max_top_k`,
    a static bound on them, giving the shape of the top-k search. 0 or >= v is off.
  min_p: None (off, nothing compiled), or per row like temperature (0 = off).
  Each row's result depends on its own logits and settings only (filters that are off for a row
  are selected away, not applied as identities), so a request's law does not depend on what
  else shares the batch.
  """
  logits = logits.astype(F32)
  v = logits.shape[-1]
  if max_top_k is None:
    max_top_k = int(top_k)  # a static top_k (a traced one needs max_top_k)
  # Rows' settings broadcast against logits: (..., 1), one value per row and position.
  temperature, top_p = _per_row(temperature, logits, F32), _per_row(top_p, logits, F32)
  top_k = _per_row(top_k, logits, jnp.int32)
  # Shifted by the row's max before dividing: the top logit is exactly 0 at any temperature, so
  # a tiny one gives -inf for the rest and 1 for the top (logits / t overflowed to inf - inf =
  # NaN under XLA's rewrites, for t below ~1e-10).
  scaled = ((logits - jnp.max(logits, axis=-1, keepdims=True))
            / jnp.where(temperature > 0, temperature, 1.0))
  m = min(int(max_top_k), v - 1)  # k >= v keeps every token: no search needed for it
  top_k_on = (top_k > 0) & (top_k < v)
  if m > 0:
    kth = jnp.take_along_axis(jax.lax.top_k(scaled, m)[0], jnp.clip(top_k - 1, 0, m - 1),
                              axis=-1)
    scaled = jnp.where(top_k_on & (scaled < kth), -jnp.inf, scaled)
  else:
    top_k_on = jnp.zeros_like(top_k_on)
  # The top of `scaled` is exactly 0, so this is jax.nn.softmax without its own max pass.
  e = jnp.exp(scaled)
  probs = e / jnp.sum(e, axis=-1, keepdims=True)
  if min_p is not None:
    min_p = _per_row(min_p, logits, F32)
    kept = jnp.where(probs >= min_p * jnp.max(probs, axis=-1, keepdims=True), probs, 0.0)
    probs = jnp.where(min_p > 0, kept / jnp.sum(kept, axis=-1, keepdims=True), probs)
  probs = _top_p(probs, m, top_k_on, top_p)
  # Greedy rows take the argmax's one-hot. On CPU behind a runtime branch, so that a batch with
  # no greedy row pays no argmax over the vocabulary; elsewhere the pass is cheap and a branch is
  # not (a GPU conditional waits for its predicate on the host).
  sampled = temperature > 0
  one_hot = lambda p: jnp.where(sampled, p, jax.nn.one_hot(argmax(logits), v, dtype=F32))
  return jax.lax.platform_dependent(
      probs, cpu=lambda p: jax.lax.cond(jnp.all(sampled), lambda p: p, one_hot, p),
      default=one_hot)


def penalize(logits, counts, in_prompt, presence, frequency, repetition, bias_ids, bias):
  """Logits shifted by per-row controls (OpenAI's and vLLM's definitions), in this order:
    logit_bias: bias[i, j] added to token bias_ids[i, j] (ids < 0: unused entries);
    repetition r: a token in the prompt or generated so far has its logit divided by r if
      positive, multiplied by r if not;
    frequency f, presence a: minus f * count - a * (count > 0), counts of generated tokens.
  logits: b v or b m v (m positions per row); counts: int32 of the same shape (the generated
  tokens before each position); in_prompt: b v bool; the controls: b (bias b n). Neutral values
  (0, 1, no bias) leave a row's logits exactly as they were."""
  v = logits.shape[-1]
  rows = jnp.arange(logits.shape[0])[:, None]
  dense = jnp.zeros((logits.shape[0], v), F32).at[
      rows, jnp.where(bias_ids >= 0, bias_ids, v)].add(bias, mode="drop")
  per_pos = lambda x: x.reshape(x.shape[:1] + (1,) * (logits.ndim - x.ndim) + x.shape[1:])
  logits = logits.astype(F32) + per_pos(dense)
  r = _per_row(repetition, logits, F32)
  seen = per_pos(in_prompt) | (counts > 0)
  logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
  counts = counts.astype(F32)
  return (logits - _per_row(frequency, logits, F32) * counts
          - _per_row(presence, logits, F32) * (counts > 0))


def _per_row(x, logits, dtype):
  """A scalar, or per-row values reshaped to broadcast over logits' trailing axes (... 1)."""
  x = jnp.asarray(x, dtype)
  return x.reshape(x.shape + (1,) * (logits.ndim - x.ndim))


def _top_p(probs, m: int, top_k_on, top_p):
  # top_p is traced (no recompile per value), so "off" is a runtime branch: when every row has
  # top_p = 1 the cut costs nothing. Rows with top_p = 1 keep `probs` exactly (no renormalising).
  on = top_p < 1.0
  cut = jax.lax.cond(jnp.any(on), lambda p: _top_p_cut(p, m, top_k_on, top_p), lambda p: p,
                     probs)
  return jnp.where(on, cut, probs)


def _top_p_cut(probs, m: int, top_k_on, top_p):
  if m > 0:
    # Rows that kept only their top k (<= m) candidates: sorting m values is cheap, and what
    # top-k filtered out has probability 0, so it sorts last and never counts as kept mass.
    desc = jax.lax.top_k(probs, m)[0]
    mass_before = jnp.cumsum(desc, axis=-1) - desc
    num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1 since top_p > 0
    sorted_keep = probs >= jnp.take_along_axis(desc, num_kept - 1, axis=-1)
    # Rows without top-k need the bisection; it is skipped when every row has top-k on.
    keep = jax.lax.cond(jnp.all(top_k_on | (top_p >= 1.0)), lambda p: sorted_keep,
                        lambda p: jnp.where(top_k_on, sorted_keep, _top_p_keep(p, top_p)), probs)
  else:
    keep = _top_p_keep(probs, top_p)
  kept = jnp.where(keep, probs, 0.0)
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


def row_keys(seeds_b2, counters_b):
  """One key per row from its own (seed, stream) pair and counter: a row's random numbers
  depend on nothing else in the batch (the serving engine's per-request streams; the counter
  is the row's own round number)."""
  def one(seed, counter):
    key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
    return jax.random.fold_in(key, counter)
  return jax.vmap(one)(jnp.asarray(seeds_b2, jnp.uint32), counters_b)


def split_rows(keys_b, num: int):
  """`num` keys per row (b num) from one key per row."""
  return jax.vmap(lambda k: jax.random.split(k, num))(keys_b)


def uniform(key, batch_shape: tuple[int, ...], shape: tuple[int, ...] = ()):
  """float32 uniforms of shape batch_shape + shape, from one key for the whole batch or from
  one key per row (key.shape == batch_shape; each row's numbers come from its key alone)."""
  if key.shape == ():
    return jax.random.uniform(key, batch_shape + shape, F32)
  if key.shape != batch_shape:
    raise ValueError(f"need one key or one key per row {batch_shape}, got keys {key.shape}")
  draw = lambda k: jax.random.uniform(k, shape, F32)
  for _ in batch_shape:
    draw = jax.vmap(draw)
  return draw(key)


SAMPLE_BLOCK = 128  # vocabulary entries per block of `sample`'s two-level running sum on CPU


def sample(key, probs_bv, block: int | None = None):
  """One token per row, drawn in proportion to probs_bv (a distribution, or any non-negative
  weights: they need not sum to 1); zero-weight tokens are never drawn unless a row has no
  weight at all (then its last token is); `key` is one key for the batch or one key per row.

  Inverse CDF: one uniform per row against the running sum, rather than Gumbel-max's one random
  number and one log per vocabulary entry (3x faster on CPU, where random bits are expensive).
  On CPU (or with `block` given) the running sum is two-level: the sums of blocks of `block`
  tokens, their running sum (a short one), then the running sum inside the one block each
  row's draw falls in, added to the mass before that block. That reads the vocabulary once; a
  running sum over the whole vocabulary (XLA:CPU's reduce-window) made a draw 20x as costly
  (350 against 17 us for 8 rows of 8192, docs/cpu.md). Elsewhere one block holds the whole
  vocabulary (one running sum, as the accelerators' scans do well), so a vocabulary sharded
  over devices is never cut into blocks across its shards. The first token whose running sum
  exceeds u * total is drawn; tokens (and blocks) of zero mass are skipped explicitly, so no
  rounding in the sums can select one, and if rounding leaves u * total at or past a block's
  (or the last block's) sum the last token with mass in it is drawn.
  """
  if block is None:
    return jax.lax.platform_dependent(
        key, probs_bv, cpu=lambda k, p: sample(k, p, SAMPLE_BLOCK),
        default=lambda k, p: sample(k, p, p.shape[-1]))
  v = probs_bv.shape[-1]
  block = max(1, min(block, v))
  probs = probs_bv.astype(F32)
  u = uniform(key, probs_bv.shape[:-1])[..., None]
  if block == v:  # one running sum: no block to choose, so no gather of the rows
    r = u * jnp.sum(probs, axis=-1, keepdims=True)
    return _first_above(jnp.cumsum(probs, axis=-1), r, probs > 0).astype(jnp.int32)
  nb = -(-v // block)
  probs = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, nb * block - v)])
  blocks = probs.reshape(probs.shape[:-1] + (nb, block))
  mass = jnp.sum(blocks, axis=-1)
  cdf = jnp.cumsum(mass, axis=-1)
  r = u * cdf[..., -1:]
  j = _first_above(cdf, r, mass > 0)
  before = jnp.take_along_axis(cdf - mass, j[..., None], axis=-1)
  inside = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]
  i = _first_above(before + jnp.cumsum(inside, axis=-1), r, inside > 0)
  return jnp.minimum(j * block + i, v - 1).astype(jnp.int32)


def _first_above(cdf, r, has_mass):
  """The first index (last axis) whose running sum exceeds r among those with mass; the last
  with mass where none does (rounding); the last index where none has mass."""
  n = cdf.shape[-1]
  hit = (cdf > r) & has_mass
  last_with_mass = n - 1 - argmax(has_mass[..., ::-1])
  return jnp.where(jnp.any(hit, axis=-1), argmax(hit), last_with_mass)


def argmax(x):
  """jnp.argmax over the last axis as int32 (the lowest index among ties; x holds no NaN).

  On CPU as two plain reductions, a max and then a min over the indices holding it: XLA:CPU
  runs argmax's single (value, index) reduction element by element, 3x the CPU time of the two
  over a batch of vocabulary-sized rows (docs/cpu.md). Other platforms keep jnp.argmax."""
  def two_passes(x):
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1] - 1), axis=-1)

  return jax.lax.platform_dependent(
      x, cpu=two_passes, default=lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32))
