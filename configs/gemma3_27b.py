"""Gemma 3 27B (text) verified, Gemma 3 1B drafting, tensor parallel over every device.

    python -m launch.plan --config=configs/gemma3_27b.py --topology=1x16 --batch=1 --context=32768
    python -m launch.sample --config=configs/gemma3_27b.py \
        --config.model.checkpoint=/ckpt/gemma3_27b --config.draft.checkpoint=/ckpt/gemma3_1b \
        --config.model.tokenizer=/ckpt/gemma3/tokenizer.model --prompts=prompts.jsonl --output=out.jsonl

The 27B model's embedding table has 262,208 rows and the 1B's 262,144 (the tokenizer's size):
model.fields.valid_vocab_size=262144 (applied over the checkpoint's config too) makes the extra
rows padding that is never sampled, so the pair shares one vocabulary.
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="gemma3_27b", valid_vocab_size=262_144)
  c.draft = common.model_section(preset="gemma3_1b")
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 1024
  return c
