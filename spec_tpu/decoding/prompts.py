"""Turning user prompts into padded device batches, with the checks that keep bad input from
reaching XLA."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket(n: int, minimum: int = 16) -> int:
  """Rounds a length up to a power of two, so a handful of compiled shapes serve all prompts."""
  b = minimum
  while b < n:
    b *= 2
  return b


def pack(prompts: Sequence[Sequence[int]], num_tokens: int, pad_id: int = 0,
         min_bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into (b, t) int32 plus their lengths (b,), after validating them."""
  if len(prompts) == 0:
    raise ValueError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
    token_ids(p, num_tokens, f"prompt {i}")
  t = bucket(int(lengths.max()), min_bucket)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


def token_ids(prompt: Sequence[int], num_tokens: int, what: str = "the prompt") -> list[int]:
  """A prompt's token ids as ints, or a ValueError: integers (a float would be truncated) in
  the vocabulary [0, num_tokens)."""
  arr = np.asarray(prompt)
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} holds non-integer token ids ({arr.dtype})")
  bad = arr[(arr < 0) | (arr >= num_tokens)]
  if bad.size:
    raise ValueError(f"{what} has token ids outside the vocabulary [0, {num_tokens}): "
                     f"{bad[:5].tolist()}")
  return arr.astype(np.int64).reshape(-1).tolist()


def check_fits(prompt_len: int, max_new_tokens: int, max_len: int | None, extra: int = 0):
  """The cache must hold the prompt, the new tokens and a verification block."""
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if max_len is not None and prompt_len + max_new_tokens + extra > max_len:
    raise ValueError(
        f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens"
        + (f" + {extra} for verification" if extra else "")
        + f" does not fit the cache of {max_len} tokens (max_cache_len)")


def synthetic(batch: int, length: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
  """Random token prompts for benchmarks and plans when there is no tokenizer."""
  rng = np.random.default_rng(seed)
  return rng.integers(4, num_tokens, size=(batch, length)).tolist()
