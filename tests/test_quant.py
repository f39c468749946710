"""int8 weights: the representation, dequantisation inside the matmul, and exactness w.r.t. the
quantized model as served.

The exactness cases reuse tests/test_exactness.py's machinery (the enumerated law, the
sequential martingale test, the greedy near-tie rule), with the law computed from the QUANTIZED
target: speculative sampling promises the distribution of the model it serves.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu import sharding
from spec_tpu.checkpoints import checkpoint
from spec_tpu.decoding import decode
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, model, quant

import test_exactness as ex

# ---------------------------------------------------------------------------------------------
# The representation.


def test_quantize_is_symmetric_per_output_channel_within_half_a_step():
  # Given a weight (d f) with one all-zero output channel; when quantized over d;
  # then each output channel has its own scale absmax / 127, values lie in [-127, 127], the
  # channel's largest magnitude maps to +-127, and the error is at most half a step.
  x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
  x[:, 3] = 0.0
  q = quant.quantize(jnp.asarray(x), [0])
  w, scale = np.asarray(q["w"]), np.asarray(q["scale"])
  assert w.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (12,)
  assert w.min() >= -127 and w.max() <= 127
  np.testing.assert_array_equal(scale[3], 1.0)
  np.testing.assert_array_equal(w[:, 3], 0)
  nonzero = np.arange(12) != 3
  np.testing.assert_allclose(scale[nonzero], np.abs(x).max(0)[nonzero] / 127, rtol=1e-6)
  assert np.all(np.abs(w).max(0)[nonzero] == 127)
  err = np.abs(np.asarray(quant.dequantize(q, [0])) - x)
  assert np.all(err <= scale / 2 * (1 + 1e-6))
  # numpy (host-side conversion) and jax (load time) give the same int8 values and scales.
  qn = quant.quantize(x, [0], xp=np)
  np.testing.assert_array_equal(qn["w"], w)
  np.testing.assert_array_equal(qn["scale"], scale)


def test_stacked_leading_axis_is_one_more_output_axis():
  # Given layers stacked on a leading axis (the scan layout's 'layers'); then quantizing the
  # stack over its contracting axes equals quantizing each layer and stacking the results.
  x = jax.random.normal(jax.random.key(0), (3, 16, 4, 8))  # l d h e
  stacked = quant.quantize(x, [1])
  each = [quant.quantize(x[i], [0]) for i in range(3)]
  np.testing.assert_array_equal(stacked["w"], jnp.stack([q["w"] for q in each]))
  np.testing.assert_array_equal(stacked["scale"], jnp.stack([q["scale"] for q in each]))
  assert stacked["scale"].shape == (3, 4, 8)


@pytest.mark.parametrize("spec,w_shape,contract", [
    ("btd,dhe->bthe", (16, 4, 8), [0]),     # q, k, v (d h e)
    ("btd,hde->bthe", (4, 16, 8), [1]),     # heads-major q (h d e): output permuted after the dot
    ("btd,kde->bkte", (2, 16, 8), [1]),     # heads-major k, v: output b k t e
    ("bthe,hed->btd", (4, 8, 16), [0, 1]),  # o: two contracting axes
    ("btd,df->btf", (16, 24), [0]),         # gate, up
    ("btf,fd->btd", (24, 16), [0]),         # down
    ("btd,vd->btv", (40, 16), [1]),         # tied unembedding: scale per vocabulary row
])
def test_einsum_equals_einsum_with_the_dequantized_weight(spec, w_shape, contract):
  # Given a quantized weight; then quant.einsum (int8 operand, scales after the dot) equals a
  # float einsum with the dequantized weight, in float32 and (to bf16 rounding) in bfloat16.
  xs = spec.split(",")[0]
  sizes = dict(zip(spec.split(",")[1].split("-")[0], w_shape), b=2, t=3)
  x = jax.random.normal(jax.random.key(1), tuple(sizes[c] for c in xs))
  q = quant.quantize(jax.random.normal(jax.random.key(2), w_shape), contract)
  want = jnp.einsum(spec, x, quant.dequantize(q, contract), precision="highest")
  np.testing.assert_allclose(quant.einsum(spec, x, q), want, rtol=1e-5, atol=1e-5)
  x16 = x.astype(jnp.bfloat16)
  got16 = quant.einsum(spec, x16, q)
  assert got16.dtype == jnp.bfloat16
  want16 = jnp.einsum(spec, x16.astype(jnp.float32), quant.dequantize(q, contract),
                      precision="highest")
  np.testing.assert_allclose(got16.astype(jnp.float32), want16, rtol=1e-2, atol=1e-3)
  logits = quant.einsum(spec, x16, q, preferred_element_type=jnp.float32)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, want16, rtol=1e-5, atol=1e-5)


def test_params_tree_quantizer_covers_exactly_the_matmul_weights():
  # Given tied (Gemma-style) and untied models; then q k v o gate up down (and unembed, or the
  # tied table) are int8 with float32 scales over their output axes, norms and an untied
  # embedding table are untouched, and the sharding rules' axes match the tree.
  for name, tied in [("tiny_gemma2", True), ("tiny", False)]:
    cfg = config.get_preset(name).replace(quantize="int8")
    params = jax.eval_shape(lambda cfg=cfg: model.init_params(cfg, jax.random.key(0)))
    layer = params["groups"][0]  # stacked over the groups: a leading l axis
    for group, leaf in [("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"),
                        ("ffw", "up"), ("ffw", "down")]:
      assert quant.is_quantized(layer[group][leaf]) and layer[group][leaf]["w"].dtype == jnp.int8
    g = cfg.num_groups
    assert layer["attn"]["o"]["scale"].shape == (g, cfg.d_model)
    assert layer["attn"]["q"]["scale"].shape == (g, cfg.num_heads, cfg.head_dim)
    assert not quant.is_quantized(layer["attn_norm"])
    assert quant.is_quantized(params["embed"]) == tied
    if not tied:
      assert params["unembed"]["scale"].shape == (cfg.vocab_size,)
    axes = model.param_logical_axes(cfg)
    assert jax.tree.structure(jax.tree.map(lambda _: 0, axes, is_leaf=quant._is_axes)) == \
        jax.tree.structure(jax.tree.map(lambda _: 0, params))
  with pytest.raises(ValueError, match="quantize must be"):
    config.get_preset("tiny").replace(quantize="int4")
  # RecurrentGemma's own matmuls are not quantized yet: refused, not half-quantized.
  with pytest.raises(ValueError, match="not supported for RecurrentGemma"):
    config.get_preset("tiny_recurrentgemma").replace(quantize="int8")


# ---------------------------------------------------------------------------------------------
# Exactness w.r.t. the quantized target.

Q_TARGET = ex.TARGET.replace(quantize="int8")
Q_DRAFT = ex.DRAFT.replace(quantize="int8")


@functools.lru_cache(maxsize=None)
def q_target_params():
  return _quantize(ex.target_params(), Q_TARGET)


def _quantize(params, cfg):
  return jax.jit(model.quantize, static_argnums=1)(params, cfg)


ex.LAW_MODELS["int8_target"] = (Q_TARGET, q_target_params)


@pytest.fixture(scope="module")
def int8_pair():
  return Sampler.from_params(q_target_params(), Q_TARGET, draft_params=_quantize(ex.draft_params(), Q_DRAFT),
                 draft_cfg=Q_DRAFT)


def test_int8_pair_follows_the_int8_target_law(int8_pair):
  # Given an int8 target and an int8 draft; when sampling at K = 3; then the output follows the
  # quantized target's law (the law of the model served), and the test is not vacuous.
  law_int8 = ex.exact_law(target="int8_target")
  # (the float target's law of the first token, from one short forward: where it differs, the
  # whole law differs)
  prompt = jnp.asarray([ex.PROMPT], jnp.int32)
  first_float = jax.nn.softmax(jax.jit(model.forward_full, static_argnums=1)(
      ex.target_params(), ex.TARGET, prompt)[0, -1])
  # (above two programs' rounding: int8 moves these probabilities by far more)
  assert np.abs(law_int8.sum(axis=(1, 2, 3, 4)) - first_float).max() > 1e-3, \
      "quantization did not change the model"
  result = int8_pair.generate([ex.PROMPT] * ex.BATCH, max_new_tokens=ex.MAX_NEW, k=3, seed=41)
  p, each = ex.exactness_pvalue(ex._full_rows(result), target="int8_target")
  assert p > ex.ALPHA, f"output departs from the int8 target's law (p = {p:.2e}; tests: {each})"
  assert 0.2 < ex.judged_acceptance(result) < 0.9


def test_int8_greedy_speculative_equals_int8_greedy_autoregressive(int8_pair):
  # Given ragged prompts; when decoding greedily with the int8 pair at K = 0 on one device, and
  # at K = 3 on one device and tensor-parallel on a 2x4 mesh; then every run gives the same
  # tokens wherever the int8 target's two best logits are not near-tied.
  rows = 1000
  prompts = ex.GREEDY_PROMPTS[:rows]
  ar = np.array(int8_pair.generate(prompts, max_new_tokens=ex.MAX_NEW, k=0,
                                   sampling=ex.GREEDY).tokens)
  path, clear = ex.greedy_path(Q_TARGET, q_target_params(), prompts, ar)
  assert clear.mean() > 0.99
  assert np.array_equal(np.argmax(path, axis=-1)[clear], ar[clear]), "k=0 is not int8 greedy"
  sharded = Sampler.from_params(int8_pair.target_params, Q_TARGET, mesh=sharding.make_mesh((2, 4)),
                    draft_params=int8_pair.draft_params, draft_cfg=Q_DRAFT)
  for name, sampler in [("one device", int8_pair), ("2x4", sharded)]:
    result = sampler.generate(prompts, max_new_tokens=ex.MAX_NEW, k=3, sampling=ex.GREEDY)
    got = np.array(result.tokens)
    bad = np.flatnonzero(clear & np.any(got != ar, axis=1))
    assert bad.size == 0, (f"{name}: {bad.size} rows differ, e.g. row {bad[0]}: {got[bad[0]]} "
                           f"vs {ar[bad[0]]}")
    assert 0 < result.acceptance_rate() < 1


# ---------------------------------------------------------------------------------------------
# Sharded int8 computes what one device computes.


@functools.lru_cache(maxsize=None)
def _int8_gemma2():
  """tiny_gemma2 with 8 query heads, int8, and its random params (one init for the file)."""
  cfg = config.get_preset("tiny_gemma2").replace(num_heads=8, num_kv_heads=2, quantize="int8")
  return cfg, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))


def test_sharded_int8_logits_equal_one_device():
  # Given tiny_gemma2 with 8 query heads and a tied (so quantized) embedding table; then on
  # 1x8 and 2x4 meshes the scales shard as their weights' output axes and the prefill logits
  # equal one device's.
  cfg, params = _int8_gemma2()
  tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, cfg.vocab_size)
  lengths = jnp.array([16, 3, 9, 12, 1, 16, 7, 5], jnp.int32)
  # One function for every mesh (one trace): the arguments' shardings lay out each program.
  fwd = jax.jit(lambda p, t, c, n: model.forward(p, cfg, t, c, n)[0])
  cache = cache_lib.init_cache(cfg, 8, 32, 4)
  one = np.asarray(fwd(params, tokens, cache, lengths))
  P = jax.sharding.PartitionSpec
  for shape in [(1, 8), (2, 4)]:
    mesh = sharding.make_mesh(shape)
    sh = sharding.param_shardings(cfg, mesh, params_shape=params)
    attn = sh["groups"][0]["attn"]  # l h d e, stacked
    assert attn["q"]["w"].spec == P(None, "model", None, None)
    assert attn["q"]["scale"].spec == P(None, "model", None)  # l h e: heads
    assert attn["o"]["scale"].spec == P(None, None)           # l d: replicated
    assert sh["embed"]["scale"].spec == P("model")            # vocab
    args = jax.device_put((params, tokens, cache, lengths),
                          (sh, sharding.batch_sharding(mesh, tokens.shape),
                           sharding.cache_shardings(cache, mesh),
                           sharding.batch_sharding(mesh, lengths.shape)))
    got = np.asarray(fwd(*args))
    for i, n in enumerate(lengths.tolist()):
      np.testing.assert_allclose(got[i, :n], one[i, :n], atol=1e-5, err_msg=str(shape))


# ---------------------------------------------------------------------------------------------
# The compiled program holds no full-precision copy of a weight.

HLO_CFG = config.ModelConfig(name="hlo_probe", vocab_size=256, d_model=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32, ffw_dim=384,
                             tie_embeddings=True, dtype="bfloat16", quantize="int8")


def _weight_sizes(params) -> set[int]:
  # Element counts, not shapes: XLA may reshape (bitcast) a weight, never resize it.
  return {int(np.prod(x.shape)) for x in jax.tree.leaves(params) if x.dtype == jnp.int8}


def _dequantize_first(spec, x, w, *, preferred_element_type=None):
  """WRONG (for the negative control): a float copy of the weight, then a float matmul."""
  if quant.is_quantized(w):
    contract = [i for i, c in enumerate(spec.split(",")[1].split("-")[0])
                if c not in spec.split("->")[1]]
    w = quant.dequantize(w, contract, x.dtype)
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _decode_args(cfg, params, batch=3, prompt_len=5, shardings=None):
  """decode.generate's program (what Sampler.generate and launch.plan compile), abstract args."""
  spec = decode.LoopSpec(target=cfg, draft=None, k=0, k_max=0, max_top_k=0, max_len=16,
                         out_len=4, eos_ids=())
  rep = shardings
  struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
  # params, draft params, tokens, lengths, temperature, top_p, top_k, seed
  args = (jax.tree.map(lambda x: struct(x.shape, x.dtype), params), None,
          struct((batch, prompt_len), jnp.int32), struct((batch,), jnp.int32),
          struct((), jnp.float32), struct((), jnp.float32), struct((), jnp.int32),
          struct((), jnp.uint32))
  return functools.partial(decode.generate, spec), args


