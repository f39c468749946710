"""The embedded default: the small target/draft pair shipped in spec_tpu/assets/, trained on Python
source, with its sentencepiece tokenizer and a few built-in prompts.

    python -m launch.sample --config=configs/default.py --prompts=prompts.jsonl --output=out.jsonl
    python -m launch.benchmark --config=configs/default.py --output_dir=/tmp/bench
    python -m launch.serve --config=configs/default.py --port=8000

Trained with `python -m launch.train` (configs/train.py); evaluated with
`python -m launch.evaluate_pair`. Point the fields elsewhere with e.g.
--config.model.checkpoint=/ckpt/target --config.draft.checkpoint=/ckpt/draft.
"""

import os

from configs import common

# Prompts end in the indentation of the next line: the tokenizer attaches whitespace to the end
# of pieces (":\n        " is one token), so a prompt cut right after "\n" would end in a split
# the models never saw in training.
PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    ",
    "import os\n\n\ndef list_python_files(root):\n    ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        ",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "    for i, line in enumerate(lines):\n        if line.startswith('#'):\n            ",
    "def read_json(path):\n    with open(path) as f:\n        ",
)


def get_config(arg=None):
  del arg
  c = common.base(num_slots=4, prompts=PROMPTS, compare_ar=True)
  tokenizer = os.path.join(common.ASSETS_DIR, "stdlib_sp2048.model")
  # float32: the pair is stored in bfloat16, but its ~4 MB of weights cost nothing to run
  # in float32, and bfloat16 activations round a K+1-token verification and a 1-token step
  # differently, which can flip a near-tie and so change the text with K (docs/design.md,
  # "Couplings").
  c.model = common.model_section(checkpoint=os.path.join(common.ASSETS_DIR, "target"),
                                 tokenizer=tokenizer, dtype="float32")
  c.draft = common.draft_section(checkpoint=os.path.join(common.ASSETS_DIR, "draft"),
                                 tokenizer=tokenizer, dtype="float32")
  # The pair was trained on files separated by EOS, never with a BOS in front.
  c.run.add_bos = False
  c.sampling.update(temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=64, seed=0)
  # adaptive_k: the engine calibrates K = 0, 1, 2, 4, 8 on these prompts before the first
  # request and runs the K that pays, K = 0 where speculation does not, so the first command a
  # user runs is never slower than plain decoding (on some machines it would be, at a fixed K).
  # max_len: the pair was trained on 128-token windows; every round attends over the whole
  # slot, so a context far beyond what the models can use only costs time.
  # grammar_states: structured output (response_format); 4 tables (one per slot) of 512
  # states x 1024 token classes (engine.grammar_classes), a class per token and up to 512
  # masks of 2048 bits: 8.6 MiB.
  c.engine.update(k=4, adaptive_k=True, max_len=256, grammar_states=512)
  c.mesh.shape = (1, -1)
  return c
