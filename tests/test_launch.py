"""The launchers as users run them: sampling to JSONL, resuming after SIGKILL, planning a 70B
setup without allocating it, and refusing bad input before anything compiles."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/ and launch/ are not installed packages; a bare `pytest` does not put the repo root on
# sys.path (python -m pytest does).
sys.path.insert(0, REPO)

from configs import tiny_random as default_config  # noqa: E402
from spec_tpu import setup as common  # noqa: E402
from spec_tpu import reports  # noqa: E402
from spec_tpu.decoding import k_policy  # noqa: E402
from spec_tpu.serving import offline, results  # noqa: E402


def _tiny_config(**settings):
  """Random tiny models with the shipped tokenizer: no checkpoint is read. Settings go to the
  section that has them (engine or sampling)."""
  c = default_config.get_config()
  c.model.checkpoint = c.draft.checkpoint = ""
  c.engine.num_slots = 2
  c.sampling.max_new_tokens = 8
  for name, value in settings.items():
    (c.engine if name in c.engine else c.sampling)[name] = value
  return c


def _env(devices=8):
  env = dict(os.environ)
  # conftest's cheaper XLA:CPU backend flags carry over to the launched processes.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  # The suite's compilation cache (conftest.py): a launcher loads the programs that an earlier
  # one, of this test or another, compiled for the same setup.
  env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _write_prompts(path, n):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(x):\n    return x * {i}"}) + "\n")


def _launch_in_one_process(directory, commands, env, timeout=600):
  """Runs launcher commands one after another in one process (tests/run_launchers.py: each as
  `python -m launch.X` runs it, flag parsing and exit status included, but one interpreter and
  JAX start-up for all); returns each command's {"rc", "log", ...} (log: stdout and stderr)."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "commands.json").write_text(json.dumps(commands))
  subprocess.run([sys.executable, os.path.join(REPO, "tests", "run_launchers.py"),
                  str(directory / "commands.json"), str(directory / "results.jsonl")],
                 cwd=REPO, env=env, check=True, timeout=timeout)
  runs = _read(directory / "results.jsonl")
  assert len(runs) == len(commands)
  return runs


def _selected(request, *names):
  """Which of the named tests of this module this session runs (a shared fixture runs only the
  commands of those)."""
  chosen = {item.originalname for item in request.session.items
            if item.module is request.module}
  return {name: name in chosen for name in names}


@pytest.fixture(autouse=True, scope="module")
def _cache_every_program():
  """The engine runs of this module's tests (and of a test's second run) compile programs of
  the same shapes: every one goes to the suite's compilation cache (conftest.py), however short
  its compile, as the launched processes' do, so a later run loads it."""
  import jax
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


# The sampling tests' prompts. With the same longest prompt (so the same slot length), 2 slots
# and K = 2 and 0 among the Ks they run, the engines of the two tests below compile the same
# insert and step programs: the second loads them from the compilation cache.
_PROMPTS = ["def add(a, b):", "import os", "class A:"]


def test_sample_writes_one_jsonl_line_per_prompt_and_a_speedup(tmp_path):
  # Given three prompts on 8 simulated devices (mesh 1x8) with random tiny models at K = 2,
  out = tmp_path / "out.jsonl"
  config = _tiny_config(k=2)
  # when sampled with the AR comparison on,
  summary = offline.run(config, _PROMPTS, None, str(out), compare_ar=True, multihost=False)
  # then each prompt has one line (in the order they finished) whose text is the decoding of
  # its tokens,
  lines = _read(out)
  assert sorted(r["id"] for r in lines) == [0, 1, 2]
  from spec_tpu import tokenizer
  tok = tokenizer.load(config.model.tokenizer)
  for r in lines:
    assert 1 <= len(r["tokens"]) <= 8
    assert r["text"] == tok.decode(r["tokens"])
    assert r["stats"]["new_tokens"] == len(r["tokens"]) and r["stats"]["k"] == 2
  # and the summary reports throughput, acceptance and a measured speedup.
  assert summary["generated_tokens"] == sum(len(r["tokens"]) for r in lines)
  assert summary["random_weights"] is True
  assert 0.0 <= summary["acceptance_rate"] <= 1.0
  assert summary["tokens_per_target_call"] >= 1.0
  assert summary["speedup_vs_ar"] > 0
  # Every line records what made it: models, tokenizer, seed, lengths, K policy, sampling values.
  setup = common.resolve(config)
  settings = results.run_settings(config, setup, tok, k_max=2)
  assert all(r["settings"] == settings for r in lines)
  assert settings["seed"] == 0 and settings["k"] == 2 and settings["max_new_tokens"] == 8
  assert settings["target"]["weights"] == "random" and settings["tokenizer"] == tok.name
  # and running again with the same settings finds every prompt done (nothing is compiled).
  again = offline.run(config, _PROMPTS, None, str(out), compare_ar=True, multihost=False)
  assert again["note"] == "every prompt already done" and _read(out) == lines
  # A prompt's tokens depend on its id, not on what else runs: two of the prompts again, in
  # another order and without the third (as a resumed run would), are sampled with the same
  # tokens (each seed comes from (seed, id); no request shares randomness with those beside it).
  together = {r["id"]: r["tokens"] for r in lines}
  apart = tmp_path / "apart.jsonl"
  apart.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                           for i, p in [(2, "class A:"), (0, "def add(a, b):")]))
  offline.run(config, [], str(apart), str(tmp_path / "apart_out.jsonl"), compare_ar=False,
              multihost=False)
  assert {r["id"]: r["tokens"] for r in _read(tmp_path / "apart_out.jsonl")} == {
      i: together[i] for i in (0, 2)}
  assert together[0] != together[2]


def test_adaptive_k_follows_the_measured_cost_and_the_text_does_not(tmp_path, monkeypatch):
  # Given rounds that cost 1 + K c units at every K the engine may pick (c faked after its
  # calibration: a free draft or one 10x slower than the target, so the choice does not hang on
  # this machine's timings), and the default coupling (gumbel, the embedded default's too),
  from configs import default
  from spec_tpu.serving import Engine
  calibrate = Engine.calibrate
  assert default.get_config().sampling.coupling == "gumbel"
  assert default_config.get_config().sampling.coupling == "gumbel"
  texts = []
  for c, expected_k in [(0.0, 2), (10.0, 0)]:
    texts.append(_adaptive_run(tmp_path / f"c{c}", monkeypatch, calibrate, c, expected_k))
  # then the two runs, one speculating at K = 2 and one never, wrote the same text for every
  # prompt (a seed reproduces whatever K the policy picks).
  assert texts[0] == texts[1]


