"""Structured output's costs: grammar libraries compared, and the engine with and without a
JSON schema.

    python -m launch.grammar_bench --config=configs/default.py --output_dir=/tmp/grammar_bench

The library table: compile seconds and host mask microseconds per token of xgrammar,
llguidance (both optional: reported as not installed when missing) and outlines-core, at the
tokenizer's vocabulary and a synthetic 256k one; the compiled tables' sizes (states, token
classes, dense against compact bytes) for four grammars at the same vocabularies; the mask
work per round on device. The engine table: tokens/s, acceptance, mask
refusals and schema-valid responses at K = 0 and engine.k, at temperature 1
(spec_tpu/decoding/grammar_bench.py). Writes results.json and table.txt (also printed).
"""

from __future__ import annotations

from absl import flags

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/default.py", "Setup to run.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json and table.txt go.")
_LIBRARIES = flags.DEFINE_bool("libraries", True, "Compare the grammar libraries.")
_ENGINE = flags.DEFINE_bool("engine", True, "Time the engine with and without a schema.")
_SIZES = flags.DEFINE_list("vocab_sizes", ["2048", "262144"], "Vocabularies of the library table.")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Requests per engine row.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens per request.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved runs of each engine row (the "
                                "fastest kept).")
flags.mark_flag_as_required("output_dir")


def main(argv):
  del argv
  from spec_tpu.decoding import grammar_bench
  print(grammar_bench.run(_CONFIG.value, _OUTPUT_DIR.value, libraries=_LIBRARIES.value,
                          engine=_ENGINE.value, sizes=cli.int_list("vocab_sizes", _SIZES.value),
                          samples=_SAMPLES.value, max_new_tokens=_MAX_NEW.value,
                          repeats=_REPEATS.value))


if __name__ == "__main__":
  cli.run(main)
