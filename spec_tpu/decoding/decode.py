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
Proposals come from the spec's draft source (draft_source.py, `_propose`): the draft model, an
n-gram lookup in tokens_bs (no draft cache at all), or both (the draft is fed the n-gram
tokens it did not propose, so its cache stays as in a model round), or Gemma 4's assistant
(`_draft_assistant`: it reads the target's cache and State.target_hidden_bd, which every
round, K = 0 included, and every insert keep current; no draft cache). A row may propose fewer
than K tokens; the rejection step judges only those (`rejection.accept`'s num_b).
Rows advance independently: each accepts its own number of tokens and stops on its own, and
each draws its random numbers from its own (seed, stream) pair, never from a batch-wide key, so
its output does not depend on the other rows: not its law, and with a fixed seed not its tokens
either. How draft and target share randomness is the coupling (LoopSpec.coupling):
  'rejection'  the modified rejection step (rejection.py): maximal acceptance; its keys come
               from the row's round counter (`sampling.row_keys`), so a seed reproduces the
               tokens only for the same K in every round.
  'gumbel'     Gumbel-max with noise from (seed, stream, absolute position) (gumbel.py): the
               tokens are a function of the seed, the prompt and the target alone, whatever K,
               the draft, the batch, the slot or the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.kernels import amx
from spec_tpu.models import assistant as assistant_lib
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import model
from spec_tpu.decoding import gumbel, rejection, sampling
from spec_tpu.decoding.draft_source import DraftSource, ngram_proposals
from spec_tpu.models.config import AssistantConfig, ModelConfig

CATCH_UP_CHUNK = 32  # tokens per draft call when the draft catches up after K = 0 rounds
COUPLINGS = ("rejection", "gumbel")  # see the module docstring


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Everything static about one compiled program (hashable).

  Programs that share one resident state (the engine's insert and its step per K) differ only
  in `k` and `out_len`; the state's shapes come from the rest.
  """
  target: ModelConfig
  draft: ModelConfig | None  # None: no draft model and no draft cache (k = 0, or n-gram drafts);
                             # with n-gram drafts a draft's cache idles (an engine choosing
                             # sources per step), caught up by the next model round
  k: int                     # draft tokens per round of this program; 0 = autoregressive
  k_max: int                 # the largest K any program on this state runs: the caches keep
                             # K_max + 1 slots of rollback slack, the stats K_max columns
  max_top_k: int             # static bound on per-row top_k (the shape of the top-k search)
  max_len: int               # positions per row (caches and token buffer)
  out_len: int               # tokens one run_rounds call can return per row
  eos_ids: tuple[int, ...] = ()  # a row stops after emitting any of these (none: no EOS)
  pad_id: int = 0
  prefill_chunk: int = 128   # prompt tokens per layer pass at prefill (model.prefill says why)
  coupling: str = "rejection"  # one of COUPLINGS
  logprobs_k: int = 0        # most probable alternatives recorded per emitted token (0: only
                             # the token's own log-probability)
  controls: bool = False     # Rows.controls and State's token counts exist (penalties etc.)
  max_logit_bias: int = 0    # logit_bias entries per row (with controls)
  raw_logprobs: bool = False  # Rows.raw_logprobs_b exists: rows may ask for the logprobs of
                              # the model's raw distribution instead
  source: DraftSource = DraftSource()  # where proposals come from (draft_source.py)
  # Draft source "assistant" (draft None, draft_params the assistant's): Gemma 4's drafter
  # reads the target's caches and final hidden state; no draft cache, nothing to roll back.
  # Set whenever a program on this state may draft with it (k_max > 0), K = 0 programs too:
  # they keep the target's final hidden state current for the next speculative round.
  assistant: AssistantConfig | None = None
  # The grammar automata pool (State.grammar_pool; 0: no structured output compiled in):
  # its states (row 0: the unconstrained state every free row sits in), token classes per
  # state, class maps (map 0: every token in class 0, that of state 0) and bit-packed masks
  # (mask 0: every token, that of state 0).
  grammar_states: int = 0
  grammar_classes: int = 0
  grammar_tables: int = 0
  grammar_masks: int = 0

  @property
  def num_tokens(self) -> int:
    return self.target.num_tokens

  def __post_init__(self):
    # A tuple (hashable, static): each id is one compare in the program, not a traced lookup.
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    has_draft = self.draft is not None or self.assistant is not None
    needs_model = self.k > 0 and self.source.uses_model
    if self.k > self.k_max or (needs_model and not has_draft):
      raise ValueError(f"k={self.k} needs a draft and k <= k_max={self.k_max}")
    if not self.source.uses_model and self.assistant is not None:
      raise ValueError("n-gram drafting runs no draft model: give assistant=None")
    if self.draft is not None and self.assistant is not None:
      raise ValueError("give a draft model or an assistant, not both")
    if (self.assistant is not None) != (self.source.uses_assistant and self.k_max > 0):
      raise ValueError("draft kind 'assistant' and an AssistantConfig go together (give "
                       "assistant= with source=DraftSource('assistant'), draft=None)")
    if len({bool(self.grammar_states), bool(self.grammar_classes), bool(self.grammar_tables),
            bool(self.grammar_masks)}) > 1:
      raise ValueError("grammar_states, grammar_classes, grammar_tables and grammar_masks go "
                       "together")
    if self.assistant is not None:
      if self.grammar_states:
        raise ValueError("the assistant drafter drafts without grammars")
      self.assistant.check_target(self.target)
    check_coupling(self.coupling)


def _is_eos(spec: LoopSpec, tokens):
  """Whether each token is one of the spec's EOS ids (an OR of a few compares; False with
  none)."""
  hit = jnp.zeros(tokens.shape, bool)
  for i in spec.eos_ids:
    hit |= tokens == i
  return hit


def check_coupling(coupling: str) -> str:
  if coupling not in COUPLINGS:
    raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
  return coupling


class Controls(NamedTuple):
  """Per-row transforms beyond the filters (sampling.penalize, min_p), applied to the draft's
  p and the target's q alike at every position, with the counts of the tokens before it
  (drafted ones included): each is a function of the prefix, so speculation stays exact."""
  min_p_b: jax.Array        # float32, 0 = off
  presence_b: jax.Array     # float32, 0 = off
  frequency_b: jax.Array    # float32, 0 = off
  repetition_b: jax.Array   # float32, 1 = off
  bias_ids_bn: jax.Array    # int32 logit_bias tokens, -1 = unused (n = LoopSpec.max_logit_bias)
  bias_bn: jax.Array        # float32 their biases


class Rows(NamedTuple):
  """Per-request settings (one value per row), written by insert; traced, so one program
  serves any mix of requests."""
  temperature_b: jax.Array  # float32, 0 = greedy
  top_p_b: jax.Array        # float32 in (0, 1]
  top_k_b: jax.Array        # int32, 0 = off, at most LoopSpec.max_top_k
  seed_b2: jax.Array        # uint32 (seed, stream): the row's random stream
  max_new_b: jax.Array      # int32 tokens to generate at most (the prefill's token included)
  controls: Controls | None = None  # None: none compiled in (LoopSpec.controls False)
  # bool: the row's logprobs are of the target's raw distribution (log-softmax of its logits:
  # temperature 1, no penalties, no filters) rather than of the one it samples from. None:
  # never (LoopSpec.raw_logprobs False).
  raw_logprobs_b: jax.Array | None = None
  # With LoopSpec.grammar_states: int32 the row's grammar's start state in the pool (0: none).
  grammar_b: jax.Array | None = None


class Stats(NamedTuple):
  rounds_b: jax.Array     # rounds (target calls after the prefill) while the row was active
  accepted_b: jax.Array   # draft tokens accepted
  reached_bn: jax.Array   # rounds in which draft position j was judged
  accepted_bn: jax.Array  # rounds in which draft position j was accepted
  # Of those, the positions an n-gram lookup proposed (the rest: the draft model, or nothing
  # where the lookup found no match and no model continues it; such a position is judged and
  # rejected in reached_bn, as a round that proposes nothing yields one token, like a rejection).
  ngram_judged_b: jax.Array
  ngram_accepted_b: jax.Array
  # Drafted positions whose proposal the grammar's mask refused: an n-gram token outside the
  # language (judged and rejected), or the draft model's most probable token (the masked draft
  # then proposed another).
  mask_rejected_b: jax.Array


class GrammarPool(NamedTuple):
  """Compiled automata (grammar.py) held compactly: token v in pool state s leads to
  next_sc[s, cls_tv[table_s[s], v]] (-1: not allowed), and is allowed there iff bit v % 32 of
  bits_mw[mask_s[s], v // 32] is set. A table's states, and its masks, are a block of rows
  renumbered into the pool; its tokens' classes one row of cls_tv; every slot whose request
  uses that grammar shares them."""
  next_sc: jax.Array  # int32 (pool states, classes)
  table_s: jax.Array  # int32 (pool states,): the class map each state reads
  cls_tv: jax.Array   # int32 (class maps, V)
  mask_s: jax.Array   # int32 (pool states,): the mask row each state reads
  bits_mw: jax.Array  # uint32 (pool masks, ceil(V / 32))


class State(NamedTuple):
  target_cache: cache_lib.Cache
  draft_cache: cache_lib.Cache | None
  tokens_bs: jax.Array    # int32 tokens by position (prompt, generated)
  num_out_b: jax.Array    # tokens emitted since insert (the prefill's first token included)
  done_b: jax.Array       # finished, cancelled or empty: the row does not advance
  rows: Rows
  stats: Stats
  counts_bv: jax.Array | None = None     # with controls: int32 generated tokens (emitted) by id
  in_prompt_bv: jax.Array | None = None  # with controls: bool, the prompt's tokens
  # The target's final hidden state that produced each row's `last` token (assistant only).
  target_hidden_bd: jax.Array | None = None
  # With LoopSpec.grammar_states: the automata pool, and each row's state after its tokens up
  # to `last` (see grammar.py).
  grammar_pool: GrammarPool | None = None
  grammar_b: jax.Array | None = None


class Logprobs(NamedTuple):
  """Of each emitted token (leading axes those of the tokens, ...): the log-probability under
  the target's distribution it was sampled from (after temperature and filters: the q an
  accepted draft, a resampled token and the bonus token all follow), and the logprobs_k most
  probable tokens of that distribution (-inf for tokens the filters removed). Rows with
  Rows.raw_logprobs_b get both of the target's raw distribution instead."""
  token: jax.Array        # ... float32
  top_ids: jax.Array      # ... n int32, most probable first
  top: jax.Array          # ... n float32


class Out(NamedTuple):
  """What one run_rounds call emitted."""
  tokens_bw: jax.Array    # the new tokens of each row, left-aligned (pad after count)
  count_b: jax.Array
  rounds: jax.Array       # rounds run (scalar)
  logprobs: Logprobs      # of tokens_bw


def _probs(spec: LoopSpec, logits_bv, rows: Rows, counts=None, in_prompt=None, allowed=None):
  # Both models' distributions over the shared tokens only (padding rows have zero mass), through
  # the one transform (exactness needs p and q filtered alike). counts: the generated tokens
  # before each position (shaped like the logits), with controls; allowed: the grammar's mask
  # at each position (bool, shaped like the logits), before temperature and filters.
  logits_bv = logits_bv[..., :spec.num_tokens]
  c = rows.controls
  if c is not None:
    logits_bv = sampling.penalize(logits_bv, counts, in_prompt, c.presence_b, c.frequency_b,
                                  c.repetition_b, c.bias_ids_bn, c.bias_bn)
  if allowed is not None:
    logits_bv = jnp.where(allowed, logits_bv, -jnp.inf)
  return sampling.probabilities(logits_bv, rows.temperature_b, rows.top_k_b, rows.top_p_b,
                                max_top_k=spec.max_top_k,
                                min_p=None if c is None else c.min_p_b)


def _allowed(pool: GrammarPool, g):
  """The grammar's mask in states g (any shape): g.shape + (V,) bool. (Rows of bits and
  shifts: no gather per token.)"""
  words = pool.bits_mw[pool.mask_s[g]]
  bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  return bits.reshape(g.shape + (-1,))[..., :pool.cls_tv.shape[-1]] != 0


def _next(pool: GrammarPool, g, x):
  """The state after token x in states g (any shape, alike): -1 where g does not allow x."""
  return pool.next_sc[g, pool.cls_tv[pool.table_s[g], x]]


def _advance(pool: GrammarPool, g_b, x_b):
  """Each row's state after token x. A token the state does not allow leads to state 0 (no
  constraint): it is never accepted (its q is 0), so nothing after it is judged."""
  return jnp.maximum(_next(pool, g_b, x_b), 0)


def _verify_allowed(pool: GrammarPool, g_bm):
  """The masks of the target's K + 1 verified positions (the same states the draft was masked
  with: the row's state advanced over the drafts before each)."""
  return _allowed(pool, g_bm)


def write_grammars(spec: LoopSpec, state: State, tables_r, next_rsc, cls_rv, mask_rs,
                   bits_rmw) -> State:
  """Writes automaton i (states and masks from 0, -1: not allowed) into the pool as table
  tables_r[i] (1..): its token classes as class map tables_r[i], its s states as the rows of
  block tables_r[i] - 1 after state 0, renumbered there, its m masks likewise after mask 0 (a
  table past the pool drops it: padding)."""
  s, m = next_rsc.shape[1], bits_rmw.shape[1]
  real = tables_r < spec.grammar_tables
  offsets = 1 + (tables_r - 1) * s
  shifted = jnp.where(next_rsc >= 0, next_rsc + offsets[:, None, None], -1)
  at = jnp.where(real[:, None], offsets[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :],
                 spec.grammar_states)
  mask_offsets = 1 + (tables_r - 1) * m
  mask_at = jnp.where(real[:, None],
                      mask_offsets[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :],
                      spec.grammar_masks)
  pool = state.grammar_pool
  return state._replace(grammar_pool=GrammarPool(
      next_sc=pool.next_sc.at[at].set(shifted, mode="drop"),
      table_s=pool.table_s.at[at].set(jnp.broadcast_to(tables_r[:, None], at.shape),
                                      mode="drop"),
      cls_tv=pool.cls_tv.at[tables_r].set(cls_rv, mode="drop"),
      mask_s=pool.mask_s.at[at].set(mask_rs + mask_offsets[:, None], mode="drop"),
      bits_mw=pool.bits_mw.at[mask_at].set(bits_rmw, mode="drop")))


def _count(counts_bv, tokens_bm, num_b):
  """counts plus the first num_b[i] of row i's tokens."""
  m = tokens_bm.shape[1]
  use = (jnp.arange(m)[None, :] < num_b[:, None]).astype(jnp.int32)
  rows = jnp.arange(tokens_bm.shape[0])[:, None]
  return counts_bv.at[rows, tokens_bm].add(use, mode="drop")


def _prefix_counts(counts_bv, tokens_bm, num_tokens: int):
  """b m+1 v: the counts before position j, j = 0..m: counts plus tokens[:j]."""
  onehot = jax.nn.one_hot(tokens_bm, num_tokens, dtype=jnp.int32)
  # zeros of an explicit shape: with m = 0 (a K = 0 round) onehot[:, :1] would be empty.
  zeros = jnp.zeros((tokens_bm.shape[0], 1, num_tokens), jnp.int32)
  before = jnp.concatenate([zeros, jnp.cumsum(onehot, axis=1)], axis=1)
  return counts_bv[:, None, :] + before


def _logprobs(spec: LoopSpec, q_xv, tokens_x, *, log_space: bool = False) -> Logprobs:
  """Logprobs of `tokens_x` drawn from the distributions q_xv (x: any leading axes; given as
  log-probabilities when log_space). Logs are taken of the few values kept only."""
  log = (lambda x: x) if log_space else jnp.log
  token = log(jnp.take_along_axis(q_xv, tokens_x[..., None], axis=-1)[..., 0])
  if spec.logprobs_k > 0:
    top, ids = jax.lax.top_k(q_xv, spec.logprobs_k)
    return Logprobs(token, ids.astype(jnp.int32), log(top))
  none = tokens_x.shape + (0,)
  return Logprobs(token, jnp.zeros(none, jnp.int32), jnp.zeros(none, jnp.float32))


def _emitted_logprobs(spec: LoopSpec, q_xv, logits_xv, tokens_x, rows: Rows) -> Logprobs:
  """Logprobs of tokens (leading axes b ...) drawn from q: of q, or for rows asking for raw
  logprobs of log_softmax(logits), computed only when some row asks."""
  processed = _logprobs(spec, q_xv, tokens_x)
  raw_b = rows.raw_logprobs_b
  if raw_b is None:
    return processed

  def raw():
    log_q = jax.nn.log_softmax(logits_xv[..., :spec.num_tokens].astype(jnp.float32), axis=-1)
    return _logprobs(spec, log_q, tokens_x, log_space=True)

  chosen = jax.lax.cond(jnp.any(raw_b), raw, lambda: processed)
  pick = lambda r, p: jnp.where(raw_b.reshape(raw_b.shape + (1,) * (r.ndim - 1)), r, p)
  return jax.tree.map(pick, chosen, processed)


def prompt_logprobs(spec: LoopSpec, target_params, tokens_bt) -> Logprobs:
  """Logprobs of tokens 1..t-1 of each row (leading axes b t-1) under the target's own
  distribution, temperature 1 and no filters (prompt tokens were not sampled from anything),
  from one forward over the whole rows. Right padding changes nothing before it."""
  logits = model.forward_full(target_params, spec.target, tokens_bt)[:, :-1, :spec.num_tokens]
  return _logprobs(spec, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                   tokens_bt[:, 1:], log_space=True)


def _stats_width(spec: LoopSpec) -> int:
  return max(spec.k_max, 1)


def init_state(spec: LoopSpec, batch: int) -> State:
  """Every row empty and done (an engine's state before its first insert)."""
  zeros_b = jnp.zeros((batch,), jnp.int32)
  n = _stats_width(spec)
  state = State(
      target_cache=cache_lib.init_cache(spec.target, batch, spec.max_len, spec.k_max + 1),
      draft_cache=(None if spec.draft is None else
                   cache_lib.init_cache(spec.draft, batch, spec.max_len, spec.k_max + 1)),
      tokens_bs=jnp.full((batch, spec.max_len), spec.pad_id, jnp.int32), num_out_b=zeros_b,
      done_b=jnp.ones((batch,), bool),
      rows=Rows(jnp.ones((batch,), jnp.float32), jnp.ones((batch,), jnp.float32), zeros_b,
                jnp.zeros((batch, 2), jnp.uint32), zeros_b),
      stats=Stats(zeros_b, zeros_b, jnp.zeros((batch, n), jnp.int32),
                  jnp.zeros((batch, n), jnp.int32), zeros_b, zeros_b, zeros_b),
      target_hidden_bd=(None if spec.assistant is None else
                        jnp.zeros((batch, spec.target.d_model), spec.target.dtype)))
  if spec.raw_logprobs:
    state = state._replace(rows=state.rows._replace(raw_logprobs_b=jnp.zeros((batch,), bool)))
  if spec.grammar_states:
    state = state._replace(
        rows=state.rows._replace(grammar_b=zeros_b), grammar_b=zeros_b,
        grammar_pool=GrammarPool(
            jnp.zeros((spec.grammar_states, spec.grammar_classes), jnp.int32),
            jnp.zeros((spec.grammar_states,), jnp.int32),
            jnp.zeros((spec.grammar_tables, spec.num_tokens), jnp.int32),
            jnp.zeros((spec.grammar_states,), jnp.int32),
            jnp.full((spec.grammar_masks, -(-spec.num_tokens // 32)), 2 ** 32 - 1,
                     jnp.uint32)))
  if not spec.controls:
    return state
  v, m = spec.num_tokens, spec.max_logit_bias
  f = lambda x: jnp.full((batch,), x, jnp.float32)
  controls = Controls(f(0.0), f(0.0), f(0.0), f(1.0), jnp.full((batch, m), -1, jnp.int32),
                      jnp.zeros((batch, m), jnp.float32))
  return state._replace(rows=state.rows._replace(controls=controls),
                        counts_bv=jnp.zeros((batch, v), jnp.int32),
                        in_prompt_bv=jnp.zeros((batch, v), bool))


def prefill(spec: LoopSpec, target_params, draft_params, tokens_rt, lengths_r, rows: Rows, *,
            with_draft: bool, soft=None, draft_soft=None, fan: int = 1,
            grammar_pool=None) -> tuple[State, jax.Array, Logprobs]:
  """The state of r fresh rows after their prompts (right-padded to t) and the first token.

  with_draft: prefill the draft too (the engine skips it while K = 0: the draft catches up if
  speculation starts). soft: the soft tokens of the prompts' images (r m d, model.forward) for
  the target; draft_soft: the same images' soft tokens from a multimodal draft's own encoder
  and projector (r m d_draft), or None: a text-only draft reads the placeholders as padding.
  fan: rows per prompt
  (static): each prompt is prefilled once and row i * fan + j is its j-th sample, with its
  own settings and random stream (rows: r * fan of them), so the state's caches keep r rows
  and everything else r * fan. grammar_pool: the automata pool rows.grammar_b start in
  (with LoopSpec.grammar_states; the state returned holds the rows' states, not the pool).
  Returns (state, first token per row, its Logprobs)."""
  r, t = tokens_rt.shape
  tc = cache_lib.init_cache(spec.target, r, spec.max_len, spec.k_max + 1)
  logits, tc, *hidden = model.prefill(target_params, spec.target, tokens_rt, tc, lengths_r,
                                      spec.prefill_chunk, soft=soft,
                                      final_hidden=spec.assistant is not None)
  dc = None
  if spec.draft is not None:
    dc = cache_lib.init_cache(spec.draft, r, spec.max_len, spec.k_max + 1)
    if with_draft:
      _, dc = model.prefill(draft_params, spec.draft,
                            _draft_view(spec, tokens_rt, images=draft_soft is not None), dc,
                            lengths_r, spec.prefill_chunk, soft=draft_soft)
  if fan > 1:  # a prompt's samples share its prefill: the same logits, prompt and hidden state
    each = lambda x: jnp.repeat(x, fan, axis=0)
    logits, tokens_rt, lengths_r = each(logits), each(tokens_rt), each(lengths_r)
    hidden = [each(h) for h in hidden]
    r *= fan
  counts = in_prompt = None
  if spec.controls:
    counts = jnp.zeros((r, spec.num_tokens), jnp.int32)
    in_prompt = _count(counts, tokens_rt, lengths_r) > 0
  allowed = None
  if spec.grammar_states:
    allowed = _allowed(grammar_pool, rows.grammar_b)
  q_rv = _probs(spec, logits[:, 0], rows, counts, in_prompt, allowed)
  if spec.coupling == "gumbel":
    first = gumbel.choose(q_rv, gumbel.noise(rows.seed_b2, lengths_r[:, None],
                                             spec.num_tokens)[:, 0])
  else:
    key_r = sampling.row_keys(rows.seed_b2, jnp.zeros((r,), jnp.int32))  # round 0: the prefill
    first = sampling.sample(key_r, q_rv)
  pos = jnp.arange(spec.max_len)[None, :]
  prompt = jnp.pad(tokens_rt, ((0, 0), (0, max(spec.max_len - t, 0))),
                   constant_values=spec.pad_id)[:, :spec.max_len]
  tokens = jnp.where(pos < lengths_r[:, None], prompt,
                     jnp.where(pos == lengths_r[:, None], first[:, None], spec.pad_id))
  done = (rows.max_new_b <= 1) | _is_eos(spec, first)
  zeros_r = jnp.zeros((r,), jnp.int32)
  n = _stats_width(spec)
  state = State(target_cache=tc, draft_cache=dc, tokens_bs=tokens,
                num_out_b=jnp.ones((r,), jnp.int32), done_b=done, rows=rows,
                stats=Stats(zeros_r, zeros_r, jnp.zeros((r, n), jnp.int32),
                            jnp.zeros((r, n), jnp.int32), zeros_r, zeros_r, zeros_r),
                counts_bv=None if counts is None else _count(counts, first[:, None],
                                                     jnp.ones((r,), jnp.int32)),
                in_prompt_bv=in_prompt,
                target_hidden_bd=hidden[0][:, 0] if hidden else None,
                grammar_b=(None if not spec.grammar_states else
                           _advance(grammar_pool, rows.grammar_b, first)))
  return state, first, _emitted_logprobs(spec, q_rv, logits[:, 0], first, rows)


def insert(spec: LoopSpec, target_params, draft_params, state: State, slots, tokens_rt,
           lengths_r, rows: Rows, *, with_draft: bool, pixels=None):
  """Prefills r requests into rows slots (r) of a resident state (a slot >= batch drops its
  request: padding of a fixed-width insert); or r prompts, each prefilled once, into rows
  slots[i, :] (r n: n samples of each prompt, rows.* of r n entries, prompt-major).
  pixels: the requests' images (r u H W 3, each row's first, zeros after), encoded here, once
  per request. Returns (state, first token, done, its Logprobs), one per slot entry."""
  fan = 1 if slots.ndim == 1 else slots.shape[1]
  slots_r = slots.reshape(-1)
  soft = draft_soft = None
  if pixels is not None:
    soft = _encode_rows(target_params, spec.target, pixels)
    if with_draft and reads_images(spec):
      draft_soft = _encode_rows(draft_params, spec.draft, pixels)
  new, first, logprobs = prefill(spec, target_params, draft_params, tokens_rt, lengths_r, rows,
                                 with_draft=with_draft, soft=soft, draft_soft=draft_soft,
                                 fan=fan, grammar_pool=state.grammar_pool)
  put = lambda old, fresh: old.at[slots_r].set(fresh, mode="drop")
  state = State(
      target_cache=cache_lib.insert_rows(state.target_cache, new.target_cache, slots),
      draft_cache=(None if state.draft_cache is None else
                   cache_lib.insert_rows(state.draft_cache, new.draft_cache, slots)),
      tokens_bs=put(state.tokens_bs, new.tokens_bs), num_out_b=put(state.num_out_b, new.num_out_b),
      done_b=put(state.done_b, new.done_b), rows=jax.tree.map(put, state.rows, new.rows),
      stats=jax.tree.map(put, state.stats, new.stats),
      counts_bv=None if state.counts_bv is None else put(state.counts_bv, new.counts_bv),
      in_prompt_bv=None if state.in_prompt_bv is None else put(state.in_prompt_bv,
                                                               new.in_prompt_bv),
      target_hidden_bd=(None if state.target_hidden_bd is None else
                        put(state.target_hidden_bd, new.target_hidden_bd)),
      grammar_pool=state.grammar_pool,
      grammar_b=None if state.grammar_b is None else put(state.grammar_b, new.grammar_b))
  return state, first, new.done_b, logprobs


def reads_images(spec: LoopSpec) -> bool:
  """The draft is a model with its own vision encoder: it reads the prompts' images."""
  return spec.draft is not None and spec.draft.vision is not None


def _encode_rows(params, cfg, pixels):
  """Soft tokens (r u*j d) of each row's images (pixels r u H W 3), with cfg's encoder."""
  # One image of every row at a time: the encoder's attention scores (heads x patches^2 in
  # float32, 1 GiB per Gemma 3 image) are held for r images, not r x u.
  def encode(images_r):
    return model.encode_images(params, cfg, images_r)
  soft = jnp.swapaxes(jax.lax.map(encode, jnp.swapaxes(pixels, 0, 1)), 0, 1)  # r u j d
  return soft.reshape(soft.shape[0], -1, soft.shape[-1])


def _draft_view(spec: LoopSpec, tokens, images: bool = False):
  """The tokens as the draft embeds them: ids past its vocabulary read as padding, among them
  an image placeholder (which may lie outside every vocabulary) unless images: the draft then
  embeds its own soft tokens there."""
  keep = tokens < spec.draft.num_tokens
  if images:
    keep |= tokens == spec.draft.vision.image_id
  return jnp.where(keep, tokens, spec.pad_id)


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
    tokens = _draft_view(spec, jnp.take_along_axis(s.tokens_bs, at, axis=1))
    _, dc = model.forward(draft_params, spec.draft, tokens, s.draft_cache, num, last_only=True)
    return s._replace(draft_cache=dc)

  return jax.lax.while_loop(lambda s: jnp.any(gap(s) > 0), feed, state)


def _pick(spec: LoopSpec, randomness, probs):
  """A token per row from its distribution and its randomness for that position: a key
  (rejection coupling: a draw), or the position's Gumbel noise (argmax)."""
  if spec.coupling == "gumbel":
    return gumbel.choose(probs, randomness)
  return sampling.sample(randomness, probs)


def _draft(spec: LoopSpec, draft_params, state: State, randomness_bn, forced_bn, forced_b):
  """K draft tokens, the distributions they were drawn from, the draft cache after them, and
  what its rollback needs for recurrent layers: the traces of the K-1 single steps (the state
  after each, recurrent.steps_trace) and the length they start from (after the first call,
  which every kept prefix of a live row includes).

  The first forced_b[i] tokens of row i are forced_bn's (n-gram proposals, one-hot
  distributions): the draft is fed them and samples only the positions after them. With a
  grammar, each sampled position is masked in the row's state advanced over the drafts before
  it; the last value returned counts the positions whose proposal the mask refused (Stats)."""
  tc, dc = state.target_cache, state.draft_cache
  b = state.done_b.shape[0]
  num_pending = jnp.where(state.done_b, 0, tc.length - dc.length + 1)  # 1 or 2 when live
  at = jnp.clip(dc.length[:, None] + jnp.arange(2)[None, :], 0, spec.max_len - 1)
  pending_b2 = jnp.take_along_axis(state.tokens_bs, at, axis=1)
  logits, dc = model.forward(draft_params, spec.draft, pending_b2, dc, num_pending,
                             last_only=True)
  v = spec.num_tokens
  counts, in_prompt = state.counts_bv, state.in_prompt_bv
  table = state.grammar_pool

  def choose(j, randomness_b, logits_bv, counts, g_b):
    forced = j < forced_b
    allowed = None if table is None else _allowed(table, g_b)
    p = _probs(spec, logits_bv, state.rows, counts, in_prompt, allowed)
    x = jnp.where(forced, forced_bn[:, j], _pick(spec, randomness_b, p))
    if spec.source.uses_ngram:  # otherwise nothing is forced: no pass over the vocabulary
      p = jnp.where(forced[:, None], jax.nn.one_hot(x, v, dtype=p.dtype), p)
    if table is None:
      return x, p, g_b, jnp.zeros_like(x)
    # Refused: a forced token outside the language, or the draft's unmasked first choice.
    top = jnp.argmax(logits_bv[..., :v], axis=-1)
    refused = ~jnp.take_along_axis(allowed, jnp.where(forced, x, top)[:, None], axis=1)[:, 0]
    return x, p, _advance(table, g_b, x), refused.astype(jnp.int32)

  x0, p0, g1, refused0 = choose(0, randomness_bn[:, 0], logits[:, 0], counts, state.grammar_b)

  first = cache_lib.recurrent_entries(dc)
  start_b = dc.length
  one = jnp.ones((b,), jnp.int32)

  def step(carry, xs):
    dc, x, counts, g, refused = carry
    j, randomness_b = xs
    with amx.held_off():  # a loop inside the decode loop: the packing would stay in it
      logits, dc = model.forward(draft_params, spec.draft, x[:, None], dc)
    if counts is not None:  # the drafted prefix's own tokens count too
      counts = _count(counts, x[:, None], one)
    nxt, p, g, r = choose(j, randomness_b, logits[:, 0], counts, g)
    # A recurrent layer's state after each step, stacked by the scan: the rollback selects
    # the one its kept length ends on (None for attention layers: nothing stacked).
    return (dc, nxt, counts, g, refused + r), (nxt, p, cache_lib.recurrent_entries(dc))

  k = randomness_bn.shape[1]
  (dc, _, _, _, refused), (xs, ps, steps) = jax.lax.scan(
      step, (dc, x0, counts, g1, refused0),
      (jnp.arange(1, k), jnp.moveaxis(randomness_bn[:, 1:], 1, 0)))
  draft_bn = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  p_bnv = jnp.concatenate([p0[:, None], jnp.moveaxis(ps, 0, 1)], axis=1)
  return draft_bn, p_bnv, dc, cache_lib.steps_traces(first, steps), start_b, refused


def _propose(spec: LoopSpec, draft_params, state: State, randomness_bn, last_pos_b):
  """The round's proposals from the spec's draft source: (draft_bn, p_bnv, num_b, ngram_b,
  draft cache, draft traces, draft start, refused_b). p_bnv: the distributions they were drawn
  from (one-hot for n-gram tokens); num_b: proposals per row (positions after it are not
  judged), None where every row proposes K; ngram_b: how many of them the n-gram lookup made
  (a prefix); refused_b: the grammar's refusals while drafting (_draft), None where no model
  drafted."""
  b, k = randomness_bn.shape[0], spec.k
  src = spec.source
  if src.uses_ngram:
    ngram_bn, ngram_b = ngram_proposals(state.tokens_bs, last_pos_b, k, src.ngram_max,
                                        src.ngram_min)
  else:
    ngram_bn, ngram_b = jnp.zeros((b, k), jnp.int32), jnp.zeros((b,), jnp.int32)
  if not src.uses_model:
    p_bnv = jax.nn.one_hot(ngram_bn, spec.num_tokens, dtype=jnp.float32)
    return ngram_bn, p_bnv, ngram_b, ngram_b, state.draft_cache, None, None, None
  draft_bn, p_bnv, dc, traces, start, refused = _draft(spec, draft_params, state, randomness_bn,
                                                       ngram_bn, ngram_b)
  return draft_bn, p_bnv, None, ngram_b, dc, traces, start, refused


def _draft_assistant(spec: LoopSpec, assistant_params, target_params, state: State, last_b,
                     randomness_bn):
  """K draft tokens from the assistant and the distributions they were drawn from: picked
  from its filtered distribution with the round's randomness (acceptance sum min(p, q) under
  the rejection coupling), or its argmax as a one-hot p (DraftSource.greedy). With controls,
  each position's penalties count the drafted prefix before it, as the target's will."""
  one = jnp.ones_like(last_b)

  def propose(randomness_b, logits_bv, counts):
    p = _probs(spec, logits_bv, state.rows, counts, state.in_prompt_bv)
    if spec.source.greedy:
      x = jnp.argmax(p, axis=-1).astype(jnp.int32)
      p = jax.nn.one_hot(x, p.shape[-1], dtype=p.dtype)
    else:
      x = _pick(spec, randomness_b, p)
    return x, p, None if counts is None else _count(counts, x[:, None], one)

  return assistant_lib.draft(assistant_params, spec.assistant, target_params, spec.target,
                             state.target_cache, last_b, state.target_hidden_bd, randomness_bn,
                             propose, carry=state.counts_bv)


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
  roll back. Returns (state, emitted_bm, count_b, Logprobs of emitted_bm): the row's new
  tokens, cut after EOS and at its max_new, 0 for rows that are done."""
  b, k = state.done_b.shape[0], spec.k
  active = ~state.done_b
  tc0 = state.target_cache
  l0 = tc0.length
  if spec.coupling == "gumbel":
    # The noise of the K+1 positions this round can emit (l0 + 1 .. l0 + K + 1): the drafts'
    # and the target's, one block.
    randomness = gumbel.noise(state.rows.seed_b2, l0[:, None] + 1 + jnp.arange(k + 1)[None, :],
                              spec.num_tokens)
  else:
    randomness = sampling.split_rows(
        sampling.row_keys(state.rows.seed_b2, state.stats.rounds_b + 1), k + 1)
  last = jnp.take_along_axis(state.tokens_bs, jnp.minimum(l0, spec.max_len - 1)[:, None],
                             axis=1)[:, 0]
  refused = None
  if k > 0 and spec.assistant is not None:
    draft_bn, p_bnv = _draft_assistant(spec, draft_params, target_params, state, last,
                                       randomness[:, :k])
    num_b, ngram_b = None, jnp.zeros((b,), jnp.int32)
    verify_bm = jnp.concatenate([last[:, None], draft_bn], axis=1)
  elif k > 0:
    draft_bn, p_bnv, num_b, ngram_b, dc, draft_traces, draft_start, refused = _propose(
        spec, draft_params, state, randomness[:, :k], l0)
    verify_bm = jnp.concatenate([last[:, None], draft_bn], axis=1)
  else:
    draft_bn, num_b = jnp.zeros((b, 0), jnp.int32), None
    ngram_b = jnp.zeros((b,), jnp.int32)
    verify_bm = last[:, None]
  # traces: recurrent layers keep their state after each of the K+1 positions until the
  # rollback below selects the kept one (attention layers need only the length move).
  logits, tc, target_traces, *hidden = model.forward(
      target_params, spec.target, verify_bm, tc0, traces=True,
      final_hidden=spec.assistant is not None)
  counts_bmv = None
  if spec.controls:  # position j follows the j drafts before it
    counts_bmv = _prefix_counts(state.counts_bv, draft_bn, spec.num_tokens)
  allowed = None
  if spec.grammar_states:
    # The row's grammar state before each verified position: advanced over the drafts.
    table = state.grammar_pool
    g = [state.grammar_b]
    for j in range(k):
      g.append(_advance(table, g[-1], draft_bn[:, j]))
    g_bm = jnp.stack(g, axis=1)
    allowed = _verify_allowed(table, g_bm)
    if refused is None and k > 0:  # n-gram proposals only: those outside the language
      inside = _next(table, g_bm[:, :k], draft_bn) >= 0
      judged = jnp.arange(k)[None, :] < (k if num_b is None else num_b)[:, None]
      refused = jnp.sum(judged & ~inside, axis=1, dtype=jnp.int32)
  q_bmv = _probs(spec, logits, state.rows, counts_bmv, state.in_prompt_bv, allowed)
  # num_b only where proposals are ragged (n-gram rounds): every other round judges all K.
  ragged = () if num_b is None else (num_b,)
  if k > 0 and spec.coupling == "gumbel":
    n, nxt = gumbel.verify(draft_bn, q_bmv, randomness, *ragged)
  elif k > 0:
    n, nxt = rejection.accept(randomness[:, k], draft_bn, p_bnv, q_bmv, *ragged)
  else:
    n = jnp.zeros((b,), jnp.int32)
    nxt = _pick(spec, randomness[:, 0], q_bmv[:, 0])
  # Roll back: the target keeps last + n accepted drafts, the draft what it fed of those
  # (all but x_K when every draft was accepted); finished rows stay where they are.
  tc = cache_lib.rollback(tc, jnp.where(active, l0 + n + 1, l0), target_traces, l0)
  if k > 0 and spec.draft is not None and spec.source.uses_model:
    dc = cache_lib.rollback(dc, jnp.where(active, jnp.minimum(l0 + n + 1, l0 + k),
                                          state.draft_cache.length), draft_traces, draft_start)
  else:
    dc = state.draft_cache  # K = 0 and n-gram rounds never run a draft; the assistant has no cache
  target_hidden = state.target_hidden_bd
  if hidden:  # the hidden state that produced the new last token: verify position n
    at_n = jnp.take_along_axis(hidden[0], n[:, None, None], axis=1)[:, 0]
    target_hidden = jnp.where(active[:, None], at_n.astype(target_hidden.dtype), target_hidden)
  j = jnp.arange(k + 1)[None, :]
  emitted = jnp.where(j < n[:, None], jnp.pad(draft_bn, ((0, 0), (0, 1))), nxt[:, None])
  kept = jnp.where(active, n + 1, 0)
  tokens = _scatter_rows(state.tokens_bs, l0 + 1, emitted, kept)
  # Emitted token j was verified at position j: q_bmv[:, j] is the law it follows, whether it
  # was an accepted draft, the resample after a rejection or the bonus.
  logprobs = _emitted_logprobs(spec, q_bmv, logits, emitted, state.rows)

  count = kept
  is_eos = _is_eos(spec, emitted) & (j < count[:, None])
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
                accepted_bn=st.accepted_bn + act[:, None] * (jn < n[:, None]),
                ngram_judged_b=st.ngram_judged_b + act * jnp.minimum(n + 1, ngram_b),
                ngram_accepted_b=st.ngram_accepted_b + act * jnp.minimum(n, ngram_b),
                mask_rejected_b=st.mask_rejected_b)
  if refused is not None:
    stats = stats._replace(mask_rejected_b=st.mask_rejected_b + act * refused)
  state = state._replace(target_cache=tc, draft_cache=dc, tokens_bs=tokens, num_out_b=num_out,
                         done_b=done, stats=stats, target_hidden_bd=target_hidden)
  if spec.grammar_states:  # the state the emitted tokens reach: n accepted drafts, then nxt
    g_n = jnp.take_along_axis(g_bm, n[:, None], axis=1)[:, 0]
    state = state._replace(grammar_b=jnp.where(active, _advance(table, g_n, nxt),
                                               state.grammar_b))
  if spec.controls:
    state = state._replace(counts_bv=_count(state.counts_bv, emitted, kept))
  return state, emitted, count, logprobs


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
  if spec.k > 0 and spec.draft is not None and spec.source.uses_model and catch_up:
    state = catch_up_draft(spec, draft_params, state)
  done0 = state.done_b
  w, m = spec.out_len, spec.logprobs_k
  out = Out(tokens_bw=jnp.full((b, w), spec.pad_id, jnp.int32),
            count_b=jnp.zeros((b,), jnp.int32), rounds=jnp.zeros((), jnp.int32),
            logprobs=Logprobs(jnp.zeros((b, w), jnp.float32), jnp.zeros((b, w, m), jnp.int32),
                              jnp.zeros((b, w, m), jnp.float32)))

  def running(carry):
    s, o = carry
    room = jnp.max(jnp.where(s.done_b, 0, o.count_b)) + spec.k + 1 <= spec.out_len
    freed = stop_on_free & jnp.any(s.done_b & ~done0)
    return jnp.any(~s.done_b) & (o.rounds < max_rounds) & room & ~freed

  def one_round(carry):
    s, o = carry
    s, emitted, count, logprobs = round_(spec, target_params, draft_params, s)
    put = lambda buf, values: _scatter_rows(buf, o.count_b, values, count)
    o = Out(tokens_bw=put(o.tokens_bw, emitted), count_b=o.count_b + count,
            rounds=o.rounds + 1, logprobs=jax.tree.map(put, o.logprobs, logprobs))
    return s, o

  return jax.lax.while_loop(running, one_round, (state, out))


def generate(spec: LoopSpec, target_params, draft_params, tokens_bt, lengths_b, temperature,
             top_p, top_k, seed, soft=None, draft_soft=None):
  """Sampler.generate's program: prefill every row, decode to completion. Row i draws from
  stream (seed, i); soft, draft_soft: the prompts' image soft tokens for the target's and a
  multimodal draft's prefill. Returns (tokens b max_new, num_b, Stats)."""
  b = tokens_bt.shape[0]
  max_new = spec.out_len - spec.k  # run_rounds emits max_new - 1; a round needs k + 1 of room
  full = lambda x, dtype: jnp.full((b,), x, dtype)
  seeds = jnp.stack([full(seed, jnp.uint32), jnp.arange(b, dtype=jnp.uint32)], axis=1)
  rows = Rows(full(temperature, jnp.float32), full(top_p, jnp.float32), full(top_k, jnp.int32),
              seeds, full(max_new, jnp.int32))
  state, first, _ = prefill(spec, target_params, draft_params, tokens_bt, lengths_b, rows,
                            with_draft=spec.k > 0, soft=soft, draft_soft=draft_soft)
  # The draft was prefilled with the target and runs every round: it never lags.
  state, out = run_rounds(spec, target_params, draft_params, state, jnp.ones((b,), bool),
                          max_new, False, catch_up=False)
  tokens = jnp.concatenate([first[:, None], out.tokens_bw], axis=1)[:, :max_new]
  num = state.num_out_b
  tokens = jnp.where(jnp.arange(max_new)[None, :] < num[:, None], tokens, spec.pad_id)
  return tokens, num, state.stats
