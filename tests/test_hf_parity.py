"""Hugging Face conversion: the converted decoder reproduces transformers' models, and bad input
fails with an error that names the problem.

Tiny random-weight models of every served family are built with transformers (torch, CPU,
float32, eager attention), saved as safetensors, converted by spec_tpu.checkpoints.hf, restored from the
spec_tpu checkpoint, and compared: logits on sequences longer than every sliding window, and
greedy continuations token for token (transformers' generate vs spec_tpu's cached decoder).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.models import cache as cache_lib
from spec_tpu.checkpoints import checkpoint
from spec_tpu.checkpoints import hf
from spec_tpu.models import model
from spec_tpu.models.config import GLOBAL, LOCAL, get_preset
from spec_tpu.checkpoints.hf import HFConversionError
from spec_tpu.checkpoints.safetensors_io import SafetensorsError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 20         # logits compared over this many tokens: longer than every window below
PROMPT = 12      # greedy: prompt length (also longer than the windows)
NEW_TOKENS = 10
VOCAB = 256

_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              head_dim=8)
S, F = "sliding_attention", "full_attention"
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# name -> (transformers config class, kwargs, save_pretrained kwargs)
CASES = {
  "gemma_mqa": ("GemmaConfig", dict(_SMALL, num_hidden_layers=2, num_key_value_heads=1), {}),
  "gemma_mha": ("GemmaConfig", dict(_SMALL, num_hidden_layers=2, num_key_value_heads=4,
                                    head_dim=16), {}),
  "gemma2": ("Gemma2Config", dict(_SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                  query_pre_attn_scalar=12, sliding_window=7,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
             # Small shards: exercises model.safetensors.index.json.
             dict(max_shard_size="20KB")),
  # Pattern (S, S, F) cut short after 4 layers: the cyclic layer_pattern must reproduce that.
  "gemma3": ("Gemma3TextConfig", dict(_SMALL, num_hidden_layers=4, num_key_value_heads=2,
                                      query_pre_attn_scalar=12, sliding_window=6,
                                      rope_theta=1e6, rope_local_base_freq=1e4,
                                      rope_scaling={"rope_type": "linear", "factor": 8.0},
                                      final_logit_softcapping=10.0,
                                      layer_types=[S, S, F, S]), {}),
  "llama_gqa": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=6,
                                    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                    rope_theta=5e5, tie_word_embeddings=False), {}),
  # Llama 3.1 RoPE scaling with a short original context, so that positions < SEQ meet all three
  # frequency bands (kept, interpolated, divided by factor).
  "llama31": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                                  rope_theta=1e4, rope_scaling=_LLAMA3_ROPE), {}),
  "mistral": ("MistralConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, sliding_window=7), {}),
}


# ---------------------------------------------------------------- helpers

def _torch():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


def _randomize(torch, hf_model, gemma: bool):
  """Weights large enough that every part matters: transformers' init (std 0.02, zero norms)
  gives near-uniform logits, where a missing (1 + w) or a wrong window hardly shows."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if p.ndim == 1:  # norms: Gemma's (1 + w) is centred on w = 0, Llama's w on 1
        p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (0.0 if gemma else 1.0))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def _build_hf(torch, transformers, case: str, path):
  cls_name, kwargs, save_kw = CASES[case]
  config = getattr(transformers, cls_name)(**kwargs)
  config._attn_implementation = "eager"  # reference implementation: no fused kernels
  m = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  _randomize(torch, m.eval(), gemma=case.startswith("gemma"))
  m.generation_config.eos_token_id = None  # greedy runs its full length
  m.generation_config.pad_token_id = 0
  m.save_pretrained(path, safe_serialization=True, **save_kw)
  return m


# Tiny programs: XLA's backend optimisations cost more compile time than they save here.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_forward_full = jax.jit(model.forward_full, static_argnums=1, compiler_options=_FAST_COMPILE)
_forward = jax.jit(model.forward, static_argnums=1, static_argnames="last_only",
                   compiler_options=_FAST_COMPILE)


def _tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (b, t), dtype=np.int32)