def _adaptive_run(tmp_path, monkeypatch, calibrate, c, expected_k):
  from spec_tpu.serving import Engine
  tmp_path.mkdir()

  def faked(engine, *args, **kwargs):
    # One timed round of each K: its times are replaced below, only the acceptance is kept.
    report = calibrate(engine, *args, **dict(kwargs, rounds=1, repeats=1))
    # A fresh policy (the measured times would blend into the faked ones), given the
    # acceptance calibration measured and the faked round times.
    engine.policy = k_policy.AdaptiveK(k0=engine.k, k_max=engine.k_max, ks=engine.ks)
    engine.policy.observe_acceptance(report["accepted"], report["judged"])
    engine.pacing.observe_step = lambda *a: None
    engine.pacing.round_s = {k: 1.0 + k * c for k in engine.ks}
    for k, seconds in engine.pacing.round_s.items():
      engine.policy.observe_round_time(k, seconds)
    return report

  monkeypatch.setattr(Engine, "calibrate", faked)
  config = _tiny_config(adaptive_k=True, k=1, k_max=2)
  out = tmp_path / "out.jsonl"
  # (The AR comparison only where its figure is checked: a run kept at K = 0 is its own.)
  summary = offline.run(config, _PROMPTS + [f"x = {i}" for i in range(3)], None, str(out),
                        compare_ar=expected_k == 0, multihost=False)
  # then the engine's policy runs a free draft at the largest K it compiled (0, 1, 2: more
  # drafts only add accepted tokens), turns a slow one off from the first step, and every
  # prompt is written once with the K its request ran with.
  assert summary["ks_used"] == [expected_k]
  assert summary["adaptive_c"] == pytest.approx(c)
  lines = _read(out)
  assert sorted(r["id"] for r in lines) == list(range(6))
  assert all(r["stats"]["k"] == expected_k for r in lines)
  if expected_k == 0:
    assert summary["acceptance_rate"] is None and summary["speedup_vs_ar"] == 1.0
  else:
    assert 0.0 < summary["acceptance_rate"] <= 1.0
  return {r["id"]: (r["tokens"], r["text"]) for r in lines}


def _result(pid, **settings):
  """A line as launch.sample writes it."""
  return json.dumps({"id": pid, "prompt": f"p{pid}", "text": "x", "tokens": [5],
                     "stats": {"k": 4}, "settings": settings}) + "\n"


@pytest.mark.parametrize("tail", [
    b'{"id": "c", "prompt": "de',            # a kill in the middle of a write
    b'{"i',                                  # ... early in it
    b'{"id": "c", "pro' + b"\0" * 40,        # a crash that zero-filled the end of the file
    b"\0" * 64 + b"\n",                      # ... newline included
])
def test_a_torn_last_line_is_cut_away(tmp_path, tail):
  path = tmp_path / "out.jsonl"
  whole = _result("a") + _result(2)
  path.write_bytes(whole.encode() + tail)
  assert results.finished_ids(str(path)) == {'"a"', "2"}
  assert path.read_text() == whole


@pytest.mark.parametrize("content", [
    "notes I keep here\n",                          # one line of plain text: not ours
    "notes without a newline",
    '{"id": 1, "prompt": "a prompts file"}\n',      # JSON, but not a result line
    _result("a") + '{"id": 1, "prompt": "x"}',      # ... as the last, unterminated line
    _result("a") + "a note after our lines\n",
    "a note before our lines\n" + _result("a"),
])
def test_an_output_holding_anything_else_is_refused_untouched(tmp_path, monkeypatch, content):
  _no_weights_or_compiles(monkeypatch)
  # Given an existing --output that this launcher cannot have written (a torn line can only be
  # the start of one of its own lines),
  path = tmp_path / "notes.jsonl"
  path.write_text(content)
  # then sampling into it is refused before anything is read, loaded or written,
  with pytest.raises(results.InputError, match="did not write"):
    offline.run(_tiny_config(), ["x = 1"], None, str(path), compare_ar=False, multihost=False)
  # and the file is exactly as it was.
  assert path.read_text() == content


def _no_weights_or_compiles(monkeypatch):
  def forbidden(*a, **k):
    raise AssertionError("bad input must be refused before weights are loaded or compiled")
  monkeypatch.setattr(common, "load_params", forbidden)
  monkeypatch.setattr(common, "build_pair", forbidden)


