"""Griffin / RecurrentGemma pieces: the recurrent (RG-LRU) block, its state and its rollback, and
the details in which RecurrentGemma's attention and MLP differ from the other families.

Pure functions over ONE layer's params (no config object needed: every width is read from the
param shapes), for the decoder in model.py to call for layers of kind config.RECURRENT.
Shape letters are in spec_tpu/shapes.py (w = RG-LRU width, c = Conv1D taps, i = w / h).

Cache
-----
Per recurrent layer a fixed-size RecurrentState, whatever the context length:
  h     b w       float32: the RG-LRU state after the last position held
  conv  b (c-1) w activation dtype: the Conv1D's last c-1 inputs (oldest first)
Per attention layer (all local in RecurrentGemma) the ring buffer that exists in cache.py, of
sliding_window + K + 1 slots. So the whole cache of a RecurrentGemma model is O(window), not
O(context): for 9B, 12 rings of 2049 + K + 1 slots of one 256-wide KV head, and 26 states.

Rollback by selection
---------------------
A KV cache rolls back by moving its length: rejected entries are never visible again. A
recurrent state cannot be un-updated, since h after position p mixes every token before it. So a
call over t positions returns a Trace instead of only the final state:
  h0           b w          float32: the state before the call
  h            b t w        float32: the state after every position (the RG-LRU's output anyway,
                            so keeping it costs memory, not compute)
  conv_inputs  b (c-1+t) w  the window before the call followed by this call's t Conv1D inputs
and select(trace, kept_b) is the state after each row's first kept_b positions: h[kept - 1]
(h0 when kept = 0) and conv_inputs[kept : kept + c - 1]. One gather per layer, inside the
while_loop: no recompute, no host round trip. The same call serves prefill and ragged rows: the
state after a right-padded row's real tokens is select(trace, num_new_b).
  - Target verification: t = K + 1 (the last sampled token and K drafts). After n accepted
    drafts the kept count is n + 1, the same count the attention layers' length moves by.
  - A recurrent draft: its K calls (decode.py: the 1-2 pending tokens, then K-1 single steps)
    each end in a state; the scan over steps stacks them (n b w and n b (c-1) w),
    steps_trace makes them a Trace that starts after the first call, and the same select
    picks the one at the draft's kept length (cache.rollback does both, in decode.py's round;
    select_step is the direct form).
Extra memory per verification, held from the forward to the rollback: per recurrent layer
b (K+1) w float32 for h plus b (K+1) w activations for the conv inputs (the c-1 window part is
the cache itself); verification_trace_bytes gives the total for launch.plan.

Padding and resets
------------------
Positions past a row's num_new leave h unchanged (a = 1, input 0) and are never selected.
A position-0 token resets the RG-LRU (a = 0, input multiplier 1) and Conv1D taps reaching
positions < 0 read zero, so a cache slot reused for a new request needs no zeroing.

Numerics
--------
The RG-LRU (gates, a, the recurrence) runs in float32 whatever the params' dtype; the reference
computes its gates in the model dtype (the same function in float32, which is what the parity
tests use). Prefill is a scan over time of h_t = a_t h_{t-1} + x_t: lax.associative_scan
(default: log depth, what an accelerator wants for long prompts) or lax.scan ("linear": the
reference's order of operations on CPU/GPU). They agree to float32 rounding.

What RecurrentGemma's other layers need from the decoder (config fields in config.py)
-------------------------------------------------------------------------------------
  - Residual block as Gemma's: x + mix(RMSNorm(x)), then + mlp(RMSNorm(.)); RMSNorm with
    (1 + scale); no post-norms.
  - Attention: MQA (1 KV head), head_dim = d_model / num_heads, no q/k/v biases, a bias on the
    output projection (attn_out_bias, param attn.o_bias (d)); RoPE (base 10000) on the first
    half of each head only (rope_fraction 0.5: partial_rope); scores scaled by head_dim ** -0.5;
    a query sees itself and the reference's attention_window_size (2048) keys before it, that
    is sliding_window = 2049 in config.py's convention (local_attention, the whole-sequence
    form, states it exactly).
  - MLP: gelu_tanh(x W_gate + b) * (x W_up + b), then W_down + b (ffw_bias; mlp).
  - Embeddings scaled by sqrt(d_model) rounded to bfloat16 (embed_scale_dtype;
    embedding_scale), tied; final logits soft-capped at 30.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spec_tpu.models import layers
from spec_tpu.models.config import RECURRENT, ModelConfig

F32 = jnp.float32
SCANS = ("associative", "linear")


class RecurrentState(NamedTuple):
  """A recurrent layer's cache: everything the next token needs, of fixed size."""
  h: jax.Array     # (l) b w float32
  conv: jax.Array  # (l) b (c-1) w, oldest first

  @staticmethod
  def logical_axes() -> "RecurrentState":
    """Logical axes of one layer's leaves (a stacked cache entry adds a leading 'layers')."""
    return STATE_AXES


