"""The OpenAI-compatible HTTP front end (FastAPI): /v1/completions, /v1/chat/completions (plain
and `stream: true` server-sent events), /v1/models, /health and /metrics (Prometheus text).

Handlers never touch the device: they validate, `engine.submit` (thread-safe) and read the
request's async stream, while the engine's own thread runs every step. A client that goes away
mid-stream cancels its request, which frees its slot at the engine's next step.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: malformed JSON or
bad values 400, a missing or wrong API key 401 (when the server has one; /health and /metrics
need none), an unknown model 404, a body past the size limit 413, a prompt longer than the
context 400 (code context_length_exceeded), a full queue 503 with Retry-After, the engine down
503, a request past its time limit 504 (a stream gets an error event instead: its status is
already sent).

Beyond OpenAI's fields: `top_k` (0 or -1 = off), `min_p` and `repetition_penalty` (vLLM's),
`logprobs_mode` ("processed", the default, or "raw": see _params), vLLM's
`mm_processor_kwargs: {"do_pan_and_scan": bool}` (chat: Pan & Scan for the request's images,
overriding the server's default), and each response's `spec_tpu` object with the request's
acceptance statistics (a streamed response sends it with the final chunk).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import json
import math
import re
import time
import uuid
from typing import Any, Sequence

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from spec_tpu.models.vision import image as image_lib, prompt as image_prompt
from spec_tpu.serving import chat as chat_lib, image_urls
from spec_tpu.serving.engine import ContextLengthError, Engine, QueueFullError
from spec_tpu.serving.request import GenerationParams, Request, TokenLogprob

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4     # OpenAI's limit
MAX_N = 128              # OpenAI's limit on samples per prompt
MAX_LOGPROBS = 5         # OpenAI's limits: completions' `logprobs`, chat's `top_logprobs`
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300     # OpenAI's limit on logit_bias entries
UNLIKELY = -9999.0       # OpenAI's stand-in for log(0) (JSON has no -inf): a token the
                         # filters removed
RETRY_AFTER_S = 1        # what a client refused for a full queue is told to wait


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server protects itself with. None: no limit."""
  api_key: str | None = None            # clients send `Authorization: Bearer <key>`
  max_body_bytes: int | None = 8 << 20  # a request body past this is refused (413) unread
  request_timeout_s: float | None = None  # a request still running after this is cancelled


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str = "invalid_request_error",
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
    self.headers = headers

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}

  def response(self) -> JSONResponse:
    return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


# ------------------------------------------------------------------ request validation

def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
  value = body.get(name, default)
  if value is None:
    value = default
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  try:
    if ok and integer:
      ok = float(value).is_integer()
      value = int(value) if ok else value
    if ok:
      ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) \
          and (hi is None or value <= hi)
  except OverflowError:  # an integer past float range (a few hundred digits)
    ok = False
  if not ok:
    bounds = f" in {'(' if lo_open else '['}{lo}, {hi}]" if lo is not None and hi is not None \
        else (f" >= {lo}" if lo is not None else "")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}{bounds}, "
                   f"got {shown}", param=name)
  return value


def _unsupported(body: dict, name: str, neutral) -> None:
  if body.get(name) not in (None, neutral) and not (isinstance(neutral, tuple)
                                                     and body.get(name) in neutral):
    raise ApiError(400, f"'{name}' is not supported by this server", param=name)


def _pan_and_scan(body: dict, default: bool) -> bool:
  """Whether a chat request's images get Pan & Scan: vLLM's per-request processor options,
  of which this server knows do_pan_and_scan alone."""
  options = body.get("mm_processor_kwargs")
  if options is None:
    return default
  if (not isinstance(options, dict) or set(options) - {"do_pan_and_scan"}
      or not isinstance(options.get("do_pan_and_scan", default), bool)):
    raise ApiError(400, "'mm_processor_kwargs' takes only 'do_pan_and_scan' (true or false)",
                   param="mm_processor_kwargs")
  return options.get("do_pan_and_scan", default)


