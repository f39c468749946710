"""Gemma 4 text in the one decoder: converted tiny random transformers models reproduce
transformers' logits (prompts longer than the sliding window), incremental decoding with the
cache equals a full recompute, and both config.json layouts map to the same model.

Two cases: the dense form with k_eq_v global layers (31B-like: two head sizes and KV head
counts) as Gemma4ForCausalLM, and the PLE + kv-sharing form (E2B-like, double-wide MLP in the
shared tail) as the text half of Gemma4ForConditionalGeneration.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.checkpoints import checkpoint, hf, hf_gemma4
from spec_tpu.checkpoints.hf import HFConversionError
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import model
from spec_tpu.models.config import GLOBAL, LOCAL, get_preset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 64
SEQ = 20  # longer than every window below
S, F = "sliding_attention", "full_attention"
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, head_dim=8,
             global_head_dim=16, sliding_window=5, final_logit_softcapping=30.0,
             vocab_size_per_layer_input=VOCAB)
CASES = {
  # 6 layers (S, S, F): global layers with 1 KV head of 16, local with 2 of 8; no PLE.
  "dense_k_eq_v": dict(_TEXT, intermediate_size=64, num_hidden_layers=6, num_key_value_heads=2,
                       num_global_key_value_heads=1, attention_k_eq_v=True,
                       hidden_size_per_layer_input=0, layer_types=[S, S, F] * 2),
  # 8 layers (S, F): the last 3 read layers 3 (F) and 4 (S); PLE of 8 per layer.
  "ple_kv_shared": dict(_TEXT, intermediate_size=48, num_hidden_layers=8, num_key_value_heads=1,
                        hidden_size_per_layer_input=8, num_kv_shared_layers=3,
                        use_double_wide_mlp=True, layer_types=[S, F] * 4),
}

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_forward_full = jax.jit(model.forward_full, static_argnums=1, compiler_options=_FAST_COMPILE)
_forward = jax.jit(model.forward, static_argnums=1, compiler_options=_FAST_COMPILE)
_forward_last = jax.jit(model.forward, static_argnums=1, compiler_options=_FAST_COMPILE,
                        static_argnames=("last_only", "final_hidden"))


def _torch():
  return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _build_hf(torch, transformers, case, path):
  text = transformers.Gemma4TextConfig(**CASES[case])
  if case == "dense_k_eq_v":
    config, cls = text, transformers.Gemma4ForCausalLM
  else:
    config = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None,
                                       audio_config=None)
    cls = transformers.Gemma4ForConditionalGeneration
  m = cls(config).eval()
  m.config._attn_implementation = "eager"
  _randomize(torch, m, 0)
  m.save_pretrained(path, safe_serialization=True)
  return m


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  torch, transformers = _torch()
  root = tmp_path_factory.mktemp(request.param)
  hf_model = _build_hf(torch, transformers, request.param, root / "hf")
  hf.convert_directory(root / "hf", root / "ckpt")
  params, cfg = checkpoint.restore(root / "ckpt")
  return request.param, hf_model, params, cfg


def _tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (b, t), dtype=np.int32)


def _rel_err(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_logits_match_transformers(converted):
  case, hf_model, params, cfg = converted
  torch, _ = _torch()
  tokens = _tokens(2, SEQ)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(_forward_full(params, cfg, tokens))
  err = _rel_err(got, want)
  assert err < 1e-5, f"{case}: relative logits error {err:.2e}"
  if case == "dense_k_eq_v":  # proportional RoPE must matter here, or parity proves nothing of it
    plain = np.asarray(_forward_full(params, cfg.replace(rope_proportion_global=1.0), tokens))
    assert _rel_err(plain, want) > 1e-3


def test_incremental_decoding_equals_full_recompute(converted, max_len=None):
  """Given a prompt longer than the window, when K + 1 = 3 tokens at a time follow through the
  cache (a ring of window + 3 slots on local layers), then every logit equals the full
  recompute's; kv-shared layers hold no cache of their own."""
  case, _, params, cfg = converted
  tokens = _tokens(2, 8 + 3 * 4, seed=1)
  want = np.asarray(_forward_full(params, cfg, tokens))
  cache = cache_lib.init_cache(cfg, 2, max_len or tokens.shape[1], spec_tokens=3)
  entries = len(jax.tree.leaves(cache.groups + cache.remainder)) // 2
  assert len(cache.groups) * cfg.num_groups + len(cache.remainder) == cfg.num_cached_layers
  assert entries == len(cache.groups) + len(cache.remainder)
  got = []
  logits, cache = _forward(params, cfg, tokens[:, :8], cache)
  got.append(logits)
  for at in range(8, tokens.shape[1], 3):
    logits, cache = _forward(params, cfg, tokens[:, at:at + 3], cache)
    got.append(logits)
  got = np.concatenate([np.asarray(g) for g in got], axis=1)
  assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("converted", ["ple_kv_shared"], indirect=True)
