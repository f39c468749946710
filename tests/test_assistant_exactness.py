"""The assistant draft source (Gemma 4's drafter reading the target's caches) keeps speculative
sampling exact, with sampled drafts and with greedy (one-hot) drafts, and a wrong claim about
the draft's distribution fails the same test.

Target and statistics are test_exactness's (V = 8, enumerated law, sequential martingale test);
the assistant is a random two-layer drafter over the target's local and global caches, run by
decode.generate directly (the draft source has no Sampler wiring yet).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_exactness as ex
from spec_tpu.decoding import decode
from spec_tpu.models import assistant
from spec_tpu.models.config import GLOBAL, LOCAL, ModelConfig

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
  p = assistant.init_params(ASSISTANT, jax.random.key(7))
  return dict(p, embed=p["embed"] * 3.0)  # a sharper q, far from uniform


def _run(greedy_drafts: bool, seed: int, temperature=1.0, top_k=0, top_p=1.0, slack=2):
  # slack: spare positions; another value makes another program (jit caches traces by the
  # function and its static arguments, so a monkeypatched rule needs a spec of its own).
  spec = decode.LoopSpec(target=ex.TARGET, draft=None, k=K, k_max=K, max_top_k=ex.V,
                         max_len=len(ex.PROMPT) + ex.MAX_NEW + K + slack,
                         out_len=ex.MAX_NEW + K,
                         eos_ids=(), assistant=ASSISTANT, greedy_drafts=greedy_drafts)
  tokens = jnp.tile(jnp.asarray(ex.PROMPT, jnp.int32), (ex.BATCH, 1))
  lengths = jnp.full((ex.BATCH,), len(ex.PROMPT), jnp.int32)
  run = jax.jit(decode.generate, static_argnums=0)
  out, num, stats = run(spec, ex.target_params(), assistant_params(), tokens, lengths,
                        np.float32(temperature), np.float32(top_p), np.int32(top_k), seed)
  assert set(np.asarray(num).tolist()) == {ex.MAX_NEW}
  acceptance = float(stats.accepted_bn.sum() / stats.reached_bn.sum())
  return [list(r) for r in np.asarray(out)], acceptance, np.asarray(stats.accepted_b)


_runs = functools.lru_cache(maxsize=None)(_run)


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
  rows, _, _ = _run(True, seed=13, slack=3)
  p, _ = ex.exactness_pvalue(rows)
  assert p < ex.NEGATIVE_P


def test_greedy_speculative_equals_greedy_autoregressive():
  rows, _, _ = _runs(False, 14, 0.0)
  spec = decode.LoopSpec(target=ex.TARGET, draft=None, k=0, k_max=0, max_top_k=ex.V,
                         max_len=len(ex.PROMPT) + ex.MAX_NEW + 2, out_len=ex.MAX_NEW,
                         eos_ids=())
  tokens = jnp.tile(jnp.asarray(ex.PROMPT, jnp.int32), (2, 1))
  out, _, _ = jax.jit(decode.generate, static_argnums=0)(
      spec, ex.target_params(), None, tokens, jnp.full((2,), len(ex.PROMPT), jnp.int32),
      np.float32(0.0), np.float32(1.0), np.int32(0), 0)
  want = np.asarray(out)[0].tolist()
  assert all(r == want for r in rows)
