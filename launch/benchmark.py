"""Autoregressive vs speculative sampling on the same models and prompts, swept over K and batch.

    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench
    python -m launch.benchmark --config=configs/llama_7b_bench.py --output_dir=/tmp/bench_llama \
        --ks=0,1,2,4,6,8 --batches=1,8
    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench_int8 \
        --ks=0,4 --batches=1,8 --quantize=none,int8
    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench_coupling \
        --couplings=rejection,gumbel --temperatures=0.6,1.0 --batches=8
    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench_sources \
        --draft_kinds=none,ngram,model,hybrid --batches=4
    python -m launch.benchmark --config=configs/tiny_random.py --config.model.preset=tiny_vision \
        --output_dir=/tmp/bench_images --images=0,1,4

Per (batch, K) point: ms per token, tokens/s, acceptance a, cost ratio c, measured and ideal
speedup, verification cost and memory-bandwidth utilisation (what each means:
spec_tpu/benchmark.py). Writes results.json, table.txt (also printed) and speedup_vs_k.png;
`--quantize=none,int8` runs the sweep once per weight form, each into its own subdirectory, and
ends with a side-by-side table (quantize.txt). `--couplings=rejection,gumbel` compares the
couplings instead, at K = engine.k: tokens/s, acceptance and the acceptance each should reach
(spec_tpu/decoding/coupling_bench.py). `--draft_kinds` compares draft sources (none, ngram,
model, hybrid) at K = engine.k and the first batch size on a prompt-repeating and an
open-ended workload instead of sweeping K. `--images=0,1,4` measures a target with a vision
encoder instead: the encoder's time per image and the time to first token with each count of
images in the prompt (spec_tpu/serving/image_bench.py).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/default.py", "Setup to run.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json and the plot go.")
_KS = flags.DEFINE_list("ks", ["0", "1", "2", "4", "6", "8"], "Draft tokens per round to sweep.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes to sweep.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "New tokens per row (default: config).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (the fastest is kept).")
_STEP_REPEATS = flags.DEFINE_integer("step_repeats", 20, "Steps per timed step loop.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 0, "Cache slots of every program (0: what the "
                                  "prompts and new tokens need); a long max context that the "
                                  "tokens fill only in part.")
_QUANTIZE = flags.DEFINE_list("quantize", None, "Weight forms to benchmark in turn, target and "
                              "draft alike: none (float) and/or int8 (default: the config's).")
_COUPLINGS = flags.DEFINE_list("couplings", None, "Compare these couplings (rejection, gumbel) "
                               "at K = engine.k instead of sweeping K.")
_TEMPERATURES = flags.DEFINE_list("temperatures", None, "Temperatures of --couplings (default: "
                                  "the config's sampling.temperature).")
_DRAFT_KINDS = flags.DEFINE_list("draft_kinds", None, "Compare draft sources instead of "
                                 "sweeping K: none (autoregressive), ngram, model, hybrid.")
_IMAGES = flags.DEFINE_list("images", None, "Measure the vision encoder per image and the time "
                            "to first token with these image counts in the prompt (e.g. 0,1,4) "
                            "instead of sweeping K.")
flags.mark_flag_as_required("output_dir")


def main(argv):
  del argv  # cli.run refuses positional arguments
  from spec_tpu import benchmark, compile_cache, setup as common
  if _COUPLINGS.value:
    try:
      temperatures = (None if _TEMPERATURES.value is None
                      else [float(t) for t in _TEMPERATURES.value])
    except ValueError:
      raise cli.UserError(f"--temperatures takes comma-separated numbers, got "
                          f"{','.join(_TEMPERATURES.value)!r}") from None
    cache_dir = compile_cache.use(_CONFIG.value.run.compile_cache)
    benchmark.run_couplings(_CONFIG.value, _OUTPUT_DIR.value, [c.strip() for c in _COUPLINGS.value],
                            temperatures, cli.int_list("batches", _BATCHES.value),
                            _MAX_NEW.value, _REPEATS.value)
    logging.info("%s", compile_cache.summary(cache_dir))
    return
  if _IMAGES.value is not None:
    benchmark.run_images(_CONFIG.value, _OUTPUT_DIR.value, cli.int_list("images", _IMAGES.value),
                         _REPEATS.value)
    return
  modes = [None] if _QUANTIZE.value is None else [m.strip() for m in _QUANTIZE.value]
  if not modes or len(set(modes)) < len(modes):
    raise cli.UserError(f"--quantize takes distinct forms (none, int8), got "
                        f"{','.join(_QUANTIZE.value)!r}")
  # Every form's setup is checked before the first one runs for minutes.
  configs = [common.with_quantize(_CONFIG.value, mode) for mode in modes]
  for config in configs:
    common.resolve(config, need_weights=True, k=0)
  cache_dir = compile_cache.use(_CONFIG.value.run.compile_cache)
  if _DRAFT_KINDS.value is not None:
    benchmark.run_draft_kinds(_CONFIG.value, _OUTPUT_DIR.value, _DRAFT_KINDS.value,
                              cli.int_list("batches", _BATCHES.value)[0], _MAX_NEW.value,
                              _REPEATS.value)
    return
  results = []
  for mode, config in zip(modes, configs):
    out = _OUTPUT_DIR.value if len(modes) == 1 else os.path.join(_OUTPUT_DIR.value, mode)
    results.append(benchmark.run(config, out, cli.int_list("ks", _KS.value),
                                 cli.int_list("batches", _BATCHES.value), _MAX_NEW.value,
                                 _REPEATS.value, _STEP_REPEATS.value, _CACHE_LEN.value))
  logging.info("%s", compile_cache.summary(cache_dir))
  if len(results) > 1:
    table = benchmark.format_comparison(results)
    with open(os.path.join(_OUTPUT_DIR.value, "quantize.txt"), "w") as f:
      f.write(table + "\n")
    print("\n" + table, flush=True)


if __name__ == "__main__":
  cli.run(main)
