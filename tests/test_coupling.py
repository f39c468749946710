"""The gumbel coupling: with a seed, the tokens depend on the seed, the prompt and the target
only: not on K (0 included), the draft (or none), the engine's K policy, slot or batch.

Every case is checked against one independent reference: each row's tokens recomputed without
the decode loop (`model.forward_full` over the whole row, the filtered law, and the Gumbel noise
of each absolute position), argmax of log q + G. Rows where the two best scores on the path are
within MARGIN are excluded (float32 evaluation order, one token vs K+1 per call, may decide such
a near-tie either way; as for greedy in test_exactness.py) and must be under 1% of the batch.
The same comparison run with the rejection coupling finds most rows different for another K:
the check can fail. The law of the gumbel coupling is tested in test_exactness.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_exactness as ex
from test_exactness import single  # noqa: F401 (a fixture: its programs are shared)
from spec_tpu.decoding import coupling_bench, gumbel, sampling
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import model
from spec_tpu.serving import Engine, GenerationParams

PROMPTS = ex.GREEDY_PROMPTS  # ragged (1-12 tokens): positions differ per row
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9)
SEED = 5
MARGIN = 1e-4


@functools.partial(jax.jit, static_argnames=("cfg",))
def _scores(params, cfg, seqs_bt, at_bm, seeds_b2, temperature, top_p):
  """log q + G for the token at each position at_bm + 1 (b m v) along the given rows (G = -log E,
  E the exponential noise the rule races with)."""
  logits = jnp.take_along_axis(model.forward_full(params, cfg, seqs_bt), at_bm[..., None], axis=1)
  q = sampling.probabilities(logits[..., :cfg.num_tokens], temperature, 0, top_p)
  g = -jnp.log(gumbel.noise(seeds_b2, at_bm + 1, cfg.num_tokens))
  return jnp.where(q > 0, jnp.log(q) + g, -jnp.inf)


def reference(prompts, tokens, seed, sampling_params=SAMPLING):
  """The gumbel rule's tokens along each row (row i on stream (seed, i)) and which rows have no
  near-tie on their path."""
  n = tokens.shape[1]
  seqs = np.zeros((len(prompts), max(map(len, prompts)) + n), np.int32)
  for i, prompt in enumerate(prompts):
    seqs[i, :len(prompt) + n] = prompt + tokens[i].tolist()
  at = np.array([len(p) - 1 for p in prompts])[:, None] + np.arange(n)[None, :]
  seeds = np.stack([np.full(len(prompts), seed), np.arange(len(prompts))], 1).astype(np.uint32)
  scores = np.asarray(_scores(ex.target_params(), ex.TARGET, seqs, at, seeds,
                              np.float32(sampling_params.temperature),
                              np.float32(sampling_params.top_p)))
  top2 = -np.sort(-scores, axis=-1)[..., :2]
  clear = np.all(top2[..., 0] - top2[..., 1] > MARGIN, axis=1)
  return np.argmax(scores, axis=-1), clear


def assert_same_rows(got, want, clear, what):
  bad = np.flatnonzero(clear & np.any(got != want, axis=1))
  assert bad.size == 0, (f"{what}: {bad.size} rows differ, e.g. row {bad[0]}: {got[bad[0]]} vs "
                         f"{want[bad[0]]}")


@functools.lru_cache(maxsize=None)
def _no_draft_tokens():
  """Plain decoding by a Sampler that has no draft at all, and the reference's verdict."""
  sampler = Sampler.from_params(ex.target_params(), ex.TARGET, coupling="gumbel")
  tokens = np.array(sampler.generate(PROMPTS, max_new_tokens=ex.MAX_NEW, sampling=SAMPLING,
                                     seed=SEED).tokens)
  want, clear = reference(PROMPTS, tokens, SEED)
  assert clear.mean() > 0.99
  assert_same_rows(tokens, want, clear, "plain decoding vs the forward_full reference")
  return tokens, clear


@pytest.fixture(scope="module")
def paired(single):  # noqa: F811
  """test_exactness's pair (its draft agrees with the target about half the time); its
  compiled programs serve the exactness and greedy cases too (same batch and prompt bucket)."""
  return single


@functools.lru_cache(maxsize=None)
def _generate(sampler, k, coupling="gumbel"):
  # Cached: tests asking different questions of one run do not pay for it twice.
  return sampler.generate(PROMPTS, max_new_tokens=ex.MAX_NEW, k=k, sampling=SAMPLING, seed=SEED,
                          coupling=coupling)


def test_plain_decoding_is_the_gumbel_rule():
  # Given no draft; when sampling with a seed; then every row is argmax(log q + G) along its
  # own path, G from (seed, row, absolute position) (checked inside _no_draft_tokens).
  _no_draft_tokens()


def test_tokens_do_not_depend_on_k(paired):
  # Given a draft that agrees with the target about half the time; when decoding with 3 drafts
  # per round; then the tokens are those of a Sampler without a draft.
  want, clear = _no_draft_tokens()
  result = _generate(paired, 3)
  assert_same_rows(np.array(result.tokens), want, clear, "k=3")
  assert 0.2 < result.acceptance_rate() < 0.9  # both paths ran: agreements and disagreements


