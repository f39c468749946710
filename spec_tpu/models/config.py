"""Model configurations: one frozen dataclass, named presets for every family served.

Presets follow the published configs (transformers' Gemma/Gemma2/Gemma3/Llama/RecurrentGemma
config classes, the recurrentgemma package's presets and the Chinchilla paper). Only the shapes
matter to the decoder; weights come from checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from spec_tpu.models.vision.config import GEMMA3 as GEMMA3_VISION, VisionConfig

LOCAL = "local"    # sliding-window attention, ring-buffer cache of window size
GLOBAL = "global"  # full attention, cache of the whole context
RECURRENT = "recurrent"  # Griffin recurrent block (RG-LRU), fixed-size state (models/recurrent.py)
LAYER_KINDS = (LOCAL, GLOBAL, RECURRENT)

_ACTIVATIONS = ("geglu", "swiglu", "gelu")
FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # params and activations
_QUANTIZE_MODES = ("int8",)  # models/quant.py MODES (config.py stays free of JAX imports)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the decoder needs to know about a model's shape and variant."""

  name: str
  vocab_size: int                 # rows of the embedding table (may include padding rows)
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffw_dim: int
  ffw_activation: str = "swiglu"  # geglu | swiglu | gelu (dense, ungated)
  gelu_approximate: bool = True   # tanh approximation (Gemma's gelu_pytorch_tanh)
  norm_eps: float = 1e-6
  norm_plus_one: bool = False     # Gemma's RMSNorm multiplies by (1 + scale)
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
  post_attn_norm: bool = False    # Gemma 2/3: norm after attention, before the residual add
  post_ffw_norm: bool = False
  qk_norm: bool = False           # Gemma 3: RMSNorm on queries and keys per head
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  layer_pattern: tuple[str, ...] = (GLOBAL,)  # repeated cyclically over the layers
  sliding_window: int | None = None  # local layers see keys at positions > q - sliding_window
  rope_base_global: float = 10_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0  # linear position scaling (Gemma 3 4B+ global layers)
  rope_scale_local: float = 1.0
  # Llama 3.1+ frequency-dependent RoPE scaling, every layer: (factor, low_freq_factor,
  # high_freq_factor, original_max_position_embeddings); None for plain RoPE.
  rope_llama3: tuple[float, float, float, float] | None = None
  # Partial rotary embeddings: RoPE rotates the leading rope_fraction of each head's dimensions
  # and passes the rest through (RecurrentGemma: 0.5).
  rope_fraction: float = 1.0
  ffw_bias: bool = False          # biases on the feed-forward's gate, up and down (RecurrentGemma)
  attn_out_bias: bool = False     # a bias on the attention output projection (RecurrentGemma)
  # Dtype the sqrt(d_model) embedding scale is rounded to; None: the activation dtype (Gemma).
  # RecurrentGemma rounds it to bfloat16 whatever the activation dtype (sqrt(2560) -> 50.5).
  embed_scale_dtype: str | None = None
  # Griffin recurrent layers (kind RECURRENT). The RG-LRU gates are block-diagonal with
  # num_heads blocks, as in both references (one num_heads for attention and gates).
  lru_width: int | None = None    # RG-LRU width w; None: d_model
  conv1d_width: int = 4           # temporal width of the depthwise Conv1D before the RG-LRU
  valid_vocab_size: int | None = None  # tokens a tokenizer can produce; rows past it are padding
  tokenizer: str = ""             # names the tokenizer, so mismatched draft/target pairs are caught
  dtype: str = "float32"          # parameter and activation dtype
  # Weight-only quantization of the matmul weights (models/quant.py): None, or "int8" (int8
  # values with float32 per-output-channel scales; activations stay in `dtype`).
  quantize: str | None = None
  # The image encoder and projector (models/vision/); None: a text-only model.
  vision: VisionConfig | None = None
  # Gemma 4. Global layers' own head size and KV heads (None: head_dim, num_kv_heads): the two
  # attention kinds then have two cache shapes.
  global_head_dim: int | None = None
  num_global_kv_heads: int | None = None
  global_k_eq_v: bool = False     # global layers' values are their keys' projection (no v weight)
  v_norm: bool = False            # a weightless RMSNorm on each value head
  layer_scalar: bool = False      # a learned scalar multiplies each layer's output (whole stream)
  # Proportional RoPE on global layers: only the first fraction of the head_dim/2 frequencies
  # turn (the rest are zero), exponents still over the whole head_dim.
  rope_proportion_global: float = 1.0
  # Per-layer embeddings (PLE): a second token table of ple_dim per layer, mixed with a
  # projection of the embeddings, gated into each layer's output. 0: none.
  ple_dim: int = 0
  ple_vocab_size: int | None = None  # rows of the PLE table (None: vocab_size)
  # The last kv_shared_layers layers compute queries only and attend over the keys and values of
  # the last earlier layer of their kind (the donor): no cache and no k/v weights of their own.
  kv_shared_layers: int = 0
  kv_shared_ffw_dim: int | None = None  # their feed-forward width (None: ffw_dim)

  def __post_init__(self):
    problems = []
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "ffw_dim"):
      if getattr(self, field) <= 0:
        problems.append(f"{field} must be positive, got {getattr(self, field)}")
    if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                      f"({self.num_kv_heads})")
    if self.ffw_activation not in _ACTIVATIONS:
      problems.append(f"ffw_activation must be one of {_ACTIVATIONS}, got {self.ffw_activation!r}")
    if not self.layer_pattern or any(k not in LAYER_KINDS for k in self.layer_pattern):
      problems.append(f"layer_pattern must hold {'/'.join(map(repr, LAYER_KINDS))}, got "
                      f"{self.layer_pattern}")
    if LOCAL in self.layer_pattern and not (self.sliding_window and self.sliding_window > 0):
      problems.append("local layers need a positive sliding_window")
    if RECURRENT in self.layer_pattern:
      if self.lru_width is not None and self.lru_width <= 0:
        problems.append(f"lru_width must be positive, got {self.lru_width}")
      elif self.num_heads > 0 and self.recurrent_width % self.num_heads:
        problems.append(f"lru_width ({self.recurrent_width}) must be a multiple of num_heads "
                        f"({self.num_heads}): the RG-LRU gates have num_heads diagonal blocks")
      if self.conv1d_width < 1:
        problems.append(f"conv1d_width must be at least 1, got {self.conv1d_width}")
    if not 0 < self.rope_fraction <= 1 or (self.head_dim * self.rope_fraction) % 2:
      problems.append(f"rope_fraction must be in (0, 1] and rotate an even number of head_dim "
                      f"({self.head_dim}) dimensions, got {self.rope_fraction}")
    if self.dtype not in FLOAT_DTYPES:
      problems.append(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r} (int8 weights: "
                      "quantize='int8')")
    for field in ("norm_eps", "rope_base_global", "rope_base_local", "rope_scale_global",
                  "rope_scale_local"):
      if not getattr(self, field) > 0:  # also catches NaN
        problems.append(f"{field} must be positive, got {getattr(self, field)}")
    for field in ("query_scale", "attn_logit_softcap", "final_logit_softcap"):
      if getattr(self, field) is not None and not getattr(self, field) > 0:
        problems.append(f"{field} must be None or positive, got {getattr(self, field)}")
    if self.embed_scale_dtype not in (None,) + FLOAT_DTYPES:
      problems.append(f"embed_scale_dtype must be None or one of {FLOAT_DTYPES}, got "
                      f"{self.embed_scale_dtype!r}")
    if self.valid_vocab_size is not None and not 0 < self.valid_vocab_size <= self.vocab_size:
      problems.append(f"valid_vocab_size must be in (0, vocab_size={self.vocab_size}], "
                      f"got {self.valid_vocab_size}")
    if self.rope_llama3 is not None:
      r = self.rope_llama3
      if (not isinstance(r, tuple) or len(r) != 4 or not all(x > 0 for x in r)
          or not r[1] < r[2]):
        problems.append("rope_llama3 must be (factor, low_freq_factor, high_freq_factor, "
                        "original_max_position_embeddings), all positive, low < high; "
                        f"got {r}")
    if self.quantize not in (None,) + _QUANTIZE_MODES:
      problems.append(f"quantize must be None or one of {_QUANTIZE_MODES}, got {self.quantize!r}")
    if self.quantize and (RECURRENT in self.layer_pattern or self.ffw_bias or self.attn_out_bias):
      # The recurrent block and the biased MLP (RecurrentGemma) have matmuls of their own that do
      # not go through quant.einsum yet: refuse rather than run a half-quantized model.
      problems.append("quantize is not supported for RecurrentGemma-style models (recurrent "
                      "layers, biased MLP or attention output) yet")
    if self.vision is not None:
      if not isinstance(self.vision, VisionConfig):
        problems.append(f"vision must be a VisionConfig or None, got {type(self.vision).__name__}")
      elif RECURRENT in self.layer_pattern:
        problems.append("vision is supported for attention-only models")
      elif self.kv_shared_layers:
        problems.append("vision is not supported with KV-shared layers yet")
      else:
        v = self.vision
        ids = dict(start_id=v.start_id, end_id=v.end_id, newline_id=v.newline_id)
        bad = {k: i for k, i in ids.items() if i >= self.num_tokens}
        if bad:
          problems.append(f"vision token ids {bad} are outside the vocabulary "
                          f"[0, {self.num_tokens})")
    problems += self._gemma4_problems()
    if problems:
      raise ValueError(f"bad ModelConfig {self.name!r}: " + "; ".join(problems))

  def _gemma4_problems(self) -> list[str]:
    problems = []
    for field in ("global_head_dim", "num_global_kv_heads", "ple_vocab_size",
                  "kv_shared_ffw_dim"):
      if getattr(self, field) is not None and getattr(self, field) <= 0:
        problems.append(f"{field} must be None or positive, got {getattr(self, field)}")
    g_kv = self.kind_kv_heads(GLOBAL)
    if g_kv > 0 and self.num_heads % g_kv:
      problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_global_kv_heads "
                      f"({g_kv})")
    if not 0 < self.rope_proportion_global <= 1:
      problems.append(f"rope_proportion_global must be in (0, 1], got "
                      f"{self.rope_proportion_global}")
    if self.ple_dim < 0:
      problems.append(f"ple_dim must be >= 0, got {self.ple_dim}")
    if not 0 <= self.kv_shared_layers < self.num_layers:
      problems.append(f"kv_shared_layers must be in [0, num_layers={self.num_layers}), got "
                      f"{self.kv_shared_layers}")
    elif self.kv_shared_layers:
      shared = set(self.layer_types[self.num_cached_layers:])
      if not shared <= set(self.layer_types[:self.num_cached_layers]):
        problems.append(f"kv-shared layers of kinds {sorted(shared)} need an earlier layer of "
                        "each kind to read from")
    gemma4 = (self.global_head_dim, self.num_global_kv_heads, self.global_k_eq_v, self.v_norm,
              self.layer_scalar, self.ple_dim, self.kv_shared_layers)
    if RECURRENT in self.layer_pattern and any(gemma4):
      problems.append("Gemma 4 attention features do not combine with recurrent layers")
    if self.quantize and (self.ple_dim or self.kv_shared_layers or self.global_k_eq_v
                          or self.global_head_dim or self.num_global_kv_heads):
      problems.append("quantize is not supported for Gemma 4-style models yet")
    return problems

  @property
  def layer_types(self) -> tuple[str, ...]:
    p = self.layer_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  def kind_head_dim(self, kind: str) -> int:
    """Head size of an attention layer of this kind."""
    return self.global_head_dim or self.head_dim if kind == GLOBAL else self.head_dim

  def kind_kv_heads(self, kind: str) -> int:
    return self.num_global_kv_heads or self.num_kv_heads if kind == GLOBAL else self.num_kv_heads

  @property
  def num_cached_layers(self) -> int:
    """Layers with a cache of their own: all but the kv-shared tail."""
    return self.num_layers - self.kv_shared_layers

  @property
  def kv_donors(self) -> dict[str, int]:
    """kind -> the layer whose cache the kv-shared layers of that kind read (the last cached
    layer of the kind); empty without kv sharing."""
    if not self.kv_shared_layers:
      return {}
    kinds = self.layer_types[:self.num_cached_layers]
    return {kind: max(i for i, k in enumerate(kinds) if k == kind) for kind in set(kinds)}

  @property
  def shared_pattern(self) -> tuple[str, ...]:
    """layer_pattern from the first kv-shared layer's phase: the tail's own period."""
    p, start = len(self.layer_pattern), self.num_cached_layers
    return tuple(self.layer_pattern[(start + j) % p] for j in range(p))

  @property
  def num_shared_groups(self) -> int:
    return self.kv_shared_layers // len(self.layer_pattern)

  @property
  def num_shared_remainder(self) -> int:
    return self.kv_shared_layers % len(self.layer_pattern)

  @property
  def recurrent_width(self) -> int:
    """The RG-LRU width w of recurrent layers."""
    return self.lru_width or self.d_model

  @property
  def num_groups(self) -> int:
    """Whole periods of layer_pattern: the layer groups run under one lax.scan. With kv-shared
    layers, of the cached layers only, and the last whole period stays out of the scan: its
    layers include the donors, whose cache writes wait until the shared layers have read."""
    periods = self.num_cached_layers // len(self.layer_pattern)
    return max(periods - 1, 0) if self.kv_shared_layers else periods

  @property
  def num_remainder(self) -> int:
    """Cached layers after the scanned groups (kinds layer_pattern[r % P]), unscanned."""
    return self.num_cached_layers - self.num_groups * len(self.layer_pattern)

  @property
  def num_tokens(self) -> int:
    """Tokens that can be sampled (the rest of the embedding rows are padding)."""
    return self.valid_vocab_size or self.vocab_size

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layer_pattern"] = list(self.layer_pattern)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    d = dict(d)
    if "layer_pattern" in d:
      d["layer_pattern"] = tuple(d["layer_pattern"])
    if d.get("rope_llama3") is not None:
      d["rope_llama3"] = tuple(d["rope_llama3"])
    if isinstance(d.get("vision"), dict):
      d["vision"] = VisionConfig(**d["vision"])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  def num_params(self) -> int:
    d, h, f = self.d_model, self.num_heads, self.ffw_dim
    w, c = self.recurrent_width, self.conv1d_width

    def attn(kind, kv_shared):
      e, k = self.kind_head_dim(kind), self.kind_kv_heads(kind)
      kv_weights = 0 if kv_shared else (1 if kind == GLOBAL and self.global_k_eq_v else 2)
      norms = (e if self.qk_norm else 0) + (e if self.qk_norm and not kv_shared else 0)
      return d * e * (2 * h + kv_weights * k) + norms + d * self.attn_out_bias

    # linear_x, linear_y (d w) and linear_out (w d) with biases, the conv (c w) with bias, two
    # block-diagonal gates (h (w/h)^2) with biases, a_param (w): models/recurrent.py.
    recurrent = 3 * d * w + 2 * w + d + (c + 1) * w + 2 * (w * w // h + w) + w
    gated = self.ffw_activation != "gelu"

    def ffw(width):
      return d * width * (3 if gated else 2) + self.ffw_bias * ((2 if gated else 1) * width + d)

    norms = d * (2 + self.post_attn_norm + self.post_ffw_norm)
    per_layer = norms + self.layer_scalar + (2 * d * self.ple_dim + d if self.ple_dim else 0)
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    total = embed + d + (self.vision.num_params(d) if self.vision else 0)
    if self.ple_dim:
      width = self.num_layers * self.ple_dim
      total += (self.ple_vocab_size or self.vocab_size) * width + d * width + self.ple_dim
    for i, kind in enumerate(self.layer_types):
      shared = i >= self.num_cached_layers
      mixing = recurrent if kind == RECURRENT else attn(kind, shared)
      total += mixing + ffw(self.kv_shared_ffw_dim if shared and self.kv_shared_ffw_dim
                            else f) + per_layer
    return total



@dataclasses.dataclass(frozen=True)
class AssistantConfig:
  """Gemma 4's assistant drafter (models/assistant.py): query-only layers over a target's
  caches. layers: its layers as a ModelConfig (its d_model, heads, ffw; head sizes and KV head
  counts those of the target's kinds; every layer reads the target's cache, none has k/v
  weights); backbone_d_model: the target's d_model (the width of the hidden state it is fed).
  Name, tokenizer, vocabulary and dtype are the layers'.
  centroids > 0 (the E2B/E4B assistants' ordered embeddings): the vocabulary falls into that
  many clusters of vocab_size / centroids tokens; a step scores the clusters, and only the
  tokens of the centroid_top_k best get their own logit, every other token the lowest of those
  minus 1 (transformers' Gemma4AssistantMaskedEmbedder, which takes that floor over its whole
  batch; here per row, so a row's draft never depends on its neighbours)."""
  layers: ModelConfig
  backbone_d_model: int
  centroids: int = 0
  centroid_top_k: int = 0

  name = property(lambda self: self.layers.name)
  tokenizer = property(lambda self: self.layers.tokenizer)
  dtype = property(lambda self: self.layers.dtype)
  quantize = property(lambda self: self.layers.quantize)
  vocab_size = property(lambda self: self.layers.vocab_size)
  num_tokens = property(lambda self: self.layers.num_tokens)
  num_layers = property(lambda self: self.layers.num_layers)
  d_model = property(lambda self: self.layers.d_model)
  vision = property(lambda self: self.layers.vision)  # None: an assistant reads no images

  def __post_init__(self):
    if self.layers.quantize:
      raise ValueError("int8 assistant weights are not supported")
    if self.layers.kv_shared_layers or self.layers.ple_dim or self.layers.vision is not None:
      raise ValueError("assistant layers take no kv-shared tail, PLE or vision encoder of "
                       "their own")
    if self.backbone_d_model < 1:
      raise ValueError(f"backbone_d_model must be positive, got {self.backbone_d_model}")
    if self.centroids and (self.layers.vocab_size % self.centroids
                           or not 0 < self.centroid_top_k <= self.centroids):
      raise ValueError(f"centroids ({self.centroids}) must divide vocab_size "
                       f"({self.layers.vocab_size}), with 0 < centroid_top_k "
                       f"({self.centroid_top_k}) <= centroids")

  def replace(self, **kw) -> "AssistantConfig":
    """Its own fields on this config; any other field on its layers."""
    own = {k: kw.pop(k) for k in ("backbone_d_model", "layers", "centroids", "centroid_top_k")
           if k in kw}
    layers = own.pop("layers", self.layers)
    return dataclasses.replace(self, layers=layers.replace(**kw) if kw else layers, **own)

  def to_dict(self) -> dict[str, Any]:
    return {"kind": "assistant", "backbone_d_model": self.backbone_d_model,
            "centroids": self.centroids, "centroid_top_k": self.centroid_top_k,
            "layers": self.layers.to_dict()}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AssistantConfig":
    own = {"kind", "backbone_d_model", "layers", "centroids", "centroid_top_k"}
    if not {"kind", "backbone_d_model", "layers"} <= set(d) <= own or d["kind"] != "assistant":
      raise ValueError(f"an assistant config holds {sorted(own)}; got {sorted(d)}")
    return cls(ModelConfig.from_dict(d["layers"]), int(d["backbone_d_model"]),
               int(d.get("centroids", 0)), int(d.get("centroid_top_k", 0)))

  def num_params(self) -> int:
    a, big = self.layers, self.backbone_d_model
    total = a.num_params() + 3 * big * a.d_model  # pre_proj (2D d), post_proj (d D)
    if self.centroids:  # the centroids (d C) and the token order (V)
      total += a.d_model * self.centroids + a.vocab_size
    for kind in a.layer_types:  # no k/v weights or k norm: every layer reads the target's
      e, k = a.kind_head_dim(kind), a.kind_kv_heads(kind)
      total -= a.d_model * e * k * (1 if kind == GLOBAL and a.global_k_eq_v else 2)
      total -= e if a.qk_norm else 0
    return total

  def check_target(self, target: ModelConfig) -> None:
    """Raises ValueError unless this assistant can read `target`'s caches and hidden state."""
    a = self.layers
    problems = []
    if target.d_model != self.backbone_d_model:
      problems.append(f"target d_model {target.d_model} != backbone_d_model "
                      f"{self.backbone_d_model}")
    if target.vocab_size != a.vocab_size:
      problems.append(f"vocabularies differ ({target.vocab_size} vs {a.vocab_size})")
    for kind in sorted(set(a.layer_types)):
      if kind not in target.layer_types[:target.num_cached_layers]:
        problems.append(f"the target has no cached {kind} layer to read")
      elif (a.kind_head_dim(kind), a.kind_kv_heads(kind)) != (target.kind_head_dim(kind),
                                                              target.kind_kv_heads(kind)):
        problems.append(f"{kind} head_dim / KV heads differ from the target's")
    if LOCAL in a.layer_types and a.sliding_window - 1 > target.sliding_window + 1:
      # A local step at position L reads keys L - (window - 1) .. L - 1; the target's ring
      # keeps its window plus at least one slot of slack (spec_tokens >= 1).
      problems.append(f"the assistant's window ({a.sliding_window}) needs more keys than the "
                      f"target's ring keeps (window {target.sliding_window} + 1)")
    if problems:
      raise ValueError("assistant does not fit its target: " + "; ".join(problems))


def config_from_dict(d: dict[str, Any]) -> "ModelConfig | AssistantConfig":
  """A stored config (to_dict's output) of either kind."""
  return AssistantConfig.from_dict(d) if d.get("kind") == "assistant" else ModelConfig.from_dict(d)


def _gemma(name, **kw) -> ModelConfig:
  base = dict(ffw_activation="geglu", norm_plus_one=True, tie_embeddings=True,
              scale_embeddings=True, norm_eps=1e-6, dtype="bfloat16")
  base.update(kw)
  return ModelConfig(name=name, **base)


def _gemma2(name, **kw) -> ModelConfig:
  return _gemma(name, vocab_size=256_000, post_attn_norm=True, post_ffw_norm=True,
                attn_logit_softcap=50.0, final_logit_softcap=30.0, layer_pattern=(LOCAL, GLOBAL),
                sliding_window=4096, tokenizer="gemma", **kw)


def _gemma3(name, **kw) -> ModelConfig:
  return _gemma(name, post_attn_norm=True, post_ffw_norm=True, qk_norm=True,
                layer_pattern=(LOCAL,) * 5 + (GLOBAL,), rope_base_local=10_000.0,
                rope_base_global=1_000_000.0, tokenizer="gemma3", **kw)


def _recurrentgemma(name, **kw) -> ModelConfig:
  """RecurrentGemma (Griffin): the recurrentgemma package's presets, checked against
  transformers' RecurrentGemmaConfig. (recurrent, recurrent, attention) repeated; MQA with
  head_dim = d_model / num_heads; RoPE on the first half of each head; every dense layer except
  q/k/v has a bias; final logits soft-capped at 30.

  The reference's attention_window_size 2048 lets a query see itself and the 2048 keys before it
  (2049 keys): sliding_window = 2049 in this config's convention (keys at positions
  > q - sliding_window). transformers' RecurrentGemma sees one key fewer; spec_tpu follows the
  reference, the implementation the released weights were trained with (models/recurrent.py).
  """
  base = dict(vocab_size=256_000, num_kv_heads=1, layer_pattern=(RECURRENT, RECURRENT, LOCAL),
              rope_fraction=0.5, ffw_bias=True, attn_out_bias=True, embed_scale_dtype="bfloat16",
              final_logit_softcap=30.0, conv1d_width=4, tokenizer="gemma")
  base.update(kw)
  return _gemma(name, **base)


def _gemma4(name, **kw) -> ModelConfig:
  """Gemma 4 text (transformers' Gemma4TextConfig and modeling_gemma4.py): local head_dim 256,
  global 512 (global_head_dim), RMSNorm times w (not 1 + w), q/k norms and a weightless v
  norm, attention scale 1, a learned layer_scalar, local RoPE theta 1e4, global theta 1e6
  with proportional RoPE (partial_rotary_factor 0.25), final logits soft-capped at 30,
  vocabulary 262,144, tied embeddings scaled by sqrt(d_model)."""
  base = dict(vocab_size=262_144, head_dim=256, global_head_dim=512, norm_plus_one=False,
              post_attn_norm=True, post_ffw_norm=True, qk_norm=True, v_norm=True,
              query_scale=1.0, layer_scalar=True, rope_base_local=10_000.0,
              rope_base_global=1_000_000.0, rope_proportion_global=0.25,
              final_logit_softcap=30.0, tokenizer="gemma4")
  base.update(kw)
  return _gemma(name, **base)


PRESETS: dict[str, ModelConfig] = {
  c.name: c for c in [
    # Tiny shapes for tests: every feature of the decoder at a size a CPU compiles in seconds.
    ModelConfig(name="tiny", vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, ffw_dim=64, tie_embeddings=False),
    ModelConfig(name="tiny_gemma2", vocab_size=64, d_model=32, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=8, ffw_dim=64, ffw_activation="geglu", norm_plus_one=True,
                scale_embeddings=True, post_attn_norm=True, post_ffw_norm=True,
                attn_logit_softcap=50.0, final_logit_softcap=30.0, layer_pattern=(LOCAL, GLOBAL),
                sliding_window=6, query_scale=16 ** -0.5),
    ModelConfig(name="tiny_gemma3", vocab_size=64, d_model=32, num_layers=6, num_heads=4,
                num_kv_heads=1, head_dim=8, ffw_dim=64, ffw_activation="geglu", norm_plus_one=True,
                scale_embeddings=True, post_attn_norm=True, post_ffw_norm=True, qk_norm=True,
                layer_pattern=(LOCAL, LOCAL, GLOBAL), sliding_window=5, rope_base_local=10_000.0,
                rope_base_global=1_000_000.0, rope_scale_global=8.0),
    # Pattern (R, R, L) cut short after 4 layers; lru_width != d_model so that a transposed
    # projection cannot pass; reference window 4 (sliding_window 5).
    _recurrentgemma("tiny_recurrentgemma", vocab_size=64, d_model=32, num_layers=4, num_heads=4,
                    head_dim=8, ffw_dim=48, lru_width=24, sliding_window=5, dtype="float32",
                    tokenizer=""),
    # Gemma 4 at test size: the dense k_eq_v form (31B-like: two head sizes and KV head counts)
    # and the PLE + kv-sharing form (E2B-like: a tail of 3 layers reading layers 3 and 4).
    _gemma4("tiny_gemma4", vocab_size=64, d_model=32, num_layers=6, num_heads=4,
            num_kv_heads=2, head_dim=8, global_head_dim=16, num_global_kv_heads=1,
            global_k_eq_v=True, ffw_dim=64, layer_pattern=(LOCAL, LOCAL, GLOBAL),
            sliding_window=5, dtype="float32", tokenizer=""),
    _gemma4("tiny_gemma4_ple", vocab_size=64, d_model=32, num_layers=8, num_heads=4,
            num_kv_heads=1, head_dim=8, global_head_dim=16, ffw_dim=48,
            layer_pattern=(LOCAL, GLOBAL), sliding_window=5, ple_dim=8, kv_shared_layers=3,
            kv_shared_ffw_dim=96, dtype="float32", tokenizer=""),
    # Chen et al. 2023: Chinchilla 70B target and its 4B draft (wide and shallow).
    ModelConfig(name="chinchilla_70b", vocab_size=32_000, d_model=8192, num_layers=80,
                num_heads=64, num_kv_heads=64, head_dim=128, ffw_dim=4 * 8192,
                ffw_activation="gelu", tie_embeddings=False, dtype="bfloat16",
                tokenizer="chinchilla"),
    ModelConfig(name="chinchilla_4b_draft", vocab_size=32_000, d_model=6144, num_layers=8,
                num_heads=48, num_kv_heads=48, head_dim=128, ffw_dim=4 * 6144,
                ffw_activation="gelu", tie_embeddings=False, dtype="bfloat16",
                tokenizer="chinchilla"),
    # Gemma (v1).
    _gemma("gemma_2b", vocab_size=256_000, d_model=2048, num_layers=18, num_heads=8,
           num_kv_heads=1, head_dim=256, ffw_dim=16_384, tokenizer="gemma"),
    _gemma("gemma_7b", vocab_size=256_000, d_model=3072, num_layers=28, num_heads=16,
           num_kv_heads=16, head_dim=256, ffw_dim=24_576, tokenizer="gemma"),
    # Gemma 2: query_pre_attn_scalar is head_dim for 2B/9B and d_model / num_heads for 27B.
    _gemma2("gemma2_2b", d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
            ffw_dim=9216, query_scale=256 ** -0.5),
    _gemma2("gemma2_9b", d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
            ffw_dim=14_336, query_scale=256 ** -0.5),
    _gemma2("gemma2_27b", d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16,
            head_dim=128, ffw_dim=36_864, query_scale=144 ** -0.5),
    # Gemma 3 (text): 4B and up scale global RoPE positions by 8. The 270M and 1B share the
    # 4B's tokenizer: the smallest drafts of the family.
    _gemma3("gemma3_270m", vocab_size=262_144, d_model=640, num_layers=18, num_heads=4,
            num_kv_heads=1, head_dim=256, ffw_dim=2048, sliding_window=512,
            query_scale=256 ** -0.5),
    _gemma3("gemma3_1b", vocab_size=262_144, d_model=1152, num_layers=26, num_heads=4,
            num_kv_heads=1, head_dim=256, ffw_dim=6912, sliding_window=512,
            query_scale=256 ** -0.5),
    _gemma3("gemma3_4b", vocab_size=262_208, d_model=2560, num_layers=34, num_heads=8,
            num_kv_heads=4, head_dim=256, ffw_dim=10_240, sliding_window=1024,
            query_scale=256 ** -0.5, rope_scale_global=8.0),
    _gemma3("gemma3_12b", vocab_size=262_208, d_model=3840, num_layers=48, num_heads=16,
            num_kv_heads=8, head_dim=256, ffw_dim=15_360, sliding_window=1024,
            query_scale=256 ** -0.5, rope_scale_global=8.0),
    _gemma3("gemma3_27b", vocab_size=262_208, d_model=5376, num_layers=62, num_heads=32,
            num_kv_heads=16, head_dim=128, ffw_dim=21_504, sliding_window=1024,
            query_scale=168 ** -0.5, rope_scale_global=8.0),
    # RecurrentGemma (Botev et al. 2024): MLP 3 x width, lru_width = width, window 2048 (+ self).
    _recurrentgemma("recurrentgemma_2b", d_model=2560, num_layers=26, num_heads=10, head_dim=256,
                    ffw_dim=3 * 2560, lru_width=2560, sliding_window=2049),
    _recurrentgemma("recurrentgemma_9b", d_model=4096, num_layers=38, num_heads=16, head_dim=256,
                    ffw_dim=3 * 4096, lru_width=4096, sliding_window=2049),
    # Gemma 4 text. Numbers from the checkpoints' config.json text_config as quoted (and
    # agreeing) in several public repositories' fixtures; hub files not read from here.
    # 31B: 60 layers 5:1, d 5376, 32 heads, 16 local / 4 global KV heads, k_eq_v, window 1024.
    _gemma4("gemma4_31b", d_model=5376, num_layers=60, num_heads=32, num_kv_heads=16,
            num_global_kv_heads=4, global_k_eq_v=True, ffw_dim=21_504,
            layer_pattern=(LOCAL,) * 5 + (GLOBAL,), sliding_window=1024),
    # E2B: 35 layers 4:1, d 1536, 8 heads, 1 KV head, PLE 256, last 20 layers kv-shared with
    # a double-wide MLP (intermediate_size 6144 with use_double_wide_mlp, as four independent
    # public repositories quote its config.json, one from a fetched copy).
    _gemma4("gemma4_e2b", d_model=1536, num_layers=35, num_heads=8, num_kv_heads=1,
            ffw_dim=6144, layer_pattern=(LOCAL,) * 4 + (GLOBAL,), sliding_window=512,
            ple_dim=256, kv_shared_layers=20, kv_shared_ffw_dim=2 * 6144),
    # E4B: 42 layers 5:1, d 2560, 8 heads, 2 KV heads, PLE 256, last 18 kv-shared, no
    # double-wide MLP.
    _gemma4("gemma4_e4b", d_model=2560, num_layers=42, num_heads=8, num_kv_heads=2,
            ffw_dim=10_240, layer_pattern=(LOCAL,) * 5 + (GLOBAL,), sliding_window=512,
            ple_dim=256, kv_shared_layers=18),
    # Llama-style shapes (GQA/MHA, SwiGLU, untied) for benchmarks.
    ModelConfig(name="llama_7b", vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32,
                num_kv_heads=32, head_dim=128, ffw_dim=11_008, norm_eps=1e-5,
                tie_embeddings=False, dtype="bfloat16", tokenizer="llama"),
    ModelConfig(name="llama3_8b", vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, ffw_dim=14_336, norm_eps=1e-5,
                rope_base_global=500_000.0, tie_embeddings=False, dtype="bfloat16",
                tokenizer="llama3"),
    ModelConfig(name="llama31_8b", vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, ffw_dim=14_336, norm_eps=1e-5,
                rope_base_global=500_000.0, rope_llama3=(8.0, 1.0, 4.0, 8192.0),
                tie_embeddings=False, dtype="bfloat16", tokenizer="llama3"),
    ModelConfig(name="llama32_1b", vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32,
                num_kv_heads=8, head_dim=64, ffw_dim=8192, norm_eps=1e-5,
                rope_base_global=500_000.0, rope_llama3=(32.0, 1.0, 4.0, 8192.0),
                tie_embeddings=True, dtype="bfloat16", tokenizer="llama3"),
  ]
}

# Gemma 3 4B, 12B and 27B as released: the text model and the one image encoder they share.
PRESETS.update({f"{n}_vision": PRESETS[n].replace(name=f"{n}_vision", vision=GEMMA3_VISION)
                for n in ("gemma3_4b", "gemma3_12b", "gemma3_27b")})
# The tiny model with a tiny encoder (28x28 images, 16 patches pooled to 4 soft tokens), for
# smoke runs of image paths (launch.plan --images, launch.benchmark --images); its image-block
# ids are the last of the 64-token vocabulary, the placeholder past any vocabulary.
PRESETS["tiny_vision"] = PRESETS["tiny"].replace(
    name="tiny_vision", vision=VisionConfig(image_size=28, patch_size=7, width=16, num_layers=2,
                                            num_heads=2, mlp_dim=32, num_soft_tokens=4,
                                            start_id=61, end_id=62, newline_id=63,
                                            image_id=1 << 20))



def _assistant(name, target: ModelConfig, **kw) -> AssistantConfig:
  """A Gemma 4 assistant for `target`: its kinds' head sizes and KV heads, no soft cap on its
  logits, local windows 2 wider than the target's (hf_gemma4.assistant_from_hf says why)."""
  base = dict(vocab_size=target.vocab_size, head_dim=target.head_dim,
              global_head_dim=target.global_head_dim, num_kv_heads=target.num_kv_heads,
              num_global_kv_heads=target.num_global_kv_heads,
              global_k_eq_v=target.global_k_eq_v, sliding_window=target.sliding_window + 2,
              final_logit_softcap=None, dtype=target.dtype, tokenizer=target.tokenizer)
  base.update(kw)
  return AssistantConfig(_gemma4(name, **base), backbone_d_model=target.d_model)


# Assistant drafters (draft.kind = 'assistant'), each made for one target.
ASSISTANT_PRESETS: dict[str, AssistantConfig] = {
  a.name: a for a in [
    _assistant("tiny_gemma4_assistant", PRESETS["tiny_gemma4"], d_model=24, num_layers=2,
               num_heads=4, ffw_dim=40, layer_pattern=(LOCAL, GLOBAL)),
    # google/gemma-4-31B-it-assistant: 4 layers of width 1024, 32 heads, MLP 8192, as Modular
    # MAX's Gemma4AssistantConfig defaults give it (its hub config.json not read from here;
    # the 3 local + 1 global order is assumed).
    _assistant("gemma4_31b_assistant", PRESETS["gemma4_31b"], d_model=1024, num_layers=4,
               num_heads=32, ffw_dim=8192, layer_pattern=(LOCAL,) * 3 + (GLOBAL,)),
  ]
}


def get_preset(name: str) -> "ModelConfig | AssistantConfig":
  if name in ASSISTANT_PRESETS:
    return ASSISTANT_PRESETS[name]
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: "
                   f"{sorted(PRESETS) + sorted(ASSISTANT_PRESETS)}")
  return PRESETS[name]
