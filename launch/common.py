"""Glue from a config (configs/common.py schema) to library objects, shared by the launchers:
model configs, checkpoints or random weights, the mesh, the tokenizer, the Sampler.

Everything that can fail on user input is checked in `resolve` before any weights are read or
any program compiles, so a typo costs seconds, not a 70B compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from launch import cli
from spec_tpu.checkpoints import checkpoint
from spec_tpu.models import config as config_lib, model, quant
from spec_tpu import sharding
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.decoding.sampling import SamplingParams


class SetupError(cli.UserError):
  """The config or the files it names cannot work; raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  cfg: config_lib.ModelConfig
  checkpoint: str | None   # None: random weights
  rules: sharding.Rules
  role: str                # "target" | "draft"
  # The checkpoint holds float weights and cfg.quantize names the form to serve: quantized
  # leaf by leaf as they are read (load_params).
  quantize_on_load: bool = False

  @property
  def random(self) -> bool:
    return self.checkpoint is None

  def describe(self) -> str:
    src = self.checkpoint or "RANDOM WEIGHTS (no checkpoint)"
    form = (f", {self.cfg.quantize} weights" + (" (quantized on load)" if self.quantize_on_load
                                                 else "")) if self.cfg.quantize else ""
    return (f"{self.role} {self.cfg.name} ({self.cfg.num_params() / 1e6:,.1f}M params{form}) "
            f"from {src}")


@dataclasses.dataclass(frozen=True)
class Setup:
  target: ModelSetup
  draft: ModelSetup | None
  sampling: SamplingParams
  k: int
  draft_source: DraftSource = DraftSource()

  @property
  def any_random(self) -> bool:
    return self.target.random or (self.draft is not None and self.draft.random)


# ---------------------------------------------------------------- config -> model configs

def _fields(section) -> dict[str, Any]:
  out = {}
  for name, value in section.fields.items():
    if value is not None:
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


# ModelConfig fields a config may set on top of a checkpoint's own config (no param shape changes).
CHECKPOINT_OVERRIDABLE = ("valid_vocab_size", "tokenizer")


def _model_setup(section, role: str, *, need_weights: bool) -> ModelSetup | None:
  """The ModelConfig for one section; checks that its checkpoint exists when weights are needed."""
  if section.rules not in sharding.RULE_SETS:
    raise SetupError(f"{role}.rules must be one of {sorted(sharding.RULE_SETS)}, "
                     f"got {section.rules!r}")
  rules = sharding.RULE_SETS[section.rules]
  try:
    quantize = quant.check_mode(section.quantize)
  except ValueError as e:
    raise SetupError(f"{role}: {e}") from None
  path = section.checkpoint
  fields = _fields(section)
  if not path and not section.preset and not fields:
    return None  # no such model (only meaningful for the draft)
  if path and os.path.isdir(path):
    try:
      cfg = checkpoint.load_config(path)  # manifest + config file only: cheap
    except checkpoint.CheckpointError as e:
      raise SetupError(str(e)) from None
    # The checkpoint's shapes win; fields that leave every param shape alone still apply.
    neutral = {k: v for k, v in fields.items() if k in CHECKPOINT_OVERRIDABLE}
    if neutral.get("tokenizer", cfg.tokenizer) != cfg.tokenizer:
      logging.warning("%s: checkpoint %s records tokenizer %r; using %r instead, as "
                      "%s.fields.tokenizer says", role, path, cfg.tokenizer, neutral["tokenizer"],
                      _section_name(role))
    if neutral:
      try:
        cfg = cfg.replace(**neutral)
      except ValueError as e:
        raise SetupError(f"{role}: {e}") from None
    if section.preset or set(fields) - set(neutral):
      logging.info("%s: checkpoint %s carries its own config; preset and shape fields ignored",
                   role, path)
    # A stored int8 checkpoint stays int8 with no option; a float one is quantized on request.
    on_load = bool(quantize) and cfg.quantize is None
    if on_load:
      try:
        cfg = cfg.replace(quantize=quantize)
      except ValueError as e:
        raise SetupError(f"{role}: checkpoint {path}: {e}") from None
    elif quantize and cfg.quantize != quantize:
      raise SetupError(f"{role}: checkpoint {path} is stored {cfg.quantize}; it cannot be "
                       f"served as {quantize}")
    return ModelSetup(cfg, os.path.abspath(path), rules, role, quantize_on_load=on_load)
  if need_weights and not section.allow_random:
    problem = f"checkpoint {path!r} does not exist" if path else "no checkpoint given"
    raise SetupError(f"{role}: {problem}; set --config.{_section_name(role)}.checkpoint=DIR "
                     f"(or --config.{_section_name(role)}.allow_random=True for random weights)")
  try:
    base = config_lib.get_preset(section.preset) if section.preset else None
    cfg = base.replace(**fields) if base else config_lib.ModelConfig(**fields)
    if quantize:
      cfg = cfg.replace(quantize=quantize)  # random weights are made, then quantized
  except (KeyError, TypeError, ValueError) as e:
    raise SetupError(f"{role}: bad model config: {e}") from None
  if need_weights:
    logging.warning("%s %s: %s; using RANDOM WEIGHTS (allow_random=True): outputs are noise",
                    role, cfg.name, f"checkpoint {path} not found" if path else "no checkpoint")
  return ModelSetup(cfg, None, rules, role)


