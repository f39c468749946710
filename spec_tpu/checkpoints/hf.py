"""Hugging Face checkpoints -> spec_tpu: config.json mapping, weight mapping, directory conversion.

Served: GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration
(with its image half: hf_vision.py), LlamaForCausalLM, MistralForCausalLM; Gemma 4 text in
hf_gemma4.py. The semantics follow
transformers' modeling code (5.x), which is also what tests/test_hf_parity.py checks against:
  - Gemma RMSNorm multiplies by (1 + w); embeddings are scaled by sqrt(d_model) rounded to the
    weight dtype; Gemma 2/3 scale queries by query_pre_attn_scalar ** -0.5.
  - Sliding windows see keys at positions > q - window (HF's sliding_window_overlay).
  - Gemma 3 applies `rope_scaling` to the global (full_attention) layers only, and ignores
    attn_logit_softcapping (its attention never passes it on).
  - Mistral's sliding_window, when set, applies to every layer.
  - Llama 3.1's rope_type "llama3" rescales the RoPE frequencies of every layer
    (layers.rope_frequencies).
Anything that would change numerics and that the decoder cannot express is refused with an error
naming the config field or tensor, never silently dropped.

Shapes: HF Linear weights are (out, in). The decoder's params layout is in spec_tpu/models/model.py
(layer i's place in it: spec_tpu/models/layout.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from spec_tpu.checkpoints import hf_gemma4, hf_vision, recurrent_convert
# HFConversionError, float_dtype, tokenizer_id and the TOKENIZER_ names are part of this module's
# API too (the error type of everything here; where a converted checkpoint keeps its tokenizer).
from spec_tpu.checkpoints._convert import (  # noqa: F401
    TOKENIZER_DIR, TOKENIZER_FILES, HFConversionError, Step, check_plan, fill_params,
    float_dtype, same, shortest_period, tokenizer_files, tokenizer_id, transpose)
from spec_tpu.models import quant
from spec_tpu.models.config import GLOBAL, LOCAL, RECURRENT, ModelConfig


# ---------------------------------------------------------------- config.json -> ModelConfig

_ARCHITECTURES = {  # architecture -> family
  "GemmaForCausalLM": "gemma",
  "Gemma2ForCausalLM": "gemma2",
  "Gemma3ForCausalLM": "gemma3_text",
  "Gemma3ForConditionalGeneration": "gemma3",  # multimodal: the text_config half is converted
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
}
_MODEL_TYPES = {  # used when config.json names no architecture
  "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3_text", "gemma3": "gemma3",
  "llama": "llama", "mistral": "mistral",
}
_REFUSED = {  # look-alikes whose numerics the decoder cannot reproduce
  "Qwen2ForCausalLM": "its q/k/v projections have biases, which spec_tpu's decoder lacks",
  "qwen2": "its q/k/v projections have biases, which spec_tpu's decoder lacks",
  "MixtralForCausalLM": "it is a mixture of experts; the decoder has one dense feed-forward",
  "mixtral": "it is a mixture of experts; the decoder has one dense feed-forward",
}

# transformers' config-class defaults for the fields read below: config.json files omit fields
# equal to their defaults (Gemma 3 multimodal text_configs omit most), and HF fills them in.
_COMMON = dict(rms_norm_eps=1e-6, rope_theta=10_000.0, attention_bias=False, mlp_bias=False)
_GEMMA2_3 = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=256, sliding_window=4096)
_DEFAULTS = {
  "gemma": dict(_COMMON, vocab_size=256_000, hidden_size=3072, intermediate_size=24_576,
                num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
  "gemma2": dict(_COMMON, **_GEMMA2_3, vocab_size=256_000, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0),
  "gemma3_text": dict(_COMMON, **_GEMMA2_3, vocab_size=262_208, rope_theta=1_000_000.0,
                      rope_local_base_freq=10_000.0,
                      attn_logit_softcapping=None, final_logit_softcapping=None),
  "llama": dict(_COMMON, vocab_size=32_000, hidden_size=4096, intermediate_size=11_008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                head_dim=None, tie_word_embeddings=False, hidden_act="silu"),
  "mistral": dict(_COMMON, vocab_size=32_000, hidden_size=4096, intermediate_size=14_336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=None, tie_word_embeddings=False, hidden_act="silu",
                  sliding_window=4096),
}
_GEMMAS = ("gemma", "gemma2", "gemma3_text")
_LAYER_KINDS = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
# activation name -> (ffw_activation, gelu_approximate); every served family is gated.
_ACTIVATIONS = {"gelu_pytorch_tanh": ("geglu", True), "gelu": ("geglu", False),
                "silu": ("swiglu", True), "swish": ("swiglu", True)}


def _family(hf: dict) -> str:
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  for key in list(archs) + [model_type]:
    if key in _REFUSED:
      raise HFConversionError(f"{key} is not supported: {_REFUSED[key]}")
  if len(archs) > 1:
    raise HFConversionError(f"config.json names several architectures {archs}; expected one")
  if archs:
    if archs[0] not in _ARCHITECTURES:
      raise HFConversionError(f"unknown architecture {archs[0]!r} in config.json 'architectures'; "
                              f"supported: {sorted(_ARCHITECTURES)}")
    return _ARCHITECTURES[archs[0]]
  if model_type not in _MODEL_TYPES:
    raise HFConversionError(f"unknown model_type {model_type!r} in config.json (and no "
                            f"'architectures'); supported: {sorted(_MODEL_TYPES)}")
  return _MODEL_TYPES[model_type]


class _Fields:
  """config.json fields with transformers' defaults behind them; an explicit null stays None."""

  def __init__(self, hf: dict, defaults: dict):
    self.hf, self.defaults = hf, defaults

  def __getitem__(self, key):
    return self.hf[key] if key in self.hf else self.defaults.get(key)


