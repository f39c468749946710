"""The library's setup path, used as a library user would (no launcher code): checkpoints onto a
mesh as a Pair, and an Engine serving a request from it."""

import gc
import json
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu import program_cache, setup, sharding
from spec_tpu.checkpoints import checkpoint
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import config as config_lib, model
from spec_tpu.serving import Engine, GenerationParams

TARGET = config_lib.get_preset("tiny").replace(name="lib_target", vocab_size=64, num_heads=4,
                                               num_kv_heads=4)
DRAFT = TARGET.replace(name="lib_draft", num_layers=1)
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec_tpu",
                      "assets")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("lib_ckpt")
  for cfg, seed in ((TARGET, 0), (DRAFT, 1)):
    checkpoint.save(root / cfg.name, model.init_params(cfg, jax.random.key(seed)), cfg)
  return str(root / TARGET.name), str(root / DRAFT.name)


def test_a_checkpoint_pair_on_a_2x4_mesh_serves_a_request(checkpoints):
  # Given a target and draft checkpoint restored onto a 2x4 (data x model) mesh as one Pair,
  mesh = sharding.make_mesh((2, 4))
  pair = setup.load_checkpoints(*checkpoints, mesh=mesh)
  assert pair.target_cfg == TARGET and pair.draft_cfg == DRAFT
  q = pair.target_params["groups"][0]["attn"]["q"]
  assert q.sharding.mesh.shape == {"data": 2, "model": 4} and "model" in q.sharding.spec
  # when an Engine over the pair serves a greedy request with speculation (K = 2),
  engine = Engine(pair, num_slots=2, max_len=48, k=2, adaptive_k=False, max_top_k=4)
  prompt = [3, 17, 5, 42, 8]
  done = engine.generate([prompt], [GenerationParams(max_new_tokens=12, temperature=0.0)])[0]
  # then it returns the target's own greedy continuation (Sampler over the same Pair, K = 0),
  want = Sampler(pair).generate([prompt], max_new_tokens=12,
                                sampling=SamplingParams(temperature=0.0)).tokens[0]
  assert done.tokens == want and len(want) == 12
  # with the draft's tokens judged by the target.
  assert done.stats.judged > 0


def test_a_second_engine_and_sampler_take_their_programs_from_the_process(checkpoints):
  # Given an Engine and a Sampler over a pair on a 2x4 mesh that served requests (sampled,
  # seeded; one greedy) and so compiled their programs (the ones the test above runs),
  mesh = sharding.make_mesh((2, 4))
  prompts = [[3, 17, 5, 42, 8], [9, 1, 4]]
  params = [GenerationParams(max_new_tokens=12, temperature=1.0, seed=7),
            GenerationParams(max_new_tokens=12, temperature=0.0)]

  def serve(pair):
    engine = Engine(pair, num_slots=2, max_len=48, k=2, adaptive_k=False, max_top_k=4)
    done = [d.tokens for d in engine.generate(prompts, params)]
    fixed = Sampler(pair).generate(prompts[:1], max_new_tokens=12, seed=3,
                                   sampling=SamplingParams(temperature=1.0)).tokens
    return engine, done, fixed

  first, done, fixed = serve(setup.load_checkpoints(*checkpoints, mesh=mesh))
  # when the same checkpoints are loaded again and a second Engine and Sampler with the same
  # settings serve the same requests,
  events = []
  listen = lambda event, seconds, **_: events.append(event)
  again = setup.load_checkpoints(*checkpoints, mesh=mesh)  # (loading traces shape checks)
  misses = program_cache.PROGRAMS.misses
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    second, done_again, fixed_again = serve(again)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  # then nothing is traced, lowered or compiled: every program comes from the process's cache,
  made = [e for e in events if e.startswith("/jax/core/compile/")]
  assert made == [] and program_cache.PROGRAMS.misses == misses
  assert second._step_program(2, "model") is first._step_program(2, "model")
  # and the tokens are the first ones (the same seeds, the same programs).
  assert done_again == done and fixed_again == fixed and len(done[0]) == 12
  # The cache keeps programs, not the engines that made them (nor their device state).
  ref = weakref.ref(first)
  del first
  gc.collect()
  assert ref() is None


def _scaled(factor, x):
  return x * factor


