"""Every command the README, the docs (docs/*.md) and the config docstrings show runs, so a config
or a documented command that cannot run is caught here rather than by a user.

The commands are collected from the documents themselves: a new one is run by default. Each runs
as written, with only (1) the shrinking overrides of the small tables below appended (a later flag
wins), (2) placeholder paths (/ckpt/..., /models/..., /tmp/..., prompts.jsonl) moved into a
temporary directory, and (3) the inputs a user would bring (a Hugging Face model directory, a
tokenizer file, checkpoints of the big presets, a prompts file) made tiny there, only where no
earlier command makes them. Commands run in document order (README.md, docs/*.md, configs/*.py),
so one command's output feeds a later one as the documents intend (launch.train's draft feeds
launch.evaluate_pair, and launch.convert's Gemma 2 2B is the draft the Gemma 2 sample command
reads).

Commands that are the same once shrunk (the results file shows the command behind each figure,
and several differ only in a value the shrinking replaces) run once; the others' tests report the
run they share. A command whose program has no row in SHRINK or NOT_RUN fails the coverage test:
a new launcher must say how it is shrunk before it can be left to run at full size; a table row
no command uses fails it too. The commands run in three processes side by side
(tests/run_launchers.py runs many commands per process, and all use the suite's persistent JAX
compilation cache, so a program that several commands compile is compiled once): launch.plan on
16 simulated devices (the documented topologies), the benchmark launchers and the rest each on
one device.
"""

import ast
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# ---------------------------------------------------------------- the tables

# Commands the documents show that are not launcher runs, and why they are not run here.
NOT_RUN = {
    "venv": "creates the environment this suite already runs in",
    "pip": "installs the package this suite already imports (needs the network)",
    "pytest": "is this test suite",
    "launch.serve": "serves until stopped; tests/test_serve.py starts the server and talks to it",
    "lm_eval": "evaluates through a running server; tests/test_eval_harness.py runs its "
               "local-completions model against one, with a local task file",
    "-c": "inline Python that writes a random transformers model to convert; the suite makes its "
          "stand-in Hugging Face models the same way (_make_hf_model), and the launch.convert "
          "commands that follow run on it",
}

# Draft tokens per round: K = 1 runs the same program as any K, and adaptive K then calibrates
# and chooses between two compiled rounds (0 and 1) rather than five (0, 1, 2, 4, 8).
_ONE_K = ["--config.engine.k=1", "--config.engine.k_max=1"]
_SMALL_VOCAB = [f"--config.{m}.fields.vocab_size=2048" for m in ("model", "draft")]


# Appended to every command of a launcher: fewer tokens, layers, repeats and seconds; the same code.
SHRINK = {
    # One slot length for every prompt set: the sample commands of one config then share their
    # compiled rounds through the compilation cache.
    "launch.sample": ["--config.sampling.max_new_tokens=4", "--nocompare_ar",
                      "--config.engine.max_len=64", *_ONE_K],
    "launch.benchmark": ["--ks=0", "--batches=1", "--max_new_tokens=2", "--repeats=1",
                         "--step_repeats=1"],
    # A short context (a 7-token prompt at K = 4): the TPU compiler's time grows with the
    # prefill's length (a recurrent pair's TPU plan: 42 s of CPU time at 64, 36 s at 20). A
    # 2048-token vocabulary: much of the TPU compiler's time is the sampling over the vocabulary
    # (the logits, top-k and top-p filters), the same code at any size (that plan: 19.5 s at
    # Gemma's 256k, 11.3 s at 2048); its top-k search most of all (8 s of that plan's 19.5 at
    # 256k), so one plan keeps it (gemma_rg_pair's row below). K = 1: the same programs with one
    # draft step to compile, not four (~2 s less per TPU plan).
    "launch.plan": ["--config.model.fields.num_layers=1", "--config.draft.fields.num_layers=1",
                    "--context=20", "--max_new_tokens=8", "--k=1", *_SMALL_VOCAB,
                    "--config.sampling.top_k=0"],
    "launch.train": ["--config.steps=1", "--config.seconds=600", "--config.batch=2",
                     "--config.seq_len=16", "--config.eval_windows=1"],
    "launch.evaluate_pair": ["--num_prompts=1", "--prompt_len=8", "--max_new_tokens=2",
                             "--repeats=1", "--seq_len=8", "--eval_windows=1", "--show_samples=1"],
    "launch.convert": [],
    "launch.compare_quant": ["--windows=2", "--seq_len=16"],
    "launch.grammar_bench": ["--vocab_sizes=2048", "--samples=2", "--max_new_tokens=4",
                             "--repeats=1", *_ONE_K],
    "launch.side_by_side": ["--batches=1", "--ks=0", "--prompt_len=8", "--max_new_tokens=2",
                            "--repeats=1"],
    "launch.serve_bench": ["--requests=4", "--max_new_tokens=6", "--num_slots=2", "--clients=1,2",
                           "--latency_requests=2", "--repeats=1", *_ONE_K],
}

