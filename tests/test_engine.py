"""The serving engine: exact through slots, per-request settings and streams, seeded output that
ignores the batch, and the K and N policies.

Exactness uses the toy models and the chi-square machinery of test_exactness.py (the target's
law is enumerated there): requests enter a busy engine at their own times, next to rows at other
positions with other settings, and must still follow the target's law.
"""

import asyncio
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_exactness as ex
import test_sampling as ts
from spec_tpu.decoding import decode, k_policy, sampling
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.models import model
from spec_tpu.models.config import get_preset
from spec_tpu.serving import Engine, GenerationParams
from spec_tpu.serving import multihost
from spec_tpu.serving.engine import ContextLengthError, QueueFullError
from spec_tpu.serving.pacing import Pacing
from spec_tpu.tokenizer import ByteTokenizer


def _toy_sampler(eos_ids=None):
  return Sampler.from_params(ex.target_params(), ex.TARGET, draft_params=ex.draft_params(),
                 draft_cfg=ex.DRAFT, eos_ids=eos_ids)


def _drain(engine):
  while engine.step():
    pass


@jax.jit
def _forward_device(params, tokens_bt):
  return model.forward_full(params, ex.TARGET, tokens_bt)


def _target_logits(seq):
  """The target's logits (float64) at every position of one token sequence, from one forward
  without cache or loop; right-padded to one width so every call shares one program (padding
  is invisible to the causal positions before it)."""
  row = np.zeros((1, 32), np.int32)
  row[0, :len(seq)] = seq
  return np.asarray(_forward_device(ex.target_params(), row)[0, :len(seq)], np.float64)


@pytest.fixture(scope="module")
def toy_engine():
  """The toy pair, K = 3 fixed, 128 slots filled up to 4 prompts per insert call, with the
  sampling controls and top-3 logprobs compiled in (as launch.serve builds it): the toy-pair
  tests share this one, requests with and without controls or logprobs alike. An engine built
  without the controls (as the offline runner builds it) is checked by test_coupling.py (its
  tokens at every K are the Sampler's, whose law test_exactness.py checks) and
  test_ngram.py."""
  return Engine(_toy_sampler().pair, num_slots=128, max_len=32, k=3, adaptive_k=False,
                max_top_k=4, prefill_rows=4, controls=True, max_logit_bias=4, logprobs_k=3)


# ---------------------------------------------------------------------------------------------
# Exactness through the engine.

def _fillers(rng, n):
  """Requests of other lengths and settings that keep the slots busy and ragged."""
  out = []
  for _ in range(n):
    prompt = rng.integers(0, ex.V, rng.integers(1, 13)).tolist()
    params = GenerationParams(max_new_tokens=int(rng.integers(1, 13)),
                              temperature=float(rng.choice([0.0, 0.5, 1.3])),
                              top_p=float(rng.choice([1.0, 0.8])), top_k=int(rng.choice([0, 2, 4])))
    out.append((prompt, params))
  return out


LAW_ROWS = ex.BATCH  # per temperature: the Sampler suite's rows (its docstring says why
                    # that many: its negative controls' power, the pooled chi-square's calibration)


