"""Choosing K, the draft tokens per round, so that speculation never makes users slower.

Cost model (Leviathan et al. 2023, Thm 3.8): if each draft token is accepted with probability a
(independently) and one draft step costs c target steps, a round of K drafts costs K c + 1 target
steps and yields 1 + a + ... + a^K tokens, so against plain decoding (K = 0) the speedup is

    expected_speedup(a, c, K) = (1 - a^(K+1)) / ((1 - a) (K c + 1)).

Here a is the acceptance of a judged draft token, Result.acceptance_rate() =
Result.accepted.sum() / Result.reached.sum() (drafts after a rejection are never judged).

The serving engine (spec_tpu/serving/engine.py) owns one: its calibration times a round at
every K it may pick (`observe_round_time`), and every window of rounds reports the acceptance
(`observe_acceptance`, or `observe_off` for a window at K = 0). `policy.k` is 0 whenever the
estimated speedup of the best K is not above 1 + margin, so a poor draft, a slow draft or a
compute-bound target turns speculation off. While K = 0 no acceptance is observed; with
`probe_every=N` one window runs the smallest K after N windows at K = 0, so a draft that became
good again is noticed. That probe (`policy.probing`) is the only time K > 0 is chosen on an
estimate below 1 + margin.
Distinct K values compile distinct programs: keep k_max small.
"""

from __future__ import annotations

import math


def expected_speedup(a: float, c: float, k: int) -> float:
  """Expected tokens per unit of target time relative to plain decoding (1.0 at k = 0).

  The geometric sum 1 + a + ... + a^k equals (1 - a^(k+1)) / (1 - a) and stays exact at a = 1,
  where the speedup is (k + 1) / (k c + 1).
  """
  _check(a, c, k)
  return sum(a ** i for i in range(k + 1)) / (k * c + 1.0)


def ideal_speedup(a: float, c: float, k: int) -> float:
  """expected_speedup, but 1 at K = 0 and NaN where a or c is undefined (no draft token was
  judged, or no draft was timed): what a benchmark reports as the ideal."""
  if k == 0:
    return 1.0
  if not (math.isfinite(a) and math.isfinite(c)):
    return float("nan")
  return expected_speedup(a, c, k)


def _check(a, c, k):
  if not 0.0 <= a <= 1.0:
    raise ValueError(f"acceptance rate a must be in [0, 1], got {a}")
  if not c >= 0.0:  # also catches NaN
    raise ValueError(f"cost ratio c must be >= 0, got {c}")
  if int(k) != k or k < 0:
    raise ValueError(f"k must be an integer >= 0, got {k}")


def choose_k_measured(a: float, costs: dict[int, float], margin: float = 0.0) -> int:
  """The k with the largest expected speedup given measured relative round costs
  (costs[k] = a round at k / a round at K = 0; costs[0] = 1); 0 unless it beats 1 + margin.
  Ties go to the smaller k."""
  best_k, best = 0, 1.0 + margin
  for k in sorted(costs):
    if k == 0:
      continue
    if not costs[k] > 0:
      raise ValueError(f"relative round cost must be positive, got costs[{k}] = {costs[k]}")
    s = sum(a ** i for i in range(k + 1)) / costs[k]
    if s > best * (1 + 1e-12):
      best_k, best = k, s
  return best_k


