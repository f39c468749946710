"""From a config (configs/common.py's schema) to a Pair and an Engine: model configs resolved,
checkpoints restored (quantized on load if asked) or random weights made, all placed on a mesh.

    setup = resolve(config)                      # cheap: every user mistake fails here
    pair = load_pair(config, setup)               # weights read, sharded onto the mesh
    engine = build_engine(pair, engine_settings(config), seed=..., add_bos=...)

Everything that can fail on user input is checked in `resolve` (and `engine_settings`) before
any weights are read or any program compiles, so a typo costs seconds, not a 70B compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from spec_tpu import sharding
from spec_tpu.checkpoints import checkpoint
from spec_tpu.decoding import decode
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import config as config_lib, model, quant
from spec_tpu.pair import Pair, check_pair


class SetupError(ValueError):
  """The config or the files it names cannot work; raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  cfg: config_lib.ModelConfig | config_lib.AssistantConfig  # the latter: a Gemma 4 assistant
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
  coupling: str = "rejection"
  draft_source: DraftSource = DraftSource()

  @property
  def any_random(self) -> bool:
    return self.target.random or (self.draft is not None and self.draft.random)


# ---------------------------------------------------------------- config -> model configs

def _fields(section) -> dict[str, Any]:
  """The fields a section sets; `vision` as a dict of the VisionConfig fields it sets."""
  out = {}
  for name, value in section.fields.items():
    if hasattr(value, "items"):  # a nested section (ConfigDict)
      value = {k: v for k, v in value.items() if v is not None} or None
    if value is not None:
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def _with_vision(base, fields: dict[str, Any]) -> dict[str, Any]:
  """`fields` with its vision overrides applied over the base config's encoder (a config with
  no preset: over Gemma 3's)."""
  if "vision" not in fields:
    return fields
  if base is not None and base.vision is None:
    raise ValueError(f"fields.vision sets {sorted(fields['vision'])}, but preset {base.name!r} "
                     "has no vision encoder (e.g. a *_vision preset has)")
  vision = base.vision if base is not None else config_lib.VisionConfig()
  return dict(fields, vision=vision.replace(**fields["vision"]))


# ModelConfig fields a config may set on top of a checkpoint's own config (no param shape changes).
# dtype: float leaves are cast as they load, and activations follow (e.g. a small bfloat16
# checkpoint served in float32, so that differently shaped calls cannot round a near-tie apart).
CHECKPOINT_OVERRIDABLE = ("valid_vocab_size", "tokenizer", "dtype")


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
                      section_name(role))
    if neutral:
      try:
        cfg = cfg.replace(**neutral)
      except ValueError as e:
        raise SetupError(f"{role}: {e}") from None
    if section.preset or set(fields) - set(neutral):
      logging.info("%s: checkpoint %s carries its own config; preset and shape fields ignored",
                   role, path)
    return _checkpoint_setup(path, cfg, rules, role, quantize)
  if need_weights and not section.allow_random:
    problem = f"checkpoint {path!r} does not exist" if path else "no checkpoint given"
    raise SetupError(f"{role}: {problem}; set --config.{section_name(role)}.checkpoint=DIR "
                     f"(or --config.{section_name(role)}.allow_random=True for random weights)")
  try:
    base = config_lib.get_preset(section.preset) if section.preset else None
    fields = _with_vision(base, fields)
    cfg = base.replace(**fields) if base else config_lib.ModelConfig(**fields)
    if quantize:
      cfg = cfg.replace(quantize=quantize)  # random weights are made, then quantized
  except (KeyError, TypeError, ValueError) as e:
    raise SetupError(f"{role}: bad model config: {e}") from None
  if need_weights:
    logging.warning("%s %s: %s; using RANDOM WEIGHTS (allow_random=True): outputs are noise",
                    role, cfg.name, f"checkpoint {path} not found" if path else "no checkpoint")
  return ModelSetup(cfg, None, rules, role)


def _checkpoint_setup(path: str, cfg, rules, role: str, quantize: str | None) -> ModelSetup:
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


