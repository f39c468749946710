"""launch.side_by_side's vLLM half: the worker script's protocol and the table, against a stand-in
vllm package (the real one lives in its own venv; the documented commands run the spec_tpu half
on the real pair)."""

import os
import sys
import textwrap

import pytest

from spec_tpu import side_by_side

# A stand-in for vLLM's offline API as the worker uses it: each generate call proposes 4 draft
# tokens per prompt and accepts 3 when a speculative_config is given.
_FAKE_VLLM = '''
__version__ = "0.0-fake"
class _Metric:
  def __init__(self, name, value): self.name, self.value = name, value
class SamplingParams:
  def __init__(self, **kw): self.kw = kw
class LLM:
  def __init__(self, model, speculative_config=None, **kw):
    assert kw["skip_tokenizer_init"] and kw["dtype"] == "bfloat16", kw
    self.spec, self.accepted, self.proposed = speculative_config, 0, 0
  def generate(self, prompts, params, use_tqdm=True):
    assert params.kw["ignore_eos"] and all(len(p["prompt_token_ids"]) == 3 for p in prompts)
    if self.spec:
      self.proposed += 4 * len(prompts)
      self.accepted += 3 * len(prompts)
  def get_metrics(self):
    return [_Metric("vllm:spec_decode_num_accepted_tokens", self.accepted),
            _Metric("vllm:spec_decode_num_draft_tokens", self.proposed)]
'''


def test_vllm_worker_reports_every_point_and_its_acceptance(tmp_path, monkeypatch):
  # Given a python whose vllm is the stand-in above,
  pkg = tmp_path / "vllm"
  pkg.mkdir()
  (pkg / "__init__.py").write_text(textwrap.dedent(_FAKE_VLLM))
  (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                 "  return {'prompt_token_ids': prompt_token_ids}\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  opts = side_by_side.Options(batches=(1, 2), ks=(0, 4), prompt_len=3, max_new_tokens=5,
                              repeats=2)
  # when the comparison runs vLLM's half through the worker script,
  out = side_by_side.run_vllm(sys.executable, "/pair", opts, [[1, 2, 3], [4, 5, 6]])
  # then every (batch, K) comes back with its tokens/s, and acceptance from the counters.
  assert out["version"] == "0.0-fake"
  got = {(p["batch"], p["k"]): p for p in out["points"]}
  assert sorted(got) == [(1, 0), (1, 4), (2, 0), (2, 4)]
  assert got[(1, 0)]["acceptance"] is None and got[(2, 4)]["acceptance"] == 0.75
  p = got[(2, 4)]
  assert p["tokens_per_s"] == pytest.approx(2 * 5 / p["seconds"])
  # CPU time is read from /proc for the worker's process tree: present, and never above what
  # two cores could spend in the wall time (a second core's share, and the clock's tick).
  assert 0 <= p["cpu_seconds"] <= 2 * p["seconds"] + 0.02
  table = side_by_side.format_table({"points": out["points"], "machine": {"arch": "x", "cpus": 2},
                                     "versions": {"vllm": out["version"]}, "vllm_skipped": ""})
  assert "| 2 | 4 | " in table and "0.750" in table and "tokens/CPU-s" in table


def test_rounds_keep_each_points_least_wall_and_cpu_time():
  # Given one point measured in two rounds, the first faster by the clock, the second by CPU time,
  opts = side_by_side.Options(max_new_tokens=10)
  first = side_by_side._point("vLLM", 1, 4, 2.0, 3.0, opts, 0.5)
  second = side_by_side._point("vLLM", 1, 4, 4.0, 1.0, opts, 0.7)
  other = side_by_side._point("spec_tpu", 1, 4, 1.0, 1.0, opts, 0.6)
  # when the rounds are merged,
  best = {p["system"]: p for p in side_by_side._best([first, other, second])}
  # then each system keeps its own best wall time and best CPU time, and the mean acceptance.
  assert len(best) == 2 and best["spec_tpu"] == other
  v = best["vLLM"]
  assert (v["seconds"], v["tokens_per_s"]) == (2.0, 5.0)
  assert (v["cpu_seconds"], v["tokens_per_cpu_s"]) == (1.0, 10.0)
  assert v["acceptance"] == pytest.approx(0.6)


def test_without_vllm_the_comparison_says_it_is_skipped(monkeypatch):
  monkeypatch.setattr(side_by_side.importlib.util, "find_spec", lambda name: None)
  python, why = side_by_side.find_vllm(None)
  assert python is None and "vLLM skipped" in why
  with pytest.raises(ValueError, match="not an executable"):
    side_by_side.find_vllm(os.devnull)
