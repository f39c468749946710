"""RecurrentGemma 9B verified, RecurrentGemma 2B drafting (Griffin: recurrent + local attention
layers; same 256k Gemma tokenizer), tensor parallel over every device.

    python -m launch.plan --config=configs/recurrentgemma_9b.py --topology=1x8 --batch=1 --context=8192
    python -m launch.sample --config=configs/recurrentgemma_9b.py \
        --config.model.checkpoint=/ckpt/recurrentgemma_9b --config.draft.checkpoint=/ckpt/recurrentgemma_2b \
        --config.model.tokenizer=/ckpt/gemma/tokenizer.model --prompts=prompts.jsonl --output=out.jsonl

Checkpoints come from `python -m launch.convert --from=hf` (RecurrentGemmaForCausalLM) or
`--from=reference` (the recurrentgemma package's released orbax params). Without them,
--config.model.allow_random=True --config.draft.allow_random=True runs random weights (shapes,
memory and speed only). Both models' caches are O(window), not O(context): per recurrent layer a
float32 state and 3 conv inputs, per attention layer a ring of 2049 + K + 1 slots; launch.plan
reports the states and the verification traces (the state after each of the K + 1 positions,
kept until the rollback selects one).
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="recurrentgemma_9b")
  c.draft = common.model_section(preset="recurrentgemma_2b")
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 1024
  return c
