"""The gemma library's checkpoints (the Flax/JAX releases of Gemma 1, 2 and 3) -> spec_tpu.

    convert_directory("/kaggle/gemma-2/flax/gemma2-2b", "/ckpt/gemma2_2b")

The source is an orbax PyTree checkpoint of the Flax params, in any layout the library
writes: flat (top-level keys 'transformer/layer_0/attn/q_einsum' -> {'w': ...}, as the released
checkpoints are), nested (model.init()['params']: {'layer_0': {'attn': {'q_einsum': {'w'}}}},
its mlp weights as bare leaves), with or without a 'transformer' or 'params' root, or stacked
(its older training layout, the library's _compat.unstack_params: the layers of each position
in the attention pattern stacked along a leading axis,
'transformer/stacked_layers/attention_type_j/attn/q_einsum' -> {'w': (n_j, N, D, H)}, slice s
being layer s * P + j for a pattern of P positions). Names and
shapes (the library's gemma/gm/nn/_modules.py; the mapping as transformers'
convert_gemma3_weights.py writes it), N heads, K kv heads, D d_model, H head_dim, F ffw:
  embedder/input_embedding                 (V, D)   the output layer too (tied)
  layer_i/pre_attention_norm/scale         (D)      RMSNorm times (1 + scale), as ours
  layer_i/attn/q_einsum/w                  (N, D, H)
  layer_i/attn/kv_einsum/w                 (2, K, D, H)  k, v
  layer_i/attn/qkv_einsum/w                (3, N, D, H)  q, k, v: instead of the two above
                                                    where K == N (Gemma 1 7B)
  layer_i/attn/attn_vec_einsum/w           (N, H, D)
  layer_i/attn/_query_norm/scale, _key_norm/scale  (H)  Gemma 3
  layer_i/post_attention_norm/scale        (D)      Gemma 2 and 3
  layer_i/pre_ffw_norm/scale               (D)
  layer_i/post_ffw_norm/scale              (D)      Gemma 2 and 3
  layer_i/mlp/gating_einsum/w              (2, D, F), or (2, F, D) where the library's
                                                    transpose_gating_einsum is set (Gemma 2 9B
                                                    and 27B, Gemma 3); gelu on index 0
  layer_i/mlp/linear/w                     (F, D)
  final_norm/scale                         (D)
Gemma 3 4B, 12B and 27B also hold the SigLIP image encoder (SigLiPFromPatches_0/... in the flat
layout, vision_encoder/... in the nested one) and the embedder's mm_* projection of its output:
gemma_lib_vision.py converts them into the model's vision params, its config from their shapes.

The shapes give the config (layers, dims, heads, kv heads, head_dim, which norms); the family
follows from the norms (Gemma 3: q/k norms; Gemma 2: norms after attention and FFW; Gemma 1:
neither). What the tree cannot tell (windows, soft caps, RoPE bases and scales, local/global
pattern, query scaling) comes from a preset: the one named, checked against the tree, or the
released model of that family with the tree's shapes. The embedding table keeps all its rows
(the library pads Gemma 1 and 2's 256,000-token vocabulary to 256,128); with a tokenizer the rows
past its size are marked as padding (valid_vocab_size).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterator, Mapping

import numpy as np

from spec_tpu.checkpoints._convert import (
    TOKENIZER_DIR, GemmaConversionError, Step, check_plan, file_id, fill_params, flatten,
    float_dtype, restore_orbax_tree, same)
from spec_tpu.checkpoints import gemma_lib_vision
from spec_tpu.models import quant
from spec_tpu.models.config import PRESETS, ModelConfig

# The released models of each family, whose presets (models/config.py) give what the tree
# cannot: a tree matching one of these in every shape field converts with its settings.
RELEASED = {
  "gemma": ("gemma_2b", "gemma_7b"),
  "gemma2": ("gemma2_2b", "gemma2_9b", "gemma2_27b"),
  "gemma3": ("gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b"),
}
# Fields of the config the tree determines; a named preset must agree on each. The vocabulary is
# not among them: the library's tables are padded differently from transformers' (see above).
SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "ffw_dim",
                "post_attn_norm", "post_ffw_norm", "qk_norm")
# What makes a config a Gemma: the decoder runs a gemma tree only with these.
_GEMMA_FIELDS = dict(ffw_activation="geglu", gelu_approximate=True, norm_plus_one=True,
                     tie_embeddings=True, scale_embeddings=True, ffw_bias=False,
                     attn_out_bias=False, rope_fraction=1.0)

_ROOTS = ("params/", "transformer/", "rlx_networks/policy_network/")
# The gemma library's sampler stops on EOS and on the end of a chat turn; a converted checkpoint
# records both in its tokenizer's generation_config.json, as transformers' Gemma releases do.
END_OF_TURN = "<end_of_turn>"
_LAYER = re.compile(r"layer_(\d+)/")
_STACKED = re.compile(r"stacked_layers/attention_type_(\d+)/(.+)")


# ---------------------------------------------------------------- the tree

def canonical_names(tree: Mapping) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """({canonical name: array} of the text model, the same of the image half) of a restored
  tree in any layout; the second is empty for a text-only checkpoint.

  Canonical names are the flat layout's without its 'transformer/' root, every weight ending in
  its own name ('layer_0/mlp/linear/w', as the flat layout has it; the nested one drops the 'w'
  of the two mlp weights); stacked layers are unstacked into their layer_i (views, no copy).
  The image half's are gemma_lib_vision.canonical's."""
  flat = _unstacked(flatten(tree))
  names, vision = {}, {}
  for name, value in flat.items():
    for root in _ROOTS:
      if name.startswith(root):
        name = name[len(root):]
    if gemma_lib_vision.is_vision_name(name):
      vision[name] = value
      continue
    if name.endswith(("/mlp/gating_einsum", "/mlp/linear")):
      name += "/w"
    names[name] = value
  return names, gemma_lib_vision.canonical(vision)


def _unstacked(flat: dict) -> dict:
  """`flat` with each stacked weight ('.../stacked_layers/attention_type_j/<path>', leading
  axis n_j) replaced by its slices '.../layer_<s * P + j>/<path>', P the number of pattern
  positions (attention types) in the tree."""
  stacked = {n: m for n in flat if (m := _STACKED.search(n))}
  if not stacked:
    return flat
  period = 1 + max(int(m.group(1)) for m in stacked.values())
  out = {}
  for name, value in flat.items():
    m = stacked.get(name)
    if m is None:
      out[name] = value
      continue
    if np.ndim(value) < 1:
      raise GemmaConversionError(f"stacked tensor {name!r} has no layer axis (shape "
                                 f"{np.shape(value)})")
    head, j, path = name[:m.start()], int(m.group(1)), m.group(2)
    for s in range(np.shape(value)[0]):
      out[f"{head}layer_{s * period + j}/{path}"] = value[s]
  return out


def _shape(names, name) -> tuple[int, ...]:
  if name not in names:
    raise GemmaConversionError(f"missing tensor {name!r}")
  return tuple(np.shape(names[name]))


def _family(names: Mapping) -> str:
  if "layer_0/attn/_query_norm/scale" in names:
    return "gemma3"
  if "layer_0/post_attention_norm/scale" in names:
    return "gemma2"
  return "gemma"


def read_shapes(names: Mapping) -> dict:
  """The config fields the tree determines (SHAPE_FIELDS, vocab_size, family, transposed_gating),
  from the embedding and layer 0; every layer index from 0 up must be present."""
  if "embedder/input_embedding" not in names:
    found = sorted({n.split("/")[0] for n in names})[:8]
    raise GemmaConversionError("not a gemma library checkpoint: no 'embedder/input_embedding' "
                               f"(with or without a 'transformer/' root); it holds {found}")
  shape = _shape(names, "embedder/input_embedding")
  if len(shape) != 2:
    raise GemmaConversionError(f"tensor 'embedder/input_embedding' has shape {shape}, expected "
                               "(vocab, d_model)")
  vocab, d = shape
  layers = sorted({int(m.group(1)) for n in names if (m := _LAYER.match(n))})
  if not layers:
    raise GemmaConversionError("not a gemma library checkpoint: no 'layer_<i>/' weights")
  gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
  if gaps:
    raise GemmaConversionError(f"layer_{gaps[0]} is missing ({len(gaps)} missing in all; layers "
                               f"found up to layer_{layers[-1]})")
  if "layer_0/attn/qkv_einsum/w" in names:
    _, heads, _, head_dim = _dims(names, "layer_0/attn/qkv_einsum/w", 4)
    kv_heads = heads
  else:
    heads, _, head_dim = _dims(names, "layer_0/attn/q_einsum/w", 3)
    kv_heads = _dims(names, "layer_0/attn/kv_einsum/w", 4)[1]
  f = _dims(names, "layer_0/mlp/linear/w", 2)[0]
  gating = _shape(names, "layer_0/mlp/gating_einsum/w")
  if f == d:
    raise GemmaConversionError(f"ffw width {f} equals d_model: the gating weights' layout "
                               "(transposed or not) cannot be told from their shape")
  family = _family(names)
  return dict(vocab_size=vocab, d_model=d, num_layers=len(layers), num_heads=heads,
              num_kv_heads=kv_heads, head_dim=head_dim, ffw_dim=f,
              post_attn_norm=family != "gemma", post_ffw_norm=family != "gemma",
              qk_norm=family == "gemma3", family=family, transposed_gating=gating == (2, f, d))


def _dims(names, name, rank) -> tuple[int, ...]:
  shape = _shape(names, name)
  if len(shape) != rank:
    raise GemmaConversionError(f"tensor {name!r} has shape {shape}, expected rank {rank}")
  return shape


# ---------------------------------------------------------------- config

def _preset(preset: str | ModelConfig) -> ModelConfig:
  if isinstance(preset, ModelConfig):
    return preset
  if preset not in PRESETS:
    raise GemmaConversionError(f"unknown preset {preset!r}; the released Gemma models: "
                               + ", ".join(n for ns in RELEASED.values() for n in ns))
  return PRESETS[preset]


def config_from_tree(names: Mapping, *, preset: str | ModelConfig | None = None,
                     name: str = "gemma", dtype: str | None = None,
                     vision: Mapping | None = None, tokenizer=None) -> ModelConfig:
  """The ModelConfig of a gemma tree (canonical names, and the image half's in `vision`):
  shapes from the tree, the rest from `preset` (checked against the tree) or from the released
  model with the tree's shapes. The image block's token ids come from `tokenizer` (a loaded
  spec_tpu Tokenizer) where given, else from the preset's vision config or Gemma 3's."""
  shapes = read_shapes(names)
  family = shapes["family"]
  base_vision = None
  if preset is not None:
    base = _preset(preset)
    base_vision = base.vision
    if base_vision is not None and not vision:
      raise GemmaConversionError(f"preset {base.name!r} has a vision encoder, the checkpoint "
                                 "none: name the text model's preset")
    for field in SHAPE_FIELDS:
      if getattr(base, field) != shapes[field]:
        raise GemmaConversionError(f"preset {base.name!r} has {field}={getattr(base, field)}, "
                                   f"the checkpoint {shapes[field]} (a {family} tree)")
    for field, want in _GEMMA_FIELDS.items():
      if getattr(base, field) != want:
        raise GemmaConversionError(f"preset {base.name!r} is not a Gemma config: {field}="
                                   f"{getattr(base, field)}, Gemma has {want}")
  else:
    matches = [PRESETS[n] for n in RELEASED[family]
               if all(getattr(PRESETS[n], f) == shapes[f] for f in SHAPE_FIELDS)]
    if not matches and family != "gemma":
      described = ", ".join(f"{f}={shapes[f]}" for f in SHAPE_FIELDS[:6])
      raise GemmaConversionError(
          f"the checkpoint's shapes ({described}) match no released {family} model "
          f"({', '.join(RELEASED[family])}): name a preset whose sliding window, soft caps and "
          "RoPE settings apply (--preset=...)")
    # Every Gemma 1 model has the same settings: its shapes are all a config needs.
    base = matches[0] if matches else PRESETS[RELEASED["gemma"][0]]
  dtype = float_dtype(dtype or np.dtype(names["embedder/input_embedding"].dtype).name,
                      GemmaConversionError)
  fields = {f: shapes[f] for f in SHAPE_FIELDS + ("vocab_size",)}
  try:
    cfg = base.replace(name=name, dtype=dtype, valid_vocab_size=None, quantize=None,
                       vision=None, **fields)
  except ValueError as e:
    raise GemmaConversionError(f"the checkpoint gives an invalid model: {e}") from None
  if not vision:
    return cfg
  vcfg = gemma_lib_vision.config_from_tree(vision, base_vision, base.name)
  if tokenizer is not None:
    vcfg = gemma_lib_vision.with_token_ids(vcfg, tokenizer)
  return with_vision(cfg, vcfg)


def with_vision(cfg: ModelConfig, vision) -> ModelConfig:
  """cfg with the VisionConfig `vision`, or a GemmaConversionError saying why it cannot be."""
  if max(vision.start_id, vision.end_id, vision.newline_id) >= cfg.num_tokens:
    raise GemmaConversionError(
        f"the image block's token ids (start {vision.start_id}, end {vision.end_id}, "
        f"\"\\n\\n\" {vision.newline_id}) are outside the checkpoint's {cfg.num_tokens}-row "
        "table: give the checkpoint's tokenizer (--tokenizer) or a preset whose vision config "
        "names them")
  try:
    return cfg.replace(vision=vision)
  except ValueError as e:
    raise GemmaConversionError(f"the checkpoint gives an invalid model: {e}") from None


# ---------------------------------------------------------------- weights

def _plan(cfg: ModelConfig, qkv: bool, transposed_gating: bool) -> Iterator[Step]:
  d, h, k, e, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim,
                      cfg.vocab_size)
  yield "embedder/input_embedding", (v, d), ("embed",), same
  yield "final_norm/scale", (d,), ("final_norm",), same
  for i in range(cfg.num_layers):
    p, L = f"layer_{i}/", ("layers", i)
    A = L + ("attn",)
    yield p + "pre_attention_norm/scale", (d,), L + ("attn_norm",), same
    if qkv:
      for j, ours in enumerate(("q", "k", "v")):
        yield p + "attn/qkv_einsum/w", (3, h, d, e), A + (ours,), lambda a, j=j: a[j]
    else:
      yield p + "attn/q_einsum/w", (h, d, e), A + ("q",), same
      yield p + "attn/kv_einsum/w", (2, k, d, e), A + ("k",), lambda a: a[0]
      yield p + "attn/kv_einsum/w", (2, k, d, e), A + ("v",), lambda a: a[1]
    yield p + "attn/attn_vec_einsum/w", (h, e, d), A + ("o",), same
    if cfg.qk_norm:
      yield p + "attn/_query_norm/scale", (e,), A + ("q_norm",), same
      yield p + "attn/_key_norm/scale", (e,), A + ("k_norm",), same
    if cfg.post_attn_norm:
      yield p + "post_attention_norm/scale", (d,), L + ("post_attn_norm",), same
    yield p + "pre_ffw_norm/scale", (d,), L + ("ffw_norm",), same
    if cfg.post_ffw_norm:
      yield p + "post_ffw_norm/scale", (d,), L + ("post_ffw_norm",), same
    # The gelu applies to gating index 0 (the gate), index 1 is the up projection.
    if transposed_gating:
      yield p + "mlp/gating_einsum/w", (2, f, d), L + ("ffw", "gate"), lambda a: a[0].T
      yield p + "mlp/gating_einsum/w", (2, f, d), L + ("ffw", "up"), lambda a: a[1].T
    else:
      yield p + "mlp/gating_einsum/w", (2, d, f), L + ("ffw", "gate"), lambda a: a[0]
      yield p + "mlp/gating_einsum/w", (2, d, f), L + ("ffw", "up"), lambda a: a[1]
    yield p + "mlp/linear/w", (f, d), L + ("ffw", "down"), same


def convert_params(names: dict[str, np.ndarray], cfg: ModelConfig, dtype=None,
                   vision: dict[str, np.ndarray] | None = None) -> dict:
  """Params (numpy, models/model.py layout) from a tree's canonical names (canonical_names:
  the text model's, and the image half's in `vision` where cfg.vision is set).
  Every name and shape is checked first; a weight the decoder would not use is an error. Each
  source array is dropped from `names` / `vision` after its last use, so the source's memory is
  handed back as the output fills."""
  if bool(vision) != (cfg.vision is not None):
    raise GemmaConversionError("the tree has a vision encoder, the config none" if vision else
                               "the config has a vision encoder, the tree none")
  qkv = "layer_0/attn/qkv_einsum/w" in names
  transposed = tuple(np.shape(names.get("layer_0/mlp/gating_einsum/w", ()))) == (
      2, cfg.ffw_dim, cfg.d_model)
  plan = list(_plan(cfg, qkv, transposed))
  check_plan(plan, set(names), lambda n: np.shape(names[n]), lambda n: names[n].dtype,
             ignorable=lambda n: False, error=GemmaConversionError,
             context=f"config: {cfg.num_layers} layers, {cfg.num_heads} heads, "
                     f"{cfg.num_kv_heads} kv heads",
             unexpected_hint="LoRA or quantization weights? a layer the config lacks?")
  text_cfg = cfg.replace(vision=None)
  if cfg.vision is None:
    return fill_params(plan, lambda n: np.asarray(names[n]), text_cfg, dtype, release=names.pop)
  image = gemma_lib_vision.convert(vision, cfg, dtype)  # checks its names before the decoder's
  return dict(fill_params(plan, lambda n: np.asarray(names[n]), text_cfg, dtype,
                          release=names.pop), vision=image)


# ---------------------------------------------------------------- directories

def find_tokenizer(src: str) -> str | None:
  """The tokenizer.model of a released checkpoint: in the orbax directory, or beside it (the
  Kaggle layout: <model>/tokenizer.model next to <model>/<variant>/)."""
  for folder in (src, os.path.dirname(src.rstrip(os.sep))):
    path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(path):
      return path
  return None


def convert_directory(src, dst, *, preset: str | ModelConfig | None = None,
                      tokenizer: str | None = None, dtype: str | None = None,
                      overwrite: bool = False, quantize: str | None = None) -> ModelConfig:
  """Converts a gemma library orbax checkpoint directory to a spec_tpu checkpoint at dst.

  preset: a preset name or ModelConfig whose family settings apply (checked against the tree);
    None: the released model with the tree's shapes.
  tokenizer: the sentencepiece tokenizer.model to copy to dst/tokenizer/; None: find_tokenizer's
    (a checkpoint converted without one takes token ids only). Its size must fit the table.
    Where it has an <end_of_turn> piece, dst/tokenizer/generation_config.json lists it beside
    EOS: generation stops on either, as in the gemma library's sampler. With a vision tree, the
    image block's <start_of_image>, <end_of_image> and "\n\n" ids are read from it.
  dtype: the params dtype; default the checkpoint's. quantize: None or "int8" (models/quant.py).
  Returns the ModelConfig (its `tokenizer` names the copied file, "sp:<hash>").
  """
  from spec_tpu import tokenizer as tokenizer_lib
  from spec_tpu.checkpoints import checkpoint  # heavy (orbax): only once there is work to do

  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  if dtype is not None:
    dtype = float_dtype(dtype, GemmaConversionError)
  try:
    quantize = quant.check_mode(quantize)
  except ValueError as e:
    raise GemmaConversionError(str(e)) from None
  if tokenizer is not None and not os.path.isfile(tokenizer):
    raise GemmaConversionError(f"tokenizer {tokenizer!r} is not a file")
  if os.path.isdir(src):
    checkpoint.check_destination(dst, overwrite, source=src)
  names, vision = canonical_names(
      restore_orbax_tree(src, GemmaConversionError, "the gemma library's params"))
  tokenizer = tokenizer or find_tokenizer(src)
  tok, files = None, {}
  if tokenizer is not None:
    try:
      tok = tokenizer_lib.Tokenizer.load(tokenizer)
    except (OSError, RuntimeError, ValueError) as e:
      raise GemmaConversionError(f"tokenizer {tokenizer!r} is not a usable sentencepiece "
                                 f"model: {str(e).splitlines()[0]}") from None
  cfg = config_from_tree(names, preset=preset, name=os.path.basename(src.rstrip(os.sep)),
                         dtype=dtype, vision=vision, tokenizer=tok)
  if tok is not None:
    if tok.vocab_size > cfg.vocab_size:
      raise GemmaConversionError(f"tokenizer {tokenizer!r} has {tok.vocab_size} tokens but the "
                                 f"checkpoint's embedding table only {cfg.vocab_size} rows: not "
                                 "this model's tokenizer")
    cfg = cfg.replace(tokenizer=file_id(tokenizer, "sp"),
                      valid_vocab_size=tok.vocab_size if tok.vocab_size < cfg.vocab_size
                      else None)
    files = {f"{TOKENIZER_DIR}/tokenizer.model": tokenizer}
  cfg = cfg.replace(quantize=quantize)
  params = convert_params(names, cfg, vision=vision)
  extra = {"source": "gemma", "src": src}
  with tempfile.TemporaryDirectory() as tmp:
    end_of_turn = tok.piece_id(END_OF_TURN) if tok is not None else None
    if end_of_turn is not None and tok.eos_id >= 0:
      generation = os.path.join(tmp, "generation_config.json")
      with open(generation, "w") as f:
        json.dump({"eos_token_id": [tok.eos_id, end_of_turn]}, f)
      files[f"{TOKENIZER_DIR}/generation_config.json"] = generation
    checkpoint.save(dst, params, cfg, extra=extra, overwrite=overwrite, files=files)
  return cfg