# A plan's model and draft 1024 wide (heads, head sizes and FFW widths as configured, so
# every weight shards as at full size): the TPU compiler's time grows with the model's width
# (the int8 Chinchilla plan on v5e:2x4, shrunk: 10.2 s of CPU time 8192 wide, 6.5 s 1024
# wide; a narrower FFW changed nothing). Not Gemma 4's, whose assistant reads its target's
# hidden state at the preset's width.
_NARROW = [f"--config.{m}.fields.d_model=1024" for m in ("model", "draft")]

# Appended to the commands of one launcher naming one config (--config=..., as written).
_SMALL_LLAMA = [f"--config.{m}.fields.{k}={v}" for m in ("model", "draft") for k, v in
                dict(num_layers=1, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32,
                     ffw_dim=128).items()]
SHRINK_CONFIG = {
    # Trained weights go under the temporary directory, never over the shipped assets (where
    # :target and :distill write by default); :draft writes where its config says, which is what
    # evaluate_pair's second command reads.
    ("configs/train.py:target", "launch.train"): ["--config.output=/ckpt/trained/target"],
    ("configs/train.py:distill", "launch.train"): ["--config.output=/ckpt/trained/draft"],
    ("configs/train.py:draft", "launch.train"): ["--config.output=/tmp/spec_assets/draft_data"],
    # Its default mesh is 1x16; sampling runs on one device here.
    ("configs/chinchilla_70b.py", "launch.sample"): ["--config.mesh.shape=(1,-1)"],
    # The 27B's padding rows are beyond the 262,144 tokens of the Gemma 3 tokenizer; the stand-in
    # tokenizer here has 2048.
    ("configs/gemma3_27b.py", "launch.sample"): ["--config.model.fields.valid_vocab_size=2048"],
    # The plan that keeps its config's top-k filter (see SHRINK), on a TPU and on CPU.
    ("configs/gemma_rg_pair.py", "launch.plan"): ["--config.sampling.top_k=64", *_NARROW],
    # The 27B's valid vocabulary (the Gemma 3 tokenizer's 262,144) within the shrunk one.
    ("configs/gemma3_27b.py", "launch.plan"): ["--config.model.fields.valid_vocab_size=2048",
                                               *_NARROW],
    ("configs/chinchilla_70b.py", "launch.plan"): _NARROW,
    ("configs/chinchilla_70b.py:2x8", "launch.plan"): _NARROW,
    ("configs/gemma2_27b.py", "launch.plan"): _NARROW,
    ("configs/recurrentgemma_9b.py", "launch.plan"): _NARROW,
    # Random 7B weights would be 13 GB: the same shapes, narrower.
    ("configs/llama_7b_bench.py", "launch.benchmark"): _SMALL_LLAMA,
}

