"""Caches: explicit loop state, laid out like the params (spec_tpu/models/layout.py).

    Cache(groups, remainder, length)
      groups[j]     pattern position j of every layer group, each leaf stacked: (l) ...
      remainder[r]  remainder layer r, unstacked
      length        b int32: tokens held per row (positions 0..length-1)

An entry's type follows its layer kind. Recurrent layers (Griffin) hold a RecurrentState
(models/recurrent.py): the float32 RG-LRU state and the conv window, of fixed size; a call
writes the state after each row's real tokens, and rolling back past rejected tokens selects an
earlier state from the call's Traces (`rollback`). Attention kinds hold a KVCache, a ring buffer per layer:
global layers get a buffer of the whole context (it never wraps); local (sliding-window) layers
get a ring of `window + spec_tokens` slots, so memory grows with the window, not the context. The
slack of `spec_tokens` slots is what makes rollback a pointer move: a speculative write of up to
`spec_tokens` positions past the kept prefix only overwrites slots whose positions are already
outside every later query's window.

Attention entries take their kind's head size and KV heads (Gemma 4: two cache shapes, local
and global). Kv-shared layers (Gemma 4's tail) have no entry: they read their donor's.

The position held by slot s of a ring of R slots, for a row whose cache holds `length` tokens, is
the largest p < length with p = s (mod R); p < 0 means the slot is empty.

A forward call carries the stacked entries through the layer scan: the layer at group g reads
its slice, returns its update (for attention, the new tokens' keys and values) and `write_layer`
puts that into the carried buffer at index g, in place. (Stacking the updates as scan outputs and
writing after the scan costs a buffer of every layer's new tokens, 0.3 GiB per device for a
70B prefill; passing the caches as scan inputs and outputs makes XLA copy them whole.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.models import layout, recurrent
from spec_tpu.models.config import GLOBAL, LOCAL, RECURRENT, ModelConfig


class KVCache(NamedTuple):
  """Keys and values of an attention layer (local or global), heads-major: a TPU tiles the two
  minor axes, and s e keeps them large (see layers.attend). A bfloat16 cache holds the values'
  bit patterns as uint16 (`stored_dtype`; `values` reads them back as bfloat16)."""
  k: jax.Array  # (l) b k s e
  v: jax.Array  # (l) b k s e

  @staticmethod
  def logical_axes() -> "KVCache":
    """Logical axes of one layer's leaves (a stacked entry adds a leading 'layers')."""
    kv = ("batch", "kv_heads", "cache_seq", "head_dim")
    return KVCache(k=kv, v=kv)


def stored_dtype(dtype):
  """What a KV cache of this value dtype stores: bfloat16 as its uint16 bit patterns. A write
  then scatters integers: XLA:CPU scatters a bfloat16 array by converting all of it to float32
  and back, or, given a uint16 view, by materialising that view, both a pass over the whole
  (stacked) cache per layer per step however few tokens are written. Stored as bits, a step
  costs what its tokens cost (README "Context length"); a bitcast is free on every platform,
  and only the blocks attention reads are cast back. (A float16 cache, which no preset uses,
  stores floats: on CPU its writes pass over the whole cache.)"""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 else dtype


def values(a):
  """Cache contents as values: uint16 bit patterns read back as the bfloat16 they hold."""
  return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


class Cache(NamedTuple):
  groups: tuple    # P entries, leaves (l ...)
  remainder: tuple  # R entries, unstacked
  length: jax.Array  # b int32


class Traces(NamedTuple):
  """What a forward call (model.forward(..., traces=True)) leaves for `rollback`, laid out like
  the cache: a recurrent.Trace (stacked (l ...) in groups) per recurrent entry, None for the
  other kinds (their rollback is a length move)."""
  groups: tuple
  remainder: tuple


def kind_slots(cfg: ModelConfig, kind: str, max_len: int, spec_tokens: int = 0) -> int:
  """Cache slots of one attention layer: the context if global, window + slack if local."""
  return min(max_len, cfg.sliding_window + spec_tokens) if kind == LOCAL else max_len


def layer_slots(cfg: ModelConfig, max_len: int, spec_tokens: int = 0) -> tuple[int, ...]:
  """Slots per cached layer, in depth order (kv-shared layers have no cache of their own)."""
  return tuple(kind_slots(cfg, kind, max_len, spec_tokens)
               for kind in cfg.layer_types[:cfg.num_cached_layers])


