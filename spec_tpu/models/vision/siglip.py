"""The SigLIP vision encoder and Gemma 3's projector of its output into the decoder's space.

Follows transformers' SiglipVisionModel (as Gemma3ForConditionalGeneration runs it:
last_hidden_state, no pooling head) and Gemma3MultiModalProjector, which the parity tests check
against. Shape letters: spec_tpu/shapes.py (images: u, p, a, j).

Params (the "vision" subtree of the model's params):
  patch (P*P*3, a) + patch_bias (a): the patch embedding, a (P, P, 3)-patch flattened in
      (row, column, channel) order times a matrix (a strided convolution as one matmul);
  position (p a): learned position embeddings, patches in row-major order;
  layers: every leaf stacked over the encoder's layers (leading l axis), run under one scan:
      ln1_scale/ln1_bias (a), query/key/value (a h e) + *_bias (h e), out (h e a) + out_bias
      (a), ln2_scale/ln2_bias (a), fc1 (a f) + fc1_bias (f), fc2 (f a) + fc2_bias (a);
  final_scale/final_bias (a): the final LayerNorm;
  soft_norm (a): the projector's RMSNorm, multiplied by (1 + scale); projection (a d).
Leaf names differ from the decoder's matmul names on purpose: int8 quantization (quant.py picks
weights by name) leaves the encoder in float.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spec_tpu.models import layers
from spec_tpu.models.vision.config import VisionConfig

F32 = jnp.float32


def init_params(vcfg: VisionConfig, d_model: int, key, dtype) -> dict:
  """Random params (scaled normal weights, zero biases, identity norms), for tests."""
  w, h, e, m, p = vcfg.width, vcfg.num_heads, vcfg.head_dim, vcfg.mlp_dim, vcfg.patch_size
  keys = iter(jax.random.split(key, 4))

  def normal(k, shape, fan_in):
    return (jax.random.normal(k, shape, F32) / math.sqrt(fan_in)).astype(dtype)

  def layer(k):
    ks = iter(jax.random.split(k, 6))
    zeros, ones = (lambda *s: jnp.zeros(s, dtype)), (lambda *s: jnp.ones(s, dtype))
    return {"ln1_scale": ones(w), "ln1_bias": zeros(w),
            "query": normal(next(ks), (w, h, e), w), "query_bias": zeros(h, e),
            "key": normal(next(ks), (w, h, e), w), "key_bias": zeros(h, e),
            "value": normal(next(ks), (w, h, e), w), "value_bias": zeros(h, e),
            "out": normal(next(ks), (h, e, w), w), "out_bias": zeros(w),
            "ln2_scale": ones(w), "ln2_bias": zeros(w),
            "fc1": normal(next(ks), (w, m), w), "fc1_bias": zeros(m),
            "fc2": normal(next(ks), (m, w), m), "fc2_bias": zeros(w)}

  return {"patch": normal(next(keys), (p * p * 3, w), p * p * 3),
          "patch_bias": jnp.zeros((w,), dtype),
          "position": normal(next(keys), (vcfg.num_patches, w), w),
          "layers": jax.vmap(layer)(jax.random.split(next(keys), vcfg.num_layers)),
          "final_scale": jnp.ones((w,), dtype), "final_bias": jnp.zeros((w,), dtype),
          "soft_norm": jnp.zeros((w,), dtype),
          "projection": normal(next(keys), (w, d_model), w)}


def logical_axes() -> dict:
  """Logical axes of the vision params (sharding.py's rules): heads and the MLP shard over
  'model' like the decoder's; the encoder width is replicated."""
  W, L = "vision_embed", "layers"
  return {"patch": (None, W), "patch_bias": (W,), "position": (None, W),
          "layers": {"ln1_scale": (L, W), "ln1_bias": (L, W),
                     "query": (L, W, "heads", "head_dim"), "query_bias": (L, "heads", "head_dim"),
                     "key": (L, W, "heads", "head_dim"), "key_bias": (L, "heads", "head_dim"),
                     "value": (L, W, "heads", "head_dim"), "value_bias": (L, "heads", "head_dim"),
                     "out": (L, "heads", "head_dim", W), "out_bias": (L, W),
                     "ln2_scale": (L, W), "ln2_bias": (L, W),
                     "fc1": (L, W, "ffw"), "fc1_bias": (L, "ffw"),
                     "fc2": (L, "ffw", W), "fc2_bias": (L, W)},
          "final_scale": (W,), "final_bias": (W,),
          "soft_norm": (W,), "projection": (W, "embed")}


def _layer_norm(x, scale, bias, eps):
  x32 = x.astype(F32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(F32) + bias.astype(F32)).astype(x.dtype)


def patchify(vcfg: VisionConfig, images):
  """u H W 3 -> u p (P*P*3): non-overlapping patches, row-major, each in (row, col, channel)
  order."""
  u, g, P = images.shape[0], vcfg.patches_per_side, vcfg.patch_size
  x = images.reshape(u, g, P, g, P, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(u, g * g, P * P * 3)


def _block(vcfg: VisionConfig, x_upa, lp):
  """One pre-LayerNorm block: bidirectional attention over the image's patches (p and q both
  patch axes below), then the MLP."""
  h = _layer_norm(x_upa, lp["ln1_scale"], lp["ln1_bias"], vcfg.norm_eps)
  q, k, v = (jnp.einsum("upa,ahe->uphe", h, lp[name]) + lp[name + "_bias"]
             for name in ("query", "key", "value"))
  scores = jnp.einsum("uphe,uqhe->uhpq", q, k, preferred_element_type=F32)
  weights = jax.nn.softmax(scores * vcfg.head_dim ** -0.5, axis=-1).astype(v.dtype)
  out = jnp.einsum("uhpq,uqhe->uphe", weights, v)
  x_upa = x_upa + jnp.einsum("uphe,hea->upa", out, lp["out"]) + lp["out_bias"]
  h = _layer_norm(x_upa, lp["ln2_scale"], lp["ln2_bias"], vcfg.norm_eps)
  h = jax.nn.gelu(h @ lp["fc1"] + lp["fc1_bias"], approximate=True)
  return x_upa + h @ lp["fc2"] + lp["fc2_bias"]


def encode(params, vcfg: VisionConfig, images, unrolled: bool = False):
  """The encoder's output (u p a): SiglipVisionModel's last_hidden_state. images: u H W 3 with
  H = W = vcfg.image_size, values in [-1, 1] (vision/image.py prepares them). unrolled: a Python
  loop over the layers instead of the scan (XLA's cost analysis counts a scan's body once)."""
  dtype = params["patch"].dtype
  x = patchify(vcfg, images.astype(dtype)) @ params["patch"] + params["patch_bias"]
  x = x + params["position"]
  if unrolled:
    for i in range(vcfg.num_layers):
      x = _block(vcfg, x, jax.tree.map(lambda a, i=i: a[i], params["layers"]))
  else:
    x, _ = jax.lax.scan(lambda x, lp: (_block(vcfg, x, lp), None), x, params["layers"])
  return _layer_norm(x, params["final_scale"], params["final_bias"], vcfg.norm_eps)


def project(params, vcfg: VisionConfig, x_upa):
  """Soft tokens (u j d) from the encoder's output: average pooling over pool x pool patches
  (row-major), RMSNorm with (1 + scale), projection to d_model. Not scaled by sqrt(d_model):
  the decoder scales text embeddings only."""
  u, _, a = x_upa.shape
  g, k = vcfg.patches_per_side, vcfg.pool
  pooled = x_upa.reshape(u, g // k, k, g // k, k, a).astype(F32).mean(axis=(2, 4))
  pooled = pooled.reshape(u, vcfg.num_soft_tokens, a).astype(x_upa.dtype)
  normed = layers.rms_norm(pooled, params["soft_norm"], vcfg.norm_eps, plus_one=True)
  return normed @ params["projection"]


def soft_tokens(params, vcfg: VisionConfig, images, unrolled: bool = False):
  """Images (u H W 3 in [-1, 1]) -> their soft tokens (u j d)."""
  return project(params, vcfg, encode(params, vcfg, images, unrolled))
