"""KV caches: explicit loop state, one ring buffer per layer.

Global layers get a buffer of the whole context (it never wraps); local (sliding-window) layers get
a ring of `window + spec_tokens` slots, so memory grows with the window, not the context. The slack
of `spec_tokens` slots is what makes rollback a pointer move: a speculative write of up to
`spec_tokens` positions past the kept prefix only overwrites slots whose positions are already
outside every later query's window.

The position held by slot s of a ring of R slots, for a row whose cache holds `length` tokens, is
the largest p < length with p = s (mod R); p < 0 means the slot is empty.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.models.config import LOCAL, ModelConfig


class LayerCache(NamedTuple):
  k: jax.Array  # b s k e
  v: jax.Array  # b s k e


class Cache(NamedTuple):
  layers: tuple[LayerCache, ...]
  length: jax.Array  # b int32: tokens held per row (positions 0..length-1)


def layer_slots(cfg: ModelConfig, max_len: int, spec_tokens: int = 0) -> tuple[int, ...]:
  """Slots per layer: the context for global layers, window + slack for local ones."""
  return tuple(min(max_len, cfg.sliding_window + spec_tokens) if kind == LOCAL else max_len
               for kind in cfg.layer_types)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, spec_tokens: int = 0,
               dtype=None) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens.

  spec_tokens: the most tokens one call writes past the prefix that is finally kept (K + 1 for
  speculative verification). Zero is right for plain autoregressive decoding.
  """
  if max_len <= 0 or batch <= 0:
    raise ValueError(f"cache needs positive batch and max_len, got {batch}, {max_len}")
  dtype = jnp.dtype(dtype or cfg.dtype)
  layers = tuple(
      LayerCache(k=jnp.zeros((batch, s, cfg.num_kv_heads, cfg.head_dim), dtype),
                 v=jnp.zeros((batch, s, cfg.num_kv_heads, cfg.head_dim), dtype))
      for s in layer_slots(cfg, max_len, spec_tokens))
  return Cache(layers=layers, length=jnp.zeros((batch,), jnp.int32))


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, spec_tokens: int = 0,
                   dtype=None) -> Cache:
  """Shapes and dtypes of `init_cache` without allocating (for AOT compilation)."""
  return jax.eval_shape(lambda: init_cache(cfg, batch, max_len, spec_tokens, dtype))


def rollback(cache: Cache, length_b) -> Cache:
  """The cache holding only each row's first length_b tokens, after a call that wrote past them
  (rejected speculative tokens). For KV caches this moves the length: later writes overwrite
  the rejected entries, and no query ever sees them (see the module docstring)."""
  return cache._replace(length=length_b)


def insert_rows(cache: Cache, rows: Cache, slots_r) -> Cache:
  """The cache with row i of `rows` (freshly prefilled, same max_len and spec_tokens, r rows)
  written over row slots_r[i] of `cache`, everything held there before (buffers and length)
  replaced. A slot >= the batch drops its row, so a fixed-width insert can carry padding rows.
  Rows not named are untouched; under jit with `cache` donated this updates it in place.
  (Batch is axis 0 of every buffer in this layout.)"""
  return jax.tree.map(lambda old, new: old.at[slots_r].set(new.astype(old.dtype), mode="drop"),
                      cache, rows)


def slot_positions(length_b, num_slots: int):
  """b s: the position each slot holds for rows holding `length` tokens (< 0: empty)."""
  last = length_b[:, None] - 1
  return last - jnp.mod(last - jnp.arange(num_slots)[None, :], num_slots)


def write(layer: LayerCache, k_btke, v_btke, positions_bt, valid_bt, ring: bool) -> LayerCache:
  """Writes the valid new tokens into their slots; a scatter per row (rows sit at their own
  positions, so one dynamic_update_slice cannot serve a ragged batch)."""
  num_slots = layer.k.shape[1]
  t = k_btke.shape[1]
  slot = jnp.mod(positions_bt, num_slots) if ring else positions_bt
  # A chunk longer than the ring overwrites its own early tokens: keep only the last num_slots
  # valid ones, so no two writes of one scatter hit the same slot.
  num_valid = jnp.sum(valid_bt, axis=1, keepdims=True)
  keep = valid_bt & (jnp.arange(t)[None, :] >= num_valid - num_slots)
  slot = jnp.where(keep, slot, num_slots)  # out of range: dropped

  def row(buf, idx, new):
    return buf.at[idx].set(new.astype(buf.dtype), mode="drop")

  return LayerCache(k=jax.vmap(row)(layer.k, slot, k_btke), v=jax.vmap(row)(layer.v, slot, v_btke))
