"""Gemma 4 text checkpoints from Hugging Face: config.json mapping and weight plan.

Served: Gemma4ForCausalLM (model_type gemma4_text), the text half of
Gemma4ForConditionalGeneration (model_type gemma4; its vision and audio towers are not read),
and Gemma4AssistantForCausalLM (model_type gemma4_assistant: assistant_from_hf).
The semantics follow transformers' models/gemma4/modeling_gemma4.py (5.25), which
tests/test_gemma4.py checks against:
  - RMSNorm multiplies by w (not 1 + w); values get a weightless RMSNorm; attention scale 1.
  - Global (full_attention) layers have their own head size and, with attention_k_eq_v, their
    own KV head count and no v_proj (values are the key projection before k_norm and RoPE).
  - Global RoPE is "proportional": partial_rotary_factor of the frequencies turn.
  - Every layer's output is multiplied by its layer_scalar; PLE (hidden_size_per_layer_input)
    adds a gated per-layer embedding; the last num_kv_shared_layers layers read the cache of
    the last earlier layer of their kind, with use_double_wide_mlp doubling their MLP.
Two config layouts are read: the published one (global_head_dim, num_global_key_value_heads
as fields) and the one transformers 5.25 writes (per_layer_config: layer index -> overrides).
Mixtures of experts (enable_moe_block, 26B-A4B) and bidirectional attention are refused.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu.checkpoints._convert import (
    HFConversionError, Step, check_plan, fill_params, float_dtype, same, shortest_period,
    transpose)
from spec_tpu.models.config import GLOBAL, LOCAL, AssistantConfig, ModelConfig

_TEXT_TYPES = ("gemma4_text",)
_MULTIMODAL_TYPES = ("gemma4",)
_ARCHS = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
_KINDS = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
# Gemma4TextConfig's defaults for the fields read below (config.json omits defaults).
_DEFAULTS = dict(vocab_size=262_144, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                 tie_word_embeddings=True, sliding_window=512, final_logit_softcapping=None,
                 vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256,
                 attention_k_eq_v=False, num_kv_shared_layers=0, enable_moe_block=False,
                 use_double_wide_mlp=False, attention_bias=False,
                 use_bidirectional_attention=None, global_head_dim=512,
                 num_global_key_value_heads=None)
_ROPE_DEFAULTS = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                  "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                     "rope_theta": 1_000_000.0}}
_error = HFConversionError  # hf.py's error type: one for every Hugging Face refusal


def is_gemma4(hf: dict) -> bool:
  archs = hf.get("architectures") or []
  return any(a in _ARCHS for a in archs) or hf.get("model_type") in _TEXT_TYPES + _MULTIMODAL_TYPES


def is_gemma4_config(cfg: ModelConfig) -> bool:
  return cfg.layer_scalar  # the one Gemma 4 feature every Gemma 4 text model has


def _text(hf: dict) -> dict:
  if hf.get("model_type") in _TEXT_TYPES or "Gemma4ForCausalLM" in (hf.get("architectures") or []):
    return hf
  text = hf.get("text_config")
  if not isinstance(text, dict):
    raise _error("Gemma4ForConditionalGeneration config.json has no 'text_config'")
  text = dict(text)
  for key in ("tie_word_embeddings", "dtype", "torch_dtype"):  # may live at the top level only
    if key not in text and key in hf:
      text[key] = hf[key]
  return text


def _global_shape(f, names: list[str]) -> tuple[int, int | None]:
  """(global head_dim, global KV heads or None) from either config layout."""
  plc = f("per_layer_config")
  if plc is None:
    kv = f("num_global_key_value_heads") if f("attention_k_eq_v") else None
    return int(f("global_head_dim")), kv
  if not isinstance(plc, dict):
    raise _error("config field 'per_layer_config' must map layer indices to overrides")
  overrides = {}
  for key, value in plc.items():
    i = int(key)
    if not 0 <= i < len(names):
      raise _error(f"config field 'per_layer_config' names layer {i} of {len(names)}")
    unknown = set(value) - {"head_dim", "num_key_value_heads"}
    if unknown:
      raise _error(f"config field 'per_layer_config[{i}]' overrides {sorted(unknown)}; "
                   "only head_dim and num_key_value_heads are supported")
    overrides[i] = value
  per_kind = {}
  for i, name in enumerate(names):
    o = overrides.get(i, {})
    shape = (o.get("head_dim", f("head_dim")), o.get("num_key_value_heads"))
    if per_kind.setdefault(name, shape) != shape:
      raise _error(f"config field 'per_layer_config': layers of kind {name!r} differ in shape")
  if per_kind.get("sliding_attention", (f("head_dim"), None)) != (f("head_dim"), None):
    raise _error("config field 'per_layer_config': sliding_attention layers must keep "
                 "head_dim and num_key_value_heads")
  return per_kind.get("full_attention", (f("head_dim"), None))


def config_from_hf(hf: dict[str, Any], *, name: str | None = None,
                   dtype: str | None = None) -> ModelConfig:
  text = _text(hf)
  f = lambda key: text[key] if key in text else _DEFAULTS.get(key)  # noqa: E731
  if f("enable_moe_block") or f("num_experts"):
    raise _error("config field 'enable_moe_block' is set: Gemma 4 mixtures of experts are not "
                 "supported yet")
  if f("attention_bias"):
    raise _error("config field 'attention_bias' is true: the decoder has no biases")
  if f("use_bidirectional_attention") == "all":
    raise _error("config field 'use_bidirectional_attention' is 'all': the decoder is causal")
  if f("hidden_activation") != "gelu_pytorch_tanh":
    raise _error(f"config field 'hidden_activation' is {f('hidden_activation')!r}; supported: "
                 "gelu_pytorch_tanh")
  num_layers = f("num_hidden_layers")
  names = list(f("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                    for i in range(num_layers)])
  if len(names) != num_layers:
    raise _error(f"config field 'layer_types' has {len(names)} entries for "
                 f"num_hidden_layers={num_layers}")
  bad = [n for n in names if n not in _KINDS]
  if bad:
    raise _error(f"config field 'layer_types' holds {bad[0]!r}; supported: {sorted(_KINDS)}")
  names[-1] = "full_attention"  # Gemma4TextConfig forces the last layer global
  global_head_dim, global_kv = _global_shape(f, names)
  rope = dict(_ROPE_DEFAULTS)
  rope.update(f("rope_parameters") or {})
  local, full = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
  if local.get("rope_type", "default") != "default" or local.get("partial_rotary_factor",
                                                                    1.0) != 1.0:
    raise _error("config field 'rope_parameters.sliding_attention': only default RoPE is "
                 "supported on sliding layers")
  if full.get("rope_type", "default") not in ("default", "proportional") or full.get(
      "factor", 1.0) != 1.0:
    raise _error(f"config field 'rope_parameters.full_attention': rope type "
                 f"{full.get('rope_type')!r} with factor {full.get('factor', 1.0)} is not "
                 "supported (default or proportional, factor 1)")
  proportion = (float(full.get("partial_rotary_factor", 1.0))
                if full.get("rope_type") == "proportional" else 1.0)
  ple = f("hidden_size_per_layer_input") or 0
  shared = f("num_kv_shared_layers") or 0
  ffw = f("intermediate_size")
  pattern = shortest_period([_KINDS[n] for n in names])
  try:
    return ModelConfig(
        name=name or text.get("_name_or_path") or "gemma4", vocab_size=f("vocab_size"),
        d_model=f("hidden_size"), num_layers=num_layers, num_heads=f("num_attention_heads"),
        num_kv_heads=f("num_key_value_heads"), head_dim=f("head_dim"), ffw_dim=ffw,
        ffw_activation="geglu", gelu_approximate=True, norm_eps=float(f("rms_norm_eps")),
        norm_plus_one=False, tie_embeddings=bool(f("tie_word_embeddings")),
        scale_embeddings=True, post_attn_norm=True, post_ffw_norm=True, qk_norm=True,
        query_scale=1.0,
        final_logit_softcap=(None if f("final_logit_softcapping") is None
                             else float(f("final_logit_softcapping"))),
        layer_pattern=pattern, sliding_window=f("sliding_window") if LOCAL in pattern else None,
        rope_base_local=float(local.get("rope_theta", 10_000.0)),
        rope_base_global=float(full.get("rope_theta", 1_000_000.0)),
        dtype=float_dtype(dtype or f("dtype") or f("torch_dtype") or "float32"),
        global_head_dim=global_head_dim, num_global_kv_heads=global_kv,
        global_k_eq_v=bool(f("attention_k_eq_v")), v_norm=True, layer_scalar=True,
        rope_proportion_global=proportion, ple_dim=ple,
        ple_vocab_size=f("vocab_size_per_layer_input") if ple else None,
        kv_shared_layers=shared,
        kv_shared_ffw_dim=2 * ffw if shared and f("use_double_wide_mlp") else None)
  except ValueError as e:
    raise _error(f"config.json gives an invalid model: {e}") from None


# ---------------------------------------------------------------- weights

_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def _prefix(names: set[str]) -> str:
  found = [p for p in _PREFIXES if f"{p}embed_tokens.weight" in names]
  if len(found) != 1:
    raise _error(f"expected one embedding table '<prefix>embed_tokens.weight' with a prefix in "
                 f"{_PREFIXES}, found {found or 'none'}")
  return found[0]


def _plan(cfg: ModelConfig, prefix: str) -> Iterator[Step]:
  """(HF name, HF shape, params path, HF array -> ours) for every tensor the decoder uses."""
  d, h, v = cfg.d_model, cfg.num_heads, cfg.vocab_size

  def heads_in(n, e):  # (n*e, d) -> (n d e)
    return lambda a: a.reshape(n, e, d).transpose(0, 2, 1)

  yield f"{prefix}embed_tokens.weight", (v, d), ("embed",), same
  if not cfg.tie_embeddings:
    yield "lm_head.weight", (v, d), ("unembed",), transpose
  yield f"{prefix}norm.weight", (d,), ("final_norm",), same
  if cfg.ple_dim:
    width = cfg.num_layers * cfg.ple_dim
    yield (f"{prefix}embed_tokens_per_layer.weight", (cfg.ple_vocab_size or v, width),
           ("ple_embed",), same)
    yield f"{prefix}per_layer_model_projection.weight", (width, d), ("ple_proj",), transpose
    yield f"{prefix}per_layer_projection_norm.weight", (cfg.ple_dim,), ("ple_proj_norm",), same
  for i, kind in enumerate(cfg.layer_types):
    p, L = f"{prefix}layers.{i}.", ("layers", i)
    e, k = cfg.kind_head_dim(kind), cfg.kind_kv_heads(kind)
    shared = i >= cfg.num_cached_layers
    f = cfg.kv_shared_ffw_dim if shared and cfg.kv_shared_ffw_dim else cfg.ffw_dim
    yield p + "input_layernorm.weight", (d,), L + ("attn_norm",), same
    yield p + "self_attn.q_proj.weight", (h * e, d), L + ("attn", "q"), heads_in(h, e)
    yield p + "self_attn.q_norm.weight", (e,), L + ("attn", "q_norm"), same
    if not shared:
      yield p + "self_attn.k_proj.weight", (k * e, d), L + ("attn", "k"), heads_in(k, e)
      yield p + "self_attn.k_norm.weight", (e,), L + ("attn", "k_norm"), same
      if not (kind == GLOBAL and cfg.global_k_eq_v):
        yield p + "self_attn.v_proj.weight", (k * e, d), L + ("attn", "v"), heads_in(k, e)
    yield (p + "self_attn.o_proj.weight", (d, h * e), L + ("attn", "o"),
           lambda a, e=e: a.reshape(d, h, e).transpose(1, 2, 0))
    yield p + "post_attention_layernorm.weight", (d,), L + ("post_attn_norm",), same
    yield p + "pre_feedforward_layernorm.weight", (d,), L + ("ffw_norm",), same
    yield p + "post_feedforward_layernorm.weight", (d,), L + ("post_ffw_norm",), same
    yield p + "mlp.gate_proj.weight", (f, d), L + ("ffw", "gate"), transpose
    yield p + "mlp.up_proj.weight", (f, d), L + ("ffw", "up"), transpose
    yield p + "mlp.down_proj.weight", (d, f), L + ("ffw", "down"), transpose
    yield p + "layer_scalar", (1,), L + ("layer_scalar",), same
    if cfg.ple_dim:
      yield p + "per_layer_input_gate.weight", (cfg.ple_dim, d), L + ("ple_gate",), transpose
      yield p + "per_layer_projection.weight", (d, cfg.ple_dim), L + ("ple_out",), transpose
      yield p + "post_per_layer_input_norm.weight", (d,), L + ("ple_norm",), same


def _ignorable(name: str, prefix: str, cfg: ModelConfig) -> bool:
  if not name.startswith(prefix) and name != "lm_head.weight":
    return True  # vision / audio towers and embedders of the multimodal checkpoint
  if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"):
    return True
  rest = name[len(prefix):].split(".")
  # Some writers keep k/v weights on kv-shared layers; transformers ignores them on load too.
  return (len(rest) > 3 and rest[0] == "layers" and int(rest[1]) >= cfg.num_cached_layers
          and rest[2] == "self_attn" and rest[3] in ("k_proj", "v_proj", "k_norm", "v_norm"))


def convert_params(index, cfg: ModelConfig, dtype=None) -> dict:
  """Params (numpy arrays, model.py layout) from a Gemma 4 checkpoint index (see
  hf.convert_params: every name and shape is checked before any tensor is read)."""
  if cfg.quantize:
    raise _error("quantize is not supported for Gemma 4 checkpoints yet")
  names = set(index.names())
  prefix = _prefix(names)
  plan = list(_plan(cfg, prefix))
  check_plan(plan, names, index.shape, index.dtype,
             ignorable=lambda n: _ignorable(n, prefix, cfg), error=HFConversionError,
             context=f"config.json: {cfg.num_layers} layers, {cfg.kv_shared_layers} kv-shared",
             unexpected_hint="vision/audio towers under another prefix? biases?")
  return fill_params(plan, index.get, cfg, dtype)


# ---------------------------------------------------------------- the assistant drafter

def is_assistant(hf: dict) -> bool:
  return (hf.get("model_type") == "gemma4_assistant"
          or "Gemma4AssistantForCausalLM" in (hf.get("architectures") or []))


def assistant_from_hf(hf_config: dict, index, dtype=None, name: str = "gemma4_assistant"):
  """(AssistantConfig, params as numpy arrays) of a Gemma4AssistantForCausalLM checkpoint
  (config.json contents and a checkpoint index, as convert_params takes)."""
  from spec_tpu.models import model
  text = dict(hf_config.get("text_config") or {})
  if not text:
    raise _error("Gemma4AssistantForCausalLM config.json has no 'text_config'")
  text["num_kv_shared_layers"] = 0  # every layer reads the target: no tail of its own
  text.setdefault("hidden_size_per_layer_input", 0)
  text.setdefault("dtype", hf_config.get("dtype") or hf_config.get("torch_dtype"))
  cfg = config_from_hf(text, name=name, dtype=dtype)
  cfg = cfg.replace(final_logit_softcap=None)  # the assistant's head applies none
  if cfg.sliding_window:
    # transformers masks the assistant's local layers with a bidirectional window (distance
    # <= window, flipped to look back): its query at position L sees the target's keys at
    # L - window - 1 .. L - 1, which is window + 2 in this decoder's convention (keys at
    # positions > q - window).
    cfg = cfg.replace(sliding_window=cfg.sliding_window + 2)
  big = int(hf_config.get("backbone_hidden_size", 1536))
  ordered = bool(hf_config.get("use_ordered_embeddings"))
  centroids = int(hf_config.get("num_centroids", 2048)) if ordered else 0
  try:
    acfg = AssistantConfig(
        layers=cfg, backbone_d_model=big, centroids=centroids,
        centroid_top_k=int(hf_config.get("centroid_intermediate_top_k", 32)) if ordered else 0)
  except ValueError as e:
    raise _error(f"config.json gives an invalid assistant: {e}") from None
  d, h, v = cfg.d_model, cfg.num_heads, cfg.vocab_size
  plan = [("model.embed_tokens.weight", (v, d), ("embed",), same),
          ("model.norm.weight", (d,), ("final_norm",), same),
          ("pre_projection.weight", (d, 2 * big), ("pre_proj",), transpose),
          ("post_projection.weight", (big, d), ("post_proj",), transpose)]
  for i, kind in enumerate(cfg.layer_types):
    p, L, e = f"model.layers.{i}.", ("layers", i), cfg.kind_head_dim(kind)
    plan += [(p + "input_layernorm.weight", (d,), L + ("attn_norm",), same),
             (p + "self_attn.q_proj.weight", (h * e, d), L + ("attn", "q"),
              lambda a, e=e: a.reshape(h, e, d).transpose(0, 2, 1)),
             (p + "self_attn.q_norm.weight", (e,), L + ("attn", "q_norm"), same),
             (p + "self_attn.o_proj.weight", (d, h * e), L + ("attn", "o"),
              lambda a, e=e: a.reshape(d, h, e).transpose(1, 2, 0)),
             (p + "post_attention_layernorm.weight", (d,), L + ("post_attn_norm",), same),
             (p + "pre_feedforward_layernorm.weight", (d,), L + ("ffw_norm",), same),
             (p + "post_feedforward_layernorm.weight", (d,), L + ("post_ffw_norm",), same),
             (p + "mlp.gate_proj.weight", (cfg.ffw_dim, d), L + ("ffw", "gate"), transpose),
             (p + "mlp.up_proj.weight", (cfg.ffw_dim, d), L + ("ffw", "up"), transpose),
             (p + "mlp.down_proj.weight", (d, cfg.ffw_dim), L + ("ffw", "down"), transpose),
             (p + "layer_scalar", (1,), L + ("layer_scalar",), same)]
  order = "masked_embedding.token_ordering"  # token ids, cluster by cluster (integers)
  if centroids:
    plan.append(("masked_embedding.centroids.weight", (centroids, d), ("centroids",),
                 transpose))
    if order not in index.names() or tuple(index.shape(order)) != (v,):
      raise _error(f"use_ordered_embeddings: expected tensor {order!r} of shape ({v},)")
  check_plan(plan, set(index.names()) - {order}, index.shape, index.dtype,
             ignorable=lambda n: n == "lm_head.weight" or n.endswith("rotary_emb.inv_freq"),
             error=HFConversionError, context=f"config.json: {cfg.num_layers} layers",
             unexpected_hint="more layers than config.json says?")
  np_dtype = np.dtype(jnp.dtype(dtype or cfg.dtype))
  shapes = jax.eval_shape(lambda: model.init_params(acfg, jax.random.key(0)))
  params = jax.tree.map(lambda x: np.empty(x.shape, np_dtype), shapes)
  if centroids:
    ids = np.asarray(index.get(order)).astype(np.int64)
    if sorted(ids.tolist()) != list(range(v)):
      raise _error(f"tensor {order!r} is not an ordering of the {v} token ids")
    params["token_order"] = ids.astype(np.int32).reshape(centroids, v // centroids)
    plan_leaves = len(plan) + 1
  else:
    plan_leaves = len(plan)
  for name, _, path, fn in plan:
    node = params
    for key in path[:-1]:
      node = node[key]
    node[path[-1]][...] = fn(index.get(name))
  if plan_leaves != len(jax.tree.leaves(params)):
    raise AssertionError("assistant conversion plan does not fill every param")
  return acfg, params
