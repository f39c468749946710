"""Gemma 2 27B verified, Gemma 2 2B drafting (same 256k Gemma tokenizer), tensor parallel over
every device.

    python -m launch.plan --config=configs/gemma2_27b.py --topology=1x16 --batch=1 --context=8192
    python -m launch.sample --config=configs/gemma2_27b.py \
        --config.model.checkpoint=/ckpt/gemma2_27b --config.draft.checkpoint=/ckpt/gemma2_2b \
        --config.model.tokenizer=/ckpt/gemma/tokenizer.model --prompts=prompts.jsonl --output=out.jsonl

Checkpoints come from `python -m launch.convert --from=hf ...`; weights are required (no random
fallback).
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="gemma2_27b")
  c.draft = common.model_section(preset="gemma2_2b")
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 1024
  return c
