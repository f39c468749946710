"""The assistant draft source (Gemma 4's drafter reading the target's caches) keeps speculative
sampling exact through the Sampler and the serving Engine, with sampled drafts and with greedy
(one-hot) drafts, and a wrong claim about the draft's distribution fails the same test.

Target and statistics are test_exactness's (V = 8, enumerated law, sequential martingale test);
the assistant is a random two-layer drafter over the target's local and global caches, the
draft of a Pair (its draft source then is 'assistant').
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_exactness as ex
from spec_tpu.decoding import decode
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import assistant, model
from spec_tpu.models import cache as cache_lib
from spec_tpu.models.config import GLOBAL, LOCAL, ModelConfig
from spec_tpu.pair import Pair
from spec_tpu.serving import Engine, GenerationParams
from spec_tpu.sharding import make_mesh

K = 3
ASSISTANT = assistant.AssistantConfig(
    layers=ModelConfig(name="exact_assistant", vocab_size=ex.V, d_model=12, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=4, ffw_dim=24, qk_norm=True,
                       post_attn_norm=True, post_ffw_norm=True, layer_scalar=True,
                       layer_pattern=(LOCAL, GLOBAL), sliding_window=3, query_scale=1.0,
                       tokenizer="toy"),
    backbone_d_model=ex.TARGET.d_model)


@functools.lru_cache(maxsize=None)
def assistant_params():
  p = jax.jit(model.init_params, static_argnums=0)(ASSISTANT, jax.random.key(7))  # one program
  return dict(p, embed=p["embed"] * 3.0)  # a sharper q, far from uniform


def pair() -> Pair:
  return Pair(ex.target_params(), ex.TARGET, draft_params=assistant_params(),
              draft_cfg=ASSISTANT)


@functools.lru_cache(maxsize=None)
def one_device() -> Sampler:
  """The pair on one device; its compiled programs are shared by the module's unpatched runs."""
  return Sampler(pair())


def _run(greedy_drafts: bool, seed: int, temperature=1.0, top_k=0, top_p=1.0, sampler=None):
  # By default a Sampler of its own (a monkeypatched rule rebinds a module-level name, so the
  # process's program cache traces its programs afresh).
  result = (sampler or Sampler(pair())).generate(
      [ex.PROMPT] * ex.BATCH, max_new_tokens=ex.MAX_NEW, k=K, seed=seed,
      sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
      draft_source=DraftSource("assistant", greedy=greedy_drafts))
  assert result.draft_kind == "assistant"
  assert {len(t) for t in result.tokens} == {ex.MAX_NEW}
  return result.tokens, ex.judged_acceptance(result), result.accepted


@functools.lru_cache(maxsize=None)
def _runs(greedy_drafts: bool, seed: int, temperature=1.0, top_k=0, top_p=1.0):
  """_run on the shared one-device Sampler, each run once (tests asking different questions of
  one run share it)."""
  return _run(greedy_drafts, seed, temperature, top_k, top_p, sampler=one_device())


@pytest.mark.parametrize("greedy_drafts", [False, True], ids=["sampled", "one_hot"])
def test_assistant_drafts_follow_target_law(greedy_drafts):
  rows, acceptance, accepted = _runs(greedy_drafts, seed=11)
  p, each = ex.exactness_pvalue(rows)
  assert p > ex.ALPHA, f"output departs from the target law (p = {p:.2e}; tests: {each})"
  # Not vacuous: both the accept and the residual paths carry thousands of events.
  assert 0.05 < acceptance < 0.95 and len(np.unique(accepted)) > 1, acceptance


def test_assistant_with_filters_follows_filtered_law():
  options = dict(temperature=0.7, top_k=3, top_p=0.9)
  rows, _, _ = _runs(False, 12, *[options[k] for k in ("temperature", "top_k", "top_p")])
  p, each = ex.exactness_pvalue(rows, **options)
  assert p > ex.ALPHA, f"output departs from the filtered law (p = {p:.2e}; tests: {each})"


def test_acceptance_sampled_vs_one_hot_drafts():
  """Measured at T = 1 on this random pair (printed for the docs): acceptance is sum min(p, q)
  with sampled drafts and q(argmax p) with one-hot drafts."""
  _, sampled, _ = _runs(False, seed=11)
  _, one_hot, _ = _runs(True, seed=11)
  print(f"judged acceptance at T=1, K={K}: sampled drafts {sampled:.3f}, "
        f"one-hot drafts {one_hot:.3f}")
  assert 0 < sampled < 1 and 0 < one_hot < 1


def test_claiming_a_wrong_draft_distribution_fails(monkeypatch):
  """Negative control: one-hot drafts whose p is reported as uniform (so acceptance uses the
  wrong ratio) must fail the same test decisively."""
  original = decode._draft_assistant

  def wrong(*args, **kw):
    draft_bn, p_bnv = original(*args, **kw)
    return draft_bn, jnp.full_like(p_bnv, 1.0 / p_bnv.shape[-1])

  monkeypatch.setattr(decode, "_draft_assistant", wrong)
  rows, _, _ = _run(True, seed=13)
  p, _ = ex.exactness_pvalue(rows)
  assert p < ex.NEGATIVE_P


def test_greedy_speculative_equals_greedy_autoregressive():
  rows, _, _ = _runs(False, 14, 0.0)
  want = one_device().generate([ex.PROMPT] * 2, max_new_tokens=ex.MAX_NEW, k=0,
                               sampling=SamplingParams(temperature=0.0)).tokens[0]
  assert all(r == want for r in rows)


