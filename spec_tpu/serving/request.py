"""One request's side of the engine: its settings, and the stream its tokens arrive on.

The engine thread pushes tokens into a `Request` (`_deliver`, `_finish`); any other thread or
event loop reads them, as an iterator (`for chunk in request`), an async iterator
(`async for chunk in request`) or at once (`request.result()`). With a tokenizer each chunk also
carries the text it adds, and stop strings end the request on the host (the device never sees
text): the stop string and whatever follows it are not returned, and text that could still
become a stop string is held back until it cannot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import numbers
import threading
import time
from typing import AsyncIterator, Iterator, Sequence

from spec_tpu.pair import integer

# Finish reasons (OpenAI's words where they have one).
STOP = "stop"            # EOS or a stop string
LENGTH = "length"        # max_new_tokens reached
CANCELLED = "cancelled"  # Request.cancel() (e.g. the client went away)
ABORTED = "aborted"      # the engine shut down or failed first


@dataclasses.dataclass(frozen=True)
class GenerationParams:
  """Per-request sampling settings (all traced on device: any mix shares one program)."""
  max_new_tokens: int = 16
  temperature: float = 1.0      # 0 = greedy
  top_p: float = 1.0            # 1 = off
  top_k: int = 0                # 0 = off; at most the engine's max_top_k
  seed: int | None = None       # None: the engine draws one; with a seed the tokens depend on
                                # the seed and K only, not on what else shares the batch
  stop: tuple[str, ...] = ()    # stop strings (need a tokenizer)
  logprobs: int | None = None   # None: none; n: each token's log-probability and the n most
                                # probable tokens (at most the engine's logprobs_k)
  raw_logprobs: bool = False    # logprobs of the target's raw distribution (temperature 1, no
                                # penalties or filters), not of the one the token was drawn from
  # Controls (need an engine with controls=True; sampling.penalize and sampling.probabilities
  # define them): neutral values are off.
  min_p: float = 0.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias added to its logit)
  # Structured output (needs an engine with grammar_states > 0): the output is constrained to
  # this compiled grammar's language (Engine.grammars compiles regexes and JSON schemas).
  grammar: object | None = None  # grammar.TokenGrammar

  @property
  def has_controls(self) -> bool:
    return bool(self.min_p or self.presence_penalty or self.frequency_penalty
                or self.repetition_penalty != 1 or self.logit_bias)

  def validate(self, *, max_top_k: int, has_tokenizer: bool, max_logprobs: int = 0,
               num_tokens: int | None = None) -> "GenerationParams":
    """Raises ValueError naming the bad field (numpy scalars are numbers too)."""
    integer("max_new_tokens", self.max_new_tokens, 1)
    if not (_real(self.temperature) and 0 <= self.temperature < math.inf):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
    if not (_real(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    integer("top_k (0 = off)", self.top_k, 0)
    if self.top_k > max_top_k:
      raise ValueError(f"top_k={self.top_k} exceeds this engine's max_top_k={max_top_k}")
    if self.seed is not None:
      integer("seed", self.seed, 0, 2 ** 64 - 1)
    if not (_real(self.min_p) and 0 <= self.min_p <= 1):
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
    for name in ("presence_penalty", "frequency_penalty"):
      if not (_real(getattr(self, name)) and math.isfinite(getattr(self, name))):
        raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
    if not (_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
      raise ValueError(f"repetition_penalty must be a finite number > 0, got "
                       f"{self.repetition_penalty!r}")
    for entry in self.logit_bias:
      ok = isinstance(entry, tuple) and len(entry) == 2 and _real(entry[1]) \
          and math.isfinite(entry[1]) and isinstance(entry[0], numbers.Integral) \
          and 0 <= entry[0] < (num_tokens if num_tokens is not None else math.inf)
      if not ok:
        raise ValueError(f"logit_bias entries must be (token id in the vocabulary, finite "
                         f"bias), got {entry!r}"[:200])
    if not isinstance(self.raw_logprobs, bool):
      raise ValueError(f"raw_logprobs must be True or False, got {self.raw_logprobs!r}")
    if self.logprobs is not None:
      integer("logprobs", self.logprobs, 0)
      if self.logprobs > max_logprobs:
        raise ValueError(f"logprobs={self.logprobs} exceeds this engine's logprobs_k="
                         f"{max_logprobs} (the most probable tokens it records per token)")
    if self.stop:
      if not has_tokenizer:
        raise ValueError("stop strings need an engine with a tokenizer")
      if not all(isinstance(s, str) and s for s in self.stop):
        raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
    return self


def _real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A token's log-probability under the distribution it was sampled from (the target's,
  after temperature and filters), and the most probable tokens of that distribution."""
  token: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most probable first


