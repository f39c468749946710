"""The one schema every config in this directory fills in (not a runnable config itself).

    model.*     the target: where its weights come from and how it is sharded
      preset        name in spec_tpu.models.config.PRESETS ('' = `fields` give the whole ModelConfig)
      fields.*      ModelConfig fields that override the preset, e.g. --config.model.fields.num_layers=2
      fields.vision.*  VisionConfig fields that override the preset's image encoder, e.g. the
                    image block's token ids (start_id, end_id, image_id, newline_id) of a
                    Gemma 3 variant with another tokenizer
      checkpoint    spec_tpu checkpoint directory ('' = none); a checkpoint carries its own
                    ModelConfig, so preset and fields describe the random-weight fallback (and
                    the plan); only valid_vocab_size, tokenizer and dtype (float leaves cast
                    as they load) also apply over a checkpoint
      allow_random  no checkpoint (or a missing one) -> random weights with a loud warning;
                    False makes that an error raised before anything compiles
      rules         sharding rule set: tensor_parallel | replicated
      quantize      '' = the weights as stored (a checkpoint converted or saved in int8 loads
                    as int8 with no option), 'int8' = int8 weights with per-output-channel
                    scales (spec_tpu/models/quant.py), quantized while a float checkpoint loads
      tokenizer     a tokenizer.model or tokenizer.json path, a converted checkpoint's directory
                    (its tokenizer/), 'bytes', or '' (then text prompts cannot be encoded)
    draft.*     the same fields for the draft (preset '' and checkpoint '' = no draft model), and
      kind          where proposals come from: 'model' (the draft model; none: engine.k must be
                    0), 'ngram' (prompt lookup in the row's own tokens: no draft model, none
                    loaded), 'hybrid' (n-gram where the lookup matches, the draft model
                    continuing it and elsewhere), 'assistant' (a Gemma 4 assistant drafter,
                    converted from Gemma4AssistantForCausalLM, reading the target's caches;
                    preset a name in ASSISTANT_PRESETS), 'auto' (the K policy picks model,
                    ngram or hybrid per step with K, from each one's measured acceptance and
                    round cost; needs the draft model and engine.adaptive_k);
                    spec_tpu/decoding/draft_source.py
      ngram_max, ngram_min  suffix lengths the lookup tries, longest first
      greedy        kind 'assistant': propose its argmax (one-hot) instead of a sample
    sampling.*  what each request samples: temperature (0 = greedy), top_p, top_k (0 = off),
                max_new_tokens, seed; coupling: 'gumbel' (a seed gives the same tokens
                whatever K, the draft, the batch or a resume) or 'rejection' (the most
                accepted drafts; a seed reproduces only at the same K per round), both exact
                (spec_tpu/decoding/decode.py), one for the whole engine
    engine.*    the serving engine every launcher runs (sample, serve, serve_bench; checked by
                spec_tpu.setup.engine_settings, built by spec_tpu.setup.build_engine):
                k (draft tokens per round, 0 = autoregressive), adaptive_k (K per step from
                the measured acceptance and round times, starting at k, among 0, k and powers
                of two up to k_max; spec_tpu/decoding/k_policy.py), k_max, calibrate (time
                every K the policy may pick before serving; launch.sample always calibrates an
                adaptive engine), num_slots (the batch), max_len (context per slot: prompt +
                new tokens + k_max + 1; 0 = what the prompts need for sample and serve_bench,
                1024 for serve), rounds_per_step (N; 0 = chosen from measured times),
                max_rounds_per_step, max_top_k (largest per-request top_k launch.serve
                accepts; sample and serve_bench run sampling.top_k), prefill_rows (requests
                per insert call); what launch.serve's requests may ask beyond the filters
                (sample and serve_bench run without them): logprobs_k (the most `logprobs` /
                `top_logprobs` alternatives: a top-k search over the vocabulary at every
                verified position; 0 = only the tokens' own logprobs), controls (presence,
                frequency and repetition penalties, min_p and logit_bias: token counts per
                slot and a penalty pass at every drafted position; single-process engines
                only, off on a multi-host one), max_logit_bias (logit_bias entries per request),
                grammar_states (structured output: the most automaton states of a request's
                JSON schema or regex; 0 = off; docs/structured.md), grammar_classes (the most
                token classes of one: tokens that act alike in every state share a column),
                grammar_masks (the most distinct allowed sets of one, each a bit per token;
                0 = grammar_states),
                grammar_tables (grammars held on device at once, each a states x classes
                int32 table, a class per token and its masks, shared by the slots using it;
                0 = one per slot)
    mesh.*      shape (data, model), -1 = every device not used by the other axis;
                multihost: call jax.distributed.initialize() first (pods; see launch/sample.py)
    run.*       prompts (text), add_bos, compare_ar (also run k=0 and report the speedup),
                prompt_len (synthetic prompts for benchmark/plan when there is no tokenizer),
                compile_cache (JAX's persistent compilation cache directory for sample,
                serve, benchmark and plan; '' = off; a local path, or gs://... shared by a pod),
                pan_and_scan (Gemma 3 images: a wide or tall image is also read as up to 4
                crops; launch.sample's JSONL images, the server's default for chat images,
                benchmark --images; off by default)
    serve.*     launch.serve's HTTP front end: model_name (the name it answers to; '' = the
                target's), api_key (clients must send it as a bearer token; '' = none, unless
                --api_key or SPEC_TPU_API_KEY gives one), max_queue (requests waiting for a
                slot; more get 503 + Retry-After; 0 = unbounded), max_body_bytes (larger
                request bodies get 413), request_timeout_s (a request still running after
                this is cancelled, 504; 0 = no limit), fetch_image_urls (chat image_url parts
                may name http(s) URLs, which the server downloads; off = refused),
                fetch_private_hosts (also from loopback, private, link-local and reserved
                addresses: the server's own network; off = public hosts only),
                fetch_timeout_s and fetch_max_bytes (each download's limits)

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


def _placeholders(cls, values: dict, nested=None) -> ml_collections.ConfigDict:
  """One typed placeholder per field of dataclass `cls`, set where `values` gives one; a field
  named in `nested` (name -> dataclass) holds that dataclass's placeholders in turn."""
  nested = nested or {}
  known = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(values) - set(known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
  fields = ml_collections.ConfigDict()
  for name, field in known.items():
    if name in nested:
      fields[name] = _placeholders(nested[name], values.get(name) or {})
      continue
    fields[name] = config_dict.placeholder(_field_type(field))
    if name in values:
      fields[name] = values[name]
  return fields


def model_fields(**values) -> ml_collections.ConfigDict:
  """One typed placeholder per ModelConfig field (None = take the preset's value), so any field
  can be overridden from the command line and a misspelt one is an error; `vision` holds one
  per VisionConfig field (vision=dict(...) sets some), applied over the preset's encoder."""
  return _placeholders(config_lib.ModelConfig, values, {"vision": config_lib.VisionConfig})


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
                  greedy: bool = False, **model) -> ml_collections.ConfigDict:
  """A model section plus where proposals come from (draft.kind, the n-gram sizes and the
  assistant's greedy option)."""
  s = model_section(**model)
  s.kind, s.ngram_max, s.ngram_min, s.greedy = kind, ngram_max, ngram_min, greedy
  return s


