"""K policy: the speedup formula, the choice of K, and the adaptive controller between batches."""

import math

import numpy as np
import pytest

from spec_tpu.decoding.k_policy import (AdaptiveK, choose_k_measured, choose_measured,
                                       expected_speedup)


def choose_k(a, c, k_max, margin=0.0):
  """The policy's choice when a round at K costs K c + 1 plain steps (the paper's model)."""
  return choose_k_measured(a, {k: k * c + 1.0 for k in range(k_max + 1)}, margin)


# ---------------------------------------------------------------------------------------------
# The formula.

@pytest.mark.parametrize("a,c,k,want", [
    (0.8, 0.05, 4, (1 - 0.8 ** 5) / (0.2 * 1.2)),  # = 0.67232 / 0.24 = 2.80133...
    (0.8, 0.05, 4, 2.8013333333),
    (0.5, 0.1, 1, 1.5 / 1.1),
    (0.0, 0.1, 3, 1 / 1.3),                          # nothing accepted: pure overhead
    (1.0, 0.1, 3, 4 / 1.3),                          # a = 1: the limit (k + 1) / (k c + 1)
    (1.0, 0.0, 7, 8.0),
    (0.3, 5.0, 0, 1.0),                              # k = 0 is plain decoding
])
def test_expected_speedup_matches_hand_computed_values(a, c, k, want):
  assert expected_speedup(a, c, k) == pytest.approx(want, rel=1e-9)


def test_expected_speedup_is_continuous_at_a_equals_one():
  assert expected_speedup(1 - 1e-9, 0.2, 5) == pytest.approx(expected_speedup(1.0, 0.2, 5))


def test_paper_operating_point_favours_speculation():
  # Chen et al.: draft 1.8 ms, target 14.1 ms per token; K=4 gave ~2x on XSum.
  c = 1.8 / 14.1
  assert 1.5 < expected_speedup(0.8, c, 4) < 2.5
  assert choose_k(0.8, c, 8) in (3, 4, 5)


@pytest.mark.parametrize("a,c,k", [(-0.1, 0.1, 1), (1.1, 0.1, 1), (0.5, -1.0, 1),
                                   (0.5, float("nan"), 1), (0.5, 0.1, -1), (0.5, 0.1, 1.5)])
def test_bad_arguments_are_refused(a, c, k):
  with pytest.raises(ValueError):
    expected_speedup(a, c, k)


# ---------------------------------------------------------------------------------------------
# Choosing K.

@pytest.mark.parametrize("a,c", [(0.99, 1.0), (0.5, 0.6), (0.03, 0.05), (0.0, 0.0)])
def test_choose_k_is_zero_when_drafting_cannot_pay(a, c):
  # Given a draft as slow as the target, or one that is almost never accepted; then K = 0.
  assert choose_k(a, c, 8) == 0
  assert all(expected_speedup(a, c, k) <= 1.0 for k in range(9))


