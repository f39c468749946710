"""RecurrentGemma checkpoints -> spec_tpu params: from transformers' RecurrentGemmaForCausalLM
(safetensors) and from the recurrentgemma package's Flax param tree (the format its released
checkpoints come in, restored with orbax).

Both give the unstacked layout: {embed (v d), final_norm (d), layers: [one dict per layer]}, a
layer being, by kind (config.layer_types):
  recurrent: {recurrent_norm (d), recurrent: models/recurrent.py's block params, ffw_norm (d),
              ffw: {gate (d f), gate_bias (f), up (d f), up_bias (f), down (f d), down_bias (d)}}
  local:     {attn_norm (d), attn: {q (h d e), k (k d e), v (k d e), o (h e d), o_bias (d)},
              ffw_norm (d), ffw: as above}
`stacked` turns that into the decoder's layout (layers stacked per group of the pattern,
models/layout.py).

Every name, shape and layer kind is checked before any tensor is read; a missing conv or gate
tensor, a stray tensor, or a layer whose weights are of the other kind than the config's layer
pattern says is an error naming the tensor or field, never a silent drop.

Where the two references differ, spec_tpu follows the recurrentgemma package (the code the
released weights were trained with): its attention window W lets a query see itself and W keys
before it, so config_from_hf sets sliding_window = attention_window_size + 1; transformers'
mask (keys > q - W) sees one key fewer, which changes outputs only past position W.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

# stacked and jax_tree_to_numpy are part of this module's API too (its unstacked layout's users).
from spec_tpu.checkpoints._convert import (  # noqa: F401
    ConversionError, HFConversionError, Step, check_plan, flatten, float_dtype,
    jax_tree_to_numpy, restore_orbax_tree, same, shortest_period, stacked, transpose)
from spec_tpu.models.config import LOCAL, RECURRENT, ModelConfig


class ReferenceConversionError(ConversionError):
  """A recurrentgemma (reference) param tree that spec_tpu cannot convert faithfully."""


# ---------------------------------------------------------------- transformers config.json

_HF_ARCHITECTURE = "RecurrentGemmaForCausalLM"
_HF_BLOCKS = {"recurrent": RECURRENT, "attention": LOCAL}
# RecurrentGemmaConfig's defaults for the fields read below (config.json files omit defaults).
_HF_DEFAULTS = dict(num_hidden_layers=26, vocab_size=256_000, hidden_size=2560,
                    intermediate_size=3 * 2560, num_attention_heads=10, lru_width=None,
                    attention_window_size=2048, conv1d_width=4, logits_soft_cap=30.0,
                    rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                    block_types=("recurrent", "recurrent", "attention"),
                    num_key_value_heads=None, attention_bias=False, tie_word_embeddings=True,
                    rope_theta=10_000.0, partial_rotary_factor=0.5)


def is_hf_recurrent_gemma(hf_config: Mapping[str, Any]) -> bool:
  return (_HF_ARCHITECTURE in (hf_config.get("architectures") or [])
          or hf_config.get("model_type") == "recurrent_gemma")


def config_from_hf(hf_config: Mapping[str, Any], *, name: str | None = None,
                   dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of a transformers RecurrentGemma config.json (its parsed contents).

  Notes on the mapping:
    - transformers' MLP is intermediate_size // 2 wide (its released config.json says 15360
      for the 2B, whose MLP is 3 * 2560); its class default 3 * 2560 would give a 3840 MLP.
    - head_dim is hidden_size / num_attention_heads (transformers ignores a head_dim field).
    - num_key_value_heads defaults to num_attention_heads (the released models say 1).
    - sliding_window = attention_window_size + 1 (the reference's window; module docstring).
    - embeddings are scaled by sqrt(hidden_size) rounded to bfloat16 whatever
      embeddings_scale_by_sqrt_dim says (transformers always scales).
  """
  if not is_hf_recurrent_gemma(hf_config):
    raise HFConversionError(f"not a RecurrentGemma config.json (architectures "
                            f"{hf_config.get('architectures')}, model_type "
                            f"{hf_config.get('model_type')!r})")

  def field(key):
    return hf_config[key] if key in hf_config else _HF_DEFAULTS[key]

  try:
    if field("attention_bias"):
      raise HFConversionError("config field 'attention_bias' is true: RecurrentGemma's q/k/v "
                              "have no biases in the reference, and spec_tpu's neither")
    if not field("tie_word_embeddings"):
      raise HFConversionError("config field 'tie_word_embeddings' is false: RecurrentGemma ties "
                              "its output layer to the embeddings")
    if field("hidden_activation") != "gelu_pytorch_tanh":
      raise HFConversionError(f"config field 'hidden_activation' is "
                              f"{field('hidden_activation')!r}; RecurrentGemma's blocks use "
                              "'gelu_pytorch_tanh' (the tanh approximation) only")
    rope = dict(hf_config.get("rope_parameters") or {})
    if rope.get("rope_type", "default") != "default":
      raise HFConversionError(f"config field 'rope_parameters.rope_type' is "
                              f"{rope['rope_type']!r}; only default RoPE is supported")
    theta = float(rope.get("rope_theta", field("rope_theta")))
    fraction = float(rope.get("partial_rotary_factor", field("partial_rotary_factor")))
    d, heads = int(field("hidden_size")), int(field("num_attention_heads"))
    num_layers = int(field("num_hidden_layers"))
    inter = int(field("intermediate_size"))
    if inter % 2:
      raise HFConversionError(f"config field 'intermediate_size' ({inter}) must be even: "
                              "transformers' RecurrentGemma MLP is intermediate_size // 2 wide")
    names = list(field("block_types"))
    unknown = [b for b in names if b not in _HF_BLOCKS]
    if not names or unknown:
      raise HFConversionError(f"config field 'block_types' must be a non-empty list of "
                              f"{sorted(_HF_BLOCKS)}, got {names}")
    window = int(field("attention_window_size"))
    if window <= 0:
      raise HFConversionError(f"config field 'attention_window_size' must be positive, got "
                              f"{window}")
    dtype = dtype or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    try:
      dtype = jnp.dtype(dtype).name
    except TypeError:
      raise HFConversionError(f"unknown dtype {dtype!r}") from None
    return ModelConfig(
        name=name or hf_config.get("_name_or_path") or "recurrent_gemma",
        vocab_size=int(field("vocab_size")), d_model=d, num_layers=num_layers,
        num_heads=heads, num_kv_heads=int(field("num_key_value_heads") or heads),
        head_dim=d // heads, ffw_dim=inter // 2, ffw_activation="geglu",
        gelu_approximate=True, norm_eps=float(field("rms_norm_eps")), norm_plus_one=True,
        tie_embeddings=True, scale_embeddings=True, embed_scale_dtype="bfloat16",
        final_logit_softcap=float(field("logits_soft_cap")) or None,
        layer_pattern=tuple(_HF_BLOCKS[b] for b in names), sliding_window=window + 1,
        rope_base_local=theta, rope_base_global=theta, rope_fraction=fraction,
        ffw_bias=True, attn_out_bias=True, lru_width=field("lru_width") or d,
        conv1d_width=int(field("conv1d_width")), dtype=dtype)
  except HFConversionError:
    raise
  except (TypeError, ValueError, KeyError) as e:
    raise HFConversionError(f"config.json is malformed or gives an invalid model: "
                            f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- transformers weights

def _hf_plan(cfg: ModelConfig) -> Iterator[Step]:
  d, h, k, e, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim,
                      cfg.vocab_size)
  w, c = cfg.recurrent_width, cfg.conv1d_width
  i = w // h

  def heads_in(n):  # (n*e, d) -> (n d e), heads-major as the decoder's (model.py)
    return lambda a: a.reshape(n, e, d).transpose(0, 2, 1)

  yield "model.embed_tokens.weight", (v, d), ("embed",), same
  yield "model.final_norm.weight", (d,), ("final_norm",), same
  for n, kind in enumerate(cfg.layer_types):
    p, L = f"model.layers.{n}.", ("layers", n)
    t = p + "temporal_block."
    if kind == RECURRENT:
      R = L + ("recurrent",)
      yield p + "temporal_pre_norm.weight", (d,), L + ("recurrent_norm",), same
      for ours, theirs in (("y", "linear_y"), ("x", "linear_x")):
        yield f"{t}{theirs}.weight", (w, d), R + (ours,), transpose
        yield f"{t}{theirs}.bias", (w,), R + (ours + "_bias",), same
      yield t + "linear_out.weight", (d, w), R + ("out",), transpose
      yield t + "linear_out.bias", (d,), R + ("out_bias",), same
      # nn.Conv1d(groups=w, padding=c-1) cut to the first t outputs: weight[:, 0, j] weighs
      # the input c-1-j positions back, as the reference's w[j].
      yield t + "conv_1d.weight", (w, 1, c), R + ("conv",), lambda a: a[:, 0, :].T
      yield t + "conv_1d.bias", (w,), R + ("conv_bias",), same
      for ours, theirs in (("input_gate", "input_gate"), ("a_gate", "recurrent_gate")):
        yield f"{t}rg_lru.{theirs}_weight", (h, i, i), R + (ours,), same
        yield f"{t}rg_lru.{theirs}_bias", (h, i), R + (ours + "_bias",), same
      yield t + "rg_lru.recurrent_param", (w,), R + ("a_param",), same
    else:
      A = L + ("attn",)
      yield p + "temporal_pre_norm.weight", (d,), L + ("attn_norm",), same
      yield t + "q_proj.weight", (h * e, d), A + ("q",), heads_in(h)
      yield t + "k_proj.weight", (k * e, d), A + ("k",), heads_in(k)
      yield t + "v_proj.weight", (k * e, d), A + ("v",), heads_in(k)
      yield (t + "o_proj.weight", (d, h * e), A + ("o",),
             lambda a: a.reshape(d, h, e).transpose(1, 2, 0))
      yield t + "o_proj.bias", (d,), A + ("o_bias",), same
    yield p + "channel_pre_norm.weight", (d,), L + ("ffw_norm",), same
    m = p + "mlp_block."
    for ours in ("gate", "up"):
      yield f"{m}{ours}_proj.weight", (f, d), L + ("ffw", ours), transpose
      yield f"{m}{ours}_proj.bias", (f,), L + ("ffw", ours + "_bias"), same
    yield m + "down_proj.weight", (d, f), L + ("ffw", "down"), transpose
    yield m + "down_proj.bias", (d,), L + ("ffw", "down_bias"), same


