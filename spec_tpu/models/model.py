"""The one decoder: every model family is this code plus a ModelConfig.

Layers run one period of cfg.layer_pattern at a time (a group: Llama/Chinchilla one layer,
Gemma 2 local + global, Gemma 3 five local + one global) under one jax.lax.scan over the groups,
so the compiled program holds one group's code whatever the depth; the layers after the last
whole period (the remainder) run after the scan. Inside a group, each pattern position calls the
code of its layer KIND (`_layer`), with that kind's own params and cache pytrees.

Params are a plain pytree (layout.py says where layer i sits):
  embed (v d); unembed (d v) when not tied; final_norm (d);
  with per-layer embeddings (Gemma 4, cfg.ple_dim = p): ple_embed (v l*p), ple_proj (d l*p),
  ple_proj_norm (p);
  groups: [P entries], entry j = a layer of kind layer_pattern[j], every leaf with a leading
          l axis over the G groups (an empty list when G = 0);
  remainder: [R entries], entry r = layer G * P + r (kind layer_pattern[r]), unstacked.
An attention layer (kinds local and global) is
  {attn_norm (d), attn: {q (h d e), k (k d e), v (k d e), o (h e d), [q_norm (e), k_norm (e)]},
   [post_attn_norm (d)], ffw_norm (d), ffw: {[gate (d f)], up (d f), down (f d)},
   [post_ffw_norm (d)]}
where e and k are the layer kind's (cfg.kind_head_dim, cfg.kind_kv_heads); Gemma 4 adds
[ple_gate (d p), ple_out (p d), ple_norm (d)] and [layer_scalar (1)], drops attn.v on global
layers with global_k_eq_v, and its kv-shared layers (params shared_groups, shared_remainder)
have no attn.k, attn.v, attn.k_norm and an ffw of kv_shared_ffw_dim;
with, for RecurrentGemma (config fields attn_out_bias, ffw_bias), attn.o_bias (d) and ffw
{gate, gate_bias (f), up, up_bias (f), down, down_bias (d)}. A recurrent layer (kind recurrent) is
  {recurrent_norm (d), recurrent: models/recurrent.py's block params, ffw_norm (d), ffw}
the layout spec_tpu.checkpoints.recurrent_convert produces per layer.
With cfg.vision (Gemma 3's image input), params["vision"] holds the image encoder and projector
(models/vision/siglip.py); never quantized.
With cfg.quantize = "int8", every matmul weight (and a tied embedding table) is instead
{"w": int8 of the same shape, "scale": float32 over its output axes} (models/quant.py; a stacked
entry's scale keeps the leading l axis), and every matmul goes through quant.einsum, which takes
either form.
"""

from __future__ import annotations

import contextlib

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.kernels import amx
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import layers
from spec_tpu.models import layout
from spec_tpu.models import quant, recurrent
from spec_tpu.models.vision import siglip
from spec_tpu.models.config import GLOBAL, LOCAL, RECURRENT, AssistantConfig, ModelConfig

F32 = jnp.float32
# Caches longer than this are read block by block, only as far as the fullest row has filled
# them (layers.attend_filled); shorter ones in one piece.
ATTENTION_BLOCK = 512
# Forward calls of at most this many tokens (b t: decode, verification) share one RoPE table
# per attention kind across their layers (_rope_tables).
ROPE_TABLE_MAX_TOKENS = 1024


def _normal(key, shape, fan_in, dtype):
  return (jax.random.normal(key, shape, F32) / math.sqrt(fan_in)).astype(dtype)


def _norm_init(cfg: ModelConfig, dtype, size=None):
  # Gemma norms multiply by (1 + scale): zero is the identity there.
  return jnp.full((size or cfg.d_model,), 0.0 if cfg.norm_plus_one else 1.0, dtype)


def _init_ffw(cfg: ModelConfig, key, dtype, ffw_dim: int | None = None) -> dict:
  d, f = cfg.d_model, ffw_dim or cfg.ffw_dim
  keys = iter(jax.random.split(key, 3))
  ffw = {"up": _normal(next(keys), (d, f), d, dtype), "down": _normal(next(keys), (f, d), f, dtype)}
  if cfg.ffw_activation != "gelu":
    ffw["gate"] = _normal(next(keys), (d, f), d, dtype)
  if cfg.ffw_bias:
    ffw.update({name + "_bias": jnp.zeros((ffw[name].shape[-1],), dtype) for name in list(ffw)})
  return ffw


def _init_recurrent_layer(cfg: ModelConfig, key, dtype) -> dict:
  k_block, k_ffw = jax.random.split(key)
  return {"recurrent_norm": _norm_init(cfg, dtype),
          "recurrent": recurrent.init_params(k_block, cfg.d_model, cfg.recurrent_width,
                                             cfg.num_heads, cfg.conv1d_width, dtype),
          "ffw_norm": _norm_init(cfg, dtype), "ffw": _init_ffw(cfg, k_ffw, dtype)}


def _init_attention_layer(cfg: ModelConfig, kind: str, key, dtype, kv_shared: bool) -> dict:
  d, h, k, e = cfg.d_model, cfg.num_heads, cfg.kind_kv_heads(kind), cfg.kind_head_dim(kind)
  keys = iter(jax.random.split(key, 9))
  normal = lambda shape, fan_in: _normal(next(keys), shape, fan_in, dtype)  # noqa: E731
  # Heads-major projections (as the gemma library's q_einsum): a TPU tiles the two minor axes,
  # and d e keeps them large where d h e would pad a few heads per device and make XLA relayout
  # (copy) every projection weight at every step.
  attn = {"q": normal((h, d, e), d), "k": normal((k, d, e), d), "v": normal((k, d, e), d),
          "o": normal((h, e, d), h * e)}
  if cfg.qk_norm:
    attn["q_norm"] = _norm_init(cfg, dtype, e)
    attn["k_norm"] = _norm_init(cfg, dtype, e)
  if cfg.attn_out_bias:
    attn["o_bias"] = jnp.zeros((d,), dtype)
  if kind == GLOBAL and cfg.global_k_eq_v:
    del attn["v"]
  if kv_shared:  # queries only: keys and values come from the donor's cache
    for name in ("k", "v", "k_norm"):
      attn.pop(name, None)
  ffw_dim = cfg.kv_shared_ffw_dim if kv_shared else None
  layer = {"attn_norm": _norm_init(cfg, dtype), "attn": attn, "ffw_norm": _norm_init(cfg, dtype),
           "ffw": _init_ffw(cfg, next(keys), dtype, ffw_dim)}
  if cfg.post_attn_norm:
    layer["post_attn_norm"] = _norm_init(cfg, dtype)
  if cfg.post_ffw_norm:
    layer["post_ffw_norm"] = _norm_init(cfg, dtype)
  if cfg.ple_dim:
    layer["ple_gate"] = _normal(next(keys), (d, cfg.ple_dim), d, dtype)
    layer["ple_out"] = _normal(next(keys), (cfg.ple_dim, d), cfg.ple_dim, dtype)
    layer["ple_norm"] = _norm_init(cfg, dtype)
  if cfg.layer_scalar:
    layer["layer_scalar"] = jnp.ones((1,), dtype)
  return layer


