"""vLLM's half of spec_tpu/side_by_side.py, run as a script by the interpreter of a venv that
has vLLM (`python vllm_worker.py JOB_JSON`): it imports only vLLM and the standard library, so
spec_tpu never depends on vLLM. Prints one JSON line: vLLM's version and, per (batch, K), the
best wall time and the best CPU time (this process and every process it started: vLLM runs
its engine and workers in processes of their own) of `repeats` runs after a warm-up, and the
acceptance from vLLM's spec-decode counters (accepted / proposed draft tokens). K > 0 uses
speculative_config method "draft_model" with the pair's draft. The LLM is made under
__main__: vLLM spawns workers. Its KV cache is sized in bytes (kv_cache_memory_bytes), not as
a share of the machine's memory, so it starts on a machine whose memory others use.
"""

import json
import os
import sys
import time

KV_CACHE_BYTES = 1 << 30


def _tree_cpu_seconds() -> float:
  """User + system CPU seconds of this process and all its live descendants (Linux /proc)."""
  parent, ticks = {}, {}
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
      continue
    parent[int(pid)] = int(fields[1])
    ticks[int(pid)] = int(fields[11]) + int(fields[12])
  me, total = os.getpid(), 0
  for pid, t in ticks.items():
    p = pid
    while p > 1 and p != me:
      p = parent.get(p, 0)
    total += t if p == me else 0
  return total / os.sysconf("SC_CLK_TCK")


def _counters(llm) -> dict:
  """vLLM's spec-decode token counters so far (0 where it has none)."""
  out = {"accepted": 0.0, "proposed": 0.0}
  names = {"vllm:spec_decode_num_accepted_tokens": "accepted",
           "vllm:spec_decode_num_draft_tokens": "proposed"}
  for metric in llm.get_metrics():
    if metric.name in names:
      out[names[metric.name]] += float(getattr(metric, "value", 0.0))
  return out


def main(job: dict) -> dict:
  import vllm
  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt

  points = []
  max_len = job["prompt_len"] + job["max_new_tokens"] + max(job["ks"]) + 8
  for k in job["ks"]:
    spec = (None if k == 0 else
            {"method": "draft_model", "model": job["hf_draft"], "num_speculative_tokens": k})
    llm = LLM(model=job["hf_target"], skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max_len, seed=job["seed"], speculative_config=spec,
              disable_log_stats=False, kv_cache_memory_bytes=KV_CACHE_BYTES)
    for b in job["batches"]:
      prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"][:b]]
      params = SamplingParams(temperature=job["temperature"], max_tokens=job["max_new_tokens"],
                              ignore_eos=True, detokenize=False)
      llm.generate(prompts, params, use_tqdm=False)  # warm-up
      before = _counters(llm)
      times, cpu = [], []
      for _ in range(job["repeats"]):
        start, start_cpu = time.perf_counter(), _tree_cpu_seconds()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        cpu.append(_tree_cpu_seconds() - start_cpu)
      after = _counters(llm)
      proposed = after["proposed"] - before["proposed"]
      points.append({"batch": b, "k": k, "seconds": min(times), "cpu_seconds": min(cpu),
                     "acceptance": (after["accepted"] - before["accepted"]) / proposed
                     if k and proposed else None})
    del llm
  return {"version": vllm.__version__, "points": points}


if __name__ == "__main__":
  print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
