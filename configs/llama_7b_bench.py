"""Benchmark shapes: a 7B Llama-style target (MHA, SwiGLU, untied) and a small Llama-shaped draft,
with RANDOM weights unless checkpoints are given. Acceptance between two random models is
meaningless, so this setup measures step times, cost ratio c, verification cost and memory
bandwidth; the speedup columns are only as good as the acceptance rate.

    python -m launch.benchmark --config=configs/llama_7b_bench.py --output_dir=/tmp/bench_llama
    python -m launch.plan --config=configs/llama_7b_bench.py --topology=1x8 --batch=8 --context=4096
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="llama_7b", allow_random=True)
  # 134M parameters, Llama-shaped: 12 layers of d_model 768 with the 7B's 32k vocabulary, the
  # size class of the drafts used for 7B targets in the literature (c ~ 0.05 at batch 1).
  c.draft = common.model_section(
      preset="", allow_random=True, name="llama_134m_draft", vocab_size=32_000, d_model=768,
      num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64, ffw_dim=2048,
      ffw_activation="swiglu", norm_eps=1e-5, tie_embeddings=False, dtype="bfloat16")
  # The vocabulary the pair shares is the ModelConfig field (the llama_7b preset's "llama"); the
  # section's own `tokenizer` is a tokenizer file, which random-weight benchmarks do not need.
  c.draft.fields.tokenizer = "llama"
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=1.0, max_new_tokens=128)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 128
  return c
