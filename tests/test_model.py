"""The decoder with a KV cache computes exactly what a full recompute of the sequence does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, layout, model

FAMILIES = ["tiny", "tiny_gemma2", "tiny_gemma3"]

# One compiled program per call shape, shared by the tests: an eager forward dispatches hundreds
# of ops and costs a few times its compile. Tests that patch a module constant the trace reads
# (ATTENTION_BLOCK, CPU_COPY_MIN_BYTES) jit a fresh function instead: these would reuse a trace.
_forward = jax.jit(model.forward, static_argnums=1, static_argnames=("last_only", "unrolled"))
_prefill = jax.jit(model.prefill, static_argnums=1, static_argnames="chunk")
_forward_full = jax.jit(model.forward_full, static_argnums=1, static_argnames="unrolled")


def _params(name, num_layers=None):
  cfg = config.get_preset(name)
  return _init(cfg if num_layers is None else cfg.replace(num_layers=num_layers))


@functools.lru_cache
def _init(cfg):
  # One init per config in the file: an eager init costs a second or two of CPU each time.
  return cfg, model.init_params(cfg, jax.random.key(0))


def _setup(name, batch=3, seq=24, num_layers=None):
  cfg, params = _params(name, num_layers)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
  return cfg, params, tokens


@functools.lru_cache
def _full(name, num_layers=None):
  """The full recompute of _setup's tokens (3 x 24), shared by the tests that compare against
  it (one program per config)."""
  cfg, params, tokens = _setup(name, num_layers=num_layers)
  return tokens, _forward_full(params, cfg, tokens)


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_prefill_then_decode_matches_full_recompute(name):
  # Given rows with prompts of different lengths, longer than the local window (5-6 tokens),
  cfg, params = _params(name)
  tokens, full = _full(name)
  lengths = jnp.array([9, 3, 12])
  prompt = jnp.where(jnp.arange(12)[None] < lengths[:, None], tokens[:, :12], 0)
  cache = cache_lib.init_cache(cfg, 3, 32, spec_tokens=5)  # the rollback test's decode steps
  # when they are prefilled together and then decoded one token at a time,
  logits, cache = _forward(params, cfg, prompt, cache, lengths)
  for i in range(3):
    np.testing.assert_allclose(logits[i, :lengths[i]], full[i, :lengths[i]], atol=2e-5)
  for step in range(10):
    pos = lengths + step
    logits, cache = _forward(params, cfg, tokens[jnp.arange(3), pos][:, None], cache)
    # then every step's logits equal the full recompute at that position.
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(3), pos], atol=2e-5)
  assert cache.length.tolist() == (lengths + 10).tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_rollback_is_a_pointer_move(name):
  # Given a cache that received K+1 speculative tokens of which only some are kept,
  cfg, params = _params(name)
  tokens, full = _full(name)
  k = 4
  cache = cache_lib.init_cache(cfg, 3, 32, spec_tokens=k + 1)
  # (8 tokens prefilled through the ragged test's 12-token program)
  prompt = jnp.where(jnp.arange(12)[None] < 8, tokens[:, :12], 0)
  _, cache = _forward(params, cfg, prompt, cache, jnp.array([8, 8, 8]))
  wrong = (tokens[:, 8:8 + k + 1] + 7) % cfg.vocab_size  # tokens that will be rejected
  _, cache = _forward(params, cfg, wrong, cache)
  kept = jnp.array([0, 3, k + 1])  # none of the block, 3 wrong tokens, all of them
  cache = cache_lib.rollback(cache, 8 + kept)
  # when decoding goes on from the kept length with the true tokens (rows 1-2 re-write them),
  for step in range(12):
    toks = tokens[:, 8 + step]
    logits, cache = _forward(params, cfg, toks[:, None],
                             cache._replace(length=jnp.full((3,), 8 + step, jnp.int32)))
    # then the result is as if the rejected tokens had never been written.
    np.testing.assert_allclose(logits[:, 0], full[:, 8 + step], atol=2e-5)


def test_prefill_longer_than_ring_buffer_keeps_the_window():
  # (the cache and the decode step's program of the tests above)
  cfg, params = _params("tiny_gemma2")
  tokens, full = _full("tiny_gemma2")
  cache = cache_lib.init_cache(cfg, 3, 32, spec_tokens=5)  # local rings of 6 + 5 slots
  assert min(cache_lib.layer_slots(cfg, 32, spec_tokens=5)) == cfg.sliding_window + 5 < 19
  logits, cache = _forward(params, cfg, tokens[:, :19], cache)  # a prompt of 19
  np.testing.assert_allclose(logits, full[:, :19], atol=2e-5)
  for pos in range(19, 24):
    logits, cache = _forward(params, cfg, tokens[:, pos:pos + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=2e-5)


# Depths with a remainder after the last whole period of the pattern: 5 = 2 * (local, global) + 1,
# 8 = 2 * (local, local, global) + 2.
SCAN_CASES = [("tiny", 2), ("tiny_gemma2", 5), ("tiny_gemma3", 8)]


def _prefill_then_step(params, cfg, tokens, unrolled=False):
  """Ragged prompts (9 and 7 of the first 9 tokens) prefilled into a 16-slot cache, then a
  2-token step: (prefill logits, step logits, cache). One program where it is jitted."""
  cache = cache_lib.init_cache(cfg, 2, 16, spec_tokens=2)
  prefill, cache = model.forward(params, cfg, tokens[:2, :9], cache, jnp.array([9, 7]),
                                 unrolled=unrolled)
  step, cache = model.forward(params, cfg, tokens[:2, 9:11], cache, unrolled=unrolled)
  return prefill, step, cache


def _unrolled_run(params, cfg, tokens):
  return (model.forward_full(params, cfg, tokens, unrolled=True),
          *_prefill_then_step(params, cfg, tokens, unrolled=True))


@functools.lru_cache
def _layers_run(name, num_layers, unrolled):
  """(full logits, prefill logits, a 2-token step's logits, the cache) of the layer scan
  (unrolled False) or of a Python loop over the layers in depth order (True), each in one
  program; the scan's full logits are the shared full recompute, and its run is also the CPU
  forms test's reference."""
  cfg, params = _params(name, num_layers)
  tokens, full = _full(name, num_layers)
  if unrolled:
    return jax.jit(_unrolled_run, static_argnums=1)(params, cfg, tokens)
  return (full, *jax.jit(_prefill_then_step, static_argnums=1)(params, cfg, tokens))


@pytest.mark.parametrize("name,num_layers", SCAN_CASES)
def test_scanned_layers_compute_the_layer_by_layer_reference(name, num_layers):
  # Given a model whose depth is not a whole number of pattern periods,
  # when it runs under the layer scan and as a Python loop over the layers in depth order,
  got, want = _layers_run(name, num_layers, False), _layers_run(name, num_layers, True)
  # then logits (full, prefill, a 2-token step) and every cache entry agree to float32 rounding.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cpu_forms_for_large_layers_compute_what_the_scan_does(monkeypatch):
  """On CPU, layer groups and short caches of at least CPU_COPY_MIN_BYTES run unrolled and are
  read through the block loop; forced on for a tiny model (local ring layers, a remainder),
  they compute the prefill, a 2-token step and the caches the scan and the one-piece read do."""
  cfg, params = _params("tiny_gemma2", 5)
  tokens = _full("tiny_gemma2", 5)[0]
  # The scan with the default threshold (the tiny layers are far below it): the shared run,
  # made before the patch below.
  scanned = _layers_run("tiny_gemma2", 5, False)[1:]
  monkeypatch.setattr(model, "CPU_COPY_MIN_BYTES", 0)
  forced = jax.jit(lambda p, t: _prefill_then_step(p, cfg, t))(params, tokens)  # traced anew
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(forced)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_params_and_caches_are_stacked_per_pattern_period():
  # Given Gemma 3's shape with 8 layers of pattern (local, local, global): 2 groups + 2 layers,
  cfg, params = _params("tiny_gemma3", 8)
  cache = cache_lib.init_cache(cfg, batch=3, max_len=20, spec_tokens=2)
  # then each pattern position is one stacked entry and the remainder is unstacked,
  assert [e["attn"]["q"].shape for e in params["groups"]] == [(2, 4, 32, 8)] * 3  # l h d e
  assert [e["attn"]["q"].shape for e in params["remainder"]] == [(4, 32, 8)] * 2
  assert [e.k.shape for e in cache.groups] == [(2, 3, 1, 7, 8)] * 2 + [(2, 3, 1, 20, 8)]  # l b k s e
  assert [e.k.shape for e in cache.remainder] == [(3, 1, 7, 8)] * 2  # two local rings
  # layer i = 3 g + j sits at groups[j][g], layer 6 + r at remainder[r],
  assert [layout.where(cfg, i) for i in (0, 4, 5, 6, 7)] == [
      ("groups", 0, 0), ("groups", 1, 1), ("groups", 2, 1), ("remainder", 0, None),
      ("remainder", 1, None)]
  # and unstacking then stacking gives the same pytree back.
  layers = layout.unstack(cfg, params["groups"], params["remainder"])
  assert len(layers) == 8 and layers[5]["attn"]["q"].shape == (4, 32, 8)
  groups, remainder = layout.stack(cfg, layers, jnp.stack)
  again = dict(params, groups=groups, remainder=remainder)
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["tiny_gemma3", "tiny_gemma4"])
def test_shared_rope_tables_rotate_as_each_layer_alone(monkeypatch, name):
  # Given a model whose local and global layers rotate differently (bases, Gemma 4's
  # proportional RoPE and larger global heads),
  cfg, params = _params(name)
  # when its forward calls share one RoPE table per kind (few tokens: the shared full
  # recompute) and when every layer computes its own (ROPE_TABLE_MAX_TOKENS 0),
  tokens, shared = _full(name)
  assert tokens.size <= model.ROPE_TABLE_MAX_TOKENS
  monkeypatch.setattr(model, "ROPE_TABLE_MAX_TOKENS", 0)
  alone = jax.jit(lambda p, t: model.forward_full(p, cfg, t))(params, tokens)  # traced anew
  # then the logits agree to float32 rounding (XLA:CPU's sine and cosine fused into a rotation
  # and computed alone can differ in the last bits).
  np.testing.assert_allclose(shared, alone, atol=2e-5)


