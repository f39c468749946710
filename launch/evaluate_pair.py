"""Evaluates target/draft pairs: held-out loss, acceptance rate, tokens per target call, speedup.

    python -m launch.evaluate_pair
    python -m launch.evaluate_pair --draft=distilled=spec_tpu/assets/draft \
        --draft=data_only=/tmp/spec_assets/draft_data --output=/tmp/pair_eval.json
    python -m launch.evaluate_pair --quantize=int8 --output=/tmp/pair_int8.json

Prompts are --prompt_len-token windows cut from the held-out stdlib files (one per file, a third
of the way in, so they sit in code rather than in license headers), never seen in training. Every
draft is run at K=--k with temperature 1 and greedy; the target alone (K=0) at the same settings
is the baseline of the wall-clock speedup. Times exclude compilation (Sampler.generate's seconds)
and are the best of --repeats runs, since other work on a shared machine only ever adds time.
The evaluation is spec_tpu/evaluation.py's.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from launch import cli
from spec_tpu.checkpoints import checkpoint
from spec_tpu.models.config import FLOAT_DTYPES

_TARGET = flags.DEFINE_string("target", "spec_tpu/assets/target", "Target checkpoint.")
_DRAFT = flags.DEFINE_multi_string("draft", ["distilled=spec_tpu/assets/draft"],
                                   "label=checkpoint of a draft to evaluate (repeatable).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Held-out prompts (one batch).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
_K = flags.DEFINE_integer("k", 4, "Draft tokens per round.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per setting; the fastest counts.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Window length for the held-out loss.")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 256, "Held-out windows for the loss.")
_DTYPE = flags.DEFINE_string("dtype", "", "Cast params for sampling (default: as stored).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"], "Serve (and score) target and drafts "
                              "with int8 weights, quantized while loading (models/quant.py).")
_SAMPLES = flags.DEFINE_integer("show_samples", 2, "Decoded continuations to print.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")

def main(argv):
  del argv  # cli.run refuses positional arguments
  # Everything that could fail at the end is checked before minutes of evaluation.
  drafts = []
  for spec in _DRAFT.value:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
      raise app.UsageError(f"--draft takes label=path, got {spec!r}")
    if label in dict(drafts):
      raise app.UsageError(f"--draft label {label!r} is given twice")
    drafts.append((label, path))
  for flag, least in ((_NUM_PROMPTS, 1), (_PROMPT_LEN, 1), (_MAX_NEW, 1), (_K, 1), (_REPEATS, 1),
                      (_SEQ_LEN, 1), (_EVAL_WINDOWS, 1), (_SAMPLES, 0), (_SEED, 0)):
    if flag.value < least:
      raise app.UsageError(f"--{flag.name} must be >= {least}, got {flag.value}")
  if _DTYPE.value and _DTYPE.value not in FLOAT_DTYPES:
    raise app.UsageError(f"--dtype must be one of {FLOAT_DTYPES}, got {_DTYPE.value!r}")
  if _OUTPUT.value:
    cli.check_output_file("output", _OUTPUT.value)
  for path in [_TARGET.value] + [p for _, p in drafts]:
    checkpoint.load_config(path)  # manifest and config only: a missing checkpoint fails here

  from spec_tpu import evaluation
  out, rows, samples = evaluation.evaluate_pairs(
      _TARGET.value, drafts, num_prompts=_NUM_PROMPTS.value, prompt_len=_PROMPT_LEN.value,
      max_new_tokens=_MAX_NEW.value, k=_K.value, repeats=_REPEATS.value, seq_len=_SEQ_LEN.value,
      eval_windows=_EVAL_WINDOWS.value, dtype=_DTYPE.value or None, quantize=_QUANTIZE.value,
      seed=_SEED.value, show_samples=_SAMPLES.value)
  t = out["target"]
  print(f"target {_TARGET.value}: {t['num_params'] / 1e6:.2f}M params, held-out loss "
        f"{t['heldout_loss']:.3f} nats/token; {out['num_prompts']} held-out prompts x "
        f"{_MAX_NEW.value} new tokens, K={_K.value}, dtype {out['dtype']}"
        + (f", {out['quantize']} weights" if out["quantize"] != "none" else ""))
  print(f"{'draft':<12} {'params':>8} {'sampling':<8} {'loss':>6} {'accept':>7} {'tok/call':>9} "
        f"{'speedup':>8}")
  for label, name, loss, acc, tpc, speedup in rows:
    n = out["drafts"][label]["num_params"]
    print(f"{label:<12} {n / 1e6:>7.2f}M {name:<8} {loss:>6.3f} {acc:>7.3f} {tpc:>9.2f} "
          f"{speedup:>7.2f}x")
  for prompt, text in samples:
    print("\n--- prompt (held-out) ---\n" + prompt + "\n--- continuation ---\n" + text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(out, f, indent=1)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
