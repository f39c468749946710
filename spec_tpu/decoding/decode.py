"""The on-device decode loop: speculative rounds in a lax.while_loop, K = 0 being plain
autoregressive decoding (the target verifies one token and the "bonus" token is its sample).

One loop serves both users, from the same functions:
  Sampler.generate  one program: `prefill` every prompt, then `run_rounds` until all are done.
  serving Engine    state resident on device between calls (donated): `insert` prefills
                    requests into chosen rows (slots), `run_rounds` runs up to N rounds.

State per row (slot):
  tokens_bs holds the row's tokens by position: the prompt, then what was generated.
  The target cache holds positions 0..L-1 (L = its length); tokens_bs[L], `last`, is sampled but
  not yet fed. The draft cache holds 0..D-1 with D <= L; tokens D..L are its pending tokens.
  After a speculative round D >= L - 1 (1 or 2 pending: when all K drafts were accepted the draft
  never saw x_K). K = 0 rounds, and inserts while K = 0, leave the draft further behind (they
  never pay for it); `catch_up_draft` feeds the gap in chunks before the next speculative round.
Rows advance independently: each accepts its own number of tokens and stops on its own, and
each draws its random numbers from its own (seed, stream) pair and its own round counter
(`sampling.row_keys`), never from a batch-wide key, so its output does not depend on the other
rows: not its law, and with a fixed seed not its tokens either (for the same K per round).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.models import assistant as assistant_lib
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import model
from spec_tpu.decoding import rejection, sampling
from spec_tpu.models.config import ModelConfig

CATCH_UP_CHUNK = 32  # tokens per draft call when the draft catches up after K = 0 rounds


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Everything static about one compiled program (hashable).

  Programs that share one resident state (the engine's insert and its step per K) differ only
  in `k` and `out_len`; the state's shapes come from the rest.
  """
  target: ModelConfig
  draft: ModelConfig | None  # None: no draft cache at all (k must be 0)
  k: int                     # draft tokens per round of this program; 0 = autoregressive
  k_max: int                 # the largest K any program on this state runs: the caches keep
                             # K_max + 1 slots of rollback slack, the stats K_max columns
  max_top_k: int             # static bound on per-row top_k (the shape of the top-k search)
  max_len: int               # positions per row (caches and token buffer)
  out_len: int               # tokens one run_rounds call can return per row
  eos_id: int | None
  pad_id: int = 0
  prefill_chunk: int = 128   # prompt tokens per layer pass at prefill (model.prefill says why)
  # Draft source "assistant" (draft None, draft_params the assistant's): Gemma 4's drafter
  # reads the target's caches and final hidden state; no draft cache, nothing to roll back.
  assistant: assistant_lib.AssistantConfig | None = None
  greedy_drafts: bool = False  # the assistant proposes its argmax (a one-hot p), to compare

  @property
  def num_tokens(self) -> int:
    return self.target.num_tokens

  def __post_init__(self):
    has_draft = self.draft is not None or self.assistant is not None
    if self.k > self.k_max or (self.k > 0 and not has_draft):
      raise ValueError(f"k={self.k} needs a draft and k <= k_max={self.k_max}")
    if self.draft is not None and self.assistant is not None:
      raise ValueError("give a draft model or an assistant, not both")
    if self.assistant is not None:
      self.assistant.check_target(self.target)


class Rows(NamedTuple):
  """Per-request settings (one value per row), written by insert; traced, so one program
  serves any mix of requests."""
  temperature_b: jax.Array  # float32, 0 = greedy
  top_p_b: jax.Array        # float32 in (0, 1]
  top_k_b: jax.Array        # int32, 0 = off, at most LoopSpec.max_top_k
  seed_b2: jax.Array        # uint32 (seed, stream): the row's random stream
  max_new_b: jax.Array      # int32 tokens to generate at most (the prefill's token included)


class Stats(NamedTuple):
  rounds_b: jax.Array     # rounds (target calls after the prefill) while the row was active
  accepted_b: jax.Array   # draft tokens accepted
  reached_bn: jax.Array   # rounds in which draft position j was judged
  accepted_bn: jax.Array  # rounds in which draft position j was accepted


class State(NamedTuple):
  target_cache: cache_lib.Cache
  draft_cache: cache_lib.Cache | None
  tokens_bs: jax.Array    # int32 tokens by position (prompt, generated)
  num_out_b: jax.Array    # tokens emitted since insert (the prefill's first token included)
  done_b: jax.Array       # finished, cancelled or empty: the row does not advance
  rows: Rows
  stats: Stats
  # The target's final hidden state that produced each row's `last` token (assistant only).
  target_hidden_bd: jax.Array | None = None