class Trace(NamedTuple):
  """The states after every position of one call, for rollback by selection (select)."""
  h0: jax.Array           # b w float32: the state before the call
  h: jax.Array            # b t w float32: the state after each position
  conv_inputs: jax.Array  # b (c-1+t) w: the window before the call, then the call's inputs


# ---------------------------------------------------------------- params and state

def init_params(key: jax.Array, d_model: int, lru_width: int, num_heads: int,
                conv1d_width: int = 4, dtype=F32) -> dict:
  """Random params of one recurrent block (scaled normal), for tests and training from scratch.

  Layout (HF / reference names in brackets; layers are x @ W + b):
    y (d w), y_bias (w)                      [linear_y]   gelu branch
    x (d w), x_bias (w)                      [linear_x]   Conv1D + RG-LRU branch
    conv (c w), conv_bias (w)                [conv_1d]    conv[c-1] weighs the current input
    input_gate (h i i), input_gate_bias (h i)  [rg_lru.input_gate]   i = w / h
    a_gate (h i i), a_gate_bias (h i)          [rg_lru.a_gate]       (HF: recurrent_gate)
    a_param (w)                              [rg_lru.a_param]  (HF: recurrent_param)
    out (w d), out_bias (d)                  [linear_out]
  Biases are small random values rather than zeros, so that tests see them. a_param follows
  the reference's init: a = exp(-8 r softplus(a_param)) starts, at r = 1/8, with radius
  uniform on the ring [0.9, 0.999].
  """
  if lru_width % num_heads:
    raise ValueError(f"lru_width ({lru_width}) must be a multiple of num_heads ({num_heads})")
  d, w, c, h = d_model, lru_width, conv1d_width, num_heads
  i = w // h
  keys = iter(jax.random.split(key, 14))

  def normal(shape, fan_in, scale=1.0):
    return (scale * jax.random.normal(next(keys), shape, F32) / math.sqrt(fan_in)).astype(dtype)

  def bias(shape):
    return normal(shape, 1, 0.1)

  # Radius uniform in area on the ring, as the reference's rnn_real_param_init.
  unif = jax.random.uniform(next(keys), (w,), F32)
  log_radius = 0.5 * jnp.log(unif * (0.999 ** 2 - 0.9 ** 2) + 0.9 ** 2 + 1e-8)
  a_param = jnp.log(jnp.exp(-log_radius) - 1.0)  # softplus(a_param) = -log(radius)
  return {
    "y": normal((d, w), d), "y_bias": bias((w,)),
    "x": normal((d, w), d), "x_bias": bias((w,)),
    "conv": normal((c, w), c), "conv_bias": bias((w,)),
    "input_gate": normal((h, i, i), i), "input_gate_bias": bias((h, i)),
    "a_gate": normal((h, i, i), i), "a_gate_bias": bias((h, i)),
    "a_param": a_param.astype(dtype),
    "out": normal((w, d), w), "out_bias": bias((d,)),
  }


