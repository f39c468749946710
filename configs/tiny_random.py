"""Random-weight tiny target and draft with the shipped tokenizer's 2048-token vocabulary: the
whole pipeline in seconds, for tests and smoke runs (output is noise, acceptance meaningless).

    python -m launch.sample --config=configs/tiny_random.py --prompt="def f(x):"
"""

import os

from configs import common

PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "    for i, line in enumerate(lines):\n        if line.startswith('#'):\n",
    "def read_json(path):\n    with open(path) as f:\n",
)


def get_config(arg=None):
  del arg
  c = common.base(num_slots=4, prompts=PROMPTS, compare_ar=True)
  tokenizer = os.path.join(common.ASSETS_DIR, "stdlib_sp2048.model")
  # The fallback shapes only matter while the checkpoints are missing: tiny, with the
  # tokenizer's 2048-token vocabulary so real prompts can be fed.
  c.model = common.model_section(
      preset="tiny", checkpoint="",
      allow_random=True, tokenizer=tokenizer, name="random_tiny_target", vocab_size=2048)
  c.draft = common.model_section(
      preset="tiny", checkpoint="",
      allow_random=True, tokenizer=tokenizer, name="random_tiny_draft", vocab_size=2048,
      num_layers=1)
  c.engine.k = 4
  c.sampling.update(temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=64, seed=0)
  c.mesh.shape = (1, -1)
  return c
