"""The gemma library's checkpoints: the converted decoder reproduces transformers' model holding the
same weights, and bad trees fail with an error that names the problem.

Tiny random trees are written in numpy as the gemma library names and shapes them
(gemma/gm/nn/_modules.py), in its flat layout ('transformer/layer_0/attn/q_einsum' -> {'w'}) or
its nested one, or its stacked one (layers of one attention-pattern position stacked), saved
with orbax, and converted with spec_tpu.checkpoints.gemma_lib. The
reference is transformers' Gemma/Gemma2/Gemma3 model with the same weights, mapped the way
transformers' own converter (models/gemma3/convert_gemma3_weights.py) maps them: logits over a
sequence longer than every sliding window must agree in float32.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from spec_tpu.checkpoints import checkpoint, gemma_lib, gemma_lib_vision
from spec_tpu.checkpoints._convert import flatten
from spec_tpu.checkpoints.gemma_lib import GemmaConversionError
from spec_tpu.models import model
from spec_tpu.models.config import ModelConfig, get_preset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384      # rows of the table: room for a 350-piece sentencepiece tokenizer
SEQ = 16         # longer than every window below
S, F = "sliding_attention", "full_attention"

# Gemma 1 has no tiny preset of its own: every Gemma 1 shares gemma_2b's settings.
GEMMA1_MHA = get_preset("gemma_2b").replace(
    name="tiny_gemma1", vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
    head_dim=8, ffw_dim=64, dtype="float32", tokenizer="")
GEMMA1_MQA = GEMMA1_MHA.replace(num_kv_heads=1)
_HF_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 head_dim=8, rms_norm_eps=1e-6)
# name -> (preset, layout, transposed gating, transformers config class and its arguments).
# The transformers configs are written out by hand from the presets' published values, not
# derived by spec_tpu's own mapping.
CASES = {
  "gemma_mha_qkv": (GEMMA1_MHA, "nested", False, "GemmaConfig",
                    dict(_HF_SMALL, num_hidden_layers=2, num_key_value_heads=4)),
  "gemma_mqa": (GEMMA1_MQA, "flat", False, "GemmaConfig",
                dict(_HF_SMALL, num_hidden_layers=2, num_key_value_heads=1)),
  "gemma2": ("tiny_gemma2", "flat", False, "Gemma2Config",
             dict(_HF_SMALL, num_hidden_layers=4, num_key_value_heads=2,
                  query_pre_attn_scalar=16, sliding_window=6, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0)),
  "gemma2_transposed": ("tiny_gemma2", "nested", True, "Gemma2Config",
                        dict(_HF_SMALL, num_hidden_layers=4, num_key_value_heads=2,
                             query_pre_attn_scalar=16, sliding_window=6,
                             attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
  "gemma3": ("tiny_gemma3", "stacked", True, "Gemma3TextConfig",
             dict(_HF_SMALL, num_hidden_layers=6, num_key_value_heads=1,
                  query_pre_attn_scalar=8, sliding_window=5, rope_theta=1e6,
                  rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  attn_logit_softcapping=None, final_logit_softcapping=None,
                  layer_types=[S, S, F, S, S, F])),
}


def _cfg(preset) -> ModelConfig:
  """The preset's shapes with a VOCAB-row table (the vocabulary is the tree's, not a preset's)."""
  return (get_preset(preset) if isinstance(preset, str) else preset).replace(vocab_size=VOCAB)