@pytest.mark.slow
def test_tokens_do_not_depend_on_k_or_the_draft(paired):
  # More K's (the engine test runs 0, 1 and 4), and another draft (an independent random
  # model: it agrees less often).
  want, clear = _no_draft_tokens()
  for k in (2, 8):
    assert_same_rows(np.array(_generate(paired, k).tokens), want, clear, f"k={k}")
  other = ex._scaled(jax.jit(model.init_params, static_argnums=0)(ex.DRAFT, jax.random.key(9)))
  sampler = Sampler.from_params(ex.target_params(), ex.TARGET, draft_params=other,
                                draft_cfg=ex.DRAFT, coupling="gumbel")
  result = _generate(sampler, 2)
  assert_same_rows(np.array(result.tokens), want, clear, "another draft")
  assert result.acceptance_rate() < _generate(paired, 2).acceptance_rate()


def test_rejection_coupling_tokens_depend_on_k(paired):
  # The control: the rejection coupling draws its randomness per round, so another K gives
  # other tokens for most rows (the comparison above would fail for it).
  one, three = (np.array(_generate(paired, k, "rejection").tokens) for k in (1, 3))
  assert np.mean(np.any(one != three, axis=1)) > 0.5


def test_engine_with_changing_k_gives_the_samplers_tokens(paired):
  # Given an engine (adaptive K's programs, k_max 4) with fewer slots than requests, so requests
  # enter different slots at different times beside different neighbours, and Sampler row i
  # with seed s being the request with seed s + i * 2**32,
  n = 96
  engine = Engine(paired.pair, num_slots=16, max_len=32, k=1, k_max=4, ks=(0, 1, 4), adaptive_k=True,
                  prefill_rows=4, max_top_k=0, coupling="gumbel")
  assert engine.coupling == "gumbel"
  requests = [engine.submit(PROMPTS[i], GenerationParams(
      max_new_tokens=ex.MAX_NEW, temperature=SAMPLING.temperature, top_p=SAMPLING.top_p,
      seed=SEED + i * 2**32)) for i in range(n)]
  # when every step runs another K (0: the draft falls behind and catches up later),
  ks = iter([0, 4, 1] * 1000)
  while engine.step(k=next(ks)):
    pass
  # then each request's tokens are the Sampler's (and the no-draft reference's).
  got = np.array([r.result().tokens for r in requests])
  want, clear = _no_draft_tokens()
  assert_same_rows(got, want[:n], clear[:n], "engine")
  assert {0, 1, 4} <= set().union(*(r.result().stats.ks for r in requests))


def test_expected_gumbel_agreement_is_the_frequency_of_agreement():
  # Given draft and target laws with tokens only one of them allows; when both race the same
  # exponential noise (Gumbel-max); then they agree as often as coupling_bench's
  # closed form says, which is at least (1 - TV) / (1 + TV) and at most 1 - TV.
  rng = np.random.default_rng(3)
  p, q = rng.dirichlet(np.full(6, 0.8), 2).astype(np.float32)
  p[0], q[5] = 0.0, 0.0
  p, q = p / p.sum(), q / q.sum()
  tv, agree = (float(x[0]) for x in coupling_bench._agreement(p[None], q[None]))
  g = jax.random.exponential(jax.random.key(0), (200_000, 6))
  freq = float(jnp.mean(gumbel.choose(jnp.asarray(p), g) == gumbel.choose(jnp.asarray(q), g)))
  assert abs(freq - agree) < 4 * np.sqrt(agree * (1 - agree) / 200_000), (freq, agree)
  assert (1 - tv) / (1 + tv) <= agree <= 1 - tv


def test_coupling_bench_measures_what_the_laws_predict(single):  # noqa: F811
  # Given the pair whose programs the tests above compiled; when the couplings are compared;
  # then each coupling's measured acceptance is near the one its law predicts on the same
  # text (1 - TV for rejection, the exact agreement for gumbel), rejection's is the higher,
  # and gumbel's prediction is above its (1 - TV)/(1 + TV) bound.
  rows = coupling_bench.compare(single, PROMPTS, k=3, couplings=("rejection", "gumbel"),
                                samplings=[SAMPLING], max_new_tokens=ex.MAX_NEW, repeats=1)
  by = {r["coupling"]: r for r in rows}
  assert abs(by["rejection"]["acceptance"] - by["rejection"]["expected_rejection"]) < 0.03
  assert abs(by["gumbel"]["acceptance"] - by["gumbel"]["expected_gumbel"]) < 0.03
  assert by["rejection"]["acceptance"] > by["gumbel"]["acceptance"]
  assert by["gumbel"]["expected_gumbel"] > by["gumbel"]["gumbel_bound"]
  assert all(r["tokens_per_s"] > 0 for r in rows)
  assert "gumbel exact" in coupling_bench.format_table(rows)