# Appended to the commands of one launcher that give every argument a row names: each a flag
# (whatever its value) or a whole argument as written.
SHRINK_FLAG = {
    # A comparison shrunk to fewer members where every member's code path still runs: a
    # benchmark's "hybrid" source drafts from the n-gram lookup and the model
    # (tests/test_ngram.py compares the sources themselves); a serving benchmark's "auto"
    # engine picks between both too, its "ngram" engine is the one built without a draft
    # model, and its "model" engine is every other serve_bench run's. A benchmark's
    # --draft_kinds and --couplings compare at engine.k (--ks does not apply): K = 1 there, as
    # in every other speculative run here.
    ("launch.benchmark", "--draft_kinds"): ["--draft_kinds=none,hybrid", *_ONE_K],
    ("launch.benchmark", "--couplings"): _ONE_K,
    ("launch.serve_bench", "--draft_kinds"): ["--draft_kinds=auto,ngram"],
    # A TPU plan of both weight forms plans the int8 one: the float one is what the other TPU
    # plans of its config compile (on other topologies), and the forms' side-by-side table
    # comes from the CPU plan of both (configs/default.py's).
    ("launch.plan", "--tpu", "--quantize=none,int8"): ["--quantize=int8"],
    # Gemma 3's image encoder with the image block's delimiters (its ids 255999 and 256000)
    # inside the shrunk vocabulary, and 16 soft tokens an image (4x4, pooled from the same
    # 64x64 patches) rather than 256: the TPU compiler's time grows with the prefill's length
    # (that plan: 18.1 s of CPU time with a 260-token image block, 13.5 s with a 20-token one).
    ("launch.plan", "--config.model.preset=gemma3_27b_vision"): [
        "--config.model.fields.vision.start_id=2045", "--config.model.fields.vision.end_id=2046",
        "--config.model.fields.vision.num_soft_tokens=16"],
    # The prompt must hold the image blocks where a plan asks for images (20 tokens each here).
    ("launch.plan", "--images"): ["--context=40"],
    # The Llama-shaped pair's speculative point (the GPU command's), in the run whose results
    # test_benchmark_writes_table_json_and_plot reads; its other runs compile K = 0 alone.
    ("launch.benchmark", "--output_dir=/tmp/bench_llama_ctx512"): ["--ks=0,1"],
}

# Python examples (an indented block that starts with an import and uses spec_tpu) run as written
# with these replacements: the same calls, smaller. A replacement no example uses fails the
# coverage test.
SHRINK_PYTHON = {
    "num_slots=8": "num_slots=2",
    "max_len=1024, k=4)": "max_len=64, k=1, k_max=1)",  # calibrates two rounds, not five
    "max_new_tokens=64": "max_new_tokens=8",
    "max_new_tokens=32, k=4,": "max_new_tokens=8, k=1,",  # one draft step to compile, not four
}
PYTHON = "python"  # the program of a Python example: its one argument is the code

# The process a launcher's commands run in (default "other") and each process's simulated devices
# (default 1). Most of their time is single-threaded compilation, so the processes run side by
# side: the plans (16 devices for the documented topologies; compiling for TPU is most of the
# suite's share) in one, the benchmark launchers in another and everything else in a third,
# each about a third of the commands' time (no command reads what another process writes).
PROCESS = {"launch.plan": "plans", "launch.benchmark": "benchmarks",
           "launch.serve_bench": "benchmarks", "launch.grammar_bench": "benchmarks"}
DEVICES = {"plans": 16}
# The plans' process asks XLA:TPU for its least compile effort: these runs check that each plan
# compiles and reports, not its figures (tests/test_launch.py checks those at the default
# effort), and the least effort compiles a documented TPU plan about 2.5x faster (recurrentgemma_9b
# on v5e:2x4, shrunk: 57 -> 22 s of CPU time). The programs it makes are scheduled less tightly,
# so a plan's temporaries come out larger (that plan's 36.9 -> 47.2 MiB); the speed estimate is
# unchanged (XLA:CPU, already compiling at its least effort here, gains nothing).
LEAST_COMPILE_EFFORT = {"JAX_OPTIMIZATION_LEVEL": "O0", "JAX_EXEC_TIME_OPTIMIZATION_EFFORT": "-1",
                        "JAX_MEMORY_FITTING_LEVEL": "O0"}

