"""Training and distillation steps do what they claim on a tiny model."""

import jax
import numpy as np

from spec_tpu.models import config, model
from spec_tpu.training import train

CFG = config.get_preset("tiny").replace(num_layers=1)


def test_training_reduces_the_loss_on_a_repeated_batch():
  # A stream exactly one window long: every batch is the same window, so the loss must fall fast.
  stream = np.random.default_rng(0).integers(4, CFG.vocab_size, 17).astype(np.int32)
  batch = np.stack([stream] * 4)
  before = float(train.lm_loss(model.init_params(CFG, jax.random.key(0)), CFG, batch))
  result = train.train(CFG, stream, steps=30, batch=4, seq_len=16, lr=1e-2, seconds_budget=120,
                       warmup_steps=3, log_fn=lambda s: None)
  assert result.steps == 30 and result.tokens_seen == 30 * 4 * 16
  assert float(train.lm_loss(result.params, CFG, batch)) < before - 1.0
  assert train.evaluate(result.params, CFG, batch[:1]) < before - 1.0


def test_seconds_budget_stops_training():
  stream = np.arange(40, dtype=np.int32) % CFG.vocab_size
  result = train.train(CFG, stream, steps=10_000, batch=2, seq_len=8, lr=1e-3, seconds_budget=0.0,
                       log_fn=lambda s: None)
  assert result.steps == 0


def test_distill_loss_is_zero_only_for_the_teacher_itself():
  batch = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  teacher = model.init_params(CFG, jax.random.key(0))
  other = model.init_params(CFG, jax.random.key(1))
  t_logits = model.forward_full(teacher, CFG, batch[:, :-1])
  assert abs(float(train.distill_loss(teacher, CFG, t_logits, batch))) < 1e-5
  assert float(train.distill_loss(other, CFG, t_logits, batch)) > 1e-2


def test_distillation_moves_the_student_towards_the_teacher():
  stream = np.random.default_rng(2).integers(4, CFG.vocab_size, 200).astype(np.int32)
  t_params = model.init_params(CFG, jax.random.key(5))
  batch = np.stack([stream[:17], stream[17:34]])
  t_logits = model.forward_full(t_params, CFG, batch[:, :-1])
  before = float(train.distill_loss(model.init_params(CFG, jax.random.key(0)), CFG, t_logits,
                                    batch))
  result = train.train(CFG, stream, steps=40, batch=4, seq_len=16, lr=1e-2, seconds_budget=120,
                       teacher=(t_params, CFG), warmup_steps=3, log_fn=lambda s: None)
  assert float(train.distill_loss(result.params, CFG, t_logits, batch)) < before / 2
