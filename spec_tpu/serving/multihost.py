"""The scheduler's decisions, from process 0 to every process of a multi-host engine.

Every process must run the same programs with the same inputs in the same order (they are
collectives over one mesh). Process 0 alone schedules: before each device call it broadcasts
the call's host inputs, and the other processes (`Engine.follow()`) receive and run them. A
message is an int32 header of fixed size, [kind, K or with_draft, rounds or t, stop_on_free or
r, live mask...], then for an insert an (r, t + 8) int32 payload (prompt tokens, length, slot,
temperature and top-p bits, top-k, seed halves, max_new), broadcast once its shape is known.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spec_tpu.decoding import decode

_STEP, _INSERT, _STOP, _NOOP = 1, 2, 3, 4
_HEADER = 4


@dataclasses.dataclass(frozen=True)
class Message:
  kind: str     # "step" | "insert" | "stop" | "noop"
  args: tuple   # the Engine's _run_step_call / _run_insert arguments


class Channel:
  """Broadcasts from process 0 with jax.experimental.multihost_utils (a collective: every
  process must be inside the same broadcast)."""

  def __init__(self, num_slots: int, broadcast=None):
    import jax
    self.num_slots = num_slots
    self.is_leader = jax.process_index() == 0
    if broadcast is None:
      from jax.experimental import multihost_utils
      broadcast = lambda x: np.asarray(multihost_utils.broadcast_one_to_all(x))
    self._broadcast = broadcast

  def _header(self, *fields, live=None) -> np.ndarray:
    h = np.zeros((_HEADER + self.num_slots,), np.int32)
    h[:len(fields)] = fields
    if live is not None:
      h[_HEADER:] = live
    return h

  def send_step(self, k: int, live, rounds: int, stop_on_free: bool) -> None:
    self._broadcast(self._header(_STEP, k, rounds, int(stop_on_free), live=live))

  def send_insert(self, with_draft: bool, slots, tokens, lengths, rows: decode.Rows) -> None:
    r, t = tokens.shape
    self._broadcast(self._header(_INSERT, int(with_draft), t, r))
    self._broadcast(pack_insert(slots, tokens, lengths, rows))

  def send_stop(self) -> None:
    self._broadcast(self._header(_STOP))

  def send_noop(self) -> None:
    """Keeps the followers' pending broadcast from waiting into a collective timeout while
    the server idles."""
    self._broadcast(self._header(_NOOP))

  def receive(self) -> Message:
    h = self._broadcast(self._header())
    kind = int(h[0])
    if kind == _STEP:
      live = h[_HEADER:].astype(bool)
      return Message("step", (int(h[1]), live, np.int32(h[2]), np.bool_(h[3])))
    if kind == _INSERT:
      with_draft, t, r = bool(h[1]), int(h[2]), int(h[3])
      payload = self._broadcast(np.zeros((r, t + 8), np.int32))
      return Message("insert", (with_draft, *unpack_insert(payload, t)))
    if kind == _STOP:
      return Message("stop", ())
    if kind == _NOOP:
      return Message("noop", ())
    raise ValueError(f"unknown engine message kind {kind}")


def pack_insert(slots, tokens, lengths, rows: decode.Rows) -> np.ndarray:
  """One int32 array carrying an insert call's inputs (floats and uint32s by their bits)."""
  bits = lambda x, dtype: np.asarray(x, dtype).view(np.int32)[:, None]
  seeds = np.asarray(rows.seed_b2, np.uint32).view(np.int32)
  return np.concatenate([np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)[:, None],
                         np.asarray(slots, np.int32)[:, None],
                         bits(rows.temperature_b, np.float32), bits(rows.top_p_b, np.float32),
                         np.asarray(rows.top_k_b, np.int32)[:, None], seeds,
                         np.asarray(rows.max_new_b, np.int32)[:, None]], axis=1)


def unpack_insert(payload: np.ndarray, t: int):
  """(slots, tokens, lengths, rows) from pack_insert's array."""
  p = np.asarray(payload, np.int32)
  col = lambda i: np.ascontiguousarray(p[:, t + i])
  rows = decode.Rows(temperature_b=col(2).view(np.float32), top_p_b=col(3).view(np.float32),
                     top_k_b=col(4), seed_b2=np.ascontiguousarray(p[:, t + 5:t + 7]).view(
                         np.uint32), max_new_b=col(7))
  return col(1), np.ascontiguousarray(p[:, :t]), col(0), rows
