"""N, the speculative rounds one device call (engine step) runs.

A step costs h + N t: h is fixed per step (dispatching the program, fetching its tokens, the
host's delivery and scheduling between steps), t is a round on device. Larger N amortises h
(throughput) but tokens reach clients in chunks of N rounds, and a slot that finishes mid-step
is refilled only after the step (the step ends early for that when requests wait, so that cost
is bounded by one round). So N is the fewest rounds that keep h under a fraction `overhead`
of the step,

    N = ceil(h / (overhead * t)),

capped so a chunk reaches clients at least every `max_interval_s` (N t <= max_interval_s), and
by the out buffer the step programs were compiled for (max_rounds). h and t are measured:
exponential moving averages over steps, t per K (a round at K = 4 costs more than at K = 0).
Example: on the 2-core CPU with the embedded pair, t ~ 4 ms and h ~ 1 ms give N = 5 (20 ms
chunks); on an accelerator, t ~ 15 ms and h ~ 0.5 ms give N = 1 or 2.
"""

from __future__ import annotations

import math


class Pacing:

  def __init__(self, max_rounds: int, *, fixed: int | None = None, overhead: float = 0.05,
               max_interval_s: float = 0.1, weight: float = 0.2):
    if max_rounds < 1 or (fixed is not None and not 1 <= fixed <= max_rounds):
      raise ValueError(f"need 1 <= rounds_per_step <= max_rounds, got {fixed}, {max_rounds}")
    if not (0 < overhead < 1 and max_interval_s > 0 and 0 < weight <= 1):
      raise ValueError("need 0 < overhead < 1, max_interval_s > 0, 0 < weight <= 1")
    self.max_rounds, self.fixed = int(max_rounds), fixed
    self.overhead, self.max_interval_s, self.weight = overhead, max_interval_s, weight
    self.call_s = 0.0          # a step call's own cost (dispatch + fetch), measured at calibration
    self.host_s: float | None = None
    self.round_s: dict[int, float] = {}

  def observe_call(self, seconds: float) -> None:
    self.call_s = max(0.0, seconds)

  def observe_step(self, k: int, rounds: int, seconds: float) -> None:
    """A step call at K that ran `rounds` rounds in `seconds` (wall, dispatch to fetched)."""
    if rounds > 0:
      self.round_s[k] = self._ema(self.round_s.get(k), max(seconds - self.call_s, 0.0) / rounds)

  def observe_host(self, seconds: float) -> None:
    """Host time between two step calls (delivery, scheduling), prefills excluded."""
    self.host_s = self._ema(self.host_s, max(0.0, seconds))

  def _ema(self, old, new):
    return new if old is None else self.weight * new + (1 - self.weight) * old

  def rounds(self, k: int) -> int:
    if self.fixed is not None:
      return self.fixed
    t = self.round_s.get(k)
    if t is None or t <= 0:
      return self.max_rounds if t is not None else 1  # nothing measured yet: one round
    h = self.call_s + (self.host_s or 0.0)
    n = math.ceil(h / (self.overhead * t)) if h > 0 else 1
    cap = max(1, math.floor(self.max_interval_s / t))
    return int(max(1, min(n, cap, self.max_rounds)))
