"""Training the embedded default pair on the Python standard library (see README).

    python -m launch.train --config=configs/train.py:target    # -> spec_tpu/assets/target
    python -m launch.train --config=configs/train.py:distill   # -> spec_tpu/assets/draft (shipped)
    python -m launch.train --config=configs/train.py:draft     # same draft shape, data alone

`distill` needs the target first (it is the teacher). `draft` exists for the comparison in
`python -m launch.evaluate_pair` and writes outside the repo. Training stops at `steps` or after
`seconds` of wall time, whichever comes first: the budgets below were set for a 2-core CPU.
Override any field, e.g. --config.seconds=3600 --config.steps=20000.
"""

import ml_collections

# ~3.7M params, Llama-style (GQA + SwiGLU, tied embeddings): the shape of many users' models.
TARGET = dict(name="stdlib_target", vocab_size=2048, d_model=256, num_layers=4, num_heads=4,
              num_kv_heads=2, head_dim=64, ffw_dim=768, tie_embeddings=True)
# ~0.4M params, ~9x smaller: 2 layers (shallow, as in Chen et al.); half its params are the
# embedding table, which a 2048-token vocab makes the floor of any draft.
DRAFT = dict(name="stdlib_draft", vocab_size=2048, d_model=96, num_layers=2, num_heads=2,
             num_kv_heads=1, head_dim=48, ffw_dim=256, tie_embeddings=True)


def get_config(arg="target"):
  if arg not in ("target", "distill", "draft"):
    raise ValueError(f"configs/train.py takes target, distill or draft, not {arg!r}")
  c = ml_collections.ConfigDict()
  c.mode = arg
  c.model = ml_collections.ConfigDict(TARGET if arg == "target" else DRAFT)
  if arg == "draft":
    c.model.name = "stdlib_draft_data_only"
  c.tokenizer = ""  # empty: the shipped spec_tpu/assets/stdlib_sp2048.model
  c.teacher = "spec_tpu/assets/target" if arg == "distill" else ""
  c.output = {"target": "spec_tpu/assets/target", "distill": "spec_tpu/assets/draft",
              "draft": "/tmp/spec_assets/draft_data"}[arg]
  c.steps = 100_000           # effectively unbounded: the wall-clock budget decides
  c.seconds = 1200.0 if arg == "target" else 480.0
  c.batch = 16
  c.seq_len = 128
  c.lr = 3e-3 if arg == "target" else 5e-3
  c.warmup_steps = 50
  c.eval_windows = 256        # held-out (seq_len + 1)-token windows scored for heldout_loss
  c.seed = 0
  c.save_dtype = "bfloat16"   # halves the checkpoint; the sampler computes in float32 anyway
  c.overwrite = False
  return c
