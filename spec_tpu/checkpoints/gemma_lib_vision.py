"""The image half of the gemma library's Gemma 3 checkpoints: its SigLIP encoder and the
embedder's projection of soft tokens, converted to params["vision"] (models/vision/siglip.py),
the same params the transformers checkpoint of the model converts to (hf_vision.py).

Names are the library's (gemma/gm/nn/vision/_vision.py SigLiPFromPatches holding
_vision_utils.py's ViTModel, whose flax submodules are auto-named; transformers'
convert_gemma3_weights.py reads the same), canonical as the flat layout writes them. With
E = 'SigLiPFromPatches_0/siglip_encoder/' (the nested layout's 'vision_encoder/siglip_encoder/'),
a the encoder width, h heads, e head dim, m the MLP width, P the patch side, N patches, d d_model:
  E embedding/kernel, bias             (P, P, 3, a), (a)  a stride-P convolution: a patch in
                                                          (row, column, channel) order x matrix
  E pos_embedding                      (1, N, a)   learned, patches row-major
  E Transformer/encoderblock_i/LayerNorm_0/scale, bias                        (a)  pre-attention
  E Transformer/encoderblock_i/MultiHeadDotProductAttention_0/query|key|value/kernel (a, h, e),
                                                                        bias (h, e)
  E Transformer/encoderblock_i/MultiHeadDotProductAttention_0/out/kernel (h, e, a), bias (a)
  E Transformer/encoderblock_i/LayerNorm_1/scale, bias                        (a)  pre-MLP
  E Transformer/encoderblock_i/MlpBlock_0/Dense_0/kernel (a, m), bias (m)   tanh-GELU after it
  E Transformer/encoderblock_i/MlpBlock_0/Dense_1/kernel (m, a), bias (a)
  E Transformer/encoder_norm/scale, bias                                      (a)
  embedder/mm_soft_embedding_norm/scale   (a)     RMSNorm times (1 + scale)
  embedder/mm_input_projection/w          (a, d)  '...tm,md->...td'
The ViT's scan option stacks the blocks instead (E Transformer/encoderblock/..., a leading
layer axis): read too. The average pooling to soft tokens has no weights.

The tree gives the encoder's shape (patch and image size, width, layers, heads, MLP). What it
cannot tell comes from the named preset's vision config, else Gemma 3's (the library's
SigLiPFromPatches defaults): soft tokens per image (256), the LayerNorm epsilon and the image
block's token ids, which a tokenizer overrides (<start_of_image>, <end_of_image>, "\\n\\n").
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterator, Mapping

import numpy as np

from spec_tpu.checkpoints._convert import (
    GemmaConversionError, Step, check_plan, fill_vision, same)
from spec_tpu.checkpoints.hf_vision import with_newline_id
from spec_tpu.models.config import ModelConfig
from spec_tpu.models.vision.config import GEMMA3, VisionConfig

log = logging.getLogger(__name__)

ENCODER = "SigLiPFromPatches_0/siglip_encoder/"
_NESTED_ENCODER = "vision_encoder/"  # model.init()['params']['vision_encoder'] = the flat root
PROJECTION = "embedder/mm_input_projection/w"
SOFT_NORM = "embedder/mm_soft_embedding_norm/scale"
# Embedder rows that neither the library's Embedder nor transformers' converter reads.
UNUSED = ("embedder/mm_output_embedding", "embedder/mm_input_embedding_extra")
PARTS = ("SigLiPFromPatches_0/", _NESTED_ENCODER, "embedder/mm_")
# What an image needs at least: a tree holding some of these but not all is partial.
_ANCHORS = (ENCODER + "embedding/kernel", ENCODER + "pos_embedding",
            ENCODER + "Transformer/encoder_norm/scale", SOFT_NORM, PROJECTION)
_BLOCK = re.compile(re.escape(ENCODER) + r"Transformer/encoderblock_(\d+)/")
_SCANNED = ENCODER + "Transformer/encoderblock/"
# Config fields the tree determines; a named preset's vision config must agree on each.
SHAPE_FIELDS = ("image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim")
START_OF_IMAGE, END_OF_IMAGE = "<start_of_image>", "<end_of_image>"


def is_vision_name(name: str) -> bool:
  """Whether a name (roots 'transformer/', 'params/' removed) belongs to the image half."""
  return name.startswith(PARTS)


def canonical(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The image half's names in the flat layout, scanned encoder blocks unstacked (views), the
  UNUSED rows left out (a text-only release may carry them too)."""
  unused = sorted(n for n in flat if n.startswith(UNUSED))
  if unused:
    log.info("skipping %s: neither the gemma library's model nor transformers reads it",
             ", ".join(unused))
  out = {}
  for name, value in flat.items():
    if name.startswith(UNUSED):
      continue
    if name.startswith(_NESTED_ENCODER):
      name = "SigLiPFromPatches_0/" + name[len(_NESTED_ENCODER):]
    if name.startswith(_SCANNED):
      if np.ndim(value) < 1:
        raise GemmaConversionError(f"scanned encoder tensor {name!r} has no layer axis")
      for i in range(np.shape(value)[0]):
        out[f"{ENCODER}Transformer/encoderblock_{i}/{name[len(_SCANNED):]}"] = value[i]
    else:
      out[name] = value
  return out