# Placeholders in the documents: absolute paths name places on the user's machine.
_PLACEHOLDER_ROOTS = ("/ckpt/", "/models/", "/tmp/")
# Flags whose relative file names are the command's own files (made, or written, per command).
_OWN_FILE_FLAGS = ("--prompts", "--output", "--output_json")
# Flags that may be given more than once, every occurrence counting; of any other flag the last
# occurrence wins, as absl and ml_collections read them.
_REPEATED_FLAGS = ("--draft", "--prompt", "--checkpoint", "--quantized")
# Where a command writes results no later command reads: commands differing only there do the
# same work.
_RESULT_DIR_FLAGS = ("--output_dir",)

# ---------------------------------------------------------------- collecting


@dataclasses.dataclass(frozen=True)
class Command:
  source: str            # where it is written, "README.md:41"
  text: str              # as written (continuation lines joined)
  program: str           # "launch.sample", or "venv", "pip", "pytest"
  args: tuple[str, ...]  # after the program

  @property
  def config(self) -> str:
    found = [a.split("=", 1)[1] for a in self.args if a.startswith("--config=")]
    return found[-1] if found else ""

  @property
  def id(self) -> str:
    if self.program == PYTHON:
      return f"{self.source} python example"
    return f"{self.source} {self.program} {' '.join(self.args)}"[:150]


def _documents() -> list[tuple[str, str]]:
  docs = []
  for path in [os.path.join(REPO, "README.md"),
               *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]:
    with open(path) as f:
      docs.append((os.path.relpath(path, REPO), f.read()))
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    with open(path) as f:
      docstring = ast.get_docstring(ast.parse(f.read())) or ""
    docs.append((os.path.relpath(path, REPO), docstring))
  return docs


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
  """(program, args) of a shell command, or None if it is not one the documents could mean."""
  while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # VAR=value prefixes
    tokens = tokens[1:]
  if not tokens:
    return None
  exe = os.path.basename(tokens[0])
  if re.fullmatch(r"python3?(\.\d+)?", exe):
    if len(tokens) >= 3 and tokens[1] == "-m":
      return tokens[2], tokens[3:]
    return (tokens[1], tokens[2:]) if len(tokens) > 1 else None  # a script: uncovered
  if exe in ("pip", "pip3", "pytest"):
    return exe.rstrip("3"), tokens[1:]
  return None


def _alternatives(args: list[str]) -> list[list[str]]:
  """`[--a=1 | --b=2]` in a usage line: one command per alternative."""
  for i, first in enumerate(args):
    if not first.startswith("["):
      continue
    for j in range(i, len(args)):
      if args[j].endswith("]"):
        inside = " ".join(args[i:j + 1])[1:-1]
        if "|" not in inside:
          break
        return [variant for choice in inside.split("|")
                for variant in _alternatives(args[:i] + shlex.split(choice) + args[j + 1:])]
  return [args]


def _python_examples(source: str, lines: list[str]) -> list[tuple[int, Command]]:
  """Indented blocks that start with an import and use spec_tpu, dedented, with their first
  line. (The README's `openai` client example talks to a server: tests/test_serve.py runs it.)"""
  examples, n = [], 0
  while n < len(lines):
    if (lines[n].startswith("    ") and (n == 0 or not lines[n - 1].strip())
        and re.match(r"(from|import) \w", lines[n].strip())):
      end = n
      while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
      code = "\n".join(line[4:] for line in lines[n:end]).strip() + "\n"
      if re.search(r"\bspec_tpu\b", code):
        examples.append((n, Command(f"{source}:{n + 1}", code, PYTHON, (code,))))
      n = end
    else:
      n += 1
  return examples


def _shell_commands(source: str, text: str) -> list[tuple[int, Command]]:
  """Every line (continuations joined, `&&` split) that runs one of the programs above."""
  commands, lines, n = [], text.splitlines(), 0
  while n < len(lines):
    start, line = n, lines[n].strip()
    while line.endswith("\\") and n + 1 < len(lines):
      n += 1
      line = line[:-1].rstrip() + " " + lines[n].strip()
    n += 1
    for segment in line.split("&&"):
      try:
        tokens = shlex.split(segment, comments=True)
      except ValueError:
        continue  # prose with an odd quote
      found = _program(tokens)
      if found is None:
        continue
      program, args = found
      commands += [(start, Command(f"{source}:{start + 1}", segment.strip(), program,
                                   tuple(variant))) for variant in _alternatives(args)]
  return commands