def _times_attention_block(x):
  return x * model.ATTENTION_BLOCK  # read through the library's module when traced


def test_programs_that_differ_in_anything_they_depend_on_are_compiled_apart(monkeypatch):
  # Given a program cache of two entries and the arguments a program is made from,
  cache = program_cache.ProgramCache(max_size=2)
  one_device = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  other = sharding.make_mesh((1, 1), devices=jax.devices()[1:2])
  on = lambda mesh: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  base = dict(static=(2.0,), shape=(4,), dtype=jnp.float32, sharding=on(one_device), donate=(),
              options=None)

  def make(**change):
    a = dict(base, **change)
    return cache.compiled(_scaled, a["static"], (jax.ShapeDtypeStruct(a["shape"], a["dtype"]),),
                          in_shardings=(a["sharding"],), donate_argnums=a["donate"],
                          compiler_options=a["options"])

  first = make()
  # when the same program is asked for again, then it is the one compiled before;
  assert make() is first and (cache.hits, cache.misses) == (1, 1)
  # when any one thing it depends on differs (a static value, an argument's shape, dtype or
  # sharding, donation, compiler options), then that program is compiled apart
  changes = [dict(static=(3.0,)), dict(shape=(8,)), dict(dtype=jnp.int32),
             dict(sharding=on(other)), dict(donate=(0,)),
             dict(options={"xla_disable_hlo_passes": "while-loop-invariant-code-motion"})]
  for i, change in enumerate(changes):
    program = make(**change)
    assert program is not first and cache.misses == 2 + i, change
  # and computes its own function;
  x = np.arange(4, dtype=np.float32)
  np.testing.assert_array_equal(make(static=(3.0,))(x), 3 * x)
  np.testing.assert_array_equal(first(x), 2 * x)
  # the cache holds at most its bound, the least recently used dropped first;
  assert len(cache) == 2
  misses = cache.misses
  make()
  assert cache.misses == misses + 1
  # and a program whose code changed since (a library function or constant rebound, as a
  # test's monkeypatch or model.accelerator_forms does) is traced again, then and after.
  times_block = lambda: cache.compiled(_times_attention_block, (), (x,))
  np.testing.assert_array_equal(times_block()(x), model.ATTENTION_BLOCK * x)
  with monkeypatch.context() as patch:
    patch.setattr(model, "ATTENTION_BLOCK", model.ATTENTION_BLOCK + 3)
    np.testing.assert_array_equal(times_block()(x), model.ATTENTION_BLOCK * x)
  np.testing.assert_array_equal(times_block()(x), model.ATTENTION_BLOCK * x)
  assert cache.misses == misses + 4


def test_engine_settings_build_the_engine_they_describe(checkpoints):
  # Given a config's engine section (configs/common.py) with non-default values,
  from configs import common
  c = common.base(num_slots=3)
  c.engine.update(k=2, k_max=4, adaptive_k=True, max_len=40, rounds_per_step=2,
                  max_rounds_per_step=4, prefill_rows=2, max_top_k=8, logprobs_k=3,
                  controls=True, max_logit_bias=7)
  settings = setup.engine_settings(c)
  one_device = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  pair = setup.load_checkpoints(*checkpoints, mesh=one_device)
  # when the library builds the Engine from it, then the engine runs those settings.
  engine = setup.build_engine(pair, settings)
  assert (engine.num_slots, engine.max_len, engine.k, engine.k_max) == (3, 40, 2, 4)
  assert engine.prefill_rows == 2 and engine.max_top_k == 8 and engine.policy is not None
  assert engine.pacing.max_rounds == 4 and engine.pacing.rounds(2) == 2
  assert engine.ks == (0, 1, 2, 4)
  assert (engine.logprobs_k, engine.controls, engine.max_logit_bias) == (3, True, 7)
  assert engine.max_queue is None  # the server's bound (serve.max_queue), not the engine's
  # A second engine from them takes the programs the first made (its state's, here),
  misses = program_cache.PROGRAMS.misses
  setup.build_engine(pair, settings)
  assert program_cache.PROGRAMS.misses == misses
  # and a launcher whose requests ask for neither leaves the extras out (compiling its own).
  plain = setup.build_engine(pair, settings, per_request_extras=False, max_queue=5)
  assert (plain.logprobs_k, plain.controls, plain.max_queue) == (0, False, 5)
  assert program_cache.PROGRAMS.misses == misses + 1