def _section_name(role: str) -> str:
  return "model" if role == "target" else "draft"


def resolve(config, *, need_weights: bool = True, k: int | None = None) -> Setup:
  """Model configs and sampling options from a config; raises SetupError on anything wrong."""
  target = _model_setup(config.model, "target", need_weights=need_weights)
  if target is None:
    raise SetupError("model: give model.checkpoint or model.preset")
  source = draft_source(config.draft)
  # n-gram drafting loads no draft model, whatever the section names.
  draft = (_model_setup(config.draft, "draft", need_weights=need_weights) if source.uses_model
           else None)
  k = int(config.sampling.k if k is None else k)
  if k < 0:
    raise SetupError(f"sampling.k must be >= 0, got {k}")
  if (k > 0 or source.kind == "hybrid") and source.uses_model and draft is None:
    raise SetupError(f"draft.kind={source.kind!r} with sampling.k={k} needs a draft "
                     "(draft.checkpoint or draft.preset); use --config.draft.kind=ngram for "
                     "drafts without a model, or --config.sampling.k=0 for autoregressive "
                     "sampling")
  if draft is not None:
    from spec_tpu.decoding import sampler as sampler_lib
    try:
      sampler_lib.check_pair(target.cfg, draft.cfg)
    except ValueError as e:
      raise SetupError(str(e)) from None
  s = config.sampling
  try:
    params = SamplingParams(temperature=float(s.temperature), top_k=int(s.top_k),
                            top_p=float(s.top_p)).validate()
  except ValueError as e:
    raise SetupError(f"sampling: {e}") from None
  if int(s.max_new_tokens) <= 0:
    raise SetupError(f"sampling.max_new_tokens must be positive, got {s.max_new_tokens}")
  if int(s.seed) < 0:
    raise SetupError(f"sampling.seed must be >= 0, got {s.seed}")
  _check_serve(config.serve)
  return Setup(target=target, draft=draft, sampling=params, k=k, draft_source=source)


def draft_source(section) -> DraftSource:
  """draft.kind and the n-gram sizes (configs without them draft with the model)."""
  try:
    return DraftSource(str(section.get("kind", "model")), int(section.get("ngram_max", 4)),
                       int(section.get("ngram_min", 2)))
  except ValueError as e:
    raise SetupError(f"draft: {e}") from None


def _check_serve(serve) -> None:
  """The engine's settings (launch.sample and launch.serve build one from them)."""
  for name in ("prefill_rows", "max_rounds_per_step"):
    if int(serve[name]) < 1:
      raise SetupError(f"serve.{name} must be >= 1, got {serve[name]}")
  if not 0 <= int(serve.rounds_per_step) <= int(serve.max_rounds_per_step):
    raise SetupError(f"serve.rounds_per_step must be 0 (paced by measured time) or 1.."
                     f"serve.max_rounds_per_step={serve.max_rounds_per_step}, got "
                     f"{serve.rounds_per_step}")
  if int(serve.max_top_k) < 0:
    raise SetupError(f"serve.max_top_k must be >= 0, got {serve.max_top_k}")


def pyplot(path: str):
  """matplotlib.pyplot for a benchmark's plot at `path`, or None (logged) when matplotlib is
  not installed: the results and tables do not need it."""
  try:
    import matplotlib
  except ImportError:
    logging.warning("no plot %s: matplotlib is not installed (pip install -e '.[bench]')", path)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def with_quantize(config, mode: str | None):
  """The config with both models' weights in form `mode` (a --quantize value of the plan and
  benchmark launchers): None leaves it unchanged, 'none' asks for float, 'int8' for int8."""
  if mode is None:
    return config
  if mode not in ("none",) + quant.MODES:
    raise SetupError(f"--quantize takes none or one of {quant.MODES}, got {mode!r}")
  config = config.copy_and_resolve_references()
  config.model.quantize = config.draft.quantize = "" if mode == "none" else mode
  return config


