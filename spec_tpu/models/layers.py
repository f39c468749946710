"""Stateless building blocks of the decoder: norms, rotary embeddings, feed-forward, attention core.

Shape letters are defined in spec_tpu/shapes.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spec_tpu.models import quant

F32 = jnp.float32
MASKED = -1e30  # finite, so a row with every key masked gives no NaN (its output is unused)


def rms_norm(x, scale, eps: float, plus_one: bool):
  """RMSNorm computed in float32; Gemma variants multiply by (1 + scale)."""
  x32 = x.astype(F32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  s = scale.astype(F32)
  return (y * (1.0 + s if plus_one else s)).astype(x.dtype)


def rope_frequencies(head_dim: int, base: float, llama3=None):
  """Inverse frequencies (e/2,) in float32, as transformers computes them.

  llama3 = (factor, low_freq_factor, high_freq_factor, original_context): Llama 3.1's scaling
  keeps wavelengths shorter than original_context / high_freq_factor, divides the frequencies of
  those longer than original_context / low_freq_factor by factor, and interpolates in between.
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
  if llama3 is None:
    return inv_freq
  factor, low, high, context = llama3
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
  smooth = (context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= context / high) & (wavelen <= context / low)
  return jnp.where(medium, smoothed, scaled)


def rope(x_bthe, positions_bt, base: float, scale: float, llama3=None):
  """Rotary embedding, half-split layout (as transformers' rotate_half); positions are divided
  by scale (linear scaling), frequencies optionally Llama 3.1-scaled (rope_frequencies)."""
  inv_freq = rope_frequencies(x_bthe.shape[-1], base, llama3)
  angles = (positions_bt.astype(F32) / scale)[..., None] * inv_freq  # b t e/2
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_bthe.astype(F32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthe.dtype)


def feed_forward(x_btd, p, activation: str, gelu_approximate: bool):
  up = quant.einsum("btd,df->btf", x_btd, p["up"])
  if activation == "gelu":
    h = jax.nn.gelu(up, approximate=gelu_approximate)
  else:
    gate = quant.einsum("btd,df->btf", x_btd, p["gate"])
    act = jax.nn.gelu(gate, approximate=gelu_approximate) if activation == "geglu" else jax.nn.silu(gate)
    h = act * up
  return quant.einsum("btf,fd->btd", h, p["down"])


def softcap(x, cap: float | None):
  return x if cap is None else cap * jnp.tanh(x / cap)


def attend(q_bthe, blocks, num_kv_heads: int, logit_softcap: float | None):
  """Attention of queries over several key/value blocks with one joint softmax.

  Each block is (k_bske, v_bske, mask_bts). Splitting the keys into blocks (the cache, the new
  tokens) avoids concatenating the cache with the new keys, which would copy the whole cache per
  layer per step. Queries are already scaled. Returns b t h e in the query dtype.
  """
  b, t, h, e = q_bthe.shape
  q = q_bthe.reshape(b, t, num_kv_heads, h // num_kv_heads, e)
  scores = []
  for k, _, mask in blocks:
    s = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=F32)
    s = softcap(s, logit_softcap)
    scores.append(jnp.where(mask[:, None, None, :, :], s, MASKED))
  sizes = [s.shape[-1] for s in scores]
  w = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out = 0.0
  start = 0
  for (_, v, _), size in zip(blocks, sizes):
    wb = w[..., start:start + size].astype(v.dtype)
    out = out + jnp.einsum("bkgts,bske->btkge", wb, v, preferred_element_type=F32)
    start += size
  return out.reshape(b, t, h, e).astype(q_bthe.dtype)
