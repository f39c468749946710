"""Drafts without (or beside) a draft model: prompt lookup and hybrid drafting stay exact.

  matcher  draft_source.ngram_proposals against a plain numpy reference: the latest earlier
           occurrence of the longest suffix (n from ngram_max down to ngram_min), its
           continuation cut at the row's newest token, ragged rows.
  law      the statistical suite of test_exactness.py (enumerated law + sequential chi-square)
           with n-gram and hybrid proposals, on one device and on a 2x4 mesh. ngram_min=2 and
           PROMPT (3, 1, 4, 1) has no repeated pair, so every row's first round proposes
           nothing; later rounds match where the output repeats a pair (both paths checked
           to carry mass).
  greedy   speculative greedy with n-gram / hybrid proposals = autoregressive greedy.
           Both couplings: the rejection step and gumbel (noise by position).
  control  accepting every proposal without the rejection step (or, under gumbel, without the
           agreement check) fails the same test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_exactness as ex
from spec_tpu.decoding import gumbel, rejection, sampling
from spec_tpu.decoding.draft_source import DraftSource, ngram_proposals
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.sharding import REPLICATED, make_mesh

NGRAM = DraftSource("ngram", ngram_max=3, ngram_min=2)
HYBRID = DraftSource("hybrid", ngram_max=3, ngram_min=2)
K = 3


# ---------------------------------------------------------------------------------------------
# The matcher against a reference.

def reference_proposals(row, last, k, ngram_max, ngram_min):
  """Plain loops: for n from ngram_max down, the latest e < last whose n tokens ending at e
  equal those ending at last; propose row[e+1 : min(e+1+k, last+1)]."""
  for n in range(ngram_max, ngram_min - 1, -1):
    if n > last + 1:
      continue
    suffix = list(row[last - n + 1:last + 1])
    for e in range(last - 1, n - 2, -1):
      if list(row[e - n + 1:e + 1]) == suffix:
        return list(row[e + 1:min(e + 1 + k, last + 1)])
  return []


@pytest.mark.parametrize("ngram_max,ngram_min", [(3, 1), (4, 2), (2, 2)])
def test_matcher_matches_reference(ngram_max, ngram_min):
  # Given ragged rows of a small vocabulary (many repeats) with junk past each row's last token;
  # then proposals and counts are the reference's (latest occurrence, longest n first, cut at
  # the newest token, at most k).
  rng = np.random.default_rng(ngram_max * 10 + ngram_min)
  b, s, k = 400, 24, 5
  tokens = rng.integers(0, 4, (b, s)).astype(np.int32)
  last = rng.integers(0, s, b).astype(np.int32)
  tokens[:, 0] = rng.integers(0, 4, b)
  got, count = jax.jit(ngram_proposals, static_argnums=(2, 3, 4))(
      jnp.asarray(tokens), jnp.asarray(last), k, ngram_max, ngram_min)
  got, count = np.asarray(got), np.asarray(count)
  counts = []
  for i in range(b):
    junk = tokens[i].copy()
    junk[last[i] + 1:] = 7  # what lies past the newest token must not matter
    want = reference_proposals(junk, last[i], k, ngram_max, ngram_min)
    assert count[i] == len(want), (i, tokens[i, :last[i] + 1], count[i], want)
    assert got[i, :count[i]].tolist() == want, (i, got[i], want)
    counts.append(len(want))
  # Not vacuous: no match, short (cut at the end) and full proposals all occur.
  assert {0, 1, k} <= set(counts)


def test_matcher_prefers_longest_then_latest():
  # Row: 5 6 7 | 1 7 | 9 6 7 | 2 ... ends with 6 7: the 2-gram "6 7" occurs at positions 1-2
  # and 6-7; the latest (ending at 7) proposes what followed it.
  row = np.array([[5, 6, 7, 1, 7, 9, 6, 7, 2, 3, 6, 7, 0, 0]], np.int32)
  got, count = ngram_proposals(jnp.asarray(row), jnp.asarray([11]), 3, 3, 1)
  assert int(count[0]) == 3 and np.asarray(got)[0].tolist() == [2, 3, 6]
  # Longest first: "6 7" (n=2, ending at 1) wins over the more recent 1-gram "7" (ending at 3).
  row2 = np.array([[6, 7, 4, 7, 5, 6, 7]], np.int32)
  got, count = ngram_proposals(jnp.asarray(row2), jnp.asarray([6]), 2, 3, 1)
  assert np.asarray(got)[0, :int(count[0])].tolist() == [4, 7]


# ---------------------------------------------------------------------------------------------
# Exactness of the loop with n-gram and hybrid proposals.

@pytest.fixture(scope="module")
def single():
  return Sampler.from_params(ex.target_params(), ex.TARGET, draft_params=ex.draft_params(),
                             draft_cfg=ex.DRAFT)


@pytest.fixture(scope="module")
def no_draft_2x4():
  # No draft model at all, target tensor-parallel over 4 and batch over 2.
  return Sampler.from_params(ex.target_params(), ex.TARGET, mesh=make_mesh((2, 4)),
                             draft_source=NGRAM)


def _run(sampler, source, seed, coupling=None, **options):
  return sampler.generate([ex.PROMPT] * ex.BATCH, max_new_tokens=ex.MAX_NEW, k=K,
                          sampling=SamplingParams(**options), seed=seed, draft_source=source,
                          coupling=coupling)


def _check_sources_used(result, source):
  by = result.source_acceptance()
  # Matches occur and carry mass (accepted and rejected), and so do rounds without one.
  assert 0 < by["ngram"]["accepted"] < by["ngram"]["judged"], by
  other = by["model" if source.uses_model else "none"]
  assert other["judged"] > 0, by
  if source.uses_model:
    assert 0 < other["accepted"] < other["judged"], by
  assert len(np.unique(result.accepted)) > 1


CASES = [  # id, source, sampling options
    ("ngram", NGRAM, {}),
    ("ngram_top_k_3_top_p_0.9_temperature_0.7", NGRAM,
     {"top_k": 3, "top_p": 0.9, "temperature": 0.7}),
    ("hybrid_top_p_0.8_temperature_0.7", HYBRID, {"top_p": 0.8, "temperature": 0.7}),
    # Under the gumbel coupling a one-hot proposal is kept iff it is the target's Gumbel-max
    # token at its position; rows with no match (ragged proposal counts) judge nothing.
    ("ngram_gumbel_top_k_3_top_p_0.9_temperature_0.7", NGRAM,
     {"top_k": 3, "top_p": 0.9, "temperature": 0.7, "coupling": "gumbel"}),
]


@pytest.mark.parametrize("source,options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_output_follows_target_law(single, source, options):
  # Given one prompt on every row; when sampling with n-gram (or hybrid) proposals, under
  # either coupling; then the tokens follow the target's law.
  result = _run(single, source, seed=200 + len(options), **options)
  law = {k: v for k, v in options.items() if k != "coupling"}
  p, each = ex.exactness_pvalue(ex._full_rows(result), **law)
  assert p > ex.ALPHA, f"output departs from the target law (p = {p:.2e}; tests: {each})"
  _check_sources_used(result, source)


def test_ngram_without_draft_model_on_2x4_mesh_follows_target_law(no_draft_2x4):
  result = _run(no_draft_2x4, None, seed=211)
  p, each = ex.exactness_pvalue(ex._full_rows(result))
  assert p > ex.ALPHA, f"output departs from the target law (p = {p:.2e}; tests: {each})"
  _check_sources_used(result, NGRAM)


@pytest.mark.parametrize("source", [NGRAM, HYBRID], ids=["ngram", "hybrid"])
def test_greedy_speculative_equals_greedy_autoregressive(single, source):
  # Given ragged prompts; when decoding at temperature 0 with n-gram / hybrid proposals; then
  # the output is the target's greedy output (near-tie rows excluded, as in test_exactness).
  want, clear = ex._greedy_reference(single)
  result = single.generate(ex.GREEDY_PROMPTS, max_new_tokens=ex.MAX_NEW, k=K,
                           sampling=ex.GREEDY, draft_source=source)
  got = np.array(result.tokens)
  bad = np.flatnonzero(clear & np.any(got != want, axis=1))
  assert bad.size == 0, f"{bad.size} rows differ, e.g. row {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"
  by = result.source_acceptance()
  assert 0 < by["ngram"]["accepted"] < by["ngram"]["judged"], by  # both paths ran


def _accept_every_proposal(key, draft_bn, p_bnv, q_bmv, num_b=None):
  """WRONG: keeps every proposal (no rejection step), then a token from q after them."""
  b, k = draft_bn.shape
  n = jnp.full((b,), k, jnp.int32) if num_b is None else num_b
  return n, sampling.sample(key, q_bmv[jnp.arange(b), n])


def _keep_every_gumbel_proposal(draft_bn, q_bmv, noise_bmv, num_b=None):
  """WRONG: keeps every proposal (no agreement check), then the target's token after them."""
  b, k = draft_bn.shape
  n = jnp.full((b,), k, jnp.int32) if num_b is None else num_b
  return n, gumbel.choose(q_bmv[jnp.arange(b), n], noise_bmv[jnp.arange(b), n])


