"""The user-facing sampler: validates input on the host, then runs one compiled program per
(shapes, K, static sampling options) with the target and draft on their own shardings.

    sampler = Sampler(Pair(target_params, target_cfg, mesh=mesh, draft_params=..., draft_cfg=...))
    result = sampler.generate(prompts, max_new_tokens=64, k=4, sampling=SamplingParams(...))

coupling (decode.COUPLINGS): 'gumbel' makes a seed's tokens independent of K and the draft
(generate with k=0, 4 or another draft gives the same text); 'rejection' accepts the most
drafts. Both sample the target's law exactly.
Without a draft model, prompt lookup proposes the drafts:
    sampler = Sampler.from_params(target_params, target_cfg, draft_source=DraftSource("ngram"))
With a Gemma 4 assistant drafter (an AssistantConfig as the draft), the assistant does:
    sampler = Sampler.from_params(target_params, target_cfg, draft_params=assistant_params,
                                  draft_cfg=assistant_cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu.decoding import decode, prompts as prompts_lib
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu import program_cache, sharding
from spec_tpu.kernels import amx
from spec_tpu.models import model
from spec_tpu.models.config import ModelConfig
from spec_tpu.models.vision import image as image_lib, prompt as image_prompt
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.pair import Pair, integer


@dataclasses.dataclass
class Result:
  tokens: list[list[int]]     # generated tokens per prompt (EOS included when hit)
  rounds: np.ndarray          # target calls per row after prefill
  accepted: np.ndarray        # accepted draft tokens per row
  reached: np.ndarray         # b K: rounds where draft position j was judged
  accepted_at: np.ndarray     # b K: rounds where draft position j was accepted
  k: int
  seconds: float              # wall time of the device program (compile excluded)
  ngram_judged: np.ndarray | None = None    # b: judged positions an n-gram lookup proposed
  ngram_accepted: np.ndarray | None = None  # b: accepted ones of those
  draft_kind: str = "model"

  @property
  def num_generated(self) -> int:
    return sum(len(t) for t in self.tokens)

  def acceptance_rate(self, row: int | None = None) -> float:
    """Accepted / judged draft tokens: the a of the expected-speedup formula. (Drafts after a
    rejection are proposed but never judged, so accepted / proposed would understate a.)"""
    sl = slice(None) if row is None else slice(row, row + 1)
    judged = self.reached[sl].sum() if self.k else 0
    return float(self.accepted[sl].sum() / judged) if judged else float("nan")

  def tokens_per_call(self, row: int | None = None) -> float:
    """Generated tokens per target call (the prefill counts as one call)."""
    rows = range(len(self.tokens)) if row is None else [row]
    n = sum(len(self.tokens[r]) for r in rows)
    calls = sum(int(self.rounds[r]) + 1 for r in rows)
    return n / calls

  def acceptance_by_position(self) -> np.ndarray:
    reached = self.reached.sum(0)
    return np.where(reached > 0, self.accepted_at.sum(0) / np.maximum(reached, 1), np.nan)

  def source_acceptance(self) -> dict:
    """Judged and accepted draft positions by the source that proposed them ("ngram",
    "model"; positions where nothing was proposed count as judged, rejected, under "none")."""
    judged, accepted = int(self.reached.sum()) if self.k else 0, int(self.accepted.sum())
    ng_j = int(self.ngram_judged.sum()) if self.ngram_judged is not None else 0
    ng_a = int(self.ngram_accepted.sum()) if self.ngram_accepted is not None else 0
    rest = "model" if self.draft_kind != "ngram" else "none"
    return {"ngram": {"judged": ng_j, "accepted": ng_a},
            rest: {"judged": judged - ng_j, "accepted": accepted - ng_a}}

  def row_stats(self, row: int) -> dict:
    stats = {"new_tokens": len(self.tokens[row]), "target_calls": int(self.rounds[row]) + 1,
             "accepted": int(self.accepted[row]), "acceptance_rate": self.acceptance_rate(row),
             "tokens_per_target_call": self.tokens_per_call(row)}
    if self.ngram_accepted is not None and self.draft_kind != "model":
      stats.update(ngram_judged=int(self.ngram_judged[row]),
                   ngram_accepted=int(self.ngram_accepted[row]))
    return stats


class Sampler:
  """Whole batches over a Pair: one compiled decode program per (shapes, K, static sampling
  options), taken from the process's program cache (program_cache.py)."""

  def __init__(self, pair: Pair, *, max_cache_len: int | None = None,
               cache_len: int | None = None, coupling: str = "rejection"):
    self.pair = pair
    self.coupling = decode.check_coupling(coupling)
    # cache_len: every program's cache has exactly this many slots (benchmarks of long max
    # contexts); None: what the prompt bucket and new tokens need, capped by max_cache_len.
    self.max_cache_len, self.cache_len = max_cache_len, cache_len
    if cache_len is not None:
      self.max_cache_len = cache_len if max_cache_len is None else min(cache_len, max_cache_len)
    self._programs = {}

  @classmethod
  def from_params(cls, target_params, target_cfg: ModelConfig, *,
                  max_cache_len: int | None = None, cache_len: int | None = None,
                  coupling: str = "rejection", **pair_options) -> "Sampler":
    """Sampler(Pair(target_params, target_cfg, **pair_options), ...) in one call."""
    return cls(Pair(target_params, target_cfg, **pair_options), max_cache_len=max_cache_len,
               cache_len=cache_len, coupling=coupling)

  # The pair's fields, read through the Sampler.
  target_params = property(lambda self: self.pair.target_params)
  draft_params = property(lambda self: self.pair.draft_params)
  target_cfg = property(lambda self: self.pair.target_cfg)
  draft_cfg = property(lambda self: self.pair.draft_cfg)
  target_rules = property(lambda self: self.pair.target_rules)
  mesh = property(lambda self: self.pair.mesh)
  eos_ids = property(lambda self: self.pair.eos_ids)
  pad_id = property(lambda self: self.pair.pad_id)
  draft_source = property(lambda self: self.pair.draft_source)

  def _spec(self, k, top_k, max_new, prompt_len, coupling,
            source: DraftSource) -> decode.LoopSpec:
    # Positions written reach prompt + max_new + k; prompt_len is the padded bucket, so the
    # cache is capped at max_cache_len (already checked against the real prompt lengths).
    max_len = prompt_len + max_new + k + 1 if self.cache_len is None else self.cache_len
    if self.max_cache_len is not None:
      max_len = min(max_len, self.max_cache_len)
    drafting = k and source.uses_model
    return decode.LoopSpec(target=self.target_cfg, k=k, k_max=k, max_top_k=top_k,
                           draft=self.draft_cfg if drafting and not source.uses_assistant
                           else None,
                           assistant=self.draft_cfg if drafting and source.uses_assistant
                           else None,
                           max_len=max_len, out_len=max_new + k, eos_ids=self.eos_ids,
                           pad_id=self.pad_id, coupling=coupling,
                           source=source if k else DraftSource())

  def _compiled(self, spec: decode.LoopSpec, batch: int, prompt_len: int,
                soft_len: int | None = None):
    """The compiled program for one (static spec, batch, prompt bucket, soft tokens per row),
    kept per Sampler."""
    key = (spec, batch, prompt_len, soft_len)
    if key not in self._programs:
      self._programs[key] = self._compile(spec, batch, prompt_len, soft_len)
    return self._programs[key]

  def _compile(self, spec: decode.LoopSpec, batch: int, prompt_len: int,
               soft_len: int | None = None):
    mesh = self.mesh
    tp, dp = self.pair.param_shardings(_reads_draft(spec))
    rows = lambda *shape: sharding.batch_sharding(mesh, shape, self.target_rules)
    rep = sharding.replicated(mesh)
    n = max(spec.k, 1)
    max_new = spec.out_len - spec.k
    # The state lives and dies inside the program (created at prefill, carried by the while
    # loop), so nothing needs donating; the compiler updates it in place.
    d = self.target_cfg.d_model
    draft_images = soft_len is not None and decode.reads_images(spec)
    dd = self.draft_cfg.d_model if draft_images else None
    soft_sharding = None if soft_len is None else rows(batch, soft_len, d)
    draft_soft_sharding = rows(batch, soft_len, dd) if draft_images else None
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    args = (self.target_params, self.draft_params if _reads_draft(spec) else None,
            jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), scalar(jnp.float32), scalar(jnp.float32),
            scalar(jnp.int32), scalar(jnp.uint32),
            None if soft_len is None else jax.ShapeDtypeStruct((batch, soft_len, d),
                                                               self.target_cfg.dtype),
            jax.ShapeDtypeStruct((batch, soft_len, dd), self.draft_cfg.dtype)
            if draft_images else None)
    # The AMX kernel's packing is paid once per call: worth it over a long enough generation.
    kernel = amx.used() if max_new >= amx.MIN_STEPS else contextlib.nullcontext()
    with kernel:
      return program_cache.compiled(
          decode.generate, (spec,), args,
          in_shardings=(tp, dp, rows(batch, 1), rows(batch), rep, rep, rep, rep, soft_sharding,
                        draft_soft_sharding),
          out_shardings=(rows(batch, max_new), rows(batch),
                         decode.Stats(rows(batch), rows(batch), rows(batch, n), rows(batch, n),
                                      rows(batch), rows(batch), rows(batch))),
          compiler_options=self.pair.compiler_options())

  def encode_images(self, images: Sequence) -> np.ndarray:
    """Soft tokens (u j d) of images (anything vision/image.py reads), the encoder compiled
    once per power-of-two count."""
    vision = self.pair.vision()
    pixels = [image_lib.prepare(img, vision.image_size, f"image {i}")
              for i, img in enumerate(images)]
    return self._encode(pixels)

  def _encode(self, pixels: list[np.ndarray], draft: bool = False) -> np.ndarray:
    """Soft tokens (u j d) of prepared images, by the target's encoder or the draft's."""
    n = prompts_lib.bucket(len(pixels), 1)
    key = ("encoder", n, draft)
    cfg, params = ((self.draft_cfg, self.draft_params) if draft else
                   (self.target_cfg, self.target_params))
    if key not in self._programs:
      size = cfg.vision.image_size
      tp, dp = self.pair.param_shardings(draft)
      rows = sharding.batch_sharding(self.mesh, (n, size, size, 3), self.target_rules)
      self._programs[key] = program_cache.compiled(
          _encode_images, (cfg,),
          (params, jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)),
          in_shardings=(dp if draft else tp, rows), compiler_options=self.pair.compiler_options())
    batch = np.zeros((n,) + pixels[0].shape, np.float32)
    batch[:len(pixels)] = pixels
    return to_host(self._programs[key](params, batch))[:len(pixels)]

  def _with_images(self, prompts, images, crop_text=None):
    """(prompts with image blocks laid out, a function of `draft` giving the soft tokens
    (b m d) of the target's encoder or the draft's, or None without images). crop_text (Pan &
    Scan's words as ids): each image becomes [original, crops...] (image.pan_and_scan)."""
    vision = self.pair.vision()
    if len(images) != len(prompts):
      raise ValueError(f"images must hold one list per prompt: {len(images)} lists for "
                       f"{len(prompts)} prompts")
    laid_out, pixels, counts = [], [], []
    for i, (p, row) in enumerate(zip(prompts, images)):
      row = [] if row is None else list(row)
      prompts_lib.token_ids(p, self.target_cfg.num_tokens, f"prompt {i}")
      ids, row = image_prompt.lay_out(p, row, vision, f"prompt {i}", crop_text)
      laid_out.append(ids)
      pixels += [image_lib.prepare(img, vision.image_size, f"prompt {i} image {j}")
                 for j, img in enumerate(row)]
      counts.append(len(row))
    if not pixels:
      return laid_out, None
    width = prompts_lib.bucket(max(counts), 1) * vision.num_soft_tokens
    return laid_out, lambda draft: image_prompt.soft_rows(self._encode(pixels, draft), counts,
                                                          width)

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, k: int = 0,
               sampling: SamplingParams = SamplingParams(), seed: int = 0,
               coupling: str | None = None,
               draft_source: DraftSource | None = None,
               images: Sequence[Sequence] | None = None,
               pan_and_scan: Sequence[Sequence[int]] | None = None) -> Result:
    """Samples max_new_tokens (fewer after EOS) for every prompt. Row i draws from the random
    stream (seed, i): the stream a serving Engine request with seed `seed + i * 2**32` uses.
    coupling: None = the Sampler's. draft_source: where K > 0 rounds get their proposals
    (default: the pair's).

    images: per prompt, a list of images (PIL images, H x W x 3 arrays, encoded bytes or file
    paths; models/vision/image.py), one for each start_of_image token of the prompt, where the
    image goes (a model with a vision encoder only). They are encoded once, before the
    prefill, by the target's encoder and, for a multimodal draft, by the draft's own; a
    text-only draft reads the prompt's ids (the placeholders as padding).

    pan_and_scan: None (off, the default) or Pan & Scan's words as token ids
    (vision/prompt.py's crop_text_ids(tokenizer.encode)): a wide or tall image is then also
    read as up to 4 crops, each an image block of its own after the original's (transformers'
    Gemma3Processor with do_pan_and_scan=True, its default crop settings)."""
    source = self.draft_source if draft_source is None else self.pair.check_source(draft_source)
    sampling.validate()
    coupling = self.coupling if coupling is None else decode.check_coupling(coupling)
    k = integer("k (draft tokens per round)", k, 0)
    max_new_tokens = integer("max_new_tokens", max_new_tokens, 1)
    # Streams take 32-bit seeds; a larger one would alias a smaller one's stream.
    seed = integer("seed", seed, 0, 2**32 - 1)
    if k > 0 and self.draft_cfg is None and source.uses_model:
      raise ValueError(f"k={k} needs a draft model; this Sampler has none (use k=0, or the "
                       "draft kind 'ngram')")
    encode, placeholder = None, None
    if images is not None:
      prompts, encode = self._with_images(prompts, images, pan_and_scan)
      placeholder = self.target_cfg.vision.image_id
    tokens, lengths = prompts_lib.pack(prompts, self.target_cfg.num_tokens, self.pad_id,
                                       placeholder=placeholder)
    prompts_lib.check_fits(int(lengths.max()), max_new_tokens, self.max_cache_len, extra=k + 1)
    top_k = sampling.effective_top_k(self.target_cfg.num_tokens)
    spec = self._spec(k, top_k, max_new_tokens, tokens.shape[1], coupling, source)
    soft = None if encode is None else encode(False)
    draft_soft = encode(True) if encode is not None and decode.reads_images(spec) else None
    compiled = self._compiled(spec, *tokens.shape, None if soft is None else soft.shape[1])
    # Host arrays, the same on every process: with several processes jit places on each one's
    # devices the rows they hold along the mesh's data axis.
    args = (self.target_params, self.draft_params if _reads_draft(spec) else None, tokens,
            lengths,
            np.float32(sampling.temperature), np.float32(sampling.top_p), np.int32(top_k),
            np.uint32(seed), soft, draft_soft)
    start = time.perf_counter()
    out, num, stats = jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    out, num, stats = to_host((out, num, stats))
    n = max(k, 1)
    return Result(tokens=[out[i, :num[i]].tolist() for i in range(len(prompts))],
                  rounds=stats.rounds_b, accepted=stats.accepted_b,
                  reached=stats.reached_bn[:, :n], accepted_at=stats.accepted_bn[:, :n], k=k,
                  seconds=seconds, ngram_judged=stats.ngram_judged_b,
                  ngram_accepted=stats.ngram_accepted_b, draft_kind=spec.source.kind)


def _encode_images(cfg: ModelConfig, params, images):
  return model.encode_images(params, cfg, images)


def _reads_draft(spec: decode.LoopSpec) -> bool:
  """The program takes the draft's params (a draft model's or an assistant's)."""
  return spec.draft is not None or spec.assistant is not None


def to_host(tree):
  """Program outputs as numpy on every process (gathered when rows live on other processes)."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