def gemma_tree(cfg: ModelConfig, *, transposed: bool, seed: int = 0) -> dict:
  """The nested layout (model.init()['params']) of random weights large enough that every part
  matters (norms around 0, Gemma's 1 + scale)."""
  rng = np.random.default_rng(seed)
  d, h, k, e, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim

  def w(*shape, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  def norm(n):
    return {"scale": (0.3 * rng.standard_normal(n)).astype(np.float32)}

  tree = {"embedder": {"input_embedding": rng.standard_normal((cfg.vocab_size, d))
                       .astype(np.float32)},
          "final_norm": norm(d)}
  for i in range(cfg.num_layers):
    attn = {"attn_vec_einsum": {"w": w(h, e, d, fan_in=h * e)}}
    if k == h:
      attn["qkv_einsum"] = {"w": w(3, h, d, e, fan_in=d)}
    else:
      attn["q_einsum"] = {"w": w(h, d, e, fan_in=d)}
      attn["kv_einsum"] = {"w": w(2, k, d, e, fan_in=d)}
    layer = {"pre_attention_norm": norm(d), "attn": attn, "pre_ffw_norm": norm(d),
             "mlp": {"gating_einsum": w(2, f, d, fan_in=d) if transposed else w(2, d, f, fan_in=d),
                     "linear": w(f, d, fan_in=f)}}
    if cfg.qk_norm:
      attn["_query_norm"], attn["_key_norm"] = norm(e), norm(e)
    if cfg.post_attn_norm:
      layer["post_attention_norm"] = norm(d)
    if cfg.post_ffw_norm:
      layer["post_ffw_norm"] = norm(d)
    tree[f"layer_{i}"] = layer
  return tree


def flat_layout(nested: dict) -> dict:
  """The released checkpoints' layout (the library's _checkpoint._nested_to_flat): every
  leaf's module path -> {param name: array}, under 'transformer/' or, for the vision encoder
  (nested 'vision_encoder'), 'SigLiPFromPatches_0/'; the nested layout's bare mlp leaves
  become {'w': array} (its _compat.flatten_and_remap_params)."""
  nested = dict(nested)
  vision = nested.pop("vision_encoder", None)
  out = {}
  for root, tree in (("transformer", nested), ("SigLiPFromPatches_0", vision or {})):
    for name, value in flatten(tree).items():
      if name.endswith(("/mlp/linear", "/mlp/gating_einsum")):
        name += "/w"
      module, param = name.rsplit("/", 1)
      out.setdefault(f"{root}/{module}", {})[param] = value
  return out


def stacked_layout(flat: dict, period: int) -> dict:
  """The library's stacked layout of a flat tree (its _compat.stack_params): layer i's
  {param: array} joins 'transformer/stacked_layers/attention_type_<i % period>/<path>' at
  slice i // period of a new leading axis."""
  out, groups = {}, {}
  for key, params in flat.items():
    m = re.match(r"transformer/layer_(\d+)/(.*)", key)
    if m is None:
      out[key] = params
      continue
    i = int(m.group(1))
    group = groups.setdefault(f"transformer/stacked_layers/attention_type_{i % period}/"
                              + m.group(2), {})
    for name, value in params.items():
      group.setdefault(name, {})[i // period] = value
  for key, params in groups.items():
    out[key] = {name: np.stack([s[j] for j in sorted(s)]) for name, s in params.items()}
  return out


def save_tree(tree: dict, path) -> str:
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(os.path.abspath(path), tree)
  return str(path)


def hf_state(tree: dict, cfg: ModelConfig, transposed: bool) -> dict:
  """transformers' names for the nested tree's weights (convert_gemma3_weights.py's mapping)."""
  import torch
  d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  s = {"model.embed_tokens.weight": tree["embedder"]["input_embedding"],
       "model.norm.weight": tree["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    L, p = tree[f"layer_{i}"], f"model.layers.{i}."
    a = L["attn"]
    if "qkv_einsum" in a:
      q, kk, v = a["qkv_einsum"]["w"]
    else:
      q, (kk, v) = a["q_einsum"]["w"], a["kv_einsum"]["w"]
    s[p + "self_attn.q_proj.weight"] = q.transpose(0, 2, 1).reshape(h * e, d)
    s[p + "self_attn.k_proj.weight"] = kk.transpose(0, 2, 1).reshape(k * e, d)
    s[p + "self_attn.v_proj.weight"] = v.transpose(0, 2, 1).reshape(k * e, d)
    s[p + "self_attn.o_proj.weight"] = a["attn_vec_einsum"]["w"].transpose(2, 0, 1).reshape(
        d, h * e)
    if cfg.qk_norm:
      s[p + "self_attn.q_norm.weight"] = a["_query_norm"]["scale"]
      s[p + "self_attn.k_norm.weight"] = a["_key_norm"]["scale"]
    s[p + "input_layernorm.weight"] = L["pre_attention_norm"]["scale"]
    if cfg.post_attn_norm:
      s[p + "post_attention_layernorm.weight"] = L["post_attention_norm"]["scale"]
      s[p + "pre_feedforward_layernorm.weight"] = L["pre_ffw_norm"]["scale"]
      s[p + "post_feedforward_layernorm.weight"] = L["post_ffw_norm"]["scale"]
    else:
      s[p + "post_attention_layernorm.weight"] = L["pre_ffw_norm"]["scale"]
    gate, up = L["mlp"]["gating_einsum"]
    s[p + "mlp.gate_proj.weight"] = gate if transposed else gate.T
    s[p + "mlp.up_proj.weight"] = up if transposed else up.T
    s[p + "mlp.down_proj.weight"] = L["mlp"]["linear"].T
  return {n: torch.tensor(np.ascontiguousarray(a)) for n, a in s.items()}


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_forward_full = jax.jit(model.forward_full, static_argnums=1, compiler_options=_FAST_COMPILE)


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  case = request.param
  preset, layout, transposed, _, _ = CASES[case]
  cfg = _cfg(preset)
  nested = gemma_tree(cfg, transposed=transposed)
  tree = nested if layout == "nested" else flat_layout(nested)
  if layout == "stacked":  # Gemma 3's 5:1 pattern shrunk to 2:1, two layers per position
    tree = stacked_layout(tree, period=3)
  root = tmp_path_factory.mktemp(case)
  src = save_tree(tree, root / "orbax")
  gemma_lib.convert_directory(src, root / "ckpt", preset=preset)
  params, restored = checkpoint.restore(root / "ckpt")
  return case, nested, params, restored


def test_logits_match_transformers(converted):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  case, nested, params, cfg = converted
  preset, _, transposed, cls_name, kwargs = CASES[case]
  config = getattr(transformers, cls_name)(**kwargs)
  hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  missing, unexpected = hf_model.load_state_dict(hf_state(nested, cfg, transposed), strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected  # the head is tied
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, SEQ), dtype=np.int32)
  with torch.no_grad():
    want = hf_model.eval()(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(_forward_full(params, cfg, tokens))
  err = float(np.abs(got - want).max() / np.abs(want).max())
  assert err < 1e-5, f"{case}: relative logits error {err:.2e}"


def test_config_comes_from_the_tree_and_the_preset(converted):
  case, nested, _, cfg = converted
  preset = _cfg(CASES[case][0])
  for field in gemma_lib.SHAPE_FIELDS + ("layer_pattern", "sliding_window", "query_scale",
                                         "attn_logit_softcap", "final_logit_softcap",
                                         "rope_base_local", "rope_base_global",
                                         "rope_scale_global"):
    assert getattr(cfg, field) == getattr(preset, field), (case, field)
  assert cfg.vocab_size == VOCAB and cfg.dtype == "float32"


def test_flat_nested_and_stacked_layouts_give_the_same_params():
  cfg = get_preset("tiny_gemma3")
  nested = gemma_tree(cfg, transposed=True, seed=3)
  a, vision_a = gemma_lib.canonical_names(nested)
  b, vision_b = gemma_lib.canonical_names(flat_layout(nested))
  c, _ = gemma_lib.canonical_names({"params": nested})  # a Kauldron-style root
  # Stacked by a period that does not divide the 6 layers: positions 0-1 hold 2, 2-3 hold 1.
  stacked = stacked_layout(flat_layout(nested), period=4)
  assert stacked["transformer/stacked_layers/attention_type_1/attn/q_einsum"]["w"].shape[0] == 2
  d, _ = gemma_lib.canonical_names(stacked)
  assert not vision_a and not vision_b  # a text-only tree has no image half
  # ... also where its embedder keeps rows for image tokens that no model reads.
  extra = dict(nested, embedder=dict(nested["embedder"], mm_input_embedding_extra=np.zeros(
      (4, cfg.d_model), np.float32)))
  assert gemma_lib.canonical_names(extra)[1] == {}
  assert set(a) == set(b) == set(c) == set(d)
  convert = lambda n: gemma_lib.convert_params(
      n, gemma_lib.config_from_tree(n, preset="tiny_gemma3"))
  pa = convert(a)
  for other in (b, d):
    jax.tree.map(np.testing.assert_array_equal, pa, convert(other))
  # A stacked tree missing a position's group misses those layers, named as such.
  del stacked["transformer/stacked_layers/attention_type_3/pre_ffw_norm"]
  with pytest.raises(GemmaConversionError, match="missing tensor 'layer_3/pre_ffw_norm/scale'"):
    convert(gemma_lib.canonical_names(stacked)[0])


def test_released_shapes_pick_their_preset_without_one_named():
  """The tree alone gives a released model's settings: its shapes pick the preset (here Gemma 3
  270M's, read from shapes only: no weights are made)."""
  preset = get_preset("gemma3_270m")
  names = {"embedder/input_embedding": np.empty((262_144, 640), np.float32)}
  for i in range(preset.num_layers):
    p = f"layer_{i}/"
    names.update({p + "attn/q_einsum/w": np.empty((4, 640, 256), np.float32),
                  p + "attn/kv_einsum/w": np.empty((2, 1, 640, 256), np.float32),
                  p + "attn/_query_norm/scale": np.empty(256, np.float32),
                  p + "post_attention_norm/scale": np.empty(640, np.float32),
                  p + "mlp/gating_einsum/w": np.empty((2, 2048, 640), np.float32),
                  p + "mlp/linear/w": np.empty((2048, 640), np.float32)})
  cfg = gemma_lib.config_from_tree(names, name="g")
  assert cfg == preset.replace(name="g", dtype="float32")
  # A Gemma 2 or 3 tree of shapes no release has needs a named preset: its window and soft caps
  # are not in the tree.
  names["layer_0/mlp/linear/w"] = np.empty((2000, 640), np.float32)
  with pytest.raises(GemmaConversionError, match=r"match no released gemma3 model.*--preset="):
    gemma_lib.config_from_tree(names)


def _shapes_only(cfg: ModelConfig) -> tuple[dict, dict]:
  """Canonical names of a released Gemma 3 multimodal tree (text, vision) holding shapes only:
  zero-stride views, no memory."""
  v = cfg.vision
  d, h, k, e, f, w = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim,
                      v.width)
  like = lambda *shape: np.broadcast_to(np.float32(0), shape)
  names = {"embedder/input_embedding": like(262_144, d)}
  for i in range(cfg.num_layers):
    p = f"layer_{i}/"
    names.update({p + "attn/q_einsum/w": like(h, d, e), p + "attn/kv_einsum/w": like(2, k, d, e),
                  p + "attn/_query_norm/scale": like(e), p + "post_attention_norm/scale": like(d),
                  p + "mlp/gating_einsum/w": like(2, f, d), p + "mlp/linear/w": like(f, d)})
  E = gemma_lib_vision.ENCODER
  vision = {E + "embedding/kernel": like(v.patch_size, v.patch_size, 3, w),
            E + "pos_embedding": like(1, v.num_patches, w),
            E + "Transformer/encoder_norm/scale": like(w),
            gemma_lib_vision.SOFT_NORM: like(w), gemma_lib_vision.PROJECTION: like(w, d)}
  for i in range(v.num_layers):
    B = f"{E}Transformer/encoderblock_{i}/"
    vision.update({B + "MultiHeadDotProductAttention_0/query/kernel":
                   like(w, v.num_heads, v.head_dim),
                   B + "MlpBlock_0/Dense_0/kernel": like(w, v.mlp_dim)})
  return names, vision


@pytest.mark.parametrize("release", ["gemma3_4b", "gemma3_12b", "gemma3_27b"])
def test_released_multimodal_shapes_give_the_vision_preset(release):
  """A released Gemma 3 4B/12B/27B tree (shapes only) converts to its `_vision` preset: the
  text settings from the release, the encoder's shape from the tree, its soft tokens and the
  image block's ids Gemma 3's (the gemma library's table has no image-token row: 262,144)."""
  want = get_preset(release + "_vision")
  names, vision = _shapes_only(want)
  cfg = gemma_lib.config_from_tree(names, name="g", vision=vision)
  assert cfg == want.replace(name="g", dtype="float32", vocab_size=262_144)
  assert cfg.vision.image_id == cfg.vocab_size  # the placeholder is past the table


# ---------------------------------------------------------------- bad input
# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def small_tree():
  cfg = _cfg("tiny_gemma2")
  return cfg, gemma_tree(cfg, transposed=False)


def test_a_preset_that_differs_from_the_tree_names_the_field(small_tree):
  cfg, nested = small_tree
  names, _ = gemma_lib.canonical_names(nested)
  with pytest.raises(GemmaConversionError,
                     match=r"^preset 'tiny_gemma3' has num_layers=6, the checkpoint 4"):
    gemma_lib.config_from_tree(names, preset="tiny_gemma3")
  with pytest.raises(GemmaConversionError, match="^preset 'tiny' is not a Gemma config: "
                                                 "ffw_activation=swiglu, Gemma has geglu$"):
    gemma_lib.config_from_tree(names, preset=get_preset("tiny").replace(
        num_layers=4, num_kv_heads=2, post_attn_norm=True, post_ffw_norm=True))
  with pytest.raises(GemmaConversionError, match="unknown preset 'gemma9'"):
    gemma_lib.config_from_tree(names, preset="gemma9")


def test_a_missing_layer_or_tensor_is_named(small_tree):
  cfg, nested = small_tree
  gone = {k: v for k, v in nested.items() if k != "layer_2"}
  names, _ = gemma_lib.canonical_names(gone)
  with pytest.raises(GemmaConversionError, match=r"^layer_2 is missing \(1 missing in all; "
                                                 r"layers found up to layer_3\)$"):
    gemma_lib.config_from_tree(names)
  names, _ = gemma_lib.canonical_names(nested)
  del names["layer_1/post_ffw_norm/scale"]
  with pytest.raises(GemmaConversionError, match="missing tensor 'layer_1/post_ffw_norm/scale'"):
    gemma_lib.convert_params(names, gemma_lib.config_from_tree(names, preset="tiny_gemma2"))
  names, _ = gemma_lib.canonical_names(nested)
  names["layer_0/attn/lora_a"] = np.zeros(3, np.float32)
  with pytest.raises(GemmaConversionError, match="unexpected tensor 'layer_0/attn/lora_a'"):
    gemma_lib.convert_params(names, gemma_lib.config_from_tree(names, preset="tiny_gemma2"))
  names, _ = gemma_lib.canonical_names(nested)
  names["layer_3/mlp/linear/w"] = np.zeros((64, 31), np.float32)
  with pytest.raises(GemmaConversionError,
                     match=r"'layer_3/mlp/linear/w' has shape \(64, 31\), expected \(64, 32\)"):
    gemma_lib.convert_params(names, gemma_lib.config_from_tree(names, preset="tiny_gemma2"))


def test_a_tree_that_is_not_a_gemma_checkpoint_is_refused(tmp_path):
  # A recurrentgemma-style tree: orbax restores it, but it holds no gemma embedder.
  src = save_tree({"params": {"embedder": {"table": np.zeros((4, 2), np.float32)},
                              "blocks.0": {"w": np.zeros(2, np.float32)}}}, tmp_path / "rg")
  with pytest.raises(GemmaConversionError, match=r"^not a gemma library checkpoint: no "
                                                 r"'embedder/input_embedding'"):
    gemma_lib.convert_directory(src, tmp_path / "out")
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "weights.bin").write_bytes(b"x")
  with pytest.raises(GemmaConversionError, match="cannot restore .* as an orbax checkpoint"):
    gemma_lib.convert_directory(tmp_path / "plain", tmp_path / "out")
  with pytest.raises(GemmaConversionError, match="is not a directory"):
    gemma_lib.convert_directory(tmp_path / "nope", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def _train_sp(path, vocab_size=350, image_pieces=False):
  """A byte-fallback sentencepiece model with Gemma's chat-turn pieces (user-defined, as in
  Gemma's tokenizer.model); image_pieces: also Gemma 3's image-block pieces, "\n\n" one token
  (no dummy prefix, as in Gemma 3's)."""
  import sentencepiece as spm
  text = [f"def f{i}(x, y):\n    return x * {i} + y - {i * 7}\n" for i in range(2000)]
  pieces = ["<start_of_turn>", "<end_of_turn>"]
  if image_pieces:
    pieces += ["<start_of_image>", "<end_of_image>", "\n\n"]
  path = f"{path}.model"
  with open(path, "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=f, vocab_size=vocab_size, byte_fallback=True,
        user_defined_symbols=pieces, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
        add_dummy_prefix=not image_pieces)
  return path


def test_launcher_converts_with_the_tokenizer_beside_the_checkpoint(small_tree, tmp_path):
  """The Kaggle layout: <model>/tokenizer.model beside the orbax directory <model>/<variant>/."""
  cfg, nested = small_tree
  src = save_tree(flat_layout(nested), tmp_path / "gemma" / "tiny")
  tok = _train_sp(tmp_path / "sp")
  os.replace(tok, tmp_path / "gemma" / "tokenizer.model")
  dst = tmp_path / "ckpt"
  cmd = [sys.executable, "-m", "launch.convert", "--from=gemma", f"--src={src}", f"--dst={dst}",
         "--preset=tiny_gemma2", "--dtype=bfloat16"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "4 layers" in out.stdout and "tokenizer sp:" in out.stdout
  params, restored = checkpoint.restore(dst)
  assert restored.dtype == "bfloat16" and restored.vocab_size == VOCAB
  assert restored.valid_vocab_size == 350 and restored.tokenizer.startswith("sp:")
  from spec_tpu import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load(dst)
  assert tok.name == restored.tokenizer  # the copied file, found by load
  # Generation stops on EOS and on <end_of_turn>, as in the gemma library's sampler.
  assert tok.eos_ids == (3, tok.piece_id("<end_of_turn>")) and tok.eos_ids[1] > 3
  assert tok.piece_id("<no such piece>") is None
  # A tokenizer larger than the table is not this model's: one line, nothing written.
  big = _train_sp(tmp_path / "big", vocab_size=400)
  cmd = [a.replace(str(dst), str(tmp_path / "ckpt2")) for a in cmd] + [f"--tokenizer={big}"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: tokenizer '{big}' has 400 tokens but the checkpoint's embedding table only "
      f"{VOCAB} rows: not this model's tokenizer"]
  assert not (tmp_path / "ckpt2").exists()


# ---------------------------------------------------------------- the image half

def _library_siglip(vcfg):
  """The gemma library's SigLIP ViT (gemma/gm/nn/vision/_vision_utils.py ViTModel, the
  SigLiPFromPatches default: learned position embedding, no scan) as its source composes flax
  modules: the parameter names, shapes and layouts below are flax's own (auto-named
  LayerNorm_0, MultiHeadDotProductAttention_0, MlpBlock_0/Dense_0, a stride-P Conv)."""
  import flax.linen as nn

  class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.gelu(nn.Dense(vcfg.mlp_dim)(x))  # flax's gelu: the tanh approximation
      return nn.Dense(vcfg.width)(x)

  class Encoder1DBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=vcfg.num_heads)(y, y)
      return x + MlpBlock()(nn.LayerNorm()(x))

  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(vcfg.num_layers):
        x = Encoder1DBlock(name=f"encoderblock_{i}")(x)
      return nn.LayerNorm(name="encoder_norm")(x)

  class ViTModel(nn.Module):
    @nn.compact
    def __call__(self, image):
      p = vcfg.patch_size
      x = nn.Conv(vcfg.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(image)
      n, h, w, c = x.shape
      x = x.reshape(n, h * w, c)
      x = x + self.param("pos_embedding", nn.initializers.normal(stddev=c ** -0.5),
                         (1, h * w, c))
      return Encoder(name="Transformer")(x)

  return ViTModel()


def _library_soft_tokens(encoded, side, norm_scale, projection):
  """The library's VisionExit (average pooling to side x side tokens) and Embedder.encode_vision
  (its RMSNorm, times 1 + scale, then the '...tm,md->...td' einsum)."""
  import flax.linen as nn
  import jax.numpy as jnp
  u, n, a = encoded.shape
  g = int(n ** 0.5)
  window = (g // side, g // side)
  x = nn.avg_pool(encoded.reshape(u, g, g, a), window, strides=window).reshape(u, -1, a)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
  return jnp.einsum("...tm,md->...td", x * (1 + norm_scale), projection)


def test_vision_tree_converts_to_the_library_modules_outputs(tmp_path):
  """A Gemma 3 tree with the library's SigLIP encoder (random flax params, every one moved off
  its init), stacked text layers, flat layout, the tokenizer beside it: the converted model's
  encoder and soft tokens equal the flax modules' outputs, and the image block's ids are the
  tokenizer's."""
  import jax.numpy as jnp
  from spec_tpu.models.vision import siglip
  vcfg = get_preset("tiny_vision").vision  # 28x28 images, 7x7 patches, 4 soft tokens
  preset = _cfg("tiny_gemma3").replace(vision=vcfg)
  vit = _library_siglip(vcfg)
  images = np.random.default_rng(5).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  rng = np.random.default_rng(6)

  def draw(path, x):  # weights ~ 1/sqrt(fan in), norms around 1, biases around 0
    if x.ndim == 1:
      return (0.3 * rng.standard_normal(x.shape) + (path[-1].key == "scale")).astype(np.float32)
    fan_in = 1 if path[-1].key == "pos_embedding" else np.prod(x.shape[:-1])
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  encoder = jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(vit.init, jax.random.key(0), images[:1])["params"])
  nested = gemma_tree(preset, transposed=True, seed=7)
  norm_scale = (0.3 * rng.standard_normal(vcfg.width)).astype(np.float32)
  projection = rng.standard_normal((vcfg.width, preset.d_model)).astype(np.float32) / 4
  nested["embedder"].update(mm_soft_embedding_norm={"scale": norm_scale},
                            mm_input_projection={"w": projection})
  nested["vision_encoder"] = {"siglip_encoder": encoder}
  tree = stacked_layout(flat_layout(nested), period=3)
  assert "SigLiPFromPatches_0/siglip_encoder" in tree  # pos_embedding's module: the encoder
  src = save_tree(tree, tmp_path / "gemma3" / "tiny")
  tok = _train_sp(tmp_path / "sp", image_pieces=True)
  os.replace(tok, tmp_path / "gemma3" / "tokenizer.model")
  gemma_lib.convert_directory(src, tmp_path / "ckpt", preset=preset)
  params, cfg = checkpoint.restore(tmp_path / "ckpt")
  from spec_tpu import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load(tmp_path / "ckpt")
  assert cfg.vision == vcfg.replace(start_id=tok.piece_id("<start_of_image>"),
                                    end_id=tok.piece_id("<end_of_image>"),
                                    newline_id=tok.encode("\n\n")[0])
  assert cfg.vision.newline_id != vcfg.newline_id
  want = np.asarray(jax.jit(vit.apply)({"params": encoder}, images))
  encoded = jax.jit(siglip.encode, static_argnums=1)(params["vision"], cfg.vision, images)
  assert np.abs(np.asarray(encoded) - want).max() / np.abs(want).max() < 1e-5
  want = np.asarray(_library_soft_tokens(want, 2, norm_scale, projection))
  got = np.asarray(jax.jit(siglip.project, static_argnums=1)(params["vision"], cfg.vision,
                                                              encoded))
  assert got.shape == (2, 4, preset.d_model)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