def init_layer(cfg: ModelConfig, kind: str, key, dtype, kv_shared: bool = False) -> dict:
  """Random params of one layer of the given kind (unstacked); kv_shared: a layer that reads
  its donor's cache (no k/v weights)."""
  if kind in (LOCAL, GLOBAL):
    return _init_attention_layer(cfg, kind, key, dtype, kv_shared)
  if kind == RECURRENT:
    return _init_recurrent_layer(cfg, key, dtype)
  raise ValueError(f"no params for layer kind {kind!r}")


def _init_assistant_params(acfg: AssistantConfig, key, dtype=None) -> dict:
  """The assistant drafter's random params (models/assistant.py runs them)."""
  cfg = acfg.layers
  dtype = jnp.dtype(dtype or cfg.dtype)
  keys = jax.random.split(key, cfg.num_layers + 3)
  d, big = cfg.d_model, acfg.backbone_d_model
  params = {"pre_proj": _normal(keys[0], (2 * big, d), 2 * big, dtype),
            "post_proj": _normal(keys[1], (d, big), d, dtype),
            "embed": _normal(keys[2], (cfg.vocab_size, d), d, dtype),
            "final_norm": _norm_init(cfg, dtype),
            "layers": [init_layer(cfg, kind, keys[3 + i], dtype, kv_shared=True)
                       for i, kind in enumerate(cfg.layer_types)]}
  if acfg.centroids:
    c = acfg.centroids
    params["centroids"] = _normal(jax.random.fold_in(key, 1), (d, c), d, dtype)
    params["token_order"] = jax.random.permutation(
        jax.random.fold_in(key, 2), cfg.vocab_size).astype(jnp.int32).reshape(c, -1)
  return params


def _assistant_logical_axes(acfg: AssistantConfig) -> dict:
  """Logical axes of _init_assistant_params' tree."""
  cfg = acfg.layers
  return {"pre_proj": ("embed", None), "post_proj": (None, "embed"), "embed": ("vocab", "embed"),
          "final_norm": ("embed",),
          "layers": [layer_logical_axes(cfg, kind, kv_shared=True)
                     for kind in cfg.layer_types],
          **({"centroids": ("embed", None), "token_order": (None, None)}
             if acfg.centroids else {})}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=None) -> dict:
  """Random params (scaled normal), for tests and for training from scratch (an
  AssistantConfig: the assistant drafter's, models/assistant.py)."""
  if isinstance(cfg, AssistantConfig):
    return _init_assistant_params(cfg, key, dtype)
  dtype = jnp.dtype(dtype or cfg.dtype)
  d, v = cfg.d_model, cfg.vocab_size
  keys = jax.random.split(key, cfg.num_layers + 2)  # one per layer: kinds draw what they need
  params = {"embed": _normal(keys[0], (v, d), d, dtype), "final_norm": _norm_init(cfg, dtype)}
  if not cfg.tie_embeddings:
    params["unembed"] = _normal(keys[1], (d, v), d, dtype)
  p, n = len(cfg.layer_pattern), cfg.num_groups * len(cfg.layer_pattern)
  # Stacked entries are made stacked (vmap over the groups' keys), not stacked after the fact.
  params["groups"] = [
      jax.vmap(lambda k, kind=kind: init_layer(cfg, kind, k, dtype))(keys[2 + j:2 + n:p])
      for j, kind in enumerate(cfg.layer_pattern)] if cfg.num_groups else []
  params["remainder"] = [init_layer(cfg, layout.remainder_kind(cfg, r), keys[2 + n + r], dtype)
                         for r in range(cfg.num_remainder)]
  if cfg.vision is not None:
    params["vision"] = siglip.init_params(cfg.vision, d, jax.random.fold_in(key, 1), dtype)
  if cfg.kv_shared_layers:
    first, shared = 2 + cfg.num_cached_layers, cfg.shared_pattern
    m = cfg.num_shared_groups * p
    params["shared_groups"] = [
        jax.vmap(lambda k, kind=kind: init_layer(cfg, kind, k, dtype, True))(
            keys[first + j:first + m:p])
        for j, kind in enumerate(shared)] if cfg.num_shared_groups else []
    params["shared_remainder"] = [init_layer(cfg, shared[r], keys[first + m + r], dtype, True)
                                  for r in range(cfg.num_shared_remainder)]
  if cfg.ple_dim:
    k_embed, k_proj = jax.random.split(keys[1])
    width = cfg.num_layers * cfg.ple_dim
    params["ple_embed"] = _normal(k_embed, (cfg.ple_vocab_size or v, width), cfg.ple_dim, dtype)
    params["ple_proj"] = _normal(k_proj, (d, width), d, dtype)
    params["ple_proj_norm"] = _norm_init(cfg, dtype, cfg.ple_dim)
  if cfg.quantize:
    params = quantize(params, cfg)
  return params