def _rope_scaling(params: dict, field: str, f: "_Fields") -> tuple[float, tuple | None]:
  """(linear position scale, Llama 3.1 parameters or None) of one rope parameter dict."""
  if params.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise HFConversionError(f"config field {field!r}: partial rotary embeddings are not "
                            "supported")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind in ("default", None):
    return 1.0, None
  if kind not in ("linear", "llama3"):
    raise HFConversionError(f"config field {field!r}: rope type {kind!r} is not supported "
                            "(only default, linear and llama3)")
  keys = ["factor"]
  if kind == "llama3":
    keys += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    # transformers falls back to max_position_embeddings for the original context.
    if "original_max_position_embeddings" not in params and f["max_position_embeddings"]:
      params = dict(params, original_max_position_embeddings=f["max_position_embeddings"])
  missing = [k for k in keys if params.get(k) is None]
  if missing:
    raise HFConversionError(f"config field {field!r}: {kind} rope scaling without {missing}")
  try:
    values = tuple(float(params[k]) for k in keys)
  except (TypeError, ValueError):
    raise HFConversionError(f"config field {field!r}: malformed {kind} rope parameters "
                            f"{ {k: params[k] for k in keys} }") from None
  if kind == "linear":
    return values[0], None
  factor, low, high, context = values
  if not (factor > 0 and 0 < low < high and context > 0):
    raise HFConversionError(f"config field {field!r}: llama3 rope scaling needs factor > 0, "
                            f"0 < low_freq_factor < high_freq_factor and a positive "
                            f"original_max_position_embeddings, got {params}")
  return 1.0, values