def from_checkpoint(path: str, role: str = "target", *, rules: sharding.Rules =
                    sharding.TENSOR_PARALLEL, quantize: str | None = None) -> ModelSetup:
  """One model from a spec_tpu checkpoint directory (its config only is read here), served as
  stored or, with quantize='int8', quantized while it loads."""
  try:
    cfg = checkpoint.load_config(path)
    quantize = quant.check_mode(quantize or "")
  except (checkpoint.CheckpointError, ValueError) as e:
    raise SetupError(f"{role}: {e}") from None
  return _checkpoint_setup(path, cfg, rules, role, quantize)


def load_checkpoints(target: str, draft: str | None = None, *, mesh, tokenizer=None,
                     quantize: str | None = None, target_rules=sharding.TENSOR_PARALLEL,
                     draft_rules=sharding.TENSOR_PARALLEL,
                     eos_ids: int | Sequence[int] | None = None,
                     pad_id: int | None = None) -> Pair:
  """A Pair from checkpoint directories, without a config: restored shard by shard onto
  `mesh` (quantized while loading with quantize='int8').

      mesh = sharding.make_mesh((2, 4))
      pair = load_checkpoints("ckpt/target", "ckpt/draft", mesh=mesh, tokenizer=tok)
      engine = Engine(pair, num_slots=8, max_len=512, k=4)
  """
  t = from_checkpoint(target, "target", rules=target_rules, quantize=quantize)
  d = (from_checkpoint(draft, "draft", rules=draft_rules, quantize=quantize)
       if draft else None)
  if d is not None:
    try:
      check_pair(t.cfg, d.cfg)
    except ValueError as e:
      raise SetupError(str(e)) from None
  assistant = d is not None and isinstance(d.cfg, config_lib.AssistantConfig)
  setup = Setup(target=t, draft=d, sampling=SamplingParams(), k=0,
                draft_source=DraftSource("assistant" if assistant else "model"))
  return build_pair(setup, mesh, tokenizer=tokenizer, eos_ids=eos_ids, pad_id=pad_id)


def section_name(role: str) -> str:
  return "model" if role == "target" else "draft"


def resolve(config, *, need_weights: bool = True, k: int | None = None) -> Setup:
  """Model configs, sampling options and K from a config; raises SetupError on anything wrong
  (the engine section included)."""
  target = _model_setup(config.model, "target", need_weights=need_weights)
  if target is None:
    raise SetupError("model: give model.checkpoint or model.preset")
  source = draft_source(config.draft)
  # n-gram drafting loads no draft model, whatever the section names.
  draft = (_model_setup(config.draft, "draft", need_weights=need_weights) if source.uses_model
           else None)
  k = int(config.engine.k if k is None else k)
  if k < 0:
    raise SetupError(f"engine.k must be >= 0, got {k}")
  if (k > 0 or source.kind == "hybrid") and source.uses_model and draft is None:
    raise SetupError(f"draft.kind={source.kind!r} with engine.k={k} needs a draft "
                     "(draft.checkpoint or draft.preset); use --config.draft.kind=ngram for "
                     "drafts without a model, or --config.engine.k=0 for autoregressive "
                     "sampling")
  if draft is not None:
    check_draft_kind(draft, source)
    try:
      check_pair(target.cfg, draft.cfg)
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
  settings = engine_settings(config)
  return Setup(target=target, draft=draft, sampling=params, k=k, coupling=settings.coupling,
               draft_source=source)


# draft.kind 'auto': the K policy chooses among these per step (the pair drafts as 'hybrid',
# the kind that needs everything the others do).
AUTO_SOURCES = ("model", "ngram", "hybrid")


def draft_source(section) -> DraftSource:
  """draft.kind ('auto': hybrid proposals, the K policy choosing the source per step), the
  n-gram sizes and draft.greedy (a section without them drafts with the model)."""
  kind = str(section.get("kind", "model"))
  try:
    return DraftSource("hybrid" if kind == "auto" else kind, int(section.get("ngram_max", 4)),
                       int(section.get("ngram_min", 2)), bool(section.get("greedy", False)))
  except ValueError as e:
    raise SetupError(f"draft: {e.args[0].replace('hybrid', 'hybrid, auto')}") from None


