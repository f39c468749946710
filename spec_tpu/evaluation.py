"""Scoring models and pairs: held-out loss, acceptance and speedup of drafts against a target
(launch.evaluate_pair), and how far int8 weights move a model's logits (launch.compare_quant).

Held-out data is the stdlib corpus's held-out split (spec_tpu/training/corpus.py), never seen in
training, through the shipped tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu import tokenizer as tokenizer_lib
from spec_tpu.checkpoints import checkpoint
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import model
from spec_tpu.training import corpus, train


class EvaluationError(ValueError):
  """Inputs an evaluation cannot use (too few held-out files, mismatched checkpoints)."""


# ---------------------------------------------------------------- pairs

SETTINGS = {"temp1": SamplingParams(temperature=1.0), "greedy": SamplingParams(temperature=0.0)}


def heldout_prompts(tok, files, n: int, length: int) -> list[list[int]]:
  """n prompts of `length` tokens, one per held-out file, a third of the way in (in code rather
  than in license headers)."""
  prompts = []
  for ids in tok.encode_batch([corpus.read_text([f]) for f in files]):
    if len(ids) >= 3 * length:
      start = len(ids) // 3
      prompts.append(ids[start:start + length])
    if len(prompts) == n:
      break
  if len(prompts) < n:
    raise EvaluationError(f"only {len(prompts)} held-out files are long enough for {n} prompts")
  return prompts


def restore(path: str, dtype: str | None = None, quantize: str | None = None):
  """(params, cfg) of a checkpoint, cast to dtype and quantized (int8) if asked."""
  params, cfg = checkpoint.restore(path, dtype=dtype)
  cfg = cfg.replace(dtype=dtype) if dtype else cfg
  if quantize and not cfg.quantize:
    cfg = cfg.replace(quantize=quantize)
    params = jax.jit(model.quantize, static_argnums=1)(params, cfg)
  return params, cfg


def evaluate_pairs(target: str, drafts: list[tuple[str, str]], *, num_prompts: int,
                   prompt_len: int, max_new_tokens: int, k: int, repeats: int, seq_len: int,
                   eval_windows: int, dtype: str | None = None, quantize: str | None = None,
                   seed: int = 0, show_samples: int = 0) -> tuple[dict, list, list]:
  """Every (label, checkpoint) draft against the target at K = k, temperature 1 and greedy; the
  target alone (K = 0) at the same settings is the baseline of the wall-clock speedup. Times
  exclude compilation and are the best of `repeats` runs (other work only adds time).
  Returns (results, rows of (label, setting, loss, acceptance, tokens/call, speedup),
  [(prompt, continuation)] samples)."""
  tok = tokenizer_lib.load()
  _, heldout_files = corpus.split(corpus.stdlib_files())
  windows = corpus.heldout_windows(corpus.token_stream(tok, heldout_files), seq_len,
                                   eval_windows)
  prompts = heldout_prompts(tok, heldout_files, num_prompts, prompt_len)

  def loss_of(path):
    # Scored in float32 activations from the stored (or int8) weights, whatever dtype sampling
    # uses.
    params, cfg = restore(path, "float32", quantize)
    return train.evaluate(params, cfg, windows)

  def timed(sampler, kk, sampling):
    runs = [sampler.generate(prompts, max_new_tokens=max_new_tokens, k=kk, sampling=sampling,
                             seed=seed) for _ in range(max(1, repeats))]
    return min(runs, key=lambda r: r.seconds)

  t_params, t_cfg = restore(target, dtype, quantize)
  out = {"target": {"checkpoint": target, "num_params": t_cfg.num_params(),
                    "heldout_loss": loss_of(target)},
         "k": k, "num_prompts": len(prompts), "prompt_len": prompt_len,
         "max_new_tokens": max_new_tokens, "dtype": t_cfg.dtype,
         "quantize": t_cfg.quantize or "none", "drafts": {}, "baseline": {}}
  baseline = Sampler.from_params(t_params, t_cfg, eos_ids=tok.eos_ids)
  for name, sp in SETTINGS.items():
    r = timed(baseline, 0, sp)
    out["baseline"][name] = {"seconds": r.seconds, "tokens": r.num_generated}

  rows, samples = [], []
  for label, path in drafts:
    d_params, d_cfg = restore(path, dtype, quantize)
    sampler = Sampler.from_params(t_params, t_cfg, draft_params=d_params, draft_cfg=d_cfg,
                                  eos_ids=tok.eos_ids)
    entry = {"checkpoint": path, "num_params": d_cfg.num_params(), "heldout_loss": loss_of(path)}
    for name, sp in SETTINGS.items():
      r = timed(sampler, k, sp)
      base = out["baseline"][name]
      # Rows may stop at EOS, so compare throughputs (tokens/s), not raw seconds.
      speedup = (r.num_generated / r.seconds) / (base["tokens"] / base["seconds"])
      entry[name] = {"acceptance_rate": r.acceptance_rate(),
                     "tokens_per_call": r.tokens_per_call(), "seconds": r.seconds,
                     "tokens": r.num_generated, "speedup": speedup,
                     "acceptance_by_position": [float(x) for x in r.acceptance_by_position()]}
      rows.append((label, name, entry["heldout_loss"], r.acceptance_rate(), r.tokens_per_call(),
                   speedup))
      if name == "temp1" and not samples:
        samples = [(tok.decode(prompts[i]), tok.decode(r.tokens[i]))
                   for i in range(min(show_samples, len(prompts)))]
    out["drafts"][label] = entry
  return out, rows, samples


# ---------------------------------------------------------------- int8 against float

_BATCH = 16


def token_windows(tokens: str, vocab: int, n: int, seq_len: int) -> np.ndarray:
  """(n, seq_len + 1) token windows ('heldout' or 'random'): the model reads the first
  seq_len, the loss scores the next token at each."""
  if tokens == "random":
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (n, seq_len + 1), dtype=np.int32)
  tok = tokenizer_lib.load()
  _, heldout = corpus.split(corpus.stdlib_files())
  return corpus.heldout_windows(corpus.token_stream(tok, heldout), seq_len, n)


def logits(params, cfg, windows) -> np.ndarray:
  fn = jax.jit(lambda p, t: model.forward_full(p, cfg, t)[..., :cfg.num_tokens])
  return np.concatenate([np.asarray(fn(params, jnp.asarray(windows[i:i + _BATCH, :-1])),
                                    np.float32) for i in range(0, len(windows), _BATCH)])


def compare_logits(a, b) -> dict:
  """a, b: (n t v) float32 logits of two forms of a model."""
  diff = np.abs(a - b)
  la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
  lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
  kl = np.sum(np.exp(la) * (la - lb), axis=-1)
  return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
          "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
          "mean_kl": float(kl.mean())}


def loss(logits_ntv, windows) -> float:
  logp = logits_ntv - np.logaddexp.reduce(logits_ntv, axis=-1, keepdims=True)
  return float(-np.mean(np.take_along_axis(logp, windows[:, 1:, None], axis=-1)))


def check_quantizable(path: str, quantized: str | None, tokens: str) -> None:
  """What compare_quantized would refuse, from the stored configs alone (no weights read)."""
  cfg = checkpoint.load_config(path)
  if cfg.quantize:
    raise EvaluationError(f"--checkpoint {path} is already {cfg.quantize}: give the float one")
  try:
    cfg.replace(quantize="int8")
  except ValueError as e:
    raise EvaluationError(f"--checkpoint {path}: {e}") from None
  if tokens == "heldout":
    shipped = tokenizer_lib.load().name
    if cfg.tokenizer != shipped:
      raise EvaluationError(f"--checkpoint {path} was made with tokenizer {cfg.tokenizer!r}, and "
                            f"--tokens=heldout encodes with the shipped one ({shipped}): its "
                            "ids would mean other tokens; use --tokens=random")
  if quantized:
    q_cfg = checkpoint.load_config(quantized)
    if q_cfg.quantize != "int8" or q_cfg.num_params() != cfg.num_params():
      raise EvaluationError(f"--quantized {quantized} is not an int8 form of {path}")


def compare_quantized(path: str, quantized: str | None, *, tokens: str, windows: int,
                      seq_len: int) -> dict:
  """Logits of a float checkpoint in float32, as stored, and int8 (from `quantized`, else
  quantized on load), on the same token windows: each pair's differences (and held-out loss)."""
  stored, cfg = checkpoint.restore(path)
  if quantized:
    q_params, q_cfg = checkpoint.restore(quantized)
  else:
    q_cfg = cfg.replace(quantize="int8")
    q_params = jax.jit(model.quantize, static_argnums=1)(stored, q_cfg)
  f32_cfg = cfg.replace(dtype="float32")
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), stored)
  w = token_windows(tokens, cfg.num_tokens, windows, seq_len)
  out_logits = {"float32": logits(f32, f32_cfg, w), cfg.dtype: logits(stored, cfg, w),
                "int8": logits(q_params, q_cfg, w)}
  out = {"checkpoint": path, "quantized": quantized or "(quantized on load)",
         "stored_dtype": cfg.dtype, "num_params": cfg.num_params(), "tokens": tokens,
         "positions": int(w[:, 1:].size),
         f"int8_vs_{cfg.dtype}": compare_logits(out_logits[cfg.dtype], out_logits["int8"]),
         f"{cfg.dtype}_vs_float32": compare_logits(out_logits["float32"], out_logits[cfg.dtype])}
  if tokens == "heldout":
    out["heldout_loss"] = {form: loss(lg, w) for form, lg in out_logits.items()}
  return out