def _rel_err(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def _greedy(params, cfg, prompt_bt, steps):
  cache = cache_lib.init_cache(cfg, prompt_bt.shape[0], prompt_bt.shape[1] + steps)
  logits, cache = _forward(params, cfg, prompt_bt, cache, last_only=True)
  out = []
  for _ in range(steps):
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out.append(tok)
    logits, cache = _forward(params, cfg, tok[:, None], cache)
  return np.stack([np.asarray(t) for t in out], axis=1)


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  """(case, HF model, restored params, config) for one family, built once per module."""
  torch, transformers = _torch()
  root = tmp_path_factory.mktemp(request.param)
  hf_model = _build_hf(torch, transformers, request.param, root / "hf")
  hf.convert_directory(root / "hf", root / "ckpt")
  params, cfg = checkpoint.restore(root / "ckpt")
  return request.param, hf_model, params, cfg


# ---------------------------------------------------------------- parity

def test_logits_match_transformers(converted):
  case, hf_model, params, cfg = converted
  torch, _ = _torch()
  tokens = _tokens(2, SEQ)
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(_forward_full(params, cfg, tokens))
  assert got.shape == want.shape
  err = _rel_err(got, want)
  assert err < 1e-5, f"{case}: relative logits error {err:.2e}"
  if cfg.rope_llama3 is not None:  # the scaling must matter here, or parity proves nothing of it
    plain = np.asarray(_forward_full(params, cfg.replace(rope_llama3=None), tokens))
    assert _rel_err(plain, want) > 1e-3, f"{case}: llama3 rope scaling is moot at these positions"


def test_greedy_matches_transformers_generate(converted):
  case, hf_model, params, cfg = converted
  torch, _ = _torch()
  prompt = _tokens(1, PROMPT, seed=1)
  with torch.no_grad():
    want = hf_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
  want = want[:, PROMPT:].numpy()
  got = _greedy(params, cfg, prompt, NEW_TOKENS)
  np.testing.assert_array_equal(got, want, err_msg=case)


def test_sharded_source_was_exercised(tmp_path):
  """The gemma2 case must really be sharded, or the index path above proves nothing."""
  torch, transformers = _torch()
  _build_hf(torch, transformers, "gemma2", tmp_path)
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1


def test_gemma3_multimodal_text_half(tmp_path):
  """A Gemma3ForConditionalGeneration directory converts to its language model (and its image
  half, which tests/test_vision.py checks), whose text-only logits match."""
  torch, transformers = _torch()
  # Gemma3ForConditionalGeneration ignores final_logit_softcapping (the converter refuses it).
  text = transformers.Gemma3TextConfig(**dict(CASES["gemma3"][1], final_logit_softcapping=None))
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=4, boi_token_index=VOCAB - 3,
                                     eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)
  m = transformers.Gemma3ForConditionalGeneration(config).eval()
  m.config._attn_implementation = "eager"
  m.config.text_config._attn_implementation = "eager"
  _randomize(torch, m, gemma=True)
  m.save_pretrained(tmp_path / "hf", safe_serialization=True)
  cfg = hf.convert_directory(tmp_path / "hf", tmp_path / "ckpt")
  assert cfg.layer_pattern == (LOCAL, LOCAL, GLOBAL) and cfg.rope_scale_global == 8.0
  params, _ = checkpoint.restore(tmp_path / "ckpt")
  tokens = _tokens(1, SEQ)
  with torch.no_grad():
    want = m(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(_forward_full(params, cfg, tokens))
  assert _rel_err(got, want) < 1e-5


# ---------------------------------------------------------------- config.json mapping

def _numerics(cfg):
  """The fields that change outputs (local-layer RoPE is moot without local layers)."""
  cfg = cfg.replace(name="", tokenizer="", dtype="float32")
  if LOCAL not in cfg.layer_pattern:
    cfg = cfg.replace(rope_base_local=1.0, rope_scale_local=1.0)
  return cfg


def test_published_configs_match_presets():
  """config.json files as published on the hub (abridged to the fields they carry) map to the
  presets written from the papers and config classes."""
  gemma2_2b = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
               "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
               "intermediate_size": 9216, "num_attention_heads": 8, "num_hidden_layers": 26,
               "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
               "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
               "vocab_size": 256000}
  # Gemma 3 4B ships as a multimodal model whose text_config omits fields equal to defaults.
  gemma3_4b = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
               "torch_dtype": "bfloat16",
               "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                               "model_type": "gemma3_text", "num_hidden_layers": 34,
                               "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                               "sliding_window": 1024},
               "vision_config": {"hidden_size": 1152, "image_size": 896,
                                 "intermediate_size": 4304, "model_type": "siglip_vision_model",
                                 "num_attention_heads": 16, "num_hidden_layers": 27,
                                 "patch_size": 14, "vision_use_head": False},
               "boi_token_index": 255999, "eoi_token_index": 256000,
               "image_token_index": 262144, "mm_tokens_per_image": 256}
  llama3_8b = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
               "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
  llama31_8b = dict(llama3_8b, rope_scaling={
      "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
      "original_max_position_embeddings": 8192, "rope_type": "llama3"})
  llama32_1b = dict(llama31_8b, head_dim=64, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, tie_word_embeddings=True,
                    rope_scaling=dict(llama31_8b["rope_scaling"], factor=32.0))
  gemma_2b = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "head_dim": 256,
              "hidden_act": "gelu", "hidden_size": 2048, "intermediate_size": 16384,
              "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
              "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "vocab_size": 256000}
  for hf_config, preset in [(gemma2_2b, "gemma2_2b"), (gemma3_4b, "gemma3_4b_vision"),
                            (llama3_8b, "llama3_8b"), (llama31_8b, "llama31_8b"),
                            (llama32_1b, "llama32_1b"), (gemma_2b, "gemma_2b")]:
    assert _numerics(hf.config_from_hf(hf_config)) == _numerics(get_preset(preset)), preset
  assert hf.config_from_hf(gemma3_4b).dtype == "bfloat16"
  assert hf.config_from_hf(gemma3_4b, dtype="float32").dtype == "float32"