@pytest.mark.parametrize("coupling", ["rejection", "gumbel"])
def test_accepting_proposals_without_rejection_fails_the_same_test(monkeypatch, coupling):
  monkeypatch.setattr(rejection, "accept", _accept_every_proposal)
  monkeypatch.setattr(gumbel, "verify", _keep_every_gumbel_proposal)
  sampler = Sampler.from_params(ex.target_params(), ex.TARGET,
                                draft_source=NGRAM)  # traces the patch
  result = _run(sampler, None, seed=212, coupling=coupling)
  p, each = ex.exactness_pvalue(ex._full_rows(result).tolist())
  assert p < ex.NEGATIVE_P, f"accepting every proposal passed (p = {p:.2e}; tests: {each})"


# ---------------------------------------------------------------------------------------------
# Input checks.

def test_bad_draft_sources_are_refused():
  with pytest.raises(ValueError, match="draft kind must be one of"):
    DraftSource("suffix")
  with pytest.raises(ValueError, match="ngram_min <= ngram_max"):
    DraftSource("ngram", ngram_max=2, ngram_min=3)
  with pytest.raises(ValueError, match="'hybrid' needs a draft model"):
    Sampler.from_params(ex.target_params(), ex.TARGET, draft_source=HYBRID)
  with pytest.raises(ValueError, match="needs a draft model"):
    Sampler.from_params(ex.target_params(), ex.TARGET).generate([ex.PROMPT], max_new_tokens=4,
                                                                k=2)