# Logical axes (spec_tpu.sharding's vocabulary plus "lru" for w) for a sharding rule table:
# the width shards over the model axis like heads do; the gates' blocks follow "heads".
PARAM_AXES = {
  "y": ("embed", "lru"), "y_bias": ("lru",), "x": ("embed", "lru"), "x_bias": ("lru",),
  "conv": (None, "lru"), "conv_bias": ("lru",),
  "input_gate": ("heads", None, None), "input_gate_bias": ("heads", None),
  "a_gate": ("heads", None, None), "a_gate_bias": ("heads", None),
  "a_param": ("lru",), "out": ("lru", "embed"), "out_bias": ("embed",),
}
STATE_AXES = RecurrentState(h=("batch", "lru"), conv=("batch", None, "lru"))


def init_state(batch: int, lru_width: int, conv1d_width: int = 4, dtype=F32) -> RecurrentState:
  """The empty state (no tokens yet); dtype is the conv window's (activations')."""
  return RecurrentState(h=jnp.zeros((batch, lru_width), F32),
                        conv=jnp.zeros((batch, conv1d_width - 1, lru_width), dtype))


# ---------------------------------------------------------------- the recurrent block

def recurrent_block(p: dict, x_btd, positions_bt, num_new_b, state: RecurrentState, *,
                    scan: str = "associative"):
  """Griffin's temporal-mixing block over t new positions per row on top of `state`.

  y = gelu_tanh(x W_y + b); u = Conv1D(x W_x + b); h = RG-LRU(u); out = (h * y) W_out + b.
  Row r's tokens sit at positions_bt[r] (consecutive, continuing the state's); only its first
  num_new_b[r] are real (right padding), and padding never reaches a selected state.
  Returns the output (b t d, x's dtype) and the Trace of states after every position: the
  state after the real tokens is select(trace, num_new_b), after fewer of them (rejected
  drafts) select(trace, kept_b).
  """
  t = x_btd.shape[1]
  valid_bt = jnp.arange(t)[None, :] < num_new_b[:, None]
  y_btw = jax.nn.gelu(_dense(x_btd, p["y"], p["y_bias"]), approximate=True)
  u_btw = _dense(x_btd, p["x"], p["x_bias"])
  inputs = jnp.concatenate([state.conv.astype(u_btw.dtype), u_btw], axis=1)  # b (c-1+t) w
  u_btw = conv1d(p["conv"], p["conv_bias"], inputs, positions_bt)
  h_btw = rg_lru(p, u_btw, positions_bt, valid_bt, state.h, scan=scan)
  out_btd = _dense(h_btw.astype(x_btd.dtype) * y_btw, p["out"], p["out_bias"])
  return out_btd, Trace(h0=state.h, h=h_btw, conv_inputs=inputs.astype(state.conv.dtype))


def select(trace: Trace, kept_b) -> RecurrentState:
  """The state after each row's first kept_b positions of the traced call (0 <= kept_b <= t):
  rollback after rejected drafts, and the final state of ragged rows (kept_b = num_new_b)."""
  t = trace.h.shape[1]
  window = trace.conv_inputs.shape[1] - t
  idx = jnp.clip(kept_b - 1, 0, t - 1)
  h = jnp.take_along_axis(trace.h, idx[:, None, None], axis=1)[:, 0]
  h = jnp.where((kept_b > 0)[:, None], h, trace.h0)
  conv = jax.vmap(lambda row, k: jax.lax.dynamic_slice_in_dim(row, k, window, axis=0))(
      trace.conv_inputs, kept_b)
  return RecurrentState(h=h, conv=conv)


def steps_trace(first: RecurrentState, steps: RecurrentState) -> Trace:
  """The Trace of single-token steps taken after a call that ended in `first`: steps holds the
  state after each step stacked on a leading axis (h n ... b w, conv n ... b (c-1) w, as a
  lax.scan over the steps outputs them). select(trace, j) is the state after j of the steps
  (0: first), the same selection as for one call over the n tokens; leading axes (a stacked
  layer axis l) are kept. The step's conv input is the newest row of its window."""
  h = jnp.moveaxis(steps.h, 0, -2)                       # ... b n w
  inputs = jnp.moveaxis(steps.conv[..., -1, :], 0, -2)   # ... b n w
  return Trace(h0=first.h, h=h, conv_inputs=jnp.concatenate([first.conv, inputs], axis=-2))


