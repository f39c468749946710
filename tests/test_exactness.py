"""Speculative sampling is exact: its output follows the target's distribution, whatever the draft.

Statistical suite on a toy vocabulary, where the target's law can be computed exactly:

  given  a target and a DIFFERENT draft (about 60% of judged drafts accepted, so both the accept
         and the residual paths carry real mass), one fixed prompt repeated over BATCH rows,
  when   the sampler generates MAX_NEW tokens per row,
  then   (law) the first L tokens pass Pearson's chi-square goodness of fit against the law
         enumerated over all V**L continuations with `model.forward_full` (no cache, no loop):
         tokens 1-3 and tokens 3-5, 512 cells each, cells expected below 5 pooled;
  and    (sequential) every generated token, rank and id, fits the target's conditional
         distribution given its own row's prefix (a martingale chi-square, see
         `sequential_pvalues`). The law tests alone see only the first round or two: a cache
         rollback bug that corrupts later rounds passed them and failed this one.

False alarms. The four p-values of a case are Bonferroni-combined, so a correct sampler fails a
case with nominal probability <= ALPHA = 1e-4. Both tests are approximations (pooled Pearson;
martingale CLT over ~12k tokens): multinomial draws from the exact law fail the pooled Pearson
test at nominal 1e-3 about 1.2-2.2e-3 of the time (1.2e-3 for both marginals at 1000 rows, 20k
draws), so count ~3e-4 per case. The suite has 19 such cases (speculative, autoregressive,
sharded, EOS, unit tests of `accept`; six of them with the gumbel coupling): a correct
implementation trips one with probability ~6e-3 at most for a given set of random streams.
Seeds are fixed, so CI is deterministic: a spurious failure could only appear when something
changes the streams (key splitting, XLA version), and then with that small probability. Power:
the negative controls (deliberately wrong acceptance rules, and for the gumbel coupling noise
not indexed by position or the draft's token kept at a disagreement; same statistics) must get
p < NEGATIVE_P = 1e-9.

Why BATCH = 1000. Rows cost time linearly, so BATCH is the smallest round number at which a
bug with HALF the noncentrality of the weakest negative control (a deviation from the law about
0.7x the control's: noncentrality grows as rows x deviation^2) would still fail at NEGATIVE_P.
Noncentrality grows linearly with the rows, so half of it on n rows is the control itself on
n/2 rows. Each control's combined p-value, recomputed on disjoint chunks of n of its own rows
(3000-row runs; the worst chunk, of 12 at n = 250 and of 3 at n = 1000; 2-core CPU,
2026-12-06):
The weakest, the recurrent rollback, reaches 1e-9 at about 400 rows (1e-9.5 there), so a bug
with half its noncentrality needs about 800: BATCH = 1000. (A deviation half the control's,
a quarter of its noncentrality, would need about 1600.) The two controls that share a batch get half of
it each (500 rows: 1e-73 and below). The pooled Pearson test keeps its calibration at 1000
rows (~2 draws per cell of 512 before pooling; false alarms as above, 0.9-1.7e-3 at nominal
1e-3 with 3000 rows).

Near-ties. Greedy equality is token for token except where the target's two best logits are
within GREEDY_MARGIN along the path: there the float32 evaluation order (one token vs K+1 tokens
per call, sharded reductions) legitimately decides the argmax. Such rows are excluded and must be
under 1% of the batch.

Compile budget: every case reuses one of a few compiled programs (same batch, prompt bucket and
MAX_NEW; temperature and top-p are traced), and the greedy tests reuse the sampling programs.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import layout, model
from spec_tpu.decoding import gumbel, rejection, sampling
from spec_tpu.models.config import GLOBAL, LOCAL, RECURRENT, ModelConfig
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.sharding import REPLICATED, make_mesh

V = 8                     # vocabulary: small enough to enumerate V**L continuations
PROMPT = (3, 1, 4, 1)
L = 5                     # tokens whose joint law is enumerated exactly
MAX_NEW = 12              # generated per row: the first L against the enumerated law, all
                          # of them against the target's conditionals (several rounds each)
BATCH = 1000              # rows per statistical case: the docstring says why this many
ALPHA = 1e-4              # false-alarm rate per chi-square case
NEGATIVE_P = 1e-9         # a wrong rule must be rejected this decisively
GREEDY_MARGIN = 1e-4
# Two EOS ids (as Llama 3 instruct's <|end_of_text|> and <|eot_id|>): together ~0.07-0.11 per
# step under the target, so rows stop at varied times, each id ending some of them.
EOS_IDS = (5, 4)

# Target: Llama-style with a sliding-window layer (window 3 < prompt + new tokens, so the ring
# cache wraps and is rolled back). Draft: same shapes, all-global layers, params mixed with an
# independent random model; distributions differ noticeably (acceptance ~0.6, checked below).
TARGET = ModelConfig(name="exact_target", vocab_size=V, d_model=16, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=4, ffw_dim=32, tie_embeddings=False,
                     layer_pattern=(LOCAL, GLOBAL), sliding_window=3, tokenizer="toy")
DRAFT = TARGET.replace(name="exact_draft", layer_pattern=(GLOBAL,), sliding_window=None)
# The draft with a padded embedding table: 4 extra rows that would dominate if ever sampled.
PADDED_DRAFT = DRAFT.replace(name="exact_draft_padded", vocab_size=V + 4, valid_vocab_size=V)

SHARPNESS = 2.0  # scales embed/unembed: entropy ~1.2-1.8 nats of a possible 2.08
DRAFT_MIX = 0.3  # draft = 0.7 * target + 0.3 * other random model


def _scaled(params):
  return dict(params, embed=params["embed"] * SHARPNESS, unembed=params["unembed"] * SHARPNESS)


@functools.lru_cache(maxsize=None)
def target_params():
  return _scaled(model.init_params(TARGET, jax.random.key(1)))


@functools.lru_cache(maxsize=None)
def draft_params():
  other = _scaled(model.init_params(DRAFT, jax.random.key(2)))
  # The target's layers, grouped for the draft's (all-global) pattern.
  target = layout.regroup(target_params(), TARGET, DRAFT, jnp.stack)
  return jax.tree.map(lambda t, o: (1 - DRAFT_MIX) * t + DRAFT_MIX * o, target, other)


# Recurrent (Griffin): a RecurrentGemma-shaped target (recurrent, recurrent, local; partial
# RoPE, biases), window 3 so continuations cross it, and a recurrent draft of the same shapes
# (target mixed with another random model), so both rollbacks by selection are exercised.
RG_TARGET = ModelConfig(name="exact_rg_target", vocab_size=V, d_model=16, num_layers=3,
                        num_heads=4, num_kv_heads=1, head_dim=4, ffw_dim=32,
                        ffw_activation="geglu", norm_plus_one=True, tie_embeddings=False,
                        scale_embeddings=True, embed_scale_dtype="bfloat16",
                        layer_pattern=(RECURRENT, RECURRENT, LOCAL), sliding_window=3,
                        rope_fraction=0.5, ffw_bias=True, attn_out_bias=True, lru_width=16,
                        tokenizer="toy")
RG_DRAFT = RG_TARGET.replace(name="exact_rg_draft")


@functools.lru_cache(maxsize=None)
def rg_target_params():
  return _scaled(model.init_params(RG_TARGET, jax.random.key(4)))


@functools.lru_cache(maxsize=None)
def rg_draft_params():
  other = _scaled(model.init_params(RG_DRAFT, jax.random.key(5)))
  return jax.tree.map(lambda t, o: (1 - DRAFT_MIX) * t + DRAFT_MIX * o, rg_target_params(), other)


# Models whose law the tests enumerate, by name: (config, params function). tests/test_quant.py
# adds the int8-quantized target, whose law is the one an int8 sampler must follow.
LAW_MODELS = {"attention": (TARGET, target_params), "recurrent": (RG_TARGET, rg_target_params)}


# Prompts other than PROMPT, by target name: (token ids, soft tokens function (1 m d) or None).
# tests/test_vision_sampling.py adds an image prompt, whose law is the target's given the image.
LAW_PROMPTS = {}


def _target(name):
  """(config, params) of the target the statistics are computed against."""
  return LAW_MODELS[name]


def _prompt(name):
  """(prompt ids, soft tokens or None) the named target's law is conditioned on."""
  prompt, soft = LAW_PROMPTS.get(name, (PROMPT, None))
  return tuple(prompt), (None if soft is None else soft())


