"""Gemma 7B verified, RecurrentGemma 2B drafting: a transformer target with a recurrent (Griffin)
draft, which only a decoder that runs both kinds of layer can pair. They share the 256k Gemma
tokenizer, so the draft's proposals are the target's tokens.

    python -m launch.plan --config=configs/gemma_rg_pair.py --topology=1x8 --batch=1 --context=8192
    python -m launch.sample --config=configs/gemma_rg_pair.py \
        --config.model.checkpoint=/ckpt/gemma_7b --config.draft.checkpoint=/ckpt/recurrentgemma_2b \
        --config.model.tokenizer=/ckpt/gemma/tokenizer.model --prompts=prompts.jsonl --output=out.jsonl

The draft's cache is O(window) whatever the context (a float32 state per recurrent layer), and
its rollback selects among the states its K steps left (models/recurrent.py). Random weights:
--config.model.allow_random=True --config.draft.allow_random=True.
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="gemma_7b")
  c.draft = common.model_section(preset="recurrentgemma_2b")
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 1024
  return c