def _hf_kind(names: set[str], layer: int) -> str | None:
  """The kind of temporal block layer `layer` of an HF checkpoint holds (None: neither)."""
  t = f"model.layers.{layer}.temporal_block."
  if any(n.startswith(t + "rg_lru.") or n.startswith(t + "conv_1d.") for n in names):
    return RECURRENT
  if any(n.startswith(t + p) for n in names for p in ("q_proj.", "k_proj.", "v_proj.")):
    return LOCAL
  return None


def _hf_ignorable(name: str) -> bool:
  # A buffer some writers save (recomputed), and the tied head transformers overwrites on load.
  return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


def convert_hf_params(index, cfg: ModelConfig, dtype=None) -> dict:
  """Params (numpy, the unstacked layout of the module docstring) from a safetensors index of a
  RecurrentGemmaForCausalLM checkpoint (anything with names(), shape(), dtype(), get())."""
  names = set(index.names())
  for n, kind in enumerate(cfg.layer_types):
    found = _hf_kind(names, n)
    if found is not None and found != kind:
      raise HFConversionError(
          f"layer {n} of the checkpoint is a {found} block (model.layers.{n}.temporal_block.*) "
          f"but the config's layer_pattern {cfg.layer_pattern} makes it {kind}: the checkpoint's "
          "block_types and the config disagree")
  plan = list(_hf_plan(cfg))
  _check(plan, names, index.shape, index.dtype, _hf_ignorable, HFConversionError, cfg)
  return _materialise(plan, index.get, cfg, dtype)