def _padded(params):
  # Padding rows/columns with large weights: an unmasked padding logit would win every draw.
  big = 10.0 * jax.random.normal(jax.random.key(3), (4, TARGET.d_model))
  return dict(params, embed=jnp.concatenate([params["embed"], big]),
              unembed=jnp.concatenate([params["unembed"], big.T], axis=1))


# ---------------------------------------------------------------------------------------------
# Exact law and the goodness-of-fit test.

CONTINUATIONS = np.array(list(itertools.product(range(V), repeat=L)), np.int32)  # V**L x L


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "prompt"))
def _law_device(params, cfg, temperature, top_p, top_k, continuations, prompt=PROMPT, soft=None):
  # continuations is an argument, not a constant: XLA would constant-fold work on the whole
  # V**L x tokens array at compile time (13 s for an image prompt's placeholder positions).
  n = len(continuations)
  tokens = jnp.concatenate([jnp.tile(jnp.asarray(prompt, jnp.int32), (n, 1)), continuations],
                           axis=1)
  soft = None if soft is None else jnp.broadcast_to(soft, (n,) + soft.shape[1:])
  # Causal: the logits at prompt end + i depend only on the first i continuation tokens.
  logits = model.forward_full(params, cfg, tokens, soft=soft)[:, len(prompt) - 1:-1]
  probs = sampling.probabilities(logits, temperature, top_k, top_p)
  step = jnp.take_along_axis(probs, continuations[..., None], axis=-1)[..., 0]
  return jnp.prod(step.astype(jnp.float32), axis=1)


@functools.lru_cache(maxsize=None)
def exact_law(temperature=1.0, top_k=0, top_p=1.0, target="attention"):
  """P(first L tokens) under the target with the sampler's filters: an array of shape (V,)*L."""
  cfg, params = _target(target)
  top_k = SamplingParams(top_k=top_k).effective_top_k(cfg.num_tokens)
  prompt, soft = _prompt(target)
  law = np.asarray(_law_device(params(), cfg, np.float32(temperature), np.float32(top_p),
                               top_k, CONTINUATIONS, prompt, soft), np.float64)
  assert abs(law.sum() - 1) < 1e-4
  return (law / law.sum()).reshape((V,) * L)


