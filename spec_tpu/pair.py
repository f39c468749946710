"""A target and (optionally) a draft, placed on a mesh: what `Sampler` and `Engine` both run.

    pair = Pair(target_params, target_cfg, mesh=mesh, draft_params=..., draft_cfg=...,
                eos_ids=tok.eos_ids, pad_id=tok.pad_id, tokenizer=tok)
    Sampler(pair).generate(prompts, max_new_tokens=64, k=4)
    Engine(pair, num_slots=8, max_len=1024, k=4)

spec_tpu.setup builds one from a config (checkpoints restored, quantized, sharded).
`draft_source` says where proposals come from (spec_tpu/decoding/draft_source.py): the draft
model (default), prompt lookup (no draft model needed) or both. A Gemma 4 assistant drafter
is a draft too: draft_cfg an AssistantConfig (its draft source then defaults to 'assistant').
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
from jax.sharding import Mesh

from spec_tpu import sharding
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.models.config import AssistantConfig, ModelConfig


# XLA:CPU: int8 weights are converted to bfloat16 for their matmuls, and loop-invariant code
# motion would hoist that convert of every stacked weight out of the decode loop, a bfloat16
# copy of the whole model (twice the int8 bytes). Float weights keep the pass: it takes the
# layers' weight slices out of the decode loop (model._scan_groups).
CPU_QUANTIZED_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


# XLA:GPU, measured on an H100 (README "GPU"): a decode step reads each weight once only if the
# matmuls go to cuBLAS reading layer slices of the stacked weights in place (dynamic-slice
# fusion; Triton gemm fusions copied each layer's weights out of the stack first) and two
# matmuls of one input are not merged into one (the merger concatenates their weights, a copy
# per call). int8 weights keep Triton's gemm fusions: they convert the int8 operand inside the
# matmul, where cuBLAS needs a converted copy first (24.1 vs 13.6 ms/token for the 7B).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True,
                        "xla_gpu_enable_triton_gemm": False,
                        "xla_gpu_dot_merger_threshold_mb": 0}


def compiler_options(platform: str, quantized: bool = False) -> dict | None:
  """XLA options for compiling a decode program for devices of this platform (quantized: the
  program's weights include int8 ones)."""
  if platform == "cpu":
    return dict(CPU_QUANTIZED_COMPILER_OPTIONS) if quantized else None
  if platform in ("gpu", "cuda"):
    options = dict(GPU_COMPILER_OPTIONS)
    if quantized:
      del options["xla_gpu_enable_triton_gemm"]
    return options
  return None


def check_pair(target: ModelConfig, draft: ModelConfig | AssistantConfig):
  """Draft and target must share a tokenizer; padded embedding tables may differ in size. An
  assistant must fit its target's caches and width (it may record no tokenizer: it is made
  for one target)."""
  if isinstance(draft, AssistantConfig):
    draft.check_target(target)
    if draft.tokenizer and draft.tokenizer != target.tokenizer:
      raise ValueError(f"assistant tokenizer {draft.tokenizer!r} differs from target tokenizer "
                       f"{target.tokenizer!r}: speculative sampling needs one vocabulary")
    return
  if target.tokenizer != draft.tokenizer:
    raise ValueError(f"draft tokenizer {draft.tokenizer!r} differs from target tokenizer "
                     f"{target.tokenizer!r}: speculative sampling needs one vocabulary")
  if target.num_tokens != draft.num_tokens:
    raise ValueError(f"draft has {draft.num_tokens} tokens, target {target.num_tokens}: the "
                     "vocabularies differ (set valid_vocab_size for padded embedding tables)")
  if draft.vision is not None:
    if target.vision is None:
      raise ValueError(f"draft {draft.name!r} has a vision encoder, target {target.name!r} none: "
                       "a draft reads images only where its target does")
    layout = ("image_size", "num_soft_tokens", "start_id", "end_id", "image_id", "newline_id")
    differ = [f for f in layout if getattr(draft.vision, f) != getattr(target.vision, f)]
    if differ:
      raise ValueError(f"draft and target lay image prompts out differently ({', '.join(differ)} "
                       "differ): a multimodal draft must read the target's image blocks")


def integer(name: str, value, lo: int, hi: int | None = None) -> int:
  """`value` as an int in [lo, hi], or a ValueError naming it (a float, even 5.0, is refused:
  it would be truncated or reach a shape)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    raise ValueError(f"{name} must be " + (f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
                     + f", got {value}")
  return int(value)


def eos_tuple(eos_ids, vocab: int) -> tuple[int, ...]:
  """The ids that end a generation as a tuple (order kept, repeats dropped): from one id or a
  sequence of ids; None, () and -1 (a tokenizer's "none") mean no EOS. Ids outside the
  vocabulary are refused: they would never match a sampled token."""
  if eos_ids is None:
    return ()
  if isinstance(eos_ids, numbers.Integral) and not isinstance(eos_ids, bool):
    eos_ids = () if eos_ids == -1 else (eos_ids,)
  if isinstance(eos_ids, (str, bytes)) or not isinstance(eos_ids, Sequence):
    raise ValueError(f"eos_ids must be an id or a sequence of ids, got {eos_ids!r}")
  ids = [integer("eos_ids", i, 0, vocab - 1) for i in eos_ids]
  return tuple(dict.fromkeys(ids))


class Pair:
  """Sharded params and configs of a target (and optionally a draft), their sharding rules, the
  mesh, the EOS ids (any of them ends a row) and the pad id, the tokenizer (optional: token ids work without one) and where
  proposals come from."""

  def __init__(self, target_params, target_cfg: ModelConfig, *, mesh: Mesh | None = None,
               draft_params=None, draft_cfg: ModelConfig | AssistantConfig | None = None,
               target_rules=sharding.TENSOR_PARALLEL, draft_rules=sharding.TENSOR_PARALLEL,
               eos_ids: int | Sequence[int] | None = None, pad_id: int = 0, tokenizer=None,
               draft_source: DraftSource | None = None):
    if (draft_params is None) != (draft_cfg is None):
      raise ValueError("give both draft_params and draft_cfg, or neither")
    if draft_cfg is not None:
      check_pair(target_cfg, draft_cfg)
    # A pad or EOS id past the vocabulary would embed as NaN (padding positions reach every
    # output through attention's 0 * NaN) or never match a sampled token. A sentencepiece model
    # without a pad or EOS piece says -1: padding then uses token 0 (what fills padded positions
    # does not matter as long as it embeds), and there is no EOS.
    vocab = min(c.num_tokens for c in (target_cfg, draft_cfg) if c is not None)
    self.pad_id = max(0, integer("pad_id", pad_id, -1, vocab - 1))
    self.eos_ids = eos_tuple(eos_ids, vocab)
    self.mesh = mesh if mesh is not None else sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    self.target_cfg, self.draft_cfg = target_cfg, draft_cfg
    self.target_rules, self.draft_rules = target_rules, draft_rules
    self.tokenizer = tokenizer
    if draft_source is None:
      draft_source = DraftSource("assistant" if self.has_assistant else "model")
    self.draft_source = self.check_source(draft_source)
    self.target_params = sharding.shard_params(target_params, target_cfg, self.mesh, target_rules)
    self.draft_params = (None if draft_params is None else
                         sharding.shard_params(draft_params, draft_cfg, self.mesh, draft_rules))

  @property
  def has_draft(self) -> bool:
    return self.draft_cfg is not None

  @property
  def has_assistant(self) -> bool:
    """The draft is a Gemma 4 assistant drafter (it reads the target's caches)."""
    return isinstance(self.draft_cfg, AssistantConfig)

  def check_source(self, source: DraftSource) -> DraftSource:
    """`source` if this pair can run it (hybrid drafting needs the draft model, the
    assistant source an assistant, and an assistant drafts only as one)."""
    if not isinstance(source, DraftSource):
      raise ValueError(f"draft_source must be a DraftSource, got {source!r}")
    if source.kind == "hybrid" and self.draft_cfg is None:
      raise ValueError("draft kind 'hybrid' needs a draft model; this pair has none "
                       "(use kind 'ngram')")
    if source.uses_assistant and not self.has_assistant:
      raise ValueError("draft kind 'assistant' needs a Gemma 4 assistant drafter as the draft "
                       "(a checkpoint converted from Gemma4AssistantForCausalLM)")
    if self.has_assistant and source.kind in ("model", "hybrid"):
      raise ValueError(f"the draft is a Gemma 4 assistant drafter: it drafts as kind "
                       f"'assistant', not {source.kind!r}")
    return source

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  def param_shardings(self, with_draft: bool):
    tp = sharding.param_shardings(self.target_cfg, self.mesh, self.target_rules,
                                  self.target_params)
    dp = (sharding.param_shardings(self.draft_cfg, self.mesh, self.draft_rules,
                                   self.draft_params) if with_draft else None)
    return tp, dp

  def compiler_options(self) -> dict | None:
    """The XLA options every program over these models compiles with."""
    quantized = any(c is not None and c.quantize for c in (self.target_cfg, self.draft_cfg))
    return compiler_options(self.platform, quantized)

  def vision(self):
    """The target's VisionConfig, or a ValueError saying this model reads no images."""
    if self.target_cfg.vision is None:
      raise ValueError(f"model {self.target_cfg.name!r} has no vision encoder: it cannot read "
                       "images (a Gemma 3 4B/12B/27B checkpoint converted from "
                       "Gemma3ForConditionalGeneration can)")
    return self.target_cfg.vision