def _float_weight_values(hlo: str, sizes: set[int], ops=None) -> list[str]:
  """HLO instructions producing a floating-point array of some weight's element count."""
  found = []
  for m in re.finditer(r"(\S+) = (bf16|f16|f32)\[([\d,]*)\]\S* (\w[\w-]*)\(", hlo):
    n = int(np.prod([int(d) for d in m.group(3).split(",") if d])) if m.group(3) else 1
    if n in sizes and (ops is None or m.group(4) in ops):
      found.append(m.group(0))
  return found


@pytest.mark.parametrize("einsum,ok", [(quant.einsum, True), (_dequantize_first, False)],
                         ids=["int8_inside_the_dot", "negative_control_dequantize_first"])
def test_program_as_emitted_never_scales_a_weight(monkeypatch, einsum, ok):
  # Given the int8 decode program as JAX emits it (HLO before any backend pass, the same for
  # every backend); then no multiply produces a weight-sized float array (scales apply to dot
  # outputs), and float weight-sized values are only int8 converts. A dequantize-first einsum
  # must fail the same check.
  monkeypatch.setattr(quant, "einsum", einsum)
  params = jax.eval_shape(lambda: model.init_params(HLO_CFG, jax.random.key(0)))
  fn, args = _decode_args(HLO_CFG, params)
  hlo = jax.jit(fn).lower(*args).as_text(dialect="hlo")
  sizes = _weight_sizes(params)
  scaled = _float_weight_values(hlo, sizes, ops={"multiply"})
  assert (not scaled) == ok, scaled[:3]
  if ok:
    others = [s for s in _float_weight_values(hlo, sizes) if not s.endswith(" convert(")]
    assert not others, others[:3]