def chi_square_pvalue(counts, probs, min_expected=5.0):
  """Pearson's goodness of fit of counts to probs (same cells).

  Cells expected below min_expected are pooled into one (the chi-square approximation needs
  ~5 per cell); if that pool is still small it joins the smallest other cell. An observation in
  a cell of probability exactly 0 (e.g. a token outside top-k) is impossible: p-value 0.
  """
  counts = np.asarray(counts, np.float64).ravel()
  probs = np.asarray(probs, np.float64).ravel()
  if np.any(counts[probs == 0] > 0):
    return 0.0
  expected = counts.sum() * probs / probs.sum()
  rare = expected < min_expected
  obs, exp = list(counts[~rare]), list(expected[~rare])
  if rare.any():
    obs.append(counts[rare].sum())
    exp.append(expected[rare].sum())
    if exp[-1] < min_expected and len(exp) > 2:
      i = int(np.argmin(exp[:-1]))
      obs[i] += obs.pop()
      exp[i] += exp.pop()
  obs, exp = np.array(obs), np.array(exp)
  statistic = float(np.sum((obs - exp) ** 2 / exp))
  return float(stats.chi2.sf(statistic, len(exp) - 1))


def _cells(tokens_bl):
  return np.ravel_multi_index(tuple(np.asarray(tokens_bl).T), (V,) * tokens_bl.shape[1])


def law_pvalues(tokens_bl, law):
  """Tokens 1-3 and tokens 3-5 against the exact law (two p-values)."""
  first = np.bincount(_cells(tokens_bl[:, :3]), minlength=V ** 3)
  last = np.bincount(_cells(tokens_bl[:, 2:5]), minlength=V ** 3)
  return [chi_square_pvalue(first, law.sum(axis=(3, 4))),
          chi_square_pvalue(last, law.sum(axis=(0, 1)))]


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "prompt_len"))
def _conditionals_device(params, cfg, seqs_bt, temperature, top_p, top_k, prompt_len=len(PROMPT),
                         soft=None):
  soft = None if soft is None else jnp.broadcast_to(soft, (seqs_bt.shape[0],) + soft.shape[1:])
  logits = model.forward_full(params, cfg, seqs_bt, soft=soft)[:, prompt_len - 1:-1]
  return sampling.probabilities(logits, temperature, top_k, top_p)


def sequential_pvalues(rows, temperature=1.0, top_k=0, top_p=1.0, target="attention"):
  """Every generated token against the target's q(. | the row's own prefix): two p-values.

  The enumerated law only reaches the first L tokens, i.e. the first round or two; this test
  covers all MAX_NEW tokens, so every round, rollback and ring-cache wrap. For each emitted token
  x_t, count which category it falls in (its rank under q, and its id) and subtract the
  expected count sum_t q_t. Under exactness that difference is a martingale, so with Sigma = sum_t
  (diag(q_t) - q_t q_t^T) the statistic d' Sigma^+ d is asymptotically chi-square with
  rank(Sigma) degrees of freedom (martingale CLT; ~30k tokens here). A token with q = 0 is
  impossible: p-value 0.
  """
  prompt, soft = _prompt(target)
  seqs = np.zeros((len(rows), len(prompt) + MAX_NEW), np.int32)
  real = np.zeros((len(rows), MAX_NEW), bool)  # rows stopped by EOS are shorter
  for i, row in enumerate(rows):
    seqs[i, :len(prompt) + len(row)] = prompt + tuple(row)
    real[i, :len(row)] = True
  cfg, params = _target(target)
  top_k = SamplingParams(top_k=top_k).effective_top_k(cfg.num_tokens)
  q = np.asarray(_conditionals_device(params(), cfg, seqs, np.float32(temperature),
                                      np.float32(top_p), top_k, len(prompt), soft),
                 np.float64)[real]
  x = seqs[:, len(prompt):][real]
  if np.any(q[np.arange(len(x)), x] == 0):
    return [0.0, 0.0]
  order = np.argsort(-q, axis=-1, kind="stable")
  rank = np.argmax(order == x[:, None], axis=-1)
  pvalues = []
  for probs, category in [(np.take_along_axis(q, order, axis=-1), rank), (q, x)]:
    d = np.bincount(category, minlength=V) - probs.sum(axis=0)
    sigma = np.diag(probs.sum(axis=0)) - probs.T @ probs
    dof = np.linalg.matrix_rank(sigma, tol=1e-9 * np.abs(sigma).max())
    statistic = d @ np.linalg.pinv(sigma, rcond=1e-9, hermitian=True) @ d
    pvalues.append(float(stats.chi2.sf(statistic, dof)))
  return pvalues


def exactness_pvalue(rows, target="attention", **options):
  """Bonferroni combination of the two law tests and the two sequential tests (rows: token
  lists of full length MAX_NEW) against the named target's law."""
  tokens = np.array(rows)
  pvalues = (law_pvalues(tokens[:, :L], exact_law(**options, target=target))
             + sequential_pvalues(rows, **options, target=target))
  return min(1.0, len(pvalues) * min(pvalues)), pvalues


def judged_acceptance(result):
  """Accepted / judged draft tokens: how often the draft agrees with the target, whatever K
  (drafts after a rejection are never judged, so accepted / proposed would shrink with K)."""
  return result.accepted_at.sum() / result.reached.sum()


def _full_rows(result):
  lengths = {len(t) for t in result.tokens}
  assert lengths == {MAX_NEW}, f"rows should all run to max_new_tokens, got lengths {lengths}"
  return np.array(result.tokens)


# ---------------------------------------------------------------------------------------------
# Samplers, one per compiled setup, shared by the whole module.

@pytest.fixture(scope="module")
def single():
  return Sampler.from_params(target_params(), TARGET, draft_params=draft_params(), draft_cfg=DRAFT)


