"""Sharded runs compute what one device computes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, model
from spec_tpu import sharding
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams

MESHES = [(1, 8), (2, 4), (8, 1)]
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5], [9, 8, 7], [3, 1, 4, 1, 5, 9, 2, 6],
           [2, 7], [6, 6, 6, 6], [1], [4, 4, 2, 2, 1, 1, 0]]


@functools.lru_cache
def _model(name):
  # A model with 8 query heads over 2 KV heads (tiny_gemma2: 4 heads, 2 KV heads widened), so a
  # model axis of 8 shards query heads while KV heads replicate.
  cfg = config.get_preset(name).replace(num_heads=8, num_kv_heads=2 if name != "tiny_gemma3" else 1)
  return cfg, model.init_params(cfg, jax.random.key(0))


# One device's reference, one program per model (an eager forward dispatches hundreds of ops):
# the logits tests' and the greedy tests' (every call is 8 rows of 24 tokens on a 32-slot cache).
_forward = jax.jit(model.forward, static_argnums=1)
SEQ = 24
LENGTHS = jnp.array([16, 3, 9, 12, 1, 16, 7, 5], jnp.int32)


def _one_device_logits(cfg, params, tokens, lengths):
  return np.asarray(_forward(params, cfg, tokens, cache_lib.init_cache(cfg, 8, 32, 4),
                             lengths)[0])


def _assert_one_device_greedy(cfg, params, prompts, tokens):
  """Each row's tokens are one device's greedy continuation of its prompt: every token is the
  argmax of one device's logits after the prompt and the row's tokens before it (one forward
  over the whole continuations: causal, so each position sees only its prefix)."""
  seqs = np.zeros((len(prompts), SEQ), np.int32)
  for i, (prompt, row) in enumerate(zip(prompts, tokens)):
    seqs[i, :len(prompt) + len(row)] = prompt + list(row)
  lengths = jnp.array([len(p) + len(t) for p, t in zip(prompts, tokens)], jnp.int32)
  logits = _one_device_logits(cfg, params, jnp.asarray(seqs), lengths)
  for i, (prompt, row) in enumerate(zip(prompts, tokens)):
    at = len(prompt) - 1 + np.arange(len(row))
    assert np.argmax(logits[i, at], axis=-1).tolist() == list(row), f"row {i}"


def _prefill_logits(cfg, params, mesh, tokens, lengths):
  cache = cache_lib.init_cache(cfg, tokens.shape[0], 32, spec_tokens=4)
  p_sh = sharding.param_shardings(cfg, mesh, params_shape=params)
  c_sh = sharding.cache_shardings(cache, mesh)
  rows = sharding.batch_sharding(mesh, tokens.shape)
  # One device's function on arguments placed on the mesh: the mesh's program comes from the
  # same trace, laid out by the arguments' shardings.
  args = jax.device_put((params, tokens, cache, lengths),
                        (p_sh, rows, c_sh, sharding.batch_sharding(mesh, lengths.shape)))
  return np.asarray(_forward(args[0], cfg, *args[1:])[0])


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_gemma3"])
def test_sharded_logits_are_close_to_one_device(name):
  cfg, params = _model(name)
  tokens = jax.random.randint(jax.random.key(3), (8, SEQ), 0, cfg.vocab_size)
  lengths = LENGTHS
  one = _one_device_logits(cfg, params, tokens, lengths)
  for shape in MESHES:
    got = _prefill_logits(cfg, params, sharding.make_mesh(shape), tokens, lengths)
    for i, n in enumerate(lengths.tolist()):
      np.testing.assert_allclose(got[i, :n], one[i, :n], atol=1e-5, err_msg=str(shape))


# Every mesh once over the two families (the logits test above runs each family on all three).
@pytest.mark.parametrize("name,shapes", [("tiny_gemma2", [(1, 8), (8, 1)]),
                                         ("tiny_gemma3", [(2, 4)])],
                         ids=["tiny_gemma2", "tiny_gemma3"])
def test_sharded_greedy_tokens_equal_one_device(name, shapes):
  # Given a model sharded on a mesh; when it decodes greedily, then its tokens are one device's
  # greedy continuations (one device's Sampler is held to the same reference in
  # tests/test_exactness.py).
  cfg, params = _model(name)
  greedy = SamplingParams(temperature=0.0)
  for shape in shapes:
    got = Sampler.from_params(params, cfg, mesh=sharding.make_mesh(shape)).generate(
        PROMPTS, max_new_tokens=12, sampling=greedy).tokens
    assert len({tuple(t) for t in got}) > 1  # not a degenerate model
    assert all(len(t) == 12 for t in got)
    _assert_one_device_greedy(cfg, params, PROMPTS, got)


def test_kv_heads_replicate_when_fewer_than_model_shards():
  cfg, params = _model("tiny_gemma3")  # one KV head
  sh = sharding.param_shardings(cfg, sharding.make_mesh((2, 4)), params_shape=params)
  # (stacked params and caches lead with the layers axis, which no mesh axis splits)
  assert sh["groups"][0]["attn"]["k"].spec == jax.sharding.PartitionSpec(None, None, None, None)
  assert sh["groups"][0]["attn"]["q"].spec == jax.sharding.PartitionSpec(None, "model", None, None)
  cache = cache_lib.abstract_cache(cfg, 4, 16)
  c_sh = sharding.cache_shardings(cache, sharding.make_mesh((2, 4)))
  assert c_sh.groups[0].k.spec == jax.sharding.PartitionSpec(None, "data", None, None, None)


def test_mesh_that_does_not_match_the_devices_is_refused():
  with pytest.raises(ValueError, match="needs 12 devices but there are 8"):
    sharding.make_mesh((3, 4))
  with pytest.raises(ValueError, match="differ in length"):
    sharding.make_mesh((8,), ("data", "model"))


class TestBadInput:
  cfg, params = _model("tiny_gemma2")

  def sampler(self, **kw):
    return Sampler.from_params(self.params, self.cfg, **kw)

  def test_empty_prompt(self):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
      self.sampler().generate([[1, 2], []], max_new_tokens=4)

  def test_no_prompts(self):
    with pytest.raises(ValueError, match="no prompts"):
      self.sampler().generate([], max_new_tokens=4)

  def test_token_outside_vocabulary(self):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 64\)"):
      self.sampler().generate([[1, 64]], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
      self.sampler().generate([[-1]], max_new_tokens=4)

  def test_prompt_longer_than_the_cache(self):
    with pytest.raises(ValueError, match="does not fit the cache of 16 tokens"):
      self.sampler(max_cache_len=16).generate([[1] * 14], max_new_tokens=4)

  def test_bad_sampling(self):
    with pytest.raises(ValueError, match="temperature"):
      self.sampler().generate([[1]], max_new_tokens=4, sampling=SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
      self.sampler().generate([[1]], max_new_tokens=4, sampling=SamplingParams(top_p=0))

  def test_bad_max_new_tokens(self):
    with pytest.raises(ValueError, match="max_new_tokens"):
      self.sampler().generate([[1]], max_new_tokens=0)
    # Not integers: a float reached a shape deep in JAX, None a bare TypeError.
    for bad in (5.5, None):
      with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        self.sampler().generate([[1]], max_new_tokens=bad)

  def test_bad_k_seed_pad_and_eos(self):
    with pytest.raises(ValueError, match="k .* must be an integer"):  # was run as k = 2
      self.sampler().generate([[1]], max_new_tokens=4, k=2.5)
    # A seed past 32 bits aliased a smaller one's stream (2**32 gave seed 0's tokens).
    for bad in (2**32, -1, 1.5):
      with pytest.raises(ValueError, match="seed"):
        self.sampler().generate([[1]], max_new_tokens=4, seed=bad)
    # A pad id past the vocabulary embedded as NaN and turned every output into token 0.
    with pytest.raises(ValueError, match="pad_id must be in"):
      self.sampler(pad_id=self.cfg.num_tokens)
    with pytest.raises(ValueError, match="eos_ids must be in"):
      self.sampler(eos_ids=(1, self.cfg.num_tokens))
    with pytest.raises(ValueError, match="eos_ids must be an id or a sequence of ids"):
      self.sampler(eos_ids="2")
    # A sentencepiece model without pad/EOS pieces says -1: token 0 pads, no EOS.
    s = self.sampler(pad_id=-1, eos_ids=-1)
    assert (s.pad_id, s.eos_ids) == (0, ())
    assert self.sampler(eos_ids=3).eos_ids == (3,)
    assert self.sampler(eos_ids=[3, 1, 3]).eos_ids == (3, 1)

  def test_k_without_draft(self):
    with pytest.raises(ValueError, match="needs a draft"):
      self.sampler().generate([[1]], max_new_tokens=4, k=2)


@functools.lru_cache
def _recurrent_pair():
  # RecurrentGemma-shaped, with an RG-LRU width of 32 and 8 gate blocks: the width shards over
  # a model axis of 8 or 4 (the "lru" rule), the gates' blocks with it.
  # The draft is one recurrent layer: its rollback is the same selection at any depth, and a
  # deeper draft only adds compile time.
  cfg = config.get_preset("tiny_recurrentgemma").replace(num_heads=8, head_dim=4, lru_width=32)
  draft_cfg = cfg.replace(num_layers=1)
  return (cfg, model.init_params(cfg, jax.random.key(5)), draft_cfg,
          model.init_params(draft_cfg, jax.random.key(6)))


def test_recurrent_width_shards_and_logits_equal_one_device():
  # Given a recurrent model and ragged prompts,
  cfg, params, _, _ = _recurrent_pair()
  tokens = jax.random.randint(jax.random.key(7), (8, SEQ), 0, cfg.vocab_size)
  lengths = LENGTHS
  one = _one_device_logits(cfg, params, tokens, lengths)
  for shape in [(1, 8), (2, 4)]:
    mesh = sharding.make_mesh(shape)
    # the recurrent weights and states are split over the width on the model axis,
    p_sh = sharding.param_shardings(cfg, mesh, params_shape=params)
    assert tuple(p_sh["groups"][0]["recurrent"]["x"].spec)[-1] == "model"
    c_sh = sharding.cache_shardings(cache_lib.init_cache(cfg, 8, 32, 4), mesh)
    assert c_sh.groups[0].h.spec[-1] == "model"
    # and the logits are one device's.
    got = _prefill_logits(cfg, params, mesh, tokens, lengths)
    for i, n in enumerate(lengths.tolist()):
      np.testing.assert_allclose(got[i, :n], one[i, :n], atol=1e-5, err_msg=str(shape))


def test_sharded_recurrent_speculative_greedy_equals_one_device():
  # Given a recurrent target and a recurrent draft (rollback by selection on both sides);
  # when decoding greedily with 2 drafts per round on 2x4 (rows and the width both split; the
  # 1x8 split of the width is the logits test's); then the tokens are the target's greedy
  # continuations on one device, through rounds that kept some drafts and rejected others.
  cfg, target, draft_cfg, draft = _recurrent_pair()
  assert draft_cfg.layer_types == (config.RECURRENT,)
  greedy = SamplingParams(temperature=0.0)
  got = Sampler.from_params(target, cfg, mesh=sharding.make_mesh((2, 4)), draft_params=draft,
                            draft_cfg=draft_cfg).generate(PROMPTS, max_new_tokens=12,
                                                          sampling=greedy, k=2)
  assert len({tuple(t) for t in got.tokens}) > 1 and 0 < got.acceptance_rate() < 1
  assert all(len(t) == 12 for t in got.tokens)
  _assert_one_device_greedy(cfg, target, PROMPTS, got.tokens)