def test_incremental_decoding_over_a_long_cache(converted):
  """The same with global caches longer than model.ATTENTION_BLOCK, read block by block as far
  as filled: kv-shared layers pass their donor's cache through that loop before it is written."""
  assert 520 > model.ATTENTION_BLOCK
  test_incremental_decoding_equals_full_recompute(converted, max_len=520)


def test_converted_config_shapes(converted):
  case, _, _, cfg = converted
  assert (cfg.kind_head_dim(LOCAL), cfg.kind_head_dim(GLOBAL)) == (8, 16)
  if case == "dense_k_eq_v":
    assert cfg.global_k_eq_v and (cfg.kind_kv_heads(LOCAL), cfg.kind_kv_heads(GLOBAL)) == (2, 1)
  else:
    assert cfg.ple_dim == 8 and cfg.kv_shared_layers == 3 and cfg.kv_shared_ffw_dim == 96
    assert cfg.kv_donors == {GLOBAL: 3, LOCAL: 4}


# ---------------------------------------------------------------- config.json layouts

def _published_31b():
  """The layout of the published Gemma 4 31B text_config (fields global_head_dim and
  num_global_key_value_heads)."""
  return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
          "text_config": {"model_type": "gemma4_text", "hidden_size": 5376,
                          "intermediate_size": 21504, "num_hidden_layers": 60,
                          "num_attention_heads": 32, "num_key_value_heads": 16,
                          "num_global_key_value_heads": 4, "head_dim": 256,
                          "global_head_dim": 512, "sliding_window": 1024,
                          "attention_k_eq_v": True, "hidden_size_per_layer_input": 0,
                          "final_logit_softcapping": 30.0, "vocab_size": 262144,
                          "layer_types": ([S] * 5 + [F]) * 10, "dtype": "bfloat16"}}


def test_both_config_layouts_give_the_preset():
  published = hf.config_from_hf(_published_31b(), name="gemma4_31b")
  as_written = _published_31b()
  text = as_written["text_config"]
  text.pop("global_head_dim"), text.pop("num_global_key_value_heads")
  text["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 4}
                              for i in range(5, 60, 6)}
  written = hf.config_from_hf(as_written, name="gemma4_31b")
  preset = get_preset("gemma4_31b")
  assert published == written
  for field in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffw_dim",
                "global_head_dim", "num_global_kv_heads", "global_k_eq_v", "layer_pattern",
                "sliding_window", "rope_proportion_global", "rope_base_global",
                "rope_base_local", "final_logit_softcap", "ple_dim", "kv_shared_layers",
                "norm_plus_one", "query_scale", "vocab_size"):
    assert getattr(published, field) == getattr(preset, field), field


@pytest.mark.parametrize("change, match", [
  ({"enable_moe_block": True, "num_experts": 8}, "enable_moe_block"),
  ({"use_bidirectional_attention": "all"}, "bidirectional"),
  ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}},
   "full_attention"),
  ({"per_layer_config": {"0": {"head_dim": 64}}}, "sliding_attention"),
])
def test_unsupported_configs_are_refused(change, match):
  cfg = _published_31b()
  cfg["text_config"].update(change)
  with pytest.raises(HFConversionError, match=match):
    hf_gemma4.config_from_hf(cfg)


# ---------------------------------------------------------------- serving paths

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5], [9, 8, 7, 3, 3, 1, 0, 2], [6, 6]]