def _tpu_device():
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
  pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') compiles for TPU")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices[0]
  except Exception as e:  # noqa: BLE001 - libtpu present but unusable here
    pytest.skip(f"cannot describe a TPU topology: {e}")


@pytest.mark.parametrize("einsum,ok", [(quant.einsum, True), (_dequantize_first, False)],
                         ids=["int8_inside_the_dot", "negative_control_dequantize_first"])
def test_tpu_program_holds_no_float_copy_of_a_weight(monkeypatch, einsum, ok):
  # Given the int8 decode program compiled by XLA:TPU (libtpu, AOT for a v5e chip); then no
  # instruction, fused or not, produces a float array of a weight's size (the MXU reads the
  # int8 weights; converts are absorbed into the dot). A dequantize-first einsum must fail the
  # same check. (Memory alone cannot tell them apart: XLA:TPU fuses a dequantize-first product
  # into the dot's fusion as well, with no buffer, but then scales every weight element on
  # every step where scaling the outputs costs one multiply per output channel.)
  device = _tpu_device()
  monkeypatch.setattr(quant, "einsum", einsum)
  params = jax.eval_shape(lambda: model.init_params(HLO_CFG, jax.random.key(0)))
  mesh = jax.sharding.Mesh(np.array([device]).reshape(1, 1), ("data", "model"))
  fn, args = _decode_args(HLO_CFG, params, shardings=sharding.replicated(mesh))
  compiled = jax.jit(fn).lower(*args).compile()
  copies = _float_weight_values(compiled.as_text(), _weight_sizes(params))
  assert (not copies) == ok, copies[:3]


