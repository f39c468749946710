"""The AMX matmul (spec_tpu/kernels): its products against float64 sums, quant.einsum through it
against XLA's dot, and a model's logits through it against XLA's, at shapes that take one and
several work items and both pool threads. Skipped where the CPU has no AMX or no C++ compiler
builds the kernel."""

import threading

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from spec_tpu.kernels import amx
from spec_tpu.models import quant

pytestmark = pytest.mark.skipif(amx._load() is None, reason="no AMX kernel on this machine")


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
  # The suite simulates 8 CPU devices, where the kernel stands aside (amx.available); these
  # programs run on one, traced where the kernel may be used (as Sampler.generate's are).
  monkeypatch.setattr(amx, "_one_cpu_device", lambda: True)
  with amx.used():
    yield


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


@pytest.mark.parametrize("m,k,n", [(1, 32, 64), (8, 512, 1408), (17, 64, 192), (40, 96, 256)])
def test_matmul_sums_the_products_in_float32(m, k, n):
  rng = np.random.default_rng(m + k + n)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (k, n), 0.05)
  got = np.asarray(jax.jit(lambda x, w: amx.matmul(x, amx.pack(w), n))(x, w))
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  # bf16 x bf16 products are exact in float32; only the float32 running sums round.
  assert got.shape == (m, n) and got.dtype == np.float32
  np.testing.assert_allclose(got, exact, rtol=0, atol=1e-6 * k * np.abs(exact).max())


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("btd,df->btf", (2, 3, 64), (64, 128)),          # a feed-forward weight
    ("btd,hde->bthe", (2, 3, 64), (2, 64, 32)),      # heads-major query projection
    ("bthe,hed->btd", (2, 3, 2, 32), (2, 32, 64)),   # output projection over two axes
    ("btd,vd->btv", (2, 3, 64), (192, 64)),          # a tied head: the weight transposed
])
def test_einsum_matches_xla_dot(spec, x_shape, w_shape, monkeypatch):
  rng = np.random.default_rng(0)
  x, w = _bf16(rng, x_shape), _bf16(rng, w_shape, 0.1)
  run = jax.jit(lambda x, w: quant.einsum(spec, x, w))
  with_amx = run(x, w)
  assert "spec_tpu_amx_matmul" in run.lower(x, w).as_text()
  monkeypatch.setattr(amx, "ENABLED", False)
  jax.clear_caches()
  xla = jax.jit(lambda x, w: quant.einsum(spec, x, w))
  assert "spec_tpu_amx_matmul" not in xla.lower(x, w).as_text()
  expected = xla(x, w)
  assert with_amx.shape == expected.shape and with_amx.dtype == expected.dtype == jnp.bfloat16
  # The same float32 sums up to their order, rounded once to bfloat16: a last-bit difference
  # at most, where a sum sits on a rounding boundary.
  np.testing.assert_allclose(np.asarray(with_amx, np.float32), np.asarray(expected, np.float32),
                             rtol=2 ** -7, atol=1e-6)


def test_float32_logits_match_xla_dot(monkeypatch):
  # The head's product asks for float32 (model.logits_of_hidden): the kernel's sums unrounded.
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, (2, 3, 64)), _bf16(rng, (192, 64), 0.1)
  run = jax.jit(lambda x, w: quant.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32))
  assert "spec_tpu_amx_matmul" in run.lower(x, w).as_text()
  got = run(x, w)
  monkeypatch.setattr(amx, "ENABLED", False)
  jax.clear_caches()
  expected = jax.jit(lambda x, w: quant.einsum("btd,vd->btv", x, w,
                                               preferred_element_type=jnp.float32))(x, w)
  assert got.dtype == expected.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_shapes_off_the_tiles_many_rows_and_held_off_products_keep_xla_dot():
  product = jax.jit(lambda x, w: quant.einsum("bd,df->bf", x, w))
  takes = lambda m, k, n: "spec_tpu_amx_matmul" in product.lower(  # noqa: E731
      jnp.ones((m, k), jnp.bfloat16), jnp.ones((k, n), jnp.bfloat16)).as_text()
  assert takes(amx.MAX_ROWS, 64, 64)
  assert not takes(2, 48, 64) and not takes(2, 64, 96)  # off the tiles
  assert not takes(amx.MAX_ROWS + 1, 64, 64)  # a prefill's rows: YNNPACK's dot
  with amx.held_off():
    held = jax.jit(lambda x, w: quant.einsum("bd,df->bf", x, w))
    text = held.lower(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.bfloat16)).as_text()
  assert "spec_tpu_amx_matmul" not in text


def test_products_traced_outside_used_keep_xla_dot():
  # The default (the engine's programs): another thread, outside this test's amx.used().
  texts = []
  traced = lambda: texts.append(jax.jit(lambda x, w: quant.einsum("bd,df->bf", x, w)).lower(  # noqa: E731
      jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.bfloat16)).as_text())
  thread = threading.Thread(target=traced)
  thread.start()
  thread.join()
  assert len(texts) == 1 and "spec_tpu_amx_matmul" not in texts[0]


def test_model_logits_through_the_kernel_match_xla(monkeypatch):
  # A tiny bfloat16 model whose every product fits the tiles (64-wide, heads of 16).
  from spec_tpu.models import config, model
  cfg = config.get_preset("tiny").replace(dtype="bfloat16", d_model=64, ffw_dim=128,
                                           head_dim=16, num_heads=4, num_kv_heads=4)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  run = jax.jit(model.forward_full, static_argnums=1)
  assert "spec_tpu_amx_matmul" in run.lower(params, cfg, tokens).as_text()
  with_amx = np.asarray(run(params, cfg, tokens))
  monkeypatch.setattr(amx, "ENABLED", False)
  jax.clear_caches()
  xla = np.asarray(jax.jit(model.forward_full, static_argnums=1)(params, cfg, tokens))
  # Equal sums up to their order, so bfloat16 activations may round apart now and then.
  np.testing.assert_allclose(with_amx, xla, rtol=0, atol=0.02 * np.abs(xla).max())
  assert np.mean(np.argmax(with_amx, -1) == np.argmax(xla, -1)) > 0.9