def _params(body: dict, chat: bool = False) -> GenerationParams:
  max_tokens_field = "max_completion_tokens" if chat else "max_tokens"
  default_max_tokens = 1 if chat else DEFAULT_MAX_TOKENS  # chat's is replaced by the room left
  for name, neutral in (("suffix", ("",)),
                        ("tools", ([],)), ("functions", ([],)),
                        ("tool_choice", ("none", "auto")), ("function_call", ("none", "auto"))):
    _unsupported(body, name, neutral)
  max_tokens = body.get(max_tokens_field)
  if max_tokens is None and max_tokens_field == "max_completion_tokens":
    max_tokens_field = "max_tokens"
  # max_tokens 0: score the prompt only (completions with echo)
  score_only = not chat and body.get("echo") is True
  max_tokens = _number(body, max_tokens_field, default_max_tokens, lo=0 if score_only else 1,
                       integer=True)
  top_k = _number(body, "top_k", 0, lo=-1, integer=True)
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
    stop = tuple(stop)
  else:
    raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
  if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
    raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings",
                   param="stop")
  seed = body.get("seed")
  if seed is not None:
    seed = _number(body, "seed", None, integer=True)
    seed %= 2 ** 64  # OpenAI allows negative seeds
  if not chat:  # completions: an integer
    logprobs = body.get("logprobs")
    if logprobs is not None:
      logprobs = _number(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)
  else:  # chat: a flag, and how many alternatives
    top = _number(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS, integer=True)
    logprobs = top if _flag(body, "logprobs") else None
    if top and logprobs is None:
      raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
  # Which distribution logprobs describe: the one each token was sampled from (default), or
  # the model's raw one (vLLM's names for its server-wide option are accepted too).
  mode = body.get("logprobs_mode")
  if mode not in (None, "processed", "raw", "processed_logprobs", "raw_logprobs"):
    raise ApiError(400, "'logprobs_mode' must be 'processed' (the distribution each token was "
                   "sampled from) or 'raw' (the model's own, before temperature, penalties and "
                   "filters)", param="logprobs_mode")
  bias = body.get("logit_bias") or {}
  if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS or not all(
      isinstance(t, str) and t.strip().isdigit() for t in bias):
    raise ApiError(400, f"'logit_bias' must map at most {MAX_LOGIT_BIAS} token ids to biases",
                   param="logit_bias")
  bias = tuple((int(t), float(_number(bias, t, 0, lo=-100, hi=100))) for t in bias)
  controls = dict(
      presence_penalty=float(_number(body, "presence_penalty", 0.0, lo=-2, hi=2)),
      frequency_penalty=float(_number(body, "frequency_penalty", 0.0, lo=-2, hi=2)),
      repetition_penalty=float(_number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)),
      min_p=float(_number(body, "min_p", 0.0, lo=0, hi=1)), logit_bias=bias)
  return GenerationParams(**controls, max_new_tokens=max(max_tokens, 1),
                          temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),
                          top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
                          top_k=max(top_k, 0), seed=seed, stop=stop, logprobs=logprobs,
                          raw_logprobs=mode in ("raw", "raw_logprobs"))


def _grammar(body: dict, grammars):
  """The compiled grammar a request's response_format (json_object, json_schema) or
  `guided_regex` (an extension, as vLLM names it) asks for; None for plain text."""
  fmt = body.get("response_format")
  regex = body.get("guided_regex")
  if fmt in (None, {"type": "text"}) and regex is None:
    return None
  from spec_tpu.decoding.grammar import GrammarError, json_object_regex
  if grammars is None:
    raise ApiError(400, "structured output is not enabled on this server (engine."
                   "grammar_states = 0, or no tokenizer or EOS)", param="response_format")
  try:
    if regex is not None:
      if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "give 'response_format' or 'guided_regex', not both",
                       param="guided_regex")
      if not isinstance(regex, str):
        raise ApiError(400, "'guided_regex' must be a string", param="guided_regex")
      return grammars.regex(regex)
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
      return grammars.regex(json_object_regex())
    if kind == "json_schema":
      spec = fmt.get("json_schema")
      if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ApiError(400, "'response_format.json_schema' must be an object with a "
                       "'schema' object", param="response_format")
      # strict or not, the output follows the schema: the mask never lets it stray.
      return grammars.json_schema(spec.get("schema", {}))
    raise ApiError(400, "'response_format.type' must be 'text', 'json_object' or "
                   "'json_schema'", param="response_format")
  except GrammarError as e:
    raise ApiError(400, str(e), param="guided_regex" if regex is not None else
                   "response_format") from None