class AdaptiveK:
  """Running estimates of a and the cost of a round; `.k` is the K to use for the next batch.

  a: exponential moving average over batches (weight `weight` on the newest) of each batch's
    acceptance, accepted / judged draft tokens (drafts after a rejection are never judged, so
    they are not counted as failures), smoothed by a Beta(prior) so a tiny batch cannot swing it
    to 0 or 1. Averaging batches rather than pooling their counts makes a batch at large K count
    no more than one at small K, so a draft that turns bad is dropped within a few batches.
  cost: a round at K relative to a round at K = 0. Where round times at K and at 0 were both
    observed (`observe_round_time`) that ratio, as measured: no model of how verification grows
    with K. For a K not timed, the formula's K c + 1, with c the per-draft-token cost the timed
    K's imply (cost assumed linear in K).
  Until a cost is known the policy keeps k0: without a cost it
  cannot tell whether speculation pays. `ks` limits the choice (e.g. to the K whose programs
  are compiled); a probe runs the smallest positive one.
  """

  def __init__(self, k0: int = 4, k_max: int = 8, *, prior: tuple[float, float] = (1.0, 1.0), weight: float = 0.5,
               margin: float = 0.02, probe_every: int | None = None,
               ks: tuple[int, ...] | None = None):
    if int(k_max) != k_max or k_max < 0 or int(k0) != k0 or not 0 <= k0 <= k_max:
      raise ValueError(f"need integers 0 <= k0 <= k_max, got k0={k0}, k_max={k_max}")
    if not (prior[0] > 0 and prior[1] > 0):
      raise ValueError(f"Beta prior counts must be positive, got {prior}")
    if not 0.0 < weight <= 1.0:
      raise ValueError(f"weight must be in (0, 1], got {weight}")
    if probe_every is not None and probe_every < 1:
      raise ValueError(f"probe_every must be >= 1 or None, got {probe_every}")
    ks = tuple(sorted(set(range(k_max + 1) if ks is None else (0, k0, *ks))))
    if any(int(k) != k or not 0 <= k <= k_max for k in ks):
      raise ValueError(f"ks must be integers in 0..k_max={k_max}, got {ks}")
    self.k_max, self.margin, self.weight, self.ks = int(k_max), margin, weight, ks
    self.probe_every = probe_every
    self._prior = (float(prior[0]), float(prior[1]))
    self._a = None  # no batch seen yet: the prior's mean
    self._c = None
    self._round_s: dict[int, float] = {}
    self._k = int(k0)
    self._batches_off = 0  # consecutive batches run with k = 0 by choice
    self._probing = False

  @property
  def k(self) -> int:
    """K for the next batch."""
    return self._k

  @property
  def a(self) -> float:
    return self._prior[0] / sum(self._prior) if self._a is None else self._a

  @property
  def c(self) -> float | None:
    return self._c

  @property
  def probing(self) -> bool:
    """Whether `.k` is a probe (K = 1 against the estimate) rather than the best choice."""
    return self._probing

  def cost(self, k: int) -> float | None:
    """A round at k relative to a round at K = 0: measured where both were timed, else
    k c + 1; None while neither is known. A round at a larger K does strictly more work, so a
    measured cost below that of a smaller measured K (timing noise on a busy machine) is
    raised to it."""
    if k == 0:
      return 1.0
    if k in self._round_s and 0 in self._round_s:
      return max(self._round_s[j] for j in self._round_s if j <= k) / self._round_s[0]
    return None if self._c is None else k * self._c + 1.0

  def speedup(self, k: int | None = None) -> float:
    """Estimated speedup at k (default: the current choice); nan while its cost is unknown."""
    k = self._k if k is None else k
    cost = self.cost(k)
    return math.nan if cost is None else sum(self.a ** i for i in range(k + 1)) / cost

  def observe_off(self) -> int:
    """A finished batch run at K = 0: nothing to learn about a, one batch closer to a probe."""
    self._batches_off += 1
    return self._update(batch_done=True)

  def observe_acceptance(self, accepted: float, judged: float) -> int:
    """A finished batch with K > 0 as raw counts: `judged` draft tokens tested, `accepted` kept."""
    if not 0 <= accepted <= judged:
      raise ValueError(f"need 0 <= accepted <= judged, got {accepted}, {judged}")
    if judged == 0:  # e.g. every row finished at prefill: no evidence either way
      return self._k
    batch_a = (self._prior[0] + accepted) / (sum(self._prior) + judged)
    self._a = batch_a if self._a is None else self._ema(self._a, batch_a)
    self._batches_off = 0
    return self._update(batch_done=True)

  def observe_round_time(self, k: int, seconds: float) -> int:
    """The measured time of one round at k (k = 0: plain decoding), as the loop pays it."""
    if not seconds > 0:
      raise ValueError(f"round time must be positive, got {seconds}")
    old = self._round_s.get(k)
    self._round_s[k] = seconds if old is None else self._ema(old, seconds)
    if k > 0 and 0 in self._round_s:  # keep c (reported, and the fallback) in step
      c = max(0.0, (self._round_s[k] / self._round_s[0] - 1.0) / k)
      self._c = c if self._c is None else self._ema(self._c, c)
    return self._update()

  def _ema(self, old, new):
    return self.weight * new + (1 - self.weight) * old

  def _update(self, batch_done: bool = False) -> int:
    costs = {k: self.cost(k) for k in self.ks}
    costs = {k: v for k, v in costs.items() if v is not None}
    if len(costs) < 2 or (self._probing and not batch_done):
      return self._k  # no cost known yet, or a probe waiting for its batch
    k = choose_k_measured(self.a, costs, self.margin)
    positive = [x for x in self.ks if x > 0]
    self._probing = bool(batch_done and k == 0 and self.probe_every and positive
                         and self._batches_off >= self.probe_every)
    if self._probing:
      # Measure the draft again now and then; one batch at the smallest K is the cheapest probe.
      k, self._batches_off = positive[0], 0
    self._k = k
    return k