def documented_commands() -> list[Command]:
  """Shell commands and Python examples in document order, each the first time it is shown."""
  commands, seen = [], set()
  for source, text in _documents():
    found = _shell_commands(source, text) + _python_examples(source, text.splitlines())
    for _, command in sorted(found, key=lambda f: f[0]):
      if (command.program, command.args) not in seen:
        seen.add((command.program, command.args))
        commands.append(command)
  return commands


COMMANDS = documented_commands()
LAUNCHES = [c for c in COMMANDS if c.program not in NOT_RUN]


def test_every_documented_command_is_covered():
  # Every command is a launcher with shrinking rules, or is listed as not run (with a reason);
  uncovered = [c.text for c in COMMANDS
               if c.program not in SHRINK and c.program not in NOT_RUN and c.program != PYTHON]
  assert not uncovered, f"documented commands with no row in SHRINK or NOT_RUN: {uncovered}"
  # every table row still matches a command (a stale row hides a renamed one),
  programs = {c.program for c in COMMANDS}
  assert not set(NOT_RUN) - programs and not set(SHRINK) - programs
  stale = [key for key in SHRINK_CONFIG
           if not any((c.config, c.program) == key for c in COMMANDS)]
  assert not stale, f"SHRINK_CONFIG rows no documented command uses: {stale}"
  stale = [key for key in SHRINK_FLAG
           if not any(c.program == key[0] and set(key[1:]) <= set(_keys(c.args))
                      for c in COMMANDS)]
  assert not stale, f"SHRINK_FLAG rows no documented command uses: {stale}"
  examples = [c.text for c in COMMANDS if c.program == PYTHON]
  stale = [old for old in SHRINK_PYTHON if not any(old in code for code in examples)]
  assert not stale, f"SHRINK_PYTHON rows no Python example uses: {stale}"
  # and the documents do hold the commands this suite is meant to keep runnable.
  assert {"launch.sample", "launch.benchmark", "launch.plan", "launch.convert", "launch.train",
          "launch.evaluate_pair"} <= programs
  assert any(c.config == "configs/llama_7b_bench.py" and c.source.startswith("docs/")
             for c in LAUNCHES)
  assert any(c.source.startswith("README") for c in LAUNCHES)
  assert len({c.config for c in LAUNCHES if c.config}) >= 9


# ---------------------------------------------------------------- placing and preparing


def _place(value: str, root: str, own_dir: str, own_file: bool) -> str:
  """Where a documented path lives in this run."""
  label, sep, path = value.rpartition("=")  # --draft=label=/path
  if path.startswith(_PLACEHOLDER_ROOTS):
    return f"{label}{sep}{root}{path}"
  if own_file and path and not os.path.isabs(path):
    return f"{label}{sep}{os.path.join(own_dir, path)}"
  return value


def _argv(command: Command, index: int, root: str) -> list[str]:
  own_dir = os.path.join(root, "commands", str(index))
  os.makedirs(own_dir, exist_ok=True)
  if command.program == PYTHON:
    code = command.text
    for old, new in SHRINK_PYTHON.items():
      code = code.replace(old, new)
    return [PYTHON, code]
  extra = (SHRINK.get(command.program, [])  # a program with no row fails the coverage test
           + SHRINK_CONFIG.get((command.config, command.program), []))
  keys = _keys(command.args)
  for key in keys:  # in the order the command gives them: a row at its last argument
    extra += [arg for row, args in SHRINK_FLAG.items()
              if row[0] == command.program and row[-1] == key and set(row[1:]) <= set(keys)
              for arg in args]
  argv = [command.program]
  for arg in (*command.args, *extra):
    name, sep, value = arg.partition("=")
    argv.append(name + sep + _place(value, root, own_dir, name in _OWN_FILE_FLAGS) if sep
                else arg)
  return argv