def _layer_cache(cfg: ModelConfig, kind: str, lead: tuple[int, ...], batch: int, max_len: int,
                 spec_tokens: int, dtype):
  """One entry: `lead` is (G,) for a stacked group entry, () for a remainder layer."""
  if kind in (LOCAL, GLOBAL):
    shape = lead + (batch, cfg.kind_kv_heads(kind), kind_slots(cfg, kind, max_len, spec_tokens),
                    cfg.kind_head_dim(kind))
    store = stored_dtype(dtype)
    return KVCache(k=jnp.zeros(shape, store), v=jnp.zeros(shape, store))
  if kind == RECURRENT:
    w, c = cfg.recurrent_width, cfg.conv1d_width
    return recurrent.RecurrentState(h=jnp.zeros(lead + (batch, w), jnp.float32),
                                    conv=jnp.zeros(lead + (batch, c - 1, w), dtype))
  raise ValueError(f"no cache for layer kind {kind!r}")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, spec_tokens: int = 0,
               dtype=None) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens.

  spec_tokens: the most tokens one call writes past the prefix that is finally kept (K + 1 for
  speculative verification). Zero is right for plain autoregressive decoding.
  """
  if max_len <= 0 or batch <= 0:
    raise ValueError(f"cache needs positive batch and max_len, got {batch}, {max_len}")
  dtype = jnp.dtype(dtype or cfg.dtype)
  pattern = cfg.layer_pattern
  groups = tuple(_layer_cache(cfg, kind, (cfg.num_groups,), batch, max_len, spec_tokens, dtype)
                 for kind in pattern) if cfg.num_groups else ()
  remainder = tuple(_layer_cache(cfg, layout.remainder_kind(cfg, r), (), batch, max_len,
                                 spec_tokens, dtype) for r in range(cfg.num_remainder))
  return Cache(groups=groups, remainder=remainder, length=jnp.zeros((batch,), jnp.int32))


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, spec_tokens: int = 0,
                   dtype=None) -> Cache:
  """Shapes and dtypes of `init_cache` without allocating (for AOT compilation)."""
  return jax.eval_shape(lambda: init_cache(cfg, batch, max_len, spec_tokens, dtype))


def logical_axes(cache: Cache) -> Cache:
  """The cache's pytree with a tuple of logical axis names in place of every array."""
  def stacked(axes):
    return jax.tree.map(lambda ax: ("layers",) + ax, axes,
                        is_leaf=_is_axes)
  return Cache(groups=tuple(stacked(type(c).logical_axes()) for c in cache.groups),
               remainder=tuple(type(c).logical_axes() for c in cache.remainder),
               length=("batch",))


def rollback(cache: Cache, length_b, traces: Traces | None = None, start_b=None) -> Cache:
  """The cache holding only each row's first length_b tokens, after a call that wrote past them
  (rejected speculative tokens). For KV caches this moves the length: later writes overwrite
  the rejected entries, and no query ever sees them (see the module docstring).

  Recurrent entries cannot be un-updated, so they need the traces of the call (or calls, see
  recurrent.steps_trace) that wrote the rejected tokens, whose first traced position is
  start_b: each entry becomes the traced state after length_b - start_b positions (clipped to
  the traced span), one gather per layer, no recompute. Without traces a model with recurrent
  layers can only roll back to where its last call ended (length moves alone)."""
  if traces is not None:
    def pick(entry, trace, stacked):
      if trace is None or trace.h.shape[-2] == 0:
        return entry
      kept_b = jnp.clip(length_b - start_b, 0, trace.h.shape[-2])
      select = recurrent.select
      if stacked:
        select = jax.vmap(select, in_axes=(0, None))
      state = select(trace, kept_b)
      return jax.tree.map(lambda old, new: new.astype(old.dtype), entry, state)
    cache = cache._replace(
        groups=tuple(pick(e, t, True) for e, t in zip(cache.groups, traces.groups)),
        remainder=tuple(pick(e, t, False) for e, t in zip(cache.remainder, traces.remainder)))
  return cache._replace(length=length_b)


def recurrent_entries(cache: Cache) -> Traces:
  """The cache's recurrent entries (None elsewhere), laid out as Traces: what a recurrent
  draft's step scan stacks to build its traces (recurrent.steps_trace)."""
  pick = lambda e: e if isinstance(e, recurrent.RecurrentState) else None  # noqa: E731
  return Traces(tuple(map(pick, cache.groups)), tuple(map(pick, cache.remainder)))


