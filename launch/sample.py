"""Samples continuations of text prompts with speculative sampling and writes them as JSONL.

    python -m launch.sample --config=configs/default.py
    python -m launch.sample --config=configs/default.py --prompt='def add(a, b):' --prompt='import re'
    python -m launch.sample --config=configs/default.py --prompts=prompts.jsonl --output=out.jsonl

Prompts: --prompt (repeatable), else --prompts=FILE (.txt: one prompt per non-empty line, id = the
0-based line number; .jsonl: one {"id": ..., "prompt": ..., "images": [...]} per line, id
defaulting to the line number, images (a model with a vision encoder: Gemma 3 4B/12B/27B) a
list of image files, relative to the prompts file, each placed where the prompt says
<start_of_image>, or before the text if it says it nowhere), else the config's run.prompts.
Output (--output): one JSON line per prompt with id, prompt, text, tokens and per-prompt
stats; without --output the texts go to stdout.

It runs on the serving engine (spec_tpu/serving/engine.py), the one decoder under every
launcher: every prompt is a request, run.batch_size requests share the engine's slots, and a
finished request's slot is refilled from the queue at once, so one long output no longer holds
the others back. Each line is written when its request finishes, so lines come in the order
prompts finish, not the order they were given.

Resumable: each finished request's line is appended and fsynced at once (requests finishing in
the same engine step share one write), so a kill loses at most the unfinished ones. On start
the existing output is read (a torn last line, left by a kill mid-write, is cut away) and
prompts whose id is already there are not submitted again. A prompt's request samples with a
seed derived from (sampling.seed, prompt id) alone, and a request's tokens depend on its seed
and K only, not on what shares the batch: a resumed run writes for each prompt exactly what an
uninterrupted run would have, at the same K (same prompts, slot count and seed). With adaptive
K the resumed run may pick other K than the killed one did, so its texts are equally valid
samples of the target, not byte-identical ones (every prompt is still written exactly once).

An existing output is refused, untouched, when it holds anything but result lines and the torn
start of one (it is not ours), or when its lines were written with other settings: each line
records what made it (models by checkpoint hash, tokenizer, seed, max_new_tokens, num_slots
(run.batch_size), K policy, sampling values) and the error names what differs;
--append_other_settings appends anyway, saying so. --prompts and --output may not be the same
file.

Adaptive K (sampling.adaptive_k, on in configs/default.py): the engine's policy
(k_policy.AdaptiveK, owned by the engine) chooses K per step among 0, sampling.k and powers of
two up to sampling.k_max. Before the first request the engine calibrates: it compiles every one
of those K and times a round of each with all slots busy on these prompts, measuring the
acceptance a too, so the first step already runs the K the measurement favours, K = 0 (plain
decoding) unless speculation beats it by a margin; every window of rounds then refreshes a
(round times are measured once, at calibration), probing a small K now and then while off.
Each line's stats record the K its request ran with (a list when the K changed during it).

Per line: new_tokens, target_calls (the prefill and every round), accepted, acceptance_rate,
tokens_per_target_call, k and the request's seed. The summary reports tokens/s, acceptance rate
and tokens per target call over the run; with --compare_ar (default for configs with
run.compare_ar, e.g. the embedded default) the same prompts run again through the engine at
K = 0 and speedup_vs_ar is the ratio of the two throughputs (a run adaptive K kept at K = 0 is
its own baseline: 1.0). Without calibration, each K gets an untimed warm-up first: a compiled
program's first execution pays one-off costs that would bias the comparison.

Multi-host (--multihost or mesh.multihost): jax.distributed.initialize() is called first (with
--coordinator_address/--num_processes/--process_id when given, else auto-detected on pods).
Every process builds the same engine; process 0 alone reads and writes the output file, runs the
scheduler and broadcasts each device call's inputs, and the others run the same calls
(Engine.follow) until process 0 shuts the engine down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys

from absl import flags
from absl import logging

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/default.py", "Setup to run.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable); overrides --prompts.")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompt file: .txt (one per line) or .jsonl.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output (appended; resumable).")
_COMPARE_AR = flags.DEFINE_bool("compare_ar", None, "Also run k=0 and report the speedup "
                                "(default: the config's run.compare_ar).")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() "
                               "(default: the config's mesh.multihost).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_APPEND_OTHER = flags.DEFINE_bool(
    "append_other_settings", False, "Resume into an --output whose lines were written with "
    "other settings (seed, models, K, sampling, ...) instead of refusing; the file then mixes "
    "settings, and every line records its own.")


class InputError(cli.UserError):
  """Bad prompts or output path; raised before anything compiles."""


# ---------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class Prompt:
  id: object   # str or int, as given (JSON round-trips it)
  text: str
  images: tuple[str, ...] = ()  # image files

  @property
  def key(self) -> str:
    return json.dumps(self.id)


def read_prompts(flag_prompts, path: str | None, config_prompts) -> list[Prompt]:
  if flag_prompts:
    prompts = [Prompt(i, p) for i, p in enumerate(flag_prompts)]
  elif path:
    prompts = _read_prompt_file(path)
  else:
    prompts = [Prompt(i, p) for i, p in enumerate(config_prompts)]
  if not prompts:
    raise InputError("no prompts: give --prompt, --prompts=FILE or set run.prompts")
  seen = set()
  for p in prompts:
    if p.key in seen:
      raise InputError(f"prompt id {p.id!r} appears twice: ids must be unique for resuming")
    seen.add(p.key)
  return prompts


def _read_prompt_file(path: str) -> list[Prompt]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"cannot read prompt file {path!r}: {e}") from None
  if path.endswith(".jsonl"):
    out = []
    for n, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        text = obj["prompt"]
        pid = obj.get("id", n)
        images = obj.get("images", [])
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}:{n + 1}: expected {{\"id\": ..., \"prompt\": \"...\"}} "
                         f"({type(e).__name__}: {e})") from None
      if not isinstance(text, str) or not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise InputError(f"{path}:{n + 1}: prompt must be a string and id a string or integer")
      if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise InputError(f"{path}:{n + 1}: images must be a list of file paths")
      base = os.path.dirname(os.path.abspath(path))
      out.append(Prompt(pid, text, tuple(os.path.join(base, x) for x in images)))
    return out
  if path.endswith(".txt"):
    return [Prompt(n, line) for n, line in enumerate(lines) if line.strip()]
  raise InputError(f"prompt file {path!r}: expected a .txt or .jsonl file")


# ---------------------------------------------------------------- output

def check_output_path(path: str) -> None:
  if os.path.isdir(path):
    raise InputError(f"--output {path!r} is a directory")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise InputError(f"--output {path!r}: directory {parent!r} does not exist")
  if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise InputError(f"--output {path!r}: not writable")


# Every line this launcher writes is json.dumps of a dict whose first key is "id", and holds these.
_LINE_START = b'{"id": '
_RESULT_KEYS = ("id", "prompt", "text", "tokens", "stats")


def _result_line(line: bytes) -> dict | None:
  try:
    obj = json.loads(line)
  except ValueError:
    return None
  return obj if isinstance(obj, dict) and all(k in obj for k in _RESULT_KEYS) else None


def _parses(line: bytes) -> bool:
  try:
    json.loads(line)
  except ValueError:
    return False
  return True


def _torn(tail: bytes) -> bool:
  """The end of a file after a kill mid-write: the beginning of one of our lines (a write cut
  short), possibly followed by zeros (a crash that extended the file but lost the data)."""
  head = tail.rstrip(b"\0")
  return _LINE_START.startswith(head) or head.startswith(_LINE_START)


@dataclasses.dataclass(frozen=True)
class Existing:
  """What an output file already holds; reading it changes nothing."""
  records: dict          # prompt key -> its line (a dict)
  keep_bytes: int        # whole result lines; what follows is a torn write to drop
  size: int


def read_output(path: str) -> Existing:
  """The result lines of an existing output. Refuses (InputError) a file holding anything a
  kill of this launcher cannot have left there: then it is not ours, and is left untouched."""
  if not os.path.exists(path):
    return Existing({}, 0, 0)
  with open(path, "rb") as f:
    data = f.read()
  *complete, tail = data.split(b"\n")  # whatever follows the last newline is torn (or empty)
  records, keep = {}, 0
  for n, line in enumerate(complete):
    record = _result_line(line)
    if record is None:
      if n == len(complete) - 1 and not tail and line and _torn(line):
        tail = line  # a crash zero-filled the last write, newline included
        break
      raise InputError(f"--output {path!r}: line {n + 1} is not a result line of launch.sample; "
                       "refusing to touch a file this launcher did not write (choose another "
                       "--output)")
    records[json.dumps(record["id"])] = record
    keep += len(line) + 1
  if tail and (not _torn(tail) or _parses(tail) and _result_line(tail) is None):
    raise InputError(f"--output {path!r}: its last line is neither a result line nor the torn "
                     "end of one; refusing to touch a file this launcher did not write (choose "
                     "another --output)")
  return Existing(records, keep, len(data))


def drop_torn_tail(path: str, existing: Existing) -> None:
  """Cuts away the torn end of the last write, so appended lines start on a line of their own."""
  if existing.keep_bytes < existing.size:
    logging.warning("output %s: dropping %d bytes of an unfinished last line", path,
                    existing.size - existing.keep_bytes)
    with open(path, "r+b") as f:
      f.truncate(existing.keep_bytes)
      f.flush()
      os.fsync(f.fileno())


def finished_ids(path: str) -> set[str]:
  """Keys of the prompts already in the output; cuts away a torn tail left by a kill mid-write."""
  existing = read_output(path)
  drop_torn_tail(path, existing)
  return set(existing.records)


# ---------------------------------------------------------------- what made a line

def model_identity(m) -> dict:
  """Names one model's weights: the checkpoint's manifest hash (its content, wherever it lies)
  or "random", and its config (neutral overrides such as valid_vocab_size included)."""
  from spec_tpu.checkpoints import checkpoint
  weights = checkpoint.fingerprint(m.checkpoint) if m.checkpoint else "random"
  config = hashlib.sha256(m.cfg.to_json().encode()).hexdigest()[:12]
  return {"name": m.cfg.name, "weights": weights, "config": config}


def run_settings(config, setup, tok, k_max: int) -> dict:
  """Everything that decides what a line holds, written into every line (as JSON reads it
  back): a resume compares it with the file's, so a file never mixes settings silently."""
  s, adaptive = setup.sampling, bool(config.sampling.adaptive_k)
  uses_draft = setup.k > 0 or adaptive
  settings = {
      "target": model_identity(setup.target),
      "draft": model_identity(setup.draft) if uses_draft else None,
      "tokenizer": tok.name, "add_bos": bool(config.run.add_bos),
      # The slots are the engine's batch: every request's law and seeded stream are its own,
      # but another batch width is another program, whose float rounding may differ.
      "num_slots": int(config.run.batch_size),
      "seed": int(config.sampling.seed), "max_new_tokens": int(config.sampling.max_new_tokens),
      "k": setup.k, "adaptive_k": adaptive, "k_max": k_max if adaptive else None,
      "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
  return json.loads(json.dumps(settings))


def _show(value) -> str:
  if isinstance(value, dict):
    return " ".join(f"{k}={v}" for k, v in value.items())
  return json.dumps(value)


def settings_differences(existing: Existing, settings: dict, prompts) -> list[str]:
  """How the lines already in an output differ from this run: one phrase per setting."""
  found = {}
  texts = {p.key: p.text for p in prompts}
  for key, record in existing.records.items():
    theirs = record.get("settings")
    if not isinstance(theirs, dict):
      found.setdefault("settings", f"line of prompt {record['id']!r} records no settings "
                       "(written by an older launch.sample)")
      continue
    for name in sorted(set(theirs) | set(settings)):
      if theirs.get(name) != settings.get(name) and name not in found:
        found[name] = (f"{name} is {_show(theirs.get(name))} in the file, "
                       f"{_show(settings.get(name))} now")
    if key in texts and record.get("prompt") != texts[key]:
      found.setdefault("prompt", f"prompt {record['id']!r} has another text in the file")
  return list(found.values())


def append_lines(path: str, records: list[dict]) -> None:
  """One write and one fsync per call (the requests that finished in one engine step): a kill
  leaves whole lines plus at most one torn one."""
  data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)


