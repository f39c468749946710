"""Where layer i lives in the params and cache pytrees: layers grouped by period of the pattern.

num_layers = G * P + R, with P = len(cfg.layer_pattern), G = cfg.num_groups whole periods and
R = cfg.num_remainder layers left over. Both pytrees hold
  groups     P entries; entry j is pattern position j (kind layer_pattern[j]) of every group,
             each leaf stacked over the groups: a leading axis l of size G (empty list if G = 0)
  remainder  R entries; entry r is layer G * P + r (kind layer_pattern[r]), unstacked
so layer i = g * P + j sits at groups[j][g] (every leaf indexed at g) and layer G * P + r at
remainder[r]. The decoder scans over g with one group's code in the body, so compile time does
not grow with depth; entries of different kinds are different pytrees (their own params and
cache leaves), which is why a group is a list of P entries and not one stacked layer.

With kv-shared layers (cfg.kv_shared_layers, Gemma 4), the above covers the cached layers only
(num_layers minus the tail; the last whole period of them sits in the remainder, see
ModelConfig.num_groups), and the params add the tail laid out the same way from its own phase
(cfg.shared_pattern):
  shared_groups     P entries, leaves stacked over cfg.num_shared_groups
  shared_remainder  cfg.num_shared_remainder entries
The cache has no entries for the tail: its layers read their donors' caches.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from spec_tpu.models.config import ModelConfig


def where(cfg: ModelConfig, i: int) -> tuple[str, int, int | None]:
  """("groups", j, g) or ("remainder", r, None) for layer i; ("shared_groups", j, g) or
  ("shared_remainder", r, None) for a kv-shared layer."""
  if not 0 <= i < cfg.num_layers:
    raise IndexError(f"layer {i} of a {cfg.num_layers}-layer model")
  p = len(cfg.layer_pattern)
  if i >= cfg.num_cached_layers:
    s = i - cfg.num_cached_layers
    if s < cfg.num_shared_groups * p:
      return "shared_groups", s % p, s // p
    return "shared_remainder", s - cfg.num_shared_groups * p, None
  if i < cfg.num_groups * p:
    return "groups", i % p, i // p
  return "remainder", i - cfg.num_groups * p, None


def remainder_kind(cfg: ModelConfig, r: int) -> str:
  """The kind of remainder entry r."""
  return cfg.layer_types[cfg.num_groups * len(cfg.layer_pattern) + r]


def layer_params(cfg: ModelConfig, params: dict, i: int):
  """Layer i's own (unstacked) params, from any part of the params."""
  part, j, g = where(cfg, i)
  entry = params[part][j]
  return entry if g is None else jax.tree.map(lambda a: a[g], entry)


def stack_params(cfg: ModelConfig, layers: Sequence[Any], stack_fn: Callable) -> dict:
  """{groups, remainder[, shared_groups, shared_remainder]} from every layer's params in depth
  order (`stack` for the cached layers, the same for the kv-shared tail)."""
  if len(layers) != cfg.num_layers:
    raise ValueError(f"{len(layers)} layers for a {cfg.num_layers}-layer config")
  n = cfg.num_cached_layers
  groups, remainder = stack(cfg, layers[:n], stack_fn)
  out = {"groups": groups, "remainder": remainder}
  if cfg.kv_shared_layers:
    p, m = len(cfg.layer_pattern), cfg.num_shared_groups * len(cfg.layer_pattern)
    tail = layers[n:]
    out["shared_groups"] = [jax.tree.map(lambda *xs: stack_fn(list(xs)), *tail[j:m:p])
                            for j in range(p)] if cfg.num_shared_groups else []
    out["shared_remainder"] = list(tail[m:])
  return out


def layer(cfg: ModelConfig, groups: Sequence, remainder: Sequence, i: int):
  """Layer i's own (unstacked) pytree, from the groups and remainder of params or a cache."""
  part, idx, g = where(cfg, i)
  if part == "remainder":
    return remainder[idx]
  return jax.tree.map(lambda a: a[g], groups[idx])


def stack(cfg: ModelConfig, layers: Sequence[Any], stack_fn: Callable) -> tuple[list, list]:
  """(groups, remainder) from the cached layers' pytrees in depth order; stack_fn(list of
  arrays) makes one leaf (jnp.stack, np.stack, or anything that builds the stacked array)."""
  if len(layers) != cfg.num_cached_layers:
    raise ValueError(f"{len(layers)} layers for a config with {cfg.num_cached_layers} cached "
                     "layers")
  p, n = len(cfg.layer_pattern), cfg.num_groups * len(cfg.layer_pattern)
  groups = [jax.tree.map(lambda *xs: stack_fn(list(xs)), *layers[j:n:p])
            for j in range(p)] if cfg.num_groups else []
  return groups, list(layers[n:])


def unstack(cfg: ModelConfig, groups: Sequence, remainder: Sequence) -> list:
  """Per-layer pytrees of the cached layers in depth order (the inverse of stack)."""
  return [layer(cfg, groups, remainder, i) for i in range(cfg.num_cached_layers)]


def regroup(params: dict, src: ModelConfig, dst: ModelConfig, stack_fn: Callable) -> dict:
  """The same layers grouped for another config's pattern (layer shapes must agree), e.g. a
  draft made from a target's layers but run with other layer kinds."""
  if src.kv_shared_layers or dst.kv_shared_layers:
    raise ValueError("regroup does not move kv-shared layers")
  layers = unstack(src, params["groups"], params["remainder"])
  groups, remainder = stack(dst, layers, stack_fn)
  return dict(params, groups=groups, remainder=remainder)