def _keys(args) -> list[str]:
  """What a SHRINK_FLAG row may name of a command: its flags' names and its whole arguments,
  in order, each once."""
  return list(dict.fromkeys(k for a in args if a.startswith("--")
                            for k in (a.partition("=")[0], a)))


def _work(argv: list[str]) -> tuple:
  """What a shrunk command does: its program and the flags that take effect, in order."""
  effective = {}
  for n, arg in enumerate(argv[1:]):
    name = arg.partition("=")[0]
    if name in _RESULT_DIR_FLAGS:
      continue
    key = (name, n) if name in _REPEATED_FLAGS else name
    effective.pop(key, None)  # a later occurrence takes effect in its own place
    effective[key] = arg
  return (argv[0], *effective.values())


def _flag_values(argv, name):
  return [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]


def _tiny(cfg, tokenizer):
  """The same family, a few thousand parameters per layer, and the stand-in tokenizer's
  vocabulary (a model that could sample ids the tokenizer lacks would print garbage)."""
  kv = 1 if cfg.num_kv_heads < cfg.num_heads else 2
  return cfg.replace(num_layers=min(cfg.num_layers, 2), d_model=32, num_heads=2, num_kv_heads=kv,
                     head_dim=16, ffw_dim=64, vocab_size=tokenizer.vocab_size,
                     valid_vocab_size=None, tokenizer=tokenizer.name,
                     sliding_window=cfg.sliding_window and min(cfg.sliding_window, 16),
                     lru_width=cfg.lru_width and 32)


def _write_prompts(path):
  with open(path, "w") as f:
    for i, text in enumerate(["def add(a, b):\n    return", "import os\n\n\ndef walk(root):\n"]):
      f.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")


# A tiny Gemma 4 text model's shapes (k_eq_v global layers, two head sizes), and its
# assistant's: query-only layers reading that model's caches.
_GEMMA4_TEXT = dict(vocab_size=2048, num_attention_heads=2, num_key_value_heads=1,
                    num_global_key_value_heads=1, attention_k_eq_v=True, head_dim=16,
                    global_head_dim=32, sliding_window=16, hidden_size_per_layer_input=0,
                    num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])


def _make_hf_model(path, tokenizer_file):
  """A tiny model saved by transformers, as a model downloaded from the hub would be: Gemma 2,
  or for a Gemma 4 name a Gemma 4 text model, or for a Gemma 4 assistant's name its assistant
  drafter (whose directory carries no tokenizer)."""
  import shutil
  import transformers  # builds from a config: no network
  name = os.path.basename(path.rstrip("/")).lower()
  if "gemma-4" in name and "assistant" in name:
    text = transformers.Gemma4TextConfig(hidden_size=24, intermediate_size=48,
                                         vocab_size_per_layer_input=0, **_GEMMA4_TEXT)
    model = transformers.Gemma4AssistantForCausalLM(transformers.Gemma4AssistantConfig(
        text_config=text.to_dict(), backbone_hidden_size=32))
    model.save_pretrained(path, safe_serialization=True)
    return
  if "gemma-4" in name:
    config = transformers.Gemma4TextConfig(hidden_size=32, intermediate_size=64,
                                           final_logit_softcapping=30.0, **_GEMMA4_TEXT)
    model = transformers.Gemma4ForCausalLM(config)
  else:
    config = transformers.Gemma2Config(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
        query_pre_attn_scalar=16)
    model = transformers.AutoModelForCausalLM.from_config(config)
  model.save_pretrained(path, safe_serialization=True)
  shutil.copyfile(tokenizer_file, os.path.join(path, "tokenizer.model"))