def _rope(f: _Fields, family: str) -> dict:
  """Bases and linear position scales for global and local layers, and Llama 3.1 scaling."""
  if f["partial_rotary_factor"] not in (None, 1, 1.0):
    raise HFConversionError("config field 'partial_rotary_factor': partial rotary embeddings "
                            "are not supported")
  params = f["rope_parameters"]
  if family == "gemma3_text":
    if params is None:
      # Legacy fields: rope_scaling applies to global layers only (Gemma3TextConfig).
      full = dict(f["rope_scaling"] or {}, rope_theta=f["rope_theta"])
      slide = {"rope_theta": f["rope_local_base_freq"]}
      fields = ("rope_scaling", "rope_scaling")
    elif set(params) <= set(_LAYER_KINDS):
      full = dict(params.get("full_attention") or {})
      slide = dict(params.get("sliding_attention") or {})
      full.setdefault("rope_theta", f["rope_theta"])
      slide.setdefault("rope_theta", f["rope_local_base_freq"])
      fields = ("rope_parameters.full_attention", "rope_parameters.sliding_attention")
    else:
      raise HFConversionError("config field 'rope_parameters': Gemma 3 expects keys "
                              f"{sorted(_LAYER_KINDS)}, got {sorted(params)}")
  else:
    if params is None:
      full = dict(f["rope_scaling"] or {}, rope_theta=f["rope_theta"])
      fields = ("rope_scaling",) * 2
    elif set(params) & set(_LAYER_KINDS):
      raise HFConversionError(f"config field 'rope_parameters': per-layer-type RoPE is not "
                              f"expected for {family}")
    else:
      full = dict(params)
      full.setdefault("rope_theta", f["rope_theta"])
      fields = ("rope_parameters",) * 2
    slide = full
  scale_global, llama3_global = _rope_scaling(full, fields[0], f)
  scale_local, llama3_local = _rope_scaling(slide, fields[1], f)
  if llama3_global != llama3_local:
    raise HFConversionError(f"config field {fields[0]!r}: llama3 rope scaling on one layer type "
                            "only is not supported")
  return dict(rope_base_global=float(full["rope_theta"]), rope_scale_global=scale_global,
              rope_base_local=float(slide["rope_theta"]), rope_scale_local=scale_local,
              rope_llama3=llama3_global)


def _layer_pattern(f: _Fields, family: str, num_layers: int) -> tuple[str, ...]:
  if family in ("gemma", "llama"):
    return (GLOBAL,)
  if family == "mistral":
    return (GLOBAL,) if f["sliding_window"] is None else (LOCAL,)
  names = f["layer_types"]
  if names is None:
    # What the config classes derive when layer_types is absent (older config.json files).
    # Gemma3TextConfig reads sliding_window_pattern (default 6); transformers 5 writes it back
    # as _sliding_window_pattern.
    period = 2 if family == "gemma2" else (
        f["sliding_window_pattern"] or f["_sliding_window_pattern"] or 6)
    names = ["sliding_attention" if (i + 1) % period else "full_attention"
             for i in range(num_layers)]
  if len(names) != num_layers:
    raise HFConversionError(f"config field 'layer_types' has {len(names)} entries for "
                            f"num_hidden_layers={num_layers}")
  for i, name in enumerate(names):
    if name not in _LAYER_KINDS:
      raise HFConversionError(f"config field 'layer_types[{i}]' is {name!r}; supported: "
                              f"{sorted(_LAYER_KINDS)}")
  return shortest_period([_LAYER_KINDS[n] for n in names])


def _refuse_unsupported(f: _Fields) -> None:
  for field in ("attention_bias", "mlp_bias"):
    if f[field]:
      raise HFConversionError(f"config field {field!r} is true: the decoder has no biases")
  if f["use_bidirectional_attention"]:
    raise HFConversionError("config field 'use_bidirectional_attention' is true: the decoder "
                            "is causal")
  for field in ("num_local_experts", "num_experts", "n_routed_experts"):
    if f[field]:
      raise HFConversionError(f"config field {field!r} is set: mixtures of experts are not "
                              "supported")


def _text_config(hf: dict) -> tuple[dict, str]:
  family = _family(hf)
  if family != "gemma3":
    return hf, family
  text = hf.get("text_config")
  if not isinstance(text, dict):
    raise HFConversionError("Gemma3ForConditionalGeneration config.json has no 'text_config'")
  text = dict(text)
  if text.get("final_logit_softcapping") is not None:
    # transformers' Gemma3ForConditionalGeneration never applies it (Gemma3ForCausalLM does):
    # which one the checkpoint was made for is ambiguous, so refuse rather than guess.
    raise HFConversionError("config field 'text_config.final_logit_softcapping' is set, but "
                            "Gemma3ForConditionalGeneration ignores it; set it to null to "
                            "convert the model as transformers runs it")
  for key in ("tie_word_embeddings", "dtype", "torch_dtype"):  # may live at the top level only
    if key not in text and key in hf:
      text[key] = hf[key]
  return text, "gemma3_text"