class Out(NamedTuple):
  """What one run_rounds call emitted."""
  tokens_bw: jax.Array    # the new tokens of each row, left-aligned (pad after count)
  count_b: jax.Array
  rounds: jax.Array       # rounds run (scalar)


def _probs(spec: LoopSpec, logits_bv, rows: Rows):
  # Both models' distributions over the shared tokens only (padding rows have zero mass), through
  # the one transform (exactness needs p and q filtered alike).
  return sampling.probabilities(logits_bv[..., :spec.num_tokens], rows.temperature_b,
                                rows.top_k_b, rows.top_p_b, max_top_k=spec.max_top_k)


def _stats_width(spec: LoopSpec) -> int:
  return max(spec.k_max, 1)


def init_state(spec: LoopSpec, batch: int) -> State:
  """Every row empty and done (an engine's state before its first insert)."""
  zeros_b = jnp.zeros((batch,), jnp.int32)
  n = _stats_width(spec)
  return State(
      target_cache=cache_lib.init_cache(spec.target, batch, spec.max_len, spec.k_max + 1),
      draft_cache=(None if spec.draft is None else
                   cache_lib.init_cache(spec.draft, batch, spec.max_len, spec.k_max + 1)),
      tokens_bs=jnp.full((batch, spec.max_len), spec.pad_id, jnp.int32), num_out_b=zeros_b,
      done_b=jnp.ones((batch,), bool),
      rows=Rows(jnp.ones((batch,), jnp.float32), jnp.ones((batch,), jnp.float32), zeros_b,
                jnp.zeros((batch, 2), jnp.uint32), zeros_b),
      stats=Stats(zeros_b, zeros_b, jnp.zeros((batch, n), jnp.int32),
                  jnp.zeros((batch, n), jnp.int32)),
      target_hidden_bd=(None if spec.assistant is None else
                        jnp.zeros((batch, spec.target.d_model), spec.target.dtype)))


def prefill(spec: LoopSpec, target_params, draft_params, tokens_rt, lengths_r, rows: Rows, *,
            with_draft: bool) -> tuple[State, jax.Array]:
  """The state of r fresh rows after their prompts (right-padded to t) and the first token.

  with_draft: prefill the draft too (the engine skips it while K = 0: the draft catches up if
  speculation starts). Returns (state of r rows, first_r)."""
  r, t = tokens_rt.shape
  tc = cache_lib.init_cache(spec.target, r, spec.max_len, spec.k_max + 1)
  logits, tc, *hidden = model.prefill(target_params, spec.target, tokens_rt, tc, lengths_r,
                                      spec.prefill_chunk, final_hidden=spec.assistant is not None)
  key_r = sampling.row_keys(rows.seed_b2, jnp.zeros((r,), jnp.int32))  # round 0: the prefill
  first = sampling.sample(key_r, _probs(spec, logits[:, 0], rows))
  dc = None
  if spec.draft is not None:
    dc = cache_lib.init_cache(spec.draft, r, spec.max_len, spec.k_max + 1)
    if with_draft:
      _, dc = model.prefill(draft_params, spec.draft, tokens_rt, dc, lengths_r,
                            spec.prefill_chunk)
  pos = jnp.arange(spec.max_len)[None, :]
  prompt = jnp.pad(tokens_rt, ((0, 0), (0, max(spec.max_len - t, 0))),
                   constant_values=spec.pad_id)[:, :spec.max_len]
  tokens = jnp.where(pos < lengths_r[:, None], prompt,
                     jnp.where(pos == lengths_r[:, None], first[:, None], spec.pad_id))
  done = rows.max_new_b <= 1
  if spec.eos_id is not None:
    done |= first == spec.eos_id
  zeros_r = jnp.zeros((r,), jnp.int32)
  n = _stats_width(spec)
  state = State(target_cache=tc, draft_cache=dc, tokens_bs=tokens,
                num_out_b=jnp.ones((r,), jnp.int32), done_b=done, rows=rows,
                stats=Stats(zeros_r, zeros_r, jnp.zeros((r, n), jnp.int32),
                            jnp.zeros((r, n), jnp.int32)),
                target_hidden_bd=hidden[0][:, 0] if hidden else None)
  return state, first