def _samples(n: int, params: GenerationParams) -> list[GenerationParams]:
  """The settings of each of the n samples of a prompt: sample j draws from the stream
  (seed, j) (seed + j * 2^32), so sample 0 is the request without n, and with a seed each
  sample's tokens repeat. Without a seed the engine draws one per sample."""
  if params.seed is None:
    return [params] * n
  return [dataclasses.replace(params, seed=(params.seed + j * 2 ** 32) % 2 ** 64)
          for j in range(n)]


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(tok, token: int) -> bytes:
  """The bytes a token stands for (a SentencePiece byte-fallback piece is one byte; its word
  boundary mark a space)."""
  if tok is None:
    return f"token_id:{token}".encode()
  piece = tok.id_to_piece(token)
  byte = _BYTE_PIECE.fullmatch(piece)
  return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()


def _token_text(tok, token: int) -> str:
  return _token_bytes(tok, token).decode("utf-8", errors="replace")


def _logprob(x: float) -> float:
  return x if math.isfinite(x) else UNLIKELY


def _completion_logprobs(tok, logprobs: list[TokenLogprob] | None, offset: int = 0
                         ) -> dict | None:
  """Completions' shape: parallel lists, text_offset counted from `offset`. A prompt's first
  token (NaN: nothing before it to predict it) gets null, as OpenAI's echo gives."""
  if logprobs is None:
    return None
  tokens = [_token_text(tok, lp.token) for lp in logprobs]
  offsets = list(itertools.accumulate((len(t) for t in tokens), initial=offset))[:-1]
  unscored = lambda lp: math.isnan(lp.logprob)
  return {"tokens": tokens,
          "token_logprobs": [None if unscored(lp) else _logprob(lp.logprob) for lp in logprobs],
          "top_logprobs": [None if unscored(lp) else
                           {_token_text(tok, t): _logprob(v) for t, v in lp.top}
                           for lp in logprobs], "text_offset": offsets}


def _chat_logprobs(tok, logprobs: list[TokenLogprob] | None) -> dict | None:
  """Chat's shape: an entry per token, its alternatives inside."""
  if logprobs is None:
    return None
  entry = lambda t, v: {"token": _token_text(tok, t), "logprob": _logprob(v),
                        "bytes": list(_token_bytes(tok, t))}
  return {"content": [dict(entry(lp.token, lp.logprob),
                           top_logprobs=[entry(t, v) for t, v in lp.top]) for lp in logprobs]}


def _flag(body: dict, name: str, param: str | None = None) -> bool:
  """A boolean field: absent or null is false; "false" (a string) is an error, not true."""
  value = body.get(name)
  if value is not None and not isinstance(value, bool):
    raise ApiError(400, f"'{param or name}' must be true or false, got {value!r}"[:200],
                   param=param or name)
  return bool(value)


def _stream(body: dict) -> tuple[bool, bool]:
  """(stream, include_usage) of a request."""
  stream = _flag(body, "stream")
  options = body.get("stream_options")
  if options is None:
    return stream, False
  if not isinstance(options, dict):
    raise ApiError(400, "'stream_options' must be an object", param="stream_options")
  if not stream:
    raise ApiError(400, "'stream_options' is only allowed when 'stream' is true",
                   param="stream_options")
  return stream, _flag(options, "include_usage", "stream_options.include_usage")


def _usage(requests: list[Request], n: int = 1) -> dict:
  """Tokens of a call's requests: each prompt counted once (n samples share it)."""
  p = sum(len(r.prompt) for r in requests[::n])
  c = sum(len(r.tokens) for r in requests)
  return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _merged(requests: list[Request], deadline: float | None):
  """(index, chunk) of every request's chunks as they arrive, until all are finished. Raises
  TimeoutError once the loop's clock passes `deadline`, RuntimeError if the engine failed."""
  loop = asyncio.get_running_loop()
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(i, request):
    try:
      async for chunk in request:
        queue.put_nowait((i, chunk, None))
      queue.put_nowait((i, None, None))
    except Exception as e:  # pylint: disable=broad-except
      queue.put_nowait((i, None, e))

  tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
  try:
    left = len(requests)
    while left:
      wait = None if deadline is None else max(deadline - loop.time(), 0)
      i, chunk, error = await asyncio.wait_for(queue.get(), wait)
      if error is not None:
        raise error
      if chunk is None:
        left -= 1
      else:
        yield i, chunk
  finally:
    for t in tasks:
      t.cancel()