def test_draft_kind_reaches_the_pair_and_the_engine(checkpoints):
  # Given a config naming both checkpoints, with draft.kind = ngram,
  from configs import common
  from spec_tpu.decoding.draft_source import DraftSource
  c = common.base(num_slots=2)
  c.model.checkpoint, c.draft.checkpoint = checkpoints
  c.draft.update(kind="ngram", ngram_max=3, ngram_min=1)
  c.engine.update(k=2, adaptive_k=False, max_len=32)
  one_device = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  # then no draft is loaded, and the Pair and the Engine built from it draft by lookup at K = 2;
  resolved = setup.resolve(c)
  assert resolved.draft is None and resolved.draft_source == DraftSource("ngram", 3, 1)
  pair = setup.build_pair(resolved, one_device)
  assert pair.draft_cfg is None and pair.draft_source == resolved.draft_source
  engine = setup.build_engine(pair, setup.engine_settings(c))
  assert engine.draft_source == resolved.draft_source and engine.k == 2
  # hybrid loads the draft, and a pair built without it drafts with no source but the model.
  c.draft.kind = "hybrid"
  resolved = setup.resolve(c)
  assert resolved.draft.cfg == DRAFT
  assert setup.build_pair(resolved, one_device).draft_source.kind == "hybrid"
  assert setup.build_pair(resolved, one_device, use_draft=False).draft_source == DraftSource()
  # auto: the engine's K policy chooses among the three kinds (adaptive K).
  c.draft.kind = "auto"
  c.engine.adaptive_k = True
  engine = setup.build_engine(setup.build_pair(setup.resolve(c), one_device),
                              setup.engine_settings(c))
  assert engine.sources == ("model", "ngram", "hybrid") and engine.policy.sources == engine.sources
  c.draft.kind, c.engine.adaptive_k = "hybrid", False
  # A hybrid or model draft with no draft model is refused by name.
  c.draft.checkpoint = ""
  with pytest.raises(setup.SetupError, match="draft.kind='hybrid' with engine.k=2 needs a draft"):
    setup.resolve(c)


def test_an_assistant_checkpoint_drafts_as_kind_assistant(tmp_path):
  # Given a Gemma 4 target and its assistant drafter saved as checkpoints (the assistant's
  # config stored with it, its arrays checked against that config on restore),
  from configs import common
  target = config_lib.get_preset("tiny_gemma4")
  acfg = config_lib.get_preset("tiny_gemma4_assistant")
  init = jax.jit(model.init_params, static_argnums=0)  # one program, not hundreds of ops
  for cfg, seed in ((target, 0), (acfg, 1)):
    checkpoint.save(tmp_path / cfg.name, init(cfg, jax.random.key(seed)), cfg)
  paths = str(tmp_path / target.name), str(tmp_path / acfg.name)
  assert checkpoint.load_config(paths[1]) == acfg
  one_device = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  # then load_checkpoints makes a Pair that drafts with it,
  pair = setup.load_checkpoints(*paths, mesh=one_device)
  assert pair.has_assistant and pair.draft_source.kind == "assistant"
  # and a config must say draft.kind=assistant for it, and only for an assistant.
  c = common.base(num_slots=2)
  c.model.checkpoint, c.draft.checkpoint = paths
  with pytest.raises(setup.SetupError, match="set --config.draft.kind=assistant"):
    setup.resolve(c)
  c.draft.update(kind="assistant", greedy=True)
  resolved = setup.resolve(c)
  assert resolved.draft.cfg == acfg and resolved.draft_source.greedy
  c.model.checkpoint = ""
  c.model.update(preset="tiny_gemma4", allow_random=True)
  c.draft.checkpoint = ""
  c.draft.update(preset="tiny", allow_random=True)
  with pytest.raises(setup.SetupError, match="needs a Gemma 4 assistant drafter"):
    setup.resolve(c)
  # An assistant made for another target is refused before anything loads.
  c.draft.update(preset="tiny_gemma4_assistant")
  c.draft.fields.backbone_d_model = 48
  with pytest.raises(setup.SetupError, match="backbone_d_model"):
    setup.resolve(c)


