"""A list of prompts through the serving engine into a resumable JSONL file: launch.sample's work.

Every prompt is a request, engine.num_slots requests share the engine's slots, and a finished
request's slot is refilled from the queue at once, so one long output does not hold the others
back. Each line is written when its request finishes (spec_tpu/serving/results.py), so lines
come in the order prompts finish, not the order they were given.

A prompt's request samples with a seed derived from (sampling.seed, prompt id) alone, and its
tokens do not depend on what shares the batch. With sampling.coupling='gumbel' (the configs'
default) they do not depend on K either: a resumed run writes for each prompt exactly what an
uninterrupted run would have, whatever K adaptive K picked in either (same prompts, slot count
and seed; bfloat16 models may still part at a near-tie, see decoding/gumbel.py). With
'rejection' that holds at the same K only: adaptive K may pick other K in the resumed run, whose
texts are then equally valid samples of the target, not byte-identical ones.

Adaptive K (engine.adaptive_k): before the first request the engine calibrates every K its
policy may pick on these prompts, with all slots busy, so the first step already runs the K the
measurement favours. With compare_ar the same prompts run again at K = 0 and speedup_vs_ar is
the ratio of the two throughputs (a run adaptive K kept at K = 0 is its own baseline: 1.0).
Without calibration, each K gets an untimed warm-up first: a compiled program's first
execution pays one-off costs that would bias the comparison.

Multi-host: every process builds the same engine; process 0 alone reads and writes the output
file, runs the scheduler and broadcasts each device call's inputs, and the others run the same
calls (Engine.follow) until process 0 shuts the engine down.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

from absl import logging

from spec_tpu import distributed, setup as setup_lib
from spec_tpu.serving import results
from spec_tpu.serving.results import InputError


def _finite(x):
  return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclasses.dataclass
class Totals:
  tokens: int = 0
  seconds: float = 0.0
  calls: int = 0           # every target call, the prefill included
  accepted: int = 0
  judged: int = 0          # draft tokens judged by the target (the a of the speedup formula)
  ks: set = dataclasses.field(default_factory=set)  # every K a step ran with
  ar_tokens: int = 0
  ar_seconds: float = 0.0

  def add(self, stats) -> None:
    self.tokens += stats.new_tokens
    self.calls += stats.target_calls
    self.accepted += stats.accepted
    self.judged += stats.judged
    self.ks.update(stats.ks)

  def summary(self, k: int, random_weights: bool) -> dict:
    tps = self.tokens / self.seconds if self.seconds else float("nan")
    out = {"generated_tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": tps,
           "k": k, "ks_used": sorted(self.ks),
           "acceptance_rate": self.accepted / self.judged if self.judged else float("nan"),
           "tokens_per_target_call": self.tokens / self.calls if self.calls else float("nan"),
           "random_weights": random_weights}
    if self.ar_seconds:
      ar_tps = self.ar_tokens / self.ar_seconds
      out.update(ar_tokens_per_s=ar_tps, speedup_vs_ar=tps / ar_tps)
    return {k_: _finite(v) for k_, v in out.items()}


def drain(engine, requests: list, k: int | None = None, on_finish=None) -> float:
  """Steps the engine (at K = k, default: its policy's) until every request is done, calling
  on_finish with the requests that finished after each step. Returns the seconds it took."""
  pending = list(requests)
  start = time.perf_counter()
  while pending:
    busy = engine.step(k)
    done = [r for r in pending if r.finished]
    if done:
      pending = [r for r in pending if not r.finished]
      if on_finish is not None:
        on_finish(done)
    if not busy and pending:
      raise RuntimeError(f"the engine went idle with {len(pending)} requests unfinished")
  return time.perf_counter() - start


def run(config, flag_prompts, prompts_path, output, compare_ar, multihost=False,
        coordinator=None, num_processes=None, process_id=None,
        append_other_settings=False) -> dict:
  """Samples every prompt (given, or read from prompts_path, else the config's run.prompts)
  into `output` (None: texts to stdout); returns the run's summary. multihost: join the job
  (distributed.init) once the inputs are checked."""
  # Everything that reads only files and the config comes first: bad input fails in seconds, on
  # every process alike, before devices, weights or compiles.
  results.check_not_same_file(prompts_path, output)
  prompts = results.read_prompts(flag_prompts, prompts_path, config.run.prompts)
  setup = setup_lib.resolve(config, need_weights=True)
  settings_ = setup_lib.engine_settings(config)
  tok = setup_lib.load_tokenizer(config, setup)
  if tok is None:
    raise setup_lib.SetupError("model.tokenizer is empty: text prompts need a tokenizer")
  encoded = [tok.encode(p.text, add_bos=bool(config.run.add_bos)) for p in prompts]
  crop_text = None
  if bool(config.run.pan_and_scan) and setup.target.cfg.vision is not None:
    from spec_tpu.models.vision import prompt as image_prompt
    crop_text = image_prompt.crop_text_ids(tok.encode)
  images, laid_out = _read_images(prompts, setup.target.cfg.vision, tok, encoded,
                                  bool(config.run.add_bos), crop_text)
  for p, ids in zip(prompts, encoded):
    if not ids:
      raise InputError(f"prompt {p.id!r} encodes to no tokens (set run.add_bos=True)")
  from spec_tpu.decoding import prompts as prompts_lib
  k_max = settings_.k_max
  max_new = int(config.sampling.max_new_tokens)
  longest = max(range(len(prompts)), key=lambda i: laid_out[i])
  # A slot holds the longest prompt of the whole list (not of what is left to do: a resumed run
  # must run the same programs), its new tokens and a verification block.
  max_len = settings_.context([laid_out[longest]], max_new)
  try:
    prompts_lib.check_fits(laid_out[longest], max_new, max_len, extra=k_max + 1)
  except ValueError as e:
    raise InputError(f"prompt {prompts[longest].id!r}: {e}") from None
  settings = results.run_settings(config, setup, tok, k_max)

  if multihost:
    distributed.init(coordinator, num_processes, process_id)
  import jax
  primary = jax.process_index() == 0

  # Process 0 alone reads the output; every process must stop if it refuses it.
  problem, existing, mixed = None, results.Existing({}, 0, 0), []
  if primary and output:
    try:
      results.check_output_path(output)
      existing = results.read_output(output)
      mixed = results.settings_differences(existing, settings, prompts)
      if mixed and not append_other_settings:
        raise results.mixed_settings_error(output, mixed)
    except InputError as e:
      problem = e
  if not distributed.all_agree(problem is None):
    raise problem or InputError("process 0 refused the output file")
  mesh = setup_lib.build_mesh(config)

  done_keys = set()
  if primary and output:
    if mixed:
      logging.warning("appending to %s, whose lines were written with other settings (%s), as "
                      "--append_other_settings asks; each line records its own", output,
                      "; ".join(mixed))
    results.drop_torn_tail(output, existing)
    done_keys = set(existing.records)
  todo = [i for i, p in enumerate(prompts) if p.key not in done_keys]
  if primary:
    for m in (setup.target, setup.draft):
      if m is not None:
        logging.info("%s", m.describe())
    if done_keys:
      logging.info("resuming: %d of %d prompts already in %s", len(prompts) - len(todo),
                   len(prompts), output)
  note = {"mixed_settings": "; ".join(mixed)} if mixed else {}
  if not distributed.all_agree(bool(todo)):
    return {"generated_tokens": 0, "note": "every prompt already done", **note}

  from spec_tpu.serving import multihost as multihost_lib
  pair = setup_lib.build_pair(setup, mesh, tokenizer=tok)
  channel = (multihost_lib.Channel(settings_.num_slots) if jax.process_count() > 1 else None)
  # Every request shares sampling.top_k (and asks for no logprobs or controls): the engine
  # needs no room for more.
  engine = setup_lib.build_engine(pair, settings_, max_len=max_len,
                                  max_top_k=max(1, setup.sampling.top_k),
                                  per_request_extras=False,
                                  seed=int(config.sampling.seed), channel=channel)
  if not primary:
    engine.follow()  # process 0's device calls, until it shuts the engine down
    return {}
  try:
    return _schedule(engine, config, setup, tok, prompts, encoded, images, todo, output,
                     settings, compare_ar and k_max > 0, note, crop_text=crop_text)
  finally:
    engine.shutdown()


def _read_images(prompts, vision, tok, encoded, add_bos: bool, crop_text=None):
  """Each prompt's images decoded (before any device work, so a bad file fails in seconds),
  its ids with start_of_image where the text marks an image (encoded, in place), and its length
  once the image blocks are laid out (with Pan & Scan's crops where crop_text, its words as
  ids, is given). An image goes where the text says <start_of_image>, or before the text if it
  says it nowhere."""
  from spec_tpu.models.vision import image as image_lib, prompt as image_prompt
  mark = "<start_of_image>"
  images, laid_out = [], []
  for i, p in enumerate(prompts):
    if p.images:
      if vision is None:
        raise InputError(f"prompt {p.id!r} has images, but the model has no vision encoder")
      text = p.text if mark in p.text else mark * len(p.images) + p.text
      if text.count(mark) != len(p.images):
        raise InputError(f"prompt {p.id!r} marks {text.count(mark)} image place(s) with {mark} "
                         f"but lists {len(p.images)} image(s)")
      encoded[i] = (tok.encode("", add_bos=add_bos) + image_prompt.encode_marked(
          tok.encode, text, mark, vision.start_id))
      try:
        images.append([image_lib.to_pil(x, f"prompt {p.id!r} image {x!r}") for x in p.images])
        ids, _ = image_prompt.lay_out(encoded[i], images[-1], vision, f"prompt {p.id!r}",
                                      crop_text)
      except ValueError as e:
        raise InputError(str(e)) from None
      laid_out.append(len(ids))
    else:
      images.append(None)
      laid_out.append(len(encoded[i]))
  return images, laid_out


def _schedule(engine, config, setup, tok, prompts, encoded, images, todo, output, settings,
              compare_ar, note, progress=True, crop_text=None) -> dict:
  """Process 0's part: every prompt left is a request; each finished one is written at once."""

  def submit(i, params):
    return engine.submit(encoded[i], params, images[i], pan_and_scan=crop_text)

  from spec_tpu.serving import GenerationParams
  s, max_new = setup.sampling, int(config.sampling.max_new_tokens)
  seed = int(config.sampling.seed)

  def params(i, max_new_tokens=max_new):
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=float(s.temperature),
                            top_p=float(s.top_p), top_k=int(s.top_k),
                            seed=results.request_seed(seed, prompts[i].key))

  if engine.policy is not None:
    # Every K the policy may pick is compiled and timed with all slots busy on these prompts
    # before the first request, and the first step runs the K the measurement favours.
    report = engine.calibrate([encoded[i] for i in todo], temperature=float(s.temperature))
    logging.info("adaptive K: a round takes %s; K = %d chosen (a = %.3f, expected speedup "
                 "%.2f)", {k: f"{v * 1e3:.2f} ms" for k, v in engine.pacing.round_s.items()},
                 report["chosen_k"], engine.policy.a, engine.policy.speedup())
  elif compare_ar:
    # The first run of a compiled program pays one-off costs (buffers, thread pools): when the
    # two passes are timed against each other, each K gets an untimed run first.
    few = todo[:engine.num_slots]
    for k in (engine.k, 0):
      drain(engine, [submit(i, params(i, min(2, max_new))) for i in few], k)

  from tqdm import tqdm
  bar = tqdm(disable=not progress, total=len(todo), unit="prompt", file=sys.stderr,
             desc="sampling (RANDOM WEIGHTS)" if setup.any_random else "sampling")
  totals = Totals()
  index = {}

  def write(done):
    records = []
    for r in done:
      i = index[r.id]
      c = r.result()
      totals.add(c.stats)
      stats = {"new_tokens": c.stats.new_tokens, "target_calls": c.stats.target_calls,
               "accepted": c.stats.accepted, "acceptance_rate": c.stats.acceptance_rate,
               "tokens_per_target_call": c.stats.tokens_per_target_call,
               "k": results.k_used(c.stats.ks), "seed": r.params.seed}
      records.append({"id": prompts[i].id, "prompt": prompts[i].text,
                      "text": tok.decode(c.tokens), "tokens": c.tokens,
                      "stats": {key: _finite(v) for key, v in stats.items()},
                      "settings": settings})
    if output:
      results.append_lines(output, records)
    else:
      for r in records:
        print(f"=== {r['id']}\n{r['prompt']}{r['text']}", flush=True)
    bar.update(len(records))

  requests = []
  for i in todo:
    r = submit(i, params(i))
    index[r.id] = i
    requests.append(r)
  totals.seconds = drain(engine, requests, on_finish=write)
  bar.close()
  summary = {}
  if engine.policy is not None:
    p = engine.policy
    summary.update(adaptive_a=p.a, adaptive_c=p.c, adaptive_expected_speedup=p.speedup(),
                   adaptive_next_k=p.k)
  if compare_ar:
    if totals.ks <= {0}:  # adaptive K kept speculation off: the run was its own baseline
      totals.ar_tokens, totals.ar_seconds = totals.tokens, totals.seconds
    else:
      ar = [submit(i, params(i)) for i in todo]
      totals.ar_seconds = drain(engine, ar, k=0)
      totals.ar_tokens = sum(len(r.result().tokens) for r in ar)
  return dict(totals.summary(setup.k, setup.any_random), **summary, **note)