def test_requests_inserted_into_a_busy_batch_follow_the_target_law(toy_engine, monkeypatch):
  # Given an engine whose slots are kept busy by filler requests (other prompts and lengths,
  # greedy and sampled, top-p and top-k), and requests for the enumerated prompt at two
  # temperatures queued between them, so each enters a slot at its own time beside rows at
  # other positions with other settings (4 prompts per insert call), the requests at T = 1 in
  # pairs of samples of one request (streams seed and seed + 2^32, one shared prefill, as
  # n = 2 asks),
  engine = toy_engine
  prefilled = []  # per insert call: (prompts prefilled, requests inserted)
  run_insert = engine._run_insert
  monkeypatch.setattr(engine, "_run_insert", lambda *a: prefilled.append(
      (int(np.sum(np.any(a[1].reshape(len(a[1]), -1) < 128, axis=1))),
       int(np.sum(a[1] < 128)))) or run_insert(*a))
  rng = np.random.default_rng(0)
  fillers = iter(_fillers(rng, LAW_ROWS))
  law = {1.0: [], 0.7: []}
  for _ in range(LAW_ROWS // 2):
    seed = int(rng.integers(2**63))
    law[1.0] += engine.submit_all([(ex.PROMPT, GenerationParams(
        max_new_tokens=ex.MAX_NEW, temperature=1.0, seed=seed + j * 2 ** 32)) for j in range(2)],
        share_prefill=True)
    for _ in range(2):
      law[0.7].append(engine.submit(ex.PROMPT, GenerationParams(
          max_new_tokens=ex.MAX_NEW, temperature=0.7, seed=int(rng.integers(2**63)))))
    engine.submit(*next(fillers))
  # when the engine runs them all,
  _drain(engine)
  # then each group follows the target's law at its temperature (every round, rollback and
  # ring wrap included: the sequential test covers all MAX_NEW tokens),
  for temperature, requests in law.items():
    rows = [r.result().tokens for r in requests]
    p, each = ex.exactness_pvalue(rows, temperature=temperature)
    assert p > ex.ALPHA, f"T={temperature}: departs from the target law (p={p:.2e}; {each})"
  # the draft was judged often and not always right, and requests entered at many different
  # times (the batch really was busy).
  stats = [r.stats for r in law[1.0]]
  a = sum(s.accepted for s in stats) / sum(s.judged for s in stats)
  assert 0.2 < a < 0.9, a
  assert len({round(s.queue_s, 4) for s in stats}) > 50
  # The pairs of samples agree on their first 2 tokens as often as independent draws would
  # (sum of the squared law, ~5%), not more: a shared prefill gave each its own stream.
  tokens = np.array([r.result().tokens for r in law[1.0]])[:, :2]
  collisions = int(np.sum(np.all(tokens[0::2] == tokens[1::2], axis=1)))
  p_collide = float(np.sum(ex.exact_law().sum(axis=(2, 3, 4)) ** 2))
  test = ex.stats.binomtest(collisions, len(tokens) // 2, p_collide)
  assert test.pvalue > ex.ALPHA, (collisions, len(tokens) // 2 * p_collide)
  # Nearly every pair shared one prefill (a pair the free slots split is prefilled twice).
  prompts, inserted = np.sum(prefilled, axis=0)
  assert inserted == 2 * LAW_ROWS + LAW_ROWS // 2, inserted
  assert inserted - prompts > 0.9 * LAW_ROWS // 2, (inserted, prompts)


def test_greedy_requests_in_a_mixed_batch_equal_greedy_autoregressive(toy_engine):
  # Given ragged greedy prompts queued among sampled requests (other temperatures, top-p,
  # top-k) in one engine,
  n = 256
  engine = toy_engine
  prompts = ex.GREEDY_PROMPTS[:n]
  rng = np.random.default_rng(1)
  greedy = []
  for prompt, filler in zip(prompts, _fillers(rng, n)):
    greedy.append(engine.submit(prompt, GenerationParams(max_new_tokens=ex.MAX_NEW,
                                                         temperature=0.0, top_p=0.5)))
    engine.submit(*filler)
  _drain(engine)
  # then every greedy request is the target's greedy continuation, token for token: each token
  # the argmax of the target's logits given the prompt and the tokens before it, from one
  # forward over the whole row (no cache, no loop; rows with a near-tie on the path excluded,
  # as in test_exactness).
  got = np.array([r.result().tokens for r in greedy])
  path, clear = ex.greedy_path(ex.TARGET, ex.target_params(), prompts, got)
  assert clear.mean() > 0.97
  want = np.argmax(path, axis=-1)
  bad = np.flatnonzero(clear & np.any(got != want, axis=1))
  assert bad.size == 0, f"{bad.size} rows differ, e.g. {got[bad[0]]} vs {want[bad[0]]}"


def test_seeded_request_does_not_depend_on_what_shares_the_batch(toy_engine):
  # Given a seeded request run alone,
  engine = toy_engine
  probe = GenerationParams(max_new_tokens=ex.MAX_NEW, temperature=0.9, top_p=0.9, top_k=4,
                           seed=2**40 + 7)
  alone = engine.generate([ex.PROMPT], probe)[0].tokens
  # when it runs again behind other requests (so in another slot, at another time, beside rows
  # at other positions), and with yet other neighbours,
  rng = np.random.default_rng(2)
  for neighbours in (5, 40):
    others = [engine.submit(*f) for f in _fillers(rng, neighbours)]
    again = engine.submit(ex.PROMPT, probe)
    others += [engine.submit(*f) for f in _fillers(rng, 4)]
    _drain(engine)
    # then its tokens are the same,
    assert again.result().tokens == alone
  # while another seed gives other tokens (the seed is what decides).
  seeds = [engine.generate([ex.PROMPT], dataclasses.replace(probe, seed=s))[0].tokens
           for s in range(3)]
  assert any(t != alone for t in seeds)


def test_samples_of_one_prompt_share_one_prefill(toy_engine, monkeypatch):
  engine = toy_engine
  calls = []  # per insert call: (prompts prefilled, requests inserted)
  run_insert = engine._run_insert
  monkeypatch.setattr(engine, "_run_insert", lambda *a, **kw: calls.append(
      (int(np.sum(np.any(a[1].reshape(len(a[1]), -1) < engine.num_slots, axis=1))),
       int(np.sum(a[1] < engine.num_slots)))) or run_insert(*a, **kw))
  # Given 3 seeded samples of one prompt (as n = 3 asks: streams seed + j * 2^32, one of them
  # with other filters) submitted together,
  probe = GenerationParams(max_new_tokens=ex.MAX_NEW, temperature=1.0, seed=11)
  params = [dataclasses.replace(probe, seed=probe.seed + j * 2 ** 32) for j in range(3)]
  params[2] = dataclasses.replace(params[2], temperature=0.7, top_k=4)
  shared = engine.submit_all([(ex.PROMPT, p) for p in params], share_prefill=True)
  _drain(engine)
  shared = [r.result() for r in shared]
  # then the prompt was prefilled once, into the 3 slots,
  assert calls == [(1, 3)]
  # and each sample is what the same request gives alone (its own prefill): the copies are
  # independent samples, each on its own stream, not one sample repeated. (Equal prompts not
  # submitted as samples are prefilled each on its own.)
  calls.clear()
  alone = engine.generate([ex.PROMPT] * 3, params)
  assert calls == [(3, 3)]
  assert [r.tokens for r in shared] == [r.tokens for r in alone]
  assert len({tuple(r.tokens) for r in shared}) == 3


# ---------------------------------------------------------------------------------------------
# Controls: penalties (which depend on the tokens generated so far), min_p and logit_bias,
# applied to p and q alike at every drafted position with the drafted prefix's counts.

CONTROLS = dict(temperature=1.0, presence_penalty=0.6, frequency_penalty=0.4,
                repetition_penalty=1.5, min_p=0.08, logit_bias=((2, 1.5), (6, -2.0)))


@jax.jit
def _continuation_logits_device(params):
  n = len(ex.CONTINUATIONS)
  tokens = jnp.concatenate([jnp.tile(jnp.asarray(ex.PROMPT, jnp.int32), (n, 1)),
                            jnp.asarray(ex.CONTINUATIONS)], axis=1)
  return model.forward_full(params, ex.TARGET, tokens)[:, len(ex.PROMPT) - 1:-1]


@functools.lru_cache(maxsize=None)
def _continuation_logits():
  """The target's logits before each of the L tokens of every continuation of PROMPT (one
  forward over all of them, shared by the laws below)."""
  return _continuation_logits_device(ex.target_params())


@functools.partial(jax.jit, static_argnames=("min_p",))
def _controlled_law_device(logits, presence, frequency, repetition, bias_ids, bias, min_p):
  n = len(ex.CONTINUATIONS)
  cont = jnp.asarray(ex.CONTINUATIONS)
  # The generated tokens before step i: the continuation's first i.
  onehot = jax.nn.one_hot(cont, ex.V, dtype=jnp.int32)
  counts = jnp.cumsum(onehot, axis=1) - onehot
  in_prompt = jnp.tile(jnp.zeros((ex.V,), bool).at[jnp.asarray(ex.PROMPT)].set(True), (n, 1))
  f = lambda x: jnp.full((n,), x, jnp.float32)
  shifted = sampling.penalize(logits, counts, in_prompt, f(presence), f(frequency),
                              f(repetition), jnp.tile(bias_ids, (n, 1)), jnp.tile(bias, (n, 1)))
  probs = sampling.probabilities(shifted, 1.0, 0, 1.0, min_p=min_p)
  return jnp.prod(jnp.take_along_axis(probs, cont[..., None], axis=-1)[..., 0], axis=1)


def _controlled_law(c):
  ids, biases = zip(*c["logit_bias"])
  law = np.asarray(_controlled_law_device(
      _continuation_logits(), c["presence_penalty"], c["frequency_penalty"],
      c["repetition_penalty"], jnp.asarray(ids, jnp.int32), jnp.asarray(biases, jnp.float32),
      c["min_p"]), np.float64)
  assert abs(law.sum() - 1) < 1e-4
  return (law / law.sum()).reshape((ex.V,) * ex.L)


def test_penalties_min_p_and_logit_bias_keep_the_target_law_under_speculation(toy_engine):
  # Given requests with every control at once (repetition, frequency and presence penalties
  # counting the row's own earlier tokens, min_p, logit_bias), decoded with K = 3 drafts
  # (each drafted position penalised with the drafted prefix's counts),
  engine = toy_engine
  rng = np.random.default_rng(1)
  requests = engine.submit_all([(ex.PROMPT, GenerationParams(
      max_new_tokens=ex.L, seed=int(rng.integers(2 ** 63)), **CONTROLS))
      for _ in range(LAW_ROWS)], bounded=False)
  _drain(engine)
  tokens = np.array([r.result().tokens for r in requests])
  # then the first L tokens follow the law enumerated with the same controls,
  law = _controlled_law(CONTROLS)
  p = ex.law_pvalues(tokens, law)
  assert min(p) > ex.ALPHA, p
  # which differs from the plain target's (the controls did something),
  plain = ex.exact_law(temperature=1.0)
  assert min(ex.law_pvalues(tokens, plain)) < 1e-6
  # and the draft was judged and sometimes rejected.
  stats = [r.stats for r in requests]
  assert 0.2 < sum(s.accepted for s in stats) / sum(s.judged for s in stats) < 0.95
  # Logprobs under controls: each token's is that of the penalised, filtered distribution it
  # was drawn from, or with raw_logprobs the target's own log-softmax (no penalties, bias,
  # temperature or min_p), both recomputed in numpy from one forward.
  settings = dict(CONTROLS, temperature=0.6, max_new_tokens=10, logprobs=0)
  both = engine.generate([ex.PROMPT] * 4, [GenerationParams(seed=s, raw_logprobs=s % 2 == 1,
                                                            **settings) for s in range(4)])
  ref_controls = dict(presence=CONTROLS["presence_penalty"],
                      frequency=CONTROLS["frequency_penalty"],
                      repetition=CONTROLS["repetition_penalty"],
                      bias=dict(CONTROLS["logit_bias"]))
  for s, done in enumerate(both):
    seq = list(ex.PROMPT) + done.tokens
    logits = _target_logits(seq)
    for j, lp in enumerate(done.logprobs):
      at = logits[len(ex.PROMPT) - 1 + j]
      if s % 2:
        want = ts.reference(at, 1.0, 0, 1.0)
      else:
        shifted = ts.reference_penalize(at, done.tokens[:j], list(ex.PROMPT), **ref_controls)
        want = ts.reference(shifted, settings["temperature"], 0, 1.0, min_p=CONTROLS["min_p"])
      np.testing.assert_allclose(lp.logprob, np.log(want[done.tokens[j]]), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Structured output: a regex over the toy vocabulary masks the draft's p and the target's q at
# every drafted and verified position (decoding/grammar.py).

# Token i spells letter i ("f", token 5, is the EOS: it spells nothing). Every string of the
# language has 6 tokens or more, so EOS never enters the first L and the masks vary with the
# prefix: position 0 allows 4 tokens, the next 3 or 4 depending on the first.
TOY_REGEX = "([abc][dgh]|e[ab]*g){3,}"
EOS = ex.EOS_IDS[0]  # the grammar tests' one end token
TOY_PIECES = [None if i == EOS else bytes([ord("a") + i]) for i in range(ex.V)]


def _toy_grammar():
  from spec_tpu.decoding import grammar
  compiler = grammar.GrammarCompiler(TOY_PIECES, EOS, ex.V, max_states=16)
  return compiler.regex(TOY_REGEX)


@jax.jit
def _masked_law_device(logits, allowed_nlv):
  cont = jnp.asarray(ex.CONTINUATIONS)
  probs = sampling.probabilities(jnp.where(allowed_nlv, logits, -jnp.inf), 1.0, 0, 1.0)
  return jnp.prod(jnp.take_along_axis(probs, cont[..., None], axis=-1)[..., 0], axis=1)


@functools.lru_cache(maxsize=None)
def _masked_law(pattern):
  """The target's law with each token restricted to those that keep the text a prefix of a
  string of the language, by the `regex` module's partial matching (not the automaton under
  test)."""
  import regex
  letters = "".join(chr(ord("a") + i) for i in range(ex.V))
  allowed = np.zeros(ex.CONTINUATIONS.shape + (ex.V,), bool)
  memo = {}
  for row, cont in enumerate(ex.CONTINUATIONS):
    for j in range(ex.L):
      prefix = "".join(letters[t] for t in cont[:j])
      if prefix not in memo:
        memo[prefix] = [t != EOS and regex.fullmatch(pattern, prefix + letters[t],
                                                        partial=True) is not None
                        for t in range(ex.V)]
        # A prefix outside the language has probability 0 already: any mask will do.
        memo[prefix] = memo[prefix] if any(memo[prefix]) else [True] * ex.V
      allowed[row, j] = memo[prefix]
  law = np.asarray(_masked_law_device(_continuation_logits(), allowed), np.float64)
  return (law / law.sum()).reshape((ex.V,) * ex.L)


def _grammar_rows(engine, grammar, rows, seed):
  rng = np.random.default_rng(seed)
  items = []
  for i in range(rows):  # every third request unconstrained, sharing the slots
    constrained = i % 3 != 2
    items.append((ex.PROMPT, GenerationParams(
        max_new_tokens=ex.L, seed=int(rng.integers(2 ** 63)),
        grammar=grammar if constrained else None)))
  requests = engine.submit_all(items, bounded=False)
  _drain(engine)
  constrained = [r for i, r in enumerate(requests) if i % 3 != 2]
  free = [r.result().tokens for i, r in enumerate(requests) if i % 3 == 2]
  # (A row that stopped at EOS, which the grammar never allows this early, is padded with it.)
  pad = lambda t: t + [EOS] * (ex.L - len(t))
  return (np.array([pad(r.result().tokens) for r in constrained]), free,
          [r.stats for r in constrained])


# K = 3 hybrid drafts: n-gram proposals from the row's own tokens (one-hot, not masked: some
# leave the language, are rejected and rolled back), then the draft model, masked at each
# drafted position in the state its drafts reach.
GRAMMAR_SOURCE = DraftSource("hybrid", ngram_max=3, ngram_min=1)


def _grammar_engine(grammar, coupling="rejection"):
  # Two tables for 128 slots: the slots whose requests bring one grammar share its table.
  return Engine(_toy_sampler(eos_ids=EOS).pair, num_slots=128, max_len=32, k=3,
                adaptive_k=False, max_top_k=4, prefill_rows=4, coupling=coupling,
                grammar_states=grammar.num_states, grammar_classes=grammar.num_classes,
                grammar_masks=grammar.num_masks, grammar_tables=2,
                draft_source=GRAMMAR_SOURCE)


@pytest.mark.parametrize("coupling", ["rejection", pytest.param("gumbel", marks=pytest.mark.slow)])
def test_grammar_masks_keep_the_constrained_law_under_speculation(coupling):
  # Given requests constrained by a regex over the toy vocabulary, decoded with hybrid drafts
  # (GRAMMAR_SOURCE), sharing the slots with unconstrained requests,
  grammar = _toy_grammar()
  engine = _grammar_engine(grammar, coupling)
  constrained, free, stats = _grammar_rows(engine, grammar, LAW_ROWS * 3 // 2, seed=3)
  # then the constrained rows' first L tokens follow the target's law under the grammar's
  # masks (computed independently),
  law = _masked_law(TOY_REGEX)
  p = ex.law_pvalues(constrained, law)
  assert min(p) > ex.ALPHA, p
  # the unconstrained rows beside them are not masked (their first tokens leave the language),
  assert np.mean([t[0] not in (0, 1, 2, 4) for t in free]) > 0.2
  # both sources' drafts were judged and sometimes rejected, and the mask refused proposals
  # (n-gram tokens outside the language, the model's unmasked first choices);
  assert 0.2 < sum(s.accepted for s in stats) / sum(s.judged for s in stats) < 0.95
  assert 0 < sum(s.ngram_judged for s in stats) < sum(s.judged for s in stats)
  assert sum(s.mask_rejected for s in stats) > 0
  # and every constrained slot read the one table its grammar was written to, once (a token
  # class per token: the toy vocabulary's 8 tokens in fewer classes).
  assert grammar.num_classes < ex.V
  gauges = engine.metrics.gauges
  assert gauges["grammar_table_writes"] == 1 and gauges["grammar_tables_in_use"] == 0
  pool = jax.tree.map(np.asarray, engine._state.grammar_pool)
  s, c = grammar.num_states, grammar.num_classes
  np.testing.assert_array_equal(pool.cls_tv[1], grammar.cls_v)
  np.testing.assert_array_equal(pool.next_sc[1:1 + s, :c],
                                np.where(grammar.next_sc >= 0, grammar.next_sc + 1, -1))
  assert (pool.table_s[1:1 + s] == 1).all() and not pool.cls_tv[2].any()
  m = grammar.num_masks
  np.testing.assert_array_equal(pool.mask_s[1:1 + s], grammar.mask_s + 1)
  np.testing.assert_array_equal(pool.bits_mw[1:1 + m], grammar.bits_mw)


@pytest.mark.slow  # a second engine compile (~20 s) for the negative control
def test_grammar_mask_on_the_draft_only_fails_the_same_test(monkeypatch):
  # Given the mask on the draft's p only (the target's q unmasked at the verified positions),
  monkeypatch.setattr(decode, "_verify_allowed", lambda table, g: None)
  grammar = _toy_grammar()
  wrong, _, _ = _grammar_rows(_grammar_engine(grammar), grammar, 300, seed=4)
  # then the constrained law test fails it.
  assert min(ex.law_pvalues(wrong, _masked_law(TOY_REGEX))) < ex.NEGATIVE_P


def test_controls_need_an_engine_built_with_them(byte_engine):
  engine, _ = byte_engine
  with pytest.raises(ValueError, match="controls=True"):
    engine.submit([1, 2], GenerationParams(presence_penalty=0.5))
  with pytest.raises(ValueError, match="repetition_penalty"):
    engine.submit([1, 2], GenerationParams(repetition_penalty=0.0))
  assert engine.queue_length == 0


# ---------------------------------------------------------------------------------------------
# Logprobs: what each emitted token's distribution gave it, through speculation.

LOGPROB_SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                    dict(temperature=1.3, top_p=0.8), dict(temperature=0.0)]


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_equal_a_numpy_recompute_from_full_forward_logits(toy_engine, k):
  engine = toy_engine
  rng = np.random.default_rng(k)
  prompts = [rng.integers(0, ex.V, int(rng.integers(2, 9))).tolist() for _ in range(8)]
  params = [GenerationParams(max_new_tokens=14, seed=i, logprobs=3,
                             raw_logprobs=i >= len(LOGPROB_SETTINGS),
                             **LOGPROB_SETTINGS[i % len(LOGPROB_SETTINGS)])
            for i in range(len(prompts))]
  # Given requests with mixed filters, decoded at K = k (3: tokens come from acceptance,
  # resampling after a rejection and the bonus position alike; 0: plain decoding), each
  # setting once asking for the logprobs of the distribution it samples from and once for the
  # raw distribution's,
  requests = engine.submit_all(list(zip(prompts, params)))
  while engine.step(k=k):
    pass
  for prompt, p, r in zip(prompts, params, requests):
    done = r.result()
    assert len(done.logprobs) == len(done.tokens) >= 1
    # then each token's logprob is log q(token | its prefix), q the target's filtered
    # distribution (or its raw one: temperature 1, no filters) recomputed in float64 from one
    # forward over the whole sequence,
    seq = prompt + done.tokens
    logits = _target_logits(seq)
    for j, lp in enumerate(done.logprobs):
      q = ts.reference(logits[len(prompt) - 1 + j], *((1.0, 0, 1.0) if p.raw_logprobs else
                                                      (p.temperature, p.top_k, p.top_p)))
      assert lp.token == done.tokens[j]
      np.testing.assert_allclose(lp.logprob, np.log(q[lp.token]), atol=2e-5)
      # and the top 3 are q's most probable tokens with their logprobs (-inf: filtered out).
      ids, lps = zip(*lp.top)
      with np.errstate(divide="ignore"):
        np.testing.assert_allclose(lps, np.log(np.sort(q)[::-1][:3]), atol=2e-5)
        np.testing.assert_allclose(np.log(q[list(ids)]), lps, atol=2e-5)


def test_a_request_without_logprobs_gets_none_and_too_many_are_refused(toy_engine):
  engine = toy_engine
  (r,) = engine.generate([[1, 2, 3]], GenerationParams(max_new_tokens=3, seed=0))
  assert r.logprobs is None
  with pytest.raises(ValueError, match="logprobs_k=3"):
    engine.submit([1, 2], GenerationParams(logprobs=4))


def test_prompt_scores_are_the_targets_own_logprobs(toy_engine):
  engine = toy_engine
  prompt = [3, 1, 4, 1, 5, 2, 6, 5, 3]
  # Given a prompt scored (between steps, as the engine's thread does),
  future = engine.score(prompt, top=2)
  engine.step()
  scores = future.result(timeout=0)
  # then the first token has nothing before it, and each later token's logprob and top 2 are
  # the target's log-softmax at the position before it (temperature 1, no filters).
  logits = _target_logits(prompt)
  logq = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  assert [s.token for s in scores] == prompt and math.isnan(scores[0].logprob)
  for j, s in enumerate(scores[1:], 1):
    np.testing.assert_allclose(s.logprob, logq[j - 1, prompt[j]], atol=1e-5)
    assert [t for t, _ in s.top] == list(np.argsort(-logq[j - 1], kind="stable")[:2])
    np.testing.assert_allclose([v for _, v in s.top], np.sort(logq[j - 1])[::-1][:2], atol=1e-5)
  with pytest.raises(ValueError, match="logprobs_k=3"):
    engine.score(prompt, top=4)


# ---------------------------------------------------------------------------------------------
# Streams, stop strings, cancellation: a tiny byte-level model, driven step by step here (the
# server tests run it on its background thread).

@pytest.fixture(scope="module")
def byte_engine():
  target = get_preset("tiny").replace(name="tiny_bytes", vocab_size=260, tokenizer="bytes")
  draft = target.replace(name="tiny_bytes_draft", num_layers=1)
  tok = ByteTokenizer()
  init = jax.jit(model.init_params, static_argnums=0)  # one program, not one per op
  sampler = Sampler.from_params(init(target, jax.random.key(0)), target,
                    draft_params=init(draft, jax.random.key(1)), draft_cfg=draft,
                    eos_ids=tok.eos_ids)
  engine = Engine(sampler.pair, num_slots=4, max_len=128, k=2, adaptive_k=False, tokenizer=tok,
                  rounds_per_step=2)
  return engine, tok


def test_stream_chunks_add_up_to_the_result(byte_engine):
  engine, tok = byte_engine
  # Given a text prompt; when its stream is read as an iterator and as an async iterator,
  request = engine.submit("def f(x):", GenerationParams(max_new_tokens=40, seed=3))
  _drain(engine)
  chunks = list(request)
  done = request.result()
  # then the chunks' tokens and texts add up to the completion, whose text decodes its tokens,
  assert [t for c in chunks for t in c.tokens] == done.tokens
  assert "".join(c.text for c in chunks) == done.text == tok.decode(done.tokens)
  assert len(chunks) > 2 and done.finish_reason in ("stop", "length")
  # and the stats count the request's own calls.
  assert done.stats.new_tokens == len(done.tokens) and done.stats.prompt_tokens == 9
  assert done.stats.target_calls >= math.ceil(len(done.tokens) / 3)
  assert 0 <= done.stats.accepted <= done.stats.judged and done.stats.ks == (2,)

  async def read(r):
    return [c async for c in r]
  again = engine.submit("def f(x):", GenerationParams(max_new_tokens=40, seed=3))
  _drain(engine)
  async_chunks = asyncio.run(read(again))
  assert [t for c in async_chunks for t in c.tokens] == done.tokens  # same seed, same tokens


def test_stop_string_ends_the_request_before_it(byte_engine):
  engine, tok = byte_engine
  params = GenerationParams(max_new_tokens=60, seed=5, temperature=0.7)
  full = engine.generate(["import os"], params)[0].text
  assert len(full) > 12
  stop = full[8:11]
  # Given the same seeded request with a stop string its output contains,
  request = engine.submit("import os", dataclasses.replace(params, stop=(stop, "\x00never")))
  _drain(engine)
  chunks = list(request)
  done = request.result()
  # then the text ends just before the stop string's first occurrence, nothing of it streamed.
  assert done.text == full[:full.index(stop)]
  assert "".join(c.text for c in chunks) == done.text
  assert done.finish_reason == "stop"


def test_cancel_frees_the_slot(byte_engine):
  engine, _ = byte_engine
  # Given a long request that has started, and one still queued behind a full engine,
  running = engine.submit("x", GenerationParams(max_new_tokens=100, seed=1))
  fillers = [engine.submit("y", GenerationParams(max_new_tokens=100)) for _ in range(3)]
  queued = engine.submit("z", GenerationParams(max_new_tokens=100))
  engine.step()
  assert 0 < len(running.tokens) < 100 and engine.active_slots == 4 and not queued.tokens
  # when both are cancelled,
  running.cancel()
  queued.cancel()
  engine.step()
  # then both end as cancelled (the queued one never started), the running one's slot frees,
  assert running.result().finish_reason == queued.result().finish_reason == "cancelled"
  assert queued.result().tokens == [] and engine.active_slots == 3
  assert len(list(running)) >= 1  # its stream ends
  # and the others still finish.
  for f in fillers:
    f.cancel()
  _drain(engine)
  assert engine.active_slots == 0 and engine.queue_length == 0


def test_bad_requests_are_refused_before_queueing(byte_engine):
  engine, _ = byte_engine
  with pytest.raises(ContextLengthError, match="context"):
    engine.submit("x" * 100, GenerationParams(max_new_tokens=30))
  for bad, match in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                     (dict(top_k=65), "max_top_k"), (dict(max_new_tokens=0), "max_new"),
                     (dict(seed=-1), "seed"), (dict(stop=("",)), "stop")]:
    with pytest.raises(ValueError, match=match):
      engine.submit("x", GenerationParams(**bad))
  assert engine.queue_length == 0


def test_the_queue_bound_refuses_past_it_and_frees_as_it_drains(byte_engine, monkeypatch):
  engine, _ = byte_engine
  monkeypatch.setattr(engine, "max_queue", 3)
  params = GenerationParams(max_new_tokens=2, seed=1)
  # Given a queue bound of 3 and 2 requests waiting,
  waiting = engine.submit_all([("a", params), ("b", params)])
  # then a batch of 2 more is refused whole (nothing of it queued), one more fits,
  with pytest.raises(QueueFullError, match="queue is full"):
    engine.submit_all([("c", params), ("d", params)])
  assert engine.queue_length == 2
  waiting.append(engine.submit("c", params))
  with pytest.raises(QueueFullError):
    engine.submit("d", params)
  # a batch larger than the bound can never fit (a ValueError, not "try later"),
  with pytest.raises(ValueError, match="exceed"):
    engine.submit_all([("e", params)] * 4)
  # and once the engine takes the waiting ones into slots the queue has room again.
  engine.step()
  assert engine.queue_length == 0
  waiting.append(engine.submit("d", params))
  _drain(engine)
  assert all(r.result().finish_reason in ("stop", "length") for r in waiting)


def test_a_batch_with_a_bad_member_leaves_nothing_queued(byte_engine):
  engine, _ = byte_engine
  ok = GenerationParams(max_new_tokens=3, seed=1)
  # Given batches whose later members are bad (too few params, float ids, an empty prompt),
  with pytest.raises(ValueError, match="3 prompts but 2 GenerationParams"):
    engine.generate(["a", "b", "c"], [ok, ok])
  with pytest.raises(ValueError, match="non-integer token ids"):
    engine.generate(["a", [70.7, 71.2]], ok)
  with pytest.raises(ValueError, match="non-empty prompts"):
    engine.calibrate([[70, 71], []])
  # then none of their good members stays queued to run with, or block, the next batch.
  assert engine.queue_length == 0 and engine.active_slots == 0
  assert len(engine.generate(["a"], ok)) == 1


def test_a_failed_insert_finishes_its_requests_with_the_error(byte_engine, monkeypatch):
  engine, _ = byte_engine
  def device_lost(*args, **kwargs):
    raise OSError("device lost")
  monkeypatch.setattr(engine, "_insert", device_lost)
  # Given a request taken from the queue whose insert fails (in neither the queue nor a slot),
  request = engine.submit("a", GenerationParams(max_new_tokens=3))
  with pytest.raises(OSError):
    engine.step()
  # then it is finished with that error rather than waited on forever.
  assert request.finished
  with pytest.raises(RuntimeError, match="the engine failed"):
    request.result(timeout=0)
  assert engine.queue_length == 0 and engine.active_slots == 0


def test_shutdown_during_a_long_device_call_still_finishes_every_request(byte_engine,
                                                                         monkeypatch):
  first, tok = byte_engine
  engine = Engine(first.pair, num_slots=2, max_len=64, k=0, adaptive_k=False, tokenizer=tok)
  insert = engine._insert

  def slow_insert(*args, **kwargs):
    time.sleep(1.0)  # a long compile or device call
    return insert(*args, **kwargs)
  monkeypatch.setattr(engine, "_insert", slow_insert)
  engine.start()
  # Given a request the engine thread is inserting when shutdown's wait runs out,
  request = engine.submit("a", GenerationParams(max_new_tokens=50))
  time.sleep(0.3)
  engine.shutdown(timeout=0.1)
  # then the thread, once back, ends it: its reader is not left waiting.
  assert request.result(timeout=120).finish_reason in ("aborted", "stop", "length")


# ---------------------------------------------------------------------------------------------
# Choosing K and N.

@pytest.fixture(scope="module")
def same_draft_engine():
  """The target as its own draft (p = q: every draft token is accepted, a = 1); adaptive K
  from k0 = 1 up to k_max = 3. Tests reset its policy."""
  same = ex.TARGET.replace(name="same_as_target")
  sampler = Sampler.from_params(ex.target_params(), ex.TARGET, draft_params=ex.target_params(),
                    draft_cfg=same)
  return Engine(sampler.pair, num_slots=8, max_len=64, max_top_k=4, window_rounds=8, k=1, k_max=3,
                adaptive_k=True)


def _fresh_policy(engine, k0=1):
  engine.policy = k_policy.AdaptiveK(k0=k0, k_max=engine.k_max, probe_every=16, ks=engine.ks)
  engine.pacing = Pacing(engine.pacing.max_rounds)


def test_a_draft_equal_to_the_target_is_always_accepted(same_draft_engine):
  # Given the target as its own draft, where K = 0 steps first leave the draft behind (it
  # catches up before the speculative steps),
  engine = same_draft_engine
  requests = [engine.submit(ex.PROMPT, GenerationParams(max_new_tokens=24, seed=i))
              for i in range(8)]
  engine.step(k=0)
  engine.step(k=0)
  while engine.step(k=2):
    pass
  # then every judged draft token is accepted: the draft saw exactly the target's context.
  for r in requests:
    assert r.result().stats.judged > 0 and r.result().stats.acceptance_rate == 1.0
    assert r.result().stats.ks == (0, 2)


def test_k_follows_measured_acceptance_and_cost(same_draft_engine):
  # Given a draft that is always right, and round times of 1 + K c at every K the engine may
  # pick (as calibration measures them; faked here so the choice does not hang on this machine),
  engine = same_draft_engine
  _fresh_policy(engine)
  engine.pacing.observe_step = lambda *a: None
  assert engine.ks == (0, 1, 2)
  for draft_cost, want_k in [(0.01, 2), (3.0, 0)]:
    engine.pacing.round_s = {k: 1.0 + k * draft_cost for k in engine.ks}
    for k, seconds in engine.pacing.round_s.items():
      engine.policy.observe_round_time(k, seconds)
    # when requests run long enough for a few windows of rounds,
    results = engine.generate([ex.PROMPT] * 8, GenerationParams(max_new_tokens=40, seed=1))
    # then the policy saw a ~ 1 and moved K to the best one: the largest while the draft is
    # nearly free, K = 0 (plain decoding) once it costs more than the target.
    assert engine.policy.a > 0.9
    assert engine.k == want_k
    assert want_k in results[-1].stats.ks


def test_calibration_times_both_programs_and_picks_k(same_draft_engine):
  # Given an idle engine, when it calibrates on its own,
  engine = same_draft_engine
  _fresh_policy(engine)
  report = engine.calibrate(rounds=2, repeats=1)
  # then it measured a step call and a round at every K it may pick, and chose the K whose
  # measured round time and acceptance promise the most,
  assert report["call_s"] > 0 and all(report[f"round_s_k{k}"] > 0 for k in engine.ks)
  assert report["accepted"] == report["judged"] > 0 and engine.policy.c is not None
  t = {k: report[f"round_s_k{k}"] for k in engine.ks}
  costs = {k: max(t[j] for j in t if j <= k) / t[0] for k in engine.ks}  # never below a smaller K
  assert costs == pytest.approx({k: engine.policy.cost(k) for k in engine.ks})
  assert engine.k == k_policy.choose_k_measured(engine.policy.a, costs, engine.policy.margin)
  # leaving no request behind, and serving correctly afterwards.
  assert engine.active_slots == 0 and engine.metrics.snapshot()["generated_tokens"] == 0
  out = engine.generate([ex.PROMPT], GenerationParams(max_new_tokens=5, temperature=0.0))
  assert len(out[0].tokens) == 5


def test_rounds_per_step_amortise_the_host_overhead():
  p = Pacing(max_rounds=16, overhead=0.05, max_interval_s=0.1)
  assert p.rounds(0) == 1  # nothing measured yet
  p.observe_call(0.0005)
  p.observe_host(0.0005)
  p.observe_step(0, rounds=4, seconds=0.0005 + 4 * 0.004)
  # h = 1 ms, t = 4 ms: 5 rounds keep h at 5% of a step.
  assert p.rounds(0) == 5
  p.observe_step(4, rounds=2, seconds=0.0005 + 2 * 0.05)
  assert p.rounds(4) == 1  # 50 ms rounds: h is already small
  slow = Pacing(max_rounds=16, max_interval_s=0.02)
  slow.observe_host(0.01)
  slow.observe_step(0, rounds=1, seconds=0.004)
  assert slow.rounds(0) == 5  # streaming interval caps it (5 x 4 ms = 20 ms)
  assert Pacing(max_rounds=16, fixed=3).rounds(0) == 3


def test_multihost_insert_message_round_trips():
  from spec_tpu.decoding import decode
  slots = np.array([3, 8], np.int32)
  tokens = np.array([[5, 6, 7], [1, 0, 0]], np.int32)
  lengths = np.array([3, 1], np.int32)
  rows = decode.Rows(np.array([0.7, 0.0], np.float32), np.array([0.95, 1.0], np.float32),
                     np.array([4, 0], np.int32),
                     np.array([[2**32 - 1, 5], [0, 2**31]], np.uint32), np.array([9, 1], np.int32))
  got = multihost.unpack_insert(multihost.pack_insert(slots, tokens, lengths, rows), 3)
  for a, b in zip(jax.tree.leaves((slots, tokens, lengths, rows)), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


# ---------------------------------------------------------------- request text (no device)

def _request(prompt, tok, **params):
  from spec_tpu.serving.request import Request
  return Request(0, prompt, GenerationParams(max_new_tokens=100, **params), tok)


@pytest.mark.parametrize("stops, pieces", [
    (("User:", "\nUser:"), ["Hi there.", "\nUs", "er: more"]),
    (("0\x00", "ev.0l"), ["sto", "ev.", "0l and on"]),
    (("abcd", "cde", "x"), ["1ab", "c", "de"]),
])
def test_streamed_text_never_holds_a_stop_strings_text(stops, pieces):
  tok = ByteTokenizer()
  # Given output arriving in pieces, where a later stop string's prefix is pending while an
  # earlier stop string's shorter prefix is too,
  r = _request([2], tok, stop=stops)
  stopped = False
  for piece in pieces:
    stopped = r._deliver(tok.encode(piece))
    if stopped:
      break
  r._finish("stop" if stopped else "length")
  done = r.result()
  # then the streamed chunks add up to the final text, which holds no stop string.
  whole = "".join(pieces)
  cut = min([whole.index(s) for s in stops if s in whole] or [len(whole)])
  assert done.text == whole[:cut]
  assert "".join(c.text for c in r._chunks) == done.text


def _sentencepiece_with_dummy_prefix():
  import io
  import sentencepiece as spm
  from spec_tpu.tokenizer import Tokenizer
  model = io.BytesIO()
  text = ["the quick brown fox jumps over the lazy dog", "hello world, said the fox"] * 20
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=300, add_dummy_prefix=True,
      byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0, pad_id=0, unk_id=1,
      bos_id=2, eos_id=3, minloglevel=2)
  return Tokenizer(model.getvalue())


def test_a_dummy_prefix_tokenizer_keeps_the_first_words_space():
  # Given a SentencePiece model that adds a dummy prefix (as Llama 2's and Mistral's do: a text's
  # first space is dropped when decoded alone),
  tok = _sentencepiece_with_dummy_prefix()
  prompt, new = tok.encode("the quick"), tok.encode(" brown fox")
  assert tok.decode(new) == "brown fox"
  # then a completion's text continues the prompt's as decoding them together would,
  r = _request(prompt, tok)
  for t in new:  # one token per delivery, as a stream
    r._deliver([t])
  r._finish("length")
  assert r.result().text == " brown fox" == tok.decode(prompt + new)[len("the quick"):]
  assert "".join(c.text for c in r._chunks) == " brown fox"