@jax.jit
def _final_hidden(tokens_bs, length_b):
  cache = cache_lib.init_cache(ex.TARGET, tokens_bs.shape[0], tokens_bs.shape[1], 1)
  return model.forward(ex.target_params(), ex.TARGET, tokens_bs, cache, length_b,
                       last_only=True, final_hidden=True)[-1][:, 0]


def _check_hidden_states(engine):
  """Every live row's hidden state in the engine is the target's final hidden state at the
  last position its cache holds (the one that produced the row's pending token), recomputed
  from the row's tokens alone: inserts, rollbacks, K = 0 rounds and reused slots all keep it."""
  state = engine._state
  live = np.flatnonzero(~np.asarray(state.done_b))
  assert live.size > 10
  want = np.asarray(_final_hidden(state.tokens_bs, state.target_cache.length))[live]
  got = np.asarray(state.target_hidden_bd)[live]
  np.testing.assert_allclose(got, want, atol=1e-5)


ENGINE_ROWS = ex.BATCH  # per group, as many as the Sampler cases above


@pytest.mark.slow
def test_engine_with_the_assistant_follows_the_target_law():
  """Given an engine with the assistant as its draft and the controls compiled in (as
  launch.serve builds it), its slots kept busy by ragged filler requests so slots are reused
  and rows sit at other positions, and every fourth step run at K = 0 (the assistant must
  start the next K = 3 round from the target's current hidden state), when plain requests at
  T = 1 and requests with every control at once run through it, then each group follows its
  enumerated law (all MAX_NEW tokens for the plain ones, sequentially; the first L with the
  controls), and the assistant was judged and sometimes rejected."""
  import test_engine as te
  engine = Engine(pair(), num_slots=128, max_len=32, k=K, adaptive_k=False, max_top_k=4,
                  prefill_rows=4, controls=True, max_logit_bias=4)
  assert engine.draft_source.kind == "assistant"
  rng = np.random.default_rng(3)
  fillers = iter(te._fillers(rng, ENGINE_ROWS))
  plain, controlled = [], []
  for i in range(ENGINE_ROWS):
    plain.append(engine.submit(ex.PROMPT, GenerationParams(
        max_new_tokens=ex.MAX_NEW, temperature=1.0, seed=int(rng.integers(2 ** 63)))))
    controlled.append(engine.submit(ex.PROMPT, GenerationParams(
        max_new_tokens=ex.L, seed=int(rng.integers(2 ** 63)), **te.CONTROLS)))
    if i % 2:
      engine.submit(*next(fillers))
  steps = 0
  while engine.step(k=0 if steps % 4 == 3 else None):
    if steps in (3, 4, 9):  # after a K = 0 step, and after K = 3 steps
      _check_hidden_states(engine)
    steps += 1
  p, each = ex.exactness_pvalue([r.result().tokens for r in plain], temperature=1.0)
  assert p > ex.ALPHA, f"plain requests depart from the target law (p={p:.2e}; {each})"
  tokens = np.array([r.result().tokens for r in controlled])
  p = ex.law_pvalues(tokens, te._controlled_law(te.CONTROLS))
  assert min(p) > ex.ALPHA, p
  stats = [r.stats for r in plain]
  assert 0.05 < sum(s.accepted for s in stats) / sum(s.judged for s in stats) < 0.95
  assert sum(s.ks == (0, K) for s in stats) > 100  # rows lived through both kinds of step


@pytest.mark.slow
def test_assistant_on_a_2x4_mesh_follows_the_filtered_law():
  """Given target and assistant on a 2x4 mesh (rows over 2; heads, ffw and vocab over 4 in the
  target's and the assistant's params alike, by the same rules), then
  sampled drafts at T < 1 with top-k and top-p follow the filtered law, and greedy decoding of
  distinct prompts (the same compiled program: the filters never drop the argmax) equals one
  device's row for row, so no row reads another's hidden state or cache across the mesh."""
  options = dict(temperature=0.7, top_k=3, top_p=0.9)
  sampler = Sampler(Pair(ex.target_params(), ex.TARGET, mesh=make_mesh((2, 4)),
                         draft_params=assistant_params(), draft_cfg=ASSISTANT))
  result = sampler.generate([ex.PROMPT] * ex.BATCH, max_new_tokens=ex.MAX_NEW, k=K, seed=15,
                            sampling=SamplingParams(**options),
                            draft_source=DraftSource("assistant"))
  assert result.draft_kind == "assistant"
  p, each = ex.exactness_pvalue(result.tokens, **options)
  assert p > ex.ALPHA, f"output on 2x4 departs from the filtered law (p = {p:.2e}; tests: {each})"
  assert 0.05 < ex.judged_acceptance(result) < 0.95 and len(np.unique(result.accepted)) > 1

  prompts = np.random.default_rng(5).integers(0, ex.V, (ex.BATCH, len(ex.PROMPT))).tolist()
  greedy = np.array(sampler.generate(
      prompts, max_new_tokens=ex.MAX_NEW, k=K,
      sampling=SamplingParams(**dict(options, temperature=0.0)),
      draft_source=DraftSource("assistant")).tokens)
  alone = np.array(one_device().generate(
      prompts, max_new_tokens=ex.MAX_NEW, k=K, sampling=SamplingParams(temperature=0.0),
      draft_source=DraftSource("assistant")).tokens)
  assert len({tuple(r) for r in alone.tolist()}) > 100  # the rows differ
  # Sharded reductions round differently: a near-tie of the target's logits may flip, rarely.
  assert np.mean(np.all(greedy == alone, axis=1)) > 0.995
