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

Sources. Where an engine may draft in more than one way (`sources`: the draft model, n-gram
lookup, hybrid; draft_source.py), the choice is a (source, K) pair: each source has its own
acceptance estimate (from the windows it ran) and its own round costs (an n-gram round pays one
verification and no draft steps, a model or hybrid round the draft's K steps too), and the pair
with the most expected tokens per unit time wins, K = 0 (no source) unless one beats plain
decoding by the margin. A source not run for `probe_every` windows is probed for one window at
the smallest K, so a workload that starts (or stops) repeating its context moves the choice.
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


def choose_measured(a: dict[str, float], costs: dict[tuple[str, int], float],
                    margin: float = 0.0) -> tuple[str | None, int]:
  """The (source, k) with the most expected tokens per unit time, (1 + a_s + ... + a_s^k) /
  costs[s, k], given each source's acceptance a[s] and the measured relative cost of a round
  (a round at K = 0 costs 1); (None, 0) unless the best beats 1 + margin. Ties go to the
  smaller k, then to the source listed first in `a`."""
  best, best_s = (None, 0), 1.0 + margin
  order = {src: i for i, src in enumerate(a)}
  for src, k in sorted(costs, key=lambda sk: (sk[1], order.get(sk[0], len(order)))):
    if k == 0 or src not in a:
      continue
    if not costs[src, k] > 0:
      raise ValueError(f"relative round cost must be positive, got costs[{src!r}, {k}] = "
                       f"{costs[src, k]}")
    s = sum(a[src] ** i for i in range(k + 1)) / costs[src, k]
    if s > best_s * (1 + 1e-12):
      best, best_s = (src, k), s
  return best


def choose_k_measured(a: float, costs: dict[int, float], margin: float = 0.0) -> int:
  """choose_measured for one source: the k with the largest expected speedup given measured
  relative round costs (costs[k] = a round at k / a round at K = 0; costs[0] = 1)."""
  return choose_measured({"": a}, {("", k): c for k, c in costs.items()}, margin)[1]


class AdaptiveK:
  """Running estimates of a and the cost of a round, per source; `.k` and `.source` are what
  the next batch runs.

  a: exponential moving average over batches (weight `weight` on the newest) of each batch's
    acceptance, accepted / judged draft tokens (drafts after a rejection are never judged, so
    they are not counted as failures), smoothed by a Beta(prior) so a tiny batch cannot swing it
    to 0 or 1. Averaging batches rather than pooling their counts makes a batch at large K count
    no more than one at small K, so a draft that turns bad is dropped within a few batches.
  cost: a round at K relative to a round at K = 0. Where round times at K and at 0 were both
    observed (`observe_round_time`) that ratio, as measured: no model of how verification grows
    with K. For a K not timed, the formula's K c + 1, with c the per-draft-token cost the timed
    K's imply (cost assumed linear in K).
  Until a cost is known the policy keeps k0 (with the first source): without a cost it cannot
  tell whether speculation pays. `ks` limits the choice (e.g. to the K whose programs are
  compiled); a probe runs the smallest positive one. `sources` names the ways to draft the
  policy may choose among (module docstring); methods that take `source` default to the first.
  """

  def __init__(self, k0: int = 4, k_max: int = 8, *, prior: tuple[float, float] = (1.0, 1.0), weight: float = 0.5,
               margin: float = 0.02, probe_every: int | None = None,
               ks: tuple[int, ...] | None = None, sources: tuple[str, ...] = ("model",)):
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
    sources = tuple(sources)
    if not sources or len(set(sources)) != len(sources):
      raise ValueError(f"sources must name at least one source, each once, got {sources}")
    self.k_max, self.margin, self.weight, self.ks = int(k_max), margin, weight, ks
    self.sources = sources
    self.probe_every = probe_every
    self._prior = (float(prior[0]), float(prior[1]))
    self._a: dict[str, float] = {}  # a source not seen yet: the prior's mean
    self._c: dict[str, float] = {}
    self._round_s: dict[tuple[str | None, int], float] = {}  # (None, 0): plain decoding
    self._k = int(k0)
    self._source = sources[0]
    # Batches since each source's acceptance was last observed (a probe is due at probe_every).
    self._unseen = {src: 0 for src in sources}
    self._probing = False

  @property
  def k(self) -> int:
    """K for the next batch."""
    return self._k

  @property
  def source(self) -> str:
    """The source the next batch drafts with (meaningless while k is 0)."""
    return self._source

  def a_of(self, source: str | None = None) -> float:
    source = self.sources[0] if source is None else source
    return self._a.get(source, self._prior[0] / sum(self._prior))

  @property
  def a(self) -> float:
    """The acceptance estimate of the current source."""
    return self.a_of(self._source)

  @property
  def c(self) -> float | None:
    """The per-draft-token cost of the current source (None until timed)."""
    return self._c.get(self._source)

  @property
  def probing(self) -> bool:
    """Whether this batch is a probe (the smallest K, against the estimate) rather than the
    best choice."""
    return self._probing

  def _key(self, k: int, source: str | None) -> tuple[str | None, int]:
    if k == 0:
      return (None, 0)
    source = self.sources[0] if source is None else source
    if source not in self.sources:
      raise ValueError(f"source {source!r} is not one of {self.sources}")
    return (source, int(k))

  def cost(self, k: int, source: str | None = None) -> float | None:
    """A round at k relative to a round at K = 0: measured where both were timed, else
    k c + 1; None while neither is known. A round at a larger K does strictly more work, so a
    measured cost below that of a smaller measured K (timing noise on a busy machine) is
    raised to it."""
    if k == 0:
      return 1.0
    src, _ = self._key(k, source)
    base = self._round_s.get((None, 0))
    timed = [t for (s, j), t in self._round_s.items() if s == src and j <= k]
    if (src, k) in self._round_s and base is not None:
      return max(timed + [base]) / base  # never below K = 0's own round
    c = self._c.get(src)
    return None if c is None else k * c + 1.0

  def speedup(self, k: int | None = None, source: str | None = None) -> float:
    """Estimated speedup at k with source (default: the current choice); nan while its cost
    is unknown."""
    if k is None:
      k, source = self._k, self._source if source is None else source
    cost = self.cost(k, source)
    return math.nan if cost is None else sum(self.a_of(source) ** i
                                             for i in range(k + 1)) / cost

  def observe_off(self) -> int:
    """A finished batch run at K = 0: nothing to learn about a, one batch closer to a probe."""
    for src in self._unseen:
      self._unseen[src] += 1
    return self._update(batch_done=True)

  def observe_acceptance(self, accepted: float, judged: float, source: str | None = None) -> int:
    """A finished batch with K > 0 as raw counts: `judged` draft tokens tested, `accepted` kept."""
    if not 0 <= accepted <= judged:
      raise ValueError(f"need 0 <= accepted <= judged, got {accepted}, {judged}")
    src, _ = self._key(1, source)
    if judged == 0:  # e.g. every row finished at prefill: no evidence either way
      return self._k
    batch_a = (self._prior[0] + accepted) / (sum(self._prior) + judged)
    old = self._a.get(src)
    self._a[src] = batch_a if old is None else self._ema(old, batch_a)
    for other in self._unseen:
      self._unseen[other] = 0 if other == src else self._unseen[other] + 1
    return self._update(batch_done=True)

  def observe_round_time(self, k: int, seconds: float, source: str | None = None) -> int:
    """The measured time of one round at k (k = 0: plain decoding) drafting with source, as
    the loop pays it."""
    if not seconds > 0:
      raise ValueError(f"round time must be positive, got {seconds}")
    key = self._key(k, source)
    old = self._round_s.get(key)
    self._round_s[key] = seconds if old is None else self._ema(old, seconds)
    src, base = key[0], self._round_s.get((None, 0))
    if k > 0 and base is not None:  # keep the source's c (reported, and the fallback) in step
      c = max(0.0, (self._round_s[key] / base - 1.0) / k)
      self._c[src] = c if src not in self._c else self._ema(self._c[src], c)
    return self._update()

  def _ema(self, old, new):
    return self.weight * new + (1 - self.weight) * old

  def _update(self, batch_done: bool = False) -> int:
    costs = {(src, k): self.cost(k, src) for src in self.sources for k in self.ks if k > 0}
    costs = {key: v for key, v in costs.items() if v is not None}
    if not costs or (self._probing and not batch_done):
      return self._k  # no cost known yet, or a probe waiting for its batch
    source, k = choose_measured({src: self.a_of(src) for src in self.sources}, costs,
                                self.margin)
    positive = [x for x in self.ks if x > 0]
    # A probe: the source unseen longest, once it has waited probe_every batches, while the
    # choice is another source or none (a source that is running is observed anyway).
    due = [src for src in self.sources if src != (source if k else None)
           and self.probe_every and self._unseen[src] >= self.probe_every]
    self._probing = bool(batch_done and due and positive)
    if self._probing:
      # One batch at the smallest K: the cheapest way to measure a source again.
      source = max(due, key=lambda src: self._unseen[src])
      k, self._unseen[source] = positive[0], 0
    self._k, self._source = k, source if k else self._source
    return k