@pytest.mark.parametrize("name,num_layers", SCAN_CASES[1:])
def test_chunked_prefill_equals_one_call(name, num_layers):
  # Given ragged prompts longer than the chunk and than every local window (5-6 tokens),
  cfg, params = _params(name, num_layers)
  every, full = _full(name, num_layers)  # causal: its first 15 positions see only these
  tokens = every[:, :15]
  lengths = jnp.array([15, 4, 9])
  cache = cache_lib.init_cache(cfg, 3, 24, spec_tokens=3)
  # when prefilled in chunks of 4 tokens (15 is not a multiple) and in one call,
  chunked = _prefill(params, cfg, tokens, cache, lengths, chunk=4)
  whole = _forward(params, cfg, tokens, cache, lengths, last_only=True)
  # then the last-token logits and the whole cache agree (float32 rounding),
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # and both are the full recompute's logits at each row's last token.
  np.testing.assert_allclose(chunked[0][:, 0], full[jnp.arange(3), lengths - 1], atol=2e-5)


@pytest.mark.parametrize("name,num_layers", SCAN_CASES[1:])
def test_blockwise_cache_attention_matches_full_recompute(monkeypatch, name, num_layers):
  # Given caches read 4 slots at a time (global caches of 30 slots end in a clamped block,
  # local rings of 8-9 slots wrap),
  monkeypatch.setattr(model, "ATTENTION_BLOCK", 4)
  cfg, params = _params(name, num_layers)
  tokens, full = _full(name, num_layers)  # reads no cache: no attention blocks
  lengths = jnp.array([12, 3, 7])
  cache = cache_lib.init_cache(cfg, 3, 30, spec_tokens=3)
  # when ragged prompts are prefilled, then decoded token by token,
  fwd = jax.jit(lambda p, t, c, n=None: model.forward(p, cfg, t, c, n))  # traced anew
  logits, cache = fwd(params, tokens[:, :12], cache, lengths)
  for i, n in enumerate(lengths.tolist()):
    np.testing.assert_allclose(logits[i, :n], full[i, :n], atol=2e-5)
  for step in range(12):
    pos = lengths + step
    logits, cache = fwd(params, tokens[jnp.arange(3), pos][:, None], cache)
    # then every step equals the full recompute.
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(3), pos], atol=2e-5)