def layer_logical_axes(cfg: ModelConfig, kind: str, kv_shared: bool = False) -> dict:
  """Logical axes of one (unstacked) layer's params of the given kind (kv_shared: a layer that
  reads its donor's cache, without k/v weights)."""
  if kind not in (LOCAL, GLOBAL, RECURRENT):
    raise ValueError(f"no logical axes for layer kind {kind!r}")
  ffw = {"up": ("embed", "ffw"), "down": ("ffw", "embed")}
  if cfg.ffw_activation != "gelu":
    ffw["gate"] = ("embed", "ffw")
  if cfg.ffw_bias:
    ffw.update({name + "_bias": axes[-1:] for name, axes in list(ffw.items())})
  if kind == RECURRENT:
    return {"recurrent_norm": ("embed",), "recurrent": dict(recurrent.PARAM_AXES),
            "ffw_norm": ("embed",), "ffw": ffw}
  attn = {"q": ("heads", "embed", "head_dim"), "k": ("kv_heads", "embed", "head_dim"),
          "v": ("kv_heads", "embed", "head_dim"), "o": ("heads", "head_dim", "embed")}
  if cfg.qk_norm:
    attn.update(q_norm=("head_dim",), k_norm=("head_dim",))
  if cfg.attn_out_bias:
    attn["o_bias"] = ("embed",)
  if kind == GLOBAL and cfg.global_k_eq_v:
    del attn["v"]
  if kv_shared:
    for name in ("k", "v", "k_norm"):
      attn.pop(name, None)
  layer = {"attn_norm": ("embed",), "attn": attn, "ffw_norm": ("embed",), "ffw": ffw}
  if cfg.post_attn_norm:
    layer["post_attn_norm"] = ("embed",)
  if cfg.post_ffw_norm:
    layer["post_ffw_norm"] = ("embed",)
  if cfg.ple_dim:
    layer.update(ple_gate=("embed", None), ple_out=(None, "embed"), ple_norm=("embed",))
  if cfg.layer_scalar:
    layer["layer_scalar"] = (None,)
  return layer


def param_logical_axes(cfg: ModelConfig) -> dict:
  """Logical axes of every param, in the pytree layout init_params makes (stacked group entries
  lead with 'layers'); spec_tpu.sharding maps them onto a mesh."""
  if isinstance(cfg, AssistantConfig):
    return _assistant_logical_axes(cfg)
  stacked = lambda axes: jax.tree.map(lambda ax: ("layers",) + ax, axes, is_leaf=is_axes)  # noqa: E731
  pattern = cfg.layer_pattern
  axes = {"embed": ("vocab", "embed"), "final_norm": ("embed",),
          "groups": [stacked(layer_logical_axes(cfg, kind)) for kind in pattern]
                    if cfg.num_groups else [],
          "remainder": [layer_logical_axes(cfg, layout.remainder_kind(cfg, r))
                        for r in range(cfg.num_remainder)]}
  if cfg.kv_shared_layers:
    shared = cfg.shared_pattern
    axes["shared_groups"] = [stacked(layer_logical_axes(cfg, kind, kv_shared=True))
                             for kind in shared] if cfg.num_shared_groups else []
    axes["shared_remainder"] = [layer_logical_axes(cfg, shared[r], kv_shared=True)
                                for r in range(cfg.num_shared_remainder)]
  if cfg.ple_dim:
    axes.update(ple_embed=("vocab", None), ple_proj=("embed", None), ple_proj_norm=(None,))
  if not cfg.tie_embeddings:
    axes["unembed"] = ("embed", "vocab")
  if cfg.vision is not None:
    axes["vision"] = siglip.logical_axes()
  if cfg.quantize:
    # int8 values shard as the weight; scales as its output axes (quant.py).
    axes = quant.quantized_logical_axes(axes, embed=cfg.tie_embeddings)
  return axes


def is_axes(x):
  # Non-empty: an empty tuple is a pytree node (e.g. a cache with no remainder layers).
  return isinstance(x, tuple) and bool(x) and all(a is None or isinstance(a, str) for a in x)


def quantize(params, cfg: ModelConfig, **kw):
  """Float params of cfg's shapes in the quantized form cfg.quantize names (quant.py): the
  matmul weights, and the embedding table when it is also the (tied) unembedding. kw: see
  quant.quantize_params (out_shardings, delete_source)."""
  float_axes = param_logical_axes(cfg.replace(quantize=None))
  return quant.quantize_params(params, float_axes, embed=cfg.tie_embeddings, **kw)


def _norm(cfg, x, scale):
  return layers.rms_norm(x, scale, cfg.norm_eps, cfg.norm_plus_one)


def _rope_args(cfg, kind):
  """(base, scale, Llama 3.1 scaling, proportion) of this kind's rotary embedding."""
  if kind == LOCAL:
    return cfg.rope_base_local, cfg.rope_scale_local, cfg.rope_llama3, 1.0
  return cfg.rope_base_global, cfg.rope_scale_global, cfg.rope_llama3, cfg.rope_proportion_global


def _rope_tables(cfg, positions_bt):
  """Each attention kind's RoPE (cos, sin), b t e, computed once per forward call: left to
  every layer, XLA:CPU fuses the sines and cosines into each layer's query and key rotation and
  evaluates them per head per layer (12 times for a step of 8 query and 4 key heads, the
  speculative round's largest elementwise cost). None where RoPE covers part of a head, and
  for calls of more than ROPE_TABLE_MAX_TOKENS tokens (prefill), whose tables (8 e bytes a token
  per kind) would be a long prompt's large buffers where fused they cost nothing to hold."""
  if cfg.rope_fraction < 1 or positions_bt.size > ROPE_TABLE_MAX_TOKENS:
    return None
  return {kind: layers.rope_table(positions_bt, cfg.kind_head_dim(kind), *_rope_args(cfg, kind))
          for kind in sorted(set(cfg.layer_types)) if kind != RECURRENT}


def _project_qkv(cfg, p, x_btd, positions_bt, kind, queries_only: bool = False, table=None):
  """Queries b t h e (scaled), keys and values b k t e (heads-major, as the cache holds them);
  queries_only (a kv-shared layer): keys and values are None. table: `_rope_tables`' entry of
  this kind for positions_bt, or None (computed here)."""
  q = layers.project_heads(x_btd, p["q"])
  k = v = None
  if not queries_only:
    k = layers.project_heads(x_btd, p["k"], heads_major=True)
    # Gemma 4 global layers with k_eq_v: the values are the key projection (before its norm
    # and rotation).
    v = k if "v" not in p else layers.project_heads(x_btd, p["v"], heads_major=True)
    if cfg.v_norm:
      v = layers.rms_norm(v, jnp.ones((), F32), cfg.norm_eps, plus_one=False)
  if cfg.qk_norm:
    q = _norm(cfg, q, p["q_norm"])
    k = None if queries_only else _norm(cfg, k, p["k_norm"])
  args = _rope_args(cfg, kind)
  if cfg.rope_fraction < 1:  # RecurrentGemma: RoPE on the first half of each head only
    q = recurrent.partial_rope(q, positions_bt[:, :, None], cfg.rope_fraction, args[0])
    k = recurrent.partial_rope(k, positions_bt[:, None, :], cfg.rope_fraction, args[0])
  else:
    if table is None:
      table = layers.rope_table(positions_bt, q.shape[-1], *args)
    q = layers.rope(q, None, *args, table=tuple(c[:, :, None] for c in table))
    if not queries_only:
      k = layers.rope(k, None, *args, table=tuple(c[:, None] for c in table))
  query_scale = (cfg.query_scale if cfg.query_scale is not None
                 else cfg.kind_head_dim(kind) ** -0.5)
  return (q.astype(F32) * query_scale).astype(q.dtype), k, v