def test_layer_types_become_shortest_period_or_full_list():
  base = {"architectures": ["Gemma3ForCausalLM"], **_SMALL, "num_key_value_heads": 1,
          "sliding_window": 4}
  periodic = hf.config_from_hf({**base, "num_hidden_layers": 5, "layer_types": [S, F] * 2 + [S]})
  assert periodic.layer_pattern == (LOCAL, GLOBAL)
  irregular = [S, F, F, S, S]
  cfg = hf.config_from_hf({**base, "num_hidden_layers": 5, "layer_types": irregular})
  assert cfg.layer_types == (LOCAL, GLOBAL, GLOBAL, LOCAL, LOCAL)
  # Older files give sliding_window_pattern instead (every 6th layer global by default).
  legacy = hf.config_from_hf({**base, "num_hidden_layers": 8, "sliding_window_pattern": 4})
  assert legacy.layer_types == (LOCAL,) * 3 + (GLOBAL,) + (LOCAL,) * 3 + (GLOBAL,)


def test_gemma3_rope_formats_agree():
  """transformers 5 writes nested rope_parameters; older files write rope_theta,
  rope_local_base_freq and rope_scaling (global layers only). Both mean the same."""
  base = {"architectures": ["Gemma3ForCausalLM"], **_SMALL, "num_hidden_layers": 2,
          "num_key_value_heads": 1}
  legacy = hf.config_from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                              "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  nested = hf.config_from_hf({**base, "rope_parameters": {
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
  assert legacy == nested
  assert (legacy.rope_base_global, legacy.rope_scale_global) == (1e6, 8.0)
  assert (legacy.rope_base_local, legacy.rope_scale_local) == (1e4, 1.0)


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["FalconForCausalLM"]}, "unknown architecture 'FalconForCausalLM'"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "biases"),
    ({"attention_bias": True}, "'attention_bias'"),
    ({"mlp_bias": True}, "'mlp_bias'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'rope_scaling'.*'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 8.0}}, "'rope_parameters'.*'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "'rope_scaling'.*low_freq_factor"),
    ({"rope_scaling": dict(_LLAMA3_ROPE, low_freq_factor=4.0)}, "'rope_scaling'.*low_freq_factor"),
    ({"hidden_act": "relu"}, "'hidden_act'.*'relu'"),
    ({"num_local_experts": 8}, "'num_local_experts'"),
    ({"partial_rotary_factor": 0.5}, "'partial_rotary_factor'"),
    ({"use_bidirectional_attention": True}, "'use_bidirectional_attention'"),
    ({"hidden_size": "wide"}, "malformed"),
    # Gemma3ForConditionalGeneration ignores the cap that Gemma3ForCausalLM applies: ambiguous.
    ({"architectures": ["Gemma3ForConditionalGeneration"],
      "text_config": {"final_logit_softcapping": 30.0}}, "'text_config.final_logit_softcapping'"),
])
def test_unsupported_configs_are_refused(change, match):
  base = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
  with pytest.raises(HFConversionError, match=match):
    hf.config_from_hf({**base, **change})