@dataclasses.dataclass(frozen=True)
class Chunk:
  """What one engine step added to a request."""
  tokens: list[int]
  text: str = ""   # the decoded text these tokens add ("" without a tokenizer)
  logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked


@dataclasses.dataclass
class RequestStats:
  prompt_tokens: int = 0
  new_tokens: int = 0
  target_calls: int = 0     # the prefill and every round the request took part in
  accepted: int = 0         # draft tokens accepted
  judged: int = 0           # draft tokens the target judged (the a of the speedup formula)
  ngram_accepted: int = 0   # of `accepted`, proposed by the n-gram lookup (the rest: the model)
  ngram_judged: int = 0     # of `judged`, proposed by the n-gram lookup
  mask_rejected: int = 0    # drafted positions whose proposal the grammar's mask refused
  ks: tuple[int, ...] = ()  # the K of every step the request took part in, distinct, sorted
  sources: tuple[str, ...] = ()  # the draft kinds of its speculative steps, distinct, sorted
  queue_s: float = 0.0      # submitted -> prefill started
  time_to_first_token_s: float = float("nan")
  seconds: float = 0.0      # submitted -> finished

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.judged if self.judged else float("nan")

  @property
  def tokens_per_target_call(self) -> float:
    return self.new_tokens / self.target_calls if self.target_calls else float("nan")


@dataclasses.dataclass(frozen=True)
class Completion:
  tokens: list[int]       # EOS included when hit; tokens past a stop string's end dropped
  text: str               # "" without a tokenizer; never includes a stop string
  finish_reason: str
  stats: RequestStats
  logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked


