"""Gemma 4's assistant drafter: a few query-only layers over the TARGET's caches.

The assistant keeps no cache of its own. Each draft step sits at one position, the position
of the last token the target has not yet seen (the target's cache length L): its input is the
concatenation of the target's embedding of that token and a hidden state (the target's final
hidden state that produced the token for the first step, the assistant's own projected state
after), projected to the assistant's width; every layer attends over the target's last cached
local and last cached global layer (keys and values of positions < L, windowed on local
layers), exactly as the target's own layers of that kind would. So every step of a round reads
the same target state and nothing needs rolling back.

Params (model.init_params of an AssistantConfig): {pre_proj (2D d), post_proj (d D), embed (v d, tied unembedding), final_norm (d),
layers: [one kv-shared attention layer per entry, model.py's layout]}, D the target's d_model.
Semantics follow transformers' Gemma4AssistantForCausalLM (its logits are not soft-capped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spec_tpu.kernels import amx
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import layout, model, quant
from spec_tpu.models.config import AssistantConfig, ModelConfig  # noqa: F401 (re-export)


def target_sources(target: ModelConfig) -> dict[str, int]:
  """kind -> the target layer the assistant reads: the last cached layer of the kind."""
  kinds = target.layer_types[:target.num_cached_layers]
  return {kind: max(i for i, k in enumerate(kinds) if k == kind) for kind in set(kinds)}


def _views(target: ModelConfig, cache: cache_lib.Cache) -> dict:
  views = {}
  for kind, i in target_sources(target).items():
    part, j, g = layout.where(target, i)
    entries = cache.groups if part == "groups" else cache.remainder
    views[kind] = model._CacheView(entries[j], g)
  return views


def step(params, acfg: AssistantConfig, target_params, target: ModelConfig,
         cache: cache_lib.Cache, token_b, hidden_bD):
  """One draft step at position cache.length: (float32 logits b v, next hidden b D).
  token_b: the last token (not in the target's cache); hidden_bD: the target's final hidden
  state that produced it (first step) or the previous step's next hidden."""
  cfg = acfg.layers
  b = token_b.shape[0]
  embedded = model._embed(target, target_params, token_b[:, None])
  x = jnp.concatenate([embedded, hidden_bD[:, None].astype(embedded.dtype)], axis=-1)
  x = quant.einsum("btn,nd->btd", x, params["pre_proj"])
  positions = cache.length[:, None]
  # No new keys: every key is the target's. One masked placeholder key stands in for the new
  # block (its position -1 is never visible), so attention's blockwise path has a block to
  # start its running max from.
  ctx = model._Context(positions, jnp.full((b, 1), -1, jnp.int32), jnp.ones((b, 1), bool),
                       cache.length, rope=model._rope_tables(cfg, positions))
  views = _views(target, cache)
  for i, (kind, lp) in enumerate(zip(cfg.layer_types, params["layers"])):
    e, k = cfg.kind_head_dim(kind), cfg.kind_kv_heads(kind)
    none = jnp.zeros((b, k, 1, e), x.dtype)
    x, _, _ = model._layer(cfg, kind, lp, x, ctx, views[kind], i, donor=(none, none))
  h = model._norm(cfg, x, params["final_norm"])
  nxt = quant.einsum("btd,dn->btn", h, params["post_proj"])
  if acfg.centroids:
    return _centroid_logits(params, acfg, h[:, 0]), nxt[:, 0]
  logits = quant.einsum("btd,vd->btv", h, params["embed"], preferred_element_type=jnp.float32)
  return logits[:, 0], nxt[:, 0]


def _centroid_logits(params, acfg: AssistantConfig, h_bd):
  """Logits of the tokens of the centroid_top_k best clusters (AssistantConfig says how the
  rest are set): only those rows of the vocabulary are read."""
  b = h_bd.shape[0]
  scores = jnp.einsum("bd,dc->bc", h_bd, params["centroids"],
                      preferred_element_type=jnp.float32)
  _, best = jax.lax.top_k(scores, acfg.centroid_top_k)
  ids = params["token_order"][best].reshape(b, -1)  # b n: the chosen clusters' tokens
  rows = jnp.take(params["embed"], ids, axis=0)     # b n d
  chosen = jnp.einsum("bd,bnd->bn", h_bd, rows, preferred_element_type=jnp.float32)
  floor = jnp.min(chosen, axis=-1, keepdims=True) - 1.0
  logits = jnp.broadcast_to(floor, (b, acfg.vocab_size))
  return logits.at[jnp.arange(b)[:, None], ids].set(chosen)


def draft(params, acfg: AssistantConfig, target_params, target: ModelConfig,
          cache: cache_lib.Cache, last_b, hidden_bD, keys_bn, propose, carry=None):
  """n draft tokens from the assistant: (tokens b n, the distributions they were drawn from
  b n v). propose(key_b, logits_bv, carry) -> (token_b, p_bv, carry) draws one token (the
  decode loop's filtered sampling, or a one-hot argmax); `carry` is the caller's own state
  from step to step (e.g. token counts of the drafted prefix). Reads the target's cache,
  writes nothing."""
  def one(state, key_b):
    token, hidden, extra = state
    with amx.held_off():  # a loop inside the decode loop: the packing would stay in it
      logits, hidden = step(params, acfg, target_params, target, cache, token, hidden)
    nxt, p, extra = propose(key_b, logits, extra)
    return (nxt, hidden, extra), (nxt, p)

  _, (xs, ps) = jax.lax.scan(one, (last_b, hidden_bD, carry), jnp.moveaxis(keys_bn, 1, 0))
  return jnp.moveaxis(xs, 0, 1), jnp.moveaxis(ps, 0, 1)
