"""Gemma 4 31B (text) verified, its assistant drafter (google/gemma-4-31B-it-assistant)
drafting: query-only layers over the target's own caches, no draft cache. Tensor parallel over
every device.

    python -m launch.convert --from=hf --src=/models/gemma-4-31B-it --dst=/ckpt/gemma4_31b
    python -m launch.convert --from=hf --src=/models/gemma-4-31B-it-assistant \
        --dst=/ckpt/gemma4_31b_assistant
    python -m launch.sample --config=configs/gemma4_31b.py \
        --config.model.checkpoint=/ckpt/gemma4_31b \
        --config.draft.checkpoint=/ckpt/gemma4_31b_assistant \
        --config.model.tokenizer=/ckpt/gemma4_31b --prompts=prompts.jsonl --output=out.jsonl
    python -m launch.plan --config=configs/gemma4_31b.py --tpu=v6e:2x4 --topology=1x8 \
        --batch=1 --context=131072 --k=4                                     # needs libtpu

draft.kind=assistant: the assistant reads the target's last local and last global cache and
its final hidden state, and samples its K drafts from its own filtered distribution (the
modified rejection step then accepts sum min(p, q)); draft.greedy=True proposes its argmax
instead. The assistant converts from its Hugging Face directory like any model (its
config.json says Gemma4AssistantForCausalLM); it records no tokenizer of its own when its
directory carries none, and uses the target's.
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base(num_slots=1)
  c.model = common.model_section(preset="gemma4_31b")
  c.draft = common.draft_section(kind="assistant", preset="gemma4_31b_assistant")
  c.engine.k = 4
  c.sampling.update(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256)
  c.mesh.shape = (1, -1)
  c.run.prompt_len = 1024
  return c
