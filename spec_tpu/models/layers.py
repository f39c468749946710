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


def _rotate_half_matrix(e: int):
  """e e: x @ R = concatenate([-x2, x1]) (transformers' rotate_half), as a signed permutation."""
  i = jnp.arange(e)
  source = (i[None, :] + e // 2) % e  # column f takes x[(f + e/2) mod e] ...
  sign = jnp.where(i[None, :] < e // 2, -1.0, 1.0)  # ... negated in the first half
  return jnp.where(i[:, None] == source, sign, 0.0).astype(F32)


def rope_table(positions, e: int, base: float, scale: float, llama3=None,
               proportion: float = 1.0):
  """(cos, sin), each positions.shape + (e,) in float32: what `rope` multiplies by."""
  inv_freq = rope_frequencies(e, base, llama3)
  if proportion < 1:
    inv_freq = jnp.where(jnp.arange(e // 2) < int(proportion * e // 2), inv_freq, 0.0)
  angles = (positions.astype(F32) / scale)[..., None] * inv_freq
  return (jnp.concatenate([jnp.cos(angles)] * 2, axis=-1),
          jnp.concatenate([jnp.sin(angles)] * 2, axis=-1))


def rope(x, positions, base: float, scale: float, llama3=None, proportion: float = 1.0,
         table=None):
  """Rotary embedding, half-split layout (as transformers' rotate_half), over the last axis of x
  (queries b t h e or keys b k t e); positions broadcast against x's other axes (b t 1 or b 1 t).
  Positions are divided by scale (linear scaling), frequencies optionally Llama 3.1-scaled
  (rope_frequencies). proportion < 1: Gemma 4's proportional RoPE, the frequencies past the
  first int(proportion * e // 2) set to zero (those dimensions pass through), as transformers'
  "proportional" rope type.

  The half rotation is a product with a signed permutation matrix (exact: one nonzero term per
  output, at HIGHEST precision) rather than slices and a concatenation along e: with the
  concatenation, XLA:TPU lays the q/k projections out e-major for prompt-sized chunks and copies
  the whole stacked q and k weights into that layout (1.25 GiB per device for Chinchilla 70B).

  table: `rope_table` of these positions, computed once for many calls (positions then unused).
  """
  e = x.shape[-1]
  cos, sin = table if table is not None else rope_table(positions, e, base, scale, llama3,
                                                        proportion)
  x32 = x.astype(F32)
  rotated = jnp.einsum("...e,ef->...f", x32, _rotate_half_matrix(e),
                       precision=jax.lax.Precision.HIGHEST)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# Few tokens (decode, verification): per-head projections batched over heads on GPU. The
# activations broadcast to every head (written and read: 4 h d bytes per bf16 token) cost what
# the transposed weight copy they avoid (two passes: 4 h d e bytes) costs at e = 128 tokens.
# On an H100, verifying 8 rows x 9 tokens (72) took 1.64x a step at a limit of 64, 1.30x at 128.
HEADS_BATCHED_MAX_TOKENS = 128


def project_heads(x_btd, w_hde, heads_major: bool = False):
  """x (b t d) times a per-head weight (h d e): b t h e, or b h t e when heads_major.

  A per-head weight's output axes (h, e) sit on both sides of its contracting axis d, so one
  matrix product needs it transposed first: XLA:GPU writes a transposed copy of the weight at
  every call (three passes over the weight instead of one; measured on an H100, README "GPU").
  For few tokens the product is instead batched over heads, each head's (d e) matrix read where
  it lies, with the few activations broadcast to every head (h b t d, small next to the weight).
  Many tokens (prefill), quantized weights and other platforms take the plain einsum.
  """
  b, t, _ = x_btd.shape
  out = "bhte" if heads_major else "bthe"

  def plain():
    return quant.einsum(f"btd,hde->{out}", x_btd, w_hde)

  if quant.is_quantized(w_hde) or b * t > HEADS_BATCHED_MAX_TOKENS:
    return plain()

  return jax.lax.platform_dependent(
      cuda=lambda: heads_batched(x_btd, w_hde, heads_major), default=plain)


def heads_batched(x_btd, w_hde, heads_major: bool = False):
  """project_heads as a product batched over heads (the GPU form for few tokens).

  A single token is computed twice: XLA:GPU turns a product with one row into a reduction and
  re-lays the whole stacked weight out for it at every program call (a copy of every layer's
  q, k and v: 1 GiB per projection for a 7B model, measured on an H100); two rows stay a
  matrix product that reads the weight where it lies.
  """
  b, t, d = x_btd.shape
  h = w_hde.shape[0]
  rows = x_btd.reshape(b * t, d)
  if b * t == 1:
    rows = jnp.concatenate([rows, rows])
  xh = jnp.broadcast_to(rows[None], (h, *rows.shape))
  y = jax.lax.dot_general(xh, w_hde, (((2,), (1,)), ((0,), (0,))))[:, :b * t]
  y = y.reshape(h, b, t, -1)
  return y.transpose(1, 0, 2, 3) if heads_major else y.transpose(1, 2, 0, 3)


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

  Each block is (k_bkse, v_bkse, mask_bts). Splitting the keys into blocks (the cache, the new
  tokens) avoids concatenating the cache with the new keys, which would copy the whole cache per
  layer per step. Keys and values are heads-major (b k s e): a TPU tiles the two minor axes, and
  s e keeps them large (k e with 1-8 heads per device would pad tiles and force a relayout copy
  of the cache per step). Queries are already scaled. Returns b t h e in the query dtype.
  """
  b, t, h, e = q_bthe.shape
  q = q_bthe.reshape(b, t, num_kv_heads, h // num_kv_heads, e)
  scores = []
  for k, _, mask in blocks:
    s = jnp.einsum("btkge,bkse->bkgts", q, k, preferred_element_type=F32)
    s = softcap(s, logit_softcap)
    scores.append(jnp.where(mask[:, None, None, :, :], s, MASKED))
  sizes = [s.shape[-1] for s in scores]
  w = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out = 0.0
  start = 0
  for (_, v, _), size in zip(blocks, sizes):
    wb = w[..., start:start + size].astype(v.dtype)
    # Output b k g t e, transposed after: XLA:CPU (jax 0.10) cannot run a bf16 x bf16 -> f32
    # dot that also permutes its output ("Unsupported element type for DotThunk").
    out = out + jnp.einsum("bkgts,bkse->bkgte", wb, v, preferred_element_type=F32)
    start += size
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e).astype(q_bthe.dtype)


def attend_filled(q_bthe, cache, read_kv, num_slots: int, cache_mask_fn, num_filled, block: int,
                  new, num_kv_heads: int, logit_softcap: float | None):
  """attend() over a cache and the new tokens, reading only the cache's first `num_filled`
  slots (a traced scalar: the fullest row's), `block` slots at a time, with an online softmax
  (float32 running max, sum and output; the order of additions differs from one softmax).

  A cache of S slots costs what its filled blocks cost instead of S per step: a long max
  context is paid for only as it fills. read_kv(cache, at, block) -> (k_bkse, v_bkse) reads
  slots at .. at + block - 1 of the cache's num_slots, straight from where the cache lives (a
  stacked cache is read in place: slicing out the layer first would copy its whole cache every
  step). cache_mask_fn(slots_s) -> mask_bts says which queries see which slots. new = (k_bkte,
  v_bkte, mask_btt) for the new tokens' own keys.

  Returns (b t h e, cache): the cache passes through the loop, and the caller writes into the
  one returned, so XLA sees one chain of uses and updates the cache in place (a write into the
  cache the loop also read made XLA:CPU copy the whole cache, twice, per layer per step).
  """
  b, t, h, e = q_bthe.shape
  q = q_bthe.reshape(b, t, num_kv_heads, h // num_kv_heads, e)

  def scores(k, mask):
    s = softcap(jnp.einsum("btkge,bkse->bkgts", q, k, preferred_element_type=F32), logit_softcap)
    return jnp.where(mask[:, None, None, :, :], s, MASKED)

  def update(carry, s, v):
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    scale = jnp.exp(m - m_new)
    acc = acc * scale[..., None] + jnp.einsum("bkgts,bkse->bkgte", p.astype(v.dtype), v,
                                               preferred_element_type=F32)
    return m_new, l * scale + jnp.sum(p, axis=-1), acc

  k_new, v_new, mask_new = new
  s_new = scores(k_new, mask_new)
  carry = (jnp.max(s_new, axis=-1), jnp.zeros(s_new.shape[:-1], F32),
           jnp.zeros(s_new.shape[:-1] + (e,), F32))
  carry = update(carry, s_new, v_new)

  def body(state):
    i, carry, cache = state
    start = i * block
    at = jnp.minimum(start, num_slots - block)  # where dynamic_slice really reads
    slots = at + jnp.arange(block)
    k, v = read_kv(cache, at, block)
    # A last block clamped back into the buffer re-reads slots: count each slot once.
    mask = cache_mask_fn(slots) & (slots >= start)[None, None, :]
    # The barrier keeps XLA from seeing the cache as a pass-through of the loop and forwarding
    # the loop's input to the write after it (which brings the whole-cache copy back).
    return i + 1, update(carry, scores(k, mask), v), jax.lax.optimization_barrier(cache)

  _, (_, l, acc), cache = jax.lax.while_loop(lambda st: st[0] * block < num_filled, body,
                                             (0, carry, cache))
  out = acc / l[..., None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e).astype(q_bthe.dtype), cache
