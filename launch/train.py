"""Trains a small LM on the stdlib corpus, distils a draft from a trained target, or trains the
draft shape on data alone (for comparison). Commands in configs/train.py:

    python -m launch.train --config=configs/train.py:target
    python -m launch.train --config=configs/train.py:distill
    python -m launch.train --config=configs/train.py:draft
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app
from absl import logging

from launch import cli

from spec_tpu.checkpoints import checkpoint
from spec_tpu.training import corpus, train
from spec_tpu import tokenizer as tokenizer_lib
from spec_tpu.models.config import FLOAT_DTYPES, ModelConfig

_CONFIG = cli.define_config_file("config", "configs/train.py:target", "Training setup.")


def main(argv):
  del argv  # cli.run refuses positional arguments
  c = _CONFIG.value
  # Everything a run could fail on at its end is checked before it trains for minutes.
  if c.mode not in ("target", "distill", "draft"):
    raise app.UsageError(f"mode must be target, distill or draft, got {c.mode!r}")
  for name in ("steps", "batch", "seq_len", "eval_windows"):
    if not (isinstance(c[name], int) and c[name] >= 1):
      raise app.UsageError(f"--config.{name} must be a positive integer, got {c[name]!r}")
  for name in ("seconds", "lr"):
    if not c[name] > 0:
      raise app.UsageError(f"--config.{name} must be positive, got {c[name]!r}")
  if c.warmup_steps < 0:
    raise app.UsageError(f"--config.warmup_steps must be >= 0, got {c.warmup_steps}")
  if c.save_dtype not in FLOAT_DTYPES:
    raise app.UsageError(f"--config.save_dtype must be one of {FLOAT_DTYPES}, got "
                         f"{c.save_dtype!r}")
  checkpoint.check_destination(c.output, c.overwrite)
  try:
    tok = tokenizer_lib.load(c.tokenizer or None)
  except (OSError, ValueError, RuntimeError) as e:
    raise app.UsageError(f"tokenizer {c.tokenizer!r}: {e}") from None
  # Train in float32 (bf16 Adam updates lose small steps); a bf16 copy is what gets stored.
  try:
    cfg = ModelConfig(**c.model.to_dict(), valid_vocab_size=tok.vocab_size, tokenizer=tok.name,
                      dtype="float32")
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--config.model: {e}") from None
  teacher = None
  if c.mode == "distill":
    t_params, t_cfg = checkpoint.restore(c.teacher, dtype="float32")
    if t_cfg.tokenizer != tok.name:
      raise app.UsageError(f"teacher tokenizer {t_cfg.tokenizer} != {tok.name}")
    teacher = (t_params, t_cfg.replace(dtype="float32"))

  train_files, heldout_files = corpus.split(corpus.stdlib_files())
  stream = corpus.token_stream(tok, train_files)
  heldout = corpus.heldout_windows(corpus.token_stream(tok, heldout_files), c.seq_len,
                                   c.eval_windows)
  logging.info("%s (%s): %.2fM params, %d train tokens, %d held-out windows", cfg.name, c.mode,
               cfg.num_params() / 1e6, len(stream), len(heldout))
  result = train.train(cfg, stream, steps=c.steps, batch=c.batch, seq_len=c.seq_len, lr=c.lr,
                       seconds_budget=c.seconds, teacher=teacher, seed=c.seed,
                       warmup_steps=c.warmup_steps, log_fn=logging.info)
  loss = train.evaluate(result.params, cfg, heldout)
  logging.info("held-out loss %.4f nats/token after %d steps (%.0fs)", loss, result.steps,
               result.seconds)
  save_cfg = cfg.replace(dtype=c.save_dtype)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(c.save_dtype)), result.params)
  checkpoint.save(c.output, params, save_cfg, overwrite=c.overwrite,
                  extra={"heldout_loss": loss, "steps": result.steps,
                         "train_seconds": result.seconds, "tokens_seen": result.tokens_seen,
                         "mode": c.mode, "teacher": c.teacher, "batch": c.batch,
                         "seq_len": c.seq_len, "lr": c.lr, "num_params": cfg.num_params()})
  print(f"{cfg.name}: {cfg.num_params() / 1e6:.2f}M params, held-out loss {loss:.4f} nats/token, "
        f"{result.steps} steps, {result.seconds:.0f}s -> {c.output}")


if __name__ == "__main__":
  cli.run(main)