class _Detokenizer:
  """Incremental decoding: text deltas as tokens arrive, never splitting a UTF-8 character
  (a byte-fallback token sequence decodes to U+FFFD until it is complete). Decodes a short
  window behind the newest token, not the whole output each time.

  `context`: the prompt's last tokens, decoded before the first new one but never output. A
  SentencePiece model with a dummy prefix (Llama 2, Mistral) drops the space of a text's first
  piece, so the first new word would lose its space if decoded alone."""

  CONTEXT = 4

  def __init__(self, tokenizer, context: Sequence[int] = ()):
    self._tok = tokenizer
    self._ids: list[int] = [int(t) for t in context[-self.CONTEXT:]]
    if self._ids and tokenizer.decode(self._ids).endswith("\ufffd"):
      self._ids = []  # a prompt cut inside a character: its bytes are not this output's
    self._prefix = 0              # decoding starts here (context for pieces at a boundary)
    self._read = len(self._ids)   # text of ids[prefix:read] is already out

  def push(self, token: int) -> str:
    self._ids.append(int(token))
    before = self._tok.decode(self._ids[self._prefix:self._read])
    now = self._tok.decode(self._ids[self._prefix:])
    if len(now) > len(before) and not now.endswith("\ufffd"):
      self._prefix, self._read = self._read, len(self._ids)
      return now[len(before):]
    return ""

  def flush(self) -> str:
    """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
    before = self._tok.decode(self._ids[self._prefix:self._read])
    now = self._tok.decode(self._ids[self._prefix:])
    self._prefix = self._read = len(self._ids)
    return now[len(before):]


class Request:
  """A submitted request: its stream of chunks and, once finished, its Completion."""

  def __init__(self, request_id: int, prompt: Sequence[int], params: GenerationParams,
               tokenizer=None, images=None, placeholder: int | None = None):
    self.id = request_id
    self.prompt = list(prompt)
    self.params = params
    self.images = images  # n H W 3 float32 (the encoder's input), or None
    self.prefill_group: int | None = None  # requests of one group and prompt share a prefill
    self.submitted = time.perf_counter()
    # Image placeholders are no text (their id may lie past the tokenizer's vocabulary).
    context = [t for t in self.prompt if t != placeholder]
    self._detok = _Detokenizer(tokenizer, context) if tokenizer is not None else None
    self._lock = threading.Condition()
    self._chunks: list[Chunk] = []
    self._tokens: list[int] = []
    self._logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
    self._text = ""       # everything decoded (a found stop string cut off)
    self._sent = 0        # text already handed out in chunks
    self._finish_reason: str | None = None
    self._stats = RequestStats(prompt_tokens=len(self.prompt))
    self._cancelled = False
    self._stopped = False  # a stop string was found (the text is already cut)
    self._wakers: list = []
    self._error: BaseException | None = None

  # ------------------------------------------------------------ reading (any thread)

  @property
  def finished(self) -> bool:
    return self._finish_reason is not None

  @property
  def finish_reason(self) -> str | None:
    return self._finish_reason

  @property
  def stats(self) -> RequestStats:
    return self._stats

  @property
  def tokens(self) -> list[int]:
    with self._lock:
      return list(self._tokens)

  def cancel(self) -> None:
    """Stop generating; the engine frees the slot at its next step (a queued request never
    starts). Tokens already produced stay readable."""
    self._cancelled = True

  @property
  def cancelled(self) -> bool:
    return self._cancelled

  def result(self, timeout: float | None = None) -> Completion:
    with self._lock:
      if not self._lock.wait_for(lambda: self.finished, timeout):
        raise TimeoutError(f"request {self.id} not finished after {timeout} s")
      return self._completion()

  def __iter__(self) -> Iterator[Chunk]:
    i = 0
    while True:
      with self._lock:
        self._lock.wait_for(lambda: i < len(self._chunks) or self.finished)
        chunks, finished = self._chunks[i:], self.finished
      i += len(chunks)
      yield from chunks
      if finished and i == len(self._chunks):
        self._raise_if_failed()
        return

  async def _aiter(self) -> AsyncIterator[Chunk]:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def waker():
      try:
        loop.call_soon_threadsafe(event.set)
      except RuntimeError:  # the reader's loop has closed: nobody is waiting any more
        pass
    with self._lock:
      self._wakers.append(waker)
    try:
      i = 0
      while True:
        with self._lock:
          chunks, finished = self._chunks[i:], self.finished
          event.clear()
        i += len(chunks)
        for c in chunks:
          yield c
        if finished and not chunks:
          self._raise_if_failed()
          return
        if not chunks:
          await event.wait()
    finally:
      with self._lock:
        self._wakers.remove(waker)

  def __aiter__(self) -> AsyncIterator[Chunk]:
    return self._aiter()

  def _completion(self) -> Completion:
    self._raise_if_failed()
    return Completion(tokens=list(self._tokens), text=self._text,
                      finish_reason=self._finish_reason, stats=self._stats,
                      logprobs=None if self._logprobs is None else list(self._logprobs))

  def _raise_if_failed(self):
    if self._error is not None:
      raise RuntimeError(f"request {self.id}: the engine failed") from self._error

  # ------------------------------------------------------------ writing (the engine thread)

  def _deliver(self, tokens: Sequence[int],
               logprobs: Sequence[TokenLogprob] | None = None) -> bool:
    """Appends new tokens (and their logprobs, when the request asked); returns True if a stop
    string ended the request (the engine then frees its slot and calls _finish)."""
    new_tokens, stopped = [], False
    for t in tokens:
      new_tokens.append(int(t))
      if self._detok is None:
        continue
      start = len(self._text)
      self._text += self._detok.push(t)
      if self.params.stop and self._find_stop(start):
        stopped = True
        break
    new_logprobs = None
    if self._logprobs is not None and logprobs is not None:
      new_logprobs = list(logprobs[:len(new_tokens)])
    with self._lock:
      self._tokens.extend(new_tokens)
      if new_logprobs is not None:
        self._logprobs.extend(new_logprobs)
      text = self._take_text(final=stopped)
      if new_tokens or text:
        self._chunks.append(Chunk(new_tokens, text, new_logprobs))
      self._stopped = stopped
      self._lock.notify_all()
      wakers = list(self._wakers)
    for w in wakers:
      w()
    return stopped

  def _find_stop(self, start: int) -> bool:
    longest = max(len(s) for s in self.params.stop)
    window_from = max(0, start - longest + 1)
    hits = [i for i in (self._text.find(s, window_from) for s in self.params.stop) if i >= 0]
    if hits:
      self._text = self._text[:min(hits)]
      return True
    return False

  def _take_text(self, final: bool) -> str:
    """Text not yet handed out, minus a tail that may still grow into a stop string."""
    end = len(self._text)
    if not final and self.params.stop:
      for s in self.params.stop:
        # Each stop string's own longest pending prefix (not bounded by what another one held).
        for n in range(min(len(s) - 1, len(self._text) - self._sent), 0, -1):
          if self._text.endswith(s[:n]):
            end = min(end, len(self._text) - n)
            break
    out, self._sent = self._text[self._sent:end], max(self._sent, end)
    return out

  def _finish(self, reason: str, stats: RequestStats | None = None,
              error: BaseException | None = None) -> None:
    if self._detok is not None and not self._stopped:
      self._text += self._detok.flush()  # e.g. an incomplete character at max_new_tokens
    with self._lock:
      if self.finished:
        return
      if stats is not None:
        self._stats = stats
      self._stats.seconds = time.perf_counter() - self.submitted
      self._error = error
      text = self._take_text(final=True)
      if text:
        self._chunks.append(Chunk([], text))
      self._finish_reason = reason
      self._lock.notify_all()
      wakers = list(self._wakers)
    for w in wakers:
      w()