def select_step(states: RecurrentState, index_b) -> RecurrentState:
  """Row r's state from index_b[r] of states stacked along a leading step axis (h n b w,
  conv n b (c-1) w): the state of a recurrent draft after the step its kept length ends on."""
  rows = jnp.arange(index_b.shape[0])
  return RecurrentState(h=states.h[index_b, rows], conv=states.conv[index_b, rows])


def conv1d(w_cw, bias_w, inputs_bsw, positions_bt):
  """Depthwise causal Conv1D: out[p] = bias + sum_s w[c-1-s] * in[p - s], where in[p - s] is
  zero for p - s < 0 (before the sequence: the reference's document mask).

  inputs_bsw: the c-1 inputs before this call followed by its t inputs (s = c-1+t).
  The sum runs over s = 0..c-1 in the reference's order.
  """
  c = w_cw.shape[0]
  t = positions_bt.shape[1]
  out = 0.0
  for shift in range(c):
    window = inputs_bsw[:, c - 1 - shift:c - 1 - shift + t]
    window = jnp.where((positions_bt >= shift)[..., None], window, 0)
    out = out + window * w_cw[c - 1 - shift]
  return out + bias_w


def rg_lru(p: dict, u_btw, positions_bt, valid_bt, h0_bw, *, scan: str = "associative"):
  """Real-Gated Linear Recurrent Unit; returns the float32 state after each position (b t w),
  which is also its output.

  r = sigmoid(u W_a + b_a), i = sigmoid(u W_x + b_x) (block-diagonal, h blocks);
  log a = -8 r softplus(a_param); h_t = a h_{t-1} + sqrt(1 - a^2) (i u_t).
  Position 0 resets (a = 0, multiplier 1); invalid (padding) positions keep h (a = 1, input 0).
  """
  u = u_btw.astype(F32)
  gate_x = jax.nn.sigmoid(_block_diagonal(u, p["input_gate"], p["input_gate_bias"]))
  gate_a = jax.nn.sigmoid(_block_diagonal(u, p["a_gate"], p["a_gate_bias"]))
  log_a = -8.0 * gate_a * jax.nn.softplus(p["a_param"].astype(F32))
  a, a_squared = jnp.exp(log_a), jnp.exp(2 * log_a)
  reset = (positions_bt == 0)[..., None]
  # The reference's gamma normalisation (its sqrt's gradient bound only matters in training).
  multiplier = jnp.where(reset, 1.0, jnp.sqrt(1 - a_squared))
  x = u * gate_x * multiplier
  a = jnp.where(reset, 0.0, a)
  valid = valid_bt[..., None]
  return linear_recurrence(jnp.where(valid, a, 1.0), jnp.where(valid, x, 0.0), h0_bw, scan)


def linear_recurrence(a_btw, x_btw, h0_bw, scan: str = "associative"):
  """h_t = a_t h_{t-1} + x_t from h_{-1} = h0, over axis 1, in float32; returns every h_t."""
  a, x, h0 = a_btw.astype(F32), x_btw.astype(F32), h0_bw.astype(F32)
  if scan == "linear":
    def step(h, ax):
      h = ax[0] * h + ax[1]
      return h, h
    _, h_tbw = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(x, 1, 0)))
    return jnp.moveaxis(h_tbw, 0, 1)
  if scan != "associative":
    raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
  # Fold h0 into the first element; then (a, x) pairs compose associatively.
  x = x.at[:, 0].add(a[:, 0] * h0)

  def compose(earlier, later):
    a_i, x_i = earlier
    a_j, x_j = later
    return a_j * a_i, a_j * x_i + x_j

  _, h = jax.lax.associative_scan(compose, (a, x), axis=1)
  return h


def _dense(x, w, b):
  return jnp.einsum("...d,df->...f", x, w) + b


def _block_diagonal(x_btw, w_hii, b_hi):
  h, i, _ = w_hii.shape
  xb = x_btw.reshape(x_btw.shape[:-1] + (h, i))
  y = jnp.einsum("...hi,hij->...hj", xb, w_hii.astype(x_btw.dtype)) + b_hi.astype(x_btw.dtype)
  return y.reshape(x_btw.shape)