def base(num_slots: int = 8, **run) -> ml_collections.ConfigDict:
  """Every key of the schema with a neutral default; config files change what they need."""
  c = ml_collections.ConfigDict()
  c.model = model_section()
  c.draft = draft_section()
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64, seed=0,
      coupling="gumbel"))
  c.engine = ml_collections.ConfigDict(dict(
      k=4, adaptive_k=False, k_max=8, calibrate=True, num_slots=8, max_len=0,
      rounds_per_step=0, max_rounds_per_step=16, max_top_k=64, prefill_rows=1,
      logprobs_k=5, controls=True, max_logit_bias=300, grammar_states=0,
      grammar_classes=1024, grammar_masks=0, grammar_tables=0))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1), multihost=False))
  c.run = ml_collections.ConfigDict(dict(
      prompts=(), add_bos=True, compare_ar=False, prompt_len=128,
      compile_cache=DEFAULT_COMPILE_CACHE, pan_and_scan=False))
  c.run.update(run)
  c.engine.num_slots = num_slots
  c.serve = ml_collections.ConfigDict(dict(
      model_name="", api_key="", max_queue=256, max_body_bytes=8 << 20,
      request_timeout_s=600.0, fetch_image_urls=False, fetch_private_hosts=False,
      fetch_timeout_s=10.0, fetch_max_bytes=32 << 20))
  return c