def insert(spec: LoopSpec, target_params, draft_params, state: State, slots_r, tokens_rt,
           lengths_r, rows: Rows, *, with_draft: bool):
  """Prefills r requests into rows slots_r of a resident state (a slot >= batch drops its
  request: padding of a fixed-width insert). Returns (state, first_r, done_r)."""
  new, first = prefill(spec, target_params, draft_params, tokens_rt, lengths_r, rows,
                       with_draft=with_draft)
  put = lambda old, fresh: old.at[slots_r].set(fresh, mode="drop")
  state = State(
      target_cache=cache_lib.insert_rows(state.target_cache, new.target_cache, slots_r),
      draft_cache=(None if state.draft_cache is None else
                   cache_lib.insert_rows(state.draft_cache, new.draft_cache, slots_r)),
      tokens_bs=put(state.tokens_bs, new.tokens_bs), num_out_b=put(state.num_out_b, new.num_out_b),
      done_b=put(state.done_b, new.done_b), rows=jax.tree.map(put, state.rows, new.rows),
      stats=jax.tree.map(put, state.stats, new.stats),
      target_hidden_bd=(None if state.target_hidden_bd is None else
                        put(state.target_hidden_bd, new.target_hidden_bd)))
  return state, first, new.done_b


def catch_up_draft(spec: LoopSpec, draft_params, state: State) -> State:
  """Feeds each live row's draft the tokens it has not seen, up to L - 1 (the round's first
  draft call feeds the rest), CATCH_UP_CHUNK tokens per call. No iteration when none lags."""
  c = CATCH_UP_CHUNK

  def gap(s):
    lag = s.target_cache.length - 1 - s.draft_cache.length
    return jnp.where(s.done_b, 0, jnp.maximum(lag, 0))

  def feed(s):
    num = jnp.minimum(gap(s), c)
    at = jnp.clip(s.draft_cache.length[:, None] + jnp.arange(c)[None, :], 0, spec.max_len - 1)
    tokens = jnp.take_along_axis(s.tokens_bs, at, axis=1)
    _, dc = model.forward(draft_params, spec.draft, tokens, s.draft_cache, num, last_only=True)
    return s._replace(draft_cache=dc)

  return jax.lax.while_loop(lambda s: jnp.any(gap(s) > 0), feed, state)


def _draft(spec: LoopSpec, draft_params, state: State, keys_bn):
  """K draft tokens, the distributions they were drawn from, the draft cache after them, and
  what its rollback needs for recurrent layers: the traces of the K-1 single steps (the state
  after each, recurrent.steps_trace) and the length they start from (after the first call,
  which every kept prefix of a live row includes)."""
  tc, dc = state.target_cache, state.draft_cache
  num_pending = jnp.where(state.done_b, 0, tc.length - dc.length + 1)  # 1 or 2 when live
  at = jnp.clip(dc.length[:, None] + jnp.arange(2)[None, :], 0, spec.max_len - 1)
  pending_b2 = jnp.take_along_axis(state.tokens_bs, at, axis=1)
  logits, dc = model.forward(draft_params, spec.draft, pending_b2, dc, num_pending,
                             last_only=True)
  p0 = _probs(spec, logits[:, 0], state.rows)
  x0 = sampling.sample(keys_bn[:, 0], p0)

  first = cache_lib.recurrent_entries(dc)
  start_b = dc.length

  def step(carry, key_b):
    dc, x = carry
    logits, dc = model.forward(draft_params, spec.draft, x[:, None], dc)
    p = _probs(spec, logits[:, 0], state.rows)
    nxt = sampling.sample(key_b, p)
    # A recurrent layer's state after each step, stacked by the scan: the rollback selects
    # the one its kept length ends on (None for attention layers: nothing stacked).
    return (dc, nxt), (nxt, p, cache_lib.recurrent_entries(dc))

  (dc, _), (xs, ps, steps) = jax.lax.scan(step, (dc, x0), jnp.moveaxis(keys_bn[:, 1:], 1, 0))
  draft_bn = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  p_bnv = jnp.concatenate([p0[:, None], jnp.moveaxis(ps, 0, 1)], axis=1)
  return draft_bn, p_bnv, dc, cache_lib.steps_traces(first, steps), start_b


