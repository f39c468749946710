"""Chen et al. 2023's setup: Chinchilla 70B verified, a 4B wide-and-shallow draft, 16 devices with
Megatron-style tensor parallelism (mesh 1x16; pass `:2x8` for 2-way data parallelism).

    python -m launch.plan --config=configs/chinchilla_70b.py --topology=1x16 --batch=1 --context=2048
    python -m launch.plan --config=configs/chinchilla_70b.py:2x8 --batch=2
    python -m launch.sample --config=configs/chinchilla_70b.py \
        --config.model.checkpoint=/ckpt/chinchilla_70b --config.draft.checkpoint=/ckpt/chinchilla_4b \
        --config.model.tokenizer=/ckpt/chinchilla.model --prompts=prompts.jsonl --output=out.jsonl

Presets only: the weights must come from checkpoints (allow_random is False, so sampling without
them is an error raised before anything compiles). plan needs no weights.
"""

from configs import common


def get_config(arg=None):
  data, model = (1, 16) if not arg else (int(x) for x in arg.split("x"))
  c = common.base(num_slots=data)
  c.model = common.model_section(preset="chinchilla_70b")
  c.draft = common.model_section(preset="chinchilla_4b_draft")
  # Paper: nucleus sampling on XSum (top_p 0.8), K=4.
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.8, max_new_tokens=128)
  c.mesh.shape = (data, model)
  c.run.prompt_len = 1024
  return c