def _prepare_inputs(argvs: list[list[str]], root: str) -> None:
  """Makes what a user would bring and no earlier command makes: prompts files, tokenizer files,
  a Hugging Face model directory, checkpoints of the big presets (same family, tiny)."""
  import importlib
  import shutil
  import jax
  import numpy as np
  from spec_tpu import tokenizer as tokenizer_lib
  from spec_tpu.checkpoints import checkpoint
  from spec_tpu.models import config as config_lib, model
  for place in _PLACEHOLDER_ROOTS:
    os.makedirs(root + place, exist_ok=True)
  rng = np.random.default_rng(0)
  shipped = str(tokenizer_lib.DEFAULT_MODEL_PATH)
  stand_in = tokenizer_lib.load(shipped)  # for the tokenizers of the big families
  made_later = set()  # what a command writes, for the commands after it
  for argv in argvs:
    for path in _flag_values(argv, "--prompts"):
      if not os.path.exists(path) and path not in made_later:
        _write_prompts(path)
    for path in _flag_values(argv, "--src"):
      if not os.path.exists(path):
        _make_hf_model(path, shipped)
    for path in _flag_values(argv, "--config.model.tokenizer"):
      if path.startswith(root) and not os.path.exists(path) and path not in made_later:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(shipped, path)
    config_spec = (_flag_values(argv, "--config") or [""])[-1]
    for role in ("model", "draft"):
      for path in _flag_values(argv, f"--config.{role}.checkpoint"):
        if not path.startswith(root) or os.path.exists(path) or path in made_later:
          continue
        module, _, arg = config_spec.partition(":")
        config = importlib.import_module(module[:-3].replace("/", ".")).get_config(arg or None)
        cfg = _tiny(config_lib.get_preset(getattr(config, role).preset), stand_in)
        shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
        checkpoint.save(path, jax.tree.map(
            lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes), cfg)
    made_later.update(_flag_values(argv, "--dst") + _flag_values(argv, "--output")
                      + _flag_values(argv, "--config.output"))


# ---------------------------------------------------------------- running


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
             # Commands of one config compile the same programs: the second loads them from the
             # suite's compilation cache (conftest.py).
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             # launch.plan --tpu loads libtpu, which other tests' processes may hold too.
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  flags = os.environ.get("XLA_FLAGS", "")  # conftest's faster-compile flags carry over
  if devices > 1:
    flags += f" --xla_force_host_platform_device_count={devices}"
    env.update(LEAST_COMPILE_EFFORT)
  env["XLA_FLAGS"] = flags.strip()
  return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("documented"))
  argvs = [_argv(c, i, root) for i, c in enumerate(LAUNCHES)]
  _prepare_inputs(argvs, root)
  # Each command -> the first that does the same work once shrunk (itself if none before it).
  first_with_work, same_as = {}, {}
  for i, argv in enumerate(argvs):
    same_as[i] = first_with_work.setdefault(_work(argv), i)
  groups = {}
  for i, c in enumerate(LAUNCHES):
    if same_as[i] == i:
      groups.setdefault(PROCESS.get(c.program, "other"), []).append(i)
  procs = []
  for name, indices in groups.items():  # side by side: most of the time is single-threaded
    devices = DEVICES.get(name, 1)
    group_dir = os.path.join(root, f"run_{name}")
    os.makedirs(group_dir)
    with open(os.path.join(group_dir, "commands.json"), "w") as f:
      json.dump([argvs[i] for i in indices], f)
    out = open(os.path.join(group_dir, "driver.log"), "wb")
    procs.append((indices, group_dir, out, subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "run_launchers.py"),
         os.path.join(group_dir, "commands.json"), os.path.join(group_dir, "results.jsonl")],
        cwd=REPO, env=_env(devices),
        stdout=out, stderr=subprocess.STDOUT)))
  deadline = time.monotonic() + 1800  # a loaded machine takes several times a quiet one's
  found = {}
  for indices, group_dir, out, proc in procs:
    try:
      proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    out.close()
    path = os.path.join(group_dir, "results.jsonl")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    for line in lines:
      r = json.loads(line)
      found[indices[r["index"]]] = dict(r, argv=argvs[indices[r["index"]]])
    with open(os.path.join(group_dir, "driver.log"), errors="replace") as f:
      driver_log = f.read()[-3000:]
    for i in indices:
      found.setdefault(i, {"rc": None, "argv": argvs[i], "seconds": 0.0,
                           "log": f"did not finish (driver exit {proc.returncode}):\n{driver_log}"})
  for i, first in same_as.items():
    if first != i:
      found[i] = dict(found[first], log=f"the same run as {LAUNCHES[first].source} once shrunk:\n"
                                        + found[first]["log"])
  return found


