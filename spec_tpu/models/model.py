"""The one decoder: every model family is this code plus a ModelConfig.

Params are a plain pytree of arrays:
  embed (v d); unembed (d v) when not tied; final_norm (d);
  layers: list of {attn_norm (d), attn: {q (d h e), k (d k e), v (d k e), o (h e d),
                   [q_norm (e), k_norm (e)]}, [post_attn_norm (d)], ffw_norm (d),
                   ffw: {[gate (d f)], up (d f), down (f d)}, [post_ffw_norm (d)]}
With cfg.quantize = "int8", every matmul weight (and a tied embedding table) is instead
{"w": int8 of the same shape, "scale": float32 over its output axes} (models/quant.py), and every
matmul goes through quant.einsum, which takes either form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import layers
from spec_tpu.models import quant
from spec_tpu.models.config import LOCAL, ModelConfig

F32 = jnp.float32


def init_params(cfg: ModelConfig, key: jax.Array, dtype=None) -> dict:
  """Random params (scaled normal), for tests and for training from scratch."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  d, h, k, e, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim,
                      cfg.vocab_size)
  keys = iter(jax.random.split(key, 8 * cfg.num_layers + 2))

  def normal(shape, fan_in):
    return (jax.random.normal(next(keys), shape, F32) / math.sqrt(fan_in)).astype(dtype)

  def norm():
    # Gemma norms multiply by (1 + scale): zero is the identity there.
    return jnp.zeros((d,), dtype) if cfg.norm_plus_one else jnp.ones((d,), dtype)

  params = {"embed": normal((v, d), d), "final_norm": norm()}
  if not cfg.tie_embeddings:
    params["unembed"] = normal((d, v), d)
  params["layers"] = []
  for _ in range(cfg.num_layers):
    attn = {"q": normal((d, h, e), d), "k": normal((d, k, e), d), "v": normal((d, k, e), d),
            "o": normal((h, e, d), h * e)}
    if cfg.qk_norm:
      one = 0.0 if cfg.norm_plus_one else 1.0
      attn["q_norm"] = jnp.full((e,), one, dtype)
      attn["k_norm"] = jnp.full((e,), one, dtype)
    ffw = {"up": normal((d, f), d), "down": normal((f, d), f)}
    if cfg.ffw_activation != "gelu":
      ffw["gate"] = normal((d, f), d)
    layer = {"attn_norm": norm(), "attn": attn, "ffw_norm": norm(), "ffw": ffw}
    if cfg.post_attn_norm:
      layer["post_attn_norm"] = norm()
    if cfg.post_ffw_norm:
      layer["post_ffw_norm"] = norm()
    params["layers"].append(layer)
  if cfg.quantize:
    params = quantize(params, cfg)
  return params


def quantize(params, cfg: ModelConfig, **kw):
  """Float params of cfg's shapes in the quantized form cfg.quantize names (quant.py): the
  matmul weights, and the embedding table when it is also the (tied) unembedding. kw: see
  quant.quantize_params (out_shardings, delete_source)."""
  from spec_tpu import sharding  # sharding imports this package's cache and config
  float_axes = sharding.param_logical_axes(cfg.replace(quantize=None))
  return quant.quantize_params(params, float_axes, embed=cfg.tie_embeddings, **kw)


def _norm(cfg, x, scale):
  return layers.rms_norm(x, scale, cfg.norm_eps, cfg.norm_plus_one)


def _project_qkv(cfg, p, x_btd, positions_bt, kind):
  q = quant.einsum("btd,dhe->bthe", x_btd, p["q"])
  k = quant.einsum("btd,dke->btke", x_btd, p["k"])
  v = quant.einsum("btd,dke->btke", x_btd, p["v"])
  if cfg.qk_norm:
    q = _norm(cfg, q, p["q_norm"])
    k = _norm(cfg, k, p["k_norm"])
  local = kind == LOCAL
  base = cfg.rope_base_local if local else cfg.rope_base_global
  scale = cfg.rope_scale_local if local else cfg.rope_scale_global
  q = layers.rope(q, positions_bt, base, scale, cfg.rope_llama3)
  k = layers.rope(k, positions_bt, base, scale, cfg.rope_llama3)
  query_scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
  return (q.astype(F32) * query_scale).astype(q.dtype), k, v


def _visible(cfg, kind, q_pos_bt, k_pos_bs):
  """b t s: causal, and inside the window for local layers."""
  qp, kp = q_pos_bt[:, :, None], k_pos_bs[:, None, :]
  mask = (kp <= qp) & (kp >= 0)
  if kind == LOCAL:
    mask &= kp > qp - cfg.sliding_window
  return mask


