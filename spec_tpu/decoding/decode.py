"""The on-device decode loop: speculative rounds in a lax.while_loop, K = 0 being plain
autoregressive decoding (the target verifies one token and the "bonus" token is its sample).

Invariants between rounds, per row:
  target cache holds positions 0..L-1 and `last` (position L) is sampled but not yet fed;
  the draft cache holds 0..L-1 minus its `pending` tokens (1 or 2: when all K drafts were
  accepted the draft never saw x_K), which it feeds first in the next round.
Rows advance independently: each accepts its own number of tokens and stops on its own.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import model
from spec_tpu.decoding import rejection, sampling
from spec_tpu.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Everything static about one compiled decode program (hashable)."""
  target: ModelConfig
  draft: ModelConfig | None
  k: int                 # draft tokens per round; 0 = autoregressive
  top_k: int
  max_new_tokens: int
  max_len: int           # cache length
  eos_id: int | None
  pad_id: int = 0
  prefill_chunk: int = 128  # prompt tokens per layer pass at prefill (model.prefill says why)

  @property
  def num_tokens(self) -> int:
    return self.target.num_tokens


class Stats(NamedTuple):
  rounds_b: jax.Array     # target calls in the loop while the row was active
  accepted_b: jax.Array   # draft tokens accepted
  reached_bn: jax.Array   # rounds in which draft position j was judged
  accepted_bn: jax.Array  # rounds in which draft position j was accepted


class State(NamedTuple):
  target_cache: cache_lib.Cache
  draft_cache: cache_lib.Cache | None
  pending_b2: jax.Array   # draft's unfed tokens, left-aligned
  num_pending_b: jax.Array
  out_bt: jax.Array       # emitted tokens (slack of K+1 past max_new_tokens)
  num_out_b: jax.Array
  done_b: jax.Array
  key: jax.Array
  stats: Stats


def _probs(spec: LoopSpec, logits_bv, temperature, top_p):
  # Both models' distributions over the shared tokens only (padding rows have zero mass).
  return sampling.probabilities(logits_bv[..., :spec.num_tokens], temperature, spec.top_k, top_p)


def _emit(spec: LoopSpec, state: State, tokens_bm, count_b):
  """Appends count_b tokens per row, cutting at EOS and max_new_tokens."""
  m = tokens_bm.shape[1]
  count_b = jnp.where(state.done_b, 0, count_b)
  j = jnp.arange(m)[None, :]
  if spec.eos_id is not None:
    is_eos = (tokens_bm == spec.eos_id) & (j < count_b[:, None])
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), m)
    hit_eos = first_eos < count_b
    count_b = jnp.minimum(count_b, first_eos + 1)
  else:
    hit_eos = jnp.zeros_like(state.done_b)
  tokens_bm = jnp.where(j < count_b[:, None], tokens_bm, spec.pad_id)
  out = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at,)))(
      state.out_bt, tokens_bm, state.num_out_b)
  # Tokens written past a row's count are padding, and later rounds overwrite them.
  num_out = state.num_out_b + count_b
  done = state.done_b | hit_eos | (num_out >= spec.max_new_tokens)
  return state._replace(out_bt=out, num_out_b=num_out, done_b=done)


def prefill(spec: LoopSpec, target_params, draft_params, tokens_bt, lengths_b, key, temperature,
            top_p) -> State:
  b = tokens_bt.shape[0]
  spec_tokens = spec.k + 1
  tc = cache_lib.init_cache(spec.target, b, spec.max_len, spec_tokens)
  logits, tc = model.prefill(target_params, spec.target, tokens_bt, tc, lengths_b,
                             spec.prefill_chunk)
  key, sub = jax.random.split(key)
  first = sampling.sample(sub, _probs(spec, logits[:, 0], temperature, top_p))
  dc = None
  if spec.k > 0:
    dc = cache_lib.init_cache(spec.draft, b, spec.max_len, spec_tokens)
    _, dc = model.prefill(draft_params, spec.draft, tokens_bt, dc, lengths_b, spec.prefill_chunk)
  zeros_b = jnp.zeros((b,), jnp.int32)
  n = max(spec.k, 1)
  state = State(
      target_cache=tc, draft_cache=dc,
      pending_b2=jnp.stack([first, jnp.full_like(first, spec.pad_id)], axis=1),
      num_pending_b=jnp.ones((b,), jnp.int32),
      out_bt=jnp.full((b, spec.max_new_tokens + spec.k + 1), spec.pad_id, jnp.int32),
      num_out_b=zeros_b, done_b=jnp.zeros((b,), bool), key=key,
      stats=Stats(zeros_b, zeros_b, jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.int32)))
  return _emit(spec, state, first[:, None], jnp.ones((b,), jnp.int32))


