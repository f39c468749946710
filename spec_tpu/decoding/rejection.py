"""The modified rejection step of speculative sampling (Chen et al. 2023, Algorithm 2).

Given the draft's tokens x_1..x_K drawn from p and the target's q at K+1 positions: accept x_t
with probability min(1, q(x_t) / p(x_t)); at the first rejection draw from
normalize(max(0, q - p)); if all K are accepted draw a bonus token from q at position K+1.
The result is distributed exactly as q, whatever p is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spec_tpu.decoding import sampling


def accept(key, draft_bn, p_bnv, q_bmv, num_b=None):
  """Returns (n_b accepted draft tokens in 0..K, next_b the token that follows them).

  key: one key for the batch, or one key per row (b,), so that a row's outcome depends on its
  own random stream only. draft_bn: b K tokens; p_bnv: b K v draft distributions they were
  drawn from; q_bmv: b K+1 v target distributions (float32, same filtering as p).
  num_b: proposals per row (default K): positions from num_b on hold no proposal and are never
  accepted, so a row stops there with a draw from q (the residual against nothing).
  """
  b, k = draft_bn.shape
  if key.shape == ():
    key_u, key_next = jax.random.split(key)
  else:
    key_u, key_next = jnp.moveaxis(sampling.split_rows(key, 2), 1, 0)
  p_x = jnp.take_along_axis(p_bnv, draft_bn[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(q_bmv[:, :k], draft_bn[..., None], axis=-1)[..., 0]
  u = sampling.uniform(key_u, (b,), (k,))
  # u < q/p without dividing; p(x) > 0 because x was drawn from p.
  accepted = u * p_x < q_x
  num_b = jnp.full((b,), k, jnp.int32) if num_b is None else num_b
  accepted &= jnp.arange(k)[None, :] < num_b[:, None]
  n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)
  rows = jnp.arange(b)
  q_n = q_bmv[rows, n]
  p_n = jnp.where((n < num_b)[:, None], p_bnv[rows, jnp.minimum(n, k - 1)], 0.0)
  residual = jnp.maximum(q_n - p_n, 0.0)
  # A rejection where q <= p everywhere has probability zero; rounding could still get here.
  # (sample draws in proportion to its weights: the residual needs no normalizing.)
  # Empty by its sum, as `sample` weighs it (a sum of denormals may round to zero).
  empty = jnp.sum(residual, axis=-1, keepdims=True) <= 0
  next_tok = sampling.sample(key_next, jnp.where(empty, q_n, residual))
  return n.astype(jnp.int32), next_tok
