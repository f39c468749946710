"""How far int8 weights move a model: logits of int8 vs bfloat16 (vs float32 for scale).

    python -m launch.compare_quant                      # the shipped pair, held-out windows
    python -m launch.compare_quant --checkpoint=/ckpt/llama --quantized=/ckpt/llama_int8 \
        --tokens=random

For each checkpoint (float, as stored): three forms of the same model on the same tokens,
  float32   the stored weights cast to float32, float32 activations: the numerical reference
  stored    the weights as stored (e.g. bfloat16), activations in that dtype
  int8      int8 weights (quantized while loading, or read from --quantized, a checkpoint made
            by `launch.convert --quantize=int8` from the same source), activations as stored
and per pair (int8 vs stored, stored vs float32): max and mean |logit difference| over every
position and vocabulary entry, top-1 agreement (same argmax), and mean KL(first || second) in
nats. The stored-vs-float32 row is the size of the noise the stored dtype already has. With
--tokens=heldout (the default, for the shipped pair's tokenizer) each form's held-out loss is
reported too (nats/token over the same windows as launch.evaluate_pair). The scoring is
spec_tpu/evaluation.py's.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from launch import cli

_CHECKPOINTS = flags.DEFINE_multi_string(
    "checkpoint", ["spec_tpu/assets/target", "spec_tpu/assets/draft"],
    "Float checkpoint(s) to compare with their int8 form (repeatable).")
_QUANTIZED = flags.DEFINE_multi_string(
    "quantized", [], "int8 checkpoint(s) of the same models, in --checkpoint's order (default: "
    "quantize each while loading).")
_TOKENS = flags.DEFINE_enum("tokens", "heldout", ["heldout", "random"],
                            "heldout: windows of the held-out stdlib corpus (shipped tokenizer); "
                            "random: uniform random tokens.")
_WINDOWS = flags.DEFINE_integer("windows", 64, "Windows (sequences) to compare.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per window.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")

def main(argv):
  del argv  # cli.run refuses positional arguments
  for flag in (_WINDOWS, _SEQ_LEN):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  if len(_QUANTIZED.value) > len(_CHECKPOINTS.value):
    raise app.UsageError(f"{len(_QUANTIZED.value)} --quantized for {len(_CHECKPOINTS.value)} "
                         "--checkpoint: one int8 form per float checkpoint at most")
  if _OUTPUT.value:
    cli.check_output_file("output", _OUTPUT.value)
  quantized = list(_QUANTIZED.value) + [None] * (len(_CHECKPOINTS.value) - len(_QUANTIZED.value))
  from spec_tpu import evaluation
  for p, q in zip(_CHECKPOINTS.value, quantized):
    # CheckpointError (missing, damaged config), EvaluationError: one line (cli.run)
    evaluation.check_quantizable(p, q, _TOKENS.value)
  results = [evaluation.compare_quantized(p, q, tokens=_TOKENS.value, windows=_WINDOWS.value,
                                          seq_len=_SEQ_LEN.value)
             for p, q in zip(_CHECKPOINTS.value, quantized)]
  for r in results:
    d = r["stored_dtype"]
    print(f"{r['checkpoint']} ({r['num_params'] / 1e6:.2f}M params, stored {d}; int8 from "
          f"{r['quantized']}); {r['positions']} positions of {r['tokens']} tokens")
    print(f"  {'pair':<22} {'max |dlogit|':>12} {'mean |dlogit|':>13} {'top-1 agree':>11} "
          f"{'mean KL':>9}")
    for pair in (f"int8_vs_{d}", f"{d}_vs_float32"):
      c = r[pair]
      print(f"  {pair:<22} {c['max_abs_logit_diff']:>12.4f} {c['mean_abs_logit_diff']:>13.4f} "
            f"{c['top1_agreement']:>11.4f} {c['mean_kl']:>9.2e}")
    if "heldout_loss" in r:
      print("  held-out loss (nats/token): " + ", ".join(
          f"{form} {loss:.4f}" for form, loss in r["heldout_loss"].items()))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