# ---------------------------------------------------------------- the other layers' details

def mlp(p: dict, x_btd, approximate: bool = True):
  """RecurrentGemma's MLP: gelu(x W_gate + b_gate) * (x W_up + b_up), then W_down + b_down.

  p: {gate (d f), gate_bias (f), up (d f), up_bias (f), down (f d), down_bias (d)}: model.py's
  geglu ffw plus biases (config.ffw_bias). Reference ffw_up.w[0] is gate, w[1] is up.
  """
  gate = _dense(x_btd, p["gate"], p["gate_bias"])
  up = _dense(x_btd, p["up"], p["up_bias"])
  return _dense(jax.nn.gelu(gate, approximate=approximate) * up, p["down"], p["down_bias"])


def partial_rope(x, positions, fraction: float, base: float = 10_000.0):
  """RoPE on the leading `fraction` of each head's dimensions; the rest passes through.

  x and positions as layers.rope takes them: queries b t h e with positions b t 1, keys b k t e
  with positions b 1 t. Within the rotated part the layout is half-split (layers.rope,
  transformers' rotate_half), with frequencies base ** (-2j / rotated): the reference's
  _apply_rope and transformers' partial_rotary_factor both compute this.
  """
  e = x.shape[-1]
  rotated = int(round(e * fraction))
  if rotated == e:
    return layers.rope(x, positions, base, 1.0)
  head = layers.rope(x[..., :rotated], positions, base, 1.0)
  return jnp.concatenate([head, x[..., rotated:]], axis=-1)


def local_attention(cfg: ModelConfig, p: dict, x_btd, positions_bt):
  """RecurrentGemma's attention over whole sequences (no cache), the exact statement of what the
  cached decoder must compute: MQA/GQA, no q/k/v biases, partial RoPE, head_dim ** -0.5 (or
  cfg.query_scale), keys at positions in (q - sliding_window, q], output bias.

  p: {q (h d e), k (k d e), v (k d e), o (h e d), o_bias (d)}: model.py's attention params plus
  o_bias (config.attn_out_bias).
  """
  q = jnp.einsum("btd,hde->bthe", x_btd, p["q"])
  k = jnp.einsum("btd,kde->bkte", x_btd, p["k"])  # keys heads-major, as layers.attend takes
  v = jnp.einsum("btd,kde->bkte", x_btd, p["v"])
  q = partial_rope(q, positions_bt[:, :, None], cfg.rope_fraction, cfg.rope_base_local)
  k = partial_rope(k, positions_bt[:, None, :], cfg.rope_fraction, cfg.rope_base_local)
  scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
  q = (q.astype(F32) * scale).astype(q.dtype)
  qp, kp = positions_bt[:, :, None], positions_bt[:, None, :]
  mask = (kp <= qp) & (kp > qp - cfg.sliding_window)
  a = layers.attend(q, [(k, v, mask)], cfg.num_kv_heads, cfg.attn_logit_softcap)
  return jnp.einsum("bthe,hed->btd", a, p["o"]) + p["o_bias"]


def embedding_scale(cfg: ModelConfig, dtype):
  """sqrt(d_model) rounded to cfg.embed_scale_dtype (RecurrentGemma: bfloat16, as it was
  trained, even in a float32 model: 50.5, not 50.596, for d = 2560), then cast to dtype."""
  return jnp.asarray(math.sqrt(cfg.d_model), cfg.embed_scale_dtype or dtype).astype(dtype)


def verification_trace_bytes(cfg: ModelConfig, batch: int, spec_tokens: int) -> int:
  """Bytes a call over spec_tokens (K + 1) positions keeps alive until the rollback, over all
  recurrent layers: the float32 state after every position and the conv inputs (activations)."""
  per_layer = batch * spec_tokens * cfg.recurrent_width * (4 + jnp.dtype(cfg.dtype).itemsize)
  return per_layer * sum(kind == RECURRENT for kind in cfg.layer_types)
