"""Samples continuations of text prompts with speculative sampling and writes them as JSONL.

    python -m launch.sample --config=configs/default.py
    python -m launch.sample --config=configs/default.py --prompt='def add(a, b):' --prompt='import re'
    python -m launch.sample --config=configs/default.py --prompts=prompts.jsonl --output=out.jsonl

Prompts: --prompt (repeatable), else --prompts=FILE (.txt: one prompt per non-empty line, id = the
0-based line number; .jsonl: one {"id": ..., "prompt": ...} per line, id defaulting to the line
number), else the config's run.prompts. Output (--output): one JSON line per prompt with id,
prompt, text, tokens and per-prompt stats; without --output the texts go to stdout.

Resumable: output lines are appended and fsynced once per batch. On start the existing output is
read (a torn last line, left by a kill mid-write, is cut away) and prompts whose id is already
there are not written again. Batches are fixed slices of the prompt list and batch i samples with
a seed derived from (sampling.seed, i), so a resumed run writes exactly what an uninterrupted run
would have (same prompts, batch size and seed). A batch holding any unfinished prompt is re-run
whole (its finished rows are computed again but not written).

Adaptive K (--config.sampling.adaptive_k=True): the first batch is run once at K = 0 and once
at sampling.k (the outputs are discarded) to time a loop iteration of each, the cost ratio c of
the speedup formula as the decode loop itself pays it (draft steps, sampling, verification and
all); every later batch run at K > 0 updates c against the latest K = 0 timing, and its
acceptance updates a; the next batch runs with the K in 0..sampling.k_max that the
expected-speedup formula favours, K = 0 (plain decoding) when no K beats it, with a K = 1 probe
every few batches so a draft that became good again is noticed (spec_tpu/k_policy.py).
Each line's stats record the K its batch ran with. Every K gives samples from the target's
distribution, but a resumed adaptive run may pick other K than the killed one did, so its texts
are equally valid samples, not byte-identical ones (every prompt is still written exactly once).

The summary reports tokens/s, acceptance rate and tokens per target call; with --compare_ar
(default for configs with run.compare_ar, e.g. the embedded default) every batch also runs with
k=0 and the measured speedup is the ratio of the two throughputs. When runs are timed against
each other (--compare_ar, adaptive K), each K's first run is an untimed warm-up: a compiled
program's first execution pays one-off costs that would bias the comparison.

Multi-host (--multihost or mesh.multihost): jax.distributed.initialize() is called first (with
--coordinator_address/--num_processes/--process_id when given, else auto-detected on pods).
Every process tokenises the same prompts and places on its own devices only the rows of each
batch that the mesh's data axis gives them (all rows when data=1); the outputs are gathered, and
process 0 alone reads and writes the output file and tells the others which batches to run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Setup to run.")
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


class InputError(ValueError):
  """Bad prompts or output path; raised before anything compiles."""


# ---------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class Prompt:
  id: object   # str or int, as given (JSON round-trips it)
  text: str

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
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}:{n + 1}: expected {{\"id\": ..., \"prompt\": \"...\"}} "
                         f"({type(e).__name__}: {e})") from None
      if not isinstance(text, str) or not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise InputError(f"{path}:{n + 1}: prompt must be a string and id a string or integer")
      out.append(Prompt(pid, text))
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


def finished_ids(path: str) -> set[str]:
  """Keys of the prompts already in the output; cuts away a torn tail left by a kill mid-write."""
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  complete = data.split(b"\n")[:-1]  # what follows the last newline is torn (or empty)
  keys, good_bytes = set(), 0
  for n, line in enumerate(complete):
    try:
      keys.add(json.dumps(json.loads(line)["id"]))
    except (ValueError, KeyError, TypeError):
      if n < len(complete) - 1:
        raise InputError(f"--output {path!r}: line {n + 1} is not a result line; refusing to "
                         "append to a file this launcher did not write") from None
      break  # the last line was cut or zero-filled by a crash: drop it as well
    good_bytes += len(line) + 1
  if good_bytes < len(data):
    logging.warning("output %s: dropping %d bytes of an unfinished last line",
                    path, len(data) - good_bytes)
    with open(path, "r+b") as f:
      f.truncate(good_bytes)
      f.flush()
      os.fsync(f.fileno())
  return keys


def append_lines(path: str, records: list[dict]) -> None:
  """One write and one fsync per batch: a kill leaves whole lines plus at most one torn one."""
  data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)


def _finite(x):
  return None if isinstance(x, float) and not math.isfinite(x) else x


def round_seconds(result) -> float:
  """Seconds per iteration of a run's decode loop (the prefill counted as one): the loop runs
  until its slowest row is done."""
  return result.seconds / (int(result.rounds.max()) + 1)


def batch_seed(seed: int, batch_index: int) -> int:
  """The seed of batch i: fixed by (seed, i) alone, so a resumed run reproduces it."""
  digest = hashlib.sha256(f"spec_tpu.sample:{seed}:{batch_index}".encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1


# ---------------------------------------------------------------- main

@dataclasses.dataclass
class Totals:
  tokens: int = 0
  seconds: float = 0.0
  rounds: int = 0          # speculative rounds (target calls after the prefill)
  calls: int = 0           # every target call, the prefill included
  accepted: int = 0
  judged: int = 0          # draft tokens judged by the target (the a of the speedup formula)
  ar_tokens: int = 0
  ar_seconds: float = 0.0
  ks: list = dataclasses.field(default_factory=list)  # K of each batch run (adaptive K)

  def summary(self, k: int, random_weights: bool) -> dict:
    tps = self.tokens / self.seconds if self.seconds else float("nan")
    out = {"generated_tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": tps,
           "k": k, "acceptance_rate": self.accepted / self.judged if self.judged
           else float("nan"),
           "tokens_per_target_call": self.tokens / self.calls if self.calls else float("nan"),
           "random_weights": random_weights}
    if self.ar_seconds:
      ar_tps = self.ar_tokens / self.ar_seconds
      out.update(ar_tokens_per_s=ar_tps, speedup_vs_ar=tps / ar_tps)
    return {k_: _finite(v) for k_, v in out.items()}


def run(config, flag_prompts, prompts_path, output, compare_ar, multihost, coordinator=None,
        num_processes=None, process_id=None) -> dict:
  """The whole launcher minus flag parsing (tests call this in-process)."""
  from launch import common

  # Everything that reads only files and the config comes first: bad input fails in seconds, on
  # every process alike, before devices, weights or compiles.
  prompts = read_prompts(flag_prompts, prompts_path, config.run.prompts)
  setup = common.resolve(config, need_weights=True)
  tok = common.load_tokenizer(config, setup)
  if tok is None:
    raise common.SetupError("model.tokenizer is empty: text prompts need a tokenizer")
  encoded = [tok.encode(p.text, add_bos=bool(config.run.add_bos)) for p in prompts]
  for p, ids in zip(prompts, encoded):
    if not ids:
      raise InputError(f"prompt {p.id!r} encodes to no tokens (set run.add_bos=True)")
  batch_size = int(config.run.batch_size)
  if batch_size <= 0:
    raise common.SetupError(f"run.batch_size must be positive, got {batch_size}")
  from spec_tpu.decoding import prompts as prompts_lib
  adaptive = bool(config.sampling.adaptive_k)
  k_max = int(config.sampling.k_max) if adaptive else setup.k
  if adaptive and not 1 <= setup.k <= k_max:
    raise common.SetupError(f"sampling.adaptive_k needs a draft and 1 <= sampling.k <= "
                            f"sampling.k_max (k is the starting K), got k={setup.k}, "
                            f"k_max={k_max}")
  longest = max(range(len(prompts)), key=lambda i: len(encoded[i]))
  try:
    prompts_lib.check_fits(len(encoded[longest]), int(config.sampling.max_new_tokens),
                           int(config.run.max_cache_len) or None, extra=k_max + 1)
  except ValueError as e:
    raise InputError(f"prompt {prompts[longest].id!r}: {e}") from None

  if multihost:
    common.init_distributed(coordinator, num_processes, process_id)
  import jax
  import numpy as np
  primary = jax.process_index() == 0

  problem = None
  if primary and output:
    try:
      check_output_path(output)
    except InputError as e:
      problem = e
  if not common.all_agree(problem is None):
    raise problem or InputError("process 0 cannot write the output")
  mesh = common.build_mesh(config)

  num_batches = -(-len(prompts) // batch_size)
  todo = np.ones((num_batches,), np.int32)
  done_keys = set()
  if primary and output:
    done_keys = finished_ids(output)
    for b in range(num_batches):
      chunk = prompts[b * batch_size:(b + 1) * batch_size]
      todo[b] = any(p.key not in done_keys for p in chunk)
  todo = common.broadcast(todo)
  remaining = sum(p.key not in done_keys for p in prompts)
  if primary:
    for m in (setup.target, setup.draft):
      if m is not None:
        logging.info("%s", m.describe())
    if done_keys:
      logging.info("resuming: %d of %d prompts already in %s", len(prompts) - remaining,
                   len(prompts), output)
  if not todo.any():
    return {"generated_tokens": 0, "note": "every prompt already done"}

  sampler = common.build_sampler(setup, mesh, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                 max_cache_len=int(config.run.max_cache_len))
  k, max_new, seed = setup.k, int(config.sampling.max_new_tokens), int(config.sampling.seed)
  compare_ar = compare_ar and k > 0
  def batch_ids(b):
    ids = encoded[b * batch_size:(b + 1) * batch_size]
    # A short last batch is padded with copies of its first prompt: one compiled shape serves
    # every batch, and the padding rows are dropped.
    return ids + [ids[0]] * (batch_size - len(ids))

  warm = set()

  def warm_up(kk, ids):
    # The first run of a compiled program pays one-off costs (buffers, thread pools): when runs
    # are timed against each other, each K gets an untimed run first.
    if (compare_ar or adaptive) and kk not in warm:
      sampler.generate(ids, max_new_tokens=max_new, k=kk, sampling=setup.sampling, seed=seed)
      warm.add(kk)

  policy = None
  if adaptive:
    from spec_tpu.decoding import k_policy
    policy = k_policy.AdaptiveK(k0=k, k_max=k_max, probe_every=4)
    # Calibrate on the first batch to run: one loop iteration at K = 0 and at K = k.
    ids0 = batch_ids(int(np.argmax(todo)))
    warm_up(0, ids0)
    warm_up(k, ids0)
    ar_round = round_seconds(sampler.generate(ids0, max_new_tokens=max_new, k=0,
                                              sampling=setup.sampling, seed=seed))
    cal = sampler.generate(ids0, max_new_tokens=max_new, k=k, sampling=setup.sampling, seed=seed)
    policy.observe_times(0.0, round_seconds(cal), ar_round, k)
    policy.observe(cal)
    if primary:
      logging.info("adaptive K: a loop iteration takes %.3g ms at K=0, %.3g ms at K=%d -> "
                   "c = %.3f, a = %.3f; first K = %d", ar_round * 1e3,
                   round_seconds(cal) * 1e3, k, policy.c, policy.a, policy.k)
  totals = Totals()
  from tqdm import tqdm
  bar = tqdm(total=remaining, unit="prompt", disable=not primary, file=sys.stderr,
             desc="sampling (RANDOM WEIGHTS)" if setup.any_random else "sampling")
  for b in range(num_batches):
    if not todo[b]:
      continue
    chunk = prompts[b * batch_size:(b + 1) * batch_size]
    ids = batch_ids(b)
    s = batch_seed(seed, b)
    if policy is not None:
      # Step times differ between processes: process 0's choice is everyone's.
      k = int(common.broadcast(np.array([policy.k], np.int32))[0])
    warm_up(k, ids)
    if compare_ar:
      warm_up(0, ids)
    res = sampler.generate(ids, max_new_tokens=max_new, k=k, sampling=setup.sampling, seed=s)
    n = len(chunk)
    totals.tokens += sum(len(t) for t in res.tokens[:n])
    totals.seconds += res.seconds
    totals.rounds += int(res.rounds[:n].sum())
    totals.calls += int(res.rounds[:n].sum()) + n  # the prefill is a target call too
    totals.accepted += int(res.accepted[:n].sum())
    totals.judged += int(res.reached[:n].sum()) if res.k else 0
    if compare_ar:
      # A batch adaptive K ran at K = 0 is its own autoregressive baseline.
      ar = res if k == 0 else sampler.generate(ids, max_new_tokens=max_new, k=0,
                                               sampling=setup.sampling, seed=s)
      totals.ar_tokens += sum(len(t) for t in ar.tokens[:n])
      totals.ar_seconds += ar.seconds
    if policy is not None:
      if compare_ar or k == 0:  # this batch has a fresh K = 0 timing
        ar_round = round_seconds(ar if compare_ar else res)
      if k:
        policy.observe_times(0.0, round_seconds(res), ar_round, k)
      policy.observe(res)
      totals.ks.append(k)
    records = []
    for row, p in enumerate(chunk):
      if p.key in done_keys:
        continue
      stats = {key: _finite(v) for key, v in res.row_stats(row).items()}
      records.append({"id": p.id, "prompt": p.text, "text": tok.decode(res.tokens[row]),
                      "tokens": res.tokens[row], "stats": dict(stats, k=k, seed=s)})
    if primary:
      if output:
        append_lines(output, records)
      else:
        for r in records:
          print(f"=== {r['id']}\n{r['prompt']}{r['text']}", flush=True)
    bar.update(len(records))
  bar.close()
  summary = totals.summary(setup.k, setup.any_random)
  if policy is not None:
    summary.update(adaptive_k_per_batch=totals.ks, adaptive_a=policy.a, adaptive_c=policy.c,
                   adaptive_expected_speedup=policy.speedup(), adaptive_next_k=policy.k)
  return summary


def _print_summary(s: dict) -> None:
  lines = ["", "summary" + (" (RANDOM WEIGHTS: numbers exercise the pipeline only)"
                            if s.get("random_weights") else "")]
  fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
  for key, value in s.items():
    if key != "random_weights":
      lines.append(f"  {key:24s} {fmt(value)}")
  print("\n".join(lines), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  compare_ar = config.run.compare_ar if _COMPARE_AR.value is None else _COMPARE_AR.value
  multihost = config.mesh.multihost if _MULTIHOST.value is None else _MULTIHOST.value
  from launch import common
  from spec_tpu.checkpoints import checkpoint
  cache_dir = common.use_compile_cache(config)
  try:
    summary = run(config, _PROMPT.value, _PROMPTS.value, _OUTPUT.value, compare_ar, multihost,
                  _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except (InputError, common.SetupError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_index() == 0:
    _print_summary(summary)
    logging.info("%s", common.compile_cache_summary(cache_dir))


if __name__ == "__main__":
  app.run(main)
