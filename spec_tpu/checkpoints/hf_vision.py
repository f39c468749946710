"""The image half of Gemma3ForConditionalGeneration checkpoints: SigLIP encoder and projector.

Names: the hub's files say vision_tower.vision_model.* and multi_modal_projector.*
(language_model.model.* for the decoder); transformers 5 saves vision_tower.* (its
SiglipVisionModel lost the vision_model level) and holds model.vision_tower.*,
model.multi_modal_projector.* in memory. All are read. The SigLIP pooling head (head.*), which
Gemma 3 never runs, is skipped. Layouts: spec_tpu/models/vision/siglip.py.
"""

from __future__ import annotations

from typing import Any

from spec_tpu.checkpoints._convert import (
    ConversionError, HFConversionError, check_plan, fill_vision, same)
from spec_tpu.models.config import ModelConfig
from spec_tpu.models.vision.config import VisionConfig

_TOWERS = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
           "model.vision_tower.")
_PROJECTORS = ("multi_modal_projector.", "model.multi_modal_projector.")
_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
          "model.multi_modal_projector.")
# SiglipVisionConfig's defaults for the fields read (config.json omits fields at their default).
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def is_multimodal(hf: dict[str, Any]) -> bool:
  return ("Gemma3ForConditionalGeneration" in (hf.get("architectures") or [])
          or hf.get("model_type") == "gemma3")


def vision_config(hf: dict[str, Any]) -> VisionConfig:
  """The VisionConfig of a Gemma3ForConditionalGeneration config.json."""
  v = hf.get("vision_config")
  if not isinstance(v, dict):
    raise HFConversionError("Gemma3ForConditionalGeneration config.json has no 'vision_config'")
  f = dict(_SIGLIP_DEFAULTS, **{k: x for k, x in v.items() if x is not None})
  if f["hidden_act"] != "gelu_pytorch_tanh":
    raise HFConversionError(f"config field 'vision_config.hidden_act' is {f['hidden_act']!r}; the encoder "
                 "runs gelu_pytorch_tanh")
  if f["num_channels"] != 3:
    raise HFConversionError(f"config field 'vision_config.num_channels' is {f['num_channels']}; images "
                 "are RGB (3)")
  def top(*names, default):
    return next((hf[n] for n in names if hf.get(n) is not None), default)

  try:
    return VisionConfig(
        image_size=f["image_size"], patch_size=f["patch_size"], width=f["hidden_size"],
        num_layers=f["num_hidden_layers"], num_heads=f["num_attention_heads"],
        mlp_dim=f["intermediate_size"], norm_eps=float(f["layer_norm_eps"]),
        num_soft_tokens=top("mm_tokens_per_image", default=256),
        start_id=top("boi_token_index", "boi_token_id", default=255_999),
        end_id=top("eoi_token_index", "eoi_token_id", default=256_000),
        image_id=top("image_token_index", "image_token_id", default=262_144))
  except (TypeError, ValueError) as e:
    raise HFConversionError(f"config.json gives an invalid vision tower: {e}") from None


def with_newline_id(vision: VisionConfig, tokenizer,
                    error: type[ConversionError] = HFConversionError) -> VisionConfig:
  """`vision` with the id of "\n\n" (which opens and closes an image block) read from the
  checkpoint's tokenizer; `error` where the tokenizer splits it."""
  ids = tokenizer.encode("\n\n")
  if len(ids) != 1:
    raise error(f"the tokenizer encodes \"\\n\\n\" as {len(ids)} tokens {ids}; an "
                            "image block needs it as one token (Gemma 3's tokenizers have it)")
  return vision.replace(newline_id=int(ids[0]))


def is_vision_name(name: str) -> bool:
  return name.startswith(_PARTS)


def _locate(names: set[str], roots, probe: str, what: str) -> str:
  found = [r for r in roots if r + probe in names]
  if not found:
    raise HFConversionError(f"no {what} in the checkpoint (looked for "
                 + ", ".join(repr(r + probe) for r in roots) + ")")
  # vision_tower. is also a prefix of vision_tower.vision_model.: the longest root is the one.
  return max(found, key=len)


def _plan(cfg: ModelConfig, tower: str, projector: str):
  """(HF name, HF shape, destination path in params["vision"], HF array -> ours)."""
  v, d = cfg.vision, cfg.d_model
  w, h, e, m, p = v.width, v.num_heads, v.head_dim, v.mlp_dim, v.patch_size
  yield (tower + "embeddings.patch_embedding.weight", (w, 3, p, p), ("patch",),
         lambda a: a.transpose(2, 3, 1, 0).reshape(p * p * 3, w))
  yield tower + "embeddings.patch_embedding.bias", (w,), ("patch_bias",), same
  yield tower + "embeddings.position_embedding.weight", (v.num_patches, w), ("position",), same
  for i in range(v.num_layers):
    L, at = tower + f"encoder.layers.{i}.", i
    for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
      yield L + theirs + ".weight", (w,), ("layers", ours + "_scale", at), same
      yield L + theirs + ".bias", (w,), ("layers", ours + "_bias", at), same
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      yield (L + f"self_attn.{theirs}.weight", (h * e, w), ("layers", ours, at),
             lambda a: a.T.reshape(w, h, e))
      yield (L + f"self_attn.{theirs}.bias", (h * e,), ("layers", ours + "_bias", at),
             lambda a: a.reshape(h, e))
    yield (L + "self_attn.out_proj.weight", (w, h * e), ("layers", "out", at),
           lambda a: a.T.reshape(h, e, w))
    yield L + "self_attn.out_proj.bias", (w,), ("layers", "out_bias", at), same
    yield L + "mlp.fc1.weight", (m, w), ("layers", "fc1", at), lambda a: a.T
    yield L + "mlp.fc1.bias", (m,), ("layers", "fc1_bias", at), same
    yield L + "mlp.fc2.weight", (w, m), ("layers", "fc2", at), lambda a: a.T
    yield L + "mlp.fc2.bias", (w,), ("layers", "fc2_bias", at), same
  yield tower + "post_layernorm.weight", (w,), ("final_scale",), same
  yield tower + "post_layernorm.bias", (w,), ("final_bias",), same
  yield projector + "mm_soft_emb_norm.weight", (w,), ("soft_norm",), same
  yield projector + "mm_input_projection_weight", (w, d), ("projection",), same


def convert(index, cfg: ModelConfig, dtype=None) -> dict:
  """params["vision"] (numpy, the siglip.py layout, float weights cast to dtype or cfg.dtype)
  from a checkpoint index, after checking every name, shape and dtype of the image half."""
  names = set(index.names())
  tower = _locate(names, _TOWERS, "embeddings.patch_embedding.weight", "vision tower")
  projector = _locate(names, _PROJECTORS, "mm_input_projection_weight", "image projector")
  plan = list(_plan(cfg, tower, projector))
  head = tower + "head."  # the pooling head Gemma 3 never runs
  check_plan(plan, names, index.shape, index.dtype,
             ignorable=lambda n: not is_vision_name(n) or n.startswith(head),
             error=HFConversionError, context=f"config.json: {cfg.vision.num_layers} vision layers",
             unexpected_hint="more vision layers than config.json says?")
  return fill_vision(plan, index.get, cfg, dtype)