def _draft_assistant(spec: LoopSpec, assistant_params, target_params, state: State, last_b,
                     keys_bn):
  """K draft tokens from the assistant and the distributions they were drawn from: sampled
  from its filtered distribution (acceptance sum min(p, q)), or its argmax as a one-hot p."""
  def propose(key_b, logits_bv):
    p = _probs(spec, logits_bv, state.rows)
    if spec.greedy_drafts:
      x = jnp.argmax(p, axis=-1).astype(jnp.int32)
      return x, jax.nn.one_hot(x, p.shape[-1], dtype=p.dtype)
    return sampling.sample(key_b, p), p

  return assistant_lib.draft(assistant_params, spec.assistant, target_params, spec.target,
                             state.target_cache, last_b, state.target_hidden_bd, keys_bn,
                             propose)


def _scatter_rows(buf_bx, start_b, values_bm, count_b):
  """buf[i, start_i + j] = values[i, j] for j < count_i; nothing else is touched (a scatter
  that drops the rest, where a dynamic_update_slice would clamp and overwrite)."""
  m = values_bm.shape[1]
  j = jnp.arange(m)[None, :]
  at = jnp.where(j < count_b[:, None], start_b[:, None] + j, buf_bx.shape[1])
  rows = jnp.arange(buf_bx.shape[0])[:, None]
  return buf_bx.at[rows, at].set(values_bm, mode="drop")


def round_(spec: LoopSpec, target_params, draft_params, state: State):
  """One speculative round for every live row: draft K, verify K+1 in one target call, accept,
  roll back. Returns (state, emitted_bm, count_b): the row's new tokens, cut after EOS and at
  its max_new, 0 for rows that are done."""
  b, k = state.done_b.shape[0], spec.k
  active = ~state.done_b
  keys_bn = sampling.split_rows(sampling.row_keys(state.rows.seed_b2, state.stats.rounds_b + 1),
                                k + 1)
  tc0 = state.target_cache
  l0 = tc0.length
  last = jnp.take_along_axis(state.tokens_bs, jnp.minimum(l0, spec.max_len - 1)[:, None],
                             axis=1)[:, 0]
  if k > 0 and spec.assistant is not None:
    draft_bn, p_bnv = _draft_assistant(spec, draft_params, target_params, state, last,
                                       keys_bn[:, :k])
    verify_bm = jnp.concatenate([last[:, None], draft_bn], axis=1)
  elif k > 0:
    draft_bn, p_bnv, dc, draft_traces, draft_start = _draft(spec, draft_params, state,
                                                            keys_bn[:, :k])
    verify_bm = jnp.concatenate([last[:, None], draft_bn], axis=1)
  else:
    draft_bn = jnp.zeros((b, 0), jnp.int32)
    verify_bm = last[:, None]
  # traces: recurrent layers keep their state after each of the K+1 positions until the
  # rollback below selects the kept one (attention layers need only the length move).
  logits, tc, target_traces, *hidden = model.forward(
      target_params, spec.target, verify_bm, tc0, traces=True,
      final_hidden=spec.assistant is not None)
  q_bmv = _probs(spec, logits, state.rows)
  if k > 0:
    n, nxt = rejection.accept(keys_bn[:, k], draft_bn, p_bnv, q_bmv)
  else:
    n = jnp.zeros((b,), jnp.int32)
    nxt = sampling.sample(keys_bn[:, 0], q_bmv[:, 0])
  # Roll back: the target keeps last + n accepted drafts, the draft what it fed of those
  # (all but x_K when every draft was accepted); finished rows stay where they are.
  tc = cache_lib.rollback(tc, jnp.where(active, l0 + n + 1, l0), target_traces, l0)
  if k > 0 and spec.assistant is None:
    dc = cache_lib.rollback(dc, jnp.where(active, jnp.minimum(l0 + n + 1, l0 + k),
                                          state.draft_cache.length), draft_traces, draft_start)
  else:
    dc = state.draft_cache  # K = 0 never runs the draft; the assistant has no cache
  target_hidden = state.target_hidden_bd
  if hidden:  # the hidden state that produced the new last token: verify position n
    at_n = jnp.take_along_axis(hidden[0], n[:, None, None], axis=1)[:, 0]
    target_hidden = jnp.where(active[:, None], at_n.astype(target_hidden.dtype), target_hidden)
  j = jnp.arange(k + 1)[None, :]
  emitted = jnp.where(j < n[:, None], jnp.pad(draft_bn, ((0, 0), (0, 1))), nxt[:, None])
  kept = jnp.where(active, n + 1, 0)
  tokens = _scatter_rows(state.tokens_bs, l0 + 1, emitted, kept)

  count = kept
  hit_eos = jnp.zeros_like(active)
  if spec.eos_id is not None:
    is_eos = (emitted == spec.eos_id) & (j < count[:, None])
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), k + 1)
    hit_eos = first_eos < count
    count = jnp.minimum(count, first_eos + 1)
  room = state.rows.max_new_b - state.num_out_b
  hit_eos &= count <= room  # an EOS past max_new is never emitted
  count = jnp.clip(count, 0, jnp.maximum(room, 0))
  num_out = state.num_out_b + count
  done = state.done_b | hit_eos | (num_out >= state.rows.max_new_b)

  act = active.astype(jnp.int32)
  jn = jnp.arange(_stats_width(spec))[None, :]
  st = state.stats
  stats = Stats(rounds_b=st.rounds_b + act, accepted_b=st.accepted_b + act * n,
                reached_bn=st.reached_bn + act[:, None] * ((jn <= n[:, None]) & (jn < k)),
                accepted_bn=st.accepted_bn + act[:, None] * (jn < n[:, None]))
  state = state._replace(target_cache=tc, draft_cache=dc, tokens_bs=tokens, num_out_b=num_out,
                         done_b=done, stats=stats, target_hidden_bd=target_hidden)
  return state, emitted, count


