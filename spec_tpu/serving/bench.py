"""launch.serve_bench's work: the serving engine against fixed batches, and its latency under
concurrent clients.

Workload: --requests prompts (the config's run.prompts, cycled), each generating up to
--max_new_tokens with the config's sampling settings and its own seed, ending at an end token
(--end_text, default the tokenizer's EOS). The embedded pair rarely writes EOS within a few
hundred tokens, so its figures use --end_text='return ' (one token of its vocabulary): output
lengths then vary from a few tokens to the maximum, as EOS makes them vary in real traffic. A
fixed batch waits for its longest row; the engine refills a slot as soon as it frees.

1. Throughput (tokens per second of wall time over the whole workload, and per second of
   process CPU time, which other jobs on a shared machine do not inflate; compiles excluded;
   the fastest of --repeats runs with the modes taking turns): fixed batches of --num_slots
   requests (`Sampler.generate`, as launch.benchmark runs them) at K = 0 and at engine.k,
   against the engine with --num_slots slots at K = 0 and with adaptive K (calibrated first;
   the K's it ran are reported, and the seconds its calibration and compiles took at start;
   without a draft, the engine at K = 0 alone). With --draft_kinds, one adaptive engine per
   draft.kind instead of fixed batches at engine.k, all taking turns in the one process.
2. Latency at each --clients count: that many client threads, each submitting a request,
   reading its stream and submitting the next (closed loop) until --latency_requests are done,
   on the adaptive engine running on its background thread. Time to first token (submission
   to first chunk, queueing included) and inter-token latency ((last chunk - first chunk) /
   (tokens - 1) per request), median and 90th percentile, and tokens/s.

Writes results.json, table.txt (also printed) and serve_bench.png.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import threading
import time

from absl import logging
import jax

from spec_tpu import reports, setup as common
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.serving.request import GenerationParams
from spec_tpu.setup import SetupError


def _percentile(xs, q):
  xs = sorted(x for x in xs if math.isfinite(x))
  if not xs:
    return float("nan")
  return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _end_ids(tok, end_text):
  if not end_text:
    return tok.eos_ids, "EOS"
  ids = tok.encode(end_text)
  if len(ids) != 1:
    raise SetupError(f"--end_text={end_text!r} is {len(ids)} tokens; it must be one")
  return ids, repr(end_text)


WORKLOADS = ("prompts", "rewrite")


def workload_texts(config, tok, workload: str, count: int) -> list[str]:
  """The prompts of a workload: 'prompts' the config's run.prompts; 'rewrite' that many
  "rewrite this function" prompts over held-out standard-library code (the output can copy
  the prompt: where n-gram drafts pay; decoding/source_bench.py)."""
  if workload == "prompts":
    return list(config.run.prompts)
  if workload != "rewrite":
    raise SetupError(f"--workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
  from spec_tpu.decoding import source_bench
  from spec_tpu.training import corpus
  _, heldout = corpus.split(corpus.stdlib_files())
  return source_bench.rewrite_prompts(heldout, tok, count)


def run(config, output_dir, requests, max_new, num_slots, clients, latency_requests,
        end_text, repeats=2, workload_kind="prompts", draft_kinds=None) -> dict:
  """draft_kinds: draft.kind values (model, ngram, hybrid, auto) whose adaptive engines are
  timed side by side, taking turns with the baselines; None: the config's draft.kind alone,
  with fixed batches at engine.k as well."""
  kinds = [str(k).strip() for k in draft_kinds] if draft_kinds else None
  if kinds is not None and (not all(kinds) or len(set(kinds)) != len(kinds)):
    raise SetupError(f"--draft_kinds must name distinct kinds, got {','.join(kinds)}")
  own_kind = str(config.draft.get("kind", "model"))
  configs = {}
  for kind in kinds or [own_kind]:
    c = config.copy_and_resolve_references()
    c.draft.kind = kind
    configs[kind] = c
  config = next(iter(configs.values()))  # baselines, latency and the header run on the first
  setup = common.resolve(config, need_weights=True)
  tok = common.load_tokenizer(config, setup)
  if tok is None or not len(config.run.prompts):
    raise SetupError("serve_bench needs a tokenizer and run.prompts")
  settings = common.engine_settings(config)
  if num_slots:
    settings = dataclasses.replace(settings, num_slots=int(num_slots))
  num_slots = settings.num_slots
  if not clients or min(requests, max_new, num_slots, repeats, latency_requests, *clients) < 1:
    raise SetupError("--requests, --max_new_tokens, --num_slots, --clients, --repeats, "
                            "--latency_requests must be >= 1")
  k = setup.k
  if kinds is not None and k < 1:
    raise SetupError(f"--draft_kinds compares speculative engines; engine.k is {k}")
  setups = {kind: common.resolve(c, need_weights=True) if c is not config else setup
            for kind, c in configs.items()}  # every kind's errors before any compile
  reports.make_output_dir("output_dir", output_dir)
  end_ids, end_name = _end_ids(tok, end_text)
  add_bos = bool(config.run.add_bos)
  texts = workload_texts(config, tok, workload_kind, min(requests, 16))
  encoded = [tok.encode(p, add_bos=add_bos) for p in texts]
  workload = [encoded[i % len(encoded)] for i in range(requests)]
  s = setup.sampling
  params = [GenerationParams(max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p,
                             top_k=s.top_k, seed=i) for i in range(requests)]
  mesh = common.build_mesh(config)
  pair = common.build_pair(setup, mesh, tokenizer=tok, eos_ids=end_ids)
  sampler = Sampler(pair, coupling=setup.coupling)
  max_len = settings.context([len(p) for p in encoded], max_new)
  drafts = [st.draft for st in setups.values() if st.draft]
  result = dict(target=setup.target.describe(), draft=drafts[0].describe() if drafts else None,
                draft_kind=",".join(kinds or [own_kind]),
                random_weights=setup.any_random, device=str(jax.devices()[0]),
                num_devices=jax.device_count(), num_slots=num_slots, requests=requests,
                max_new_tokens=max_new, end_token=end_name, workload=workload_kind,
                sampling=dataclasses.asdict(s), throughput=[], latency=[])

  # 1. Throughput: fixed batches vs the engine. Every mode is compiled (and the adaptive
  # engine calibrated) first; then the modes run in turn, --repeats times, and each keeps its
  # fastest run, so a busy spell of a shared machine does not land on one mode alone.
  batches = [workload[i:i + num_slots] for i in range(0, requests, num_slots)]
  pad = lambda b: b + [b[0]] * (num_slots - len(b))  # one compiled shape for every batch

  def fixed(kk):
    def run_once():
      tokens = judged = accepted = 0
      for i, b in enumerate(batches):
        res = sampler.generate(pad(b), max_new_tokens=max_new, k=kk, sampling=s, seed=i)
        tokens += sum(len(t) for t in res.tokens[:len(b)])
        if kk:
          judged += int(res.reached[:len(b)].sum())
          accepted += int(res.accepted[:len(b)].sum())
      return tokens, accepted, judged, ((), ()), None
    sampler.generate(pad(batches[0]), max_new_tokens=max_new, k=kk, sampling=s)  # compiles
    return run_once

  def engine(adaptive, kind_pair=pair, kind_config=config):
    # The engine launch.serve runs (engine.*), adaptive or held at K = 0.
    kind_settings = dataclasses.replace(common.engine_settings(kind_config), num_slots=num_slots)
    mode = (dataclasses.replace(kind_settings, adaptive_k=True,
                                k_max=max(k, int(kind_config.engine.k_max)))
            if adaptive and k > 0 else
            dataclasses.replace(kind_settings, k=0, k_max=0, adaptive_k=False, sources=None))
    e = common.build_engine(kind_pair, mode, max_len=max_len, max_top_k=max(int(s.top_k), 1),
                            per_request_extras=False, seed=int(kind_config.sampling.seed))
    # Calibration and compiles: what a server pays once at start, reported, never timed.
    start = time.perf_counter()
    report = e.calibrate(encoded, temperature=s.temperature) if adaptive else None
    e.warm_up([e.k], [len(p) for p in encoded])
    startup = time.perf_counter() - start

    def run_once():
      done = e.generate(workload, params)
      ks = tuple(sorted({kk for c in done for kk in c.stats.ks}))
      sources = {src for c in done for src in c.stats.sources}
      return (sum(len(c.tokens) for c in done), sum(c.stats.accepted for c in done),
              sum(c.stats.judged for c in done), (ks, tuple(sorted(sources))),
              [len(c.tokens) for c in done])
    return e, report, run_once, startup

  adaptive = {}  # kind -> (engine, calibration report, run, startup seconds)
  for kind, c in configs.items():
    kind_pair = pair if c is config else common.build_pair(setups[kind], mesh, tokenizer=tok,
                                                           eos_ids=end_ids)
    adaptive[kind] = engine(True, kind_pair, c)
  first = next(iter(adaptive.values()))
  adaptive_engine = first[0]
  plain_run = engine(False)[2] if k else first[2]  # without speculation they are one
  modes = [("fixed batches", "0", None, fixed(0))]
  if k and kinds is None:
    modes.append(("fixed batches", str(k), None, fixed(k)))
  modes.append(("engine", "0", None, plain_run))
  if k:
    modes += [("engine", "adaptive", kind, a[2]) for kind, a in adaptive.items()]
  best = {}
  for _ in range(repeats):
    for name, kk, kind, run_once in modes:
      start, cpu_start = time.perf_counter(), time.process_time()
      tokens, accepted, judged, ks, lengths = run_once()
      seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
      if lengths is not None:
        result["output_lengths"] = dict(mean=statistics.mean(lengths), min=min(lengths),
                                        max=max(lengths))
      key = (name, kk, kind)
      cheapest_cpu = min(cpu_s, best.get(key, {}).get("cpu_seconds", cpu_s))
      if key not in best or seconds < best[key]["seconds"]:
        best[key] = dict(mode=name, k=kk, draft_kind=kind, tokens=tokens, seconds=seconds,
                         tokens_per_s=tokens / seconds,
                         acceptance=accepted / judged if judged else None,
                         ks_used=list(ks[0]), sources_used=list(ks[1]))
      # Wall and CPU figures are each the best of the runs (not necessarily the same run).
      best[key].update(cpu_seconds=cheapest_cpu, tokens_per_cpu_s=tokens / cheapest_cpu)
      logging.info("%s K=%s %s: %.1f tokens/s, %.1f tokens/cpu-s", name, kk, kind or "",
                   tokens / seconds, tokens / cpu_s)
  for name, kk, kind, _ in modes:
    row = best[(name, kk, kind)]
    if kk == "adaptive":
      e, report, _, startup = adaptive[kind]
      used = ",".join(map(str, row["ks_used"]))
      if len(e.sources) > 1:  # which draft kinds the policy picked
        used += " " + "+".join(row["sources_used"])
      row.update(k="adaptive: " + used, calibration=report, startup_seconds=startup)
      if kinds is not None:
        row["mode"] = f"engine ({kind})"
    result["throughput"].append(row)

  # 2. Latency under concurrent clients (the first kind's adaptive engine, on its own thread).
  e = adaptive_engine.start()
  try:
    for c in clients:
      per_client = max(1, math.ceil(latency_requests / c))
      records, lock = [], threading.Lock()

      def client(ci):
        for j in range(per_client):
          i = (ci * per_client + j) % requests
          r = e.submit(workload[i], params[i])
          first = last = None
          for _ in r:
            last = time.perf_counter()
            first = first or last
          n = len(r.tokens)
          with lock:
            records.append(dict(ttft=first - r.submitted, tokens=n,
                                itl=(last - first) / (n - 1) if n > 1 else float("nan"),
                                start=r.submitted, end=last))

      threads = [threading.Thread(target=client, args=(ci,)) for ci in range(c)]
      start = time.perf_counter()
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      seconds = time.perf_counter() - start
      ttft, itl = [r["ttft"] for r in records], [r["itl"] for r in records]
      result["latency"].append(dict(
          clients=c, requests=len(records), tokens_per_s=sum(r["tokens"] for r in records) / seconds,
          ttft_p50_ms=1e3 * _percentile(ttft, 0.5), ttft_p90_ms=1e3 * _percentile(ttft, 0.9),
          itl_p50_ms=1e3 * _percentile(itl, 0.5), itl_p90_ms=1e3 * _percentile(itl, 0.9),
          k=e.k, rounds_per_step=e.pacing.rounds(e.k)))
      logging.info("%d clients: %s", c, result["latency"][-1])
  finally:
    e.shutdown()

  reports.write_results(output_dir, result, format_table(result))
  plot(result, os.path.join(output_dir, "serve_bench.png"))
  return result


def _cell(x, fmt):
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def format_table(r: dict) -> str:
  lines = [f"target: {r['target']}", f"draft:  {r['draft']} (kind {r['draft_kind']})",
           f"workload: {r.get('workload', 'prompts')}",
           f"device: {r['num_devices']} x {r['device']}; {r['num_slots']} slots; "
           f"{r['requests']} requests of <= {r['max_new_tokens']} tokens ending at "
           f"{r['end_token']} (lengths {r['output_lengths']['min']}..."
           f"{r['output_lengths']['max']}, mean {r['output_lengths']['mean']:.1f})"]
  if r["random_weights"]:
    lines.append("RANDOM WEIGHTS: acceptance (and so speedup) is not meaningful")
  base = next(t for t in r["throughput"] if t["mode"] == "fixed batches")
  lines += ["", f"{'mode':>15}  {'K':>14}  {'tokens/s':>9}  {'vs fixed K=0':>12}  "
            f"{'tokens/cpu-s':>12}  {'vs fixed K=0':>12}  {'a':>6}  {'startup s':>9}"]
  for t in r["throughput"]:
    lines.append(f"{t['mode']:>15}  {t['k']:>14}  {t['tokens_per_s']:9.1f}  "
                 f"{t['tokens_per_s'] / base['tokens_per_s']:11.2f}x  "
                 f"{t['tokens_per_cpu_s']:12.1f}  "
                 f"{t['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:11.2f}x  "
                 f"{_cell(t.get('acceptance'), '{:.3f}'):>6}  "
                 f"{_cell(t.get('startup_seconds'), '{:.1f}'):>9}")
  lines += ["", f"{'clients':>7}  {'requests':>8}  {'tokens/s':>9}  {'TTFT p50':>9}  "
            f"{'TTFT p90':>9}  {'ITL p50':>8}  {'ITL p90':>8}  {'K':>2}  {'N':>3}"]
  for t in r["latency"]:
    lines.append(f"{t['clients']:7d}  {t['requests']:8d}  {t['tokens_per_s']:9.1f}  "
                 f"{_cell(t['ttft_p50_ms'], '{:.1f}'):>6} ms  "
                 f"{_cell(t['ttft_p90_ms'], '{:.1f}'):>6} ms  "
                 f"{_cell(t['itl_p50_ms'], '{:.2f}'):>5} ms  {_cell(t['itl_p90_ms'], '{:.2f}'):>5} ms"
                 f"  {t['k']:>2}  {t['rounds_per_step']:>3}")
  return "\n".join(lines)


def plot(r: dict, path: str) -> None:
  plt = reports.pyplot(path)
  if plt is None:
    return
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  labels = [f"{t['mode']}\nK={t['k']}" for t in r["throughput"]]
  ax1.bar(range(len(labels)), [t["tokens_per_s"] for t in r["throughput"]],
          color=["#999999" if t["mode"] != "engine" else "#3b75af" for t in r["throughput"]])
  ax1.set_xticks(range(len(labels)), labels, fontsize=7)
  ax1.set_ylabel("tokens/s")
  ax1.set_title(f"{r['requests']} requests, {r['num_slots']} slots")
  c = [t["clients"] for t in r["latency"]]
  ax2.plot(c, [t["ttft_p50_ms"] for t in r["latency"]], "o-", label="TTFT p50")
  ax2.plot(c, [t["itl_p50_ms"] for t in r["latency"]], "s-", label="inter-token p50")
  ax2.set_xscale("log")
  ax2.set_yscale("log")
  ax2.set_xticks(c, [str(x) for x in c])
  ax2.set_xlabel("concurrent clients")
  ax2.set_ylabel("ms")
  ax2.legend(fontsize=8)
  ax2.set_title("latency (adaptive engine)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
