"""Training a small LM from scratch, and distilling a draft from a target, with optax.

Distillation follows DistillSpec (Zhou et al. 2023): the draft minimises KL(target || draft) over
the target's own next-token distributions at temperature 1. Acceptance in speculative sampling is
sum_x min(p, q) = 1 - TV(p, q), so matching the target's whole distribution (not only the data's
one-hot labels) is what raises it.

Used to make the embedded default pair (launch/train.py, configs/train.py); users can run it to get
a draft for a target that has none. The library never parses flags.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spec_tpu.training import corpus
from spec_tpu.models import model
from spec_tpu.models.config import ModelConfig

F32 = jnp.float32


def lm_loss(params, cfg: ModelConfig, batch_bt) -> jax.Array:
  """Mean next-token cross entropy (nats/token, float32) over windows of t + 1 tokens."""
  logits = model.forward_full(params, cfg, batch_bt[:, :-1])[..., :cfg.num_tokens].astype(F32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, batch_bt[:, 1:, None], axis=-1))


def distill_loss(draft_params, draft_cfg: ModelConfig, target_logits_btv, batch_bt) -> jax.Array:
  """Mean per-token KL(target || draft) in nats, target at temperature 1 over the valid tokens.

  target_logits_btv are the target's logits for batch_bt[:, :-1] (padding rows past the draft's
  num_tokens are dropped, so both distributions live on the tokens a sampler can emit).
  """
  n = draft_cfg.num_tokens
  logits = model.forward_full(draft_params, draft_cfg, batch_bt[:, :-1])[..., :n].astype(F32)
  t_logp = jax.nn.log_softmax(target_logits_btv[..., :n].astype(F32), axis=-1)
  d_logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - d_logp), axis=-1))


def lr_at(progress: float, step: int, *, lr: float, warmup_steps: int,
          end_fraction: float = 0.1) -> float:
  """Linear warmup over steps, then cosine decay to lr * end_fraction as progress goes 0 -> 1.

  progress is the fraction of the run done, max(step / steps, elapsed / seconds_budget): runs are
  bounded by wall time on shared machines, and a schedule over steps alone would stop half-way up
  its decay whenever the clock ran out first.
  """
  if step < warmup_steps:
    return lr * (step + 1) / warmup_steps
  cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
  return lr * (end_fraction + (1.0 - end_fraction) * cos)


def optimizer(weight_decay: float = 0.01, clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; the learning rate is injected per step (see lr_at)."""
  return optax.chain(
    optax.clip_by_global_norm(clip),
    optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95,
                                          weight_decay=weight_decay))


def _set_lr(opt_state, lr: float):
  # chain state: (clip state, injected adamw state); the hyperparams dict is mutable in place.
  opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, F32)
  return opt_state


def make_train_step(cfg: ModelConfig, opt: optax.GradientTransformation, teacher=None):
  """Jitted (params, opt_state, batch) -> (params, opt_state, loss).

  teacher: (params, cfg) to distil from (KL(teacher || student)); None trains on the labels.
  """
  if teacher is None:
    loss_fn = lambda p, b: lm_loss(p, cfg, b)
  else:
    t_params, t_cfg = teacher
    if t_cfg.num_tokens != cfg.num_tokens:
      raise ValueError(f"teacher has {t_cfg.num_tokens} tokens, student {cfg.num_tokens}")

    def loss_fn(p, b):
      t_logits = jax.lax.stop_gradient(model.forward_full(t_params, t_cfg, b[:, :-1]))
      return distill_loss(p, cfg, t_logits, b)

  @jax.jit
  def train_step(params, opt_state, batch_bt):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch_bt)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def evaluate(params, cfg: ModelConfig, windows_bt: np.ndarray, batch: int = 32) -> float:
  """Mean held-out next-token loss (nats/token) over fixed (n, t + 1) windows, every label once."""
  fn = jax.jit(lambda p, b: lm_loss(p, cfg, b) * b[:, 1:].size)
  windows_bt = np.asarray(windows_bt, np.int32)
  total = 0.0
  for i in range(0, len(windows_bt), batch):
    total += float(fn(params, jnp.asarray(windows_bt[i:i + batch])))
  return total / windows_bt[:, 1:].size


class TrainResult(NamedTuple):
  params: dict
  steps: int         # optimizer steps taken
  seconds: float     # wall time of the loop (compile of the first step included)
  tokens_seen: int   # label tokens consumed


def train(cfg: ModelConfig, stream: np.ndarray, *, steps: int, batch: int, seq_len: int,
          lr: float, seconds_budget: float, teacher: tuple | None = None, seed: int = 0,
          warmup_steps: int = 100, log_fn: Callable[[str], None] = print,
          log_every: int = 50) -> TrainResult:
  """Trains cfg from a random init on random windows of the 1-D token stream.

  Stops after `steps` or once `seconds_budget` of wall time is spent, whichever is first; the
  learning-rate schedule tracks whichever bound is nearer (lr_at), so a time-bounded run still
  ends at the bottom of its decay. teacher: (params, cfg) to distil from instead of the labels.
  Params train in cfg.dtype (use float32; cast a copy for storage).
  """
  batches: Iterator[np.ndarray] = corpus.token_batches(stream, batch, seq_len,
                                                       np.random.default_rng(seed))
  params = model.init_params(cfg, jax.random.key(seed))
  opt = optimizer()
  opt_state = opt.init(params)
  train_step = make_train_step(cfg, opt, teacher)
  warmup_steps = max(1, min(warmup_steps, steps // 10))

  start = time.perf_counter()
  done = 0
  while done < steps:
    elapsed = time.perf_counter() - start
    if elapsed >= seconds_budget:
      break
    progress = max(done / steps, elapsed / seconds_budget)
    opt_state = _set_lr(opt_state, lr_at(progress, done, lr=lr, warmup_steps=warmup_steps))
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(next(batches)))
    # Wait for the step: with async dispatch the loop would otherwise queue steps far past the
    # wall-clock budget before the clock check above saw them.
    loss.block_until_ready()
    done += 1
    if done == 1 or done % log_every == 0:
      log_fn(f"step {done} loss {float(loss):.4f} lr "
             f"{float(opt_state[1].hyperparams['learning_rate']):.2e} "
             f"({time.perf_counter() - start:.0f}s)")
  params = jax.block_until_ready(params)
  return TrainResult(params, done, time.perf_counter() - start, done * batch * seq_len)