# ---------------------------------------------------------------- the reference's Flax tree

def _reference_root(tree: Mapping) -> Mapping:
  """The params of a restored reference checkpoint ({'params': ...} or the params themselves)."""
  if "params" in tree and isinstance(tree["params"], Mapping):
    return tree["params"]
  return tree


def _reference_plan(cfg: ModelConfig) -> Iterator[Step]:
  d, h, k, e, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim,
                      cfg.vocab_size)
  w, c = cfg.recurrent_width, cfg.conv1d_width
  i = w // h
  yield "embedder/input_embedding", (v, d), ("embed",), same
  yield "final_norm/scale", (d,), ("final_norm",), same
  for n, kind in enumerate(cfg.layer_types):
    p, L = f"blocks.{n}/", ("layers", n)
    if kind == RECURRENT:
      t, R = p + "recurrent_block/", L + ("recurrent",)
      yield p + "temporal_pre_norm/scale", (d,), L + ("recurrent_norm",), same
      for ours, theirs in (("y", "linear_y"), ("x", "linear_x")):
        yield f"{t}{theirs}/kernel", (d, w), R + (ours,), same
        yield f"{t}{theirs}/bias", (w,), R + (ours + "_bias",), same
      yield t + "linear_out/kernel", (w, d), R + ("out",), same
      yield t + "linear_out/bias", (d,), R + ("out_bias",), same
      yield t + "conv_1d/w", (c, w), R + ("conv",), same
      yield t + "conv_1d/b", (w,), R + ("conv_bias",), same
      for gate in ("input_gate", "a_gate"):
        yield f"{t}rg_lru/{gate}/w", (h, i, i), R + (gate,), same
        yield f"{t}rg_lru/{gate}/b", (h, i), R + (gate + "_bias",), same
      yield t + "rg_lru/a_param", (w,), R + ("a_param",), same
    else:
      if k != 1:
        raise ReferenceConversionError(f"config num_kv_heads is {k}: the reference's attention "
                                       "has exactly one key/value head")
      t, A = p + "attention_block/", L + ("attn",)
      yield p + "temporal_pre_norm/scale", (d,), L + ("attn_norm",), same
      yield (t + "proj_q/kernel", (d, h * e), A + ("q",),
             lambda a: a.reshape(d, h, e).transpose(1, 0, 2))
      yield t + "proj_k/kernel", (d, e), A + ("k",), lambda a: a.reshape(1, d, e)
      yield t + "proj_v/kernel", (d, e), A + ("v",), lambda a: a.reshape(1, d, e)
      yield t + "proj_final/kernel", (h * e, d), A + ("o",), lambda a: a.reshape(h, e, d)
      yield t + "proj_final/bias", (d,), A + ("o_bias",), same
    yield p + "channel_pre_norm/scale", (d,), L + ("ffw_norm",), same
    m = p + "mlp_block/"
    # ffw_up stacks (gate, up): w (2 d f), b (2 1 1 f); the gelu applies to index 0.
    yield m + "ffw_up/w", (2, d, f), L + ("ffw", "gate"), lambda a: a[0]
    yield m + "ffw_up/w", (2, d, f), L + ("ffw", "up"), lambda a: a[1]
    yield m + "ffw_up/b", (2, 1, 1, f), L + ("ffw", "gate_bias"), lambda a: a[0, 0, 0]
    yield m + "ffw_up/b", (2, 1, 1, f), L + ("ffw", "up_bias"), lambda a: a[1, 0, 0]
    yield m + "ffw_down/kernel", (f, d), L + ("ffw", "down"), same
    yield m + "ffw_down/bias", (d,), L + ("ffw", "down_bias"), same


