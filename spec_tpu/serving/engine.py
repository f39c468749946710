"""The serving engine: continuous batching over fixed slots, exact speculative sampling.

    engine = Engine(pair, num_slots=8, max_len=1024, k=4)   # pair: spec_tpu.pair.Pair
    engine.start()                       # a background thread owns the device from here on
    request = engine.submit("def fib(n):", GenerationParams(max_new_tokens=64, temperature=0.8))
    for chunk in request:                # or `async for chunk in request`, or request.result()
      print(chunk.text, end="")
    print(request.stats.acceptance_rate)
    engine.shutdown()

Without start() the caller drives it: `engine.step()` until it returns False, or
`engine.generate(prompts, params)` for a list.

Slots. The batch is `num_slots` rows whose target and draft caches and token buffers stay on
device between calls, donated to every program (XLA updates them in place). Each row sits at
its own position and carries its own temperature, top-p, top-k, random stream and token budget,
so one compiled program serves any mix of requests.

insert. Waiting requests are prefilled into free slots, `prefill_rows` per call, one program
per prompt bucket (power of two). The width is fixed so that a request's prefill always runs in
the same program shape, whatever arrives with it: with a seed its tokens then do not depend on
the other requests (on XLA:CPU a batch of 1 or 2 rows rounds differently from 4). The n
samples of one prompt (submit_all's share_prefill) admitted together share one prefill, its
cache rows written to each one's slot (decode.insert's fan), each drawing its first token with
its own settings and stream. The prefill's token is returned at once: time to first token is
queueing plus one prefill.

step. One program per K runs up to N speculative rounds for every live slot in one device call
(decode.run_rounds, the loop Sampler.generate runs too), stopping early when no slot runs or,
while requests wait, as soon as a slot frees up. Between steps the host delivers tokens
(detokenising, checking stop strings), frees finished and cancelled slots and admits requests.

N (rounds per step) trades host round-trips against streaming granularity: see pacing.py.

K (draft tokens per round) comes from `k_policy.AdaptiveK`, owned here, choosing among `ks`
(0, the starting K and powers of two up to k_max): each is a compiled step program, compiled
and timed by `calibrate()` before serving, so a change of K never waits for a compile.
Calibration runs every slot busy and times a round at each K as this engine pays it (its slot
count, its draft, verification, sampling and all; on the CPU backend in process CPU time, which
other processes on a shared machine do not inflate), and measures the acceptance a; after
that every window of `window_rounds` rounds refreshes a. The choice maximises the expected
tokens per unit time, (1 + a + ... + a^K) / (t_K / t_0), with the measured round times t_K
rather than a cost modelled as linear in K from one K (no assumption about how verification
grows with K, and a noisy timing at one K cannot move the others), and is K = 0 unless that
beats plain decoding by the margin (10%); while off, one window in `probe_every` runs the
smallest K to re-measure a. Round costs
are not re-measured from traffic: every slot is computed whether it holds a request or not,
so a round costs the same at any occupancy (which is also why occupancy does not enter the
formula), and timings taken while the process streams to clients are noisier than the
calibration's. The caches keep k_max + 1 slots of rollback slack so any K <= k_max can run on
them. At K = 0 the draft is not run at all, not even at insert; a later speculative step first
feeds it the tokens it missed (decode.catch_up_draft).

Per request beyond the filters: logprobs (each emitted token's log-probability under the
target's distribution it follows, and the top `logprobs_k`, recorded on device beside the
tokens), with `controls=True` penalties, min_p and logit_bias (decode.Controls), and with
`grammar_states` > 0 structured output (GenerationParams.grammar: a regex or JSON schema
compiled by `grammars`, held on device as a token-class automaton with bit-packed masks, one
table per grammar in use, shared by the slots that use it: grammar_tables.py,
decoding/grammar.py). `score`
runs one forward over a prompt between steps for its tokens' logprobs (echo). `max_queue`
bounds the requests waiting for a slot: past it submit raises QueueFullError.

Draft sources: `draft_source` (default: the pair's) is the draft model, prompt lookup
(n-gram: no draft model, a round costs one verification) or hybrid (draft_source.py). A
position the lookup left empty counts as a judged, rejected draft (a round yields what it
yields), so the same formula picks K, 0 where the lookup rarely matches. With several
`sources` the policy picks the source per step too: calibration times a round of every
(source, K) and measures each source's acceptance, windows refresh the acceptance of the
source that ran, and a source not run for `probe_every` windows is probed at the smallest K
(k_policy.py). One step program per (source, K); n-gram and K = 0 steps leave the draft model
behind, and the next step that drafts with it catches it up first. Gemma 4's assistant drafter
(source 'assistant') reads the target's caches and keeps no cache of its own: each row's
target final hidden state lives in the state (written by insert, updated by every round at
any K, K = 0 included), so a slot reused by a new request, a rollback or a K = 0 spell leaves
nothing to catch up.

Random numbers: request r draws from the stream (seed_r mod 2^32, seed_r div 2^32): its output
law never depends on the batch, and with a seed neither do its tokens. The coupling (engine-wide,
`coupling`; decode.COUPLINGS) decides what else they depend on: with 'gumbel' nothing (not the
K the policy picks, the draft source, the slot); with 'rejection' the K of each of its rounds
(its keys come from its round counter). Sampler.generate's row i with seed s is the request
with seed s + i * 2^32 (under the same coupling).

Multi-host: every process builds the same Engine; process 0 runs the scheduler (and the HTTP
front end) and broadcasts each device call's inputs (`multihost.Channel`) before running it;
the other processes run `follow()`, which receives and runs the same calls.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import numbers
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from spec_tpu import profiling, program_cache, sharding
from spec_tpu.decoding import decode, k_policy, prompts as prompts_lib
from spec_tpu.decoding.draft_source import DraftSource
from spec_tpu.decoding.sampler import to_host
from spec_tpu.models.vision import image as image_lib, prompt as image_prompt
from spec_tpu.pair import Pair
from spec_tpu.serving import grammar_tables as grammar_tables_lib, metrics as metrics_lib
from spec_tpu.serving.pacing import Pacing
from spec_tpu.serving.request import (ABORTED, CANCELLED, LENGTH, STOP, Completion,
                                      GenerationParams, Request, TokenLogprob)


_KEEPALIVE_S = 10.0  # multi-host: an idle leader still broadcasts this often


class ContextLengthError(ValueError):
  """A request does not fit a slot: prompt + max_new_tokens + k_max + 1 > max_len."""


class QueueFullError(RuntimeError):
  """The queue holds max_queue requests already: try again later (the server's 503)."""


@dataclasses.dataclass
class _Slot:
  request: Request
  ks: set
  sources: set = dataclasses.field(default_factory=set)
  rounds: int = 0
  accepted: int = 0
  judged: int = 0
  ngram_accepted: int = 0
  ngram_judged: int = 0
  mask_rejected: int = 0


def _token_logprobs(tokens, logprobs: decode.Logprobs, top: int | None
                    ) -> list[TokenLogprob] | None:
  """A request's view of the device's logprobs of its new tokens (None: it did not ask)."""
  if top is None:
    return None
  token = logprobs.token.tolist()
  ids, lps = logprobs.top_ids[:, :top].tolist(), logprobs.top[:, :top].tolist()
  return [TokenLogprob(t, token[j], tuple(zip(ids[j], lps[j]))) for j, t in enumerate(tokens)]


@functools.lru_cache(maxsize=64)
def _abstract_state(spec: decode.LoopSpec, num_slots: int) -> decode.State:
  """The resident state's shapes and dtypes, traced once per (spec, slots) in a process."""
  return jax.eval_shape(functools.partial(decode.init_state, spec, num_slots))


def _insert(spec: decode.LoopSpec, with_draft: bool, *args):
  """The insert program: decode.insert's arguments, then the prompts' images when it takes
  them (a module-level function: the process-wide program cache keys on it)."""
  return decode.insert(spec, *args[:7], with_draft=with_draft,
                       pixels=args[7] if len(args) > 7 else None)


class Engine:
  """Fixed slots, resident caches, an insert program per prompt bucket and a step program
  per K. Not thread-safe except `submit`, `Request` methods, `metrics` and `shutdown`: one
  thread (start()'s, or the caller's) runs `step`."""

  def __init__(self, pair: Pair, *, num_slots: int = 8, max_len: int = 1024,
               k: int | None = None, k_max: int | None = None, adaptive_k: bool = True,
               max_top_k: int = 64, rounds_per_step: int | None = None,
               max_rounds_per_step: int = 16, prefill_rows: int = 1, tokenizer=None,
               ks: Sequence[int] | None = None, add_bos: bool = False,
               min_prompt_bucket: int = 16, window_rounds: int = 64, probe_every: int = 16,
               margin: float = 0.1, seed: int = 0, channel=None, coupling: str = "rejection",
               max_queue: int | None = None, logprobs_k: int = 0, controls: bool = False,
               max_logit_bias: int = 300, draft_source: DraftSource | None = None,
               grammar_states: int = 0, grammar_classes: int | None = None,
               grammar_masks: int | None = None, grammar_tables: int | None = None,
               sources: Sequence[str] | None = None):
    decode.check_coupling(coupling)
    # Where proposals come from (default: the pair's); an n-gram source needs no model.
    source = pair.draft_source if draft_source is None else pair.check_source(draft_source)
    # The draft kinds the K policy may choose among per step (default: the source's alone).
    sources = (source.kind,) if sources is None else tuple(dict.fromkeys(sources))
    for kind in sources:
      pair.check_source(dataclasses.replace(source, kind=kind))
    if len(sources) > 1 and "model" in sources and not pair.has_draft:
      raise ValueError("draft kind 'model' needs a draft model; this pair has none")
    if len(sources) > 1 and not adaptive_k:
      raise ValueError(f"choosing among draft sources {sources} needs adaptive_k")
    if len(sources) > 1 and channel is not None:
      raise ValueError("choosing among draft sources needs a single-process engine")
    has_draft = pair.has_draft or not source.uses_model
    k = (4 if has_draft else 0) if k is None else int(k)
    adaptive_k = bool(adaptive_k and has_draft)
    k_max = (k if not adaptive_k else max(k, 4)) if k_max is None else int(k_max)
    if not 0 <= k <= k_max or (k_max > 0 and not has_draft):
      raise ValueError(f"need 0 <= k <= k_max and a draft for k_max > 0; got k={k}, "
                       f"k_max={k_max}, draft={'yes' if has_draft else 'no'}")
    if num_slots < 1 or prefill_rows < 1 or max_rounds_per_step < 1:
      raise ValueError("num_slots, prefill_rows and max_rounds_per_step must be >= 1")
    if max_queue is not None and max_queue < 1:
      raise ValueError(f"max_queue must be >= 1 (None: unbounded), got {max_queue}")
    # Requests waiting for a slot (those in slots not counted): past it submit refuses, so a
    # flood of clients cannot grow the host's memory without bound.
    self.max_queue = max_queue
    if max_top_k < 0:
      raise ValueError(f"max_top_k must be >= 0 (0: requests cannot ask for top_k), got "
                       f"{max_top_k}")
    self.pair, self.add_bos = pair, bool(add_bos)
    # The pair's tokenizer unless one is given (None: requests are token ids).
    self.tokenizer = tokenizer if tokenizer is not None else pair.tokenizer
    self.num_slots, self.max_len = int(num_slots), int(max_len)
    self.prefill_rows = min(int(prefill_rows), self.num_slots)
    self.min_prompt_bucket, self.window_rounds = min_prompt_bucket, window_rounds
    self.k_max, self.adaptive_k, self._fixed_k = k_max, adaptive_k, k
    # The K the policy may pick: each is a compiled step program, timed at calibration, so a
    # change of K never waits for a compile. Powers of two keep the set (and startup) small.
    if ks is None:
      ks = [0, k] + [2 ** i for i in range(8) if 2 ** i <= k_max]
    self.ks = tuple(sorted({int(x) for x in ks} | {0, k})) if adaptive_k else (k,)
    if any(not 0 <= x <= k_max for x in self.ks):
      raise ValueError(f"ks {self.ks} must lie in 0..k_max={k_max}")
    # margin: speculate only where the estimate beats plain decoding by 10% (by default):
    # timings on a shared machine are noisy, and a wrong K > 0 costs more than a missed one.
    self.sources = sources
    self.policy = k_policy.AdaptiveK(k0=k, k_max=k_max, probe_every=probe_every, ks=self.ks,
                                     margin=margin, sources=sources) if adaptive_k else None
    self.pacing = Pacing(max_rounds_per_step, fixed=rounds_per_step)
    num_tokens = pair.target_cfg.num_tokens
    self.max_top_k = min(int(max_top_k), num_tokens - 1)
    if logprobs_k < 0:
      raise ValueError(f"logprobs_k must be >= 0, got {logprobs_k}")
    # Every program records each token's logprob; the top logprobs_k alternatives (a search
    # over the vocabulary at every verified position) only when asked for at construction.
    self.logprobs_k = min(int(logprobs_k), num_tokens)
    # Penalties, min_p and logit_bias per request: token counts per row in the state, a
    # penalty pass at every drafted and verified position (off: none of it is compiled).
    if controls and channel is not None:
      raise ValueError("sampling controls (penalties, min_p, logit_bias) need a "
                       "single-process engine")
    self.controls, self.max_logit_bias = bool(controls), int(max_logit_bias) if controls else 0
    # Structured output: the automata pool holds grammar_tables tables (default one per slot;
    # slots with one grammar share its table) of grammar_states states, grammar_classes token
    # classes and grammar_masks distinct allowed sets each (the largest grammar a request may
    # bring), after the pool's shared unconstrained state 0.
    if grammar_states < 0:
      raise ValueError(f"grammar_states must be >= 0 (0: no structured output), got "
                       f"{grammar_states}")
    if grammar_states and channel is not None:
      raise ValueError("structured output needs a single-process engine")
    self.grammar_states = int(grammar_states)
    # (More classes than tokens never occur: one a token.)
    self.grammar_classes = min(1024 if grammar_classes is None else int(grammar_classes),
                               num_tokens)
    # (At most one mask per state: the default never refuses what grammar_states admits.)
    self.grammar_masks = self.grammar_states if grammar_masks is None else int(grammar_masks)
    self.grammar_tables = self.num_slots if grammar_tables is None else int(grammar_tables)
    if self.grammar_states and min(self.grammar_classes, self.grammar_masks,
                                   self.grammar_tables) < 1:
      raise ValueError(f"grammar_classes, grammar_masks and grammar_tables must be >= 1, got "
                       f"{self.grammar_classes}, {self.grammar_masks} and "
                       f"{self.grammar_tables}")
    self.grammars = None
    self.grammar_pool_bytes = 0
    if self.grammar_states:
      from spec_tpu.decoding import grammar as grammar_lib
      if self.tokenizer is not None and pair.eos_ids:
        self.grammars = grammar_lib.GrammarCompiler(
            grammar_lib.token_bytes(self.tokenizer), pair.eos_ids, num_tokens,
            max_states=self.grammar_states, max_classes=self.grammar_classes,
            max_masks=self.grammar_masks)
    self._tables = grammar_tables_lib.GrammarTables(self.grammar_tables)
    self._slot_tables = [0] * self.num_slots   # each slot's grammar table (0: none)
    self._request_tables: dict[int, int] = {}  # taken from the queue, not yet in a slot
    self.draft_source = source
    uses_model = any(kind != "ngram" for kind in sources)
    drafts = k_max > 0 and uses_model
    draft_model = pair.draft_cfg if drafts and not source.uses_assistant else None
    # The assistant has no cache: every program reads its params (K = 0 steps and inserts
    # keep the target's final hidden state it starts from), nothing ever lags.
    assistant = pair.draft_cfg if drafts and source.uses_assistant else None
    self._has_draft_model = draft_model is not None
    reads_draft = draft_model is not None or assistant is not None
    self._spec = decode.LoopSpec(
        target=pair.target_cfg, draft=draft_model, assistant=assistant, k=0, k_max=k_max,
        max_top_k=self.max_top_k, max_len=self.max_len, out_len=max_rounds_per_step,
        eos_ids=pair.eos_ids, pad_id=pair.pad_id, coupling=coupling, source=source,
        logprobs_k=self.logprobs_k, controls=self.controls,
        max_logit_bias=self.max_logit_bias, raw_logprobs=channel is None,
        **(dict(grammar_states=1 + self.grammar_tables * self.grammar_states,
                grammar_classes=self.grammar_classes, grammar_tables=1 + self.grammar_tables,
                grammar_masks=1 + self.grammar_tables * self.grammar_masks)
           if self.grammar_states else {}))
    self.coupling = coupling
    self._channel = channel
    self._rng = np.random.default_rng(seed)
    self._programs = {}
    mesh, rules = pair.mesh, pair.target_rules
    self._row = lambda *shape: sharding.batch_sharding(mesh, shape, rules)
    self._abstract = _abstract_state(self._spec, self.num_slots)
    if self.grammar_states:
      self.grammar_pool_bytes = sum(x.size * x.dtype.itemsize
                                    for x in jax.tree.leaves(self._abstract.grammar_pool))
      logging.info("grammar pool: %d tables of %d states x %d token classes and %d masks "
                   "over %d tokens: %.1f MiB", self.grammar_tables, self.grammar_states,
                   self.grammar_classes, self.grammar_masks, num_tokens,
                   self.grammar_pool_bytes / 2 ** 20)
    self._state_sh = self._state_shardings()
    self._state = program_cache.compiled(decode.init_state, (self._spec, self.num_slots), (),
                                         out_shardings=self._state_sh)()
    # Round costs for the K policy (profiling.cost_clock: CPU time on the CPU backend).
    self._cost_clock = profiling.cost_clock(pair.platform)
    self._params = (pair.target_params, pair.draft_params if reads_draft else None)
    self._param_sh = pair.param_shardings(reads_draft)

    self._slots: list[_Slot | None] = [None] * self.num_slots
    self._queue: collections.deque[Request] = collections.deque()
    self._scoring: list[tuple[list[int], int, concurrent.futures.Future]] = []
    self._lock = threading.Condition()
    self._next_id = 0
    self._draft_behind = False  # some live row's draft missed tokens (K = 0 steps or inserts)
    self._window = dict(k=None, source=None, rounds=0, accepted=0, judged=0)
    self._host_mark: float | None = None
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.failure: BaseException | None = None
    self.metrics = metrics_lib.EngineMetrics()
    self._publish_gauges()

  # ------------------------------------------------------------------ public API

  @property
  def k(self) -> int:
    """The K the next step runs."""
    return self.policy.k if self.policy is not None else self._fixed_k

  @property
  def source(self) -> str:
    """The draft kind the next step's rounds propose with (one of `sources`)."""
    return self.policy.source if self.policy is not None else self.sources[0]

  def _uses_model(self, source: str) -> bool:
    return self._has_draft_model and source != "ngram"

  @property
  def vision(self):
    """The target's VisionConfig (image input), or None for a text-only model."""
    return self.pair.target_cfg.vision

  @property
  def queue_length(self) -> int:
    return len(self._queue)

  @property
  def active_slots(self) -> int:
    return sum(s is not None for s in self._slots)

  def room(self, prompt_len: int) -> int:
    """The most new tokens a prompt of this length leaves room for (< 1: it does not fit)."""
    return self.max_len - prompt_len - self.k_max - 1

  def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
    """Raises ContextLengthError unless a request fits a slot (prompt + new tokens + a
    verification block of k_max + 1)."""
    if prompt_len < 1:
      raise ValueError("the prompt is empty: it needs at least one token")
    if max_new_tokens > self.room(prompt_len):
      raise ContextLengthError(
          f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} (+ "
          f"{self.k_max + 1} for verification) exceeds the context of {self.max_len} tokens")

  def submit(self, prompt: str | Sequence[int], params: GenerationParams = GenerationParams(),
             images: Sequence | None = None,
             pan_and_scan: Sequence[Sequence[int]] | None = None) -> Request:
    """Queues a request (any thread); raises ValueError on bad input and QueueFullError past
    max_queue, before queueing.

    images: one per start_of_image token of the prompt (Sampler.generate says which forms),
    decoded and resized here; encoded once, when the request is inserted. pan_and_scan: None
    (off) or Pan & Scan's words as ids, as Sampler.generate takes them: each image is then
    read as the original and its crops, every one an image block of its own."""
    return self.submit_all([(prompt, params, images, pan_and_scan)])[0]

  def submit_all(self, items: Sequence[tuple], *, bounded: bool = True,
                 share_prefill: bool = False) -> list[Request]:
    """Queues several requests, all or none: every one is checked, and the queue bound is
    checked for them together, before any is queued (several prompts of one HTTP call, or
    n > 1 samples of one prompt). items: (prompt, params), (prompt, params, images) or
    (prompt, params, images, pan_and_scan), as submit takes them.

    share_prefill: items with the same prompt are samples of it (n > 1): admitted together,
    they share one prefill (each still draws with its own settings and stream). Asked for,
    not automatic, so an insert program per fan is compiled only for requests that ask for
    samples."""
    bounded = bounded and self.max_queue is not None
    if bounded and len(items) > self.max_queue:  # would never fit: not worth a retry
      raise ValueError(f"{len(items)} requests at once exceed this server's queue of "
                       f"{self.max_queue}")
    checked = [self._checked(*item) for item in items]
    with self._lock:
      if self.failure is not None or self._stopping:
        raise RuntimeError("the engine is not running") from self.failure
      if bounded and len(self._queue) + len(checked) > self.max_queue:
        raise QueueFullError(f"the queue is full ({len(self._queue)} requests waiting, at most "
                             f"{self.max_queue}): try again later")
      requests, group = [], self._next_id if share_prefill else None
      for tokens, params, pixels, placeholder in checked:
        requests.append(Request(self._next_id, tokens, params, self.tokenizer, images=pixels,
                                placeholder=placeholder))
        requests[-1].prefill_group = group
        self._next_id += 1
      self._queue.extend(requests)
      self._queue_changed()
      self._lock.notify_all()
    return requests

  def _checked(self, prompt, params: GenerationParams, images: Sequence | None = None,
               pan_and_scan: Sequence[Sequence[int]] | None = None):
    """(tokens, params, pixels, placeholder) of a request, checked; raises before queueing."""
    tokens = self._tokens(prompt)
    pixels, placeholder = None, None
    if images:
      tokens, pixels = self._with_images(tokens, images, pan_and_scan)
      placeholder = self.pair.target_cfg.vision.image_id
    num_tokens = self.pair.target_cfg.num_tokens
    if isinstance(params.top_k, numbers.Integral) and params.top_k >= num_tokens:
      # keeps every token: the same as off
      params = dataclasses.replace(params, top_k=0)
    if isinstance(params.stop, str):
      params = dataclasses.replace(params, stop=(params.stop,))
    params = dataclasses.replace(params, stop=tuple(params.stop))
    if isinstance(params.logit_bias, dict):
      params = dataclasses.replace(params, logit_bias=tuple(params.logit_bias.items()))
    params.validate(max_top_k=self.max_top_k, has_tokenizer=self.tokenizer is not None,
                    max_logprobs=self.logprobs_k, num_tokens=num_tokens)
    if params.raw_logprobs and not self._spec.raw_logprobs:
      raise ValueError("raw logprobs need a single-process engine")
    if params.has_controls and not self.controls:
      raise ValueError("penalties, min_p and logit_bias need an engine built with controls=True")
    if params.grammar is not None:
      if not self.grammar_states:
        raise ValueError("structured output needs an engine built with grammar_states > 0")
      if not self.pair.eos_ids:
        raise ValueError("structured output needs a pair with an EOS token")
      g = params.grammar
      if (g.cls_v.shape != (num_tokens,) or g.num_states > self.grammar_states or
          g.num_classes > self.grammar_classes or g.num_masks > self.grammar_masks):
        raise ValueError(f"the grammar ({g.num_states} states, {g.num_classes} token classes, "
                         f"{g.num_masks} masks, {g.cls_v.shape[0]} tokens) does not fit this "
                         f"engine (at most {self.grammar_states} states, "
                         f"{self.grammar_classes} classes, {self.grammar_masks} masks, "
                         f"{num_tokens} tokens)")
    if len(params.logit_bias) > self.max_logit_bias:
      raise ValueError(f"logit_bias has {len(params.logit_bias)} entries, at most "
                       f"{self.max_logit_bias}")
    self.check_fits(len(tokens), int(params.max_new_tokens))
    return tokens, params, pixels, placeholder

  def score(self, prompt: str | Sequence[int], top: int = 0) -> concurrent.futures.Future:
    """The logprobs of a prompt's tokens after its first, each under the target's own
    distribution given the tokens before it (temperature 1, no filters), with its `top` most
    probable alternatives: a Future of a TokenLogprob per prompt token, the first with a NaN
    logprob (nothing before it predicts it). One forward over the prompt, run by the
    engine's thread between steps (any thread may call)."""
    if self._channel is not None:
      raise ValueError("prompt logprobs need a single-process engine")
    tokens = self._tokens(prompt)
    if not 1 <= len(tokens) <= self.max_len:
      raise ContextLengthError(f"a prompt of {len(tokens)} tokens does not fit the context of "
                               f"{self.max_len} tokens")
    if not (isinstance(top, numbers.Integral) and 0 <= top <= self.logprobs_k):
      raise ValueError(f"top={top!r} must lie in 0..logprobs_k={self.logprobs_k}")
    future = concurrent.futures.Future()
    with self._lock:
      if self.failure is not None or self._stopping:
        raise RuntimeError("the engine is not running") from self.failure
      if self.max_queue is not None and len(self._queue) + len(self._scoring) >= self.max_queue:
        raise QueueFullError(f"the queue is full ({self.max_queue} waiting): try again later")
      self._scoring.append((tokens, int(top), future))
      self._lock.notify_all()
    return future

  def _run_scoring(self) -> None:
    with self._lock:
      jobs, self._scoring = self._scoring, []
    for i, (tokens, top, future) in enumerate(jobs):
      try:
        padded = np.full((1, self._bucket(len(tokens))), self.pair.pad_id, np.int32)
        padded[0, :len(tokens)] = tokens
        logprobs = to_host(self._score_program(padded.shape[1])(self._params[0], padded))
        n = len(tokens) - 1
        first = TokenLogprob(tokens[0], float("nan"))
        future.set_result([first] + _token_logprobs(
            tokens[1:], jax.tree.map(lambda x: x[0, :n], logprobs), top))
      except BaseException as e:  # the device failed: no caller may wait forever
        for _, _, f in jobs[i:]:
          f.set_exception(e)
        raise

  def _with_images(self, tokens: list[int], images: Sequence, crop_text=None):
    """(the prompt with its image blocks laid out, the images as the encoder's input: one per
    block, so with Pan & Scan (crop_text) an image's crops count as images of their own, in
    the insert's image buckets and the soft tokens' width alike)."""
    vision = self.pair.vision()
    if self._channel is not None:
      raise ValueError("images are not supported on a multi-host engine yet")
    laid_out, views = image_prompt.lay_out(tokens, images, vision, "the prompt", crop_text)
    if crop_text is not None:  # the caller's ids for Pan & Scan's words, checked as a prompt's
      prompts_lib.token_ids([t for piece in crop_text for t in piece],
                            self.pair.target_cfg.num_tokens, "pan_and_scan's words")
    pixels = np.stack([image_lib.prepare(img, vision.image_size, f"image {j}")
                       for j, img in enumerate(views)])
    return laid_out, pixels

  def _tokens(self, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids (text through the tokenizer), checked: integers in the vocabulary."""
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs an engine with a tokenizer")
      return self.tokenizer.encode(prompt, add_bos=self.add_bos)
    return prompts_lib.token_ids(prompt, self.pair.target_cfg.num_tokens)

  def generate(self, prompts: Sequence[str | Sequence[int]],
               params: GenerationParams | Sequence[GenerationParams] = GenerationParams(),
               images: Sequence[Sequence | None] | None = None,
               pan_and_scan: Sequence[Sequence[int]] | None = None) -> list[Completion]:
    """Submits every prompt (with images[i], when given, as submit's images, and pan_and_scan
    as submit takes it) and steps until all are done (the caller's thread drives the engine;
    not while start()'s thread runs)."""
    if self._thread is not None:
      raise RuntimeError("generate() drives the engine itself; with start() use submit()")
    params = [params] * len(prompts) if isinstance(params, GenerationParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(params)} GenerationParams")
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    requests = self.submit_all([(p, q, im, pan_and_scan) for p, q, im in
                                zip(prompts, params, images)], bounded=False)
    while self.step():
      pass
    return [r.result() for r in requests]

  def start(self) -> "Engine":
    """Runs steps on a background thread until shutdown()."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._serve, name="spec_tpu-engine", daemon=True)
      self._thread.start()
    return self

  def shutdown(self, timeout: float | None = 60.0) -> None:
    """Stops the background thread; requests not finished end with finish_reason 'aborted'.
    A thread still inside a device call after `timeout` aborts them itself once it returns
    (aborting from here then would race with it placing a request in a slot)."""
    with self._lock:
      self._stopping = True
      self._lock.notify_all()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout)
    if self._thread is None or not self._thread.is_alive():
      self._abort_all(None)
    if self._channel is not None and self._channel.is_leader:
      self._channel.send_stop()

  @property
  def running(self) -> bool:
    return self._thread is not None and self._thread.is_alive() and self.failure is None

  # ------------------------------------------------------------------ the scheduler

  def step(self, k: int | None = None, source: str | None = None) -> bool:
    """One scheduling iteration: free cancelled slots, admit waiting requests (prefill), run
    one device step for the live slots at K = k with draft kind `source` (default: the
    policy's), deliver tokens, free finished slots. Returns whether requests remain (running
    or queued)."""
    if k is not None and not 0 <= k <= self.k_max:
      raise ValueError(f"k={k} outside 0..k_max={self.k_max}")
    if source is not None and source not in self.sources:
      raise ValueError(f"source {source!r} is not one of this engine's {self.sources}")
    self._free_cancelled()
    if self._scoring:
      self._run_scoring()
    self._admit()
    if any(s is not None for s in self._slots):
      if self._host_mark is not None:
        self.pacing.observe_host(time.perf_counter() - self._host_mark)
      self._run_step(self.k if k is None else k, source=source)
      self._host_mark = time.perf_counter()
    else:
      self._host_mark = None
    self._publish_gauges()
    return bool(self._queue) or any(s is not None for s in self._slots)

  def _serve(self):
    try:
      idle_since = time.monotonic()
      while True:
        with self._lock:
          stopping = self._stopping
        if stopping:
          self._abort_all(None)
          return
        if self.step():
          idle_since = time.monotonic()
          continue
        with self._lock:
          self._lock.wait_for(lambda: self._queue or self._scoring or self._stopping,
                              timeout=0.5)
        if self._channel is not None and time.monotonic() - idle_since > _KEEPALIVE_S:
          self._channel.send_noop()
          idle_since = time.monotonic()
    except BaseException as e:  # the device or a program failed: no request may hang on it
      self.failure = e
      self._abort_all(e)
      raise

  def _abort_all(self, error):
    with self._lock:
      queued, self._queue = list(self._queue), collections.deque()
      self._queue_changed()
      scoring, self._scoring = self._scoring, []
    for _, _, future in scoring:
      future.set_exception(RuntimeError("the engine stopped before scoring the prompt"))
    for i, slot in enumerate(self._slots):
      if slot is not None:
        slot.request._finish(ABORTED, error=error)
        self._slots[i] = None
        self._release_table(i)
    for r in queued:
      r._finish(ABORTED, error=error)

  def _free_cancelled(self):
    for i, slot in enumerate(self._slots):
      if slot is not None and slot.request.cancelled:
        self._finish_slot(i, CANCELLED)

  def _take_waiting(self, num_free: int) -> list[Request]:
    taken, waiting = [], collections.deque()
    with self._lock:
      while self._queue and len(taken) < num_free:
        r = self._queue.popleft()
        if r.cancelled:
          r._finish(CANCELLED)
          self.metrics.finished(CANCELLED, None)
          continue
        if r.params.grammar is not None:
          table = self._tables.acquire(r.params.grammar.key)
          if table is None:  # every table holds another live grammar: it waits for one
            waiting.append(r)
            continue
          self._request_tables[r.id] = table
        taken.append(r)
      self._queue.extendleft(reversed(waiting))
      self._queue_changed()
    return taken

  def _queue_changed(self):
    """The queue-length gauge follows the queue itself (called under self._lock), not only the
    engine thread's steps: a scrape during a long device call sees the queue as it is."""
    self.metrics.set(queue_length=len(self._queue))

  def _admit(self, with_draft: bool | None = None):
    free = [i for i, s in enumerate(self._slots) if s is None]
    requests = self._take_waiting(len(free))
    if not requests:
      return
    if with_draft is None:
      with_draft = self.k > 0 and self._uses_model(self.source)
    with_draft = with_draft and self._has_draft_model
    by_bucket = collections.defaultdict(list)
    for group in self._same_prompt_groups(list(zip(free, requests))):
      r = group[0][1]
      # Requests with images are inserted with others of as many images (a power of two);
      # a prompt's samples with others of as many samples (also a power of two).
      images = 0 if r.images is None else prompts_lib.bucket(len(r.images), 1)
      fan = prompts_lib.bucket(len(group), 1)
      by_bucket[self._bucket(len(r.prompt)), images, fan].append(group)
    try:
      self._insert_all(by_bucket, with_draft)
    except BaseException as e:
      # Taken from the queue but in no slot yet: nobody else would ever finish them.
      # Their grammar tables go back too, whether still reserved or already given to a slot.
      placed = {s.request.id for s in self._slots if s is not None}
      for r in requests:
        if r.id not in placed:
          r._finish(ABORTED, error=e)
          if (table := self._request_tables.pop(r.id, 0)):
            self._tables.release(table)
      for slot in free:
        if self._slots[slot] is None:
          self._release_table(slot)
      raise
    if not with_draft and self._has_draft_model:
      self._draft_behind = True

  def _same_prompt_groups(self, placed: list[tuple[int, Request]]) -> list[list]:
    """(slot, request) pairs grouped, in order: the samples of one prompt (submit_all's
    share_prefill) share one prefill. Requests with images, and every request of a
    multi-host engine, stay alone."""
    groups, index = [], {}
    for slot, r in placed:
      key = ((r.prefill_group, tuple(r.prompt)) if r.prefill_group is not None
             and r.images is None and self._channel is None else None)
      if key is not None and key in index:
        groups[index[key]].append((slot, r))
        continue
      if key is not None:
        index[key] = len(groups)
      groups.append([(slot, r)])
    return groups

  def _insert_all(self, by_bucket, with_draft: bool) -> None:
    for (t, images, fan), groups in sorted(by_bucket.items()):
      # A multimodal draft sees a prompt's images only at its prefill (catching up later it
      # reads ids alone): rows with images prefill it even while nothing drafts.
      draft = with_draft or bool(images and decode.reads_images(self._spec))
      for i in range(0, len(groups), self.prefill_rows):
        chunk = groups[i:i + self.prefill_rows]
        started = time.perf_counter()
        # Fetched per call: each request's first token streams as soon as it exists, and no
        # pile of un-waited programs builds up (with collectives that deadlocks XLA:CPU).
        first, done, logprobs = to_host(self._insert(draft, t, chunk, images, fan))
        now = time.perf_counter()
        for g, group in enumerate(chunk):
          for j, (slot, r) in enumerate(group):
            row = g * fan + j
            r.stats.queue_s = started - r.submitted
            r.stats.time_to_first_token_s = now - r.submitted
            self._slots[slot] = _Slot(r, ks=set())
            if j == 0:  # prefilled once for the group
              self.metrics.add(prompt_tokens=len(r.prompt))
            self._deliver(slot, [int(first[row])], bool(done[row]),
                          jax.tree.map(lambda x: x[row:row + 1], logprobs))

  def _bucket(self, n: int) -> int:
    return min(prompts_lib.bucket(n, self.min_prompt_bucket), self.max_len)

  def _insert(self, with_draft: bool, t: int, chunk: list[list[tuple[int, Request]]],
              images: int = 0, fan: int = 1):
    """One insert call: the groups of requests in `chunk` (padded to prefill_rows), each group
    one prompt prefilled once into its requests' slots (at most `fan` of them: fan > 1 makes
    the slots r x fan), with room for `images` images per request."""
    r = self.prefill_rows
    tokens = np.full((r, t), self.pair.pad_id, np.int32)
    lengths = np.ones((r,), np.int32)
    # out of range: a padding entry is dropped
    slots = np.full((r, fan) if fan > 1 else (r,), self.num_slots, np.int32)
    entries = [None] * (r * fan)  # (slot, request) of each prompt's copies, prompt-major
    for i, group in enumerate(chunk):
      prompt = group[0][1].prompt
      tokens[i, :len(prompt)], lengths[i] = prompt, len(prompt)
      for j, (slot, req) in enumerate(group):
        slots.reshape(-1)[i * fan + j] = slot
        entries[i * fan + j] = (slot, req)
    n = r * fan
    temperature, top_p = np.ones((n,), np.float32), np.ones((n,), np.float32)
    top_k, max_new = np.zeros((n,), np.int32), np.ones((n,), np.int32)
    seeds = np.zeros((n, 2), np.uint32)
    raw = np.zeros((n,), bool)
    for i, entry in enumerate(entries):
      if entry is None:
        continue
      p = entry[1].params
      temperature[i], top_p[i], top_k[i], max_new[i] = (p.temperature, p.top_p, p.top_k,
                                                        p.max_new_tokens)
      seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2 ** 63))
      seeds[i] = (seed % 2 ** 32, seed // 2 ** 32)
      raw[i] = p.raw_logprobs
    rows = decode.Rows(temperature, top_p, top_k, seeds, max_new, self._controls(entries),
                       raw if self._spec.raw_logprobs else None, self._grammars(entries))
    pixels = None
    if images:
      size = self.pair.target_cfg.vision.image_size
      pixels = np.zeros((r, images, size, size, 3), np.float32)
      for i, group in enumerate(chunk):
        req = group[0][1]
        if req.images is not None:
          pixels[i, :len(req.images)] = req.images
    if self._channel is not None:
      self._channel.send_insert(with_draft, slots, tokens, lengths, rows)
    return self._run_insert(with_draft, slots, tokens, lengths, rows, pixels)

  def _grammars(self, entries) -> np.ndarray | None:
    """The rows' start states in the automata pool (0: unconstrained), after writing the
    automata of constrained requests whose table does not hold them yet (entries: (slot,
    request) or None, one per row; each request's table was acquired as it left the queue)."""
    if not self.grammar_states:
      return None
    r, s, c, m = self.prefill_rows, self.grammar_states, self.grammar_classes, self.grammar_masks
    v = self.pair.target_cfg.num_tokens
    start = np.zeros((len(entries),), np.int32)
    writes = []
    for i, entry in enumerate(entries):
      if entry is None or entry[1].params.grammar is None:
        continue
      slot, request = entry
      table = self._slot_tables[slot] = self._request_tables.pop(request.id)
      start[i] = 1 + (table - 1) * s
      if self._tables.take_write(table):
        writes.append((table, request.params.grammar))
    for lo in range(0, len(writes), r):  # the writing program takes prefill_rows automata
      # Past the pool: dropped (padding).
      tables = np.full((r,), self._spec.grammar_tables, np.int32)
      next_rsc = np.full((r, s, c), -1, np.int32)
      cls_rv = np.zeros((r, v), np.int32)
      mask_rs = np.zeros((r, s), np.int32)
      bits_rmw = np.zeros((r, m, -(-v // 32)), np.uint32)
      for i, (table, g) in enumerate(writes[lo:lo + r]):
        tables[i] = table
        next_rsc[i, :g.num_states, :g.num_classes] = g.next_sc
        cls_rv[i] = g.cls_v
        mask_rs[i, :g.num_states] = g.mask_s
        bits_rmw[i, :g.num_masks] = g.bits_mw
      self._state = self._grammar_program()(self._state, tables, next_rsc, cls_rv, mask_rs,
                                            bits_rmw)
    return start

  def _release_table(self, slot: int) -> None:
    if self._slot_tables[slot]:
      self._tables.release(self._slot_tables[slot])
      self._slot_tables[slot] = 0

  def _controls(self, entries) -> decode.Controls | None:
    """The controls of an insert's rows (entries: (slot, request) or None, one per row)."""
    if not self.controls:
      return None
    r, m = len(entries), self.max_logit_bias
    c = decode.Controls(np.zeros((r,), np.float32), np.zeros((r,), np.float32),
                        np.zeros((r,), np.float32), np.ones((r,), np.float32),
                        np.full((r, m), -1, np.int32), np.zeros((r, m), np.float32))
    for i, entry in enumerate(entries):
      if entry is None:
        continue
      p = entry[1].params
      c.min_p_b[i], c.presence_b[i] = p.min_p, p.presence_penalty
      c.frequency_b[i], c.repetition_b[i] = p.frequency_penalty, p.repetition_penalty
      for j, (token, bias) in enumerate(p.logit_bias):
        c.bias_ids_bn[i, j], c.bias_bn[i, j] = token, bias
    return c

  def _run_insert(self, with_draft, slots, tokens, lengths, rows, pixels=None):
    program = self._insert_program(with_draft, tokens.shape[1],
                                   0 if pixels is None else pixels.shape[1],
                                   1 if slots.ndim == 1 else slots.shape[1])
    args = (*self._params, self._state, slots, tokens, lengths, rows)
    self._state, first, done, logprobs = program(*args,
                                                 *(() if pixels is None else (pixels,)))
    return first, done, logprobs

  def _run_step(self, k: int, n: int | None = None, timed: bool = True,
                source: str | None = None):
    """One step at K, drafting with `source` (default: the policy's), for the live slots;
    delivers its tokens. Returns (rounds, wall seconds, accepted, judged, cost seconds) (cost:
    see _cost_clock)."""
    source = self.source if source is None else source
    n = self.pacing.rounds(k) if n is None else n
    live = np.array([s is not None for s in self._slots])
    stop_on_free = bool(self._queue)
    runs_draft = k > 0 and self._uses_model(source)
    catching_up = runs_draft and self._draft_behind
    if self._channel is not None:
      self._channel.send_step(k, live, n, stop_on_free)
    start, cost_start = time.perf_counter(), self._cost_clock()
    out, done, stats = self._run_step_call(k, live, n, stop_on_free, source)
    seconds, cost = time.perf_counter() - start, self._cost_clock() - cost_start
    rounds = int(out.rounds)
    if timed and not catching_up:
      self.pacing.observe_step(k, rounds, seconds)
    if runs_draft:
      self._draft_behind = False
    elif live.any():  # K = 0 and n-gram rounds leave the draft model behind
      self._draft_behind = self._has_draft_model
    judged_b = stats.reached_bn.sum(axis=1)
    step_accepted = step_judged = 0
    for i, slot in enumerate(self._slots):
      if slot is None:
        continue
      slot.ks.add(k)
      if k > 0:
        slot.sources.add(source)
      step_accepted += int(stats.accepted_b[i]) - slot.accepted
      step_judged += int(judged_b[i]) - slot.judged
      slot.rounds, slot.accepted, slot.judged = (int(stats.rounds_b[i]), int(stats.accepted_b[i]),
                                                 int(judged_b[i]))
      slot.ngram_accepted = int(stats.ngram_accepted_b[i])
      slot.ngram_judged = int(stats.ngram_judged_b[i])
      slot.mask_rejected = int(stats.mask_rejected_b[i])
      c = out.count_b[i]
      self._deliver(i, out.tokens_bw[i, :c].tolist(), bool(done[i]),
                    jax.tree.map(lambda x: x[i, :c], out.logprobs))
    self.metrics.add(steps=1, rounds=rounds, accepted=step_accepted, judged=step_judged)
    if timed:
      self._observe_window(k, source, rounds, step_accepted, step_judged)
    return rounds, seconds, step_accepted, step_judged, cost

  def _run_step_call(self, k, live, n, stop_on_free, source=None):
    program = self._step_program(k, self.sources[0] if source is None else source)
    self._state, out = program(*self._params, self._state, live, np.int32(n),
                               np.bool_(stop_on_free))
    return to_host((out, self._state.done_b, self._state.stats))

  def _deliver(self, slot: int, tokens: list[int], device_done: bool,
               logprobs: decode.Logprobs):
    s = self._slots[slot]
    self.metrics.add_tokens(len(tokens))
    r = s.request
    stopped = r._deliver(tokens, _token_logprobs(tokens, logprobs, r.params.logprobs)) \
        if tokens else False
    if stopped:
      self._finish_slot(slot, STOP)
    elif device_done:
      last = s.request._tokens[-1] if s.request._tokens else None
      hit_eos = last in self.pair.eos_ids
      self._finish_slot(slot, STOP if hit_eos else LENGTH)

  def _finish_slot(self, slot: int, reason: str):
    s = self._slots[slot]
    self._slots[slot] = None  # the next step's live mask stops the row on device
    self._release_table(slot)
    r = s.request
    stats = dataclasses.replace(r.stats, new_tokens=len(r._tokens), target_calls=s.rounds + 1,
                                accepted=s.accepted, judged=s.judged,
                                ngram_accepted=s.ngram_accepted, ngram_judged=s.ngram_judged,
                                mask_rejected=s.mask_rejected,
                                ks=tuple(sorted(s.ks)), sources=tuple(sorted(s.sources)))
    r._finish(reason, stats)
    self.metrics.finished(reason, stats.time_to_first_token_s)

  # ------------------------------------------------------------------ choosing K

  def _observe_window(self, k, source, rounds, accepted, judged):
    """Feeds the K policy the acceptance once per window of rounds at one K. (Round costs come
    from calibrate(): measured with every slot busy and no other work in the process, they
    do not change with traffic, since every slot is computed anyway.)"""
    if self.policy is None or rounds == 0:
      return
    w = self._window
    if (w["k"], w["source"]) != (k, source):
      w.update(k=k, source=source, rounds=0, accepted=0, judged=0)
    w["rounds"] += rounds
    w["accepted"] += accepted
    w["judged"] += judged
    if w["rounds"] < self.window_rounds:
      return
    if k > 0:
      self.policy.observe_acceptance(w["accepted"], w["judged"], source=source)
    else:
      self.policy.observe_off()
    w.update(rounds=0, accepted=0, judged=0)

  def calibrate(self, prompts: Sequence[Sequence[int]] | None = None, rounds: int = 8,
                repeats: int = 5, temperature: float = 1.0) -> dict:
    """Compiles and times what serving runs, before any request: with every slot busy on
    `prompts` (cycled; random tokens if None), a step call's own cost (0 rounds) and a round at
    each K the policy may pick with each draft source (each after an untimed warm-up call),
    and the acceptance each source gets. Seeds the pacing and the K policy with them, so the
    first real step already runs the source and K the measured times and acceptance favour
    (K = 0 where speculation does not pay). `temperature`: what the requests to come will
    mostly run at (acceptance depends on it, an n-gram lookup's most: greedy output copies
    its prompt far more often). Returns the measurements (those of the first source at the
    top level, every source's under "sources")."""
    if self.active_slots or self._queue:
      raise RuntimeError("calibrate() runs on an idle engine")
    if prompts is None:
      prompts = self._rng.integers(4, self.pair.target_cfg.num_tokens,
                                   size=(self.num_slots, self.min_prompt_bucket // 2)).tolist()
    # Checked (and text encoded) before the first is queued: a bad one must not leave the
    # others behind in the queue.
    prompts = [self._tokens(p) for p in prompts]
    if not prompts or not all(prompts):
      raise ValueError("calibrate() needs non-empty prompts")
    room = self.room(max(len(p) for p in prompts))
    if room < 1:
      raise ContextLengthError(f"calibration prompts leave no room in a {self.max_len}-token slot")
    max_new = min(room, (repeats + 2) * (rounds + 1) * (max(self.ks) + 1))
    count = iter(range(2 ** 62))

    def call(kk, n, source):
      # Every slot busy: requests that finished are replaced before each call.
      for _ in range(self.num_slots - self.active_slots):
        i = next(count)
        self.submit_all([(prompts[i % len(prompts)],
                          GenerationParams(max_new_tokens=max_new, temperature=temperature,
                                           seed=i))],
                        bounded=False)
      self._admit(with_draft=True)  # no catch-up inside a timed call
      return self._run_step(kk, n=n, timed=False, source=source)

    first = self.sources[0]
    report = {"ks": self.ks, "clock": self._cost_clock.__name__}
    for _ in range(2):
      _, seconds, _, _, call_cost = call(0, 0, first)
    self.pacing.observe_call(seconds)
    report["call_s"], report["call_cost_s"] = seconds, call_cost
    # K = 0 once (no source drafts), every other K with every source.
    choices = [(src if kk else first, kk) for kk in self.ks
               for src in (self.sources if kk else (first,))]
    counts = {src: [0, 0] for src in self.sources}  # accepted, judged
    for src, kk in choices:
      call(kk, rounds, src)  # compiles; at K > 0 the draft catches up first
    # Each choice timed `repeats` times, interleaved so that a busy spell of the machine hits
    # them all alike, keeping each one's cheapest round: interference only adds time.
    best, best_wall = {}, {}
    for _ in range(repeats):
      for src, kk in choices:
        if kk > 0 and self._uses_model(src):
          call(kk, 1, src)  # the draft catches up after K = 0 and n-gram calls, untimed
        r, seconds, a, j, cost = call(kk, rounds, src)
        if r:
          t = max(cost - call_cost, 1e-9) / r
          best[src, kk] = min(best.get((src, kk), t), t)
          t = max(seconds - self.pacing.call_s, 1e-9) / r
          best_wall[src, kk] = min(best_wall.get((src, kk), t), t)
        counts[src][0] += a
        counts[src][1] += j
    for (src, kk), t in best_wall.items():  # pacing by K: the slowest source's round
      self.pacing.round_s[kk] = max(self.pacing.round_s.get(kk, 0.0), t)
    for kk in self.ks:
      if (first, kk) in best:
        report[f"round_s_k{kk}"] = best[first, kk]
    report["accepted"], report["judged"] = counts[first]
    for slot in self._slots:
      if slot is not None:
        slot.request.cancel()
    self._free_cancelled()
    self._run_step(0, n=0, timed=False, source=first)  # marks the rows done on device
    if self.policy is not None:
      for (src, kk), t in best.items():
        self.policy.observe_round_time(kk, t, source=src)
      for src, (accepted, judged) in counts.items():
        if judged:
          self.policy.observe_acceptance(accepted, judged, source=src)
    base = best.get((first, 0))
    if base:
      report["relative_cost"] = {kk: best[first, kk] / base for kk in self.ks
                                 if (first, kk) in best}
    if len(self.sources) > 1:
      report["sources"] = {
          src: dict(accepted=counts[src][0], judged=counts[src][1],
                    relative_cost={kk: best[src, kk] / base for kk in self.ks
                                   if kk and (src, kk) in best and base},
                    expected_speedup={kk: self.policy.speedup(kk, src) for kk in self.ks if kk})
          for src in self.sources}
    report.update(chosen_k=self.k, chosen_source=self.source,
                  a=self.policy.a if self.policy else None,
                  c=self.policy.c if self.policy else None,
                  expected_speedup={kk: self.policy.speedup(kk, self.source) for kk in self.ks}
                  if self.policy else None)
    # The first requests should not wait for a compile: inserts for the calibration prompts'
    # buckets, with and without the draft (K = 0 inserts skip it).
    self.warm_up(self.ks, [len(p) for p in prompts], both_inserts=True, sources=self.sources)
    self.metrics.reset()
    self._window.update(k=None, source=None, rounds=0, accepted=0, judged=0)
    self._host_mark = None
    self._publish_gauges()
    return report

  def warm_up(self, ks: Sequence[int], prompt_lengths: Sequence[int] = (),
              both_inserts: bool = False, sources: Sequence[str] | None = None) -> None:
    """Compiles the step programs for these K (with these draft sources; default: the
    current one), the insert programs for prompts of these lengths (their buckets; inserting
    as the current K does, or both ways) and, with grammar_states, the program that writes a
    request's automaton, so no request waits for them. Others compile on first use (seconds
    on CPU; more for large models)."""
    if any(not 0 <= int(k) <= self.k_max for k in ks):
      raise ValueError(f"ks {list(ks)} must lie in 0..k_max={self.k_max}")
    for source in (self.source,) if sources is None else sources:
      for k in ks:
        self._step_program(int(k), source)
    drafts = ({True, False} if both_inserts and self._has_draft_model else
              {self.k > 0 and self._uses_model(self.source)})
    for t in sorted({self._bucket(int(n)) for n in prompt_lengths}):
      for with_draft in drafts:
        self._insert_program(with_draft, t)
    if self.grammar_states:  # what the first constrained request would wait for
      self._grammar_program()

  def _publish_gauges(self):
    g = dict(active_slots=self.active_slots,
             slots=self.num_slots, k=self.k, rounds_per_step=self.pacing.rounds(self.k))
    if self.grammar_states:
      g.update(grammar_tables_in_use=self._tables.in_use, grammar_tables=self.grammar_tables,
               grammar_table_writes=self._tables.writes,
               grammar_pool_bytes=self.grammar_pool_bytes)
    if self.policy is not None:
      g.update(c=self.policy.c if self.policy.c is not None else float("nan"),
               expected_speedup=self.policy.speedup(), a=self.policy.a)
    self.metrics.set(**g)

  # ------------------------------------------------------------------ compiled programs

  def _state_shardings(self):
    mesh, s = self.pair.mesh, self.pair
    sh = jax.tree.map(lambda x: self._row(*x.shape), self._abstract)
    return sh._replace(
        target_cache=sharding.cache_shardings(self._abstract.target_cache, mesh, s.target_rules),
        draft_cache=(None if self._abstract.draft_cache is None else
                     sharding.cache_shardings(self._abstract.draft_cache, mesh, s.draft_rules)),
        # Every row may enter any table's states: the pool is not split by batch.
        grammar_pool=(None if self._abstract.grammar_pool is None else
                      jax.tree.map(lambda _: sharding.replicated(mesh),
                                   self._abstract.grammar_pool)))

  def _score_program(self, t: int):
    key = ("score", t)
    if key not in self._programs:
      rep = sharding.replicated(self.pair.mesh)
      self._programs[key] = program_cache.compiled(
          decode.prompt_logprobs, (self._spec,),
          (self._params[0], jax.ShapeDtypeStruct((1, t), jnp.int32)),
          in_shardings=(self._param_sh[0], rep), out_shardings=decode.Logprobs(rep, rep, rep),
          compiler_options=self.pair.compiler_options())
    return self._programs[key]

  def _logprobs_sh(self, *shape):
    m = self.logprobs_k
    return decode.Logprobs(self._row(*shape), self._row(*shape, m), self._row(*shape, m))

  def _insert_program(self, with_draft: bool, t: int, images: int = 0, fan: int = 1):
    """prefill_rows prompts of bucket t into their slots; with fan > 1 each prompt into fan
    slots (its samples: one prefill), the per-row settings r * fan of them."""
    key = ("insert", with_draft, t, images, fan)
    if key not in self._programs:
      r = self.prefill_rows
      n = r * fan  # rows the settings, first tokens and logprobs are of
      row = self._row
      m = self.max_logit_bias
      controls_sh = decode.Controls(row(n), row(n), row(n), row(n), row(n, m), row(n, m)) \
          if self.controls else None
      raw = self._spec.raw_logprobs
      rows_sh = decode.Rows(row(n), row(n), row(n), row(n, 2), row(n), controls_sh,
                            row(n) if raw else None, row(n) if self.grammar_states else None)
      slots_shape = (r, fan) if fan > 1 else (r,)
      sds = jax.ShapeDtypeStruct
      image_args, image_sh = (), ()
      if images:
        size = self.pair.target_cfg.vision.image_size
        image_args = (sds((r, images, size, size, 3), jnp.float32),)
        image_sh = (row(r, images, size, size, 3),)
      args = (*self._params, self._abstract, sds(slots_shape, jnp.int32),
              sds((r, t), jnp.int32), sds((r,), jnp.int32),
              decode.Rows(sds((n,), jnp.float32), sds((n,), jnp.float32), sds((n,), jnp.int32),
                          sds((n, 2), jnp.uint32), sds((n,), jnp.int32),
                          decode.Controls(*[sds((n,), jnp.float32)] * 4, sds((n, m), jnp.int32),
                                          sds((n, m), jnp.float32)) if self.controls else None,
                          sds((n,), bool) if raw else None,
                          sds((n,), jnp.int32) if self.grammar_states else None),
              *image_args)
      self._programs[key] = program_cache.compiled(
          _insert, (self._spec, with_draft), args, donate_argnums=(2,),
          in_shardings=(*self._param_sh, self._state_sh, row(*slots_shape), row(r, t), row(r),
                        rows_sh, *image_sh),
          out_shardings=(self._state_sh, row(n), row(n), self._logprobs_sh(n)),
          compiler_options=self.pair.compiler_options())
    return self._programs[key]

  def _grammar_program(self):
    key = ("grammar",)
    if key not in self._programs:
      r, s, c, m = self.prefill_rows, self.grammar_states, self.grammar_classes, \
          self.grammar_masks
      v = self.pair.target_cfg.num_tokens
      rep = sharding.replicated(self.pair.mesh)
      sds = jax.ShapeDtypeStruct
      args = (self._abstract, sds((r,), jnp.int32), sds((r, s, c), jnp.int32),
              sds((r, v), jnp.int32), sds((r, s), jnp.int32),
              sds((r, m, -(-v // 32)), jnp.uint32))
      self._programs[key] = program_cache.compiled(
          decode.write_grammars, (self._spec,), args, donate_argnums=(0,),
          in_shardings=(self._state_sh,) + (rep,) * 5, out_shardings=self._state_sh,
          compiler_options=self.pair.compiler_options())
    return self._programs[key]

  def _step_program(self, k: int, source: str):
    # K = 0 runs no source: one program whatever the policy's source.
    source = self.sources[0] if k == 0 else source
    key = ("step", k, source)
    if key not in self._programs:
      spec = dataclasses.replace(self._spec, k=k, out_len=self.pacing.max_rounds * (k + 1),
                                 source=dataclasses.replace(self._spec.source, kind=source))
      b, row = self.num_slots, self._row
      rep = sharding.replicated(self.pair.mesh)
      sds = jax.ShapeDtypeStruct
      args = (*self._params, self._abstract, sds((b,), bool), sds((), jnp.int32),
              sds((), bool))
      self._programs[key] = program_cache.compiled(
          decode.run_rounds, (spec,), args, donate_argnums=(2,),
          in_shardings=(*self._param_sh, self._state_sh, row(b), rep, rep),
          out_shardings=(self._state_sh, decode.Out(row(b, spec.out_len), row(b), rep,
                                                    self._logprobs_sh(b, spec.out_len))),
          compiler_options=self.pair.compiler_options())
    return self._programs[key]

  # ------------------------------------------------------------------ multi-host

  def follow(self) -> None:
    """Runs process 0's device calls on this process until it shuts the engine down (the
    processes other than 0 call this instead of serving)."""
    if self._channel is None or self._channel.is_leader:
      raise RuntimeError("follow() is for the processes other than 0 of a multi-host engine")
    while True:
      message = self._channel.receive()
      if message.kind == "stop":
        return
      if message.kind == "noop":
        continue
      if message.kind == "insert":
        to_host(self._run_insert(*message.args))
      else:
        self._run_step_call(*message.args)