def _shape(names, name, rank) -> tuple[int, ...]:
  shape = tuple(np.shape(names[name]))
  if len(shape) != rank:
    raise GemmaConversionError(f"tensor {name!r} has shape {shape}, expected rank {rank}")
  return shape


def read_shapes(names: Mapping) -> dict:
  """The VisionConfig fields the tree determines (SHAPE_FIELDS), after checking it is whole."""
  missing = [a for a in _ANCHORS if a not in names]
  blocks = sorted({int(m.group(1)) for n in names if (m := _BLOCK.match(n))})
  if missing or not blocks:
    what = repr(missing[0]) if missing else f"'{ENCODER}Transformer/encoderblock_0/...'"
    raise GemmaConversionError(
        f"partial vision tree: no {what} ({len(names)} vision tensors found, e.g. "
        f"{sorted(names)[0]!r}); an image needs the SigLIP encoder (SigLiPFromPatches_0/ or "
        "vision_encoder/) and the embedder's mm_input_projection and mm_soft_embedding_norm")
  gaps = sorted(set(range(blocks[-1] + 1)) - set(blocks))
  if gaps:
    raise GemmaConversionError(f"vision encoder block encoderblock_{gaps[0]} is missing "
                               f"({len(gaps)} missing in all; blocks found up to "
                               f"encoderblock_{blocks[-1]})")
  p, p2, channels, width = _shape(names, ENCODER + "embedding/kernel", 4)
  if p != p2 or channels != 3:
    raise GemmaConversionError(f"tensor '{ENCODER}embedding/kernel' has shape "
                               f"{(p, p2, channels, width)}; expected square RGB patches "
                               "(P, P, 3, width)")
  _, num_patches, _ = _shape(names, ENCODER + "pos_embedding", 3)
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise GemmaConversionError(f"tensor '{ENCODER}pos_embedding' holds {num_patches} "
                               "positions, not a square grid of patches")
  block0 = ENCODER + "Transformer/encoderblock_0/"
  heads = _shape(names, block0 + "MultiHeadDotProductAttention_0/query/kernel", 3)[1]
  mlp = _shape(names, block0 + "MlpBlock_0/Dense_0/kernel", 2)[1]
  return dict(image_size=side * p, patch_size=p, width=width, num_layers=len(blocks),
              num_heads=heads, mlp_dim=mlp)


def config_from_tree(names: Mapping, preset: VisionConfig | None,
                     preset_name: str = "") -> VisionConfig:
  """The VisionConfig of an image half (canonical names): shapes from the tree, the rest from
  `preset` (checked against the tree), else Gemma 3's."""
  shapes = read_shapes(names)
  if preset is not None:
    for field in SHAPE_FIELDS:
      if getattr(preset, field) != shapes[field]:
        raise GemmaConversionError(f"preset {preset_name!r} has vision.{field}="
                                   f"{getattr(preset, field)}, the checkpoint {shapes[field]}")
  try:
    return (preset or GEMMA3).replace(**shapes)
  except ValueError as e:
    raise GemmaConversionError(f"the checkpoint's vision tree gives an invalid encoder ({e}): "
                               "name a preset whose vision config fits it (--preset=...)") from None