def _numpy_params(cfg, seed):
  """Random weights of model.init_params's shapes and dtypes (identity norms, layer scalars 1,
  the rest normal over sqrt(d_model), not init_params's per-weight fan-in scales), drawn by
  numpy: jitting model.init_params for these models costs ~4 CPU-s of XLA compile."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(path[-1].key)
    if name == "layer_scalar" or name.endswith("norm"):  # (1 + scale) norms: the identity at 0
      return np.full(s.shape, 0.0 if name.endswith("norm") and cfg.norm_plus_one else 1.0, s.dtype)
    return (rng.standard_normal(s.shape) / np.sqrt(cfg.d_model)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))))


@pytest.fixture(scope="module")
def pair():
  """Target: the PLE + kv-sharing model with 8 query heads (heads shard over 4 devices, KV heads
  replicate); draft: the dense k_eq_v model, one (S, S, F) group of it."""
  target = get_preset("tiny_gemma4_ple").replace(num_heads=8)
  draft = get_preset("tiny_gemma4").replace(num_layers=3)
  return target, _numpy_params(target, 1), draft, _numpy_params(draft, 2)


def test_sharded_logits_equal_one_device(pair):
  """Ragged prompts on a 2 x 4 mesh: the param and cache shardings cover every new leaf (the
  kv-shared tail, PLE, two cache shapes) and the logits are one device's."""
  from spec_tpu import sharding
  cfg, params, _, _ = pair
  tokens = jnp.asarray(_tokens(4, 12, seed=3))
  lengths = jnp.array([12, 3, 9, 1], jnp.int32)
  one = np.asarray(_forward(params, cfg, tokens, cache_lib.init_cache(cfg, 4, 16, 4),
                            lengths)[0])
  mesh = sharding.make_mesh((2, 4))
  cache = cache_lib.init_cache(cfg, 4, 16, spec_tokens=4)
  p_sh = sharding.param_shardings(cfg, mesh, params_shape=params)
  fn = jax.jit(lambda p, t, c, n: model.forward(p, cfg, t, c, n)[0],
               in_shardings=(p_sh, sharding.batch_sharding(mesh, tokens.shape),
                             sharding.cache_shardings(cache, mesh),
                             sharding.batch_sharding(mesh, lengths.shape)),
               compiler_options=_FAST_COMPILE)
  got = np.asarray(fn(jax.device_put(params, p_sh), tokens, cache, lengths))
  for i, n in enumerate(lengths.tolist()):
    np.testing.assert_allclose(got[i, :n], one[i, :n], atol=1e-5)


@pytest.mark.slow
def test_speculative_greedy_equals_autoregressive_greedy(pair):
  """Gemma 4 target and draft in the on-device speculative loop: rollback of the kv-shared
  model is a length move like any other, so greedy speculative decoding is greedy decoding:
  every token is the argmax of the target's logits given the row's prefix (whole sequences
  through model.forward_full, no cache), with no near-tie on the way."""
  from spec_tpu.decoding.sampler import Sampler
  from spec_tpu.decoding.sampling import SamplingParams
  target, t_params, draft, d_params = pair
  result = Sampler.from_params(t_params, target, draft_params=d_params, draft_cfg=draft).generate(
      PROMPTS, max_new_tokens=10, k=3, sampling=SamplingParams(temperature=0.0))
  got = np.array(result.tokens)
  assert got.shape == (4, 10) and len({tuple(t) for t in got}) > 1
  seqs = np.zeros((4, 24), np.int32)  # right-padding: invisible to the causal logits read
  for i, p in enumerate(PROMPTS):
    seqs[i, :len(p) + 10] = p + got[i].tolist()
  logits = np.asarray(_forward_full(t_params, target, seqs))
  at = np.array([len(p) - 1 for p in PROMPTS])[:, None] + np.arange(10)
  path = np.take_along_axis(logits, at[..., None], axis=1)
  top2 = -np.sort(-path, axis=-1)[..., :2]
  assert np.all(top2[..., 0] - top2[..., 1] > 1e-4)
  np.testing.assert_array_equal(np.argmax(path, axis=-1), got)


@pytest.mark.parametrize("name", ["tiny_gemma4", "tiny_gemma4_ple", "tiny_gemma3", "tiny",
                                  "tiny_gemma4_assistant", "gemma4_31b_assistant"])
def test_num_params_counts_what_init_allocates(name):
  import math
  cfg = get_preset(name)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  assert cfg.num_params() == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


# ---------------------------------------------------------------- the assistant drafter