def check_draft_kind(draft: ModelSetup, source: DraftSource) -> None:
  """An assistant checkpoint drafts as kind 'assistant', and only it does."""
  is_assistant = isinstance(draft.cfg, config_lib.AssistantConfig)
  where = draft.checkpoint or f"preset {draft.cfg.name!r}"
  if is_assistant and not source.uses_assistant:
    raise SetupError(f"draft {where} is a Gemma 4 assistant drafter: set "
                     f"--config.draft.kind=assistant (not {source.kind!r})")
  if source.uses_assistant and not is_assistant:
    raise SetupError(f"draft.kind='assistant' needs a Gemma 4 assistant drafter (converted "
                     f"from Gemma4AssistantForCausalLM); draft {where} is a draft model")


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


# ---------------------------------------------------------------- the engine section

# launch.serve's context per slot when engine.max_len is 0 (it knows no prompts in advance).
DEFAULT_MAX_LEN = 1024


@dataclasses.dataclass(frozen=True)
class EngineSettings:
  """The `engine` section of a config, checked: what every launcher builds its Engine from."""
  num_slots: int
  max_len: int              # 0: sized from the prompts (launch.sample, launch.serve_bench)
  k: int
  k_max: int                # the largest K adaptive K may pick (= k when not adaptive)
  adaptive_k: bool
  calibrate: bool
  rounds_per_step: int | None
  max_rounds_per_step: int
  max_top_k: int
  prefill_rows: int
  coupling: str = "rejection"  # sampling.coupling: the engine runs one for every request
  sources: tuple[str, ...] | None = None  # draft kinds the K policy picks among (None: the
                                          # pair's draft.kind alone)
  logprobs_k: int = 0       # top logprobs a request may ask for (launch.serve)
  controls: bool = False    # penalties, min_p and logit_bias per request (launch.serve)
  max_logit_bias: int = 300
  grammar_states: int = 0   # structured output: automaton states per grammar (launch.serve)
  grammar_classes: int = 1024  # token classes per grammar
  grammar_masks: int = 0    # distinct allowed sets (bit masks) per grammar (0: grammar_states)
  grammar_tables: int = 0   # grammars on device at once (0: one per slot)

  def context(self, prompt_lens: Sequence[int] = (), max_new_tokens: int = 0) -> int:
    """A slot's length: max_len, else the longest prompt, its new tokens and a verification
    block of k_max + 1 (DEFAULT_MAX_LEN with no prompts)."""
    if self.max_len:
      return self.max_len
    if not prompt_lens:
      return DEFAULT_MAX_LEN
    return max(prompt_lens) + max_new_tokens + self.k_max + 1