def _finite(x):
  return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _spec_stats(request: Request) -> dict:
  s = request.stats
  return {"acceptance_rate": _finite(s.acceptance_rate), "accepted": s.accepted,
          "judged": s.judged, "ngram_accepted": s.ngram_accepted,
          "ngram_judged": s.ngram_judged, "mask_rejected": s.mask_rejected,
          "target_calls": s.target_calls,
          "tokens_per_target_call": _finite(s.tokens_per_target_call), "k": list(s.ks),
          "sources": list(s.sources),
          "time_to_first_token_s": _finite(s.time_to_first_token_s), "seconds": s.seconds}


def _sse(obj: Any) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _timeout_error(seconds: float) -> ApiError:
  return ApiError(504, f"the request did not finish within the server's limit of {seconds:g} s",
                  kind="server_error", code="timeout")


def _event_stream(requests: list[Request], head: dict, choice, last_choice, include_usage: bool,
                  n: int, deadline: float | None, timeout_s: float | None) -> StreamingResponse:
  """Server-sent events of a call's requests (choice i is requests[i]): a chunk per
  choice(i, chunk) that is not None, as the engine delivers them, then last_choice(i) for each
  (after its stream ends, so it knows the finish reason) with spec_tpu's stats, the usage if
  asked, and [DONE]. However the stream ends (a client hanging up, the time limit) the requests
  are cancelled: a no-op for those that finished, else their slots are freed."""
  async def events():
    try:
      try:
        async for i, chunk in _merged(requests, deadline):
          c = choice(i, chunk)
          if c is not None:
            yield _sse(dict(head, choices=[c]))
      except RuntimeError as e:  # the engine failed mid-stream: say so, as OpenAI's streams do
        yield _sse(ApiError(503, str(e), kind="server_error").body())
      except TimeoutError:
        yield _sse(_timeout_error(timeout_s).body())
      else:
        for i, r in enumerate(requests):
          yield _sse(dict(head, choices=[last_choice(i)], spec_tpu=_spec_stats(r)))
        if include_usage:
          yield _sse(dict(head, choices=[], usage=_usage(requests, n)))
      yield "data: [DONE]\n\n"
    finally:
      for r in requests:
        r.cancel()

  return StreamingResponse(events(), media_type="text/event-stream")


# ------------------------------------------------------------------ the app