@pytest.fixture(scope="module")
def sharded_2x4():
  # Target tensor-parallel (heads, ffw and vocab over 4); the padded draft replicated.
  return Sampler.from_params(target_params(), TARGET, mesh=make_mesh((2, 4)),
                 draft_params=_padded(draft_params()), draft_cfg=PADDED_DRAFT,
                 draft_rules=REPLICATED)


@pytest.fixture(scope="module")
def sharded_1x8():
  # Both tensor-parallel over 8 (vocab split 8 ways; heads don't divide, so they replicate).
  return Sampler.from_params(target_params(), TARGET, mesh=make_mesh((1, 8)), draft_params=draft_params(),
                 draft_cfg=DRAFT)


@pytest.fixture(scope="module")
def with_eos():
  return Sampler.from_params(target_params(), TARGET, draft_params=draft_params(), draft_cfg=DRAFT, eos_ids=EOS_IDS)


def _same_prompt(sampler, k, seed, coupling="rejection", **sampling_kw):
  return _same_prompt_cached(sampler, k, seed, coupling, tuple(sorted(sampling_kw.items())))


@functools.lru_cache(maxsize=None)
def _same_prompt_cached(sampler, k, seed, coupling, sampling_items):
  # Cached so tests asking different questions of one run do not pay for it twice.
  return sampler.generate([PROMPT] * BATCH, max_new_tokens=MAX_NEW, k=k,
                          sampling=SamplingParams(**dict(sampling_items)), seed=seed,
                          coupling=coupling)


# ---------------------------------------------------------------------------------------------
# Exactness of the whole loop.

CASES = [  # id, k, sampling options
    ("autoregressive", 0, {}),
    ("k1", 1, {}),
    ("k3", 3, {}),
    ("k3_temperature_0.7", 3, {"temperature": 0.7}),
    ("k3_top_p_0.8", 3, {"top_p": 0.8}),
    ("k3_top_k_3", 3, {"top_k": 3}),
    ("k3_top_k_3_top_p_0.9_temperature_0.7", 3, {"top_k": 3, "top_p": 0.9, "temperature": 0.7}),
    ("k5", 5, {}),
]
# The gumbel coupling: a representative subset (its K = 0 is plain decoding with other noise,
# and test_coupling.py shows its tokens equal at every K).
GUMBEL_CASES = [
    ("gumbel_k3", 3, {}),
    ("gumbel_k3_temperature_0.7", 3, {"temperature": 0.7}),
    ("gumbel_k3_top_k_3_top_p_0.9_temperature_0.7", 3,
     {"top_k": 3, "top_p": 0.9, "temperature": 0.7}),
]


def _seed(k, options):
  return 100 + 10 * k + len(options)


@pytest.mark.parametrize("k,options,coupling",
                         [c[1:] + ("rejection",) for c in CASES]
                         + [c[1:] + ("gumbel",) for c in GUMBEL_CASES],
                         ids=[c[0] for c in CASES + GUMBEL_CASES])
def test_output_follows_target_law(single, k, options, coupling):
  # Given one prompt on every row; when sampling MAX_NEW tokens; then they follow the target.
  result = _same_prompt(single, k, seed=_seed(k, options), coupling=coupling, **options)
  p, each = exactness_pvalue(_full_rows(result), **options)
  assert p > ALPHA, f"output departs from the target law (p = {p:.2e}; tests: {each})"
  if k:
    # Not vacuous: the draft differs from the target, and rows accept different amounts.
    assert 0.2 < judged_acceptance(result) < 0.9, judged_acceptance(result)
    assert len(np.unique(result.accepted)) > 1