def run_rounds(spec: LoopSpec, target_params, draft_params, state: State, live_b, max_rounds,
               stop_on_free, *, catch_up: bool = True) -> tuple[State, Out]:
  """Up to `max_rounds` rounds for every live row, in one lax.while_loop.

  live_b: rows that hold a request (the others are marked done: a cancelled request stops).
  Stops early when no row is left running; when `stop_on_free` and a row finished in this call
  (a slot the host can refill); or when a row's share of the out buffer could not take one
  more round. max_rounds and stop_on_free are traced: no recompile per value. catch_up=False
  (static) leaves out the draft's catch-up, for callers whose draft never lags (generate).
  """
  b = state.done_b.shape[0]
  state = state._replace(done_b=state.done_b | ~live_b)
  if spec.k > 0 and catch_up and spec.draft is not None:
    state = catch_up_draft(spec, draft_params, state)
  done0 = state.done_b
  out = Out(tokens_bw=jnp.full((b, spec.out_len), spec.pad_id, jnp.int32),
            count_b=jnp.zeros((b,), jnp.int32), rounds=jnp.zeros((), jnp.int32))

  def running(carry):
    s, o = carry
    room = jnp.max(jnp.where(s.done_b, 0, o.count_b)) + spec.k + 1 <= spec.out_len
    freed = stop_on_free & jnp.any(s.done_b & ~done0)
    return jnp.any(~s.done_b) & (o.rounds < max_rounds) & room & ~freed

  def one_round(carry):
    s, o = carry
    s, emitted, count = round_(spec, target_params, draft_params, s)
    o = Out(tokens_bw=_scatter_rows(o.tokens_bw, o.count_b, emitted, count),
            count_b=o.count_b + count, rounds=o.rounds + 1)
    return s, o

  return jax.lax.while_loop(running, one_round, (state, out))


def generate(spec: LoopSpec, target_params, draft_params, tokens_bt, lengths_b, temperature,
             top_p, top_k, seed):
  """Sampler.generate's program: prefill every row, decode to completion. Row i draws from
  stream (seed, i). Returns (tokens b max_new, num_b, Stats)."""
  b = tokens_bt.shape[0]
  max_new = spec.out_len - spec.k  # run_rounds emits max_new - 1; a round needs k + 1 of room
  full = lambda x, dtype: jnp.full((b,), x, dtype)
  seeds = jnp.stack([full(seed, jnp.uint32), jnp.arange(b, dtype=jnp.uint32)], axis=1)
  rows = Rows(full(temperature, jnp.float32), full(top_p, jnp.float32), full(top_k, jnp.int32),
              seeds, full(max_new, jnp.int32))
  state, first = prefill(spec, target_params, draft_params, tokens_bt, lengths_b, rows,
                         with_draft=spec.k > 0)
  # The draft was prefilled with the target and runs every round: it never lags.
  state, out = run_rounds(spec, target_params, draft_params, state, jnp.ones((b,), bool),
                          max_new, False, catch_up=False)
  tokens = jnp.concatenate([first[:, None], out.tokens_bw], axis=1)[:, :max_new]
  num = state.num_out_b
  tokens = jnp.where(jnp.arange(max_new)[None, :] < num[:, None], tokens, spec.pad_id)
  return tokens, num, state.stats
