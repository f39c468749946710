"""The shipped pair (spec_tpu/assets) loads, matches its tokenizer and samples meaningfully.
It is not retrained here: `python -m launch.train` makes it (see README)."""

import os


from spec_tpu.checkpoints import checkpoint
from spec_tpu import tokenizer as tokenizer_lib
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams

ASSETS = os.path.join(os.path.dirname(tokenizer_lib.__file__), "assets")


def test_shipped_pair_loads_and_samples_with_meaningful_acceptance():
  tok = tokenizer_lib.load()
  t_params, t_cfg = checkpoint.restore(os.path.join(ASSETS, "target"))
  d_params, d_cfg = checkpoint.restore(os.path.join(ASSETS, "draft"))
  assert t_cfg.tokenizer == d_cfg.tokenizer == tok.name
  assert d_cfg.num_params() * 5 < t_cfg.num_params()
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ASSETS) for f in fs)
  assert size <= 20 * 2**20
  # Prompts end mid-line: the tokenizer attaches whitespace to the end of pieces (":\n    " is one
  # token), so a prompt ending in a bare "\n" is a split the models never saw in training.
  prompts = [tok.encode("def read_json(path):\n    with open(path) as f:\n        return json."),
             tok.encode("class Stack:\n    def __init__(self):\n        self.items = ")]
  sampler = Sampler.from_params(t_params, t_cfg, draft_params=d_params, draft_cfg=d_cfg, eos_ids=tok.eos_ids)
  result = sampler.generate(prompts, max_new_tokens=16, k=4, sampling=SamplingParams(0.0))
  texts = [tok.decode(t) for t in result.tokens]
  assert all(texts) and all(len(t) == 16 or t[-1] in tok.eos_ids for t in result.tokens)
  # A trained pair agrees far more often than chance (1 / 2048).
  assert result.acceptance_rate() > 0.2