@pytest.mark.parametrize("field, value, match", [
    ("num_slots", 0, "engine.num_slots must be >= 1"),
    ("max_len", 1, "engine.max_len must be 0"),
    ("k_max", 1, "engine.adaptive_k needs 1 <= engine.k <= engine.k_max"),
    ("logprobs_k", -1, "engine.logprobs_k must be >= 0"),
    ("max_logit_bias", -1, "engine.max_logit_bias must be >= 0"),
    ("grammar_states", -1, "engine.grammar_states must be >= 0"),
    ("grammar_classes", 0, "engine.grammar_classes must be >= 1"),
    ("grammar_masks", -1, "engine.grammar_masks must be >= 0"),
    ("grammar_tables", -1, "engine.grammar_tables must be >= 0"),
])
def test_bad_engine_settings_are_refused_by_name(field, value, match):
  from configs import common
  c = common.base()
  c.engine.adaptive_k = True
  c.engine[field] = value
  with pytest.raises(setup.SetupError, match=match):
    setup.engine_settings(c)


def test_serve_limits_come_from_the_serve_section(monkeypatch):
  from configs import common
  from spec_tpu.serving import server
  c = common.base()
  c.serve.update(max_body_bytes=1000, request_timeout_s=0.0)
  monkeypatch.setenv("SPEC_TPU_API_KEY", "from-env")
  limits = server.limits(c)
  assert (limits.api_key, limits.max_body_bytes, limits.request_timeout_s) == (
      "from-env", 1000, None)
  c.serve.api_key = "from-config"
  assert server.limits(c).api_key == "from-config"
  assert server.limits(c, api_key="from-flag").api_key == "from-flag"
  c.serve.max_queue = -1
  with pytest.raises(setup.SetupError, match="serve.max_queue must be >= 0"):
    server.limits(c)
  # Image options: fetching and Pan & Scan off by default, on with their limits when asked.
  assert server.images(c) == dict(fetch=None, pan_and_scan=False)
  c.serve.update(fetch_image_urls=True, fetch_timeout_s=2.5)
  c.run.pan_and_scan = True
  options = server.images(c)
  assert options["pan_and_scan"] and options["fetch"].timeout_s == 2.5
  assert not options["fetch"].private_hosts
  c.serve.fetch_private_hosts = True
  assert server.images(c)["fetch"].private_hosts
  c.serve.fetch_max_bytes = 0
  with pytest.raises(setup.SetupError, match="serve.fetch_timeout_s and serve.fetch_max_bytes"):
    server.images(c)


def test_vision_fields_override_the_presets_encoder_and_need_one():
  # Given a Gemma 3 vision preset at a small vocabulary, where its image ids do not fit,
  from configs import common
  c = common.base()
  c.model = common.model_section(preset="gemma3_4b_vision", vocab_size=512)
  c.engine.k = 0
  with pytest.raises(setup.SetupError, match="vision token ids .* outside the vocabulary"):
    setup.resolve(c, need_weights=False)
  # fields.vision.* move the image block's delimiters into it, the rest of the encoder kept;
  c.model.fields.vision.update(start_id=500, end_id=501)
  vision = setup.resolve(c, need_weights=False).target.cfg.vision
  assert vision == config_lib.PRESETS["gemma3_4b_vision"].vision.replace(start_id=500,
                                                                          end_id=501)
  # and a preset without an encoder refuses them rather than growing one.
  c.model.preset = "gemma3_4b"
  with pytest.raises(setup.SetupError, match="preset 'gemma3_4b' has no vision encoder"):
    setup.resolve(c, need_weights=False)


def test_a_checkpoint_that_does_not_exist_is_a_setup_error(tmp_path):
  with pytest.raises(setup.SetupError, match="target"):
    setup.load_checkpoints(str(tmp_path / "nope"),
                           mesh=sharding.make_mesh((1, 1), devices=jax.devices()[:1]))


@pytest.mark.parametrize("role", ["target", "draft"])
def test_shipped_assets_are_in_the_current_checkpoint_format(role):
  # The first run of every user loads these: they take the current path, not a compatibility one.
  meta = json.loads(open(os.path.join(ASSETS, role, checkpoint.CONFIG_FILE)).read())
  assert meta["version"] == checkpoint.VERSION
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ASSETS, role))
             for f in fs)
  assert size < 8 << 20