@pytest.mark.parametrize("index", range(len(LAUNCHES)), ids=[c.id for c in LAUNCHES])
def test_documented_command_runs(results, index):
  r = results[index]
  assert r["rc"] == 0, (f"{LAUNCHES[index].source}: {LAUNCHES[index].text}\nran as: "
                        f"{shlex.join(r['argv'])}\n{r['log'][-4000:]}")


# ---------------------------------------------------------------- what the benchmarks wrote
# The benchmark launchers' outputs are checked on the documented runs above rather than on
# runs of their own (the same launcher, shrunk the same way: a second run would compile and
# measure it again).


def _documented_run(results, program: str, *args: str) -> tuple[dict, str]:
  """The run of the first documented command of `program` given all of `args`, and its
  --output_dir there."""
  for i, c in enumerate(LAUNCHES):
    if c.program == program and set(args) <= set(c.args):
      r = results[i]
      assert r["rc"] == 0, f"{c.source}: {c.text}\n{r['log'][-4000:]}"
      return r, _flag_values(r["argv"], "--output_dir")[-1]
  raise AssertionError(f"no documented {program} command with {args}: the documents changed")


def test_benchmark_writes_table_json_and_plot(results):
  # Given the documented benchmark of the Llama-shaped pair, shrunk to K in {0, 1} at batch 1,
  r, out = _documented_run(results, "launch.benchmark", "--config=configs/llama_7b_bench.py",
                           "--output_dir=/tmp/bench_llama_ctx512")
  # it reports every column per point, with K=0 as the speedup baseline,
  with open(os.path.join(out, "results.json")) as f:
    result = json.load(f)
  base, spec = result["points"]
  assert (base["k"], base["speedup"], base["ideal_speedup"]) == (0, 1.0, 1.0)
  assert spec["k"] == 1
  for key in ("ms_per_token", "tokens_per_s", "cost_ratio_c", "speedup", "ideal_speedup",
              "measured_over_ideal", "verify_cost", "bandwidth_utilisation"):
    assert spec[key] > 0, key
  assert 0 <= spec["acceptance"] <= 1
  from spec_tpu.decoding import k_policy
  expected = k_policy.ideal_speedup(spec["acceptance"], spec["cost_ratio_c"], spec["k"])
  assert abs(spec["ideal_speedup"] - expected) < 1e-9
  # and writes the table (also to stdout) and the plot.
  with open(os.path.join(out, "table.txt")) as f:
    assert "meas/ideal" in f.read() and "meas/ideal" in r["log"]
  assert os.path.getsize(os.path.join(out, "speedup_vs_k.png")) > 1000


def test_serve_bench_writes_table_json_and_plot(results):
  # Given the documented serving benchmark (the default pair), shrunk to seconds (2 slots, 4
  # requests, K in {0, 1}),
  r, out = _documented_run(results, "launch.serve_bench", "--config=configs/default.py",
                           "--output_dir=/tmp/serve_bench")
  # it compares fixed batches and the engine, and measures latency per client count,
  with open(os.path.join(out, "results.json")) as f:
    result = json.load(f)
  modes = [(t["mode"], t["k"].split(":")[0]) for t in result["throughput"]]
  assert modes == [("fixed batches", "0"), ("fixed batches", "1"), ("engine", "0"),
                   ("engine", "adaptive")]
  assert all(t["tokens_per_s"] > 0 and t["tokens_per_cpu_s"] > 0 and t["tokens"] > 0
             for t in result["throughput"])
  assert set(result["throughput"][-1]["calibration"]["relative_cost"]) == {"0", "1"}
  assert [l["clients"] for l in result["latency"]] == [1, 2]
  assert all(l["ttft_p50_ms"] > 0 and l["requests"] >= 2 for l in result["latency"])
  with open(os.path.join(out, "table.txt")) as f:
    assert "TTFT p50" in r["log"] and "TTFT p50" in f.read()
  assert os.path.getsize(os.path.join(out, "serve_bench.png")) > 1000