def test_cache_blocks_past_the_fullest_row_are_never_read(monkeypatch):
  # Given a 32-slot cache read 4 slots at a time, rows holding at most 9 tokens (blocks 0-2),
  monkeypatch.setattr(model, "ATTENTION_BLOCK", 4)
  cfg, params = _params("tiny")
  tokens, full = _full("tiny")  # reads no cache: no attention blocks
  tokens = tokens[:2, :10]
  cache = cache_lib.init_cache(cfg, 2, 32)
  fwd = jax.jit(lambda p, t, c, n: model.forward(p, cfg, t, c, n))  # traced anew
  _, cache = fwd(params, tokens[:, :9], cache, jnp.array([9, 5]))
  # whose slots from 12 on hold NaN (anything read there would poison the output: p * NaN),
  poison = lambda a: a.at[..., 12:, :].set(jnp.nan)  # noqa: E731
  cache = cache._replace(groups=tuple(jax.tree.map(poison, e) for e in cache.groups))
  # when the next token is decoded, then the logits are finite and right.
  logits, _ = fwd(params, tokens[:, 9:10], cache, jnp.array([1, 1]))
  assert jnp.all(jnp.isfinite(logits))
  np.testing.assert_allclose(logits[0, 0], full[0, 9], atol=2e-5)