def _finite(x):
  return None if isinstance(x, float) and not math.isfinite(x) else x


def request_seed(seed: int, key: str) -> int:
  """The seed of one prompt's request: fixed by (sampling.seed, prompt id) alone, so a resumed
  run, or a run over other prompts, samples a prompt with the same random stream."""
  digest = hashlib.sha256(f"spec_tpu.sample:{seed}:{key}".encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def _k_used(ks) -> int | list | None:
  """The K a request's steps ran with: one int, the list when adaptive K changed it meanwhile,
  None when it finished at its prefill."""
  ks = [int(k) for k in ks]
  return ks[0] if len(ks) == 1 else (ks or None)


# ---------------------------------------------------------------- main

@dataclasses.dataclass
class Totals:
  tokens: int = 0
  seconds: float = 0.0
  calls: int = 0           # every target call, the prefill included
  accepted: int = 0
  judged: int = 0          # draft tokens judged by the target (the a of the speedup formula)
  ks: set = dataclasses.field(default_factory=set)  # every K a step ran with
  ar_tokens: int = 0
  ar_seconds: float = 0.0

  def add(self, stats) -> None:
    self.tokens += stats.new_tokens
    self.calls += stats.target_calls
    self.accepted += stats.accepted
    self.judged += stats.judged
    self.ks.update(stats.ks)

  def summary(self, k: int, random_weights: bool) -> dict:
    tps = self.tokens / self.seconds if self.seconds else float("nan")
    out = {"generated_tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": tps,
           "k": k, "ks_used": sorted(self.ks),
           "acceptance_rate": self.accepted / self.judged if self.judged else float("nan"),
           "tokens_per_target_call": self.tokens / self.calls if self.calls else float("nan"),
           "random_weights": random_weights}
    if self.ar_seconds:
      ar_tps = self.ar_tokens / self.ar_seconds
      out.update(ar_tokens_per_s=ar_tps, speedup_vs_ar=tps / ar_tps)
    return {k_: _finite(v) for k_, v in out.items()}


def check_not_same_file(prompts_path: str | None, output: str | None) -> None:
  # The output is appended to and its ids count as done: read as the prompts too, every prompt
  # would count as done and nothing would be sampled.
  if (prompts_path and output and os.path.exists(prompts_path) and os.path.exists(output)
      and os.path.samefile(prompts_path, output)):
    raise InputError(f"--prompts {prompts_path!r} and --output {output!r} are the same file: "
                     "results are appended to the output, so it cannot also hold the prompts")


def _mixed_settings_error(output: str, differences: list[str]) -> InputError:
  return InputError(
      f"--output {output!r} holds lines written with other settings ({'; '.join(differences)}): "
      "resuming would mix them. Use another --output, the same settings, or "
      "--append_other_settings to append anyway (every line records the settings that made it)")


def drain(engine, requests: list, k: int | None = None, on_finish=None) -> float:
  """Steps the engine (at K = k, default: its policy's) until every request is done, calling
  on_finish with the requests that finished after each step. Returns the seconds it took."""
  import time
  pending = list(requests)
  start = time.perf_counter()
  while pending:
    busy = engine.step(k)
    done = [r for r in pending if r.finished]
    if done:
      pending = [r for r in pending if not r.finished]
      if on_finish is not None:
        on_finish(done)
    if not busy and pending:
      raise RuntimeError(f"the engine went idle with {len(pending)} requests unfinished")
  return time.perf_counter() - start


def run(config, flag_prompts, prompts_path, output, compare_ar, multihost, coordinator=None,
        num_processes=None, process_id=None, append_other_settings=False) -> dict:
  """The whole launcher minus flag parsing (tests call this in-process)."""
  from launch import common

  # Everything that reads only files and the config comes first: bad input fails in seconds, on
  # every process alike, before devices, weights or compiles.
  check_not_same_file(prompts_path, output)
  prompts = read_prompts(flag_prompts, prompts_path, config.run.prompts)
  setup = common.resolve(config, need_weights=True)
  tok = common.load_tokenizer(config, setup)
  if tok is None:
    raise common.SetupError("model.tokenizer is empty: text prompts need a tokenizer")
  encoded = [tok.encode(p.text, add_bos=bool(config.run.add_bos)) for p in prompts]
  images, laid_out = _read_images(prompts, setup.target.cfg.vision, tok, encoded,
                                  bool(config.run.add_bos))
  for p, ids in zip(prompts, encoded):
    if not ids:
      raise InputError(f"prompt {p.id!r} encodes to no tokens (set run.add_bos=True)")
  num_slots = int(config.run.batch_size)
  if num_slots <= 0:
    raise common.SetupError(f"run.batch_size (the engine's slots) must be positive, got "
                            f"{num_slots}")
  from spec_tpu.decoding import prompts as prompts_lib
  adaptive = bool(config.sampling.adaptive_k)
  k_max = int(config.sampling.k_max) if adaptive else setup.k
  if adaptive and not 1 <= setup.k <= k_max:
    raise common.SetupError(f"sampling.adaptive_k needs a draft and 1 <= sampling.k <= "
                            f"sampling.k_max (k is the starting K), got k={setup.k}, "
                            f"k_max={k_max}")
  max_new, seed = int(config.sampling.max_new_tokens), int(config.sampling.seed)
  longest = max(range(len(prompts)), key=lambda i: laid_out[i])
  # A slot holds the longest prompt of the whole list (not of what is left to do: a resumed run
  # must run the same programs), its new tokens and a verification block.
  max_len = int(config.run.max_cache_len) or laid_out[longest] + max_new + k_max + 1
  try:
    prompts_lib.check_fits(laid_out[longest], max_new, max_len, extra=k_max + 1)
  except ValueError as e:
    raise InputError(f"prompt {prompts[longest].id!r}: {e}") from None
  settings = run_settings(config, setup, tok, k_max)

  if multihost:
    common.init_distributed(coordinator, num_processes, process_id)
  import jax
  primary = jax.process_index() == 0

  # Process 0 alone reads the output; every process must stop if it refuses it.
  problem, existing, mixed = None, Existing({}, 0, 0), []
  if primary and output:
    try:
      check_output_path(output)
      existing = read_output(output)
      mixed = settings_differences(existing, settings, prompts)
      if mixed and not append_other_settings:
        raise _mixed_settings_error(output, mixed)
    except InputError as e:
      problem = e
  if not common.all_agree(problem is None):
    raise problem or InputError("process 0 refused the output file")
  mesh = common.build_mesh(config)

  done_keys = set()
  if primary and output:
    if mixed:
      logging.warning("appending to %s, whose lines were written with other settings (%s), as "
                      "--append_other_settings asks; each line records its own", output,
                      "; ".join(mixed))
    drop_torn_tail(output, existing)
    done_keys = set(existing.records)
  todo = [i for i, p in enumerate(prompts) if p.key not in done_keys]
  if primary:
    for m in (setup.target, setup.draft):
      if m is not None:
        logging.info("%s", m.describe())
    if done_keys:
      logging.info("resuming: %d of %d prompts already in %s", len(prompts) - len(todo),
                   len(prompts), output)
  note = {"mixed_settings": "; ".join(mixed)} if mixed else {}
  if not common.all_agree(bool(todo)):
    return {"generated_tokens": 0, "note": "every prompt already done", **note}

  from spec_tpu.serving import Engine, multihost as multihost_lib
  sampler = common.build_sampler(setup, mesh, eos_id=tok.eos_id, pad_id=tok.pad_id)
  s, serve = setup.sampling, config.serve
  channel = multihost_lib.Channel(num_slots) if jax.process_count() > 1 else None
  engine = Engine(sampler, num_slots=num_slots, max_len=max_len, k=setup.k, k_max=k_max,
                  adaptive_k=adaptive, max_top_k=max(1, int(s.top_k)),
                  rounds_per_step=int(serve.rounds_per_step) or None,
                  max_rounds_per_step=int(serve.max_rounds_per_step),
                  prefill_rows=int(serve.prefill_rows), tokenizer=tok, seed=seed,
                  channel=channel)
  if not primary:
    engine.follow()  # process 0's device calls, until it shuts the engine down
    return {}
  try:
    return _schedule(engine, config, setup, tok, prompts, encoded, images, todo, output,
                     settings,
                     compare_ar and k_max > 0, note)
  finally:
    engine.shutdown()


def _read_images(prompts, vision, tok, encoded, add_bos: bool):
  """Each prompt's images decoded (before any device work, so a bad file fails in seconds),
  its ids with start_of_image where the text marks an image (encoded, in place), and its length
  once the image blocks are laid out."""
  from spec_tpu.models.vision import image as image_lib, prompt as image_prompt
  mark = "<start_of_image>"
  images, laid_out = [], []
  for i, p in enumerate(prompts):
    if p.images:
      if vision is None:
        raise InputError(f"prompt {p.id!r} has images, but the model has no vision encoder")
      text = p.text if mark in p.text else mark * len(p.images) + p.text
      if text.count(mark) != len(p.images):
        raise InputError(f"prompt {p.id!r} marks {text.count(mark)} image place(s) with {mark} "
                         f"but lists {len(p.images)} image(s)")
      encoded[i] = (tok.encode("", add_bos=add_bos) + image_prompt.encode_marked(
          tok.encode, text, mark, vision.start_id))
      try:
        images.append([image_lib.to_pil(x, f"prompt {p.id!r} image {x!r}") for x in p.images])
      except ValueError as e:
        raise InputError(str(e)) from None
    else:
      images.append(None)
    laid_out.append(len(encoded[i]) + len(p.images) * (0 if vision is None else
                                                        vision.block_len - 1))
  return images, laid_out


def _schedule(engine, config, setup, tok, prompts, encoded, images, todo, output, settings,
              compare_ar, note) -> dict:
  """Process 0's part: every prompt left is a request; each finished one is written at once."""
  from spec_tpu.serving import GenerationParams
  s, max_new = setup.sampling, int(config.sampling.max_new_tokens)
  seed = int(config.sampling.seed)

  def params(i, max_new_tokens=max_new):
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=float(s.temperature),
                            top_p=float(s.top_p), top_k=int(s.top_k),
                            seed=request_seed(seed, prompts[i].key))

  if engine.policy is not None:
    # Every K the policy may pick is compiled and timed with all slots busy on these prompts
    # before the first request, and the first step runs the K the measurement favours.
    report = engine.calibrate([encoded[i] for i in todo])
    logging.info("adaptive K: a round takes %s; K = %d chosen (a = %.3f, expected speedup "
                 "%.2f)", {k: f"{v * 1e3:.2f} ms" for k, v in engine.pacing.round_s.items()},
                 report["chosen_k"], engine.policy.a, engine.policy.speedup())
  elif compare_ar:
    # The first run of a compiled program pays one-off costs (buffers, thread pools): when the
    # two passes are timed against each other, each K gets an untimed run first.
    few = todo[:engine.num_slots]
    for k in (engine.k, 0):
      drain(engine, [engine.submit(encoded[i], params(i, min(2, max_new)), images[i])
                     for i in few], k)

  from tqdm import tqdm
  bar = tqdm(total=len(todo), unit="prompt", file=sys.stderr,
             desc="sampling (RANDOM WEIGHTS)" if setup.any_random else "sampling")
  totals = Totals()
  index = {}

  def write(done):
    records = []
    for r in done:
      i = index[r.id]
      c = r.result()
      totals.add(c.stats)
      stats = {"new_tokens": c.stats.new_tokens, "target_calls": c.stats.target_calls,
               "accepted": c.stats.accepted, "acceptance_rate": c.stats.acceptance_rate,
               "tokens_per_target_call": c.stats.tokens_per_target_call,
               "k": _k_used(c.stats.ks), "seed": r.params.seed}
      records.append({"id": prompts[i].id, "prompt": prompts[i].text,
                      "text": tok.decode(c.tokens), "tokens": c.tokens,
                      "stats": {key: _finite(v) for key, v in stats.items()},
                      "settings": settings})
    if output:
      append_lines(output, records)
    else:
      for r in records:
        print(f"=== {r['id']}\n{r['prompt']}{r['text']}", flush=True)
    bar.update(len(records))

  requests = []
  for i in todo:
    r = engine.submit(encoded[i], params(i), images[i])
    index[r.id] = i
    requests.append(r)
  totals.seconds = drain(engine, requests, on_finish=write)
  bar.close()
  summary = {}
  if engine.policy is not None:
    p = engine.policy
    summary.update(adaptive_a=p.a, adaptive_c=p.c, adaptive_expected_speedup=p.speedup(),
                   adaptive_next_k=p.k)
  if compare_ar:
    if totals.ks <= {0}:  # adaptive K kept speculation off: the run was its own baseline
      totals.ar_tokens, totals.ar_seconds = totals.tokens, totals.seconds
    else:
      ar = [engine.submit(encoded[i], params(i), images[i]) for i in todo]
      totals.ar_seconds = drain(engine, ar, k=0)
      totals.ar_tokens = sum(len(r.result().tokens) for r in ar)
  return dict(totals.summary(setup.k, setup.any_random), **summary, **note)


def _print_summary(s: dict) -> None:
  lines = ["", "summary" + (" (RANDOM WEIGHTS: numbers exercise the pipeline only)"
                            if s.get("random_weights") else "")]
  fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
  for key, value in s.items():
    if key != "random_weights":
      lines.append(f"  {key:24s} {fmt(value)}")
  print("\n".join(lines), flush=True)


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = _CONFIG.value
  compare_ar = config.run.compare_ar if _COMPARE_AR.value is None else _COMPARE_AR.value
  multihost = config.mesh.multihost if _MULTIHOST.value is None else _MULTIHOST.value
  from launch import common
  cache_dir = common.use_compile_cache(config)
  summary = run(config, _PROMPT.value, _PROMPTS.value, _OUTPUT.value, compare_ar, multihost,
                _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                append_other_settings=_APPEND_OTHER.value)
  import jax
  if jax.process_index() == 0:
    _print_summary(summary)
    logging.info("%s", common.compile_cache_summary(cache_dir))


if __name__ == "__main__":
  cli.run(main)