def test_rows_sample_independently(single):
  # Given one key for the whole batch; then two rows agree on their first 2 tokens as often as
  # two independent draws would (sum of the squared law, ~5%), not more. (Rows sharing random
  # numbers would also inflate the chi-square statistics above.)
  tokens = _full_rows(_same_prompt(single, 3, seed=_seed(3, {})))[:, :2]
  law = exact_law().sum(axis=(2, 3, 4))
  collisions = int(np.sum(np.all(tokens[0::2] == tokens[1::2], axis=1)))
  p_collide = float(np.sum(law ** 2))
  test = stats.binomtest(collisions, BATCH // 2, p_collide)
  assert test.pvalue > ALPHA, (collisions, BATCH // 2 * p_collide)


@pytest.mark.parametrize("coupling", ["rejection", "gumbel"])
def test_sharded_target_with_padded_replicated_draft_follows_target_law(sharded_2x4, single,
                                                                         coupling):
  # Given a 2x4 mesh, the target tensor-parallel, and a replicated draft whose embedding table
  # has 4 padding rows with huge weights; then padding ids never appear and the law holds.
  result = _same_prompt(sharded_2x4, 3, seed=11, coupling=coupling)
  tokens = _full_rows(result)
  assert np.max(tokens) < V, "a padding id of the draft's embedding table was emitted"
  p, each = exactness_pvalue(tokens)
  assert p > ALPHA, f"output departs from the target law (p = {p:.2e}; tests: {each})"
  assert 0.2 < judged_acceptance(result) < 0.9
  assert len(np.unique(result.accepted)) > 1
  if coupling == "gumbel":
    # The mesh and the draft's padding do not change a seed's tokens: one device, same seed.
    # (Sharded reductions round differently: a near-tie of log q + G may flip, rarely.)
    one_device = _full_rows(_same_prompt(single, 3, seed=11, coupling=coupling))
    assert np.mean(np.all(tokens == one_device, axis=1)) > 0.995


@pytest.mark.parametrize("coupling", ["rejection", "gumbel"])
def test_rows_stop_at_their_own_eos_and_truncated_law_holds(with_eos, coupling):
  # Given two EOS ids; then each row ends at its first token that is either (nothing after
  # it), rows end at different times and on each id, and the truncated output follows the
  # target law pushed through truncation.
  result = _same_prompt(with_eos, 3, seed=12, coupling=coupling)
  for row in result.tokens:
    assert not set(EOS_IDS) & set(row[:-1]), "a token was emitted after EOS"
    assert len(row) == MAX_NEW or row[-1] in EOS_IDS
  lengths = np.array([len(t) for t in result.tokens])
  assert len(np.unique(lengths)) > 3
  ends = [row[-1] for row in result.tokens if len(row) < MAX_NEW]
  assert all(ends.count(i) > BATCH // 50 for i in EOS_IDS), np.bincount(ends)

  law = exact_law().reshape(-1)
  is_eos = np.isin(CONTINUATIONS, EOS_IDS)
  stop = np.where(is_eos.any(axis=1), np.argmax(is_eos, axis=1), L)  # index of first EOS
  # Tokens 1-3 with everything from the position after EOS replaced by a marker V.
  def truncated_first3(seqs, stop_at):
    keep = np.arange(3)[None, :] <= stop_at[:, None]
    return np.ravel_multi_index(tuple(np.where(keep, seqs[:, :3], V).T), (V + 1,) * 3)
  want3 = np.bincount(truncated_first3(CONTINUATIONS, stop), weights=law, minlength=(V + 1) ** 3)
  want_stop = np.bincount(stop, weights=law, minlength=L + 1)

  padded = np.full((BATCH, L), V)
  for i, row in enumerate(result.tokens):
    padded[i, :min(len(row), L)] = row[:L]
  got_eos = np.isin(padded, EOS_IDS)
  got_stop = np.where(got_eos.any(axis=1), np.argmax(got_eos, axis=1), L)
  got3 = np.bincount(truncated_first3(padded, got_stop), minlength=(V + 1) ** 3)
  each = [chi_square_pvalue(got3, want3),
          chi_square_pvalue(np.bincount(got_stop, minlength=L + 1), want_stop)]
  each += sequential_pvalues(result.tokens)  # tokens up to each row's EOS
  p = len(each) * min(each)
  assert p > ALPHA, f"EOS-truncated output departs from the target law (p = {p:.2e}; {each})"


# ---------------------------------------------------------------------------------------------
# Negative controls: the same statistic must catch a wrong acceptance rule.

def _always_accept(key, draft_bn, p_bnv, q_bmv):
  """WRONG: keeps every draft token (ignores q), then a bonus token from q."""
  b, k = draft_bn.shape
  nxt = sampling.sample(key, q_bmv[:, k])
  return jnp.full((b,), k, jnp.int32), nxt


def _split2(key):
  """Two keys from one key, or two per row from one per row (what the decode loop passes)."""
  if key.shape == ():
    return jax.random.split(key)
  return jnp.moveaxis(sampling.split_rows(key, 2), 1, 0)


def _resample_from_target(key, draft_bn, p_bnv, q_bmv):
  """WRONG: on rejection draws from q instead of normalize(max(0, q - p))."""
  b, k = draft_bn.shape
  key_u, key_next = _split2(key)
  p_x = jnp.take_along_axis(p_bnv, draft_bn[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(q_bmv[:, :k], draft_bn[..., None], axis=-1)[..., 0]
  accepted = sampling.uniform(key_u, (b,), (k,)) * p_x < q_x
  n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)
  return n, sampling.sample(key_next, q_bmv[jnp.arange(b), n])


_ACCEPT = rejection.accept  # the real rule, bound before any test patches the module


def _swapped_ratio(key, draft_bn, p_bnv, q_bmv):
  """WRONG: p and q swapped (accepts with probability min(1, p/q), residual max(0, p - q))."""
  return _ACCEPT(key, draft_bn, q_bmv[:, :-1], jnp.concatenate(
      [p_bnv, q_bmv[:, -1:]], axis=1))


def _wrong_by_row(key, draft_bn, p_bnv, q_bmv):
  """Even rows always_accept, odd rows resample_from_target: two broken rules in one compiled
  program (each extra program costs seconds of XLA compile)."""
  key_a, key_b = _split2(key)
  n_a, next_a = _always_accept(key_a, draft_bn, p_bnv, q_bmv)
  n_b, next_b = _resample_from_target(key_b, draft_bn, p_bnv, q_bmv)
  even = jnp.arange(draft_bn.shape[0]) % 2 == 0
  return jnp.where(even, n_a, n_b), jnp.where(even, next_a, next_b)


def test_wrong_acceptance_rules_fail_the_same_test(monkeypatch):
  # Given the loop with a broken accept(); then the statistic used above rejects it outright,
  # on half the batch each.
  monkeypatch.setattr(rejection, "accept", _wrong_by_row)
  # The patch rebinds a module-level name, so the process's program cache (program_cache.py)
  # traces this Sampler's programs afresh.
  sampler = Sampler.from_params(target_params(), TARGET, draft_params=draft_params(), draft_cfg=DRAFT)
  tokens = _full_rows(_same_prompt(sampler, 3, seed=13))
  for name, rows in [("always_accept", tokens[0::2]), ("resample_from_target", tokens[1::2])]:
    p, each = exactness_pvalue(rows.tolist())
    assert p < NEGATIVE_P, f"{name} passed the exactness test (p = {p:.2e}; tests: {each})"


_NOISE = gumbel.noise  # the real ones, bound before any test patches the module
_VERIFY = gumbel.verify


def _noise_fixed_on_odd_rows(seeds_b2, positions_bm, num_tokens):
  """WRONG on odd rows: one noise draw for every position (not indexed by position)."""
  odd = (jnp.arange(positions_bm.shape[0]) % 2 == 1)[:, None]
  return _NOISE(seeds_b2, jnp.where(odd, 0, positions_bm), num_tokens)


def _draft_token_on_even_rows(draft_bn, q_bmv, noise_bmv):
  """WRONG on even rows: emits the draft's token at the first disagreement."""
  n, nxt = _VERIFY(draft_bn, q_bmv, noise_bmv)
  k = draft_bn.shape[1]
  proposed = jnp.take_along_axis(draft_bn, jnp.minimum(n, k - 1)[:, None], axis=1)[:, 0]
  even = jnp.arange(draft_bn.shape[0]) % 2 == 0
  return n, jnp.where(even & (n < k), proposed, nxt)


def test_wrong_gumbel_couplings_fail_the_same_test(monkeypatch):
  # Given the gumbel loop broken two ways, one per half of the batch: noise that ignores the
  # position (odd rows) and the draft's token kept at a disagreement (even rows); then the
  # statistic rejects each outright.
  monkeypatch.setattr(gumbel, "noise", _noise_fixed_on_odd_rows)
  monkeypatch.setattr(gumbel, "verify", _draft_token_on_even_rows)
  sampler = Sampler.from_params(target_params(), TARGET, draft_params=draft_params(), draft_cfg=DRAFT)
  tokens = _full_rows(_same_prompt(sampler, 3, seed=15, coupling="gumbel"))
  for name, rows in [("draft_token_at_disagreement", tokens[0::2]),
                     ("noise_not_by_position", tokens[1::2])]:
    p, each = exactness_pvalue(rows.tolist())
    assert p < NEGATIVE_P, f"{name} passed the exactness test (p = {p:.2e}; tests: {each})"


# ---------------------------------------------------------------------------------------------
# Greedy: temperature 0 reproduces the target's greedy output token for token.

RNG = np.random.default_rng(0)
GREEDY_PROMPTS = [RNG.integers(0, V, RNG.integers(1, 13)).tolist() for _ in range(BATCH)]
GREEDY = SamplingParams(temperature=0.0)


def greedy_path(cfg, params, prompts, tokens):
  """The target's logits along each row's continuation (b MAX_NEW v: the positions that chose
  tokens[:, j]), and which rows have no near-tie (top two within GREEDY_MARGIN) on that path,
  where rounding could pick either token."""
  seqs = np.zeros((len(prompts), 16 + MAX_NEW), np.int32)  # right-padding: invisible to causal rows
  for i, prompt in enumerate(prompts):
    seqs[i, :len(prompt) + MAX_NEW] = prompt + tokens[i].tolist()
  logits = np.asarray(jax.jit(model.forward_full, static_argnums=1)(params, cfg, seqs))
  at = np.array([len(p) - 1 for p in prompts])[:, None] + np.arange(MAX_NEW)[None, :]
  path = np.take_along_axis(logits, at[..., None], axis=1)
  top2 = -np.sort(-path, axis=-1)[..., :2]
  return path, np.all(top2[..., 0] - top2[..., 1] > GREEDY_MARGIN, axis=1)


@functools.lru_cache(maxsize=None)
def _greedy_reference(sampler, target="attention"):
  """Autoregressive greedy tokens (k=0) and which rows have no near-tie along their path."""
  cfg, params = _target(target)
  result = sampler.generate(GREEDY_PROMPTS, max_new_tokens=MAX_NEW, k=0, sampling=GREEDY)
  tokens = np.array(result.tokens)
  path, clear = greedy_path(cfg, params(), GREEDY_PROMPTS, tokens)
  assert clear.mean() > 0.99
  assert np.array_equal(np.argmax(path, axis=-1)[clear], tokens[clear]), "k=0 is not greedy"
  return tokens, clear


@pytest.mark.parametrize("setup,k,rows", [("single", 1, BATCH), ("single", 3, BATCH),
                                          ("single", 5, BATCH), ("sharded_2x4", 3, BATCH),
                                          ("sharded_1x8", 2, 256)])
def test_greedy_speculative_equals_greedy_autoregressive(request, single, setup, k, rows):
  # Given ragged prompts and a draft that agrees with the target only sometimes; when decoding
  # at temperature 0 with k drafts; then the output is the target's greedy output.
  # (1x8 has no sampling case to share a program with: a smaller batch runs faster there.)
  want, clear = _greedy_reference(single)
  want, clear = want[:rows], clear[:rows]
  result = request.getfixturevalue(setup).generate(GREEDY_PROMPTS[:rows], max_new_tokens=MAX_NEW,
                                                   k=k, sampling=GREEDY)
  got = np.array(result.tokens)
  bad = np.flatnonzero(clear & np.any(got != want, axis=1))
  assert bad.size == 0, f"{bad.size} rows differ, e.g. row {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"
  # Both paths ran: some drafts rejected, some rounds with every draft accepted (bonus token).
  assert 0 < result.acceptance_rate() < 1
  assert result.accepted_at[:, k - 1].sum() > 0


# ---------------------------------------------------------------------------------------------
# Recurrent target and recurrent draft: rollback by selection keeps the law exact.

@pytest.fixture(scope="module")
def recurrent_pair():
  return Sampler.from_params(rg_target_params(), RG_TARGET, draft_params=rg_draft_params(), draft_cfg=RG_DRAFT)


RECURRENT_CASES = [  # id, k, sampling options
    ("rg_k1", 1, {}),
    ("rg_k3", 3, {}),
    ("rg_k3_temperature_0.7_top_p_0.8", 3, {"temperature": 0.7, "top_p": 0.8}),
    ("rg_gumbel_k3_temperature_0.7_top_p_0.8", 3,
     {"temperature": 0.7, "top_p": 0.8, "coupling": "gumbel"}),
]


@pytest.mark.parametrize("k,options", [c[1:] for c in RECURRENT_CASES],
                         ids=[c[0] for c in RECURRENT_CASES])
def test_recurrent_pair_follows_target_law(recurrent_pair, k, options):
  # Given a recurrent target and draft (continuations cross the attention window); when
  # sampling MAX_NEW tokens with k drafts per round; then they follow the target's law.
  options = dict(options)
  coupling = options.pop("coupling", "rejection")
  result = _same_prompt(recurrent_pair, k, seed=_seed(k, options) + 1, coupling=coupling,
                        **options)
  p, each = exactness_pvalue(_full_rows(result), target="recurrent", **options)
  assert p > ALPHA, f"output departs from the target law (p = {p:.2e}; tests: {each})"
  assert 0.2 < judged_acceptance(result) < 0.95, judged_acceptance(result)
  assert len(np.unique(result.accepted)) > 1


def _rollback_by_length_only(cache, length_b, traces=None, start_b=None):
  return cache._replace(length=length_b)


def test_recurrent_rollback_without_selection_fails_the_same_test(monkeypatch):
  # Given the loop with a rollback that moves lengths only (the recurrent states keep the
  # rejected drafts); then the same statistics reject it outright.
  monkeypatch.setattr(cache_lib, "rollback", _rollback_by_length_only)
  sampler = Sampler.from_params(rg_target_params(), RG_TARGET, draft_params=rg_draft_params(),
                    draft_cfg=RG_DRAFT)
  tokens = _full_rows(_same_prompt(sampler, 3, seed=14))
  p, each = exactness_pvalue(tokens.tolist(), target="recurrent")
  assert p < NEGATIVE_P, f"a length-only rollback passed (p = {p:.2e}; tests: {each})"


def test_recurrent_greedy_speculative_equals_greedy_autoregressive(recurrent_pair):
  # Given ragged prompts (1-12 tokens) and the recurrent pair; when decoding at temperature 0
  # with 3 drafts per round; then the output is the target's greedy output token for token.
  want, clear = _greedy_reference(recurrent_pair, target="recurrent")
  result = recurrent_pair.generate(GREEDY_PROMPTS, max_new_tokens=MAX_NEW, k=3, sampling=GREEDY)
  got = np.array(result.tokens)
  bad = np.flatnonzero(clear & np.any(got != want, axis=1))
  assert bad.size == 0, f"{bad.size} rows differ, e.g. row {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"
  assert 0 < result.acceptance_rate() < 1
  assert result.accepted_at[:, 2].sum() > 0


def test_greedy_with_eos_is_greedy_truncated_at_eos(single, with_eos):
  # Given two EOS ids; then each greedy row is the greedy continuation cut just after its first
  # token that is either.
  want, clear = _greedy_reference(single)
  result = with_eos.generate(GREEDY_PROMPTS, max_new_tokens=MAX_NEW, k=3, sampling=GREEDY)
  truncated = 0
  for i in np.flatnonzero(clear):
    row = want[i].tolist()
    stop = [j for j, x in enumerate(row) if x in EOS_IDS]
    cut = row[:stop[0] + 1] if stop else row
    truncated += len(cut) < MAX_NEW
    assert result.tokens[i] == cut, (i, result.tokens[i], cut)
  assert truncated > BATCH // 20  # EOS actually cut many rows short


# ---------------------------------------------------------------------------------------------
# rejection.accept alone, against its exact law.

A = 4  # vocabulary of the unit tests


def _tables(k, seed):
  """Draft p and target q for each step as tables over the prefix: p[t] has shape (A,)*(t+1)."""
  rng = np.random.default_rng(seed)

  def dist(shape, zero):
    x = rng.dirichlet(np.full(A, 0.7), shape)
    x[..., zero] = 0.0  # p: a token only the residual can produce; q: a token never right
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)

  p = [dist((A,) * t, zero=A - 1) for t in range(k)]
  q = [dist((A,) * t, zero=0) for t in range(k + 1)]
  return p, q


def _exact_outcomes(p, q, k):
  """{(x_1..x_n, next): probability} for accept() with x_t ~ p: the product of min(p, q) over
  the accepted prefix, times max(0, q - p) at a rejection or q after all K (the bonus)."""
  law = {}
  for n in range(k + 1):
    for prefix in itertools.product(range(A), repeat=n):
      mass = 1.0
      for t, x in enumerate(prefix):
        mass *= min(p[t][prefix[:t]][x], q[t][prefix[:t]][x])
      nxt = q[n][prefix] if n == k else np.maximum(q[n][prefix] - p[n][prefix], 0)
      for c in range(A):
        law[prefix + (c,)] = mass * float(nxt[c])
  return law


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draw(rule, k, num, p, q, key):
  keys = jax.random.split(key, k + 1)
  draft = []
  for t in range(k):  # x_t ~ p_t(. | x_<t)
    logits = jnp.broadcast_to(jnp.log(p[t][tuple(draft)]), (num, A))
    draft.append(jax.random.categorical(keys[t], logits).astype(jnp.int32))
  draft_bn = jnp.stack(draft, axis=1)
  p_bnv = jnp.stack([p[t][tuple(draft[:t])] * jnp.ones((num, 1)) for t in range(k)], axis=1)
  q_bmv = jnp.stack([q[t][tuple(draft[:t])] * jnp.ones((num, 1)) for t in range(k + 1)], axis=1)
  n, nxt = rule(keys[k], draft_bn, p_bnv, q_bmv)
  return draft_bn, n, nxt


def _accept_pvalues(rule, k, seed, num=100_000):
  p, q = _tables(k, seed)
  law = _exact_outcomes(p, q, k)
  draft, n, nxt = map(np.asarray, _draw(rule, k, num, [jnp.asarray(x) for x in p],
                                         [jnp.asarray(x) for x in q], jax.random.key(seed)))
  index = {outcome: i for i, outcome in enumerate(law)}
  cells = [index[tuple(draft[i, :n[i]]) + (nxt[i],)] for i in range(num)]
  outcome_p = chi_square_pvalue(np.bincount(cells, minlength=len(law)), list(law.values()))
  # The first emitted token (x_1 if kept, else the resample) must follow q_1 exactly.
  first = np.where(n > 0, draft[:, 0], nxt)
  first_p = chi_square_pvalue(np.bincount(first, minlength=A), q[0])
  return outcome_p, first_p, (p, q, draft, n)


@pytest.mark.parametrize("k", [1, 2])
def test_accept_matches_its_exact_law(k):
  # Given p, q with tokens only the draft proposes and tokens only the target allows; when x ~ p
  # goes through accept(); then (accepted prefix, next token) follows the enumerated law and the
  # first emitted token follows q.
  outcome_p, first_p, (p, q, draft, n) = _accept_pvalues(rejection.accept, k, seed=20 + k)
  assert 2 * min(outcome_p, first_p) > ALPHA, (outcome_p, first_p)
  # The law itself marginalizes to q for the first token (a check of the derivation above).
  law = _exact_outcomes(p, q, k)
  first = np.zeros(A)
  for outcome, mass in law.items():
    first[outcome[0]] += mass
  np.testing.assert_allclose(first, q[0], atol=1e-6)
  # A draft token the target gives probability 0 is never accepted.
  assert not np.any((draft[:, 0] == 0) & (n > 0))


def _shared_uniform(key, draft_bn, p_bnv, q_bmv):
  """WRONG (subtly): one uniform per row for all K tests, so acceptances are correlated."""
  b, k = draft_bn.shape
  key_u, key_next = _split2(key)
  p_x = jnp.take_along_axis(p_bnv, draft_bn[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(q_bmv[:, :k], draft_bn[..., None], axis=-1)[..., 0]
  accepted = sampling.uniform(key_u, (b,), (1,)) * p_x < q_x
  n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)
  rows = jnp.arange(b)
  p_n = jnp.where((n < k)[:, None], p_bnv[rows, jnp.minimum(n, k - 1)], 0.0)
  residual = jnp.maximum(q_bmv[rows, n] - p_n, 0.0)
  return n, sampling.sample(key_next, residual / residual.sum(-1, keepdims=True))


@pytest.mark.parametrize("wrong_rule",
                         [_always_accept, _resample_from_target, _swapped_ratio, _shared_uniform],
                         ids=["always_accept", "resample_from_target", "swapped_ratio",
                              "shared_uniform"])
def test_accept_law_test_catches_wrong_rules(wrong_rule):
  outcome_p, first_p, _ = _accept_pvalues(wrong_rule, 2, seed=22)
  assert min(outcome_p, first_p) < NEGATIVE_P, (outcome_p, first_p)


def test_accept_when_draft_equals_target_keeps_everything():
  # Given p == q; then every draft token is accepted (the ratio is 1; u < 1 always).
  p, q = _tables(2, seed=30)
  _, n, _ = _draw(rejection.accept, 2, 1000, [jnp.asarray(x) for x in q[:2]],
                  [jnp.asarray(x) for x in q], jax.random.key(0))
  assert np.all(np.asarray(n) == 2)


# ---------------------------------------------------------------------------------------------
# Bad input is refused with a clear error before anything compiles.

def test_negative_k_is_refused(single):
  with pytest.raises(ValueError, match="k .*must be >= 0"):
    single.generate([PROMPT], max_new_tokens=4, k=-1)


def test_k_too_large_for_cache_is_refused():
  # Given max_cache_len 20 and 4 + 8 tokens: verifying k drafts needs k + 1 more slots.
  sampler = Sampler.from_params(target_params(), TARGET, draft_params=draft_params(), draft_cfg=DRAFT,
                    max_cache_len=20)
  with pytest.raises(ValueError, match="does not fit"):
    sampler.generate([PROMPT], max_new_tokens=8, k=8)


def test_draft_with_other_tokenizer_is_refused():
  with pytest.raises(ValueError, match="tokenizer"):
    Sampler.from_params(target_params(), TARGET, draft_params=draft_params(),
            draft_cfg=DRAFT.replace(tokenizer="other"))


def test_draft_with_other_valid_vocab_is_refused():
  with pytest.raises(ValueError, match="vocabularies differ"):
    Sampler.from_params(target_params(), TARGET, draft_params=_padded(draft_params()),
            draft_cfg=PADDED_DRAFT.replace(valid_vocab_size=V + 1))


def test_speculation_without_draft_is_refused():
  sampler = Sampler.from_params(target_params(), TARGET)
  with pytest.raises(ValueError, match="needs a draft"):
    sampler.generate([PROMPT], max_new_tokens=4, k=2)