def engine_settings(config) -> EngineSettings:
  """config.engine checked once; raises SetupError with the key's name."""
  e = config.engine
  for name in ("num_slots", "prefill_rows", "max_rounds_per_step"):
    if int(e[name]) < 1:
      raise SetupError(f"engine.{name} must be >= 1, got {e[name]}")
  if not 0 <= int(e.rounds_per_step) <= int(e.max_rounds_per_step):
    raise SetupError(f"engine.rounds_per_step must be 0 (paced by measured time) or 1.."
                     f"engine.max_rounds_per_step={e.max_rounds_per_step}, got "
                     f"{e.rounds_per_step}")
  for name in ("max_top_k", "logprobs_k", "max_logit_bias", "grammar_states", "grammar_masks",
               "grammar_tables"):
    if int(e[name]) < 0:
      raise SetupError(f"engine.{name} must be >= 0, got {e[name]}")
  if int(e.get("grammar_classes", 1024)) < 1:
    raise SetupError(f"engine.grammar_classes must be >= 1, got {e.grammar_classes}")
  if int(e.max_len) < 0 or int(e.max_len) == 1:
    raise SetupError(f"engine.max_len must be 0 (sized from the prompts) or >= 2, got "
                     f"{e.max_len}")
  k, adaptive = int(e.k), bool(e.adaptive_k) and int(e.k) > 0
  k_max = int(e.k_max) if adaptive else k
  if adaptive and not 1 <= k <= k_max:
    raise SetupError(f"engine.adaptive_k needs 1 <= engine.k <= engine.k_max (k is the "
                     f"starting K), got k={k}, k_max={k_max}")
  try:
    coupling = decode.check_coupling(str(config.sampling.coupling))
  except ValueError as err:
    raise SetupError(f"sampling.{err}") from None
  sources = None
  if str(config.draft.get("kind", "model")) == "auto":
    if not adaptive:
      raise SetupError("draft.kind='auto' needs engine.adaptive_k=True and engine.k >= 1 (the "
                       "K policy chooses the source)")
    sources = AUTO_SOURCES
  return EngineSettings(num_slots=int(e.num_slots), max_len=int(e.max_len), k=k, k_max=k_max,
                        adaptive_k=adaptive, calibrate=bool(e.calibrate),
                        rounds_per_step=int(e.rounds_per_step) or None,
                        max_rounds_per_step=int(e.max_rounds_per_step),
                        max_top_k=int(e.max_top_k), prefill_rows=int(e.prefill_rows),
                        coupling=coupling, sources=sources, logprobs_k=int(e.logprobs_k),
                        controls=bool(e.controls), max_logit_bias=int(e.max_logit_bias),
                        grammar_states=int(e.get("grammar_states", 0)),
                        grammar_classes=int(e.get("grammar_classes", 1024)),
                        grammar_masks=int(e.get("grammar_masks", 0)),
                        grammar_tables=int(e.get("grammar_tables", 0)))


def build_engine(pair: Pair, settings: EngineSettings, *, max_len: int | None = None,
                 max_top_k: int | None = None, per_request_extras: bool = True, seed: int = 0,
                 add_bos: bool = False, channel=None, max_queue: int | None = None):
  """The Engine the settings describe over `pair` (max_len, max_top_k: overrides of the
  settings' values, e.g. a context sized from known prompts). per_request_extras=False leaves
  out logprobs_k alternatives, the controls and grammars (a launcher whose requests use
  none); controls and grammars are off on a multi-host engine (their inputs are not in the
  insert message).
  max_queue: requests waiting for a slot before submit refuses more (None: unbounded)."""
  from spec_tpu.serving.engine import Engine
  return Engine(pair, num_slots=settings.num_slots,
                max_len=max_len or settings.context(), k=settings.k, k_max=settings.k_max,
                adaptive_k=settings.adaptive_k,
                max_top_k=settings.max_top_k if max_top_k is None else max_top_k,
                rounds_per_step=settings.rounds_per_step,
                max_rounds_per_step=settings.max_rounds_per_step,
                prefill_rows=settings.prefill_rows, add_bos=add_bos, seed=seed, channel=channel,
                coupling=settings.coupling, max_queue=max_queue,
                sources=settings.sources if pair.has_draft else None,
                logprobs_k=settings.logprobs_k if per_request_extras else 0,
                controls=per_request_extras and settings.controls and channel is None,
                max_logit_bias=settings.max_logit_bias,
                grammar_states=(settings.grammar_states
                                if per_request_extras and channel is None else 0),
                grammar_classes=settings.grammar_classes,
                grammar_masks=settings.grammar_masks or None,
                grammar_tables=settings.grammar_tables or None)


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


# ---------------------------------------------------------------- weights