def test_fewer_layers_than_one_period_are_all_remainder():
  cfg = config.get_preset("tiny_gemma3").replace(num_layers=2)
  params = model.init_params(cfg, jax.random.key(0))
  assert params["groups"] == [] and len(params["remainder"]) == 2
  tokens = jnp.arange(8)[None] % cfg.vocab_size
  np.testing.assert_allclose(_forward_full(params, cfg, tokens),
                             _forward_full(params, cfg, tokens, unrolled=True), atol=1e-5)


def test_local_layer_memory_grows_with_the_window_not_the_context():
  cfg = config.get_preset("gemma3_27b")
  slots = cache_lib.layer_slots(cfg, max_len=128_000, spec_tokens=5)
  kinds = cfg.layer_types
  assert {s for s, kind in zip(slots, kinds) if kind == config.LOCAL} == {1024 + 5}
  assert {s for s, kind in zip(slots, kinds) if kind == config.GLOBAL} == {128_000}


def test_padding_rows_of_the_vocabulary_get_no_mass():
  cfg = config.get_preset("tiny").replace(vocab_size=80, valid_vocab_size=64)
  params = model.init_params(cfg, jax.random.key(0))
  logits = model.forward_full(params, cfg, jnp.zeros((1, 4), jnp.int32))
  assert jnp.all(jnp.isneginf(logits[..., 64:]))
  assert jnp.all(jnp.isfinite(logits[..., :64]))


def test_bad_configs_are_refused_with_a_reason():
  base = config.get_preset("tiny")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    base.replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="sliding_window"):
    base.replace(layer_pattern=("local",))
  with pytest.raises(ValueError, match="ffw_activation"):
    base.replace(ffw_activation="relu")
  # A dtype that is not a float type would truncate every weight (int8) or fail in a jnp call.
  for dtype in ("int8", "float64", "bfloat61"):
    with pytest.raises(ValueError, match="dtype must be one of"):
      base.replace(dtype=dtype)
  # Values that turn every output into NaN or garbage without an error.
  for field, value in (("norm_eps", -1e-6), ("rope_base_global", 0.0),
                       ("rope_scale_local", float("nan")), ("final_logit_softcap", 0.0),
                       ("query_scale", -1.0)):
    with pytest.raises(ValueError, match=f"{field} must be"):
      base.replace(**{field: value})
  with pytest.raises(KeyError, match="unknown model preset"):
    config.get_preset("gpt5")
  with pytest.raises(ValueError, match="unknown ModelConfig fields"):
    config.ModelConfig.from_dict({**base.to_dict(), "n_layer": 3})
  assert config.ModelConfig.from_dict(base.to_dict()) == base