# ---------------------------------------------------------------------------------------------
# Through the serving engine.

@pytest.fixture(scope="module")
def sources_engine(single):
  """An engine whose K policy may choose among the draft model, n-gram lookup and hybrid, at
  K = 0 or 2 (tests that set the source and K of each step share its programs)."""
  from spec_tpu.serving import Engine
  return Engine(single.pair, num_slots=8, max_len=40, k=2, k_max=2, max_top_k=4, ks=(0, 2),
                sources=("model", "ngram", "hybrid"))


def test_hybrid_engine_greedy_equals_autoregressive_after_the_draft_catches_up(single,
                                                                               sources_engine):
  # Given an engine drafting with hybrid (the pair's n-gram settings, at K = 2: the file's
  # HYBRID source at K = 3 is the Sampler tests') whose steps run at K = 0 two in every four
  # (the draft model is not run, so it falls behind and must catch up before speculating),
  # requests entering its slots at K = 0 and K = 2 steps alike,
  from spec_tpu.serving import GenerationParams
  n = 64
  prompts = ex.GREEDY_PROMPTS[:n]
  want, clear = ex._greedy_reference(single)
  engine = sources_engine
  requests = [engine.submit(p, GenerationParams(max_new_tokens=ex.MAX_NEW, temperature=0.0))
              for p in prompts]
  steps = 0
  while engine.step(k=(0, 0, 2, 2)[steps % 4], source="hybrid"):
    steps += 1
  # then every request is the target's greedy continuation,
  got = np.array([r.result().tokens for r in requests])
  bad = np.flatnonzero(clear[:n] & np.any(got != want[:n], axis=1))
  assert bad.size == 0, f"{bad.size} rows differ, e.g. {got[bad[0]]} vs {want[bad[0]]}"
  # and the per-request statistics say which source proposed what was accepted.
  stats = [r.stats for r in requests]
  assert all(s.ngram_judged <= s.judged and s.ngram_accepted <= s.accepted for s in stats)
  assert sum(s.ngram_accepted for s in stats) > 0
  assert sum(s.accepted - s.ngram_accepted for s in stats) > 0