def config_from_hf(hf_config: dict[str, Any], *, name: str | None = None,
                   dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of a transformers config.json (its parsed contents).

  dtype: the params dtype; defaults to the checkpoint's declared dtype, else float32.
  Raises HFConversionError naming the field for anything the decoder cannot reproduce.
  RecurrentGemmaForCausalLM (Griffin) has its own mapping, recurrent_convert.config_from_hf.
  """
  if recurrent_convert.is_hf_recurrent_gemma(hf_config):
    return recurrent_convert.config_from_hf(hf_config, name=name, dtype=dtype)
  if hf_gemma4.is_gemma4(hf_config):
    return hf_gemma4.config_from_hf(hf_config, name=name, dtype=dtype)
  try:
    cfg = _config_from_hf(hf_config, name, dtype)
    if hf_vision.is_multimodal(hf_config):
      cfg = cfg.replace(vision=hf_vision.vision_config(hf_config))
    return cfg
  except HFConversionError:
    raise
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    # A field of the wrong type (a string for a size, null for a required number, ...).
    raise HFConversionError(f"config.json is malformed: {type(e).__name__}: {e}") from None


def _config_from_hf(hf_config, name, dtype) -> ModelConfig:
  text, family = _text_config(hf_config)
  f = _Fields(text, _DEFAULTS[family])
  _refuse_unsupported(f)
  gemma = family in _GEMMAS

  act_field = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
  act_name = f[act_field]
  if family == "gemma" and act_name == "gelu":
    act_name = "gelu_pytorch_tanh"  # GemmaConfig maps the legacy "gelu" to the tanh form
  if act_name not in _ACTIVATIONS:
    raise HFConversionError(f"config field {act_field!r} is {act_name!r}; supported: "
                            f"{sorted(_ACTIVATIONS)}")
  activation, approximate = _ACTIVATIONS[act_name]

  heads = f["num_attention_heads"]
  kv_heads = f["num_key_value_heads"] or heads
  head_dim = f["head_dim"] or f["hidden_size"] // heads
  num_layers = f["num_hidden_layers"]
  pattern = _layer_pattern(f, family, num_layers)
  window = f["sliding_window"] if LOCAL in pattern else None
  if LOCAL in pattern and not (isinstance(window, int) and window > 0):
    raise HFConversionError(f"config field 'sliding_window' is {window!r}; sliding-window "
                            "layers need a positive integer")
  query_scale = None
  if family in ("gemma2", "gemma3_text"):
    query_scale = float(f["query_pre_attn_scalar"]) ** -0.5
  attn_cap = f["attn_logit_softcapping"] if family == "gemma2" else None
  final_cap = f["final_logit_softcapping"] if family in ("gemma2", "gemma3_text") else None

  rope = _rope(f, family)
  dtype = float_dtype(dtype or f["dtype"] or f["torch_dtype"] or "float32")
  try:
    return ModelConfig(
        name=name or text.get("_name_or_path") or family,
        vocab_size=f["vocab_size"], d_model=f["hidden_size"], num_layers=num_layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        ffw_dim=f["intermediate_size"], ffw_activation=activation, gelu_approximate=approximate,
        norm_eps=float(f["rms_norm_eps"]), norm_plus_one=gemma,
        tie_embeddings=bool(f["tie_word_embeddings"]), scale_embeddings=gemma,
        post_attn_norm=family in ("gemma2", "gemma3_text"),
        post_ffw_norm=family in ("gemma2", "gemma3_text"), qk_norm=family == "gemma3_text",
        query_scale=query_scale,
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        layer_pattern=pattern, sliding_window=window, dtype=dtype, **rope)
  except ValueError as e:
    raise HFConversionError(f"config.json gives an invalid model: {e}") from None


# ---------------------------------------------------------------- weights

# Prefixes of the decoder's tensors: causal LMs, then the two layouts of Gemma 3 multimodal
# checkpoints (hub files, and transformers' in-memory naming), then a bare base model.
_PREFIXES = ("model.", "language_model.model.", "model.language_model.", "")


def _head_name(prefix: str) -> str:
  return "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"


def _locate(names: set[str]) -> str:
  found = [p for p in _PREFIXES if f"{p}embed_tokens.weight" in names]
  if not found:
    raise HFConversionError("no embedding table in the checkpoint (looked for "
                            + ", ".join(f"'{p}embed_tokens.weight'" for p in _PREFIXES) + ")")
  if len(found) > 1:
    raise HFConversionError(f"several embedding tables in the checkpoint (prefixes {found})")
  return found[0]


def _plan(cfg: ModelConfig, prefix: str) -> Iterator[Step]:
  d, h, k, e, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim,
                      cfg.vocab_size)
  gemma23 = cfg.post_attn_norm  # Gemma 2/3 name the norms around attention/FFW differently

  def heads_in(n):  # (n*e, d) -> (n d e)
    return lambda a: a.reshape(n, e, d).transpose(0, 2, 1)

  yield f"{prefix}embed_tokens.weight", (v, d), ("embed",), same
  if not cfg.tie_embeddings:
    yield _head_name(prefix), (v, d), ("unembed",), transpose
  yield f"{prefix}norm.weight", (d,), ("final_norm",), same
  for i in range(cfg.num_layers):
    p, L = f"{prefix}layers.{i}.", ("layers", i)
    yield p + "input_layernorm.weight", (d,), L + ("attn_norm",), same
    yield p + "self_attn.q_proj.weight", (h * e, d), L + ("attn", "q"), heads_in(h)
    yield p + "self_attn.k_proj.weight", (k * e, d), L + ("attn", "k"), heads_in(k)
    yield p + "self_attn.v_proj.weight", (k * e, d), L + ("attn", "v"), heads_in(k)
    yield (p + "self_attn.o_proj.weight", (d, h * e), L + ("attn", "o"),
           lambda a: a.reshape(d, h, e).transpose(1, 2, 0))
    if cfg.qk_norm:
      yield p + "self_attn.q_norm.weight", (e,), L + ("attn", "q_norm"), same
      yield p + "self_attn.k_norm.weight", (e,), L + ("attn", "k_norm"), same
    if gemma23:
      yield p + "post_attention_layernorm.weight", (d,), L + ("post_attn_norm",), same
      yield p + "pre_feedforward_layernorm.weight", (d,), L + ("ffw_norm",), same
      yield p + "post_feedforward_layernorm.weight", (d,), L + ("post_ffw_norm",), same
    else:
      yield p + "post_attention_layernorm.weight", (d,), L + ("ffw_norm",), same
    yield p + "mlp.gate_proj.weight", (f, d), L + ("ffw", "gate"), transpose
    yield p + "mlp.up_proj.weight", (f, d), L + ("ffw", "up"), transpose
    yield p + "mlp.down_proj.weight", (d, f), L + ("ffw", "down"), transpose


def _ignorable(name: str, prefix: str, cfg: ModelConfig) -> bool:
  if name.endswith("rotary_emb.inv_freq"):
    return True  # a buffer older transformers saved; recomputed from the config
  if cfg.tie_embeddings and name == _head_name(prefix):
    return True  # some writers store the tied head too; HF ties it to the embedding on load
  return prefix != "model." and hf_vision.is_vision_name(name)  # read by hf_vision


def convert_params(index, cfg: ModelConfig, dtype=None) -> dict:
  """Params (numpy arrays, model.py layout) from a checkpoint index.

  index: anything with names(), shape(name), dtype(name) and get(name) -> np.ndarray (a
    spec_tpu.checkpoints.safetensors_io.SafetensorsIndex).
  Every name and shape is checked before any tensor is read; then each tensor is read and laid
  out into its slice of the output, one at a time, quantized as it is read with cfg.quantize
  (_convert.fill_params).
  A config with recurrent layers reads RecurrentGemmaForCausalLM names (recurrent_convert).
  """
  if RECURRENT in cfg.layer_pattern:
    return recurrent_convert.stacked(recurrent_convert.convert_hf_params(index, cfg, dtype), cfg)
  if hf_gemma4.is_gemma4_config(cfg):
    return hf_gemma4.convert_params(index, cfg, dtype)
  names = set(index.names())
  prefix = _locate(names)
  plan = list(_plan(cfg, prefix))
  check_plan(plan, names, index.shape, index.dtype,
             ignorable=lambda n: _ignorable(n, prefix, cfg), error=HFConversionError,
             context=f"config.json: {cfg.num_layers} layers, tie_embeddings={cfg.tie_embeddings}",
             unexpected_hint="biases? more layers than config.json says?")
  if cfg.vision is None:
    return fill_params(plan, index.get, cfg, dtype)
  vision = hf_vision.convert(index, cfg, dtype)  # checks its names before the decoder is read
  return dict(fill_params(plan, index.get, cfg.replace(vision=None), dtype), vision=vision)


# ---------------------------------------------------------------- directories

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise HFConversionError(f"{src!r} has no config.json: not a Hugging Face model directory")
  try:
    with open(path) as fh:
      hf = json.load(fh)
  except (OSError, ValueError) as e:
    raise HFConversionError(f"cannot read {path!r}: {e}") from None
  if not isinstance(hf, dict):
    raise HFConversionError(f"{path!r} does not hold a JSON object")
  return hf


def _check_weight_files(src: str) -> None:
  files = os.listdir(src)
  if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in files):
    return
  pickled = sorted(n for n in files if n.endswith(_PICKLE_SUFFIXES))
  if pickled:
    raise HFConversionError(
        f"{src!r} holds only pickle-based weights ({pickled[0]}, ...): only safetensors is "
        "supported, since unpickling runs arbitrary code. Re-save the model with "
        "save_pretrained(..., safe_serialization=True) in a trusted environment.")
  raise HFConversionError(f"{src!r} holds no *.safetensors weights")


def convert_directory(src, dst, dtype=None, overwrite: bool = False,
                      quantize: str | None = None) -> ModelConfig:
  """Converts a transformers safetensors model directory to a spec_tpu checkpoint at dst.

  quantize: None (float weights in dtype) or "int8" (models/quant.py; each tensor is quantized
  as it is read, and the checkpoint's config says so, so it loads as int8 with no option).

  The checkpoint embeds the ModelConfig; tokenizer files are copied to dst/tokenizer/.
  Every cheap check (paths, config.json, architecture, weight format) runs before any tensor is
  read. Returns the ModelConfig.
  """
  from spec_tpu.checkpoints import checkpoint  # heavy imports (orbax) only once there is work to do
  from spec_tpu.checkpoints.safetensors_io import SafetensorsIndex

  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  if not os.path.isdir(src):
    raise HFConversionError(f"source {src!r} is not a directory")
  hf = read_hf_config(src)
  if hf_gemma4.is_assistant(hf):
    return _convert_assistant(src, dst, hf, dtype, overwrite, quantize)
  cfg = config_from_hf(hf, name=os.path.basename(src), dtype=dtype)
  try:
    cfg = cfg.replace(quantize=quant.check_mode(quantize))
  except ValueError as e:
    raise HFConversionError(str(e)) from None
  checkpoint.check_destination(dst, overwrite, source=src)
  _check_weight_files(src)
  cfg = cfg.replace(tokenizer=tokenizer_id(src))
  if cfg.vision is not None and cfg.tokenizer:
    from spec_tpu import tokenizer as tokenizer_lib
    cfg = cfg.replace(vision=hf_vision.with_newline_id(cfg.vision, tokenizer_lib.load(src)))

  params = convert_params(SafetensorsIndex(src), cfg)
  extra = {"source": "hf", "src": src, "architectures": hf.get("architectures"),
           "model_type": hf.get("model_type")}
  # Tokenizer files go in before the manifest seals the checkpoint, so they are hash-checked
  # with the weights.
  checkpoint.save(dst, params, cfg, extra=extra, overwrite=overwrite, files=tokenizer_files(src))
  del params
  return cfg



def _convert_assistant(src: str, dst: str, hf: dict, dtype, overwrite: bool, quantize):
  """A Gemma4AssistantForCausalLM directory: its AssistantConfig and weights (it drafts for
  the Gemma 4 target it was trained with; draft.kind = 'assistant')."""
  from spec_tpu.checkpoints import checkpoint
  from spec_tpu.checkpoints.safetensors_io import SafetensorsIndex
  if quantize:
    raise HFConversionError("--quantize: int8 assistant weights are not supported")
  checkpoint.check_destination(dst, overwrite, source=src)
  _check_weight_files(src)
  acfg, params = hf_gemma4.assistant_from_hf(hf, SafetensorsIndex(src), dtype=dtype,
                                             name=os.path.basename(src))
  # Its tokenizer is its target's: recorded when the directory carries one.
  acfg = acfg.replace(tokenizer=tokenizer_id(src))
  extra = {"source": "hf", "src": src, "architectures": hf.get("architectures"),
           "model_type": hf.get("model_type")}
  checkpoint.save(dst, params, acfg, extra=extra, overwrite=overwrite,
                  files=tokenizer_files(src))
  return acfg
