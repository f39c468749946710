"""RecurrentGemma (Griffin) pieces: the recurrent block, its rollback by selection, the MLP and
attention details, conversion, and presets, against both references.

References: the recurrentgemma package (1.0.1, the JAX implementation the released weights come
from) and transformers' RecurrentGemmaForCausalLM. They differ at the attention window's edge:
with window W the package lets a query see itself and the W keys before it, transformers only
W keys in all. spec_tpu follows the package (sliding_window = W + 1): the two agree below
position W, and test_hf_logits_... shows that the edge is their only difference.

Tiny random-weight models in float32 (tiny_recurrentgemma: d 32, lru width 24, 4 heads, window
4, pattern (R, R, L) over 4 layers), so every test compiles in seconds on a CPU.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.checkpoints import recurrent_convert
from spec_tpu.checkpoints.hf import HFConversionError
from spec_tpu.checkpoints.recurrent_convert import ReferenceConversionError
from spec_tpu.decoding import decode
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, layers, model, recurrent
from spec_tpu.models.config import LOCAL, RECURRENT
from test_hf_parity import _DictIndex  # a safetensors index over a dict of arrays

os.environ.setdefault("HF_HUB_OFFLINE", "1")
rg_common = pytest.importorskip("recurrentgemma.common")
rg_griffin = pytest.importorskip("recurrentgemma.jax.griffin")
rg_modules = pytest.importorskip("recurrentgemma.jax.modules")

CFG = config.get_preset("tiny_recurrentgemma")
WINDOW = CFG.sliding_window - 1  # the reference's attention_window_size
SEQ = 12                          # longer than the window: its edge is exercised
K = 4                             # draft tokens per round in the rollback tests
LINEAR = rg_common.ScanType.LINEAR_NATIVE
TOL = dict(atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- references

def _reference_config():
  kinds = {RECURRENT: rg_common.TemporalBlockType.RECURRENT,
           LOCAL: rg_common.TemporalBlockType.ATTENTION}
  return rg_common.GriffinConfig(
      vocab_size=CFG.vocab_size, width=CFG.d_model, mlp_expanded_width=CFG.ffw_dim,
      num_heads=CFG.num_heads, lru_width=CFG.lru_width,
      block_types=tuple(kinds[k] for k in CFG.layer_types), embeddings_scale_by_sqrt_dim=True,
      attention_window_size=WINDOW, logits_soft_cap=CFG.final_logit_softcap, scan_type=LINEAR)


def _random_params(shapes, seed):
  """Random values for the reference's params tree, drawn on the host (the reference's own
  init compiles a whole forward pass: seconds of CPU). Matrices are normal with the variance
  of its init (1 / fan_in; the embedding's fan-in is its width) and a_param is its ring init
  (a = exp(-8 r softplus(a_param)) with radius uniform in area on [0.9, 0.999]); where its
  init puts zeros (biases, norm scales) or near-zeros (the conv), where a missing bias or a
  swapped tap would hardly show, the values are made to matter."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, leaf in leaves:
    shape, name = leaf.shape, path[-1].key
    noise = rng.standard_normal(shape)
    if name in ("b", "bias", "scale"):
      a = 0.3 * noise
    elif name == "w" and "conv_1d" in jax.tree_util.keystr(path):
      a = noise / 2
    elif name == "a_param":
      radius2 = rng.uniform(size=shape) * (0.999 ** 2 - 0.9 ** 2) + 0.9 ** 2 + 1e-8
      a = np.log(np.exp(-0.5 * np.log(radius2)) - 1.0)
    elif name == "input_embedding":
      a = noise / math.sqrt(shape[1])
    else:  # kernels (d_in d_out), stacked or block-diagonal weights (... d_in d_out)
      a = noise / math.sqrt(shape[-2])
    out.append(jnp.asarray(a, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _griffin():
  return rg_griffin.Griffin(_reference_config(), gradient_checkpointing=False)


@functools.lru_cache
def _reference_shapes():
  """The tree and shapes of the reference's params (traced, nothing compiled)."""
  tokens = jnp.zeros((1, SEQ), jnp.int32)
  return jax.eval_shape(lambda: _griffin().init(jax.random.key(0), tokens,
                                                _positions(1, SEQ)))["params"]


@pytest.fixture(scope="module")
def reference():
  """(Griffin module, its random params, the same params converted to spec_tpu's layout)."""
  params = _random_params(_reference_shapes(), seed=1)
  ours = recurrent_convert.convert_reference_params(params, CFG)
  return _griffin(), params, jax.tree.map(jnp.asarray, ours)


def _ref_block():
  return rg_modules.RecurrentBlock(width=CFG.d_model, num_heads=CFG.num_heads,
                                   lru_width=CFG.lru_width, scan_type=LINEAR)


_APPLIES = {}


def _jit_apply(module):
  """The reference module's apply as one program per call shape: applied eagerly, each of its
  ops compiles for its shapes on its own, several times the one compile."""
  if id(module) not in _APPLIES:  # (the module is kept: its id is never reused)
    _APPLIES[id(module)] = module, jax.jit(module.apply, static_argnames="return_cache")
  return _APPLIES[id(module)][1]


_ref_block_apply = _jit_apply(_ref_block())


def _positions(b, t, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


def _x(b, t, seed=0):
  return jax.random.normal(jax.random.key(100 + seed), (b, t, CFG.d_model))


_block = jax.jit(recurrent.recurrent_block, static_argnames="scan")
_select = jax.jit(recurrent.select)


def _run(p, x_btd, positions_bt, num_new_b=None, state=None):
  b, t, _ = x_btd.shape
  if num_new_b is None:
    num_new_b = jnp.full((b,), t, jnp.int32)
  if state is None:
    state = recurrent.init_state(b, CFG.lru_width, CFG.conv1d_width)
  return _block(p, x_btd, positions_bt, jnp.asarray(num_new_b, jnp.int32), state)


def _assert_state(got: recurrent.RecurrentState, h, conv, msg=""):
  np.testing.assert_allclose(got.h, h, err_msg=f"h {msg}", **TOL)
  np.testing.assert_allclose(got.conv, conv, err_msg=f"conv {msg}", **TOL)


# ---------------------------------------------------------------- the recurrent block

@pytest.mark.parametrize("scan", recurrent.SCANS)
def test_recurrent_block_equals_the_reference_block(reference, scan):
  # Given the reference's recurrent block and the same weights in spec_tpu's layout,
  _, ref_params, ours = reference
  x, pos = _x(2, SEQ), _positions(2, SEQ)
  want, want_cache = _ref_block_apply({"params": ref_params["blocks.0"]["recurrent_block"]},
                                      x, pos)
  # when a whole sequence goes through spec_tpu's block from the empty state,
  out, trace = _block(ours["layers"][0]["recurrent"], x, pos, jnp.array([SEQ, SEQ]),
                      recurrent.init_state(2, CFG.lru_width), scan=scan)
  # then the outputs and the final state (RG-LRU state, conv window) are the reference's.
  np.testing.assert_allclose(out, want, **TOL)
  _assert_state(_select(trace, jnp.array([SEQ, SEQ])), want_cache.rg_lru_state,
                want_cache.conv1d_state)
  # and the trace's last state is the final state: the RG-LRU output is the state itself.
  np.testing.assert_array_equal(trace.h[:, -1], _select(trace, jnp.array([SEQ, SEQ])).h)


@pytest.mark.parametrize("chunks", [[1] * SEQ, [K + 1, K + 1, SEQ - 2 * (K + 1)],
                                    "ragged"], ids=["ones", "k_plus_1", "ragged"])
def test_chunks_on_the_carried_state_equal_one_pass(reference, chunks):
  # Given one pass over a sequence,
  p = reference[2]["layers"][0]["recurrent"]
  x, pos = _x(2, SEQ, seed=2), _positions(2, SEQ)
  want, trace = _run(p, x, pos)
  want_state = _select(trace, jnp.array([SEQ, SEQ]))
  # when the same tokens arrive in chunks on top of the carried state (ragged: each row has
  # its own chunk sizes, right-padded with garbage to one call shape),
  per_row = [[5, 7], [2, 10]] if chunks == "ragged" else [chunks, chunks]
  state = recurrent.init_state(2, CFG.lru_width)
  got = np.zeros_like(want)
  done = np.zeros(2, int)
  for call in range(len(per_row[0])):
    n = np.array([row[call] for row in per_row])
    t = int(n.max())
    idx = np.minimum(done[:, None] + np.arange(t)[None], SEQ - 1)
    xc = jnp.where((np.arange(t)[None] < n[:, None])[..., None],
                   x[np.arange(2)[:, None], idx], 1e3)
    out, trace = _run(p, xc, jnp.asarray(done[:, None] + np.arange(t)[None], jnp.int32), n,
                      state)
    state = _select(trace, jnp.asarray(n))
    for r in range(2):
      got[r, done[r]:done[r] + n[r]] = out[r, :n[r]]
    done += n
  # then outputs and final state equal the one pass.
  np.testing.assert_allclose(got, want, **TOL)
  _assert_state(state, want_state.h, want_state.conv)


def _reference_steps(ref_params, x, prefill: int):
  """The reference's own states: prefill, then one token at a time (the only way it can add
  tokens to a cache). Returns the caches after prefill + n tokens, n = 0..t-prefill, and the
  outputs of the single steps."""
  block, p = _ref_block_apply, {"params": ref_params["blocks.0"]["recurrent_block"]}
  b, t, _ = x.shape
  _, cache = block(p, x[:, :prefill], _positions(b, prefill))
  caches, outs = [cache], []
  for j in range(prefill, t):
    out, cache = block(p, x[:, j:j + 1], _positions(b, 1, j), cache)
    caches.append(cache)
    outs.append(out)
  return caches, jnp.concatenate(outs, axis=1)


def test_rollback_selects_the_state_after_the_kept_prefix(reference):
  # Given a prefilled state and a verification call of K+1 tokens on top of it,
  _, ref_params, ours = reference
  p = ours["layers"][0]["recurrent"]
  prefill = 5
  x = _x(2, prefill + K + 1, seed=3)
  _, trace = _run(p, x[:, :prefill], _positions(2, prefill))
  state = _select(trace, jnp.array([prefill, prefill]))
  out, trace = _run(p, x[:, prefill:], _positions(2, K + 1, prefill), state=state)
  ref_caches, ref_outs = _reference_steps(ref_params, x, prefill)
  # then the K+1 outputs equal the reference's one-token steps,
  np.testing.assert_allclose(out, ref_outs, **TOL)
  # and for every kept count n (rows keeping different counts in one selection), the selected
  # state is the reference's state after exactly prefill + n tokens: no recompute needed.
  for n in range(K + 2):
    kept = jnp.array([n, K + 1 - n])
    got = _select(trace, kept)
    for r in range(2):
      ref = ref_caches[int(kept[r])]
      _assert_state(jax.tree.map(lambda a: a[r], got), ref.rg_lru_state[r],
                    ref.conv1d_state[r], msg=f"row {r} kept {int(kept[r])}")


@pytest.mark.parametrize("kept", [0, 2, K + 1])
def test_decoding_goes_on_from_the_selected_state_as_from_a_fresh_prefix(reference, kept):
  # Given a verification of K+1 tokens of which `kept` survive,
  p = reference[2]["layers"][0]["recurrent"]
  x = _x(1, 4 + K + 1, seed=4)
  nxt = _x(1, 3, seed=5)  # what comes after the kept prefix (a correction token, more drafts)
  _, trace = _run(p, x[:, :4], _positions(1, 4))
  _, trace = _run(p, x[:, 4:], _positions(1, K + 1, 4), state=_select(trace, jnp.array([4])))
  state = _select(trace, jnp.array([kept]))
  # when decoding continues from the selected state,
  got, _ = _run(p, nxt, _positions(1, 3, 4 + kept), state=state)
  # then it computes what a fresh pass over the kept prefix and the new tokens computes.
  want, _ = _run(p, jnp.concatenate([x[:, :4 + kept], nxt], axis=1), _positions(1, 4 + kept + 3))
  np.testing.assert_allclose(got, want[:, 4 + kept:], **TOL)


def test_a_recurrent_draft_selects_among_its_step_states(reference):
  # Given a draft that feeds K single tokens in a scan, stacking the state after each step,
  p = reference[2]["layers"][0]["recurrent"]
  x = _x(2, 3 + K, seed=6)
  _, trace = _run(p, x[:, :3], _positions(2, 3))
  state0 = _select(trace, jnp.array([3, 3]))

  def step(state, inputs):
    x_b1d, pos_b1 = inputs
    _, tr = recurrent.recurrent_block(p, x_b1d, pos_b1, jnp.ones((2,), jnp.int32), state)
    state = recurrent.select(tr, jnp.ones((2,), jnp.int32))
    return state, state

  xs = (jnp.moveaxis(x[:, 3:, None], 1, 0), jnp.moveaxis(_positions(2, K, 3)[:, :, None], 1, 0))
  _, states = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(state0, xs)
  _, one_pass = _run(p, x[:, 3:], _positions(2, K, 3), state=state0)
  # when each row keeps its own number of draft steps,
  for index in ([0, K - 1], [2, 1], [K - 1, 0]):
    index = jnp.array(index)
    got = recurrent.select_step(states, index)
    # then its state is the one after that many tokens.
    want = _select(one_pass, index + 1)
    _assert_state(got, want.h, want.conv, msg=f"steps {index}")


def test_padding_never_changes_the_state(reference):
  # Given ragged rows whose padding holds either zeros or huge garbage,
  p = reference[2]["layers"][0]["recurrent"]
  x = _x(3, 8, seed=7)
  num_new = jnp.array([8, 3, 0])
  pad = (jnp.arange(8)[None] >= num_new[:, None])[..., None]
  prior = _select(_run(p, _x(3, 4, seed=8), _positions(3, 4))[1], jnp.array([4, 4, 4]))
  pos = _positions(3, 8, 4)
  out_zeros, tr_zeros = _run(p, jnp.where(pad, 0.0, x), pos, num_new, prior)
  out_junk, tr_junk = _run(p, jnp.where(pad, 1e4, x), pos, num_new, prior)
  # then the real outputs and the final states are the same,
  real = ~pad[..., 0]
  np.testing.assert_array_equal(np.where(real[..., None], out_zeros, 0),
                                np.where(real[..., None], out_junk, 0))
  s_zeros, s_junk = _select(tr_zeros, num_new), _select(tr_junk, num_new)
  np.testing.assert_array_equal(s_zeros.h, s_junk.h)
  np.testing.assert_array_equal(s_zeros.conv, s_junk.conv)
  # the state at padding positions is the state after the row's last real token (row 2 has
  # none: the state it came with) -- to rounding only, never selected: the associative scan
  # reaches a padding position through another order of products than the last real one (XLA's
  # elemental emitters round one of them an ulp apart),
  for r in range(3):
    n = int(num_new[r])
    last = tr_junk.h[r, n - 1] if n else prior.h[r]
    np.testing.assert_allclose(tr_junk.h[r, n:], jnp.broadcast_to(last, tr_junk.h[r, n:].shape),
                               rtol=1e-6, atol=1e-7)
  # and a row with no real tokens keeps its state entirely.
  np.testing.assert_array_equal(s_junk.h[2], prior.h[2])
  np.testing.assert_array_equal(s_junk.conv[2], prior.conv[2])


def test_position_zero_resets_the_state(reference):
  # Given a state left by another sequence (a reused cache slot),
  p = reference[2]["layers"][0]["recurrent"]
  old = _select(_run(p, _x(2, 6, seed=9), _positions(2, 6))[1], jnp.array([6, 6]))
  assert float(jnp.abs(old.h).min()) > 0 and float(jnp.abs(old.conv).min()) > 0
  # when a new sequence starts at position 0 on top of it,
  x, pos = _x(2, 5, seed=10), _positions(2, 5)
  got, got_trace = _run(p, x, pos, state=old)
  want, want_trace = _run(p, x, pos)
  # then nothing of the old state shows: neither through the RG-LRU nor the conv window.
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_trace.h, want_trace.h)


def test_init_params_has_the_layout_conversion_produces(reference):
  # Given random params from init_params and the reference's converted params,
  p = recurrent.init_params(jax.random.key(15), CFG.d_model, CFG.lru_width, CFG.num_heads,
                            CFG.conv1d_width)
  converted = reference[2]["layers"][0]["recurrent"]
  # then names and shapes are the same (and every param has logical axes for sharding),
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, converted)
  assert set(recurrent.PARAM_AXES) == set(p)
  assert all(len(recurrent.PARAM_AXES[n]) == p[n].ndim for n in p)
  # and the recurrence starts stable: a = exp(-8 r softplus(a_param)) is in [0.9, 0.999] at
  # r = 1/8, as the reference initialises it.
  a = jnp.exp(-jax.nn.softplus(p["a_param"]))
  assert 0.9 <= float(a.min()) and float(a.max()) <= 0.999 + 1e-6


# ---------------------------------------------------------------- the other layers' details

def test_mlp_equals_the_reference_mlp(reference):
  _, ref_params, ours = reference
  x = _x(2, 5, seed=11)
  block = rg_modules.MLPBlock(width=CFG.d_model, expanded_width=CFG.ffw_dim)
  want = block.apply({"params": ref_params["blocks.1"]["mlp_block"]}, x)
  np.testing.assert_allclose(recurrent.mlp(ours["layers"][1]["ffw"], x), want, **TOL)


def test_partial_rope_rotates_the_first_half_as_the_reference():
  x = jax.random.normal(jax.random.key(12), (2, 7, 3, CFG.head_dim))
  pos = _positions(2, 7, 1000)  # large positions: every frequency turns
  want = rg_modules._apply_rope(x, pos)
  got = recurrent.partial_rope(x, pos[:, :, None], 0.5)  # b t 1 against b t h e, as layers.rope
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(got[..., CFG.head_dim // 2:], x[..., CFG.head_dim // 2:])


def test_attention_equals_the_reference_including_the_window_edge(reference):
  # Given the reference's local attention (window W) and a sequence longer than W,
  _, ref_params, ours = reference
  x, pos = _x(2, SEQ, seed=13), _positions(2, SEQ)
  block = rg_modules.LocalAttentionBlock(width=CFG.d_model, num_heads=CFG.num_heads,
                                         window_size=WINDOW)
  want, _ = _jit_apply(block)({"params": ref_params["blocks.2"]["attention_block"]}, x, pos)
  # then spec_tpu's attention with sliding_window = W + 1 (itself and W keys) is the reference,
  p = ours["layers"][2]["attn"]
  attention = jax.jit(recurrent.local_attention, static_argnums=0)
  np.testing.assert_allclose(attention(CFG, p, x, pos), want, **TOL)
  # and one key fewer (transformers' reading of W) is not: the edge matters here.
  narrow = attention(CFG.replace(sliding_window=WINDOW), p, x, pos)
  np.testing.assert_allclose(narrow[:, :WINDOW], want[:, :WINDOW], **TOL)
  assert float(jnp.abs(narrow[:, WINDOW:] - want[:, WINDOW:]).max()) > 1e-2


def _forward_full(params, cfg, tokens_bt):
  """The whole model from this module's pieces (phase 2's decoder must compute this)."""
  b, t = tokens_bt.shape
  pos = _positions(b, t)

  def norm(x, scale):
    return layers.rms_norm(x, scale, cfg.norm_eps, cfg.norm_plus_one)

  x = params["embed"][tokens_bt] * recurrent.embedding_scale(cfg, jnp.float32)
  for lp, kind in zip(params["layers"], cfg.layer_types):
    if kind == RECURRENT:
      mixed, _ = recurrent.recurrent_block(lp["recurrent"], norm(x, lp["recurrent_norm"]), pos,
                                           jnp.full((b,), t), recurrent.init_state(
                                               b, cfg.recurrent_width, cfg.conv1d_width))
    else:
      mixed = recurrent.local_attention(cfg, lp["attn"], norm(x, lp["attn_norm"]), pos)
    x = x + mixed
    x = x + recurrent.mlp(lp["ffw"], norm(x, lp["ffw_norm"]))
  logits = norm(x, params["final_norm"]) @ params["embed"].T
  return layers.softcap(logits, cfg.final_logit_softcap)


_forward = jax.jit(_forward_full, static_argnums=1)


def test_whole_model_logits_equal_the_reference_griffin(reference):
  # Given the reference's Griffin and its params converted from the Flax tree,
  model, ref_params, ours = reference
  tokens = jax.random.randint(jax.random.key(14), (2, SEQ), 0, CFG.vocab_size)
  want, _ = _jit_apply(model)({"params": ref_params}, tokens, _positions(2, SEQ),
                             return_cache=False)
  # then the pieces, composed as the decoder will, give its logits past the window,
  got = _forward(ours, CFG, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)  # |logits| up to ~5
  # and the bfloat16-rounded embedding scale is part of that (sqrt(32) = 5.657 -> 5.65625):
  # unrounded, the logits move by more than 5x that tolerance.
  exact = _forward(ours, CFG.replace(embed_scale_dtype=None), tokens)
  assert float(jnp.abs(exact - want).max()) > 1e-4


# ---------------------------------------------------------------- the decoder (model.py)

def _decoder_params(reference):
  return recurrent_convert.stacked(reference[2], CFG, jnp.stack)


_forward_full_model = jax.jit(model.forward_full, static_argnums=1)
_forward_model = jax.jit(model.forward, static_argnums=1, static_argnames=("last_only", "chunk"))


def _reference_greedy(model_ref, ref_params, prompt_bt, steps):
  """The reference's greedy continuation: a prefill, then one token at a time on its cache
  (its only way to add tokens); returns the tokens and each step's logits."""
  b, t = prompt_bt.shape
  apply = _jit_apply(model_ref)
  logits, cache = apply({"params": ref_params}, prompt_bt, _positions(b, t), return_cache=True)
  out, all_logits = [], []
  for j in range(steps):
    tok = jnp.argmax(logits[:, -1], axis=-1)[:, None]
    out.append(tok)
    all_logits.append(logits[:, -1])
    logits, cache = apply({"params": ref_params}, tok, _positions(b, 1, t + j), cache,
                          return_cache=True)
  return jnp.concatenate(out, axis=1), jnp.stack(all_logits, axis=1)


def test_decoder_logits_equal_the_reference_griffin(reference):
  # Given the reference's Griffin and the same weights stacked for spec_tpu's one decoder,
  model_ref, ref_params, _ = reference
  # (the incremental test's tokens: one forward_full program)
  tokens = jax.random.randint(jax.random.key(22), (3, 3 * SEQ), 0, CFG.vocab_size)
  want, _ = _jit_apply(model_ref)({"params": ref_params}, tokens, _positions(3, 3 * SEQ),
                                 return_cache=False)
  # when the decoder (recurrent kind under the layer scan, partial RoPE, biases, bf16-rounded
  # embedding scale) runs whole sequences 9 windows long,
  got = _forward_full_model(_decoder_params(reference), CFG, tokens)
  # then its float32 logits are the reference's.
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


def test_decoder_greedy_continuation_equals_the_reference(reference):
  # Given a prompt and the reference's greedy continuation well past the attention window,
  model_ref, ref_params, _ = reference
  prompt = jax.random.randint(jax.random.key(21), (2, 6), 0, CFG.vocab_size)
  steps = 3 * SEQ
  want_tokens, want_logits = _reference_greedy(model_ref, ref_params, prompt, steps)
  # when the decoder prefills the prompt into its cache and decodes one token per call,
  params = _decoder_params(reference)
  cache = cache_lib.init_cache(CFG, 2, 6 + steps)
  logits, cache = _forward_model(params, CFG, prompt, cache, last_only=True)
  got_tokens, got_logits = [], []
  for _ in range(steps):
    tok = jnp.argmax(logits[:, -1], axis=-1)[:, None]
    got_tokens.append(tok)
    got_logits.append(logits[:, -1])
    logits, cache = _forward_model(params, CFG, tok, cache)
  # then it continues with the reference's tokens, from the reference's logits.
  np.testing.assert_array_equal(jnp.concatenate(got_tokens, axis=1), want_tokens)
  np.testing.assert_allclose(jnp.stack(got_logits, axis=1), want_logits, atol=5e-5, rtol=0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_decoder_incremental_calls_equal_forward_full(reference, chunk):
  # Given ragged prompts (right-padded) and continuations fed K+1 tokens per call,
  params = _decoder_params(reference)
  seq = 3 * SEQ
  tokens = jax.random.randint(jax.random.key(22), (3, seq), 0, CFG.vocab_size)
  lengths = jnp.array([7, 3, 10])
  want = _forward_full_model(params, CFG, tokens)
  # when the prompts are prefilled (in chunks, or in one piece) and the rest goes K+1 at a time,
  cache = cache_lib.init_cache(CFG, 3, seq, K + 1)
  prompt = jnp.where(jnp.arange(10)[None] < lengths[:, None], tokens[:, :10], 0)
  if chunk:
    logits, cache = jax.jit(model.prefill, static_argnums=(1, 5))(params, CFG, prompt, cache,
                                                                   lengths, chunk)
  else:
    logits, cache = _forward_model(params, CFG, prompt, cache, lengths, last_only=True)
  np.testing.assert_allclose(logits[:, 0], want[jnp.arange(3), lengths - 1], atol=5e-5, rtol=0)
  # then every call's logits are forward_full's at the same positions.
  at = lengths
  while int(at.max()) + K + 1 <= seq:
    idx = at[:, None] + jnp.arange(K + 1)[None]
    logits, cache = _forward_model(params, CFG, jnp.take_along_axis(tokens, idx, axis=1), cache)
    np.testing.assert_allclose(logits, want[jnp.arange(3)[:, None], idx], atol=5e-5, rtol=0,
                               err_msg=f"positions {idx}")
    at = at + K + 1


def test_decoder_params_and_cache_have_logical_axes():
  # Given random decoder params (their shapes: no values are read) and a cache of the preset,
  params = jax.eval_shape(lambda key: model.init_params(CFG, key), jax.random.key(23))
  cache = cache_lib.init_cache(CFG, 2, 16, K + 1)
  # then every leaf has logical axes of its rank (what shardings and insert_rows read),
  axes = model.param_logical_axes(CFG)
  jax.tree.map(lambda ax, x: assert_rank(ax, x), axes, params, is_leaf=_is_axes)
  jax.tree.map(lambda ax, x: assert_rank(ax, x), cache_lib.logical_axes(cache), cache,
               is_leaf=_is_axes)
  # and a recurrent entry is the float32 state plus c-1 conv inputs, stacked per group.
  entry = cache.groups[0]
  assert isinstance(entry, recurrent.RecurrentState)
  assert entry.h.shape == (CFG.num_groups, 2, CFG.lru_width) and entry.h.dtype == jnp.float32
  assert entry.conv.shape == (CFG.num_groups, 2, CFG.conv1d_width - 1, CFG.lru_width)


def assert_rank(ax, x):
  assert len(ax) == x.ndim, (ax, x.shape)


def _is_axes(x):
  return isinstance(x, tuple) and bool(x) and all(a is None or isinstance(a, str) for a in x)


def test_inserting_a_row_replaces_its_recurrent_state(reference):
  # Given a cache whose row 1 holds another request's recurrent state,
  # (the old cache filled by the incremental test's K+1-token program)
  params = _decoder_params(reference)
  old = cache_lib.init_cache(CFG, 3, 3 * SEQ, K + 1)
  _, old = _forward_model(params, CFG, jnp.ones((3, K + 1), jnp.int32), old)
  fresh = cache_lib.init_cache(CFG, 1, 3 * SEQ, K + 1)
  _, fresh = _forward_model(params, CFG, jnp.full((1, 3), 2, jnp.int32), fresh)
  # when a freshly prefilled row is inserted at slot 1,
  got = cache_lib.insert_rows(old, fresh, jnp.array([1]))
  # then that row is the fresh one in every leaf, and rows 0 and 2 are untouched.
  def check(ax, g, o, f):
    axis = ax.index("batch")
    np.testing.assert_array_equal(jnp.take(g, 1, axis=axis), jnp.take(f, 0, axis=axis))
    for row in (0, 2):
      np.testing.assert_array_equal(jnp.take(g, row, axis=axis), jnp.take(o, row, axis=axis))
  jax.tree.map(check, cache_lib.logical_axes(got), got, old, fresh, is_leaf=_is_axes)
  assert isinstance(got.groups[0], recurrent.RecurrentState)


# ---------------------------------------------------------------- rollback in the decode loop

def _recurrent_states(cache):
  """Each recurrent entry's (h, conv), in depth order of the entries."""
  entries = cache_lib.recurrent_entries(cache)
  return [e for e in entries.groups + entries.remainder if e is not None]


def test_decode_rounds_keep_the_state_of_a_fresh_pass_over_the_kept_prefix(reference):
  # Given a recurrent target and a different recurrent draft in the speculative decode loop,
  # sampling at T = 1 (so rounds end in partial rejections), over ragged prompts,
  k = 3
  target = _decoder_params(reference)
  # (another draw of the reference's params, converted: an eager init_params compiles each of
  # its ops' shapes, ~200 small programs)
  other = recurrent_convert.convert_reference_params(
      _random_params(_reference_shapes(), seed=30), CFG)
  draft = _decoder_params((None, None, jax.tree.map(jnp.asarray, other)))
  spec = decode.LoopSpec(target=CFG, draft=CFG, k=k, k_max=k, max_top_k=0, max_len=48,
                         out_len=k + 1, eos_ids=())
  b = 4
  lengths = jnp.array([6, 1, 9, 4])
  prompts = jax.random.randint(jax.random.key(31), (b, 9), 0, CFG.vocab_size)
  rows = decode.Rows(jnp.ones((b,), jnp.float32), jnp.ones((b,), jnp.float32),
                     jnp.zeros((b,), jnp.int32), jnp.stack([jnp.arange(b), jnp.zeros(b)], 1)
                     .astype(jnp.uint32), jnp.full((b,), 1000, jnp.int32))
  state, _, _ = jax.jit(decode.prefill, static_argnums=0, static_argnames="with_draft")(
      spec, target, draft, prompts, lengths, rows, with_draft=True)
  round_ = jax.jit(decode.round_, static_argnums=0)
  fresh = jax.jit(lambda params, tokens, n: model.forward(
      params, CFG, tokens, cache_lib.init_cache(CFG, b, spec.max_len, k + 1), n)[1])
  partial = 0
  for _ in range(8):
    before = state.target_cache.length
    # when a round drafts K tokens, verifies K + 1 and rolls both caches back,
    state, _, _, _ = round_(spec, target, draft, state)
    accepted = state.target_cache.length - before - 1
    partial += int(jnp.sum((accepted > 0) & (accepted < k)))
    # then every kept recurrent state (target and draft, every layer, every row) is the state
    # a fresh forward over exactly the kept prefix computes.
    for name, params, cache in (("target", target, state.target_cache),
                                ("draft", draft, state.draft_cache)):
      want = fresh(params, state.tokens_bs, cache.length)
      for got_s, want_s in zip(_recurrent_states(cache), _recurrent_states(want)):
        _assert_state(got_s, want_s.h, want_s.conv,
                      msg=f"{name} lengths {cache.length} (accepted {accepted})")
  # (the rounds did roll back past rejected drafts, not only keep everything).
  assert partial >= 3


def test_a_released_style_reference_checkpoint_converts_to_a_servable_one(reference, tmp_path):
  # Given the reference's params saved as its released checkpoints are (an orbax PyTree),
  import orbax.checkpoint as ocp
  from spec_tpu.checkpoints import checkpoint
  model_ref, ref_params, _ = reference
  src, dst = tmp_path / "2b", tmp_path / "converted"
  ocp.PyTreeCheckpointer().save(src, jax.tree.map(np.asarray, ref_params))
  # when launch.convert --from=reference's function converts it,
  cfg = recurrent_convert.convert_reference_directory(src, dst, dtype="float32",
                                                      attention_window_size=WINDOW)
  # then the checkpoint restores (its config implies its shapes) and serves the reference's
  # logits through the one decoder.
  params, stored = checkpoint.restore(dst)
  assert stored == cfg and cfg.layer_pattern == CFG.layer_pattern and cfg.tokenizer == "gemma"
  tokens = jax.random.randint(jax.random.key(25), (1, SEQ), 0, CFG.vocab_size)
  want, _ = _jit_apply(model_ref)({"params": ref_params}, tokens, _positions(1, SEQ),
                                 return_cache=False)
  np.testing.assert_allclose(_forward_full_model(params, CFG, tokens), want, atol=5e-5, rtol=0)
  # and a source that is not such a checkpoint is one clear error.
  with pytest.raises(ReferenceConversionError, match="orbax"):
    recurrent_convert.convert_reference_directory(tmp_path, tmp_path / "x")


@pytest.mark.parametrize("drop", ["blocks.0/recurrent_block/conv_1d/w",
                                  "blocks.1/recurrent_block/rg_lru/a_gate/b"])
def test_launch_convert_names_a_missing_conv_or_gate_tensor_in_one_line(reference, tmp_path,
                                                                        drop):
  # Given a reference checkpoint missing a conv or gate tensor,
  import subprocess
  import sys
  import orbax.checkpoint as ocp
  params = jax.tree.map(np.asarray, reference[1])
  *path, leaf = drop.split("/")
  node = params
  for key in path:
    node = node[key]
  del node[leaf]
  ocp.PyTreeCheckpointer().save(tmp_path / "src", params)
  # when launch.convert --from=reference reads it,
  proc = subprocess.run([sys.executable, "-m", "launch.convert", "--from=reference",
                         f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'dst'}"],
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        capture_output=True, text=True, timeout=300)
  # then it fails with one line naming the tensor, and writes nothing.
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and drop in lines[0], proc.stderr
  assert not (tmp_path / "dst").exists()


def test_config_from_reference_params_is_the_tiny_preset(reference):
  cfg = recurrent_convert.config_from_reference(reference[1], attention_window_size=WINDOW,
                                                dtype="float32")
  assert cfg.replace(name=CFG.name, tokenizer=CFG.tokenizer) == CFG


# ---------------------------------------------------------------- transformers

def _hf_config(transformers, **kw):
  return transformers.RecurrentGemmaConfig(**dict(
      vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=2 * CFG.ffw_dim,
      num_attention_heads=CFG.num_heads, num_key_value_heads=1, lru_width=CFG.lru_width,
      attention_window_size=WINDOW, num_hidden_layers=CFG.num_layers, **kw))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """(transformers model, its safetensors index, converted config and params)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from spec_tpu.checkpoints.safetensors_io import SafetensorsIndex
  m = transformers.RecurrentGemmaForCausalLM(_hf_config(transformers)).eval()
  m.config._attn_implementation = "eager"
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith("recurrent_param"):
        continue  # keep the ring init: a in [0.9, 0.999]^(8r)
      if p.ndim == 1 or name.endswith("_bias"):
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
  path = tmp_path_factory.mktemp("hf_recurrentgemma")
  m.save_pretrained(path, safe_serialization=True)
  cfg = recurrent_convert.config_from_hf(m.config.to_dict())
  index = SafetensorsIndex(path)
  params = jax.tree.map(jnp.asarray, recurrent_convert.convert_hf_params(index, cfg))
  return m, index, cfg, params


def test_config_from_hf_is_the_tiny_preset(hf_model):
  cfg = hf_model[2]
  assert cfg.replace(name=CFG.name, tokenizer=CFG.tokenizer) == CFG
  assert cfg.sliding_window == WINDOW + 1  # the reference's window, not transformers'


def test_hf_logits_equal_within_the_window_and_differ_only_at_its_edge(hf_model):
  torch = pytest.importorskip("torch")
  m, _, cfg, params = hf_model
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, SEQ))
  with torch.no_grad():
    want = m(torch.tensor(tokens), use_cache=False).logits.numpy()
  got = np.asarray(_forward(params, cfg, jnp.asarray(tokens)))
  # Positions below W see every key under both readings of the window: equal.
  np.testing.assert_allclose(got[:, :WINDOW], want[:, :WINDOW], atol=1e-4, rtol=1e-5)
  # Past it spec_tpu (the reference's reading) sees one key more than transformers,
  assert float(np.abs(got[:, WINDOW:] - want[:, WINDOW:]).max()) > 1e-2
  # and that key is the only difference: with transformers' window the logits are equal.
  narrow = np.asarray(_forward(params, cfg.replace(sliding_window=WINDOW), jnp.asarray(tokens)))
  np.testing.assert_allclose(narrow, want, atol=1e-4, rtol=1e-5)


def test_decoder_after_launch_convert_path_equals_transformers(hf_model):
  # Given a transformers RecurrentGemmaForCausalLM converted as launch.convert --from=hf does
  # (hf.config_from_hf and hf.convert_params detect it and stack the layers for the decoder),
  torch = pytest.importorskip("torch")
  from spec_tpu.checkpoints import hf
  m, index, cfg, _ = hf_model
  assert hf.config_from_hf(m.config.to_dict()) == cfg
  params = jax.tree.map(jnp.asarray, hf.convert_params(index, cfg))
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, SEQ))
  with torch.no_grad():
    want = m(torch.tensor(tokens), use_cache=False).logits.numpy()
  # then the decoder's logits are transformers' below the window edge,
  got = np.asarray(_forward_full_model(params, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(got[:, :WINDOW], want[:, :WINDOW], atol=1e-4, rtol=1e-5)
  # and everywhere with transformers' (one key narrower) reading of the window.
  narrow = _forward_full_model(params, cfg.replace(sliding_window=WINDOW), jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(narrow), want, atol=1e-4, rtol=1e-5)


def test_hf_and_reference_conversions_agree_on_released_shapes():
  transformers = pytest.importorskip("transformers")
  # transformers' conversion script's 2B config: intermediate_size 15360 is a 7680 MLP.
  hf = transformers.RecurrentGemmaConfig(num_attention_heads=10, num_key_value_heads=1,
                                         hidden_size=2560, intermediate_size=15360,
                                         vocab_size=256000, num_hidden_layers=26)
  cfg = recurrent_convert.config_from_hf(hf.to_dict(), dtype="bfloat16")
  preset = config.get_preset("recurrentgemma_2b")
  assert cfg.replace(name=preset.name, tokenizer=preset.tokenizer) == preset


# ---------------------------------------------------------------- bad input

def test_a_missing_conv_or_gate_tensor_is_named(hf_model, reference):
  _, index, cfg, _ = hf_model
  tensors = {n: index.get(n) for n in index.names()}
  for name in ("model.layers.0.temporal_block.conv_1d.weight",
               "model.layers.3.temporal_block.rg_lru.recurrent_gate_weight",
               "model.layers.1.temporal_block.rg_lru.input_gate_bias"):
    broken = {n: a for n, a in tensors.items() if n != name}
    with pytest.raises(HFConversionError, match=f"missing tensor '{name}'"):
      recurrent_convert.convert_hf_params(_DictIndex(broken), cfg)
  ref_params = reference[1]
  for block, path in ((0, ("conv_1d", "w")), (1, ("rg_lru", "a_gate", "b"))):
    broken = jax.tree.map(lambda a: a, ref_params)
    parent = broken[f"blocks.{block}"]["recurrent_block"]
    for key in path[:-1]:
      parent = parent[key]
    del parent[path[-1]]
    name = f"blocks.{block}/recurrent_block/" + "/".join(path)
    with pytest.raises(ReferenceConversionError, match=f"missing tensor '{name}'"):
      recurrent_convert.convert_reference_params(broken, CFG)


def test_a_layer_pattern_that_does_not_match_the_checkpoint_is_refused(hf_model, reference):
  _, index, cfg, _ = hf_model
  wrong = cfg.replace(layer_pattern=(RECURRENT, LOCAL))  # layer 1 is recurrent in the weights
  with pytest.raises(HFConversionError, match=r"layer 1 .* recurrent .*layer_pattern"):
    recurrent_convert.convert_hf_params(index, wrong)
  with pytest.raises(ReferenceConversionError, match=r"blocks.1 .* recurrent .*layer_pattern"):
    recurrent_convert.convert_reference_params(reference[1], wrong)
  fewer = cfg.replace(num_layers=3)  # the checkpoint's 4th layer would be dropped
  with pytest.raises(HFConversionError, match="unexpected tensor 'model.layers.3"):
    recurrent_convert.convert_hf_params(index, fewer)


def test_unsupported_hf_config_fields_are_named():
  transformers = pytest.importorskip("transformers")
  base = _hf_config(transformers).to_dict()
  for change, field in ((dict(attention_bias=True), "attention_bias"),
                        (dict(block_types=["recurrent", "mlp"]), "block_types"),
                        (dict(hidden_activation="gelu"), "hidden_activation"),
                        (dict(intermediate_size=97), "intermediate_size"),
                        (dict(architectures=["GemmaForCausalLM"], model_type="gemma"),
                         "not a RecurrentGemma")):
    with pytest.raises(HFConversionError, match=field):
      recurrent_convert.config_from_hf({**base, **change})


# ---------------------------------------------------------------- config and presets

@pytest.mark.parametrize("name, preset", [("recurrentgemma_2b", "RECURRENT_GEMMA_2B_V1"),
                                          ("recurrentgemma_9b", "RECURRENT_GEMMA_9B_V1")])
def test_presets_are_the_reference_packages(name, preset):
  ref = rg_common.GriffinConfig.from_preset(getattr(rg_common.Preset, preset))
  cfg = config.get_preset(name)
  assert (cfg.vocab_size, cfg.d_model, cfg.ffw_dim, cfg.num_heads, cfg.recurrent_width,
          cfg.num_layers) == (ref.vocab_size, ref.width, ref.mlp_expanded_width, ref.num_heads,
                              ref.lru_width, ref.num_layers)
  kinds = {rg_common.TemporalBlockType.RECURRENT: RECURRENT,
           rg_common.TemporalBlockType.ATTENTION: LOCAL}
  assert cfg.layer_types == tuple(kinds[k] for k in ref.block_types)
  assert cfg.sliding_window == ref.attention_window_size + 1
  assert cfg.final_logit_softcap == ref.logits_soft_cap
  assert cfg.head_dim * cfg.num_heads == ref.width and cfg.num_kv_heads == 1
  assert cfg.scale_embeddings and cfg.embed_scale_dtype == "bfloat16" and cfg.tokenizer == "gemma"
  # num_params counts what the reference model allocates (abstract init: nothing allocated).
  shapes = jax.eval_shape(lambda: rg_griffin.Griffin(ref, gradient_checkpointing=False).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)))
  assert cfg.num_params() == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_embedding_scale_is_rounded_to_bfloat16():
  cfg = config.get_preset("recurrentgemma_2b")
  assert float(recurrent.embedding_scale(cfg, jnp.float32)) == 50.5  # sqrt(2560) = 50.596
  gemma = config.get_preset("gemma_2b").replace(dtype="float32")
  assert float(recurrent.embedding_scale(gemma, jnp.float32)) == np.float32(math.sqrt(2048))


def test_recurrent_configs_are_validated():
  assert config.ModelConfig.from_dict(CFG.to_dict()) == CFG
  with pytest.raises(ValueError, match="lru_width .* multiple of num_heads"):
    CFG.replace(lru_width=26)
  with pytest.raises(ValueError, match="rope_fraction"):
    CFG.replace(rope_fraction=0.3)
  with pytest.raises(ValueError, match="layer_pattern"):
    CFG.replace(layer_pattern=(RECURRENT, "mamba"))
  with pytest.raises(ValueError, match="embed_scale_dtype"):
    CFG.replace(embed_scale_dtype="int8")
  with pytest.raises(ValueError, match="conv1d_width"):
    CFG.replace(conv1d_width=0)


def test_verification_memory_is_k_plus_1_states_per_recurrent_layer():
  cfg = config.get_preset("recurrentgemma_9b")
  assert sum(kind == RECURRENT for kind in cfg.layer_types) == 26
  # b (K+1) w float32 states plus b (K+1) w bfloat16 conv inputs, for each of 26 layers.
  assert recurrent.verification_trace_bytes(cfg, batch=1, spec_tokens=5) == 26 * 5 * 4096 * 6
  assert recurrent.verification_trace_bytes(config.get_preset("gemma_2b"), 8, 5) == 0
