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
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from spec_tpu.models.config import ModelConfig


def where(cfg: ModelConfig, i: int) -> tuple[str, int, int | None]:
  """("groups", j, g) or ("remainder", r, None) for layer i."""
  if not 0 <= i < cfg.num_layers:
    raise IndexError(f"layer {i} of a {cfg.num_layers}-layer model")
  p = len(cfg.layer_pattern)
  if i < cfg.num_groups * p:
    return "groups", i % p, i // p
  return "remainder", i - cfg.num_groups * p, None


def layer(cfg: ModelConfig, groups: Sequence, remainder: Sequence, i: int):
  """Layer i's own (unstacked) pytree, from the groups and remainder of params or a cache."""
  part, idx, g = where(cfg, i)
  if part == "remainder":
    return remainder[idx]
  return jax.tree.map(lambda a: a[g], groups[idx])


def stack(cfg: ModelConfig, layers: Sequence[Any], stack_fn: Callable) -> tuple[list, list]:
  """(groups, remainder) from per-layer pytrees in depth order; stack_fn(list of arrays) makes
  one leaf (jnp.stack, np.stack, or anything that builds the stacked array)."""
  if len(layers) != cfg.num_layers:
    raise ValueError(f"{len(layers)} layers for a {cfg.num_layers}-layer config")
  p, n = len(cfg.layer_pattern), cfg.num_groups * len(cfg.layer_pattern)
  groups = [jax.tree.map(lambda *xs: stack_fn(list(xs)), *layers[j:n:p])
            for j in range(p)] if cfg.num_groups else []
  return groups, list(layers[n:])


def unstack(cfg: ModelConfig, groups: Sequence, remainder: Sequence) -> list:
  """Per-layer pytrees in depth order (the inverse of stack)."""
  return [layer(cfg, groups, remainder, i) for i in range(cfg.num_layers)]


def regroup(params: dict, src: ModelConfig, dst: ModelConfig, stack_fn: Callable) -> dict:
  """The same layers grouped for another config's pattern (layer shapes must agree), e.g. a
  draft made from a target's layers but run with other layer kinds."""
  layers = unstack(src, params["groups"], params["remainder"])
  groups, remainder = stack(dst, layers, stack_fn)
  return dict(params, groups=groups, remainder=remainder)
