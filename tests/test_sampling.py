"""Temperature / top-k / top-p filters match an independent numpy reference exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.decoding import sampling
from spec_tpu.decoding.sampling import SamplingParams


def reference(logits, temperature, top_k, top_p, min_p=0.0):
  """Straight from the definitions in spec_tpu/sampling.py, one token at a time."""
  logits = np.asarray(logits, np.float64)
  v = len(logits)
  if temperature == 0:
    out = np.zeros(v)
    out[int(np.argmax(logits))] = 1.0
    return out
  z = logits / temperature
  if 0 < top_k < v:
    kth = np.sort(z)[::-1][top_k - 1]
    z = np.where(z >= kth, z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  if min_p > 0:
    p = np.where(p >= min_p * p.max(), p, 0.0)
    p /= p.sum()
  if top_p < 1:
    keep = np.array([p[p > p[i]].sum() < top_p for i in range(v)])
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


LOG = np.log
CASES = {
    # name: logits
    "distinct": np.array([2.0, 1.0, 0.5, -1.0, 0.0, 3.0]),
    "ties": LOG(np.array([0.25, 0.25, 0.25, 0.125, 0.0625, 0.0625])),
    "one_hot_ish": np.array([10.0, -10.0, -10.0, -10.0]),
    "all_equal": np.zeros(8),
}
FILTERS = [  # temperature, top_k, top_p
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (0.0, 0, 1.0),
    (1.0, 1, 1.0), (1.0, 2, 1.0), (1.0, 3, 1.0), (1.0, 100, 1.0),
    (1.0, 0, 0.5), (1.0, 0, 0.6), (1.0, 0, 0.75), (1.0, 0, 0.9), (1.0, 0, 1e-6),
    (0.7, 3, 0.8), (1.0, 4, 0.5), (1.0, 1, 0.3),
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_filters_match_reference(case):
  logits = CASES[case]
  v = len(logits)
  for temperature, top_k, top_p in FILTERS:
    params = SamplingParams(temperature, top_k, top_p).validate()
    got = np.asarray(sampling.probabilities(jnp.asarray(logits[None], jnp.float32), temperature,
                                            params.effective_top_k(v), top_p))[0]
    want = reference(logits, temperature, top_k, top_p)
    # The kept set must match exactly; the kept probabilities to float32 rounding.
    assert (got > 0).tolist() == (want > 0).tolist(), (case, temperature, top_k, top_p, got, want)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str((case, temperature, top_k, top_p)))


def reference_penalize(logits, generated, prompt, presence, frequency, repetition, bias):
  """OpenAI's presence/frequency penalties, the repetition penalty of HF and vLLM, logit_bias,
  token by token."""
  out = np.array(logits, np.float64)
  for token, b in bias.items():
    out[token] += b
  for t in range(len(out)):
    count = generated.count(t)
    if count or t in prompt:
      out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    out[t] -= frequency * count + presence * (count > 0)
  return out


def test_penalties_bias_and_min_p_match_reference():
  rng = np.random.default_rng(0)
  v = 12
  cases = [((), (), 0.0, 0.0, 1.0, {}, 0.0),                       # all neutral: unchanged
           ((3, 3, 5), (1, 3), 0.5, 0.25, 1.3, {0: 2.0, 7: -1.5}, 0.0),
           ((2, 2, 2, 9), (), -0.5, 1.0, 0.8, {}, 0.2),
           ((), (4, 4, 11), 0.0, 0.0, 2.0, {11: 5.0}, 0.5)]
  logits = rng.normal(size=(len(cases), v)).astype(np.float32)
  counts = np.array([np.bincount(np.array(g, int), minlength=v) for g, *_ in cases], np.int32)
  in_prompt = np.array([np.isin(np.arange(v), p) for _, p, *_ in cases])
  col = lambda i: jnp.asarray([c[i] for c in cases], jnp.float32)
  ids = np.full((len(cases), 2), -1, np.int32)
  values = np.zeros((len(cases), 2), np.float32)
  for i, c in enumerate(cases):
    for j, (t, b) in enumerate(c[5].items()):
      ids[i, j], values[i, j] = t, b
  shifted = sampling.penalize(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(in_prompt),
                              col(2), col(3), col(4), jnp.asarray(ids), jnp.asarray(values))
  probs = np.asarray(sampling.probabilities(shifted, 1.0, 0, 1.0, min_p=col(6)))
  assert np.array_equal(np.asarray(shifted)[0], logits[0])  # neutral rows exactly as they were
  for i, (generated, prompt, a, f, r, bias, min_p) in enumerate(cases):
    want_logits = reference_penalize(logits[i], list(generated), prompt, a, f, r, bias)
    np.testing.assert_allclose(np.asarray(shifted)[i], want_logits, atol=1e-5)
    want = reference(want_logits, 1.0, 0, 1.0, min_p)
    assert (probs[i] > 0).tolist() == (want > 0).tolist()
    np.testing.assert_allclose(probs[i], want, atol=1e-6)


def test_tie_semantics_are_symmetric():
  # Given four tokens tied at the top-p edge, all of them are kept or none.
  logits = LOG(np.array([0.25, 0.25, 0.25, 0.125, 0.0625, 0.0625]))
  p = np.asarray(sampling.probabilities(jnp.asarray(logits[None], jnp.float32), 1.0, 0, 0.5))[0]
  assert (p > 0).tolist() == [True, True, True, False, False, False]
  p = np.asarray(sampling.probabilities(jnp.asarray(logits[None], jnp.float32), 1.0, 2, 1.0))[0]
  assert (p > 0).sum() == 3  # k = 2 keeps the whole tie at the edge


def test_sampling_never_draws_filtered_tokens():
  import jax
  logits = jnp.asarray(np.array([[3.0, 2.0, 1.0, 0.0, -1.0]] * 4000), jnp.float32)
  probs = sampling.probabilities(logits, 1.0, 2, 1.0)
  draws = np.asarray(sampling.sample(jax.random.key(0), probs))
  assert set(draws.tolist()) == {0, 1}
  assert abs((draws == 0).mean() - float(probs[0, 0])) < 0.03


def test_top_p_bisection_matches_reference_on_random_rows_with_ties():
  # Given many rows with heavy ties (logits from a few levels) and top_p traced inside a jitted
  # program (the runtime branch and the bit-pattern bisection, not a constant-folded path),
  rng = np.random.default_rng(0)
  logits = rng.choice(np.array([-3.0, -1.0, 0.0, 0.5, 2.0]), size=(300, 40))
  top_ps = rng.uniform(0.02, 0.999, size=300)
  fn = jax.jit(lambda l, tp: sampling.probabilities(l, 1.0, 0, tp))
  # then every row keeps exactly the reference's tokens, with its probabilities.
  for row, top_p in zip(logits, top_ps):
    g = np.asarray(fn(jnp.asarray(row[None], jnp.float32), jnp.float32(top_p)))[0]
    want = reference(row, 1.0, 0, top_p)
    assert (g > 0).tolist() == (want > 0).tolist(), (row, top_p)
    np.testing.assert_allclose(g, want, atol=1e-6)


@pytest.mark.parametrize("block", [None, 2, 3])
def test_inverse_cdf_sampling_skips_zero_mass_tokens_and_follows_the_law(block):
  # Zero-mass tokens at the start, in between and at the end; by default (one block of all 7
  # here) and with blocks of 2 or 3 tokens, where the two-level running sum has several blocks,
  # one of zero mass (2) and a padded last (2, 3).
  # As a distribution, and as weights that do not sum to 1 (the rejection step's residual).
  probs = np.array([0.0, 0.5, 0.0, 0.0, 0.125, 0.375, 0.0], np.float32)
  for scale in (1.0, 3e-5):
    weights = jnp.asarray(np.tile(probs * np.float32(scale), (20000, 1)))
    counts = np.bincount(np.asarray(sampling.sample(jax.random.key(3), weights, block)),
                         minlength=len(probs))
    assert set(np.flatnonzero(counts)) == {1, 4, 5}
    # Within 4.5 standard deviations of the expected counts.
    expected = 20000 * probs
    assert np.all(np.abs(counts - expected) <= 4.5 * np.sqrt(expected * (1 - probs)) + 1e-9)
  # All mass on the last token, or on the first.
  one_hot = jnp.asarray(np.eye(7, dtype=np.float32)[[6, 0]])
  assert np.asarray(sampling.sample(jax.random.key(4), one_hot, block)).tolist() == [6, 0]


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k")])
def test_bad_sampling_parameters_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**bad).validate()


@pytest.mark.parametrize("vocab", [63, 2048])
@pytest.mark.parametrize("temperature", [1e-30, 1e-12])
def test_a_tiny_temperature_is_greedy_not_nan(vocab, temperature):
  # A positive temperature far below the logits' spread: all mass on the top token. Under jit,
  # logits / t then the softmax's max-shift became inf - inf = NaN, and sampling drew the last
  # token of the vocabulary every time.
  logits = 3 * jax.random.normal(jax.random.key(0), (1, vocab))
  p = jax.jit(lambda x: sampling.probabilities(x, temperature, 0, 1.0))(logits)
  np.testing.assert_array_equal(np.asarray(p), np.asarray(jax.nn.one_hot(jnp.argmax(logits, -1),
                                                                         vocab)))