def test_ngram_engine_without_draft_model_calibrates_and_serves(single):
  # Given a target with no draft model and n-gram drafting, adaptive K over 0..2,
  from spec_tpu.serving import Engine, GenerationParams
  sampler = Sampler.from_params(ex.target_params(), ex.TARGET, draft_source=NGRAM)
  engine = Engine(sampler.pair, num_slots=8, max_len=40, k=2, k_max=2, max_top_k=4)
  assert engine.ks == (0, 1, 2)
  # when it calibrates and serves greedy requests,
  report = engine.calibrate(rounds=2, repeats=1)
  assert all(report[f"round_s_k{k}"] > 0 for k in engine.ks)
  out = engine.generate(ex.GREEDY_PROMPTS[:8], GenerationParams(max_new_tokens=ex.MAX_NEW,
                                                                temperature=0.0))
  # then each is the target's greedy continuation (at whatever K the policy chose).
  want, clear = (x[:8] for x in ex._greedy_reference(single))
  got = np.array([c.tokens for c in out])
  assert np.array_equal(got[clear], want[clear])


def test_engine_choosing_sources_per_step_runs_the_policys_choice_and_stays_exact(
    single, sources_engine):
  # Given an engine whose K policy chooses among the draft model, n-gram lookup and hybrid,
  from spec_tpu.serving import GenerationParams
  engine = sources_engine
  # when it calibrates, it times a round of every (source, K) and measures each source,
  report = engine.calibrate(rounds=2, repeats=1)
  engine.window_rounds = 10 ** 6  # below, the choice is set by hand and stays
  for src in engine.sources:
    assert report["sources"][src]["judged"] > 0
    assert set(report["sources"][src]["relative_cost"]) == {2}
  assert report["chosen_source"] == engine.source and report["chosen_k"] == engine.k
  prompts, greedy = ex.GREEDY_PROMPTS[:8], GenerationParams(max_new_tokens=ex.MAX_NEW,
                                                            temperature=0.0)
  want, clear = (x[:8] for x in ex._greedy_reference(single))
  # and a policy given round costs where every source can pay (this machine's timings of a
  # tiny pair may favour none),
  from spec_tpu.decoding.k_policy import AdaptiveK
  policy = engine.policy = AdaptiveK(k0=2, k_max=2, ks=engine.ks, sources=engine.sources)
  policy.observe_round_time(0, 1.0)
  for src in engine.sources:
    policy.observe_round_time(2, 1.2, source=src)
  for src, others in [("ngram", "model"), ("model", "ngram")]:
    # when the measured acceptance makes one source the clear winner (the other drafts nothing
    # of use),
    for _ in range(6):  # the estimates average windows: several, to forget the last case
      policy.observe_acceptance(99, 100, source=src)
      for other in (others, "hybrid"):
        policy.observe_acceptance(0, 100, source=other)
    assert policy.source == src and policy.k > 0
    out = engine.generate(prompts, greedy)
    # then every speculative round drafted with that source (n-gram proposals or none),
    stats = [c.stats for c in out]
    accepted = sum(st.accepted for st in stats)
    assert accepted > 0 and sum(st.judged for st in stats) > 0
    if src == "ngram":
      assert sum(st.ngram_accepted for st in stats) == accepted
    else:
      assert sum(st.ngram_judged for st in stats) == 0
    # and the tokens are the target's greedy continuation.
    got = np.array([c.tokens for c in out])
    assert np.array_equal(got[clear], want[clear])
  # Steps that switch source every time (the draft model falls behind in n-gram and K = 0
  # steps and catches up before it drafts again) keep greedy output exact too.
  requests = [engine.submit(p, greedy) for p in prompts]
  for i in range(64):
    if not engine.step(k=(2, 2, 0, 2)[i % 4], source=engine.sources[i % 3]):
      break
  got = np.array([r.result().tokens for r in requests])
  assert np.array_equal(got[clear], want[clear])


def test_choosing_among_sources_needs_adaptive_k(single):
  from spec_tpu.serving import Engine
  with pytest.raises(ValueError, match="needs adaptive_k"):
    Engine(single.pair, num_slots=2, max_len=40, k=2, adaptive_k=False,
           sources=("model", "ngram"))
  no_draft = Sampler.from_params(ex.target_params(), ex.TARGET, draft_source=NGRAM).pair
  with pytest.raises(ValueError, match="needs a draft model"):
    Engine(no_draft, num_slots=2, max_len=40, k=2, sources=("ngram", "model"))


# ---------------------------------------------------------------------------------------------
# Config, launcher and benchmark plumbing.