# ---------------------------------------------------------------- bad input

class _DictIndex:
  """An in-memory stand-in for SafetensorsIndex."""

  def __init__(self, arrays):
    self.arrays = arrays

  def names(self):
    return sorted(self.arrays)

  def shape(self, name):
    return self.arrays[name].shape

  def dtype(self, name):
    return self.arrays[name].dtype

  def get(self, name):
    return self.arrays[name]


def _llama_state(tie=False):
  torch, transformers = _torch()
  kwargs = dict(CASES["llama_gqa"][1], num_hidden_layers=2, tie_word_embeddings=tie)
  config = transformers.LlamaConfig(**kwargs)
  m = transformers.LlamaForCausalLM(config)
  hf_config = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
  return {k: v.numpy() for k, v in m.state_dict().items()}, hf.config_from_hf(hf_config)


def test_wrong_shape_names_tensor_and_shapes():
  state, cfg = _llama_state()
  name = "model.layers.1.self_attn.k_proj.weight"
  state[name] = np.zeros((16, 48), np.float32)
  want = rf"'{name}' has shape \(16, 48\), expected \(32, 48\)"
  with pytest.raises(HFConversionError, match=want):
    hf.convert_params(_DictIndex(state), cfg)


def test_missing_and_unexpected_tensors_are_named():
  state, cfg = _llama_state()
  gone = state.pop("model.layers.1.mlp.up_proj.weight")
  with pytest.raises(HFConversionError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.convert_params(_DictIndex(state), cfg)
  state["model.layers.1.mlp.up_proj.weight"] = gone
  state["model.layers.0.self_attn.q_proj.bias"] = np.zeros((96,), np.float32)
  with pytest.raises(HFConversionError,
                     match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
    hf.convert_params(_DictIndex(state), cfg)
  # Known leftovers are ignored.
  del state["model.layers.0.self_attn.q_proj.bias"]
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)
  params = hf.convert_params(_DictIndex(state), cfg, dtype="bfloat16")
  assert params["groups"][0]["attn"]["q"].shape == (2, 6, 48, 16)  # both layers, stacked
  assert params["groups"][0]["attn"]["q"].dtype == jnp.bfloat16


def test_integer_tensor_is_refused():
  state, cfg = _llama_state()
  state["model.norm.weight"] = np.zeros((48,), np.int8)
  with pytest.raises(HFConversionError, match="'model.norm.weight' has dtype int8"):
    hf.convert_params(_DictIndex(state), cfg)


def _rg_config():
  """A small transformers RecurrentGemma config.json (unset fields: transformers' defaults)."""
  return dict(architectures=["RecurrentGemmaForCausalLM"], model_type="recurrent_gemma",
              vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=1, lru_width=32,
              attention_window_size=16)


def _write_config(path, **fields):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fields, f)