def _block(cfg, lp, x_btd, attn_fn):
  h = _norm(cfg, x_btd, lp["attn_norm"])
  a = attn_fn(h)
  a = quant.einsum("bthe,hed->btd", a, lp["attn"]["o"])
  if cfg.post_attn_norm:
    a = _norm(cfg, a, lp["post_attn_norm"])
  x_btd = x_btd + a
  h = _norm(cfg, x_btd, lp["ffw_norm"])
  f = layers.feed_forward(h, lp["ffw"], cfg.ffw_activation, cfg.gelu_approximate)
  if cfg.post_ffw_norm:
    f = _norm(cfg, f, lp["post_ffw_norm"])
  return x_btd + f


def _embed(cfg, params, tokens_bt):
  x = quant.embed_lookup(params["embed"], tokens_bt)
  if quant.is_quantized(params["embed"]):
    x = x.astype(cfg.dtype)
  if cfg.scale_embeddings:
    # Gemma rounds the normalizer to the activation dtype.
    x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
  return x


def _unembed(cfg, params, x_btd):
  x = _norm(cfg, x_btd, params["final_norm"])
  if cfg.tie_embeddings:
    logits = quant.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=F32)
  else:
    logits = quant.einsum("btd,dv->btv", x, params["unembed"], preferred_element_type=F32)
  logits = layers.softcap(logits, cfg.final_logit_softcap)
  if cfg.num_tokens < cfg.vocab_size:
    # Padding rows of the embedding table can never be sampled.
    logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.num_tokens, logits, -jnp.inf)
  return logits


def forward_full(params, cfg: ModelConfig, tokens_bt):
  """Logits (b t v, float32) of whole sequences, no cache: the training and reference path."""
  b, t = tokens_bt.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = _embed(cfg, params, tokens_bt)
  for lp, kind in zip(params["layers"], cfg.layer_types):
    def attn_fn(h, lp=lp, kind=kind):
      q, k, v = _project_qkv(cfg, lp["attn"], h, positions, kind)
      mask = _visible(cfg, kind, positions, positions)
      return layers.attend(q, [(k, v, mask)], cfg.num_kv_heads, cfg.attn_logit_softcap)
    x = _block(cfg, lp, x, attn_fn)
  return _unembed(cfg, params, x)


def forward(params, cfg: ModelConfig, tokens_bt, cache: cache_lib.Cache, num_new_b=None,
            last_only: bool = False):
  """Runs t new tokens per row through the decoder with a KV cache.

  Serves prefill (t = prompt), decode (t = 1) and verification (t = K + 1). Row i's tokens
  sit at positions cache.length[i] ... + t - 1; only the first num_new_b[i] are real (ragged
  prompts are right-padded) and only those are written to the cache. Returns float32 logits
  (b t v), or (b 1 v) at each row's last real token when last_only, and the cache with
  length += num_new. Rolling back is `cache.rollback(cache, length)`.
  """
  b, t = tokens_bt.shape
  if num_new_b is None:
    num_new_b = jnp.full((b,), t, jnp.int32)
  length = cache.length
  positions = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  valid = jnp.arange(t)[None, :] < num_new_b[:, None]
  x = _embed(cfg, params, tokens_bt)
  new_layers = []
  for lp, kind, lc in zip(params["layers"], cfg.layer_types, cache.layers):
    def attn_fn(h, lp=lp, kind=kind, lc=lc):
      q, k, v = _project_qkv(cfg, lp["attn"], h, positions, kind)
      cache_pos = cache_lib.slot_positions(length, lc.k.shape[1])
      new_pos = jnp.where(valid, positions, -1)  # padding keys are never visible
      blocks = [(lc.k, lc.v, _visible(cfg, kind, positions, cache_pos)),
                (k, v, _visible(cfg, kind, positions, new_pos))]
      new_layers.append(cache_lib.write(lc, k, v, positions, valid, ring=kind == LOCAL))
      return layers.attend(q, blocks, cfg.num_kv_heads, cfg.attn_logit_softcap)
    x = _block(cfg, lp, x, attn_fn)
  if last_only:
    idx = jnp.clip(num_new_b - 1, 0, t - 1)
    x = jnp.take_along_axis(x, idx[:, None, None], axis=1)
  logits = _unembed(cfg, params, x)
  return logits, cache_lib.Cache(layers=tuple(new_layers), length=length + num_new_b)