# ---------------------------------------------------------------- mesh

def mesh_shape(shape, num_devices: int) -> tuple[int, int]:
  """(data, model) with at most one -1, filled from the device count."""
  shape = tuple(int(x) for x in shape)
  if len(shape) != 2:
    raise SetupError(f"mesh.shape must be (data, model), got {shape}")
  if shape.count(-1) > 1 or any(x == 0 or x < -1 for x in shape):
    raise SetupError(f"mesh.shape {shape}: sizes must be positive, at most one -1")
  if -1 in shape:
    known = abs(np.prod(shape))  # product of the other axis
    if num_devices % known:
      raise SetupError(f"mesh.shape {shape}: {num_devices} devices do not divide by {known}")
    shape = tuple(num_devices // known if x == -1 else x for x in shape)
  if np.prod(shape) != num_devices:
    raise SetupError(f"mesh.shape {shape} needs {np.prod(shape)} devices, there are "
                     f"{num_devices} ({jax.devices()[0].platform}); on CPU set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  return shape


def build_mesh(config):
  return sharding.make_mesh(mesh_shape(config.mesh.shape, jax.device_count()))


# ---------------------------------------------------------------- persistent compilation cache

_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}
compile_cache_counts = {"hits": 0, "misses": 0}  # this process's lookups since use_compile_cache
_listening = []


def _count_cache_event(event: str, **_) -> None:
  if event in _CACHE_EVENTS:
    compile_cache_counts[_CACHE_EVENTS[event]] += 1


def use_compile_cache(config) -> str | None:
  """Turns on JAX's persistent compilation cache in config.run.compile_cache ('' = off), before
  anything compiles; JAX_COMPILATION_CACHE_DIR, when set, names the directory instead. Returns
  the directory in use, or None.

  A compiled decode program is stored under a key of its HLO, devices, compiler options and
  versions, so a second run of the same setup (same shapes, K, topology) loads it instead of
  compiling. Only process 0 of a multi-host job writes entries; every process reads them, so a
  pod shares one directory that all hosts can read (README: sharing the cache on a pod).
  """
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(config.run.compile_cache or "")
  if not path:
    return None
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_compilation_cache_dir", path)
  if not _listening:
    jax.monitoring.register_event_listener(_count_cache_event)
    _listening.append(True)
  return path


def compile_cache_summary(path: str | None) -> str:
  if path is None:
    return "persistent compilation cache off (run.compile_cache is empty)"
  c = compile_cache_counts
  return f"compilation cache {path}: {c['hits']} programs loaded, {c['misses']} compiled and stored"


# ---------------------------------------------------------------- multi-host

def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """jax.distributed.initialize(); with no arguments it finds the pod/cluster by itself."""
  kw = {}
  if coordinator_address:
    kw.update(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id)
  jax.distributed.initialize(**kw)


def all_agree(ok: bool) -> bool:
  """Process 0's verdict on every process, so they all stop together (none waits forever)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def broadcast(x: np.ndarray) -> np.ndarray:
  """Process 0's array on every process."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


# ---------------------------------------------------------------- weights

def _seed(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def load_params(m: ModelSetup, mesh):
  """Params placed on their shardings: restored shard by shard, or random (with a warning)."""
  if m.checkpoint is not None and m.quantize_on_load:
    stored = m.cfg.replace(quantize=None)
    to = quant.leaf_quantizer(sharding.param_logical_axes(stored), embed=m.cfg.tie_embeddings,
                              out_shardings=sharding.param_shardings(m.cfg, mesh, m.rules),
                              delete_source=True)
    params, _ = checkpoint.restore_transformed(
        m.checkpoint, shardings=sharding.param_shardings(stored, mesh, m.rules), transform=to)
    return params
  if m.checkpoint is not None:
    abstract = jax.eval_shape(lambda: model.init_params(m.cfg, jax.random.key(0)))
    shardings = sharding.param_shardings(m.cfg, mesh, m.rules, abstract)
    params, _ = checkpoint.restore(m.checkpoint, shardings=shardings)
    return params
  shardings = sharding.param_shardings(m.cfg, mesh, m.rules)
  # Initialised in place: no host copy, and every process computes the same values from the
  # same key (the key depends on the role and name only).
  init = jax.jit(lambda key: model.init_params(m.cfg, key), out_shardings=shardings)
  return init(jax.random.key(_seed(f"{m.role}:{m.cfg.name}")))


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(config, setup: Setup):
  """The target's tokenizer (None if the config names none); its ids must fit both models."""
  spec = config.model.tokenizer
  if not spec:
    return None
  from spec_tpu import tokenizer as tokenizer_lib
  try:
    tok = tokenizer_lib.load(spec)
  except (OSError, ValueError, RuntimeError) as e:
    raise SetupError(f"model.tokenizer {spec!r}: {e}") from None
  if config.draft.tokenizer and config.draft.tokenizer != spec:
    raise SetupError(f"draft.tokenizer {config.draft.tokenizer!r} differs from model.tokenizer "
                     f"{spec!r}: speculative sampling needs one vocabulary")
  models = [m for m in (setup.target, setup.draft) if m is not None]
  check_tokenizer_matches(models, tok, spec)
  for m in models:
    if tok.vocab_size > m.cfg.num_tokens:
      raise SetupError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but {m.role} "
                       f"{m.cfg.name} only {m.cfg.num_tokens}")
  return tok


def _verifiable(name: str) -> bool:
  # Names spec_tpu.tokenizer gives: "sp:<hash of the model file>" and "bytes". Others ("gemma",
  # or "json:..." from a converted tokenizer.json) say which vocabulary, not which file.
  return name.startswith("sp:") or name == "bytes"


def check_tokenizer_matches(models: list[ModelSetup], tok, spec: str) -> None:
  """Weights from a checkpoint decode correctly only with the tokenizer they were trained with:
  any other vocabulary runs without an error and prints garbage. The user may still say, through
  a model's `fields.tokenizer`, that they mean another one (the checkpoint's record then reads
  as that name)."""
  wrong = []
  for m in models:
    recorded = m.cfg.tokenizer
    if m.checkpoint is None or not recorded or recorded == tok.name:
      continue
    if _verifiable(recorded) or _verifiable(tok.name):
      wrong.append(m)
    else:
      logging.warning("%s checkpoint %s names tokenizer %r, which cannot be compared with %r "
                      "(%s): make sure they are the same vocabulary", m.role, m.checkpoint,
                      recorded, tok.name, spec)
  if wrong:
    given = f"{spec!r}" + (f" ({tok.name})" if tok.name != spec else "")
    made = "; ".join(f"{m.role} {m.checkpoint}: {m.cfg.tokenizer!r}" for m in wrong)
    overrides = " ".join(f"--config.{_section_name(m.role)}.fields.tokenizer={tok.name}"
                         for m in wrong)
    raise SetupError(f"model.tokenizer {given} is not the tokenizer the checkpoint was made "
                     f"with ({made}): token ids would decode into garbage. Give that tokenizer, "
                     f"or, if you mean it, {overrides}")


# ---------------------------------------------------------------- sampler

def build_sampler(setup: Setup, mesh, *, eos_id: int | None, pad_id: int = 0,
                  max_cache_len: int = 0, use_draft: bool = True, cache_len: int = 0):
  from spec_tpu.decoding import sampler as sampler_lib
  target_params = load_params(setup.target, mesh)
  draft = setup.draft if use_draft else None
  draft_params = load_params(draft, mesh) if draft is not None else None
  return sampler_lib.Sampler(
      target_params, setup.target.cfg, mesh=mesh, draft_params=draft_params,
      draft_cfg=draft.cfg if draft else None, target_rules=setup.target.rules,
      draft_rules=draft.rules if draft else sharding.TENSOR_PARALLEL, eos_id=eos_id,
      pad_id=pad_id, max_cache_len=max_cache_len or None, cache_len=cache_len or None,
      draft_source=setup.draft_source if draft is not None or not setup.draft_source.uses_model
      else DraftSource())


def ideal_speedup(a: float, c: float, k: int) -> float:
  """Leviathan et al. 2023, Thm 3.8: (1 - a^(K+1)) / ((1 - a)(K c + 1)); 1 at K = 0 and NaN
  where the acceptance rate is undefined (no draft token was judged)."""
  from spec_tpu.decoding import k_policy
  if k == 0:
    return 1.0
  if not (math.isfinite(a) and math.isfinite(c)):
    return float("nan")
  return k_policy.expected_speedup(a, c, k)


def synthetic_prompts(batch: int, length: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
  """Random token prompts for benchmarks and plans when there is no tokenizer."""
  rng = np.random.default_rng(seed)
  return rng.integers(4, num_tokens, size=(batch, length)).tolist()


def finite(x):
  """A result tree as strict JSON takes it: NaN and infinities become None (null), keys str."""
  if isinstance(x, dict):
    return {str(k): finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_results(output_dir: str, result: dict, table: str) -> None:
  """A benchmark's results.json and table.txt in output_dir; the table also to stdout."""
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(finite(result), f, indent=1, default=list)
  with open(os.path.join(output_dir, "table.txt"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)