def build_app(engine: Engine, model_name: str, chat_template: chat_lib.ChatTemplate | None = None,
              limits: Limits = Limits(), image_dirs: Sequence[str] = (),
              fetch: image_urls.Fetch | None = None, pan_and_scan: bool = False) -> FastAPI:
  """The FastAPI app serving `engine` (already started) under `model_name`. image_dirs: the
  directories chat requests may name local image files under (image_urls.py); none: only
  inline data: URLs. fetch: how http(s) image URLs are fetched (None: refused). pan_and_scan:
  Pan & Scan for chat images unless a request says otherwise (mm_processor_kwargs)."""
  app = FastAPI(title="spec_tpu", version="0.1.0")
  template = chat_template or chat_lib.ChatTemplate()
  created = int(time.time())
  tok = engine.tokenizer
  grammars = getattr(engine, "grammars", None)  # structured output (None: off)
  key = limits.api_key.encode() if limits.api_key else None
  timeout_s = limits.request_timeout_s
  # Pan & Scan's words, tokenized once (a model that reads images, with a tokenizer).
  crop_words = (image_prompt.crop_text_ids(tok.encode)
                if engine.vision is not None and tok is not None else None)

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return e.response()

  def _authorize(http: HttpRequest) -> None:
    """Every /v1/ route starts here (health checks and Prometheus scrapes carry no key). Not
    an HTTP middleware: Starlette's hides a client's disconnect from the handler."""
    if key is None:
      return
    scheme, _, given = http.headers.get("authorization", "").partition(" ")
    # Constant time: how much of a guess matched must not show in the answer's timing.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
      raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                     code="invalid_api_key")

  async def _read(http: HttpRequest) -> bytes:
    """The body, refused (413) past the size limit before more than the limit is held."""
    limit = limits.max_body_bytes
    too_big = lambda: ApiError(413, f"the request body exceeds this server's limit of {limit} "
                               "bytes", code="request_too_large")
    if limit is None:
      return await http.body()
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
      raise too_big()
    parts, size = [], 0
    async for part in http.stream():
      size += len(part)
      if size > limit:
        raise too_big()
      parts.append(part)
    return b"".join(parts)

  async def _body(http: HttpRequest, model_optional: bool = False) -> dict:
    """The request's JSON object, authorized, for this server's model (a body without a
    model passes where model_optional)."""
    _authorize(http)
    raw = await _read(http)
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
      raise ApiError(400, f"the body is not valid JSON: {e}"[:300]) from None
    if not isinstance(body, dict):
      raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model != model_name and not (model_optional and model is None):
      raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                     f"{model_name!r}", param="model", code="model_not_found")
    if not engine.running:
      raise ApiError(503, "the engine is not running", kind="server_error")
    return body

  def _submit(items: list[tuple], param: str = "prompt") -> list[Request]:
    try:  # the n samples of a prompt share its prefill
      return engine.submit_all(items, share_prefill=True)
    except ContextLengthError as e:
      raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    except QueueFullError as e:
      raise ApiError(503, str(e), kind="server_error", code="queue_full",
                     headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except RuntimeError as e:
      raise ApiError(503, str(e), kind="server_error") from None

  def _deadline() -> float | None:
    return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

  async def _results(http: HttpRequest, requests: list[Request]):
    """Waits for the requests; cancels them all if the client goes away first or the time
    limit passes."""
    async def watch():
      while True:
        await asyncio.sleep(0.25)
        if await http.is_disconnected():
          for r in requests:
            r.cancel()
          return
    watcher = asyncio.ensure_future(watch())
    try:
      async for _ in _merged(requests, _deadline()):
        pass
      return [r.result(timeout=0) for r in requests]
    except RuntimeError as e:  # the engine failed while a request was in it
      raise ApiError(503, str(e), kind="server_error") from None
    except TimeoutError:
      raise _timeout_error(timeout_s) from None
    finally:
      watcher.cancel()
      for r in requests:  # a client gone, the engine failed, too late: slots are freed now
        r.cancel()

  def _prompts(body: dict) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
      return [prompt]
    if isinstance(prompt, list) and prompt:
      if all(isinstance(p, str) for p in prompt):
        return prompt
      if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
      if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or "
                   "a list of such lists", param="prompt")

  def _encode(prompt) -> list[int] | str:
    if isinstance(prompt, str) and tok is None:
      raise ApiError(400, "this server has no tokenizer: send token ids", param="prompt")
    return prompt

  @app.get("/health")
  async def health():
    if engine.running:
      return {"status": "ok", "model": model_name}
    return JSONResponse(status_code=503, content={"status": "error",
                                                  "detail": repr(engine.failure)})

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(engine.metrics.prometheus(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")

  # vLLM's tokenizer endpoints (at the root, as vLLM serves them): clients that count or split
  # tokens themselves (lm-evaluation-harness's local-completions model picks them up on its
  # own) then need no copy of the tokenizer.
  def _tokenizer_needed():
    if tok is None:
      raise ApiError(400, "this server has no tokenizer: it takes token ids only")

  @app.get("/tokenizer_info")
  async def tokenizer_info(http: HttpRequest):
    _authorize(http)
    _tokenizer_needed()
    piece = lambda i: tok.id_to_piece(i) if i is not None and i >= 0 else None
    eos = engine.pair.eos_ids[0] if engine.pair.eos_ids else None  # the first: vLLM's one id
    return {"tokenizer_class": type(tok).__name__, "name": getattr(tok, "name", None),
            "eos_token": piece(eos), "eos_token_id": eos,
            "bos_token": piece(tok.bos_id), "bos_token_id": tok.bos_id,
            "pad_token": piece(engine.pair.pad_id), "pad_token_id": engine.pair.pad_id,
            "model_max_length": engine.max_len, "add_bos_token": engine.add_bos,
            "chat_template": None if template.is_fallback else template.source}

  @app.post("/tokenize")
  async def tokenize(http: HttpRequest):
    body = await _body(http, model_optional=True)
    _tokenizer_needed()
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
      raise ApiError(400, "'prompt' must be a string", param="prompt")
    # add_special_tokens (vLLM's default true): encoded as a text prompt to /v1/completions is.
    special = True if body.get("add_special_tokens") is None else \
        _flag(body, "add_special_tokens")
    tokens = tok.encode(prompt, add_bos=special and engine.add_bos)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_len}

  @app.post("/detokenize")
  async def detokenize(http: HttpRequest):
    body = await _body(http, model_optional=True)
    _tokenizer_needed()
    tokens = body.get("tokens")
    vocab = engine.pair.target_cfg.num_tokens
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                             and 0 <= t < vocab for t in tokens)):
      raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})",
                     param="tokens")
    return {"prompt": tok.decode(tokens)}

  @app.get("/v1/models")
  async def models(http: HttpRequest):
    _authorize(http)
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "spec_tpu"}]}

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    body = await _body(http)
    # Compiled off the event loop: a large schema at a large vocabulary takes seconds.
    params = dataclasses.replace(_params(body),
                                 grammar=await asyncio.to_thread(_grammar, body, grammars))
    prompts = [_encode(p) for p in _prompts(body)]
    stream, include_usage = _stream(body)
    n = _number(body, "n", 1, lo=1, hi=MAX_N, integer=True)
    # best_of: that many samples per prompt, the n most probable returned (by the sum of
    # their tokens' logprobs; all are counted in the usage, as OpenAI does).
    best_of = _number(body, "best_of", n, lo=n, hi=MAX_N, integer=True)
    if best_of > n and stream:
      raise ApiError(400, "'best_of' > 'n' cannot stream", param="best_of")
    # echo: each choice's text starts with its prompt's, and its logprobs with the prompt's
    # tokens' (under the target's own distribution; max_tokens 0 scores the prompt only).
    echo = _flag(body, "echo")
    if echo and stream:
      raise ApiError(400, "'echo' cannot stream on this server", param="echo")
    generate = not (echo and body.get("max_tokens") == 0)
    scored = params if params.logprobs is not None or best_of == n else \
        dataclasses.replace(params, logprobs=0)
    echoed, futures = [None] * len(prompts), []
    if echo:  # queued first: a refused prompt leaves no generation running for nobody
      try:
        futures = [engine.score(p, params.logprobs or 0) for p in prompts]
      except ContextLengthError as e:
        raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
      except ValueError as e:
        raise ApiError(400, str(e), param="echo") from None
      except QueueFullError as e:
        raise ApiError(503, str(e), kind="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
      except RuntimeError as e:
        raise ApiError(503, str(e), kind="server_error") from None
    # Request i * best_of + j is sample j of prompt i (OpenAI's order when best_of = n).
    requests = _submit([(p, q) for p in prompts for q in _samples(best_of, scored)]) \
        if generate else []
    if echo:
      try:
        echoed = [await asyncio.wrap_future(f) for f in futures]
      except Exception as e:  # pylint: disable=broad-except  (the engine failed meanwhile)
        for r in requests:
          r.cancel()
        raise ApiError(503, f"scoring the prompt failed: {e}"[:300], kind="server_error") \
            from None
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
    if not stream:
      done = await _results(http, requests) if generate else []
      choices = []
      for i, p in enumerate(prompts):
        group = list(range(i * best_of, (i + 1) * best_of))
        if best_of > n:
          group.sort(key=lambda g: -sum(lp.logprob for lp in done[g].logprobs))
        for g in group[:n] if generate else [None] * n:
          text = done[g].text if generate else ""
          logprobs = done[g].logprobs if generate else []
          if echo:
            text = (p if isinstance(p, str) else tok.decode(p) if tok else "") + text
            logprobs = echoed[i] + (logprobs or [])
          choices.append({"text": text, "index": len(choices),
                          "logprobs": _completion_logprobs(tok, logprobs)
                          if params.logprobs is not None else None,
                          "finish_reason": done[g].finish_reason if generate else "length",
                          "spec_tpu": _spec_stats(requests[g]) if generate else None})
      usage = _usage(requests, best_of) if generate else \
          {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
      if not generate:
        usage["prompt_tokens"] = usage["total_tokens"] = sum(len(e) for e in echoed)
      return dict(head, choices=choices, usage=usage)
    offsets = [0] * len(requests)

    def choice(i, chunk):
      if chunk.text or chunk.logprobs or (tok is None and chunk.tokens):
        logprobs = _completion_logprobs(tok, chunk.logprobs, offsets[i])
        if logprobs is not None:
          offsets[i] += sum(len(t) for t in logprobs["tokens"])
        return {"text": chunk.text, "index": i, "logprobs": logprobs, "finish_reason": None}
      return None

    return _event_stream(requests, head, choice,
                         lambda i: {"text": "", "index": i, "logprobs": None,
                                    "finish_reason": requests[i].finish_reason},
                         include_usage, n, _deadline(), timeout_s)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    body = await _body(http)
    params = dataclasses.replace(_params(body, chat=True),
                                 grammar=await asyncio.to_thread(_grammar, body, grammars))
    messages = body.get("messages")
    if not isinstance(messages, list):
      raise ApiError(400, "'messages' must be a list", param="messages")
    vision = engine.vision
    urls = None if vision is None else []
    try:
      text, bos = template.render(messages, urls)
    except chat_lib.ChatTemplateError as e:
      raise ApiError(400, str(e), param="messages") from None
    if tok is None:
      raise ApiError(400, "this server has no tokenizer: chat needs one", param="messages")
    bos = bos or (template.is_fallback and engine.add_bos)
    # Each image's place becomes the start_of_image id (the engine lays its block out there).
    prompt = [tok.bos_id] if bos else []
    if vision is None:
      prompt += tok.encode(text)
    else:
      prompt += image_prompt.encode_marked(tok.encode, text, chat_lib.IMAGE_MARK,
                                           vision.start_id)
    crop_text = crop_words if _pan_and_scan(body, pan_and_scan) and urls else None

    def read_images():  # in a worker thread: downloads and decoding block
      return [image_lib.to_pil(image_urls.read(url, image_dirs, f"image {j}", fetch),
                               f"image {j}") for j, url in enumerate(urls or [])]

    try:
      images = await asyncio.to_thread(read_images)
      if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
        # OpenAI's chat default: until the end of the context (the prompt as laid out).
        laid_out = (image_prompt.lay_out(prompt, images, vision, "the prompt", crop_text)[0]
                    if images else prompt)
        params = dataclasses.replace(params, max_new_tokens=max(1, engine.room(len(laid_out))))
    except ValueError as e:
      raise ApiError(400, str(e), param="messages") from None
    stream, include_usage = _stream(body)
    n = _number(body, "n", 1, lo=1, hi=MAX_N, integer=True)
    requests = _submit([(prompt, q, images, crop_text) for q in _samples(n, params)],
                       param="messages")
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not stream:
      done = await _results(http, requests)
      return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
              "choices": [{"index": i, "message": {"role": "assistant", "content": d.text},
                           "logprobs": _chat_logprobs(tok, d.logprobs),
                           "finish_reason": d.finish_reason}
                          for i, d in enumerate(done)],
              "usage": _usage(requests, n), "spec_tpu": _spec_stats(requests[0])}
    head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
    started = set()

    def choice(i, chunk):
      logprobs = _chat_logprobs(tok, chunk.logprobs)
      if i not in started:  # a choice's first chunk names the role
        started.add(i)
        return {"index": i, "delta": {"role": "assistant", "content": chunk.text},
                "logprobs": logprobs, "finish_reason": None}
      if chunk.text or chunk.logprobs:
        return {"index": i, "delta": {"content": chunk.text}, "logprobs": logprobs,
                "finish_reason": None}
      return None

    return _event_stream(requests, head, choice,
                         lambda i: {"index": i, "delta": {} if i in started else
                                    {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": requests[i].finish_reason},
                         include_usage, n, _deadline(), timeout_s)

  return app