def _reference_kind(block: Mapping) -> str | None:
  if "recurrent_block" in block:
    return RECURRENT
  if "attention_block" in block:
    return LOCAL
  return None


def convert_reference_params(tree: Mapping, cfg: ModelConfig, dtype=None) -> dict:
  """Params (numpy, the unstacked layout of the module docstring) from the recurrentgemma
  package's Flax params (a nested dict, e.g. restored from a released orbax checkpoint)."""
  root = _reference_root(tree)
  for n, kind in enumerate(cfg.layer_types):
    block = root.get(f"blocks.{n}")
    found = _reference_kind(block) if isinstance(block, Mapping) else None
    if found is not None and found != kind:
      raise ReferenceConversionError(
          f"blocks.{n} of the checkpoint is a {found} block but the config's layer_pattern "
          f"{cfg.layer_pattern} makes layer {n} {kind}")
  flat = flatten(root)
  plan = list(_reference_plan(cfg))
  shape = lambda name: np.shape(flat[name])  # noqa: E731
  dtype_of = lambda name: np.asarray(flat[name]).dtype  # noqa: E731
  _check(plan, set(flat), shape, dtype_of, lambda name: False, ReferenceConversionError, cfg)
  return _materialise(plan, lambda name: np.asarray(flat[name]), cfg, dtype)