def steps_traces(first: Traces, steps: Traces) -> Traces:
  """Traces of single-token steps (recurrent.steps_trace per entry): `first` the recurrent
  entries after the call before the steps, `steps` the same after every step, stacked."""
  def one(f, s):
    return None if f is None else recurrent.steps_trace(f, s)
  return Traces(tuple(map(one, first.groups, steps.groups)),
                tuple(map(one, first.remainder, steps.remainder)))


def insert_rows(cache: Cache, rows: Cache, slots) -> Cache:
  """The cache with row i of `rows` (freshly prefilled, same max_len and spec_tokens, r rows)
  written over row slots[i] of `cache` (slots: r), or over each of rows slots[i, :] (slots:
  r n, one prompt's prefill shared by n rows), everything held there before (buffers and
  length) replaced. A slot >= the batch drops its row, so a fixed-width insert can carry
  padding rows. Rows not named are untouched; under jit with `cache` donated this updates it
  in place. Each leaf's batch axis comes from its logical axes (stacked entries lead with
  'layers')."""
  def put(axes, old, new):
    b = axes.index("batch")
    at = (slice(None),) * b + (slots,)
    if slots.ndim == 2:  # row i to n slots: the index's r n axes stand where the batch was
      new = jnp.broadcast_to(jnp.expand_dims(new, b + 1),
                             new.shape[:b + 1] + slots.shape[1:] + new.shape[b + 1:])
    return old.at[at].set(new.astype(old.dtype), mode="drop")
  return jax.tree.map(put, logical_axes(cache), cache, rows, is_leaf=_is_axes)


def _is_axes(x) -> bool:
  # None names an unsharded axis (a recurrent state's conv taps).
  return isinstance(x, tuple) and bool(x) and all(a is None or isinstance(a, str) for a in x)


def slot_positions(length_b, num_slots: int, slots_s=None):
  """b s: the position each slot holds for rows holding `length` tokens (< 0: empty); of the
  given slots (default: all num_slots of them)."""
  slots = jnp.arange(num_slots) if slots_s is None else slots_s
  last = length_b[:, None] - 1
  return last - jnp.mod(last - slots[None, :], num_slots)


def write(layer: KVCache, k_bkte, v_bkte, positions_bt, valid_bt, ring: bool,
          index=None) -> KVCache:
  """Writes the valid new tokens into their slots. Rows sit at their own positions (ragged
  prompts, ragged acceptance), so this is a scatter rather than a dynamic_update_slice: one
  scatter per array, indexed by row, head and slot, each head's e values contiguous. With
  `index`, `layer` is a stacked entry (l b k s e) and the new tokens are layer `index`'s."""
  b, num_heads, num_slots = layer.k.shape[-4:-1]
  t = k_bkte.shape[-2]
  slot = jnp.mod(positions_bt, num_slots) if ring else positions_bt
  # A chunk longer than the ring overwrites its own early tokens: keep only the last num_slots
  # valid ones, so no two writes of one scatter hit the same slot.
  num_valid = jnp.sum(valid_bt, axis=1, keepdims=True)
  keep = valid_bt & (jnp.arange(t)[None, :] >= num_valid - num_slots)
  slot = jnp.where(keep, slot, num_slots)  # out of range: dropped
  at = (jnp.arange(b)[:, None, None], jnp.arange(num_heads)[None, :, None], slot[:, None, :])
  if index is not None:
    at = (index,) + at

  return KVCache(k=_scatter_set(layer.k, at, k_bkte), v=_scatter_set(layer.v, at, v_bkte))


def _scatter_set(buf, at, new):
  """buf.at[at].set(new), dropping out-of-range indices; a uint16 buffer (bfloat16 stored as
  bits, `stored_dtype`) gets new's bfloat16 bit patterns.

  """
  if buf.dtype == jnp.uint16:
    new = jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), jnp.uint16)
  return buf.at[at].set(new.astype(buf.dtype), mode="drop")


def write_layer(kind: str, entry, update, positions_bt, valid_bt, index=None):
  """One layer's update written into its cache entry (stacked: at layer `index`)."""
  if kind in (LOCAL, GLOBAL):
    return write(entry, update.k, update.v, positions_bt, valid_bt, ring=kind == LOCAL,
                 index=index)
  if kind == RECURRENT:
    # The state after each row's real tokens; a rollback may later select an earlier one.
    state = recurrent.select(update, jnp.sum(valid_bt, axis=1).astype(jnp.int32))
    if index is None:
      return jax.tree.map(lambda old, new: new.astype(old.dtype), entry, state)
    return jax.tree.map(lambda old, new: old.at[index].set(new.astype(old.dtype)), entry, state)
  raise ValueError(f"no cache write for layer kind {kind!r}")