def _visible(cfg, kind, q_pos_bt, k_pos_bs, q_block_bt=None, k_block_bs=None):
  """b t s: causal, or both in one image block (Gemma 3: an image's soft tokens see each other
  both ways, never a later image); then inside the window for local layers, which bounds past
  keys only (transformers' AND(window, OR(causal, block)))."""
  qp, kp = q_pos_bt[:, :, None], k_pos_bs[:, None, :]
  seen = kp <= qp
  if q_block_bt is not None:
    qb, kb = q_block_bt[:, :, None], k_block_bs[:, None, :]
    seen |= (qb == kb) & (qb >= 0)
  mask = seen & (kp >= 0)
  if kind == LOCAL:
    mask &= kp > qp - cfg.sliding_window
  return mask


class _Ahead(NamedTuple):
  """The tokens after a prefill chunk that its image blocks reach into (chunked prefill with
  images): their layer input, positions (-1: padding) and image block ids. Their keys and values
  join the chunk's own, visible to queries of the same block only."""
  x_btd: jax.Array
  key_positions_bt: jax.Array
  block_bt: jax.Array


class _Context(NamedTuple):
  """What every layer of one forward call sees besides its own params and cache."""
  positions_bt: jax.Array      # each new token's position
  key_positions_bt: jax.Array  # the same, -1 for padding tokens (never visible as keys)
  valid_bt: jax.Array          # real tokens (the rest is right-padding, never written)
  length_b: jax.Array | None   # tokens already in the cache; None: no cache (forward_full)
  block_bt: jax.Array | None = None  # image block of each token (-1: text); None: no images
  ahead: _Ahead | None = None        # chunked prefill with images: the tokens after the chunk
  ple_btlp: jax.Array | None = None  # per-layer embeddings of every layer (cfg.ple_dim)
  rope: dict | None = None           # _rope_tables of positions_bt; None: each layer's own


class _CacheView:
  """One attention layer's cache where it lives: in a stacked entry (layer g of l b k s e) or an
  unstacked one (g None). Blocks are read in place: slicing the layer out first would copy its
  whole cache every step, however little of it is filled."""

  def __init__(self, entry: cache_lib.KVCache, g):
    self.entry, self.g = entry, g
    self.num_slots = entry.k.shape[-2]

  def whole(self) -> cache_lib.KVCache:
    """The layer's keys and values, all slots, as values."""
    entry = self.entry if self.g is None else jax.tree.map(lambda a: a[self.g], self.entry)
    return jax.tree.map(cache_lib.values, entry)

  def copied_per_step(self) -> int:
    """Bytes XLA:CPU copies per step when this layer reads the cache in one piece (see
    _attention_layer): the whole entry twice, at every layer of the stack."""
    layers = 1 if self.g is None else self.entry.k.shape[0]
    return 2 * layers * _nbytes(self.entry)

  def read(self, entry: cache_lib.KVCache, at, size: int):
    """Slots at .. at + size - 1 of keys and values (b k size e) of this layer in `entry` (the
    view's entry, as it came out of a loop that passed it through)."""
    def cut(a):
      if self.g is None:
        return jax.lax.dynamic_slice_in_dim(a, at, size, axis=2)
      zero = jnp.zeros((), jnp.int32)
      start = (jnp.asarray(self.g, jnp.int32), zero, zero, jnp.asarray(at, jnp.int32), zero)
      return jax.lax.dynamic_slice(a, start, (1, *a.shape[1:3], size, a.shape[4]))[0]
    return cache_lib.values(cut(entry.k)), cache_lib.values(cut(entry.v))