def test_bad_directories_fail_before_any_work(tmp_path):
  with pytest.raises(HFConversionError, match="is not a directory"):
    hf.convert_directory(tmp_path / "nope", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(HFConversionError, match="no config.json"):
    hf.convert_directory(tmp_path / "empty", tmp_path / "out")
  _write_config(tmp_path / "unknown", architectures=["GPT2LMHeadModel"])
  with pytest.raises(HFConversionError, match="unknown architecture 'GPT2LMHeadModel'"):
    hf.convert_directory(tmp_path / "unknown", tmp_path / "out")
  llama = dict(architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
  _write_config(tmp_path / "pickled", **llama)
  (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(HFConversionError, match="only safetensors is supported"):
    hf.convert_directory(tmp_path / "pickled", tmp_path / "out")
  _write_config(tmp_path / "noweights", **llama)
  with pytest.raises(HFConversionError, match="no \\*.safetensors"):
    hf.convert_directory(tmp_path / "noweights", tmp_path / "out")
  with pytest.raises(checkpoint.CheckpointError, match="would replace the source"):
    hf.convert_directory(tmp_path / "noweights", tmp_path, overwrite=True)
  (tmp_path / "out").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="exists; pass overwrite=True"):
    hf.convert_directory(tmp_path / "noweights", tmp_path / "out")
  assert not os.listdir(tmp_path / "out")
  # Checked before any tensor is read (the directories above hold none): a destination that
  # cannot be written, a dtype that is not a float, int8 for a model int8 does not cover yet.
  (tmp_path / "a_file").write_text("")
  with pytest.raises(checkpoint.CheckpointError, match="is a file, not a directory"):
    hf.convert_directory(tmp_path / "noweights", tmp_path / "a_file" / "out")
  for dtype in ("int8", "float64"):
    with pytest.raises(HFConversionError, match=f"not {dtype}.*--quantize=int8"):
      hf.convert_directory(tmp_path / "noweights", tmp_path / "out2", dtype=dtype)
  _write_config(tmp_path / "int8_source", **llama, torch_dtype="int8")
  with pytest.raises(HFConversionError, match="not int8"):
    hf.convert_directory(tmp_path / "int8_source", tmp_path / "out2")
  _write_config(tmp_path / "rg", **_rg_config())
  with pytest.raises(HFConversionError, match="quantize is not supported for RecurrentGemma"):
    hf.convert_directory(tmp_path / "rg", tmp_path / "out2", quantize="int8")
  assert not (tmp_path / "out2").exists()


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory):
  torch, transformers = _torch()
  path = tmp_path_factory.mktemp("small") / "hf"
  _build_hf(torch, transformers, "gemma_mqa", path)
  (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
  (path / "tokenizer_config.json").write_text("{}")
  return path


def test_wrong_shape_on_disk_names_tensor(small_hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  src = tmp_path / "hf"
  os.makedirs(src)
  (src / "config.json").write_bytes((small_hf_dir / "config.json").read_bytes())
  state = load_file(small_hf_dir / "model.safetensors")
  name = "model.layers.0.mlp.down_proj.weight"
  state[name] = np.zeros((32, 32), np.float32)
  save_file(state, src / "model.safetensors")
  want = rf"'{name}' has shape \(32, 32\), expected \(32, 64\)"
  with pytest.raises(HFConversionError, match=want):
    hf.convert_directory(src, tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")


def test_truncated_safetensors_is_reported(small_hf_dir, tmp_path):
  src = tmp_path / "hf"
  os.makedirs(src)
  (src / "config.json").write_bytes((small_hf_dir / "config.json").read_bytes())
  data = (small_hf_dir / "model.safetensors").read_bytes()
  (src / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(SafetensorsError, match="truncated"):
    hf.convert_directory(src, tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")


def test_launcher_converts_and_copies_tokenizer(small_hf_dir, tmp_path):
  dst = tmp_path / "ckpt"
  cmd = [sys.executable, "-m", "launch.convert", "--from=hf", f"--src={small_hf_dir}",
         f"--dst={dst}", "--dtype=bfloat16"]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(dst / "tokenizer")) == ["generation_config.json", "tokenizer.json",
                                                 "tokenizer_config.json"]
  params, cfg = checkpoint.restore(dst)  # verifies every file, tokenizer included
  assert cfg.dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
  assert cfg.tokenizer.startswith("json:")
  # A second run without --overwrite refuses, and leaves the checkpoint intact.
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0 and "--overwrite" in again.stderr
  checkpoint.verify(dst)
