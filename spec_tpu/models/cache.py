"""Caches: explicit loop state, laid out like the params (spec_tpu/models/layout.py).

    Cache(groups, remainder, length)
      groups[j]     pattern position j of every layer group, each leaf stacked: (l) ...
      remainder[r]  remainder layer r, unstacked
      length        b int32: tokens held per row (positions 0..length-1)

An entry's type follows its layer kind. Attention kinds hold a KVCache, a ring buffer per layer:
global layers get a buffer of the whole context (it never wraps); local (sliding-window) layers
get a ring of `window + spec_tokens` slots, so memory grows with the window, not the context. The
slack of `spec_tokens` slots is what makes rollback a pointer move: a speculative write of up to
`spec_tokens` positions past the kept prefix only overwrites slots whose positions are already
outside every later query's window.

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

from spec_tpu.models.config import GLOBAL, LOCAL, ModelConfig


class KVCache(NamedTuple):
  """Keys and values of an attention layer (local or global), heads-major: a TPU tiles the two
  minor axes, and s e keeps them large (see layers.attend)."""
  k: jax.Array  # (l) b k s e
  v: jax.Array  # (l) b k s e

  @staticmethod
  def logical_axes() -> "KVCache":
    """Logical axes of one layer's leaves (a stacked entry adds a leading 'layers')."""
    kv = ("batch", "kv_heads", "cache_seq", "head_dim")
    return KVCache(k=kv, v=kv)


class Cache(NamedTuple):
  groups: tuple    # P entries, leaves (l ...)
  remainder: tuple  # R entries, unstacked
  length: jax.Array  # b int32


def kind_slots(cfg: ModelConfig, kind: str, max_len: int, spec_tokens: int = 0) -> int:
  """Cache slots of one attention layer: the context if global, window + slack if local."""
  return min(max_len, cfg.sliding_window + spec_tokens) if kind == LOCAL else max_len


def layer_slots(cfg: ModelConfig, max_len: int, spec_tokens: int = 0) -> tuple[int, ...]:
  """Slots per layer, in depth order."""
  return tuple(kind_slots(cfg, kind, max_len, spec_tokens) for kind in cfg.layer_types)


def _layer_cache(cfg: ModelConfig, kind: str, lead: tuple[int, ...], batch: int, max_len: int,
                 spec_tokens: int, dtype):
  """One entry: `lead` is (G,) for a stacked group entry, () for a remainder layer."""
  if kind in (LOCAL, GLOBAL):
    shape = lead + (batch, cfg.num_kv_heads, kind_slots(cfg, kind, max_len, spec_tokens),
                    cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
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
  remainder = tuple(_layer_cache(cfg, pattern[r], (), batch, max_len, spec_tokens, dtype)
                    for r in range(cfg.num_remainder))
  return Cache(groups=groups, remainder=remainder, length=jnp.zeros((batch,), jnp.int32))


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, spec_tokens: int = 0,
                   dtype=None) -> Cache:
  """Shapes and dtypes of `init_cache` without allocating (for AOT compilation)."""
  return jax.eval_shape(lambda: init_cache(cfg, batch, max_len, spec_tokens, dtype))


def logical_axes(cache: Cache) -> Cache:
  """The cache's pytree with a tuple of logical axis names in place of every array."""
  def stacked(axes):
    return jax.tree.map(lambda ax: ("layers",) + ax, axes,
                        is_leaf=lambda x: bool(x) and all(isinstance(a, str) for a in x))
  return Cache(groups=tuple(stacked(type(c).logical_axes()) for c in cache.groups),
               remainder=tuple(type(c).logical_axes() for c in cache.remainder),
               length=("batch",))


def rollback(cache: Cache, length_b) -> Cache:
  """The cache holding only each row's first length_b tokens, after a call that wrote past them
  (rejected speculative tokens). For KV caches this moves the length: later writes overwrite
  the rejected entries, and no query ever sees them (see the module docstring)."""
  return cache._replace(length=length_b)


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

  def put(buf, new):
    return buf.at[at].set(new.astype(buf.dtype), mode="drop")

  return KVCache(k=put(layer.k, k_bkte), v=put(layer.v, v_bkte))


def write_layer(kind: str, entry, update, positions_bt, valid_bt, index=None):
  """One layer's update written into its cache entry (stacked: at layer `index`)."""
  if kind in (LOCAL, GLOBAL):
    return write(entry, update.k, update.v, positions_bt, valid_bt, ring=kind == LOCAL,
                 index=index)
  raise ValueError(f"no cache write for layer kind {kind!r}")
