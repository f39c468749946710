"""The one schema every config in this directory fills in (not a runnable config itself).

    model.*     the target: where its weights come from and how it is sharded
      preset        name in spec_tpu.models.config.PRESETS ('' = `fields` give the whole ModelConfig)
      fields.*      ModelConfig fields that override the preset, e.g. --config.model.fields.num_layers=2
      checkpoint    spec_tpu checkpoint directory ('' = none); a checkpoint carries its own
                    ModelConfig, so preset and fields describe the random-weight fallback (and
                    the plan); only valid_vocab_size and tokenizer also apply over a checkpoint
      allow_random  no checkpoint (or a missing one) -> random weights with a loud warning;
                    False makes that an error raised before anything compiles
      rules         sharding rule set: tensor_parallel | replicated
      quantize      '' = the weights as stored (a checkpoint converted or saved in int8 loads
                    as int8 with no option), 'int8' = int8 weights with per-output-channel
                    scales (spec_tpu/models/quant.py), quantized while a float checkpoint loads
      tokenizer     sentencepiece model path, 'bytes', or '' (then text prompts cannot be encoded)
    draft.*     the same fields for the draft (preset '' and checkpoint '' = no draft model), and
      kind          where proposals come from: 'model' (the draft model), 'ngram' (prompt lookup
                    in the row's own tokens: no draft model, none loaded), 'hybrid' (n-gram
                    where the lookup matches, the draft model elsewhere); see
                    spec_tpu/decoding/draft_source.py
      ngram_max, ngram_min  suffix lengths the lookup tries, longest first
    sampling.*  k (draft tokens per round, 0 = autoregressive), temperature (0 = greedy), top_p,
                top_k (0 = off), max_new_tokens, seed; adaptive_k: launch.sample's engine
                chooses K per step (0 = speculation off) from the measured acceptance and
                round times, starting at k and never above k_max (spec_tpu/decoding/k_policy.py)
    mesh.*      shape (data, model), -1 = every device not used by the other axis;
                multihost: call jax.distributed.initialize() first (pods; see launch/sample.py)
    run.*       batch_size (launch.sample: the engine's slots), prompts (text), add_bos,
                compare_ar (also run k=0 and report the speedup), max_cache_len (launch.sample:
                a slot's context; 0 = just what the prompts and new tokens need),
                prompt_len (synthetic prompts for benchmark/plan when there is no tokenizer),
                compile_cache (JAX's persistent compilation cache directory for sample,
                serve, benchmark and plan; '' = off; a local path, or gs://... shared by a pod)
    serve.*     the serving engine (launch/serve.py, launch/serve_bench.py; launch.sample takes
                rounds_per_step, max_rounds_per_step and prefill_rows from here; see
                spec_tpu/serving/engine.py): num_slots (the batch), max_len (context per slot:
                prompt + new tokens + k_max + 1), adaptive_k (K per step from measured a and c,
                0..sampling.k_max, starting at sampling.k; False: always sampling.k),
                calibrate (time every K the policy may pick, 0, sampling.k and powers of two
                up to sampling.k_max, before serving), rounds_per_step
                (N; 0 = chosen from measured times), max_rounds_per_step, max_top_k (largest
                per-request top_k), prefill_rows (requests per insert call), model_name
                ('' = the target's name)

Configs are plain data: nothing here imports JAX or reads a file, so loading one is instant and
`--config.x.y=v` overrides of a name that is not in the schema fail before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from spec_tpu.models import config as config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A second run of a setup loads its compiled programs from here (a 70B decode program takes
# tens of seconds to compile, and every prompt bucket and K is another program).
DEFAULT_COMPILE_CACHE = "~/.cache/spec_tpu/jax"
ASSETS_DIR = os.path.join(REPO_ROOT, "spec_tpu", "assets")


def _field_type(field: dataclasses.Field) -> type:
  # Annotations are strings (postponed evaluation); the schema only needs the scalar kind.
  ann = str(field.type)
  for name, kind in (("tuple", tuple), ("bool", bool), ("float", float), ("int", int)):
    if ann.startswith(name) or f"{name} |" in ann or f"| {name}" in ann:
      return kind
  return str


def model_fields(**values) -> ml_collections.ConfigDict:
  """One typed placeholder per ModelConfig field (None = take the preset's value), so any field
  can be overridden from the command line and a misspelt one is an error."""
  known = {f.name: f for f in dataclasses.fields(config_lib.ModelConfig)}
  unknown = set(values) - set(known)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
  fields = ml_collections.ConfigDict()
  for name, field in known.items():
    fields[name] = config_dict.placeholder(_field_type(field))
    if name in values:
      fields[name] = values[name]
  return fields


def model_section(preset: str = "", checkpoint: str = "", allow_random: bool = False,
                  rules: str = "tensor_parallel", tokenizer: str = "", quantize: str = "",
                  **fields) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.preset = preset
  s.fields = model_fields(**fields)
  s.checkpoint = checkpoint
  s.allow_random = allow_random
  s.rules = rules
  s.tokenizer = tokenizer
  s.quantize = quantize
  return s


def draft_section(kind: str = "model", ngram_max: int = 4, ngram_min: int = 2,
                  **model) -> ml_collections.ConfigDict:
  """A model section plus where proposals come from (draft.kind and the n-gram sizes)."""
  s = model_section(**model)
  s.kind, s.ngram_max, s.ngram_min = kind, ngram_max, ngram_min
  return s


def base(**run) -> ml_collections.ConfigDict:
  """Every key of the schema with a neutral default; config files change what they need."""
  c = ml_collections.ConfigDict()
  c.model = model_section()
  c.draft = draft_section()
  c.sampling = ml_collections.ConfigDict(dict(
      k=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64, seed=0,
      adaptive_k=False, k_max=8))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1), multihost=False))
  c.run = ml_collections.ConfigDict(dict(
      batch_size=1, prompts=(), add_bos=True, compare_ar=False, max_cache_len=0,
      prompt_len=128, compile_cache=DEFAULT_COMPILE_CACHE))
  c.run.update(run)
  c.serve = ml_collections.ConfigDict(dict(
      num_slots=8, max_len=1024, adaptive_k=True, calibrate=True, rounds_per_step=0,
      max_rounds_per_step=16, max_top_k=64, prefill_rows=1, model_name=""))
  return c
