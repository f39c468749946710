"""Samples continuations of text prompts with speculative sampling and writes them as JSONL.

    python -m launch.sample --config=configs/default.py
    python -m launch.sample --config=configs/default.py --prompt='def add(a, b):' --prompt='import re'
    python -m launch.sample --config=configs/default.py --prompts=prompts.jsonl --output=out.jsonl

Prompts: --prompt (repeatable), else --prompts=FILE (.txt: one prompt per non-empty line, id = the
0-based line number; .jsonl: one {"id": ..., "prompt": ...} per line, id defaulting to the line
number), else the config's run.prompts. Output (--output): one JSON line per prompt with id,
prompt, text, tokens, per-prompt stats and the settings that made it; without --output the
texts go to stdout. The output is resumable: a rerun after a kill samples only the prompts not
yet in it, and refuses a file written with other settings (--append_other_settings appends
anyway). The engine's settings are the config's `engine.*` (configs/common.py); the work is
spec_tpu/serving/offline.py's, the file format spec_tpu/serving/results.py's.

Multi-host (--multihost or mesh.multihost): jax.distributed.initialize() is called first (with
--coordinator_address/--num_processes/--process_id when given, else auto-detected on pods);
process 0 reads and writes the output, the others follow its device calls.
"""

from __future__ import annotations

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
  from spec_tpu import compile_cache
  from spec_tpu.serving import offline
  cache_dir = compile_cache.use(config.run.compile_cache)
  summary = offline.run(config, _PROMPT.value, _PROMPTS.value, _OUTPUT.value, compare_ar,
                        multihost, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                        append_other_settings=_APPEND_OTHER.value)
  import jax
  if jax.process_index() == 0:
    _print_summary(summary)
    logging.info("%s", compile_cache.summary(cache_dir))


if __name__ == "__main__":
  cli.run(main)