def _randomize(torch, m, seed):
  """Weights large enough that every part matters (norms are w, not 1 + w)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(m.named_parameters()) + list(m.named_buffers()):
      if name.endswith("layer_scalar"):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      elif not p.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
        continue
      elif p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


@pytest.mark.parametrize("ordered", [False, True], ids=["full_head", "centroid_head"])
@pytest.mark.parametrize("converted", ["dense_k_eq_v"], indirect=True)
def test_assistant_logits_given_the_target_state_match_transformers(converted, ordered,
                                                                    tmp_path):
  """Given the target's state after a prompt longer than the window (its caches, its final
  hidden state at the last prompt token, the token that followed), when a tiny random
  Gemma4AssistantForCausalLM drafts 3 tokens (argmax, as transformers' candidate generator
  does), then every step's logits equal transformers' (ordered: the E2B/E4B form, logits of
  the tokens of the 2 best of 8 centroids' clusters, every other token at their floor)."""
  _, hf_target, params, cfg = converted
  torch, transformers = _torch()
  from spec_tpu.checkpoints.safetensors_io import SafetensorsIndex
  from spec_tpu.models import assistant
  text = transformers.Gemma4TextConfig(
      vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
      attention_k_eq_v=True, head_dim=8, global_head_dim=16, sliding_window=5,
      hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, layer_types=[S, F])
  a_config = transformers.Gemma4AssistantConfig(
      text_config=text.to_dict(), backbone_hidden_size=32, use_ordered_embeddings=ordered,
      num_centroids=8, centroid_intermediate_top_k=2)
  hf_assistant = transformers.Gemma4AssistantForCausalLM(a_config).eval()
  hf_assistant.config.get_text_config()._attn_implementation = "eager"
  _randomize(torch, hf_assistant, seed=5)
  if ordered:
    with torch.no_grad():
      hf_assistant.masked_embedding.token_ordering.copy_(
          torch.randperm(VOCAB, generator=torch.Generator().manual_seed(6)))
  hf_assistant.save_pretrained(tmp_path / "assistant", safe_serialization=True)
  import json
  acfg, a_params = hf_gemma4.assistant_from_hf(
      json.loads((tmp_path / "assistant" / "config.json").read_text()),
      SafetensorsIndex(tmp_path / "assistant"))
  acfg.check_target(cfg)
  assert acfg.centroids == (8 if ordered else 0)

  prompt = _tokens(1, 12, seed=7)
  nxt = np.array([[11]], np.int64)
  with torch.no_grad():
    out = hf_target(input_ids=torch.tensor(prompt, dtype=torch.long), use_cache=True,
                    output_hidden_states=True, return_shared_kv_states=True)
    shared = out.shared_kv_states
    hidden = out.hidden_states[-1][:, -1:]
    token = torch.tensor(nxt)
    embed = hf_target.get_input_embeddings()
    want = []
    for _ in range(3):
      o = hf_assistant(inputs_embeds=torch.cat([embed(token), hidden], dim=-1),
                       position_ids=torch.tensor([[prompt.shape[1]]]),
                       shared_kv_states=shared, use_cache=False)
      want.append(o.logits[:, -1].float().numpy())
      token, hidden = o.logits.argmax(dim=-1), o.last_hidden_state

  # spec_tokens=1: the least ring slack, and enough (the assistant reads window + 1 keys).
  cache = cache_lib.init_cache(cfg, 1, 32, spec_tokens=1)
  _, cache, h = _forward_last(params, cfg, jnp.asarray(prompt, jnp.int32), cache,
                             last_only=True, final_hidden=True)
  step = jax.jit(assistant.step, static_argnums=(1, 3), compiler_options=_FAST_COMPILE)
  token, hidden = jnp.asarray(nxt[:, 0], jnp.int32), h[:, 0]
  for i in range(3):
    logits, hidden = step(a_params, acfg, params, cfg, cache, token, hidden)
    assert _rel_err(np.asarray(logits), want[i]) < 1e-5, f"step {i}"
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  # A long global cache (read block by block as far as filled) gives the same first step.
  long = cache_lib.init_cache(cfg, 1, model.ATTENTION_BLOCK + 8, spec_tokens=1)
  _, long = _forward_last(params, cfg, jnp.asarray(prompt, jnp.int32), long, last_only=True)
  logits, _ = step(a_params, acfg, params, cfg, long, jnp.asarray(nxt[:, 0], jnp.int32), h[:, 0])
  assert _rel_err(np.asarray(logits), want[0]) < 1e-5
