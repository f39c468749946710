"""The OpenAI-compatible HTTP front end (FastAPI): /v1/completions, /v1/chat/completions (plain
and `stream: true` server-sent events), /v1/models, /health and /metrics (Prometheus text).

Handlers never touch the device: they validate, `engine.submit` (thread-safe) and read the
request's async stream, while the engine's own thread runs every step. A client that goes away
mid-stream cancels its request, which frees its slot at the engine's next step.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: malformed JSON or
bad values 400, an unknown model 404, a prompt longer than the context 400
(code context_length_exceeded), the engine down 503.

Beyond OpenAI's fields: `top_k` (0 or -1 = off), and each response's `spec_tpu` object with the
request's acceptance statistics (a streamed response sends it with the final chunk).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from typing import Any, Sequence

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from spec_tpu.models.vision import prompt as image_prompt
from spec_tpu.serving import chat as chat_lib, image_urls
from spec_tpu.serving.engine import ContextLengthError, Engine
from spec_tpu.serving.request import GenerationParams, Request

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4     # OpenAI's limit


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def response(self) -> JSONResponse:
    return JSONResponse(status_code=self.status, content={"error": {
        "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


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


def _params(body: dict, max_tokens_field: str = "max_tokens",
            default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerationParams:
  for name, neutral in (("n", 1), ("best_of", 1), ("logprobs", (False, 0)),
                        ("top_logprobs", 0), ("presence_penalty", 0), ("frequency_penalty", 0),
                        ("logit_bias", ({},)), ("suffix", ("",)), ("echo", False),
                        ("tools", ([],)), ("functions", ([],)),
                        ("tool_choice", ("none", "auto")), ("function_call", ("none", "auto")),
                        ("response_format", ({"type": "text"},))):
    _unsupported(body, name, neutral)
  max_tokens = body.get(max_tokens_field)
  if max_tokens is None and max_tokens_field == "max_completion_tokens":
    max_tokens_field = "max_tokens"
  max_tokens = _number(body, max_tokens_field, default_max_tokens, lo=1, integer=True)
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
  return GenerationParams(max_new_tokens=max_tokens,
                          temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),
                          top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
                          top_k=max(top_k, 0), seed=seed, stop=stop)


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


def _usage(request: Request) -> dict:
  n, p = len(request.tokens), len(request.prompt)
  return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def _finite(x):
  return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _spec_stats(request: Request) -> dict:
  s = request.stats
  return {"acceptance_rate": _finite(s.acceptance_rate), "accepted": s.accepted,
          "judged": s.judged, "target_calls": s.target_calls,
          "tokens_per_target_call": _finite(s.tokens_per_target_call), "k": list(s.ks),
          "time_to_first_token_s": _finite(s.time_to_first_token_s), "seconds": s.seconds}


def _sse(obj: Any) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _event_stream(request: Request, head: dict, choices, last_choice, include_usage: bool
                  ) -> StreamingResponse:
  """Server-sent events of one request: a chunk per choice from the async iterator `choices`,
  then last_choice() (after the stream ends, so it knows the finish reason) with spec_tpu's
  stats, the usage if asked, and [DONE]. However the stream ends (a client hanging up included)
  the request is cancelled: a no-op when it finished, else its slot is freed."""
  async def events():
    try:
      try:
        async for choice in choices:
          yield _sse(dict(head, choices=[choice]))
      except RuntimeError as e:  # the engine failed mid-stream: say so, as OpenAI's streams do
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None,
                              "code": None}})
      else:
        yield _sse(dict(head, choices=[last_choice()], spec_tpu=_spec_stats(request)))
        if include_usage:
          yield _sse(dict(head, choices=[], usage=_usage(request)))
      yield "data: [DONE]\n\n"
    finally:
      request.cancel()

  return StreamingResponse(events(), media_type="text/event-stream")


# ------------------------------------------------------------------ the app

def build_app(engine: Engine, model_name: str, chat_template: chat_lib.ChatTemplate | None = None,
              image_dirs: Sequence[str] = ()) -> FastAPI:
  """The FastAPI app serving `engine` (already started) under `model_name`. image_dirs: the
  directories chat requests may name local image files under (image_urls.py); none: only
  inline data: URLs."""
  app = FastAPI(title="spec_tpu", version="0.1.0")
  template = chat_template or chat_lib.ChatTemplate()
  created = int(time.time())
  tok = engine.tokenizer

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return e.response()

  async def _body(http: HttpRequest) -> dict:
    try:
      body = json.loads(await http.body())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
      raise ApiError(400, f"the body is not valid JSON: {e}"[:300]) from None
    if not isinstance(body, dict):
      raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model != model_name:
      raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                     f"{model_name!r}", param="model", code="model_not_found")
    if not engine.running:
      raise ApiError(503, "the engine is not running", kind="server_error")
    return body

  def _submit(prompt, params: GenerationParams, param: str = "prompt", images=None) -> Request:
    try:
      return engine.submit(prompt, params, images) if images else engine.submit(prompt, params)
    except ContextLengthError as e:
      raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    except RuntimeError as e:
      raise ApiError(503, str(e), kind="server_error") from None

  async def _result(http: HttpRequest, request: Request):
    """Waits for the request, cancelling it if the client goes away first."""
    async def watch():
      while True:
        await asyncio.sleep(0.25)
        if await http.is_disconnected():
          request.cancel()
          return
    watcher = asyncio.ensure_future(watch())
    try:
      async for _ in request:
        pass
      return request.result(timeout=0)
    except RuntimeError as e:  # the engine failed while this request was in it
      raise ApiError(503, str(e), kind="server_error") from None
    finally:
      watcher.cancel()

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

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "spec_tpu"}]}

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    body = await _body(http)
    params = _params(body)
    prompts = [_encode(p) for p in _prompts(body)]
    stream, include_usage = _stream(body)
    if stream and len(prompts) > 1:
      raise ApiError(400, "streaming takes one prompt", param="prompt")
    requests = []
    try:
      for p in prompts:
        requests.append(_submit(p, params))
    except ApiError:
      for r in requests:
        r.cancel()
      raise
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
    if not stream:
      choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
      try:
        for i, r in enumerate(requests):
          done = await _result(http, r)
          choices.append({"text": done.text, "index": i, "logprobs": None,
                          "finish_reason": done.finish_reason, "spec_tpu": _spec_stats(r)})
          for key, n in _usage(r).items():
            usage[key] += n
      finally:  # a client gone, or the engine failed: the other prompts' slots are freed now
        for r in requests:
          r.cancel()
      return dict(head, choices=choices, usage=usage)
    request = requests[0]

    async def choices():
      async for chunk in request:
        if chunk.text or (tok is None and chunk.tokens):
          yield {"text": chunk.text, "index": 0, "logprobs": None, "finish_reason": None}

    return _event_stream(request, head, choices(),
                         lambda: {"text": "", "index": 0, "logprobs": None,
                                  "finish_reason": request.finish_reason}, include_usage)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    body = await _body(http)
    params = _params(body, "max_completion_tokens", default_max_tokens=1)
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
    images = []
    for j, url in enumerate(urls or []):
      try:
        images.append(image_urls.read(url, image_dirs, f"image {j}"))
      except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    prompt_len = len(prompt) + len(images) * (vision.block_len - 1 if vision else 0)
    if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
      # OpenAI's chat default: until the end of the context.
      params = dataclasses.replace(params, max_new_tokens=max(1, engine.room(prompt_len)))
    stream, include_usage = _stream(body)
    request = _submit(prompt, params, param="messages", images=images)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not stream:
      done = await _result(http, request)
      return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                           "logprobs": None, "finish_reason": done.finish_reason}],
              "usage": _usage(request), "spec_tpu": _spec_stats(request)}
    head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}

    async def choices():
      yield {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
      async for chunk in request:
        if chunk.text:
          yield {"index": 0, "delta": {"content": chunk.text}, "logprobs": None,
                 "finish_reason": None}

    return _event_stream(request, head, choices(),
                         lambda: {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": request.finish_reason}, include_usage)

  return app