def with_token_ids(vision: VisionConfig, tokenizer) -> VisionConfig:
  """`vision` with the image block's ids read from the checkpoint's tokenizer."""
  ids = {}
  for field, piece in (("start_id", START_OF_IMAGE), ("end_id", END_OF_IMAGE)):
    ids[field] = tokenizer.piece_id(piece)
    if ids[field] is None:
      raise GemmaConversionError(f"the tokenizer has no {piece} piece; an image block needs it "
                                 "(Gemma 3's tokenizers have it): not this model's tokenizer?")
  vision = with_newline_id(vision, tokenizer, GemmaConversionError)
  try:
    return vision.replace(**ids)
  except ValueError as e:
    raise GemmaConversionError(f"the tokenizer's image-block ids do not fit: {e}") from None


def _plan(cfg: ModelConfig) -> Iterator[Step]:
  """(gemma name, its shape, destination path in params["vision"], array -> ours)."""
  v, d = cfg.vision, cfg.d_model
  w, h, e, m, p = v.width, v.num_heads, v.head_dim, v.mlp_dim, v.patch_size
  # The kernel's (row, column, channel) input order is siglip.patchify's: a reshape, no copy.
  yield ENCODER + "embedding/kernel", (p, p, 3, w), ("patch",), lambda a: a.reshape(-1, w)
  yield ENCODER + "embedding/bias", (w,), ("patch_bias",), same
  yield ENCODER + "pos_embedding", (1, v.num_patches, w), ("position",), lambda a: a[0]
  for i in range(v.num_layers):
    B = f"{ENCODER}Transformer/encoderblock_{i}/"
    for ours, theirs in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1")):
      yield B + theirs + "/scale", (w,), ("layers", ours + "_scale", i), same
      yield B + theirs + "/bias", (w,), ("layers", ours + "_bias", i), same
    A = B + "MultiHeadDotProductAttention_0/"
    for name in ("query", "key", "value"):
      yield A + name + "/kernel", (w, h, e), ("layers", name, i), same
      yield A + name + "/bias", (h, e), ("layers", name + "_bias", i), same
    yield A + "out/kernel", (h, e, w), ("layers", "out", i), same
    yield A + "out/bias", (w,), ("layers", "out_bias", i), same
    M = B + "MlpBlock_0/"
    yield M + "Dense_0/kernel", (w, m), ("layers", "fc1", i), same
    yield M + "Dense_0/bias", (m,), ("layers", "fc1_bias", i), same
    yield M + "Dense_1/kernel", (m, w), ("layers", "fc2", i), same
    yield M + "Dense_1/bias", (w,), ("layers", "fc2_bias", i), same
  yield ENCODER + "Transformer/encoder_norm/scale", (w,), ("final_scale",), same
  yield ENCODER + "Transformer/encoder_norm/bias", (w,), ("final_bias",), same
  yield SOFT_NORM, (w,), ("soft_norm",), same
  yield PROJECTION, (w, d), ("projection",), same


def convert(names: dict[str, np.ndarray], cfg: ModelConfig, dtype=None) -> dict:
  """params["vision"] (numpy, siglip.py layout) from the image half's canonical names, after
  checking every name, shape and dtype; each source array is dropped from `names` after use."""
  plan = list(_plan(cfg))
  check_plan(plan, set(names), lambda n: np.shape(names[n]), lambda n: names[n].dtype,
             ignorable=lambda n: False, error=GemmaConversionError,
             context=f"vision: {cfg.vision.num_layers} encoder blocks, width "
                     f"{cfg.vision.width}, d_model {cfg.d_model}",
             unexpected_hint="a pooling head or projector this encoder does not run?")
  return fill_vision(plan, lambda n: names[n], cfg, dtype, release=names.pop)