def _attention_layer(cfg, kind, lp, x_btd, ctx: _Context, lc: _CacheView | None,
                     donor: cache_lib.KVCache | None = None):
  """A pre-norm attention + feed-forward block: (x after it, the cache update, the cache entry
  as attention passed it through). The update is the new tokens' keys and values; attention
  reads the old cache and the new tokens as two key blocks, so nothing is written before every
  query has read. The update is to be written into the returned entry: one chain of uses of
  the cache, which XLA updates in place (layers.attend_filled).

  donor: a kv-shared layer's donor's update (lc is then the donor's cache, not yet written):
  the layer attends over exactly what its donor attended over, with its own queries."""
  h = _norm(cfg, x_btd, lp["attn_norm"])
  q, k, v = _project_qkv(cfg, lp["attn"], h, ctx.positions_bt, kind,
                         queries_only=donor is not None,
                         table=None if ctx.rope is None else ctx.rope[kind])
  if donor is not None:
    k, v = donor
  new = (k, v, _visible(cfg, kind, ctx.positions_bt, ctx.key_positions_bt, ctx.block_bt,
                        ctx.block_bt))
  if ctx.ahead is not None:
    # Keys of later tokens, seen only by queries of their image block (all later in position,
    # so the window never hides them); one block with the chunk's own keys. (Models with images
    # have no KV-shared layers: ModelConfig refuses the pair.)
    a = ctx.ahead
    h_a = _norm(cfg, a.x_btd, lp["attn_norm"])
    _, k_a, v_a = _project_qkv(cfg, lp["attn"], h_a, jnp.maximum(a.key_positions_bt, 0), kind)
    qb, kb = ctx.block_bt[:, :, None], a.block_bt[:, None, :]
    mask_a = (qb == kb) & (qb >= 0) & (a.key_positions_bt[:, None, :] >= 0)
    new = tuple(jnp.concatenate(pair, axis=-2 if i < 2 else -1)
                for i, pair in enumerate(zip(new, (k_a, v_a, mask_a))))
  num_slots = None if lc is None else lc.num_slots
  entry = None if lc is None else lc.entry
  def filled(block: int):
    # Slots 0 .. min(length, S) - 1 are the filled ones (in a ring too): read only those.
    def cache_mask(slots_s):
      return _visible(cfg, kind, ctx.positions_bt,
                      cache_lib.slot_positions(ctx.length_b, num_slots, slots_s))
    n = jnp.minimum(jnp.max(ctx.length_b), num_slots)
    return layers.attend_filled(q, entry, lc.read, num_slots, cache_mask, n, block, new,
                                cfg.kind_kv_heads(kind), cfg.attn_logit_softcap)

  def whole():
    blocks = [new]
    if lc is not None:
      cache_pos = cache_lib.slot_positions(ctx.length_b, num_slots)
      kv = lc.whole()
      blocks.insert(0, (kv.k, kv.v, _visible(cfg, kind, ctx.positions_bt, cache_pos)))
    return layers.attend(q, blocks, cfg.kind_kv_heads(kind), cfg.attn_logit_softcap), entry

  if lc is not None and num_slots > ATTENTION_BLOCK:
    a, entry = filled(ATTENTION_BLOCK)
  elif lc is not None and lc.copied_per_step() >= CPU_COPY_MIN_BYTES:
    # A short cache in one piece, read as a slice feeding attention, gives the write no data
    # dependency on the read: XLA:CPU then copies the whole stacked cache, keys and values
    # twice each, per layer per step (docs/cpu.md). Read through the block loop (one block of
    # every slot) the write goes into the loop's output, after the read, in place.
    a, entry = jax.lax.platform_dependent(cpu=lambda: filled(num_slots), default=whole)
  else:
    a, entry = whole()
  a = quant.einsum("bthe,hed->btd", a, lp["attn"]["o"])
  if cfg.attn_out_bias:
    a = a + lp["attn"]["o_bias"]
  if cfg.post_attn_norm:
    a = _norm(cfg, a, lp["post_attn_norm"])
  return _feed_forward_block(cfg, lp, x_btd + a), cache_lib.KVCache(k, v), entry


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _feed_forward_block(cfg, lp, x_btd):
  """x + FFW(norm(x)), the second half of every layer kind."""
  h = _norm(cfg, x_btd, lp["ffw_norm"])
  if cfg.ffw_bias:
    f = recurrent.mlp(lp["ffw"], h, cfg.gelu_approximate)
  else:
    f = layers.feed_forward(h, lp["ffw"], cfg.ffw_activation, cfg.gelu_approximate)
  if cfg.post_ffw_norm:
    f = _norm(cfg, f, lp["post_ffw_norm"])
  return x_btd + f


def _recurrent_layer(cfg, lp, x_btd, ctx: _Context, lc: recurrent.RecurrentState | None):
  """A pre-norm recurrent (Griffin) + feed-forward block. The cache update is the Trace of
  states after every new position: write_layer keeps the one after the real tokens, and a
  rollback after rejected drafts selects an earlier one (cache.rollback)."""
  b = x_btd.shape[0]
  if lc is None:  # no cache: whole sequences from position 0
    lc = recurrent.init_state(b, cfg.recurrent_width, cfg.conv1d_width, x_btd.dtype)
  h = _norm(cfg, x_btd, lp["recurrent_norm"])
  num_new_b = jnp.sum(ctx.valid_bt, axis=1).astype(jnp.int32)
  out, trace = recurrent.recurrent_block(lp["recurrent"], h, ctx.positions_bt, num_new_b, lc)
  return _feed_forward_block(cfg, lp, x_btd + out), trace, None


def _layer(cfg: ModelConfig, kind: str, lp, x_btd, ctx: _Context, lc, index=None,
           donor=None):
  """One layer of any kind: (x after it, its cache update, the cache entry as the layer passed
  it through or None where it did not touch it). A new kind adds a branch here, in
  init_layer, in cache.py (_layer_cache, write_layer, a NamedTuple with logical_axes) and in
  layer_logical_axes; a new feed-forward (e.g. experts beside the dense one) goes in
  _feed_forward_block, its params beside "ffw". index: the layer's depth (static or traced),
  for its per-layer embedding; donor: see _attention_layer."""
  if kind in (LOCAL, GLOBAL):
    out = _attention_layer(cfg, kind, lp, x_btd, ctx, lc, donor)
  elif kind == RECURRENT:
    out = _recurrent_layer(cfg, lp, x_btd, ctx, lc)
  else:
    raise ValueError(f"no forward for layer kind {kind!r}")
  x_btd = out[0]
  if cfg.ple_dim:
    ple_btp = jax.lax.dynamic_index_in_dim(ctx.ple_btlp, index, axis=2, keepdims=False)
    g = jax.nn.gelu(quant.einsum("btd,dp->btp", x_btd, lp["ple_gate"]),
                    approximate=cfg.gelu_approximate)
    y = quant.einsum("btp,pd->btd", g * ple_btp, lp["ple_out"])
    x_btd = x_btd + _norm(cfg, y, lp["ple_norm"])
  if cfg.layer_scalar:
    x_btd = x_btd * lp["layer_scalar"]
  return (x_btd,) + out[1:]


def _apply(cfg: ModelConfig, kind: str, lp, x_btd, ctx: _Context, entry, g, index=None):
  """One layer with its cache entry (stacked: the layer's index g in it; None: no cache):
  returns (x, entry with the layer's update written, the layer's Trace if recurrent else
  None). index: the layer's depth (see _layer)."""
  if entry is None:
    lc = None
  elif kind in (LOCAL, GLOBAL):
    lc = _CacheView(entry, g)  # read in place, block by block where the cache is long
  else:
    lc = entry if g is None else jax.tree.map(lambda a: a[g], entry)
  x_btd, update, passed = _layer(cfg, kind, lp, x_btd, ctx, lc, index)
  if passed is not None:
    entry = passed  # the write goes into the entry as the layer passed it through
  if entry is not None:
    entry = cache_lib.write_layer(kind, entry, update, ctx.positions_bt, ctx.valid_bt, g)
  return x_btd, entry, (update if kind == RECURRENT else None)