def _last(state: State):
  """The sampled token not yet in the target cache."""
  return jnp.take_along_axis(state.pending_b2, (state.num_pending_b - 1)[:, None], axis=1)[:, 0]


def _draft(spec: LoopSpec, draft_params, state: State, key, temperature, top_p):
  """K draft tokens and the distributions they were drawn from."""
  keys = jax.random.split(key, spec.k)
  logits, dc = model.forward(draft_params, spec.draft, state.pending_b2, state.draft_cache,
                             state.num_pending_b, last_only=True)
  p0 = _probs(spec, logits[:, 0], temperature, top_p)
  x0 = sampling.sample(keys[0], p0)

  def step(carry, key):
    dc, x = carry
    logits, dc = model.forward(draft_params, spec.draft, x[:, None], dc)
    p = _probs(spec, logits[:, 0], temperature, top_p)
    nxt = sampling.sample(key, p)
    return (dc, nxt), (nxt, p)

  (dc, _), (xs, ps) = jax.lax.scan(step, (dc, x0), keys[1:])
  draft_bn = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  p_bnv = jnp.concatenate([p0[:, None], jnp.moveaxis(ps, 0, 1)], axis=1)
  return draft_bn, p_bnv, dc


def round_(spec: LoopSpec, target_params, draft_params, state: State, temperature,
           top_p) -> State:
  """One speculative round: draft K, verify K+1 in one target call, accept, roll back."""
  b, k = state.done_b.shape[0], spec.k
  key, k_draft, k_accept = jax.random.split(state.key, 3)
  last = _last(state)
  l0 = state.target_cache.length
  active = ~state.done_b
  if k > 0:
    draft_bn, p_bnv, dc = _draft(spec, draft_params, state, k_draft, temperature, top_p)
    verify_bm = jnp.concatenate([last[:, None], draft_bn], axis=1)
  else:
    draft_bn = jnp.zeros((b, 0), jnp.int32)
    verify_bm = last[:, None]
  logits, tc = model.forward(target_params, spec.target, verify_bm, state.target_cache)
  q_bmv = _probs(spec, logits, temperature, top_p)
  if k > 0:
    n, nxt = rejection.accept(k_accept, draft_bn, p_bnv, q_bmv)
  else:
    n = jnp.zeros((b,), jnp.int32)
    nxt = sampling.sample(k_accept, q_bmv[:, 0])
  # Roll back: the target keeps last + n accepted drafts; finished rows stay where they are.
  tc = cache_lib.rollback(tc, jnp.where(active, l0 + n + 1, l0))
  all_in = n == k
  if k > 0:
    dc = cache_lib.rollback(dc, jnp.where(active, jnp.minimum(l0 + n + 1, l0 + k),
                                          state.draft_cache.length))
    x_k = draft_bn[:, -1]
    pending = jnp.where(all_in[:, None], jnp.stack([x_k, nxt], 1),
                        jnp.stack([nxt, jnp.full_like(nxt, spec.pad_id)], 1))
    num_pending = jnp.where(all_in, 2, 1)
  else:
    dc, pending, num_pending = None, jnp.stack([nxt, nxt], 1), jnp.ones((b,), jnp.int32)
  pending = jnp.where(active[:, None], pending, state.pending_b2)
  num_pending = jnp.where(active, num_pending, state.num_pending_b)

  j = jnp.arange(k + 1)[None, :]
  emitted = jnp.where(j < n[:, None], jnp.pad(draft_bn, ((0, 0), (0, 1))), nxt[:, None])
  act = active.astype(jnp.int32)
  jn = jnp.arange(max(k, 1))[None, :]
  st = state.stats
  stats = Stats(rounds_b=st.rounds_b + act, accepted_b=st.accepted_b + act * n,
                reached_bn=st.reached_bn + act[:, None] * (jn <= n[:, None]) * (k > 0),
                accepted_bn=st.accepted_bn + act[:, None] * (jn < n[:, None]))
  state = state._replace(target_cache=tc, draft_cache=dc, pending_b2=pending,
                         num_pending_b=num_pending, key=key, stats=stats)
  return _emit(spec, state, emitted, n + 1)


def run(spec: LoopSpec, target_params, draft_params, tokens_bt, lengths_b, key, temperature,
        top_p):
  """Prefill and decode to completion on device. Returns (tokens b max_new, num b, Stats)."""
  state = prefill(spec, target_params, draft_params, tokens_bt, lengths_b, key, temperature, top_p)
  state = jax.lax.while_loop(
      lambda s: ~jnp.all(s.done_b),
      lambda s: round_(spec, target_params, draft_params, s, temperature, top_p), state)
  num = jnp.minimum(state.num_out_b, spec.max_new_tokens)
  out = state.out_bt[:, :spec.max_new_tokens]
  out = jnp.where(jnp.arange(spec.max_new_tokens)[None, :] < num[:, None], out, spec.pad_id)
  return out, num, state.stats
