"""A decode program needs little memory beyond its weights and caches."""

import jax
import numpy as np
import pytest

from spec_tpu import sharding
from spec_tpu import pair as sampler_lib
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import config, model

# bf16: a float32 copy of the weights is twice the weights. Each layer's weights (1.9 MB) are
# past CPU_COPY_MIN_BYTES, so the layers run unrolled with their slices copied once per
# program. 2 layers, not more: the compile grows with the unrolled depth, the ratio does not
# (2.06 at 2 layers, 2.04 at 4, 2.02 at 16), and a float32 copy of even one layer's FFW
# weights (+0.75 of the floor here) would cross the bound.
CFG = config.ModelConfig(name="deep_bf16", vocab_size=512, d_model=256, num_layers=2,
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


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="XLA:CPU's weight copies")
def test_bf16_decode_program_on_cpu_holds_at_most_one_bf16_copy_of_its_weights(monkeypatch):
  # Given a bf16 model on CPU, whose matmuls take their bf16 operands as they are
  # (quant.einsum) and whose layers' weight slices are copied once per program, outside the
  # decode loop (model._scan_groups),
  # when its decode program is compiled with the Sampler's options,
  need, floor = _need_bytes(monkeypatch, sampler_lib.compiler_options("cpu"))
  # then it needs at most its weights and caches plus one bf16 copy of the weights: no float32
  # copy of any weight (all of them would make it 3x).
  assert need <= 2.2 * floor, (need / floor)
