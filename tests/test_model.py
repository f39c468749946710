"""The decoder with a KV cache computes exactly what a full recompute of the sequence does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, model

FAMILIES = ["tiny", "tiny_gemma2", "tiny_gemma3"]


def _setup(name, batch=3, seq=24):
  cfg = config.get_preset(name)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
  return cfg, params, tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_prefill_then_decode_matches_full_recompute(name):
  # Given rows with prompts of different lengths, longer than the local window (5-6 tokens),
  cfg, params, tokens = _setup(name)
  full = model.forward_full(params, cfg, tokens)
  lengths = jnp.array([9, 3, 12])
  prompt = jnp.where(jnp.arange(12)[None] < lengths[:, None], tokens[:, :12], 0)
  cache = cache_lib.init_cache(cfg, 3, 32, spec_tokens=4)
  # when they are prefilled together and then decoded one token at a time,
  logits, cache = model.forward(params, cfg, prompt, cache, lengths)
  for i in range(3):
    np.testing.assert_allclose(logits[i, :lengths[i]], full[i, :lengths[i]], atol=2e-5)
  fwd = jax.jit(model.forward, static_argnums=1)
  for step in range(10):
    pos = lengths + step
    logits, cache = fwd(params, cfg, tokens[jnp.arange(3), pos][:, None], cache)
    # then every step's logits equal the full recompute at that position.
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(3), pos], atol=2e-5)
  assert cache.length.tolist() == (lengths + 10).tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_rollback_is_a_pointer_move(name):
  # Given a cache that received K+1 speculative tokens of which only some are kept,
  cfg, params, tokens = _setup(name, batch=2)
  full = model.forward_full(params, cfg, tokens)
  k = 4
  cache = cache_lib.init_cache(cfg, 2, 32, spec_tokens=k + 1)
  _, cache = model.forward(params, cfg, tokens[:, :8], cache)
  wrong = (tokens[:, 8:8 + k + 1] + 7) % cfg.vocab_size  # tokens that will be rejected
  _, cache = model.forward(params, cfg, wrong, cache)
  kept = jnp.array([0, 3])  # row 0 keeps nothing of the block, row 1 keeps 3 wrong tokens
  cache = cache_lib.rollback(cache, 8 + kept)
  # when decoding goes on from the kept length with the true tokens (row 1 re-writes them),
  for step in range(12):
    pos = jnp.array([8 + step, 8 + step])
    toks = tokens[jnp.arange(2), pos]
    logits, cache = model.forward(params, cfg, toks[:, None],
                                  cache._replace(length=jnp.array([8 + step, 8 + step])))
    # then the result is as if the rejected tokens had never been written.
    np.testing.assert_allclose(logits[:, 0], full[:, 8 + step], atol=2e-5)


def test_prefill_longer_than_ring_buffer_keeps_the_window():
  cfg, params, tokens = _setup("tiny_gemma2", batch=2, seq=30)
  full = model.forward_full(params, cfg, tokens)
  cache = cache_lib.init_cache(cfg, 2, 40)  # local ring of 6 slots, prompt of 25
  assert min(cache_lib.layer_slots(cfg, 40)) == cfg.sliding_window
  logits, cache = model.forward(params, cfg, tokens[:, :25], cache)
  np.testing.assert_allclose(logits, full[:, :25], atol=2e-5)
  for pos in range(25, 30):
    logits, cache = model.forward(params, cfg, tokens[:, pos:pos + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=2e-5)


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
