"""Model configurations: one frozen dataclass, named presets for every family served.

Presets follow the published configs (transformers' Gemma/Gemma2/Gemma3/Llama/RecurrentGemma
config classes, the recurrentgemma package's presets and the Chinchilla paper). Only the shapes
matter to the decoder; weights come from checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

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
    if problems:
      raise ValueError(f"bad ModelConfig {self.name!r}: " + "; ".join(problems))

  @property
  def layer_types(self) -> tuple[str, ...]:
    p = self.layer_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def recurrent_width(self) -> int:
    """The RG-LRU width w of recurrent layers."""
    return self.lru_width or self.d_model

  @property
  def num_groups(self) -> int:
    """Whole periods of layer_pattern: the layer groups run under one lax.scan."""
    return self.num_layers // len(self.layer_pattern)

  @property
  def num_remainder(self) -> int:
    """Layers after the last whole period (kinds layer_pattern[:num_remainder]), unscanned."""
    return self.num_layers % len(self.layer_pattern)

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
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  def num_params(self) -> int:
    d, h, k, e, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.ffw_dim
    w, c = self.recurrent_width, self.conv1d_width
    attn = d * e * (2 * h + 2 * k) + (2 * e if self.qk_norm else 0) + d * self.attn_out_bias
    # linear_x, linear_y (d w) and linear_out (w d) with biases, the conv (c w) with bias, two
    # block-diagonal gates (h (w/h)^2) with biases, a_param (w): models/recurrent.py.
    recurrent = 3 * d * w + 2 * w + d + (c + 1) * w + 2 * (w * w // h + w) + w
    gated = self.ffw_activation != "gelu"
    ffw = d * f * (3 if gated else 2) + self.ffw_bias * ((2 if gated else 1) * f + d)
    norms = d * (2 + self.post_attn_norm + self.post_ffw_norm)
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    mixing = sum(recurrent if kind == RECURRENT else attn for kind in self.layer_types)
    return mixing + self.num_layers * (ffw + norms) + embed + d


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


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]
