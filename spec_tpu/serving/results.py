"""The resumable JSONL results file of a list of prompts (launch.sample's --output), and the
prompts it answers.

Each finished request's line is appended and fsynced at once (requests finishing in the same
engine step share one write), so a kill loses at most the unfinished ones. On start the existing
output is read (a torn last line, left by a kill mid-write, is cut away) and prompts whose id is
already there are not submitted again. An existing output is refused, untouched, when it holds
anything but result lines and the torn start of one (it is not ours), or when its lines were
written with other settings: each line records what made it (`run_settings`) and the error
names what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging


class InputError(ValueError):
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
  s, adaptive = setup.sampling, bool(config.engine.adaptive_k) and setup.k > 0
  uses_draft = setup.k > 0 or adaptive
  settings = {
      "target": model_identity(setup.target),
      "draft": model_identity(setup.draft) if uses_draft and setup.draft else None,
      "tokenizer": tok.name, "add_bos": bool(config.run.add_bos),
      # The slots are the engine's batch: every request's law and seeded stream are its own,
      # but another batch width is another program, whose float rounding may differ.
      "num_slots": int(config.engine.num_slots),
      "seed": int(config.sampling.seed), "max_new_tokens": int(config.sampling.max_new_tokens),
      "k": setup.k, "adaptive_k": adaptive, "k_max": k_max if adaptive else None,
      "coupling": setup.coupling,
      "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
  if setup.draft_source.kind != "model" and uses_draft:
    settings["draft_source"] = dataclasses.asdict(setup.draft_source)
  if bool(config.run.pan_and_scan) and setup.target.cfg.vision is not None:
    settings["pan_and_scan"] = True  # absent when off: files written before it still resume
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


def request_seed(seed: int, key: str) -> int:
  """The seed of one prompt's request: fixed by (sampling.seed, prompt id) alone, so a resumed
  run, or a run over other prompts, samples a prompt with the same random stream."""
  digest = hashlib.sha256(f"spec_tpu.sample:{seed}:{key}".encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def k_used(ks) -> int | list | None:
  """The K a request's steps ran with: one int, the list when adaptive K changed it meanwhile,
  None when it finished at its prefill."""
  ks = [int(k) for k in ks]
  return ks[0] if len(ks) == 1 else (ks or None)


def check_not_same_file(prompts_path: str | None, output: str | None) -> None:
  # The output is appended to and its ids count as done: read as the prompts too, every prompt
  # would count as done and nothing would be sampled.
  if (prompts_path and output and os.path.exists(prompts_path) and os.path.exists(output)
      and os.path.samefile(prompts_path, output)):
    raise InputError(f"--prompts {prompts_path!r} and --output {output!r} are the same file: "
                     "results are appended to the output, so it cannot also hold the prompts")


def mixed_settings_error(output: str, differences: list[str]) -> InputError:
  return InputError(
      f"--output {output!r} holds lines written with other settings ({'; '.join(differences)}): "
      "resuming would mix them. Use another --output, the same settings, or "
      "--append_other_settings to append anyway (every line records the settings that made it)")
