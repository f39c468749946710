"""A decode program needs little memory beyond its weights and caches."""

import jax
import numpy as np
import pytest

from spec_tpu import sharding
from spec_tpu import pair as sampler_lib
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, model

# bf16, 16 layers: one layer's float32 copy is 1/8 of the weights, all of them twice the weights.
CFG = config.ModelConfig(name="deep_bf16", vocab_size=512, d_model=256, num_layers=16,
                         num_heads=4, num_kv_heads=2, head_dim=64, ffw_dim=1024,
                         dtype="bfloat16")


def _need_bytes(monkeypatch, options):
  monkeypatch.setattr(sampler_lib, "compiler_options", lambda platform, quantized=False: options)
  params = model.init_params(CFG, jax.random.key(0))
  sampler = Sampler.from_params(params, CFG,
                                mesh=sharding.make_mesh((1, 1), devices=jax.devices()[:1]))
  spec = sampler._spec(k=0, top_k=0, max_new=8, prompt_len=8, coupling="rejection",
                       source=sampler.draft_source)
  mem = sampler._compiled(spec, batch=2, prompt_len=8).memory_analysis()
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  caches = sum(x.nbytes for x in jax.tree.leaves(
      cache_lib.abstract_cache(CFG, 2, spec.max_len, 1)) if hasattr(x, "nbytes"))
  need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  return need, weights + caches


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="XLA:CPU's float32 copies")
def test_bf16_decode_program_on_cpu_needs_at_most_1_2x_weights_and_caches(monkeypatch):
  # Given a bf16 model on CPU, where XLA computes bf16 dots in float32,
  # when its decode program is compiled with the Sampler's options,
  need, floor = _need_bytes(monkeypatch, sampler_lib.compiler_options("cpu"))
  # then it needs at most 1.2x its weights and caches (one layer's float32 copy at a time),
  assert need <= 1.2 * floor, (need / floor)
  # while XLA's default options hoist a float32 copy of every weight out of the layer scan.
  hoisted, _ = _need_bytes(monkeypatch, None)
  assert hoisted > 2.5 * floor, (hoisted / floor)
  np.testing.assert_array_less(need, hoisted)