def test_presets_have_the_published_shapes():
  g2 = config.get_preset("gemma2_27b")
  assert g2.layer_types[:4] == ("local", "global", "local", "global")
  g3 = config.get_preset("gemma3_1b")
  assert g3.layer_types[:6] == ("local",) * 5 + ("global",)
  chin = config.get_preset("chinchilla_70b")
  assert (chin.num_layers, chin.d_model, chin.num_heads, chin.head_dim) == (80, 8192, 64, 128)
  draft = config.get_preset("chinchilla_4b_draft")
  assert (draft.num_layers, draft.d_model, draft.num_heads) == (8, 6144, 48)
  assert 6.5e9 < config.get_preset("llama_7b").num_params() < 6.9e9


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_cache_write_sets_exactly_the_valid_tokens_bits(dtype):
  # Given a stacked cache (l b k s e) of bfloat16 (stored as its uint16 bits), float16 or
  # float32, and new tokens of which some are padding,
  rng = np.random.default_rng(0)
  old = jnp.asarray(rng.standard_normal((3, 2, 2, 8, 4)), dtype)
  store = cache_lib.stored_dtype(dtype)
  stored = jax.lax.bitcast_convert_type(old, store) if store != dtype else old
  k = jnp.asarray(rng.standard_normal((2, 2, 3, 4)), dtype)
  positions = jnp.array([[5, 6, 7], [9, 10, 11]])  # row 1 wraps around the ring of 8
  valid = jnp.array([[True, True, False], [True, True, True]])
  # when layer 1's update is written,
  got = cache_lib.write(cache_lib.KVCache(stored, stored), k, k, positions, valid, ring=True,
                        index=1)
  # then exactly the valid tokens' slots of layer 1 change, to exactly the new values.
  want = np.asarray(old.astype(jnp.float32)).copy()
  for r in range(2):
    for j in range(3):
      if valid[r, j]:
        want[1, r, :, int(positions[r, j]) % 8] = np.asarray(k[r, :, j].astype(jnp.float32))
  assert got.k.dtype == store == (jnp.uint16 if dtype == jnp.bfloat16 else dtype)
  np.testing.assert_array_equal(np.asarray(cache_lib.values(got.k).astype(jnp.float32)), want)


def test_a_decode_step_never_passes_over_the_whole_cache():
  """A long bfloat16 cache costs a decode step only its filled blocks: in the compiled CPU step
  no instruction but the in-place write makes an array the size of a layer's (or the stacked)
  cache: no float32 conversion, no copy, no view of it (each was there once, README "Context
  length"; XLA:CPU scatters a bfloat16 array through float32)."""
  from spec_tpu import pair as sampler
  cfg = config.get_preset("tiny").replace(num_layers=3, dtype="bfloat16")
  params = model.init_params(cfg, jax.random.key(0))
  slots = 4 * model.ATTENTION_BLOCK

  def step(params, cache, tokens):
    return model.forward(params, cfg, tokens, cache)

  cache = cache_lib.init_cache(cfg, 1, slots)._replace(length=jnp.array([5], jnp.int32))
  text = jax.jit(step, donate_argnums=1).lower(params, cache, jnp.ones((1, 1), jnp.int32)).compile(
      sampler.compiler_options("cpu")).as_text()
  layer_shape = ",".join(map(str, cache.groups[0].k.shape[1:]))
  whole = [line for line in text.splitlines()
           if f"{layer_shape}]" in line.split("=", 1)[-1].split("(", 1)[0]
           and any(op in line for op in (" convert(", " copy(", " bitcast-convert(",
                                          "kind=kLoop", "kind=kInput"))
           and "scatter" not in line]
  assert not whole, "\n".join(whole)


@pytest.mark.parametrize("b,t", [(1, 1), (1, 5), (3, 2)])
@pytest.mark.parametrize("heads_major", [False, True])
def test_heads_batched_projection_equals_the_einsum(b, t, heads_major):
  """The GPU form of the per-head projections (batched over heads, one token computed twice)
  is the same product as the einsum every platform runs; checked here on CPU in float32."""
  from spec_tpu.models import layers
  x = jax.random.normal(jax.random.PRNGKey(b * 10 + t), (b, t, 24), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(7), (3, 24, 8), jnp.float32)
  spec = "btd,hde->bhte" if heads_major else "btd,hde->bthe"
  want = jnp.einsum(spec, x, w, precision="highest")
  got = layers.heads_batched(x, w, heads_major)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Off GPU, project_heads is the einsum itself.
  np.testing.assert_array_equal(layers.project_heads(x, w, heads_major), jnp.einsum(spec, x, w))


@pytest.mark.parametrize("platform,quantized", [("cpu", True), ("gpu", False), ("gpu", True)])
def test_compiler_options_are_options_xla_knows(platform, quantized):
  """A misspelt option fails compilation ("No such compile option"); XLA accepts every
  platform's option names in any compile, so the GPU ones are checked on CPU too."""
  from spec_tpu import pair as sampler
  options = sampler.compiler_options(platform, quantized)
  assert options
  if platform == "gpu":  # int8 weights keep Triton's gemm fusions (they convert in the matmul)
    assert ("xla_gpu_enable_triton_gemm" in options) != quantized
  f = jax.jit(lambda x: x @ x)
  assert f.lower(jnp.ones((4, 4))).compile(options)(jnp.ones((4, 4))).shape == (4, 4)
  with pytest.raises(Exception, match="No such compile option"):
    f.lower(jnp.ones((4, 4))).compile({**options, "xla_no_such_option": True})