# ---------------------------------------------------------------------------------------------
# Checkpoints.

def test_int8_checkpoint_round_trip_needs_no_flag(tmp_path):
  # Given int8 params saved with their config; then restore gives the same int8 values and
  # float32 scales (also when floats are cast to bfloat16 on restore), and the stored config
  # says int8, so loading needs no option.
  cfg, params = _int8_gemma2()
  checkpoint.save(tmp_path / "ckpt", params, cfg)
  restored, got_cfg = checkpoint.restore(tmp_path / "ckpt")
  assert got_cfg.quantize == "int8"
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  cast, _ = checkpoint.restore(tmp_path / "ckpt", dtype="bfloat16")
  assert cast["groups"][0]["attn"]["q"]["scale"].dtype == jnp.float32
  assert cast["groups"][0]["attn"]["q"]["w"].dtype == jnp.int8
  assert cast["groups"][0]["attn_norm"].dtype == jnp.bfloat16


def test_hf_conversion_to_int8_equals_quantizing_the_float_conversion_on_load(tmp_path):
  # Given a random transformers Llama in safetensors; when converted with quantize="int8" and
  # without; then the int8 checkpoint loads as int8 with no option, and equals the float one
  # quantized while it loads (spec_tpu.setup with model.quantize=int8), value for value.
  pytest.importorskip("torch")
  import test_hf_parity as parity
  from configs import common as configs_common
  from spec_tpu import setup as common
  from spec_tpu.checkpoints import hf
  torch, transformers = parity._torch()
  parity._build_hf(torch, transformers, "llama_gqa", tmp_path / "hf")
  hf.convert_directory(tmp_path / "hf", tmp_path / "int8", quantize="int8")
  hf.convert_directory(tmp_path / "hf", tmp_path / "float")
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  loaded = {}
  for name, path, option in [("stored", "int8", ""), ("on_load", "float", "int8")]:
    c = configs_common.base()
    c.model = configs_common.model_section(checkpoint=str(tmp_path / path), quantize=option)
    c.engine.k = 0
    setup = common.resolve(c)
    assert setup.target.cfg.quantize == "int8"
    assert setup.target.quantize_on_load == (name == "on_load")
    loaded[name] = common.load_params(setup.target, mesh)
  assert quant.is_quantized(loaded["stored"]["groups"][0]["ffw"]["down"])
  jax.tree.map(np.testing.assert_array_equal, loaded["stored"], loaded["on_load"])
  # Read one leaf at a time (chunks of 1 byte): the same params.
  float_cfg = checkpoint.load_config(tmp_path / "float")
  to = quant.leaf_quantizer(model.param_logical_axes(float_cfg), embed=False)
  one_by_one, _ = checkpoint.restore_transformed(
      tmp_path / "float", shardings=sharding.param_shardings(float_cfg, mesh), transform=to,
      chunk_bytes=1)
  jax.tree.map(np.testing.assert_array_equal, one_by_one, loaded["stored"])