def test_config_draft_kind_auto_lets_the_policy_choose_among_every_source():
  # Given the tiny random config with draft.kind = auto,
  from configs import tiny_random
  from spec_tpu import setup as setup_lib
  c = tiny_random.get_config()
  c.model.checkpoint = c.draft.checkpoint = ""
  c.draft.kind = "auto"
  c.engine.update(adaptive_k=True, k=2, k_max=2)
  # then the pair drafts as hybrid (it needs the draft model) and the engine's policy chooses
  # among the three kinds,
  assert setup_lib.resolve(c, need_weights=False).draft_source.kind == "hybrid"
  assert setup_lib.engine_settings(c).sources == ("model", "ngram", "hybrid")
  # which needs adaptive K, said in one line.
  c.engine.adaptive_k = False
  with pytest.raises(setup_lib.SetupError, match="draft.kind='auto' needs engine.adaptive_k"):
    setup_lib.engine_settings(c)
  c.draft.kind = "suffix"
  with pytest.raises(setup_lib.SetupError, match="model, ngram, hybrid, auto"):
    setup_lib.resolve(c, need_weights=False)


def test_config_draft_kind_ngram_samples_without_loading_a_draft(tmp_path):
  # Given the tiny random config whose draft section names a checkpoint that does not exist,
  # with draft.kind = ngram,
  import json
  from configs import tiny_random
  from spec_tpu import setup as setup_lib
  from spec_tpu.serving import offline
  c = tiny_random.get_config()
  c.model.checkpoint = ""
  c.draft.update(checkpoint=str(tmp_path / "missing"), allow_random=False, kind="ngram",
                 ngram_max=3, ngram_min=1)
  c.engine.update(num_slots=2, adaptive_k=False, k=2)
  c.sampling.max_new_tokens = 8
  # then the setup has no draft model and the n-gram source,
  setup = setup_lib.resolve(c)
  assert setup.draft is None and setup.draft_source == DraftSource("ngram", 3, 1)
  # and an offline run (launch.sample's) makes speculative rounds with it, recording the
  # source in every line.
  out = tmp_path / "out.jsonl"
  offline.run(c, ["def add(a, b):", "import os"], None, str(out), compare_ar=False,
             multihost=False)
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(lines) == 2 and all(r["stats"]["k"] == 2 for r in lines)
  assert lines[0]["settings"]["draft_source"]["kind"] == "ngram"
  # A bad kind is refused in one line before anything loads.
  c.draft.kind = "suffix"
  with pytest.raises(setup_lib.SetupError, match="draft kind must be one of"):
    setup_lib.resolve(c)


def test_rewrite_prompts_repeat_a_whole_function():
  from spec_tpu.decoding import source_bench
  from spec_tpu.training import corpus
  from spec_tpu.tokenizer import ByteTokenizer
  files = corpus.split(corpus.stdlib_files())[1][:20]
  prompts = source_bench.rewrite_prompts(files, ByteTokenizer(), 3, max_tokens=400)
  assert len(prompts) == 3
  for p in prompts:
    body = p[len(source_bench.REWRITE_HEADER):p.index("\n\n\n")]
    head = body.splitlines()[0]
    assert head.startswith("def ") and p.endswith(f"\n\n\n{head}\n    ")


def test_compare_sources_reports_every_source_and_workload(single):
  # Given a workload that repeats itself and one that does not (toy vocabulary, greedy),
  from spec_tpu.decoding import source_bench
  repeat = [[1, 2, 3, 4, 5, 6, 7] * 2] * 4
  once = [[3, 1, 4, 1]] * 4
  rows = source_bench.compare_sources(single, {"repeat": repeat, "once": once}, k=2,
                                      max_new_tokens=6, sampling=ex.GREEDY, ngram_min=1,
                                      sources=("none", "ngram", "hybrid"), repeats=1)
  # then every (workload, source) has a row, AR is the baseline, and proposals were judged.
  assert [(r["workload"], r["source"]) for r in rows] == [
      (w, s) for w in ("repeat", "once") for s in ("none", "ngram", "hybrid")]
  for r in rows:
    assert r["tokens_per_target_call"] >= 1 and r["tokens_per_s"] > 0
    assert (r["source"] == "none") == (r["k"] == 0)
  assert all(r["speedup"] == 1.0 for r in rows if r["source"] == "none")
  by = {(r["workload"], r["source"]): r for r in rows}
  assert by[("repeat", "ngram")]["ngram_share"] > 0.5
  assert by[("repeat", "ngram")]["tokens_per_target_call"] > 1.2  # AR: 1
  assert 0 < by[("repeat", "hybrid")]["ngram_share"] <= 1.0
  assert "tok/call" in source_bench.format_table(rows)
  with pytest.raises(ValueError, match="unknown draft sources"):
    source_bench.compare_sources(single, {"x": once}, k=2, max_new_tokens=4, sources=["eagle"])