def test_choose_k_grows_with_acceptance():
  ks = [choose_k(a, 0.05, 16) for a in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
  assert ks == sorted(ks) and ks[0] < ks[-1]
  assert ks[0] >= 1  # cheap draft, 30% acceptance: still worth one token


def test_choose_k_is_the_argmax_within_range():
  for a in np.linspace(0, 1, 11):
    for c in (0.0, 0.01, 0.1, 0.3):
      k = choose_k(a, c, 6)
      best = max(expected_speedup(a, c, j) for j in range(7))
      assert expected_speedup(a, c, k) == pytest.approx(best)
  assert choose_k(1.0, 0.0, 6) == 6  # free, always-right draft: as many as allowed


def test_choose_k_margin_keeps_marginal_gains_off():
  # Given a best speedup of ~1.03; then a 5% margin turns speculation off.
  a, c = 0.3, 0.25
  assert 1.0 < expected_speedup(a, c, 1) < 1.05
  assert choose_k(a, c, 8) == 1
  assert choose_k(a, c, 8, margin=0.05) == 0


# ---------------------------------------------------------------------------------------------
# AdaptiveK on synthetic streams of batches.

def _batch(rng, a, k, rounds=400):
  """(accepted, judged) draft tokens of rounds whose draft tokens are each accepted with
  probability a (independently), stopping at the first rejection (later ones are not judged)."""
  n = np.sum(np.cumprod(rng.random((rounds, k)) < a, axis=1), axis=1)
  return float(n.sum()), float(np.minimum(n + 1, k).sum())


def _run(policy, rng, a, batches, c):
  history = []
  for _ in range(batches):
    k = policy.k
    if k:
      policy.observe_acceptance(*_batch(rng, a, k))
    else:
      policy.observe_off()
    # Rounds timed as the engine times them: plain decoding, and the K that ran.
    policy.observe_round_time(0, 10.0)
    policy.observe_round_time(max(k, 1), 10.0 * (1 + max(k, 1) * c))
    history.append(policy.k)
    # Never speculate on a speedup estimate below 1 (except an opted-in probe).
    assert policy.k == 0 or policy.speedup() > 1.0 or policy.probing
  return history


def test_adaptive_k_keeps_k0_until_it_knows_the_cost():
  policy = AdaptiveK(k0=3, k_max=8)
  policy.observe_acceptance(*_batch(np.random.default_rng(0), 0.05, 3))
  assert policy.k == 3 and math.isnan(policy.speedup())


def test_adaptive_k_converges_to_the_best_k():
  # Given a stream with a = 0.8 and c = 0.05; then the estimates converge and K is the optimum.
  rng = np.random.default_rng(1)
  policy = AdaptiveK(k0=1, k_max=10)
  history = _run(policy, rng, a=0.8, batches=15, c=0.05)
  assert policy.a == pytest.approx(0.8, abs=0.03)
  assert policy.c == pytest.approx(0.05)
  # Near the optimum the curve is flat (k = 7, 8, 9 within 0.5%): demand the optimum's speed.
  best = max(expected_speedup(0.8, 0.05, k) for k in range(11))
  assert all(expected_speedup(0.8, 0.05, k) > 0.99 * best for k in history[-5:])


def test_adaptive_k_turns_speculation_off_and_probes_back():
  # Given a good draft that turns bad then good again; then K drops to 0 while it is bad (no
  # batch runs slower than plain decoding on the estimate), probes with K = 1 now and then,
  # and recovers once the probe sees good acceptance.
  rng = np.random.default_rng(2)
  policy = AdaptiveK(k0=4, k_max=8, probe_every=3)
  _run(policy, rng, a=0.85, batches=5, c=0.1)
  assert policy.k >= 3
  bad = _run(policy, rng, a=0.05, batches=12, c=0.1)
  assert bad[-1] == 0 or bad[-1] == 1
  assert 0 in bad[:5]  # dropped within a few batches
  assert bad.count(0) >= 6 and 1 in bad[5:]  # then mostly off, with probes
  good = _run(policy, rng, a=0.85, batches=8, c=0.1)
  assert good[-1] >= 3


def test_adaptive_k_turns_off_when_the_draft_is_too_slow():
  rng = np.random.default_rng(3)
  policy = AdaptiveK(k0=4, k_max=8)
  history = _run(policy, rng, a=0.7, batches=4, c=0.9)
  assert history == [0, 0, 0, 0]


def test_adaptive_k_refuses_bad_settings():
  with pytest.raises(ValueError):
    AdaptiveK(k0=5, k_max=4)
  with pytest.raises(ValueError):
    AdaptiveK(prior=(0.0, 1.0))
  with pytest.raises(ValueError):
    AdaptiveK().observe_acceptance(5, 3)


def test_measured_round_times_replace_the_linear_cost_model():
  # Given a ~ 0.7 and rounds timed at K = 0 and K = 4 only: the linear model (c from K = 4)
  # says one draft token pays,
  policy = AdaptiveK(k0=4, k_max=4, ks=(0, 1, 2, 4))
  policy.observe_acceptance(70, 100)
  policy.observe_round_time(0, 10.0)
  policy.observe_round_time(4, 29.0)
  assert policy.c == pytest.approx(1.9 / 4)
  assert policy.k == 1 and policy.speedup(1) > 1.1
  # when K = 1 and K = 2 are timed too, and cost more than the line through K = 0 and K = 4
  # (a fixed cost per speculative round, as verification has on CPU),
  policy.observe_round_time(1, 18.0)
  policy.observe_round_time(2, 22.0)
  # then the measured costs decide: no K pays, speculation is off.
  assert policy.cost(1) == pytest.approx(1.8) and policy.cost(2) == pytest.approx(2.2)
  assert all(policy.speedup(k) < 1.0 for k in (1, 2, 4))
  assert policy.k == 0


def test_choice_is_limited_to_the_allowed_ks():
  # A free, always-right draft would take k_max, but only the compiled K's are allowed.
  policy = AdaptiveK(k0=1, k_max=8, ks=(0, 1, 2, 4))
  for k in (0, 1, 2, 4):
    policy.observe_round_time(k, 1.0)
  policy.observe_acceptance(1000, 1000)
  assert policy.k == 4
  assert choose_k_measured(0.9, {0: 1.0, 1: 1.05, 3: 1.2}) == 3
  assert choose_k_measured(0.5, {0: 1.0, 1: 1.6}) == 0


def test_a_measured_cost_below_a_smaller_ks_is_timing_noise():
  # A round at K = 2 timed faster than one at K = 1 (a busy machine): K = 2 costs at least K = 1.
  policy = AdaptiveK(k0=1, k_max=2)
  for k, t in {0: 5.0, 1: 18.0, 2: 9.0}.items():
    policy.observe_round_time(k, t)
  assert policy.cost(2) == pytest.approx(18.0 / 5.0)
  assert policy.k == 0


# ---------------------------------------------------------------------------------------------
# Choosing the source as well as K.

# Round costs relative to plain decoding, shaped as on the embedded pair: an n-gram round pays
# only for verifying more tokens, a model or hybrid round for K draft steps too.
COSTS = {**{("ngram", k): 1.0 + 0.03 * k for k in (1, 2, 4, 8)},
         **{("model", k): 1.0 + 0.25 * k for k in (1, 2, 4, 8)},
         **{("hybrid", k): 1.05 + 0.25 * k for k in (1, 2, 4, 8)}}


def _brute_force(a, costs, margin=0.0):
  rates = {key: sum(a[key[0]] ** i for i in range(key[1] + 1)) / c for key, c in costs.items()}
  best = max(rates, key=rates.get)
  return best if rates[best] > 1.0 + margin else (None, 0)


@pytest.mark.parametrize("a,want_source", [
    ({"model": 0.6, "ngram": 0.9, "hybrid": 0.7}, "ngram"),    # a prompt being repeated
    ({"model": 0.6, "ngram": 0.05, "hybrid": 0.6}, "model"),   # open-ended text
    ({"model": 0.7, "ngram": 0.4, "hybrid": 0.85}, "hybrid"),  # partly repeated
    ({"model": 0.1, "ngram": 0.01, "hybrid": 0.1}, None),      # nothing pays: off
])
def test_choose_measured_picks_the_source_and_k_with_most_tokens_per_time(a, want_source):
  # Given each source's acceptance and the cost of a round of each (source, K); then the choice
  # is the pair with the most expected tokens per unit time (the brute-force argmax), K = 0
  # when none beats plain decoding.
  source, k = choose_measured(a, COSTS)
  assert source == want_source and (source, k) == _brute_force(a, COSTS)
  assert (k == 0) == (source is None)


def test_choose_measured_is_the_argmax_over_random_acceptances_and_costs():
  rng = np.random.default_rng(5)
  for _ in range(200):
    a = dict(zip(("model", "ngram", "hybrid"), rng.random(3)))
    costs = {key: 1.0 + rng.random() * key[1] for key in COSTS}
    margin = rng.choice([0.0, 0.1])
    assert choose_measured(a, costs, margin) == _brute_force(a, costs, margin)


def _run_sources(policy, rng, a_by_source, batches):
  """Batches run at the policy's (source, K) with that source's acceptance; round costs as
  COSTS (times in units of a plain round), observed once as calibration would."""
  history = []
  for _ in range(batches):
    k, source = policy.k, policy.source
    if k:
      policy.observe_acceptance(*_batch(rng, a_by_source[source], k), source=source)
    else:
      policy.observe_off()
    history.append((source, k) if k else (None, 0))
  return history


def test_adaptive_choice_follows_the_workload_between_sources():
  rng = np.random.default_rng(6)
  policy = AdaptiveK(k0=2, k_max=8, ks=(1, 2, 4, 8), probe_every=8,
                     sources=("model", "ngram", "hybrid"), margin=0.1)
  policy.observe_round_time(0, 10.0)
  for (source, k), cost in COSTS.items():
    policy.observe_round_time(k, 10.0 * cost, source=source)
  # Given a workload that repeats its prompt (lookups match: n-gram drafts accepted 90%),
  repeating = {"model": 0.6, "ngram": 0.9, "hybrid": 0.65}
  history = _run_sources(policy, rng, repeating, 12)
  # then the policy settles on n-gram drafts at a large K (they cost no draft steps),
  assert history[-1] == ("ngram", 8) and history[-8:].count(("ngram", 8)) >= 5
  # when the text turns open-ended (no lookup matches), it moves to drafting with the model
  # within a few batches, settles on the model alone (hybrid costs a lookup more for nothing),
  # and probes n-gram again now and then at the smallest K,
  open_ended = {"model": 0.6, "ngram": 0.02, "hybrid": 0.6}
  history = _run_sources(policy, rng, open_ended, 16)
  assert all(s in ("model", "hybrid") for s, _ in history[2:4])
  assert all(s != "ngram" or k == 1 for s, k in history[2:]) and ("ngram", 1) in history[4:]
  assert history[-4:] == [("model", 2)] * 4
  # and when nothing pays (a poor draft, no matches), speculation is off but for probes.
  poor = {"model": 0.05, "ngram": 0.02, "hybrid": 0.05}
  history = _run_sources(policy, rng, poor, 16)
  assert history[-8:].count((None, 0)) >= 5
  assert all(k in (0, 1) for _, k in history[4:])


def test_sources_are_checked():
  with pytest.raises(ValueError, match="sources"):
    AdaptiveK(sources=())
  with pytest.raises(ValueError, match="not one of"):
    AdaptiveK(sources=("model",)).observe_round_time(2, 1.0, source="ngram")