def _seed(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def load_params(m: ModelSetup, mesh):
  """Params placed on their shardings: restored shard by shard, or random (with a warning)."""
  if m.checkpoint is not None and m.quantize_on_load:
    stored = m.cfg.replace(quantize=None)
    to = quant.leaf_quantizer(model.param_logical_axes(stored), embed=m.cfg.tie_embeddings,
                              out_shardings=sharding.param_shardings(m.cfg, mesh, m.rules),
                              delete_source=True)
    params, _ = checkpoint.restore_transformed(
        m.checkpoint, shardings=sharding.param_shardings(stored, mesh, m.rules), transform=to)
    return params
  if m.checkpoint is not None:
    abstract = jax.eval_shape(lambda: model.init_params(m.cfg, jax.random.key(0)))
    shardings = sharding.param_shardings(m.cfg, mesh, m.rules, abstract)
    # Float leaves in the config's dtype, whatever they were stored in (an int8 checkpoint's
    # leaves as stored: its float32 scales must not be cast).
    dtype = m.cfg.dtype if m.cfg.quantize is None else None
    params, _ = checkpoint.restore(m.checkpoint, shardings=shardings, dtype=dtype)
    return params
  shardings = sharding.param_shardings(m.cfg, mesh, m.rules)
  # Initialised in place: no host copy, and every process computes the same values from the
  # same key (the key depends on the role and name only).
  init = jax.jit(lambda key: model.init_params(m.cfg, key), out_shardings=shardings)
  return init(jax.random.key(_seed(f"{m.role}:{m.cfg.name}")))


def build_pair(setup: Setup, mesh, *, tokenizer=None,
               eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None,
               use_draft: bool = True) -> Pair:
  """Both models' params loaded onto `mesh` (the draft left out with use_draft=False). The EOS
  ids (every one the tokenizer's checkpoint lists) and pad come from the tokenizer unless
  given; eos_ids=() means none."""
  target_params = load_params(setup.target, mesh)
  draft = setup.draft if use_draft else None
  draft_params = load_params(draft, mesh) if draft is not None else None
  # Without its draft model a pair drafts by prompt lookup only if that is what was asked.
  source = (setup.draft_source if draft is not None or not setup.draft_source.uses_model
            else DraftSource())
  if eos_ids is None and tokenizer is not None:
    eos_ids = tokenizer.eos_ids
  if pad_id is None:
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
  return Pair(target_params, setup.target.cfg, mesh=mesh, draft_params=draft_params,
              draft_cfg=draft.cfg if draft else None, target_rules=setup.target.rules,
              draft_rules=draft.rules if draft else sharding.TENSOR_PARALLEL, eos_ids=eos_ids,
              pad_id=pad_id, tokenizer=tokenizer, draft_source=source)


def load_pair(config, setup: Setup | None = None, mesh=None, **options) -> Pair:
  """config -> Pair in one call: resolved (unless `setup` is given), tokenizer checked,
  weights loaded onto `mesh` (default: the config's mesh.shape over every device)."""
  setup = resolve(config) if setup is None else setup
  tok = load_tokenizer(config, setup)
  return build_pair(setup, build_mesh(config) if mesh is None else mesh, tokenizer=tok,
                    **options)


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


def check_tokenizer_matches(models: list[ModelSetup], tok, spec: str) -> None:
  """Weights from a checkpoint decode correctly only with the tokenizer they were trained with:
  any other vocabulary runs without an error and prints garbage. The user may still say, through
  a model's `fields.tokenizer`, that they mean another one (the checkpoint's record then reads
  as that name)."""
  from spec_tpu import tokenizer as tokenizer_lib
  wrong = []
  for m in models:
    recorded = m.cfg.tokenizer
    if m.checkpoint is None or not recorded or recorded == tok.name:
      continue
    if tokenizer_lib.verifiable(recorded) or tokenizer_lib.verifiable(tok.name):
      wrong.append(m)
    else:
      logging.warning("%s checkpoint %s names tokenizer %r, which cannot be compared with %r "
                      "(%s): make sure they are the same vocabulary", m.role, m.checkpoint,
                      recorded, tok.name, spec)
  if wrong:
    given = f"{spec!r}" + (f" ({tok.name})" if tok.name != spec else "")
    made = "; ".join(f"{m.role} {m.checkpoint}: {m.cfg.tokenizer!r}" for m in wrong)
    overrides = " ".join(f"--config.{section_name(m.role)}.fields.tokenizer={tok.name}"
                         for m in wrong)
    raise SetupError(f"model.tokenizer {given} is not the tokenizer the checkpoint was made "
                     f"with ({made}): token ids would decode into garbage. Give that tokenizer, "
                     f"or, if you mean it, {overrides}")