def _apply_chunked(cfg: ModelConfig, kind: str, lp, x_btd, ctx: _Context, entry, g,
                   chunk: int, index=None):
  """_apply over the tokens in chunks (a lax.scan inside the layer): each chunk reads what the
  earlier ones wrote to the cache, so the result is the same as one call. See `prefill`."""
  b, t, _ = x_btd.shape
  num_new_b = jnp.sum(ctx.valid_bt, axis=1)  # valid tokens are a prefix of each row
  # With images, a chunk also reads the keys of the rest of its image blocks (at most one
  # image's soft tokens past its end): the layer input of later tokens is already known here.
  reach = cfg.vision.num_soft_tokens if ctx.block_bt is not None else 0
  pad = lambda a, value: jnp.pad(a, ((0, 0), (0, reach)) + ((0, 0),) * (a.ndim - 2),  # noqa: E731
                                 constant_values=value)
  x_pad = pad(x_btd, 0)
  key_pos, block = pad(ctx.key_positions_bt, -1), (None if not reach else pad(ctx.block_bt, -1))

  def step(carry, c):
    x, entry = carry
    at = c * chunk
    cut = lambda a, n=chunk, at=at: jax.lax.dynamic_slice_in_dim(a, at, n, axis=1)  # noqa: E731
    ahead = None
    if reach:
      after = lambda a: cut(a, reach, at + chunk)  # noqa: E731
      ahead = _Ahead(after(x), after(key_pos), after(block))
    ctx_c = _Context(cut(ctx.positions_bt), cut(ctx.key_positions_bt), cut(ctx.valid_bt),
                     ctx.length_b + jnp.minimum(num_new_b, at),
                     None if not reach else cut(ctx.block_bt), ahead,
                     None if ctx.ple_btlp is None else cut(ctx.ple_btlp),
                     jax.tree.map(cut, ctx.rope))
    x_c, entry, _ = _apply(cfg, kind, lp, cut(x), ctx_c, entry, g, index)
    return (jax.lax.dynamic_update_slice_in_dim(x, x_c, at, axis=1), entry), None

  (x_pad, entry), _ = jax.lax.scan(step, (x_pad, entry), jnp.arange(t // chunk))
  return x_pad[:, :t], entry, None  # no trace: a chunked call (prefill) is never rolled back


# On CPU, the forms that spare a per-step copy at the price of compile time (layer groups
# unrolled, _scan_groups; a short cache read through the block loop, _attention_layer) are used
# where the copy is at least this many bytes: a smaller one costs less than the compile time.
CPU_COPY_MIN_BYTES = 1 << 20


@contextlib.contextmanager
def accelerator_forms():
  """Traces inside take the accelerators' forms on CPU too: launch.plan's CPU compiles stand
  in for a TPU's or GPU's program, whose memory has no CPU-only copy of the weights."""
  global CPU_COPY_MIN_BYTES
  saved, CPU_COPY_MIN_BYTES = CPU_COPY_MIN_BYTES, float("inf")
  try:
    yield
  finally:
    CPU_COPY_MIN_BYTES = saved


def _scan_groups(body, init, stacked_params):
  """jax.lax.scan of body over the layer groups; unrolled on CPU where a group's weights are
  large (CPU_COPY_MIN_BYTES).

  A stacked weight's layer slice is a copy on XLA:CPU (its matmuls take whole buffers): inside
  the scan, every weight of every layer was copied out of its stack at every step (40% of a
  batch-8 matmul's time, docs/cpu.md). Unrolled, the slices are fixed, and loop-invariant code
  motion takes them out of the decode loop: the weights are copied once per program, and packed
  once for the AMX kernel (kernels/amx.py) but in a stack of one layer, where XLA leaves the
  packing in the loop (amx.held_off). Elsewhere the scan keeps one group's code in the program
  whatever the depth.
  """
  scan = lambda unroll: jax.lax.scan(body, init, stacked_params, unroll=unroll)  # noqa: E731
  groups = jax.tree.leaves(stacked_params)[0].shape[0]
  if _nbytes(stacked_params) // groups < CPU_COPY_MIN_BYTES:
    return scan(1)
  with amx.held_off() if groups == 1 else contextlib.nullcontext():
    return jax.lax.platform_dependent(cpu=lambda: scan(True), default=lambda: scan(1))


def _run_layers(cfg: ModelConfig, params, x_btd, ctx: _Context, cache, unrolled: bool,
                chunk: int | None = None):
  """x through every layer. Returns (x, cache groups, cache remainder, traces) with every
  layer's update written (both None without a cache); traces (cache_lib.Traces) holds each
  recurrent layer's Trace laid out like the cache (None for other kinds and when chunked).

  Under the scan the stacked cache entries are loop state: the layer of group g reads its slice
  and writes its update back at g, so caches are updated in place (cache.py says why).
  unrolled: the plain reference instead, a Python loop over the layers in depth order, each with
  its kind from cfg.layer_types and its params and cache picked by layout.
  chunk: run each layer over the tokens in chunks of this many (t a multiple of it; cache only).

  kv-shared layers (cfg.kv_shared_layers) run after the cached ones and attend over what their
  donor attended over: its cache before its write and its new keys and values. So a donor's
  write waits until the last of them has read (donors sit in the remainder, never in the scan;
  config.num_groups), and each reader passes the donor's entry on to the next, one chain of uses
  that XLA updates in place. Such a model runs unchunked (a chunk's shared layers would need
  the donor's keys of later chunks' predecessors, already overwritten in a ring).
  """
  pattern, p = cfg.layer_pattern, len(cfg.layer_pattern)
  groups = [None] * len(pattern) if cache is None else list(cache.groups)
  remainder = [None] * cfg.num_remainder if cache is None else list(cache.remainder)
  chunked = (chunk is not None and cache is not None and x_btd.shape[1] > chunk
             and not cfg.kv_shared_layers)
  donor_of = {i: kind for kind, i in cfg.kv_donors.items()}
  donors = {}  # kind -> [cache entry (not yet written), its new keys and values]

  def apply(kind, lp, x, entry, g, index):
    if chunked:
      return _apply_chunked(cfg, kind, lp, x, ctx, entry, g, chunk, index)
    return _apply(cfg, kind, lp, x, ctx, entry, g, index)

  def apply_cached(i, kind, lp, x, entry, g):
    """Layer i (static) of the cached ones; a donor's write is held back."""
    if i not in donor_of:
      return apply(kind, lp, x, entry, g, i)
    lc = None if entry is None else _CacheView(entry, None)
    x, update, passed = _layer(cfg, kind, lp, x, ctx, lc, i)
    donors[kind] = [entry if passed is None else passed, update]
    return x, None, None

  def apply_shared(kind, lp, x, entry, update, index):
    lc = None if entry is None else _CacheView(entry, None)
    x, _, passed = _layer(cfg, kind, lp, x, ctx, lc, index, donor=update)
    return x, (entry if passed is None else passed)

  def write_donors():
    for kind, i in cfg.kv_donors.items():
      _, r, _ = layout.where(cfg, i)
      entry, update = donors[kind]
      if entry is not None:
        remainder[r] = cache_lib.write_layer(kind, entry, update, ctx.positions_bt,
                                             ctx.valid_bt)

  if unrolled:
    traces = []
    for i, kind in enumerate(cfg.layer_types):
      lp = layout.layer_params(cfg, params, i)
      if i >= cfg.num_cached_layers:
        x_btd, donors[kind][0] = apply_shared(kind, lp, x_btd, *donors[kind], i)
        continue
      part, j, g = layout.where(cfg, i)
      entries = groups if part == "groups" else remainder
      x_btd, entry, trace = apply_cached(i, kind, lp, x_btd, entries[j], g)
      if i not in donor_of:
        entries[j] = entry
      traces.append(trace)
    write_donors()
    trace_groups, trace_remainder = layout.stack(cfg, traces, jnp.stack)
    return x_btd, groups, remainder, cache_lib.Traces(tuple(trace_groups),
                                                      tuple(trace_remainder))

  def group(carry, group_params):
    x, entries, g = carry
    entries, traces = list(entries), []
    for j, kind in enumerate(pattern):
      x, entries[j], trace = apply(kind, group_params[j], x, entries[j], g, g * p + j)
      traces.append(trace)
    # Traces leave the scan as outputs (stacked over the groups): they are small (K + 1
    # positions) and live only until the rollback of the same round.
    return (x, tuple(entries), g + 1), tuple(traces)

  trace_groups = ()
  if cfg.num_groups:
    (x_btd, groups, _), trace_groups = _scan_groups(group, (x_btd, tuple(groups), 0),
                                                    params["groups"])
  groups = list(groups)
  trace_remainder = []
  first = cfg.num_groups * p
  for r, lp in enumerate(params["remainder"]):
    i = first + r
    x_btd, entry, trace = apply_cached(i, cfg.layer_types[i], lp, x_btd, remainder[r], None)
    if i not in donor_of:
      remainder[r] = entry
    trace_remainder.append(trace)

  if cfg.kv_shared_layers:
    kinds = sorted(donors)
    start = cfg.num_cached_layers

    def shared_group(carry, group_params):
      x, entries, g = carry
      entries = dict(zip(kinds, entries))
      for j, kind in enumerate(cfg.shared_pattern):
        x, entries[kind] = apply_shared(kind, group_params[j], x, entries[kind],
                                        donors[kind][1], start + g * p + j)
      return (x, tuple(entries[k] for k in kinds), g + 1), None

    if cfg.num_shared_groups:
      (x_btd, entries, _), _ = _scan_groups(
          shared_group, (x_btd, tuple(donors[k][0] for k in kinds), 0), params["shared_groups"])
      for kind, entry in zip(kinds, entries):
        donors[kind][0] = entry
    for r, lp in enumerate(params["shared_remainder"]):
      i = start + cfg.num_shared_groups * p + r
      kind = cfg.layer_types[i]
      x_btd, donors[kind][0] = apply_shared(kind, lp, x_btd, *donors[kind], i)
    write_donors()
  return x_btd, groups, remainder, cache_lib.Traces(tuple(trace_groups), tuple(trace_remainder))


def _embed(cfg, params, tokens_bt):
  x = quant.embed_lookup(params["embed"], tokens_bt)
  if quant.is_quantized(params["embed"]):
    x = x.astype(cfg.dtype)
  if cfg.scale_embeddings:
    # Gemma rounds the normalizer to the activation dtype, RecurrentGemma to bfloat16.
    x = x * recurrent.embedding_scale(cfg, x.dtype)
  return x


def encode_images(params, cfg: ModelConfig, images, *, unrolled: bool = False):
  """Soft tokens (u j d) of u images (u H W 3, H = W = cfg.vision.image_size, values in
  [-1, 1]): the vision encoder and projector, run once per image. unrolled: the encoder's
  layers as a Python loop (for cost analysis), not a scan."""
  if cfg.vision is None:
    raise ValueError(f"model {cfg.name!r} has no vision encoder: it cannot read images")
  return siglip.soft_tokens(params["vision"], cfg.vision, images, unrolled).astype(cfg.dtype)


def _embed_with_images(cfg, params, tokens_bt, valid_bt, soft_bmd):
  """Embeddings with each image placeholder's row replaced by its soft token (unscaled): row
  i's j-th placeholder takes soft_bmd[i, j] (a row's images in prompt order, each
  cfg.vision.num_soft_tokens tokens; vision/prompt.py lays prompts out so). Returns
  (x, image block id per token: placeholders of one image share one, -1 elsewhere)."""
  if soft_bmd is None:
    return _embed(cfg, params, tokens_bt), None
  is_image = (tokens_bt == cfg.vision.image_id) & valid_bt
  x = _embed(cfg, params, jnp.where(is_image, 0, tokens_bt))  # the id may lie past the table
  index = jnp.cumsum(is_image, axis=1, dtype=jnp.int32) - 1
  rows = jnp.take_along_axis(soft_bmd, jnp.clip(index, 0, soft_bmd.shape[1] - 1)[..., None],
                             axis=1)
  x = jnp.where(is_image[..., None], rows.astype(x.dtype), x)
  return x, jnp.where(is_image, index // cfg.vision.num_soft_tokens, -1)
def _per_layer_inputs(cfg, params, tokens_bt, x_btd):
  """b t l p: every layer's per-layer embedding (Gemma 4 PLE), the token's row of the PLE
  table (scaled by sqrt(p)) averaged with a normed projection of the embedding x (scaled by
  1 / sqrt(d)), as transformers' Gemma4TextModel.project_per_layer_inputs."""
  if not cfg.ple_dim:
    return None
  b, t = tokens_bt.shape
  shape = (b, t, cfg.num_layers, cfg.ple_dim)
  table = params["ple_embed"]
  tok = quant.embed_lookup(table, tokens_bt)
  tok = tok * jnp.asarray(math.sqrt(cfg.ple_dim), tok.dtype)
  proj = quant.einsum("btd,dn->btn", x_btd, params["ple_proj"])
  proj = proj * jnp.asarray(cfg.d_model ** -0.5, proj.dtype)
  proj = _norm(cfg, proj.reshape(shape), params["ple_proj_norm"])
  return (proj + tok.reshape(shape)) * jnp.asarray(2 ** -0.5, proj.dtype)


def _unembed(cfg, params, x_btd):
  return logits_of_hidden(cfg, params, _norm(cfg, x_btd, params["final_norm"]))


def logits_of_hidden(cfg, params, x):
  """Float32 logits (b t v) of final hidden states (after the final norm)."""
  if cfg.tie_embeddings:
    logits = quant.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=F32)
  else:
    logits = quant.einsum("btd,dv->btv", x, params["unembed"], preferred_element_type=F32)
  logits = layers.softcap(logits, cfg.final_logit_softcap)
  if cfg.num_tokens < cfg.vocab_size:
    # Padding rows of the embedding table can never be sampled.
    logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.num_tokens, logits, -jnp.inf)
  return logits


def forward_full(params, cfg: ModelConfig, tokens_bt, *, unrolled: bool = False, soft=None):
  """Logits (b t v, float32) of whole sequences, no cache: the training and reference path.
  soft: the images' soft tokens (b m d, encode_images) for the image placeholders, or None."""
  b, t = tokens_bt.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  valid = jnp.ones((b, t), bool)
  x, block = _embed_with_images(cfg, params, tokens_bt, valid, soft)
  ctx = _Context(positions, positions, valid, None, block,
                 ple_btlp=_per_layer_inputs(cfg, params, tokens_bt, x),
                 rope=_rope_tables(cfg, positions))
  x, _, _, _ = _run_layers(cfg, params, x, ctx, None, unrolled)
  return _unembed(cfg, params, x)


def forward(params, cfg: ModelConfig, tokens_bt, cache: cache_lib.Cache, num_new_b=None,
            last_only: bool = False, *, unrolled: bool = False, chunk: int | None = None,
            traces: bool = False, soft=None, final_hidden: bool = False):
  """Runs t new tokens per row through the decoder with a KV cache.

  Serves prefill (t = prompt), decode (t = 1) and verification (t = K + 1). Row i's tokens
  sit at positions cache.length[i] ... + t - 1; only the first num_new_b[i] are real (ragged
  prompts are right-padded) and only those are written to the cache. Returns float32 logits
  (b t v), or (b 1 v) at each row's last real token when last_only, and the cache with
  length += num_new. Rolling back is `cache.rollback(cache, length)`.
  chunk: run each layer over the tokens this many at a time (`prefill` says why); same result.
  traces: also return the recurrent layers' states after every position (cache_lib.Traces),
  as a third result: a model with recurrent layers rolls back by selecting among them
  (`cache.rollback(cache, length, traces, start)`), which a length move alone cannot do.
  soft: soft tokens (b m d) of the images whose placeholders are among the new tokens, each
  image's block whole in this call (forward_full says more); None: text only.
  final_hidden: also return the hidden states after the final norm (b t d, or b 1 d), last:
  what an assistant drafter (models/assistant.py) is fed.
  """
  b, t_in = tokens_bt.shape
  if num_new_b is None:
    num_new_b = jnp.full((b,), t_in, jnp.int32)
  t = t_in
  if chunk is not None and t > chunk and t % chunk:
    t += chunk - t % chunk  # padding tokens are not real: never written, never attended
    tokens_bt = jnp.pad(tokens_bt, ((0, 0), (0, t - t_in)))
  length = cache.length
  positions = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  valid = jnp.arange(t)[None, :] < num_new_b[:, None]
  x, block = _embed_with_images(cfg, params, tokens_bt, valid, soft)
  ctx = _Context(positions, jnp.where(valid, positions, -1), valid, length, block,
                 ple_btlp=_per_layer_inputs(cfg, params, tokens_bt, x),
                 rope=_rope_tables(cfg, positions))
  x, groups, remainder, layer_traces = _run_layers(cfg, params, x, ctx, cache, unrolled, chunk)
  cache = cache_lib.Cache(groups=tuple(groups), remainder=tuple(remainder),
                          length=length + num_new_b)
  if last_only:
    idx = jnp.clip(num_new_b - 1, 0, t - 1)
    x = jnp.take_along_axis(x, idx[:, None, None], axis=1)
  else:
    x = x[:, :t_in]
  h = _norm(cfg, x, params["final_norm"])
  out = (logits_of_hidden(cfg, params, h), cache)
  if traces:
    out += (layer_traces,)
  if final_hidden:
    out += (h,)
  return out


def prefill(params, cfg: ModelConfig, tokens_bt, cache: cache_lib.Cache, num_new_b, chunk: int,
            soft=None, final_hidden: bool = False):
  """forward(..., last_only=True) with each layer run over the prompt `chunk` tokens at a time.

  Same logits and cache as one call, for any chunk size. Why: compiling a layer over t tokens
  for a TPU takes time that grows with t (Chinchilla 70B's prefill on v4, compiler CPU time:
  18 s at t = 1915 in one piece, 12 s in chunks of 256, 9 s of 128, 6 s of 64), and attention
  temporaries grow with t times the cache. The price is reading the weights once per chunk:
  a chunk of C tokens is compute-bound once C exceeds the chip's flops per byte of HBM
  bandwidth / 2 (about 115 on v4, 120 on v5e, 280 on v6e), so chunks of 128 cost little on
  v4/v5e and up to ~2x the prefill time on v6e. The chunks loop inside each layer, not around
  the whole forward: around it, XLA:TPU hoists a relayout of the stacked q/k weights (which it
  wants d-minor for long chunks) out of both loops, a 1.25 GiB copy per device for 70B.
  With images (soft), a chunk boundary may cut an image's block: each chunk also reads the keys
  of the rest of its blocks (_apply_chunked), so the result is still the same as one call.
  """
  return forward(params, cfg, tokens_bt, cache, num_new_b, last_only=True, chunk=chunk,
                 soft=soft, final_hidden=final_hidden)
