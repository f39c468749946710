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
reported too (nats/token over the same windows as launch.evaluate_pair).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from launch import cli
from spec_tpu.checkpoints import checkpoint
from spec_tpu.models import model
from spec_tpu.training import corpus

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

_BATCH = 16


def _windows(vocab: int) -> np.ndarray:
  """(n, seq_len + 1) token windows: the model reads the first seq_len, the loss scores the
  next token at each."""
  if _TOKENS.value == "random":
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (_WINDOWS.value, _SEQ_LEN.value + 1), dtype=np.int32)
  from spec_tpu import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load()
  _, heldout = corpus.split(corpus.stdlib_files())
  return corpus.heldout_windows(corpus.token_stream(tok, heldout), _SEQ_LEN.value,
                                _WINDOWS.value)


def _logits(params, cfg, windows):
  fn = jax.jit(lambda p, t: model.forward_full(p, cfg, t)[..., :cfg.num_tokens])
  return np.concatenate([np.asarray(fn(params, jnp.asarray(windows[i:i + _BATCH, :-1])),
                                    np.float32) for i in range(0, len(windows), _BATCH)])


def _compare(a, b) -> dict:
  """a, b: (n t v) float32 logits of two forms of a model."""
  diff = np.abs(a - b)
  la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
  lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
  kl = np.sum(np.exp(la) * (la - lb), axis=-1)
  return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
          "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
          "mean_kl": float(kl.mean())}


def _loss(logits, windows) -> float:
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return float(-np.mean(np.take_along_axis(logp, windows[:, 1:, None], axis=-1)))


def check(path: str, quantized: str | None) -> None:
  """What compare() would refuse, from the stored configs alone (no weights read)."""
  cfg = checkpoint.load_config(path)
  if cfg.quantize:
    raise app.UsageError(f"--checkpoint {path} is already {cfg.quantize}: give the float one")
  try:
    cfg.replace(quantize="int8")
  except ValueError as e:
    raise app.UsageError(f"--checkpoint {path}: {e}") from None
  if _TOKENS.value == "heldout":
    from spec_tpu import tokenizer as tokenizer_lib
    shipped = tokenizer_lib.load().name
    if cfg.tokenizer != shipped:
      raise app.UsageError(f"--checkpoint {path} was made with tokenizer {cfg.tokenizer!r}, and "
                           f"--tokens=heldout encodes with the shipped one ({shipped}): its "
                           "ids would mean other tokens; use --tokens=random")
  if quantized:
    q_cfg = checkpoint.load_config(quantized)
    if q_cfg.quantize != "int8" or q_cfg.num_params() != cfg.num_params():
      raise app.UsageError(f"--quantized {quantized} is not an int8 form of {path}")


def compare(path: str, quantized: str | None) -> dict:
  stored, cfg = checkpoint.restore(path)
  if quantized:
    q_params, q_cfg = checkpoint.restore(quantized)
  else:
    q_cfg = cfg.replace(quantize="int8")
    q_params = jax.jit(model.quantize, static_argnums=1)(stored, q_cfg)
  f32_cfg = cfg.replace(dtype="float32")
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), stored)
  windows = _windows(cfg.num_tokens)
  logits = {"float32": _logits(f32, f32_cfg, windows), cfg.dtype: _logits(stored, cfg, windows),
            "int8": _logits(q_params, q_cfg, windows)}
  out = {"checkpoint": path, "quantized": quantized or "(quantized on load)",
         "stored_dtype": cfg.dtype, "num_params": cfg.num_params(), "tokens": _TOKENS.value,
         "positions": int(windows[:, 1:].size),
         f"int8_vs_{cfg.dtype}": _compare(logits[cfg.dtype], logits["int8"]),
         f"{cfg.dtype}_vs_float32": _compare(logits["float32"], logits[cfg.dtype])}
  if _TOKENS.value == "heldout":
    out["heldout_loss"] = {form: _loss(lg, windows) for form, lg in logits.items()}
  return out


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
  for p, q in zip(_CHECKPOINTS.value, quantized):
    check(p, q)  # CheckpointError (missing, damaged config): one line (cli.run)
  results = [compare(p, q) for p, q in zip(_CHECKPOINTS.value, quantized)]
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