def convert_reference_directory(src, dst, *, dtype: str | None = None, overwrite: bool = False,
                                attention_window_size: int = 2048,
                                tokenizer: str = "gemma") -> ModelConfig:
  """Converts a recurrentgemma checkpoint as released (Kaggle google/recurrentgemma, e.g. its
  2b/ directory: an orbax PyTree checkpoint of the Flax params) to a spec_tpu checkpoint.

  The config comes from the param shapes (config_from_reference); the window and soft-cap are
  the released models' (not stored in the params). Returns the ModelConfig.
  """
  from spec_tpu.checkpoints import checkpoint  # heavy (orbax): only once there is work to do

  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  dtype = None if dtype is None else float_dtype(dtype, ReferenceConversionError)
  if os.path.isdir(src):
    checkpoint.check_destination(dst, overwrite, source=src)
  tree = restore_orbax_tree(src, ReferenceConversionError, "the recurrentgemma params")
  cfg = config_from_reference(tree, name=os.path.basename(src.rstrip(os.sep)),
                              attention_window_size=attention_window_size,
                              dtype=dtype or "bfloat16").replace(tokenizer=tokenizer)
  params = stacked(convert_reference_params(tree, cfg), cfg)
  checkpoint.save(dst, params, cfg, extra={"source": "recurrentgemma", "src": src},
                  overwrite=overwrite)
  return cfg


def config_from_reference(tree: Mapping, *, name: str = "recurrent_gemma",
                          attention_window_size: int = 2048, logits_soft_cap: float = 30.0,
                          dtype: str = "bfloat16") -> ModelConfig:
  """The ModelConfig of reference params, from their shapes (as the package's
  GriffinConfig.from_flax_params_or_variables); the window and the soft-cap are not in the
  params and default to both released models' (2B and 9B) values."""
  root = _reference_root(tree)
  try:
    vocab, d = np.shape(root["embedder"]["input_embedding"])
    f = np.shape(root["blocks.0"]["mlp_block"]["ffw_down"]["kernel"])[0]
    kinds, n = [], 0
    heads = lru = None
    while f"blocks.{n}" in root:
      block = root[f"blocks.{n}"]
      kind = _reference_kind(block)
      if kind is None:
        raise ReferenceConversionError(f"blocks.{n} holds neither a recurrent_block nor an "
                                       f"attention_block (keys {sorted(block)})")
      if kind == RECURRENT:
        h, i, _ = np.shape(block["recurrent_block"]["rg_lru"]["a_gate"]["w"])
        heads, lru = h, h * i
      kinds.append(kind)
      n += 1
  except (KeyError, TypeError, ValueError) as e:
    raise ReferenceConversionError(f"not a recurrentgemma param tree: missing or malformed "
                                   f"{e}") from None
  if heads is None:
    raise ReferenceConversionError("no recurrent block: cannot tell num_heads from the params")
  conv_width = int(np.shape(_first_conv(root, kinds))[0])
  try:
    return ModelConfig(
        name=name, vocab_size=int(vocab), d_model=int(d), num_layers=n, num_heads=int(heads),
        num_kv_heads=1, head_dim=int(d) // int(heads), ffw_dim=int(f), ffw_activation="geglu",
        norm_plus_one=True, tie_embeddings=True, scale_embeddings=True,
        embed_scale_dtype="bfloat16", final_logit_softcap=logits_soft_cap or None,
        layer_pattern=shortest_period(kinds), sliding_window=attention_window_size + 1,
        rope_fraction=0.5, ffw_bias=True, attn_out_bias=True, lru_width=int(lru),
        conv1d_width=conv_width, dtype=dtype)
  except ValueError as e:  # e.g. a dtype that is not a float type
    raise ReferenceConversionError(f"the params give an invalid model: {e}") from None


def _first_conv(root, kinds):
  n = kinds.index(RECURRENT)
  try:
    return root[f"blocks.{n}"]["recurrent_block"]["conv_1d"]["w"]
  except (KeyError, TypeError):
    raise ReferenceConversionError(f"missing tensor 'blocks.{n}/recurrent_block/conv_1d/w': "
                                   "the conv width cannot be read") from None


# ---------------------------------------------------------------- shared

def _check(plan: list[Step], names: set[str], shape_of, dtype_of, ignorable, error,
           cfg: ModelConfig) -> None:
  check_plan(plan, names, shape_of, dtype_of, ignorable=ignorable, error=error,
             context=f"config: {cfg.num_layers} layers, layer_pattern {cfg.layer_pattern}",
             unexpected_hint="more layers than the config says? a complex-valued RG-LRU?")


def _materialise(plan: list[Step], get, cfg: ModelConfig, dtype) -> dict:
  dtype = np.dtype(jnp.dtype(dtype or cfg.dtype))
  params = {"layers": [{} for _ in range(cfg.num_layers)]}
  for name, _, path, arrange in plan:
    tree = params
    for key in path[:-1]:
      tree = tree[key] if isinstance(key, int) else tree.setdefault(key, {})
    tree[path[-1]] = np.ascontiguousarray(arrange(get(name)), dtype=dtype)
  return params
