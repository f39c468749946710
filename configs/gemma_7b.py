"""Gemma 7B verified, Gemma 2B drafting (same 256k Gemma tokenizer), tensor parallel over every
device.

    python -m launch.plan --config=configs/gemma_7b.py --topology=1x8 --batch=1 --context=8192
    python -m launch.sample --config=configs/gemma_7b.py \
        --config.model.checkpoint=/ckpt/gemma_7b --config.draft.checkpoint=/ckpt/gemma_2b \
        --config.model.tokenizer=/ckpt/gemma/tokenizer.model --prompts=prompts.jsonl --output=out.jsonl

Gemma 2B has one KV head (MQA): its KV cache replicates over the model axis, and the draft's
weights are small enough to replicate too (draft.rules=replicated avoids its collectives).
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="gemma_7b")
  c.draft = common.model_section(preset="gemma_2b", rules="replicated")
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 1024
  return c