@pytest.mark.parametrize("case, error, match", [
    ("unreadable_prompts", results.InputError, "cannot read prompt file"),
    ("bad_jsonl", results.InputError, "expected"),
    ("duplicate_ids", results.InputError, "appears twice"),
    ("output_dir_missing", results.InputError, "does not exist"),
    ("missing_checkpoint", common.SetupError, "does not exist"),
    ("no_checkpoint", common.SetupError, "no checkpoint given"),
    ("k_without_draft", common.SetupError, "needs a draft"),
    ("bad_top_p", common.SetupError, "top_p"),
    ("bad_coupling", common.SetupError,
     "sampling.coupling must be one of rejection, gumbel, got 'gumble'"),
    ("prompt_too_long", results.InputError, "does not fit the cache"),
    ("adaptive_k_above_k_max", common.SetupError, "adaptive_k needs"),
])
def test_bad_input_fails_before_any_compile(tmp_path, monkeypatch, case, error, match):
  _no_weights_or_compiles(monkeypatch)
  config, prompts_file, output = _tiny_config(), None, str(tmp_path / "out.jsonl")
  if case == "unreadable_prompts":
    prompts_file = str(tmp_path / "nope.jsonl")
  elif case == "bad_jsonl":
    prompts_file = str(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl").write_text('{"id": 1, "text": "no prompt key"}\n')
  elif case == "duplicate_ids":
    prompts_file = str(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
  elif case == "output_dir_missing":
    output = str(tmp_path / "no" / "such" / "dir" / "out.jsonl")
  elif case == "missing_checkpoint":
    config.model.checkpoint = str(tmp_path / "no_such_checkpoint")
    config.model.allow_random = False
  elif case == "no_checkpoint":
    config.draft.allow_random = False
  elif case == "k_without_draft":
    config.draft.preset = ""
    for name in config.draft.fields:
      config.draft.fields[name] = None
  elif case == "bad_coupling":
    config.sampling.coupling = "gumble"
  elif case == "bad_top_p":
    config.sampling.top_p = 1.5
  elif case == "prompt_too_long":
    config.engine.max_len = 16
  elif case == "adaptive_k_above_k_max":
    config.engine.update(adaptive_k=True, k=5, k_max=4)
  with pytest.raises(error, match=match):
    offline.run(config, [], prompts_file, output, compare_ar=False, multihost=False)


@pytest.mark.parametrize("how", ["same_path", "relative_path", "symlink"])
def test_prompts_and_output_being_one_file_is_refused(tmp_path, monkeypatch, how):
  _no_weights_or_compiles(monkeypatch)
  # Given a prompts file named again as the output (by a relative path, or through a symlink),
  prompts = tmp_path / "p.jsonl"
  _write_prompts(prompts, 2)
  monkeypatch.chdir(tmp_path)
  output = {"same_path": str(prompts), "relative_path": "./p.jsonl",
            "symlink": str(tmp_path / "out.jsonl")}[how]
  if how == "symlink":
    os.symlink(prompts, output)
  # then the run is refused (it would count every prompt as done), and the file is untouched.
  before = prompts.read_text()
  with pytest.raises(results.InputError, match="same file"):
    offline.run(_tiny_config(), [], str(prompts), output, compare_ar=False, multihost=False)
  assert prompts.read_text() == before


def _settings(config):
  setup = common.resolve(config)
  return results.run_settings(config, setup, common.load_tokenizer(config, setup), k_max=8)


@pytest.mark.parametrize("change, named", [
    (lambda c: c.sampling.update(seed=1), "seed is 0 in the file, 1 now"),
    (lambda c: c.sampling.update(max_new_tokens=16), "max_new_tokens is 8 in the file, 16 now"),
    (lambda c: c.engine.update(k=2), "k is 4 in the file, 2 now"),
    (lambda c: c.engine.update(adaptive_k=True), "adaptive_k is false in the file, true now"),
    (lambda c: c.sampling.update(temperature=0.5), "temperature is 0.8"),
    (lambda c: c.sampling.update(top_p=1.0), "top_p is 0.95"),
    (lambda c: c.sampling.update(top_k=5), "top_k is 0"),
    (lambda c: c.engine.update(num_slots=3), "num_slots is 2"),
    (lambda c: c.draft.fields.update(num_layers=2), "draft is name=random_tiny_draft"),
    (lambda c: c.model.fields.update(name="other"), "target is name=random_tiny_target"),
])
def test_resuming_into_an_output_made_with_other_settings_is_refused(tmp_path, monkeypatch,
                                                                     change, named):
  _no_weights_or_compiles(monkeypatch)
  # Given an output holding the lines of a finished run,
  config = _tiny_config()
  out = tmp_path / "out.jsonl"
  out.write_text("".join(_result(i, **_settings(config)) for i in range(2)))
  before = out.read_text()
  # when it is resumed with one setting changed,
  change(config)
  # then the run refuses, naming the setting, and leaves the file alone;
  with pytest.raises(results.InputError, match=f"other settings.*{re.escape(named)}"):
    offline.run(config, ["a", "b", "c"], None, str(out), compare_ar=False, multihost=False)
  assert out.read_text() == before


def test_resuming_with_other_settings_appends_only_when_asked_and_says_so(tmp_path, monkeypatch):
  _no_weights_or_compiles(monkeypatch)
  config = _tiny_config()
  out = tmp_path / "out.jsonl"
  out.write_text("".join(_result(i, **_settings(config)) for i in range(2)))
  # Lines from before settings were recorded, and a prompt whose text changed, both count.
  out.write_text(out.read_text().replace('"settings": {', '"old": {', 1))
  config.sampling.seed = 7
  with pytest.raises(results.InputError, match="records no settings.*seed is 0 in the file, 7 now"
                     ".*--append_other_settings"):
    offline.run(config, ["p0", "changed"], None, str(out), compare_ar=False, multihost=False)
  with pytest.raises(results.InputError, match="prompt 1 has another text"):
    offline.run(config, ["p0", "changed"], None, str(out), compare_ar=False, multihost=False)
  summary = offline.run(config, ["p0", "p1"], None, str(out), compare_ar=False, multihost=False,
                       append_other_settings=True)
  assert summary["note"] == "every prompt already done"
  assert "seed is 0 in the file, 7 now" in summary["mixed_settings"]


def test_a_checkpoints_tokenizer_must_be_the_one_given_unless_overridden(monkeypatch):
  _no_weights_or_compiles(monkeypatch)
  # Given the shipped pair (trained with the stdlib sentencepiece model) and the byte tokenizer,
  from configs import default
  config = default.get_config()
  config.model.tokenizer = config.draft.tokenizer = "bytes"
  setup = common.resolve(config)
  # then the mismatch is refused, naming both checkpoints and how to override,
  with pytest.raises(common.SetupError, match=r"'bytes' is not the tokenizer the checkpoint was "
                     r"made with \(target .*: 'sp:.*; draft .*: 'sp:.*--config.model.fields."
                     r"tokenizer=bytes --config.draft.fields.tokenizer=bytes"):
    common.load_tokenizer(config, setup)
  # and accepted once the user says they mean it.
  config.model.fields.tokenizer = config.draft.fields.tokenizer = "bytes"
  setup = common.resolve(config)
  assert common.load_tokenizer(config, setup).name == "bytes"


# Mistakes on the command line of any launcher.
USER_MISTAKES = [
    (["launch.sample", "--config.sampling.temprature=0.5"],
     "--config.sampling.temprature=0.5: the config has no field 'sampling.temprature'"),
    (["launch.plan", "--config=configs/tiny_random.py", "--config.sampling.nope=1"],
     "no field 'sampling.nope'"),
    (["launch.sample", "--config=configs/nope.py"], "--config=configs/nope.py: no such config"),
    (["launch.train", "--config=configs/train.py:nope"], "takes target, distill or draft"),
    (["launch.sample", "--config.engine.k=many"], "--config.engine.k=many"),
    (["launch.benchmark", "--output_dir=OUT", "--ks=abc"], "--ks takes comma-separated integers"),
    (["launch.benchmark", "--output_dir=OUT", "--batches=0"], "--batches must be positive, got 0"),
    (["launch.sample", "--output=OUT/o.jsonl", "stray"], "unexpected argument 'stray'"),
    (["launch.benchmark", "--output_dir=OUT", "stray"], "unexpected argument 'stray'"),
    (["launch.plan", "stray"], "unexpected argument 'stray'"),
    (["launch.convert", "--from=hf", "--src=x", "--dst=y", "stray"], "unexpected argument"),
    (["launch.train", "stray"], "unexpected argument 'stray'"),
    (["launch.evaluate_pair", "stray"], "unexpected argument 'stray'"),
    (["launch.convert", "--from=hf", "--src=OUT/none", "--dst=OUT/d"], "is not a directory"),
]


@pytest.mark.parametrize("argv, says", USER_MISTAKES)
def test_user_mistakes_end_in_one_line_not_a_traceback(mistake_runs, argv, says):
  # Given a mistake on the command line of any launcher,
  out, runs = mistake_runs
  r = runs[USER_MISTAKES.index((argv, says))]
  # then it exits non-zero with one line that says what is wrong (all it prints, stdout and
  # stderr together): no traceback, no flag help,
  assert r["rc"] != 0
  lines = r["log"].strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r["log"][-2000:]
  assert says in lines[0]
  # and (--batches) blames only the flag at fault.
  assert "--ks" not in lines[0] or "--ks" in says
  assert not (out / "o.jsonl").exists()


_TINY = ["--config=configs/tiny_random.py", "--config.model.checkpoint=",
         "--config.draft.checkpoint="]
_TRAIN = ["launch.train", "--config=configs/train.py:draft", "--config.steps=1",
          "--config.seconds=5", "--config.eval_windows=1", "--config.batch=2",
          "--config.seq_len=16", "--config.output=OUT/trained"]
_SAMPLE = ["launch.sample", *_TINY, "--prompt=x = 1", "--output=OUT/o.jsonl", "--nocompare_ar"]
_BENCH = ["launch.benchmark", *_TINY, "--output_dir=OUT/bench", "--ks=0", "--batches=1",
          "--max_new_tokens=2", "--repeats=1", "--step_repeats=1"]
_PLAN = ["launch.plan", *_TINY, "--topology=1x1", "--context=256"]
_EVAL = ["launch.evaluate_pair", "--num_prompts=1", "--prompt_len=8", "--max_new_tokens=2",
         "--repeats=1", "--seq_len=8", "--eval_windows=1"]
_CONVERT = ["launch.convert", "--src=OUT/hf", "--dst=OUT/converted"]

# Each of these used to fail late (after training, evaluating or loading weights) with a
# traceback, or to do something else than asked without a word.
LATE_MISTAKES = [
    (_TRAIN + ["--config.save_dtype=bfloat61"], "save_dtype must be one of"),
    (_TRAIN + ["--config.save_dtype=int8"], "save_dtype must be one of"),
    (_TRAIN + ["--config.output=OUT/a_file/trained"], "is a file, not a directory"),
    (_TRAIN + ["--config.model.num_kv_heads=3"], "multiple of num_kv_heads"),
    (_TRAIN + ["--config.batch=0"], "--config.batch must be a positive integer"),
    (_TRAIN + ["--config.steps=0"], "--config.steps must be a positive integer"),
    (_SAMPLE + ["--config.sampling.seed=-1"], "sampling.seed must be >= 0"),
    (_SAMPLE + ["--config.engine.prefill_rows=0"], "engine.prefill_rows must be >= 1"),
    (_SAMPLE + ["--config.engine.rounds_per_step=-1"], "engine.rounds_per_step must be 0"),
    (_SAMPLE + ["--config.model.fields.dtype=bfloat61"], "dtype must be one of"),
    (_BENCH + ["--repeats=0"], "--repeats must be >= 1"),
    (_BENCH + ["--step_repeats=0"], "--step_repeats must be >= 1"),
    (_BENCH + ["--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
    (_BENCH + ["--cache_len=8"], "--cache_len=8 cannot hold the longest prompt"),
    (_BENCH + ["--output_dir=OUT/a_file"], "--output_dir"),
    (_BENCH + ["--quantize="], "--quantize takes distinct forms"),
    (_BENCH + ["--quantize=none,none"], "--quantize takes distinct forms"),
    (_PLAN + ["--max_new_tokens=-5"], "--max_new_tokens must be >= 1"),
    (_PLAN + ["--batch=0"], "--batch must be >= 1"),
    (_PLAN + ["--output_json=OUT/none/x.json"], "is not a writable directory"),
    (_EVAL + ["--k=-1"], "--k must be >= 1"),
    (_EVAL + ["--num_prompts=0"], "--num_prompts must be >= 1"),
    (_EVAL + ["--dtype=int8"], "--dtype must be one of"),
    (_EVAL + ["--output=OUT/none/e.json"], "is not a writable directory"),
    (_EVAL + ["--draft=a=x", "--draft=a=y"], "--draft label 'a' is given twice"),
    (_EVAL + ["--target=OUT/none"], "OUT/none"),
    (_CONVERT + ["--from=hf", "--dtype=int8"], "weights convert to one of"),
    (_CONVERT + ["--from=hf", "--dst=OUT/a_file/x"], "is a file, not a directory"),
    (_CONVERT + ["--from=reference", "--dtype=bfloat61"], "weights convert to one of"),
    # Launchers that ran under app.run with their own parsing: tracebacks and pages of help.
    (["launch.serve", "--config.sampling.temprature=0.5"], "no field 'sampling.temprature'"),
    (["launch.serve", "stray"], "unexpected argument 'stray'"),
    (["launch.serve", *_TINY, "--config.engine.prefill_rows=0"], "engine.prefill_rows must be"),
    (["launch.serve_bench", *_TINY, "--output_dir=OUT/sb", "--clients=a"],
     "--clients takes comma-separated integers"),
    (["launch.serve_bench", *_TINY, "--output_dir=OUT/sb", "--draft_kinds=ngram,ngram"],
     "--draft_kinds must name distinct kinds"),
    (["launch.compare_quant", "--checkpoint=OUT/none"], "OUT/none"),
    (["launch.compare_quant", "--windows=0"], "--windows must be >= 1"),
    # Held-out windows are encoded with the shipped tokenizer: another model's ids mean nothing.
    (["launch.compare_quant", "--checkpoint=OUT/bytes_model"], "use --tokens=random"),
]


def _mistake_commands(out):
  """USER_MISTAKES then LATE_MISTAKES in one directory (OUT) that holds what LATE_MISTAKES
  name."""
  (out / "a_file").write_text("")
  (out / "hf").mkdir()
  (out / "hf" / "config.json").write_text(json.dumps(dict(
      architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4)))
  import jax
  from spec_tpu.checkpoints import checkpoint
  from spec_tpu.models import config as config_lib, model
  cfg = config_lib.get_preset("tiny").replace(tokenizer="bytes")
  checkpoint.save(out / "bytes_model", model.init_params(cfg, jax.random.key(0)), cfg)
  return [[a.replace("OUT", str(out)) for a in argv]
          for argv, _ in USER_MISTAKES + LATE_MISTAKES]


@pytest.fixture(scope="module")
def one_device_launches(request, tmp_path_factory):
  """The launcher runs on one device that this session's tests ask for, one after another in
  one process, each as `python -m launch.X` runs it (tests/run_launchers.py: the launchers'
  flag parsing and main, not an interpreter and a JAX start each): first the mistakes (OUT, and
  each command's run: {"rc", "log"}), then the default command, uninterrupted, at K = 4 and
  (where test_the_default_config_writes_the_same_texts_at_any_k runs) without speculation
  ({K: its output's lines})."""
  tmp = tmp_path_factory.mktemp("one_device")
  chosen = _selected(request, "test_user_mistakes_end_in_one_line_not_a_traceback",
                     "test_late_mistakes_end_in_one_line_before_any_work",
                     "test_the_default_config_writes_the_same_texts_at_any_k",
                     "test_sigkilled_run_resumes_and_finishes_every_prompt_exactly_once")
  names = list(chosen)
  out = tmp / "mistakes"
  out.mkdir()
  mistakes = (_mistake_commands(out) if chosen[names[0]] or chosen[names[1]] else [])
  ks = ([4] if chosen[names[2]] or chosen[names[3]] else []) + [0] * chosen[names[2]]
  runs = _launch_in_one_process(
      tmp, mistakes + [_default_sample(tmp / f"k{k}.jsonl", k) for k in ks], _env(devices=1))
  samples = {}
  for k, run in zip(ks, runs[len(mistakes):]):
    assert run["rc"] == 0, run["log"][-3000:]
    samples[k] = _read(tmp / f"k{k}.jsonl")
  return (out, runs[:len(mistakes)]), samples


@pytest.fixture(scope="module")
def mistake_runs(one_device_launches):
  """USER_MISTAKES then LATE_MISTAKES, each run as `python -m launch.X` runs it, one after
  another in one process: (OUT, each command's run)."""
  return one_device_launches[0]


def test_a_mistake_in_a_fresh_interpreter_prints_one_line():
  # The mistakes above run where JAX has started and earlier commands' modules are loaded; a
  # user's `python -m` starts bare, and whatever it prints on the way counts too.
  r = subprocess.run([sys.executable, "-m", "launch.sample", "--config.sampling.temprature=0.5"],
                     cwd=REPO, env=_env(devices=1), capture_output=True, text=True, timeout=300)
  said = (r.stdout + r.stderr).strip().splitlines()
  assert r.returncode != 0 and len(said) == 1, said
  assert said[0].startswith("error: ") and "sampling.temprature" in said[0]


def test_late_mistakes_end_in_one_line_before_any_work(mistake_runs):
  # Given mistakes that used to surface only after the work (a training run, an evaluation,
  # loaded weights) or not at all, each run as `python -m launch.X` runs it (one process for all),
  out, runs = mistake_runs
  for (argv, says), r in zip(LATE_MISTAKES, runs[len(USER_MISTAKES):]):
    # then each ends with status 1 and one line saying what is wrong, no traceback,
    errors = [line for line in r["log"].splitlines() if line.startswith("error: ")]
    assert r["rc"] == 1 and "Traceback" not in r["log"] and len(errors) == 1, (argv, r["log"])
    assert says.replace("OUT", str(out)) in errors[0], (argv, errors[0])
  # and nothing was trained, converted, sampled or benchmarked.
  for made in ("trained", "o.jsonl", "bench", "sb", "converted", "none"):
    assert not (out / made).exists(), made


def test_quantizing_a_recurrent_checkpoint_on_load_is_refused_in_one_line(tmp_path, monkeypatch):
  # Given a checkpoint of a RecurrentGemma model (its stored config is all resolve reads),
  from spec_tpu.checkpoints import checkpoint
  from spec_tpu.models import config as config_lib
  (tmp_path / "rg").mkdir()
  monkeypatch.setattr(checkpoint, "load_config",
                      lambda path: config_lib.get_preset("tiny_recurrentgemma"))
  c = _tiny_config()
  c.model.checkpoint, c.model.quantize = str(tmp_path / "rg"), "int8"
  # then serving it as int8 is refused as a user error, naming the checkpoint.
  with pytest.raises(common.SetupError, match="rg: bad ModelConfig.*quantize is not supported"):
    common.resolve(c)


def _default_sample(output, k):
  """The default command as a user runs it (the embedded pair, in float32 as the default config
  loads it, its 6 prompts, 4 slots, temperature, top-p and 64 new tokens, on one CPU device),
  at a fixed K."""
  return ["launch.sample", f"--output={output}", "--nocompare_ar",
          "--config.engine.adaptive_k=False", f"--config.engine.k={k}"]


@pytest.fixture(scope="module")
def default_runs(one_device_launches):
  """The default command, uninterrupted, at K = 4 and (where
  test_the_default_config_writes_the_same_texts_at_any_k runs) without speculation, one after
  the other in one process: {K: its output's lines}."""
  return one_device_launches[1]


@pytest.mark.slow  # two launcher runs with the real pair: ~15-30 s on 2 cores
def test_the_default_config_writes_the_same_texts_at_any_k(default_runs):
  # Given the default command as a user runs it, when it runs once at K = 4 and once without
  # speculation,
  lines = [default_runs[k] for k in (4, 0)]
  assert [{r["stats"]["k"] for r in run} for run in lines] == [{4}, {0}]  # each its own K
  texts = [{r["id"]: (r["tokens"], r["text"]) for r in run} for run in lines]
  # then both wrote the same text for every prompt (in bfloat16, 3 of these 6 texts split on a
  # near-tie that the K + 1-token verification and the 1-token step round apart).
  assert len(texts[0]) == 6 and texts[0] == texts[1]


def test_sigkilled_run_resumes_and_finishes_every_prompt_exactly_once(default_runs, tmp_path):
  # Given the output of the default command, uninterrupted, at K = 4 (one device: what is
  # checked is the output file across a kill, not the mesh; sampling on 1x8 is the tests' above
  # and test_multihost's),
  expected = {r["id"]: r for r in default_runs[4]}
  n = len(expected)
  assert n == 6
  env = _env(devices=1)
  # when a run of the same command without speculation (the default coupling, gumbel, makes the
  # text independent of K; its programs are in the suite's compilation cache where the test
  # above ran) is SIGKILLed as soon as its first lines are on disk (its 4 slots finish 4
  # prompts about together; the last 2 then take 64 more steps),
  output = tmp_path / "out.jsonl"
  command = [sys.executable, "-m", *_default_sample(output, 0)]
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      if output.exists() and output.read_bytes().count(b"\n") >= 2:
        break
      time.sleep(0.005)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  before_kill = output.read_bytes()
  written = before_kill.count(b"\n")
  assert 2 <= written < n, f"the kill landed after {written} of {n} lines"
  # (and, as a kill in the middle of a write would, leaves a torn last line, of a prompt not
  # yet written),
  done = {json.loads(line)["id"]
          for line in before_kill[:before_kill.rindex(b"\n") + 1].splitlines()}
  torn = max(set(expected) - done)
  with open(output, "ab") as f:
    f.write(b'{"id": %d, "prompt": "def read_json(pa' % torn)
  # then a restart finishes the rest, keeping the lines already written as they were: every id
  # exactly once, each with the tokens and text of the uninterrupted run at K = 4,
  subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  assert output.read_bytes().startswith(before_kill[:before_kill.rindex(b"\n") + 1])
  lines = _read(output)
  assert sorted(r["id"] for r in lines) == sorted(expected)
  text = lambda r: (r["id"], r["prompt"], r["tokens"], r["text"])
  assert sorted(map(text, lines)) == sorted(map(text, expected.values()))
  # and every line, before the kill or after, records the same settings: those of K = 0 (which
  # runs no draft).
  k0 = dict(expected[0]["settings"], k=0, draft=None)
  assert all(r["settings"] == k0 and r["stats"]["k"] == 0 for r in lines)


_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# The tiny target with a vision encoder, a multimodal draft (its own encoder) and 3 image blocks
# in each row's prompt, on 2x8: two tests' plan.
_TINY_2X8 = ["--config=configs/tiny_random.py", "--topology=2x8", "--batch=2", "--context=128",
             "--config.sampling.max_new_tokens=16", "--config.model.preset=tiny_vision",
             "--config.draft.preset=tiny_vision", "--images=3"]
# The plans of the tests below, by name (a test's, or tiny_2x8): each its launch.plan flags.
_PLANS = {
    "tiny_2x8": _TINY_2X8,
    "test_plan_chinchilla_70b_on_16_devices": [
        "--config=configs/chinchilla_70b.py", "--topology=1x16", "--batch=1", "--context=2048"],
    "test_plan_compiles_for_a_tpu_and_estimates_speed": [
        "--config=configs/tiny_random.py", "--tpu=v5e:2x4", "--topology=1x8", "--batch=1",
        "--context=64", "--config.sampling.max_new_tokens=8", "--config.model.preset=tiny_vision",
        "--images=1", "--acceptance=0.5,0.9"],
    "test_plan_reports_recurrent_states_and_verification_traces": [
        "--config=configs/recurrentgemma_9b.py", "--topology=1x8", "--batch=1", "--context=40",
        "--config.sampling.max_new_tokens=16", "--config.model.fields.num_layers=3",
        "--config.draft.fields.num_layers=3", "--config.model.fields.vocab_size=2048",
        "--config.draft.fields.vocab_size=2048"],
}


@pytest.fixture(scope="module")
def plans(request, tmp_path_factory):
  """The plans of _PLANS that this session's tests ask for, one after another in one process
  as `python -m launch.plan` runs each (each compiles programs of its own: a process each would
  add only its start-up), at XLA:TPU's default compile effort, all with the persistent
  compilation cache the config names (not JAX's env var), a fresh one that tiny_2x8, first,
  starts: a function of a plan's name that returns its run ({"rc", "log"}) and report; its
  `cache` the cache's directory."""
  tmp = tmp_path_factory.mktemp("plans")
  cache = tmp / "compile_cache"
  tiny = {"test_plan_tiny_on_2x8_reports_memory",
          "test_second_plan_loads_its_program_from_the_compile_cache"}
  chosen = _selected(request, *_PLANS, *tiny)
  wanted = (["tiny_2x8"] if any(chosen[name] for name in tiny) else []) + [
      name for name in _PLANS if chosen[name]
      and (_HAS_LIBTPU or name != "test_plan_compiles_for_a_tpu_and_estimates_speed")]
  commands = [["launch.plan", *_PLANS[name], f"--config.run.compile_cache={cache}",
               f"--output_json={tmp / name}.json"] for name in wanted]
  runs = dict(zip(wanted, _launch_in_one_process(tmp, commands, _plan_env(devices=16))))

  def plan(name):
    assert runs[name]["rc"] == 0, runs[name]["log"][-3000:]
    return runs[name], json.loads((tmp / f"{name}.json").read_text())
  plan.cache = cache
  return plan


def _plan_env(devices):
  # A plan run alone asks for the CPU devices its mesh needs; in a shared process they are the
  # process's, from the start: 16, the largest mesh's (a 1x8 mesh takes 8 of them).
  env = _env(devices)
  del env["JAX_COMPILATION_CACHE_DIR"]  # the config's run.compile_cache: the one tested
  # launch.plan --tpu loads libtpu (no TPU attached; other tests' processes may hold it too).
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_ACCELERATOR_TYPE="v5litepod-8",
             TPU_WORKER_HOSTNAMES="localhost")
  return env


@pytest.mark.slow
def test_plan_chinchilla_70b_on_16_devices(plans):
  # Given Chinchilla 70B + 4B on a simulated 1x16 mesh (abstract params: nothing allocated),
  run, report = plans("test_plan_chinchilla_70b_on_16_devices")
  # then the weights split 16 ways (~8.6 GB per device of bf16 70B + 4B),
  weights = report["analytic"]["weights"]
  assert 8.0e9 < weights["target"] < 9.0e9 and 0.4e9 < weights["draft"] < 0.6e9
  assert report["compiled"]["arguments"] >= weights["target"] + weights["draft"]
  # and, with ~9 GiB needed per device, it fits every chip (v5e's 16 GiB included).
  assert report["mesh"] == {"data": 1, "model": 16}
  assert weights["target"] < report["estimated_need"] < 12 * 2**30
  assert all(report["fits"].values())
  assert "TPU v5e" in run["log"] and "DOES NOT FIT" not in run["log"]


@pytest.fixture(scope="module")
def tiny_plan_2x8(plans, tmp_path_factory):
  """The _TINY_2X8 plan, the first in the plans' process (it filled their compilation cache
  from empty): (a function that runs it again in a fresh process, as a user's second
  `python -m launch.plan` would, (the first run, its report), the cache)."""
  tmp = tmp_path_factory.mktemp("tiny_plan")

  def again():
    report_path = tmp / "again.json"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.plan", *_TINY_2X8,
         f"--config.run.compile_cache={plans.cache}", f"--output_json={report_path}"],
        cwd=REPO, env=_plan_env(devices=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report_path.read_text())

  return again, plans("tiny_2x8"), plans.cache


def test_plan_tiny_on_2x8_reports_memory(tiny_plan_2x8):
  # Given the tiny target with a vision encoder, a multimodal draft (its own encoder) and 3
  # image blocks in each row's prompt,
  _, (run, report), _ = tiny_plan_2x8
  assert report["mesh"] == {"data": 2, "model": 8}
  assert report["compiled"]["total"] > 0 and all(report["fits"].values())
  # then each encoder's own program is planned over the batch's 6 images, its weights counted
  # among its model's, and the need is the largest program's with the other weights.
  e, d = report["encoder"], report["draft_encoder"]
  weights = report["analytic"]["weights"]
  assert report["images_per_row"] == 3 and e["images"] == d["images"] == 6
  assert 0 < e["weights"] < weights["target"] and e["temporaries"] > 0
  assert 0 < d["weights"] < weights["draft"] and d["temporaries"] > 0
  assert report["estimated_need"] == max(
      report["compiled"]["total"] + e["weights"] + d["weights"], e["need"], d["need"])
  # (all weights stay resident while one encoder runs)
  assert e["need"] - e["total"] == weights["target"] + weights["draft"] - e["weights"]
  assert d["need"] - d["total"] == weights["target"] + weights["draft"] - d["weights"]
  assert "vision encoder, its own program" in run["log"]
  assert "the draft's vision encoder, its own program" in run["log"]
  # More image blocks than the prompt holds, or images for a text-only model: refused before
  # anything compiles.
  from configs import tiny_random
  from spec_tpu import planning
  config = tiny_random.get_config()
  config.model.preset = "tiny_vision"
  with pytest.raises(ValueError, match=r"^--images=40: 40 image blocks of 8 tokens do not fit "
                                       r"the 107-token prompt; raise --context$"):
    planning.plan(config, (1, 1), 1, 128, None, 16, images=40)
  config.model.preset = "tiny"
  with pytest.raises(ValueError, match="target 'random_tiny_target' has no vision encoder"):
    planning.plan(config, (1, 1), 1, 128, None, 16, images=1)


@pytest.mark.skipif(not _HAS_LIBTPU, reason="needs libtpu")
def test_plan_compiles_for_a_tpu_and_estimates_speed(plans):
  # Given the tiny pair and a TPU v5e 2x4 slice described by libtpu (no TPU attached),
  run, report = plans("test_plan_compiles_for_a_tpu_and_estimates_speed")
  # when it plans the decode program there,
  assert report["platform"] == "tpu" and report["device_kind"] == "TPU v5 lite"
  assert report["fits"] == {"TPU v5 lite": True}
  # then it estimates a target step, a verification of K+1 and a draft step from what the TPU
  # compiler says they read, compute and communicate,
  speed, weights = report["speed"], report["analytic"]["weights"]
  steps = {name: p["seconds"]["total"] for name, p in speed["programs"].items()}
  target = speed["programs"]["target_step"]["cost"]
  assert 0 < target["hbm_bytes"] <= weights["target"] + report["analytic"]["kv_caches"]["target"]
  assert target["collectives"] > 0 and target["flops"] > 0  # tensor parallel over 8 devices
  assert 0 < steps["draft_step"] < steps["target_step"] <= steps["verify"]
  # (with an image a row: the encoder's cost per image beside them, its flops extrapolated
  # from one and two encoder layers to the model's),
  image = speed["programs"]["encode_image"]["cost"]
  assert image["flops"] > 0 and 0 < image["hbm_bytes"] < weights["target"]
  # and the expected speedup grows with the acceptance rate.
  low, high = speed["speculative"]["0.5"], speed["speculative"]["0.9"]
  assert low["speedup"] < high["speedup"] and low["c"] == high["c"] < 1
  assert "ESTIMATE" in run["log"]


def test_second_plan_loads_its_program_from_the_compile_cache(tiny_plan_2x8):
  # Given a plan that ran with the persistent compilation cache the config names, empty before
  # (the tiny vision pair's: its decode program and its encoders' program, the same for both
  # encoders; the plans after it in its process stored theirs there too),
  plan_again, (_, report), cache = tiny_plan_2x8
  first, files = report["compile_cache"], sorted(os.listdir(cache))
  # when the same plan runs again in a fresh process,
  again = plan_again()
  second = again["compile_cache"]
  # then the first compiled and stored its programs (the draft's encoder loaded the target's),
  # and the second loads every one of them.
  assert first["dir"] == str(cache) and first["misses"] >= 2 and files
  assert second["hits"] == first["hits"] + first["misses"] and second["misses"] == 0
  assert sorted(os.listdir(cache)) == files
  assert again["compiled"] == report["compiled"] and again["encoder"] == report["encoder"]


def test_bandwidth_is_measured_as_a_decode_step_reads_memory():
  import jax
  import numpy as np
  from spec_tpu import benchmark, profiling, sharding
  # Given the machine's memory bandwidth as numpy's copy moves it (read + write), on the 8
  # simulated devices of this process,
  mesh = sharding.make_mesh((1, jax.device_count()))
  nbytes = 1 << 28  # far beyond any CPU cache
  src, dst = np.ones(nbytes // 4, np.float32), np.zeros(nbytes // 4, np.float32)
  copy, probe = 0.0, 0.0
  for _ in range(3):  # interleaved, best of each: other work on the machine only slows either
    start = time.perf_counter()
    np.copyto(dst, src)
    copy = max(copy, 2 * nbytes / (time.perf_counter() - start))
    probe = max(probe, profiling.measure_bandwidth(mesh, nbytes, repeats=3) * mesh.size)
  del src, dst
  # then the benchmark's probe, every device reading its shard of a weight matrix at once, gets
  # a good part of it (a copy on one simulated device got a tenth: 378% "utilisation" followed),
  assert mesh.size == 8 and probe > 0.3 * copy, (probe, copy)
  # and a utilisation above 100% is marked and explained as not being a bandwidth.
  point = lambda util: dict(batch=1, k=0, ms_per_token=1.0, tokens_per_s=1.0, acceptance=None,
                            cost_ratio_c=0.1, speedup=1.0, ideal_speedup=1.0,
                            measured_over_ideal=1.0, verify_cost=1.0, bandwidth_utilisation=util,
                            target_mib_per_step=1.0)
  result = lambda util: dict(target="t", draft=None, num_devices=8, device="cpu", mesh={},
                             bandwidth_bytes_per_s=1e10, random_weights=False,
                             points=[point(util)])
  over, under = benchmark.format_table(result(3.78)), benchmark.format_table(result(0.58))
  assert "378.0%*" in over and "not a memory-bandwidth utilisation" in over
  assert "58.0%" in under and "*" not in under.splitlines()[-1]
  assert "not a memory" not in under


def test_ideal_speedup_matches_leviathan_formula():
  assert k_policy.ideal_speedup(0.0, 0.1, 4) == 1 / 1.4
  assert abs(k_policy.ideal_speedup(0.8, 0.05, 4) - (1 - 0.8 ** 5) / (0.2 * 1.2)) < 1e-12
  assert k_policy.ideal_speedup(1.0, 0.0, 3) == 4.0
  assert k_policy.ideal_speedup(0.5, 0.1, 0) == 1.0


def test_checkpoint_weights_are_restored_onto_the_mesh(tmp_path):
  import jax
  import numpy as np
  from spec_tpu.checkpoints import checkpoint
  from spec_tpu.models import model
  from spec_tpu import sharding
  # Given a saved tiny target and a config pointing at it (its preset fields say otherwise),
  config = _tiny_config()
  cfg = common.resolve(config, need_weights=False).target.cfg.replace(name="saved_target")
  params = model.init_params(cfg, jax.random.key(7))
  checkpoint.save(tmp_path / "ckpt", params, cfg)
  config.model.checkpoint = str(tmp_path / "ckpt")
  config.model.allow_random = False
  # Shape-neutral fields still apply over the checkpoint (the draft must agree on the vocabulary).
  config.model.fields.valid_vocab_size = config.draft.fields.valid_vocab_size = 2000
  # when the launcher glue resolves and loads it on a 1x8 mesh,
  setup = common.resolve(config)
  mesh = common.build_mesh(config)
  loaded = common.load_params(setup.target, mesh)
  # then the checkpoint's config and weights are used, sharded by the rule table.
  assert setup.target.cfg.name == "saved_target" and not setup.target.random
  assert setup.target.cfg.valid_vocab_size == 2000
  np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(params["embed"]))
  want = sharding.param_shardings(cfg, mesh)["groups"][0]["ffw"]["up"]
  assert loaded["groups"][0]["ffw"]["up"].sharding.is_equivalent_to(want, 3)


def test_plan_reports_recurrent_states_and_verification_traces(plans):
  # Given RecurrentGemma 9B verified by 2B (3 layers each: 2 recurrent, 1 local) on 1x8, K = 4
  # (a 2048-token vocabulary and a short context: neither changes a recurrent layer's bytes),
  run, report = plans("test_plan_reports_recurrent_states_and_verification_traces")
  a = report["analytic"]
  # then per device (width split 8 ways) each recurrent layer holds a float32 state and 3 bf16
  # conv inputs: 2 layers x (4096 x 4 + 3 x 4096 x 2) bytes / 8 for the 9B,
  assert a["recurrent_states"] == {"target": 2 * (4096 * 4 + 3 * 4096 * 2) // 8,
                                   "draft": 2 * (2560 * 4 + 3 * 2560 * 2) // 8}
  # and a verification keeps a state and a conv input per position: K + 1 for the target, the
  # K - 1 single steps for the draft,
  assert a["verification_traces"] == {"target": 2 * 5 * 4096 * (4 + 2) // 8,
                                      "draft": 2 * 3 * 2560 * (4 + 2) // 8}
  assert "target verification trace" in run["log"]


def test_benchmarks_skip_the_plot_without_matplotlib(tmp_path, monkeypatch):
  # Given an install without the bench extra (matplotlib is not a core dependency),
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  # then the plots of launch.benchmark and launch.serve_bench (both ask common.pyplot) are
  # skipped, logged, instead of failing after the results were made.
  assert reports.pyplot(str(tmp_path / "speedup_vs_k.png")) is None
