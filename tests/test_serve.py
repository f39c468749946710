"""`python -m launch.serve` as users run it, talked to by the real `openai` client: plain and
streamed completions and chats, 64 concurrent mixed requests, a client that walks away
mid-stream, bad requests answered 4xx while the server keeps serving, and greedy output equal to
the Sampler's token for token.

One server for the module (random tiny models with the shipped tokenizer, one CPU device, K = 2
fixed so seeded outputs repeat), started on 127.0.0.1 at a free port. Every round computes all
its slots, busy or not: 4 slots keep the many one-request tests cheap, and the queue alone
holds 64 clients at once.
"""

import asyncio
import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny_random  # noqa: E402
from spec_tpu import setup as common  # noqa: E402

MODEL = "random_tiny_target"  # the target's name in configs/tiny_random.py
MAX_LEN = 512
SLOTS, MAX_QUEUE, MAX_BODY, K = 4, 64, 1_000_000, 2
KEY = "test-key-0123"  # the fixture's server requires it (through SPEC_TPU_API_KEY)
OVERRIDES = ["--config.model.checkpoint=", "--config.draft.checkpoint=",
             "--config.engine.calibrate=False", "--config.engine.adaptive_k=False",
             f"--config.engine.k={K}", f"--config.engine.num_slots={SLOTS}",
             f"--config.engine.max_len={MAX_LEN}", "--config.engine.rounds_per_step=2",
             f"--config.serve.max_queue={MAX_QUEUE}",
             f"--config.serve.max_body_bytes={MAX_BODY}"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  yield from _launch_serve(tmp_path_factory, "configs/tiny_random.py", OVERRIDES)


def _tiny_random_without_prompts(folder) -> str:
  """configs/tiny_random.py without its prompts, whose prompt lengths the server would compile
  inserts for at start-up: a server that answers a few short prompts compiles only theirs."""
  path = folder / "tiny_random_without_prompts.py"
  path.write_text("from configs import tiny_random\n\n\ndef get_config():\n"
                  "  c = tiny_random.get_config()\n  c.run.prompts = ()\n  return c\n")
  return str(path)


def _launch_serve(tmp_path_factory, config, overrides):
  """`python -m launch.serve --config=config *overrides` on a free port: yields its URL once
  /health answers, stops it after."""
  port = _free_port()
  log = tmp_path_factory.mktemp("serve") / "server.log"
  env = dict(os.environ)
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"
  env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", SPEC_TPU_API_KEY=KEY,
             PYTHONPATH=REPO)
  with open(log, "wb") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.serve", f"--config={config}",
         f"--port={port}", *overrides], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 240
    while True:
      assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
      assert time.monotonic() < deadline, f"server not up:\n{log.read_text()[-3000:]}"
      try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        time.sleep(0.1)
    yield url
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _client(url, **kw):
  return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


def _async_client(url, timeout=300):
  return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=timeout)


def _metrics(url) -> dict:
  with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
    text = r.read().decode()
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      out[name] = float(value)
  return out


def _post(url, path, body: bytes, key=KEY, headers=False):
  auth = {"Authorization": f"Bearer {key}"} if key else {}
  req = urllib.request.Request(url + path, data=body, method="POST",
                               headers={"Content-Type": "application/json", **auth})
  try:
    with urllib.request.urlopen(req, timeout=30) as r:
      out = r.status, json.loads(r.read()), r.headers
  except urllib.error.HTTPError as e:
    out = e.code, json.loads(e.read()), e.headers
  return out if headers else out[:2]


# ---------------------------------------------------------------------------------------------

def test_completion_plain_and_streamed_agree(server):
  client = _client(server)
  # Given one seeded request, asked for plainly and as a stream,
  kw = dict(model=MODEL, prompt="def add(a, b):", max_tokens=24, temperature=0.8, seed=7)
  plain = client.completions.create(**kw)
  chunks = list(client.completions.create(stream=True, **kw))
  # then the stream's deltas add up to the plain text, and both say why they ended.
  assert plain.choices[0].text == "".join(c.choices[0].text for c in chunks if c.choices)
  assert plain.choices[0].finish_reason in ("stop", "length")
  assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
  assert len(chunks) > 2
  assert plain.usage.completion_tokens <= 24 and plain.usage.prompt_tokens > 0
  stats = plain.choices[0].model_extra["spec_tpu"]
  assert stats["target_calls"] >= 1 and stats["k"] == [K] and stats["sources"] == ["model"]


def test_chat_plain_and_streamed(server):
  client = _client(server)
  messages = [{"role": "system", "content": "Write Python."},
              {"role": "user", "content": "def fib(n):"}]
  reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=3)
  assert reply.choices[0].message.role == "assistant"
  assert reply.usage.completion_tokens <= 12
  stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=3,
                                          stream=True)
  text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
  assert text == reply.choices[0].message.content


def test_models_health_and_metrics(server):
  assert [m.id for m in _client(server).models.list()] == [MODEL]
  with urllib.request.urlopen(server + "/health", timeout=10) as r:
    assert json.loads(r.read())["status"] == "ok"
  m = _metrics(server)
  for name in ("spec_tpu_tokens_per_second", "spec_tpu_queue_length", "spec_tpu_active_slots",
               "spec_tpu_acceptance_rate", "spec_tpu_k", "spec_tpu_time_to_first_token_seconds_count",
               "spec_tpu_generated_tokens_total"):
    assert name in m, name
  assert m["spec_tpu_k"] == K and m["spec_tpu_slots"] == SLOTS


def test_64_concurrent_mixed_requests_each_answered_once(server):
  # Given 64 clients at once (the slots plus a queue of MAX_QUEUE = 64 hold them all while no
  # earlier test leaves a request behind), with mixed lengths, temperatures, top-p, top-k,
  # seeds, and half of them streaming,
  before = _metrics(server)
  client = _async_client(server)

  async def one(i):
    kw = dict(model=MODEL, prompt=f"x = {i}\n" * (1 + i % 5), max_tokens=1 + (i * 7) % 16,
              temperature=(0.0, 0.7, 1.2)[i % 3], top_p=(1.0, 0.9)[i % 2], seed=i,
              extra_body={"top_k": (0, 5, 40)[i % 3]})
    if i % 2:
      text, finish, ids = "", [], set()
      async for c in await client.completions.create(stream=True, **kw):
        ids.add(c.id)
        if c.choices:
          text += c.choices[0].text
          if c.choices[0].finish_reason:
            finish.append(c.choices[0].finish_reason)
      assert len(ids) == 1 and len(finish) == 1
      return i, next(iter(ids)), text, finish[0]
    r = await client.completions.create(**kw)
    assert r.usage.completion_tokens <= kw["max_tokens"]
    return i, r.id, r.choices[0].text, r.choices[0].finish_reason

  async def run():
    try:
      return await asyncio.gather(*(one(i) for i in range(64)))
    finally:
      await client.close()

  results = asyncio.run(run())
  # then each gets exactly one answer, its own (ids unique), and the server counted 64 more.
  assert sorted(i for i, *_ in results) == list(range(64))
  assert len({rid for _, rid, *_ in results}) == 64
  assert all(f in ("stop", "length") for *_, f in results)
  after = _metrics(server)
  finished = lambda m: sum(v for k, v in m.items() if k.startswith("spec_tpu_requests_total"))
  assert finished(after) - finished(before) == 64
  assert after["spec_tpu_active_slots"] == 0 and after["spec_tpu_queue_length"] == 0


def test_client_disconnecting_mid_stream_frees_its_slot(server):
  cancelled = lambda m: m.get('spec_tpu_requests_total{finish_reason="cancelled"}', 0)
  before = cancelled(_metrics(server))
  # Given a long streamed request (hundreds of rounds),
  stream = _client(server).completions.create(model=MODEL, prompt="def f():", max_tokens=400,
                                              temperature=1.0, stream=True)
  next(iter(stream))
  # when the client reads one chunk and hangs up,
  stream.close()
  # then the server cancels the request and frees its slot long before it would have finished.
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline:
    m = _metrics(server)
    if cancelled(m) > before and m["spec_tpu_active_slots"] == 0:
      break
    time.sleep(0.05)
  assert cancelled(m) == before + 1, m
  assert m["spec_tpu_active_slots"] == 0


def test_client_disconnecting_from_a_plain_request_cancels_it(server):
  cancelled = lambda m: m.get('spec_tpu_requests_total{finish_reason="cancelled"}', 0)
  before = cancelled(_metrics(server))
  # Given a long non-streamed request whose client hangs up once the server has it,
  body = json.dumps({"model": MODEL, "prompt": "def g():", "max_tokens": 400}).encode()
  host, port = server.split("//")[1].split(":")
  with socket.create_connection((host, int(port))) as sock:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (KEY.encode(), len(body), body))
    time.sleep(0.3)
  # then the server notices (it polls) and cancels it, freeing the slot.
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline and cancelled(_metrics(server)) == before:
    time.sleep(0.05)
  m = _metrics(server)
  assert cancelled(m) == before + 1 and m["spec_tpu_active_slots"] == 0


@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "random_tiny_target", "prompt": "x"', 400, None),          # malformed JSON
    (b'[1, 2]', 400, None),                                                  # not an object
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "random_tiny_target", "prompt": "x", "temperature": -1}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "top_p": 0}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "top_k": 1000}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "max_tokens": 0}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "n": 0}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "logprobs": 6}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "echo": true, "stream": true}', 400,
     None),
    (b'{"model": "random_tiny_target", "prompt": "x", "n": 2, "best_of": 1}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "best_of": 2, "stream": true}', 400,
     None),
    (b'{"model": "random_tiny_target", "prompt": "x", "n": 129}', 400, None),
    # More samples at once than the queue holds: never accepted, so not a 503.
    (b'{"model": "random_tiny_target", "prompt": "x", "n": 100}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": 7}', 400, None),
    (('{"model": "random_tiny_target", "prompt": "' + "a = 1\\n" * 400 + '"}').encode(), 400,
     "context_length_exceeded"),
    # Integers past float range, JSON nested past Python's recursion limit.
    (b'{"model": "random_tiny_target", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}", 400,
     None),
    (b'{"model": "random_tiny_target", "prompt": "x", "seed": -1' + b"0" * 400 + b"}", 400, None),
    (b'{"model": "random_tiny_target", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     None),
    (b'{"model": "random_tiny_target", "prompt": "x", "presence_penalty": 3}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "min_p": 1.5}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "logprobs_mode": "logits"}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "logit_bias": {"x": 1}}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "logit_bias": {"999999": 1}}', 400, None),
    # Accepted and silently ignored before: tools, JSON mode, "false" as a string.
    (b'{"model": "random_tiny_target", "prompt": "x", "tools": [{"type": "function"}]}', 400,
     None),
    # JSON mode where the engine has no grammar table (engine.grammar_states = 0).
    (b'{"model": "random_tiny_target", "prompt": "x", "response_format": {"type": '
     b'"json_object"}}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "stream": "false"}', 400, None),
    (b'{"model": "random_tiny_target", "prompt": "x", "stream_options": {"include_usage": '
     b'true}}', 400, None),
])
def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, body, status,
                                                                       code):
  got, error = _post(server, "/v1/completions", body)
  assert got == status, error
  assert isinstance(error["error"]["message"], str) and error["error"]["type"]
  assert error["error"]["code"] == code
  ok = _client(server).completions.create(model=MODEL, prompt="import os", max_tokens=3)
  assert ok.usage.completion_tokens >= 1


def _readme_block(first_line: str) -> str:
  """The README's indented example that starts with `first_line`, dedented, continuations joined
  for shell lines."""
  with open(os.path.join(REPO, "README.md")) as f:
    lines = f.read().splitlines()
  start = lines.index("    " + first_line)
  block = []
  for line in lines[start:]:
    if not line.startswith("    "):
      break
    block.append(line[4:])
  return "\n".join(block) + "\n"


def test_the_readmes_client_examples_run_against_the_server(server, capsys):
  # Given the README's curl and openai examples, pointed at this server and its model,
  host = server[len("http://"):]
  curl = _readme_block("curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\")
  curl = curl.replace("\\\n", " ").replace("localhost:8000", host).replace("stdlib_target", MODEL)
  example = _readme_block("from openai import OpenAI")
  example = example.replace("http://127.0.0.1:8000", server).replace("stdlib_target", MODEL)
  # (this server requires its key, which the README's server, started without one, does not)
  assert curl.startswith("curl ") and 'api_key="unused"' in example
  curl = curl.replace("curl ", f"curl -H 'Authorization: Bearer {KEY}' ", 1)
  example = example.replace('api_key="unused"', f'api_key="{KEY}"')
  # when they run as written, the curl command streams events to its end
  if shutil.which("curl"):
    out = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=120)
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert out.returncode == 0 and events[-1] == "data: [DONE]", out.stdout + out.stderr
    assert json.loads(events[0][len("data: "):])["model"] == MODEL
  # and the client's example runs to its end, printing the completion's text.
  exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  assert capsys.readouterr().out.endswith("\n")


def test_openai_client_sees_errors_as_its_exceptions(server):
  client = _client(server)
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
  with pytest.raises(openai.BadRequestError):
    client.chat.completions.create(model=MODEL, messages=[{"role": "nobody", "content": "x"}])
  chat = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="top_logprobs"):  # without logprobs: true
    client.chat.completions.create(top_logprobs=2, **chat)
  with pytest.raises(openai.BadRequestError, match="logprobs_k=5"):  # past the compiled width
    client.chat.completions.create(logprobs=True, top_logprobs=6, **chat)


def test_the_api_needs_the_key_and_health_does_not(server):
  # Given the server started with an API key (SPEC_TPU_API_KEY),
  body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()
  # then a request without it, or with another, gets an OpenAI-shaped 401,
  for key in (None, "test-key-0124", KEY + "x"):
    status, error = _post(server, "/v1/completions", body, key=key)
    assert status == 401 and error["error"]["code"] == "invalid_api_key", (key, error)
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
  # while health checks and metrics scrapes need none, and the key opens the API.
  with urllib.request.urlopen(server + "/health", timeout=10) as r:
    assert r.status == 200
  assert _post(server, "/v1/completions", body)[0] == 200


def test_a_body_past_the_size_limit_gets_413_declared_or_chunked(server):
  host, port = server.split("//")[1].split(":")
  head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Authorization: Bearer %s\r\n" % KEY.encode())
  piece = b"x" * 65536
  declared = [head + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)] + \
      [piece] * (MAX_BODY // len(piece) + 1)
  # (no Content-Length: the server counts what arrives and stops reading past the limit)
  chunked = [head + b"Transfer-Encoding: chunked\r\n\r\n"] + \
      [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 2) + [b"0\r\n\r\n"]
  for parts in (declared, chunked):
    with socket.create_connection((host, int(port)), timeout=30) as sock:
      try:
        for part in parts:
          sock.sendall(part)
      except OSError:  # the server answered and closed before the rest was sent
        pass
      # (The status line, at least: closing on unread data resets the connection, which can
      # drop the rest of the answer.)
      answer = sock.recv(65536)
    assert answer.split(b"\r\n")[0].endswith(b"413 Request Entity Too Large"), answer[:200]


def test_a_flood_past_the_queue_gets_503_and_the_rest_are_answered(server):
  # Given every slot held by a long stream (greedy, where the random draft's guesses rarely
  # match: about a token a round; EOS biased away: none ends by itself for hundreds of rounds),
  extra = 10
  eos = _tiny_random_tokenizer().eos_id
  client = _async_client(server)
  cancelled = lambda m: m.get('spec_tpu_requests_total{finish_reason="cancelled"}', 0)
  before = cancelled(_metrics(server))

  async def hold():
    stream = await client.completions.create(
        model=MODEL, prompt="def f():", max_tokens=MAX_LEN - 32, temperature=0.0, stream=True,
        logit_bias={str(eos): -100})
    await stream.__aiter__().__anext__()  # its first token: it has a slot
    return stream

  async def one(i):
    try:
      r = await client.completions.create(model=MODEL, prompt=f"y = {i}", max_tokens=4,
                                          temperature=1.0)
      return r.choices[0].finish_reason
    except openai.APIStatusError as e:
      return e.status_code, e.response.headers.get("retry-after"), e.body

  async def run():
    try:
      holders = await asyncio.gather(*(hold() for _ in range(SLOTS)))
      # when more requests than the queue holds arrive at once,
      flood = [asyncio.ensure_future(one(i)) for i in range(MAX_QUEUE + extra)]
      deadline = time.monotonic() + 60
      while sum(t.done() for t in flood) < extra and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
      full = _metrics(server)
      for stream in holders:  # (hanging up cancels them; the queued requests get their slots)
        await stream.close()
      return full, await asyncio.gather(*flood)
    finally:
      await client.close()

  full, results = asyncio.run(run())
  refused = [r for r in results if isinstance(r, tuple)]
  # then the queue fills and the ones past it get 503 with Retry-After (OpenAI's client retries
  # on these): exactly `extra` of them while every holder kept its slot to the hang-up (on a
  # machine slow enough for a holder to finish first, its slot let one more in),
  deadline = time.monotonic() + 10  # (every slot was freed for the queue to be served)
  while cancelled(_metrics(server)) - before < SLOTS and time.monotonic() < deadline:
    time.sleep(0.05)
  finished_first = SLOTS - (cancelled(_metrics(server)) - before)
  assert 0 <= finished_first < SLOTS
  assert full["spec_tpu_active_slots"] == SLOTS
  assert MAX_QUEUE - finished_first <= full["spec_tpu_queue_length"] <= MAX_QUEUE
  assert extra - finished_first <= len(refused) <= extra, (finished_first, results)
  assert all(status == 503 and retry == "1" and body["code"] == "queue_full"
             for status, retry, body in refused), refused
  # every queued one is answered in full, and the server goes on serving.
  assert all(r in ("stop", "length") for r in results if not isinstance(r, tuple))
  assert _client(server).completions.create(model=MODEL, prompt="z", max_tokens=2).usage
  assert _metrics(server)["spec_tpu_queue_length"] == 0


def test_streams_report_usage_when_asked(server):
  client = _client(server)
  kw = dict(model=MODEL, prompt="def sub(a, b):", max_tokens=10, temperature=0.9, seed=11)
  plain = client.completions.create(**kw)
  chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                          **kw))
  # The last chunk carries the usage (no choices), equal to the plain response's.
  assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
  assert all(c.usage is None for c in chunks[:-1])
  chat = list(client.chat.completions.create(
      model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
      stream_options={"include_usage": True}))
  assert chat[-1].usage.completion_tokens <= 5 and chat[-1].usage.prompt_tokens > 0


def test_n_samples_of_a_prompt_plain_and_streamed(server):
  client = _client(server)
  # Given n = 2 seeded samples of each of two prompts (as many as the server's slots),
  kw = dict(model=MODEL, prompt=["def add(a, b):", "import os\n"], max_tokens=12,
            temperature=1.0, seed=5, n=2)
  before = _metrics(server)["spec_tpu_prompt_tokens_total"]
  plain = client.completions.create(**kw)
  # then each prompt was prefilled once for its 2 samples (the prompt tokens counted once),
  assert _metrics(server)["spec_tpu_prompt_tokens_total"] - before == plain.usage.prompt_tokens
  # choice i * 2 + j is sample j of prompt i; sample 0 is the request without n (the seed
  # picks stream j for sample j), and the samples differ from each other,
  assert [c.index for c in plain.choices] == list(range(4))
  single = client.completions.create(**dict(kw, n=1))
  assert [c.text for c in single.choices] == [plain.choices[0].text, plain.choices[2].text]
  assert plain.choices[0].text != plain.choices[1].text
  # the prompt's tokens are counted once per prompt,
  assert plain.usage.prompt_tokens == single.usage.prompt_tokens
  assert plain.usage.completion_tokens >= single.usage.completion_tokens
  # and a stream's chunks carry their choice's index, each choice adding up to the same text.
  texts, finish = [""] * 4, [None] * 4
  for c in client.completions.create(stream=True, **kw):
    for choice in c.choices:
      texts[choice.index] += choice.text
      finish[choice.index] = choice.finish_reason or finish[choice.index]
  assert texts == [c.text for c in plain.choices]
  assert finish == [c.finish_reason for c in plain.choices]


def test_n_chat_choices_plain_and_streamed(server):
  client = _client(server)
  kw = dict(model=MODEL, messages=[{"role": "user", "content": "def f(x):"}], max_tokens=8,
            seed=2, n=2)
  reply = client.chat.completions.create(**kw)
  assert [c.index for c in reply.choices] == [0, 1]
  texts, roles = ["", ""], [None, None]
  for c in client.chat.completions.create(stream=True, **kw):
    for choice in c.choices:
      texts[choice.index] += choice.delta.content or ""
      roles[choice.index] = roles[choice.index] or choice.delta.role
  assert texts == [c.message.content for c in reply.choices] and roles == ["assistant"] * 2


def test_completion_logprobs_plain_and_streamed(server):
  client = _client(server)
  # Given a seeded completion asking for each token's logprob and its 2 best alternatives,
  kw = dict(model=MODEL, prompt="def mul(a, b):", max_tokens=10, temperature=0.8, seed=4,
            logprobs=2)
  plain = client.completions.create(**kw)
  lp = plain.choices[0].logprobs
  # then every generated token has one: a log-probability, and top alternatives as likely
  # or more, the token's own among them when it is as likely as the second best,
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
      plain.usage.completion_tokens
  assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
  for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert -50 < value <= 0 and 1 <= len(top) <= 2
    assert max(top.values()) >= value - 1e-5
    if value >= min(top.values()) + 1e-4:
      assert token in top
  # and a stream carries the same, chunk by chunk.
  tokens, values = [], []
  for c in client.completions.create(stream=True, **kw):
    if c.choices and c.choices[0].logprobs:
      tokens += c.choices[0].logprobs.tokens
      values += c.choices[0].logprobs.token_logprobs
  assert tokens == lp.tokens and np.allclose(values, lp.token_logprobs, atol=1e-6)


def test_chat_logprobs_and_top_logprobs_plain_and_streamed(server):
  client = _client(server)
  kw = dict(model=MODEL, messages=[{"role": "user", "content": "def f(x):"}], max_tokens=6,
            seed=9, logprobs=True, top_logprobs=3)
  reply = client.chat.completions.create(**kw)
  content = reply.choices[0].logprobs.content
  assert len(content) == reply.usage.completion_tokens
  assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 and c.bytes for c in content)
  assert all(c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
  streamed = [e for c in client.chat.completions.create(stream=True, **kw) if c.choices
              and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
  assert [(e.token, round(e.logprob, 5)) for e in streamed] == \
      [(e.token, round(e.logprob, 5)) for e in content]
  # Without `logprobs` there are none.
  assert client.chat.completions.create(**dict(kw, logprobs=None, top_logprobs=None)
                                        ).choices[0].logprobs is None


def test_best_of_returns_the_most_probable_of_its_samples(server):
  client = _client(server)
  kw = dict(model=MODEL, prompt="for i in", max_tokens=8, temperature=1.0, seed=21)
  # Given the 4 samples best_of = 4 draws (the same as n = 4 with the same seed),
  every = client.completions.create(n=4, logprobs=0, **kw)
  totals = [sum(c.logprobs.token_logprobs) for c in every.choices]
  # then best_of = 4 (n = 1) returns the one whose tokens are the most probable.
  best = client.completions.create(best_of=4, **kw)
  assert [c.text for c in best.choices] == [every.choices[int(np.argmax(totals))].text]
  assert best.choices[0].logprobs is None
  assert best.usage.completion_tokens == every.usage.completion_tokens


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(server):
  client = _client(server)
  prompt = "def add(a, b):\n    return a + b"
  # Given a prompt scored alone (echo, max_tokens 0, as lm-evaluation-harness asks),
  scored = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0,
                                     logprobs=1, temperature=0)
  lp = scored.choices[0].logprobs
  # then the text is the prompt's, and each of its tokens has a logprob (the first none),
  assert scored.choices[0].text == prompt
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  assert len(lp.tokens) == scored.usage.prompt_tokens > 5
  assert all(v <= 0 and len(top) == 1 for v, top in zip(lp.token_logprobs[1:],
                                                         lp.top_logprobs[1:]))
  # and with new tokens the same prompt part comes first, then the completion's own logprobs.
  kw = dict(model=MODEL, prompt=prompt, max_tokens=4, logprobs=1, temperature=0.9, seed=8)
  plain = client.completions.create(**kw)
  echoed = client.completions.create(echo=True, **kw).choices[0]
  assert echoed.text == prompt + plain.choices[0].text
  assert echoed.logprobs.token_logprobs == lp.token_logprobs + \
      plain.choices[0].logprobs.token_logprobs


def test_penalties_and_logit_bias_reach_the_sampler_plain_and_streamed(server):
  client = _client(server)
  # Given a bias of +100 on one token, every sampled token is that token, with logprob ~0
  # (the bias is part of the distribution it was sampled from), streamed or not;
  kw = dict(model=MODEL, prompt="x = 1", max_tokens=6, temperature=0.8, seed=1,
            logit_bias={"50": 100}, logprobs=0)
  biased = client.completions.create(**kw).choices[0]
  assert len(set(biased.logprobs.tokens)) == 1 and len(biased.logprobs.tokens) == 6
  assert all(v > -1e-3 for v in biased.logprobs.token_logprobs)
  streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)
                     if c.choices)
  assert streamed == biased.text
  # and strong repetition, frequency and presence penalties keep a greedy text from repeating
  # any token (it does repeat without them).
  kw = dict(model=MODEL, prompt="a = 1\n" * 3, max_tokens=16, temperature=0, logprobs=0)
  plain = client.completions.create(**kw).choices[0].logprobs.tokens
  assert len(set(plain)) < len(plain)
  penalised = client.completions.create(presence_penalty=2, frequency_penalty=2,
                                        extra_body={"repetition_penalty": 5.0}, **kw)
  tokens = penalised.choices[0].logprobs.tokens
  assert len(set(tokens)) == len(tokens) == 16
  # With logprobs_mode "raw" the same tokens carry the model's own logprobs (a greedy token's
  # processed one is 0), its most probable tokens' among the alternatives, streamed or not.
  kw = dict(kw, logprobs=2, max_tokens=6, extra_body={"logprobs_mode": "raw"})
  raw = client.completions.create(**kw).choices[0].logprobs
  assert raw.tokens == plain[:6] and all(-50 < v < -1e-4 for v in raw.token_logprobs)
  assert all(v == max(top.values()) for v, top in zip(raw.token_logprobs, raw.top_logprobs))
  streamed = [v for c in client.completions.create(stream=True, **kw) if c.choices
              and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
  assert np.allclose(streamed, raw.token_logprobs, atol=1e-6)


def test_greedy_through_the_server_equals_sampler_greedy(server):
  # Given the server's own models (random weights are a function of the config) in a Sampler
  # here, decoding greedily without speculation,
  tok, want = _tiny_random_tokenizer(), _tiny_random_greedy()
  # then the server's greedy completions (K = 2 speculation) are the same tokens.
  client = _client(server)
  for prompt, tokens in list(want.items())[:3]:
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=GREEDY_TOKENS,
                                    temperature=0)
    assert got.choices[0].text == tok.decode(tokens)
    assert got.usage.completion_tokens == len(tokens)


def test_an_ngram_draft_serves_through_the_openai_client(tmp_path_factory):
  # Given launch.serve drafting by prompt lookup (draft.kind=ngram: no draft model, K = 2),
  overrides = [o for o in OVERRIDES if not o.startswith(("--config.engine.num_slots",
                                                         "--config.engine.max_len",
                                                         "--config.engine.k="))]
  overrides += ["--config.draft.kind=ngram", "--config.engine.k=2",
                "--config.engine.num_slots=2", "--config.engine.max_len=64"]
  config = _tiny_random_without_prompts(tmp_path_factory.mktemp("config"))
  serve = _launch_serve(tmp_path_factory, config, overrides)
  url = next(serve)
  try:
    # when the openai client asks for a greedy completion of a prompt that repeats itself,
    prompt = GREEDY_PROMPTS[3]
    got = _client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                          temperature=0)
  finally:
    serve.close()
  # then its text is the target's greedy continuation without speculation.
  tok, want = _tiny_random_tokenizer(), _tiny_random_greedy()[prompt][:12]
  assert got.choices[0].text == tok.decode(want)
  assert got.usage.completion_tokens == len(want)


# A Gemma 4 target with its assistant drafter (configs/gemma4_31b.py at the tiny presets' shapes,
# random weights, the shipped tokenizer's 2048-token vocabulary).
ASSISTANT_MODEL = "random_tiny_gemma4"
ASSISTANT_OVERRIDES = [
    "--config.model.preset=tiny_gemma4", "--config.draft.preset=tiny_gemma4_assistant",
    "--config.model.allow_random=True", "--config.draft.allow_random=True",
    f"--config.model.fields.name={ASSISTANT_MODEL}",
    *[f"--config.{m}.fields.vocab_size=2048" for m in ("model", "draft")],
    "--config.model.tokenizer=" + os.path.join(REPO, "spec_tpu/assets/stdlib_sp2048.model"),
    "--config.engine.calibrate=False", "--config.engine.num_slots=2",
    "--config.engine.max_len=64", "--config.engine.k=2", "--config.engine.rounds_per_step=2"]


def _assistant_config():
  from configs import gemma4_31b
  config = gemma4_31b.get_config()
  config.model.preset, config.draft.preset = "tiny_gemma4", "tiny_gemma4_assistant"
  config.model.allow_random = config.draft.allow_random = True
  config.model.fields.name = ASSISTANT_MODEL
  config.model.fields.vocab_size = config.draft.fields.vocab_size = 2048
  config.model.tokenizer = os.path.join(REPO, "spec_tpu/assets/stdlib_sp2048.model")
  return config


@pytest.fixture(scope="module")
def assistant_server(tmp_path_factory):
  yield from _launch_serve(tmp_path_factory, "configs/gemma4_31b.py", ASSISTANT_OVERRIDES)


def test_a_gemma4_pair_with_its_assistant_streams_and_equals_greedy(assistant_server):
  # Given launch.serve with a Gemma 4 target and its assistant drafter (K = 2 every round),
  # and the same random target (weights are a function of the config) in a Sampler here,
  import jax
  from spec_tpu import sharding
  from spec_tpu.decoding.sampler import Sampler
  from spec_tpu.decoding.sampling import SamplingParams
  config = _assistant_config()
  setup = common.resolve(config)
  assert setup.draft_source.kind == "assistant"
  tok = common.load_tokenizer(config, setup)
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  sampler = Sampler(common.build_pair(setup, mesh, tokenizer=tok, use_draft=False))
  prompt = "def add(a, b):"
  want = sampler.generate([tok.encode(prompt, add_bos=bool(config.run.add_bos))],
                          max_new_tokens=12, sampling=SamplingParams(temperature=0.0)).tokens[0]
  client = _client(assistant_server)
  # when a greedy completion streams through the openai client, then its text is the target's
  # greedy continuation (assistant drafts, verification and rollback changed nothing),
  chunks = list(client.completions.create(model=ASSISTANT_MODEL, prompt=prompt, max_tokens=12,
                                          temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == tok.decode(want)
  # and a sampled request, plain and streamed with one seed, gives one text.
  kw = dict(model=ASSISTANT_MODEL, prompt="import os\n", max_tokens=10, temperature=0.9,
            seed=5)
  plain = client.completions.create(**kw).choices[0].text
  streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
  assert plain == streamed and plain


def test_two_processes_serve_like_one(server, tmp_path):
  # Given the same server as 2 processes x 1 device, rows split between them (mesh 2x1):
  # process 0 runs HTTP and the scheduler and broadcasts every device call, process 1 follows,
  port, coordinator = _free_port(), _free_port()
  env = dict(os.environ)
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"
  env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  config = _tiny_random_without_prompts(tmp_path)
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  for i in range(2):
    with open(logs[i], "wb") as out:
      # Multi-process CPU jobs ignore SIGTERM and hang if a peer dies: bounded by SIGKILL.
      procs.append(subprocess.Popen(
          ["timeout", "-s", "KILL", "300", sys.executable, "-m", "launch.serve",
           f"--config={config}", f"--port={port}", *OVERRIDES, "--multihost",
           f"--coordinator_address=127.0.0.1:{coordinator}", "--num_processes=2",
           f"--process_id={i}", "--config.mesh.shape=(2,1)"],
          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 240
    while True:
      assert all(p.poll() is None for p in procs), logs[0].read_text()[-2000:]
      assert time.monotonic() < deadline, logs[0].read_text()[-2000:]
      try:
        with urllib.request.urlopen(url + "/health", timeout=2):
          break
      except OSError:
        time.sleep(0.1)
    # when a few requests arrive at once (inserted and stepped on both processes),
    prompts = ["def add(a, b):", "import os\n", "x = 1"]
    batch = _client(url).completions.create(model=MODEL, prompt=prompts, max_tokens=12,
                                            temperature=0)
    multi = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
    one = [_client(server).completions.create(model=MODEL, prompt=p, max_tokens=12,
                                              temperature=0).choices[0].text for p in prompts]
    # then the greedy texts are the single process's, and both processes stop together.
    assert multi == one
  finally:
    procs[0].send_signal(signal.SIGINT)
    for p in procs:
      try:
        p.wait(timeout=60)
      except subprocess.TimeoutExpired:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], logs[1].read_text()[-2000:]


def test_serve_bench_runs_a_target_without_a_draft(tmp_path):
  # Given a config with no draft (k = 0), which serve_bench's adaptive engine refused to build,
  (tmp_path / "no_draft.py").write_text(
      "from configs import common, tiny_random\n\n\ndef get_config():\n"
      "  c = tiny_random.get_config()\n  c.draft = common.draft_section()\n"
      "  c.engine.k = 0\n  return c\n")
  env = dict(os.environ)
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"
  env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.serve_bench", f"--config={tmp_path / 'no_draft.py'}",
       "--config.model.checkpoint=", f"--output_dir={tmp_path / 'out'}", "--requests=2",
       "--max_new_tokens=4", "--num_slots=2", "--clients=1", "--latency_requests=1",
       "--repeats=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # then it measures what there is: fixed batches and the engine, both at K = 0.
  result = json.loads((tmp_path / "out" / "results.json").read_text())
  assert [(t["mode"], t["k"]) for t in result["throughput"]] == [("fixed batches", "0"),
                                                                  ("engine", "0")]
  assert result["latency"][0]["requests"] >= 1


def test_chat_template_comes_from_the_checkpoint_tokenizer_files(tmp_path):
  from spec_tpu.serving import chat
  # Given a converted checkpoint's tokenizer_config.json with a Gemma-style template,
  (tmp_path / "tokenizer").mkdir()
  template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
  (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": template, "bos_token": "<bos>", "eos_token": {"content": "<eos>"}}))
  # then messages render through it, the BOS string becoming a flag (the id is added instead),
  text, bos = chat.load(str(tmp_path)).render(
      [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
  assert (text, bos) == ("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", True)
  # a separate chat_template.jinja wins, and a checkpoint without one gets the plain fallback.
  (tmp_path / "tokenizer" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
  assert chat.load(str(tmp_path)).render([{"role": "user", "content": "x"}]) == ("x!", False)
  fallback = chat.load(str(tmp_path / "none"))
  assert fallback.is_fallback
  assert fallback.render([{"role": "system", "content": "a"},
                          {"role": "user", "content": "b"}]) == ("a\nb\n", False)
  with pytest.raises(chat.ChatTemplateError):
    fallback.render([{"role": "robot", "content": "x"}])


@contextlib.contextmanager
def _served(app):
  """An in-process uvicorn server for app on a free port; yields its URL, stops on exit."""
  import uvicorn
  port = _free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  try:
    deadline = time.monotonic() + 30
    while not server.started:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=10)


class _FailingEngine:
  """Stands in for an Engine whose device fails mid-request: each request gets its first text,
  then the failure (as Engine._fail reports it to the requests in its slots)."""

  def __init__(self):
    from spec_tpu.tokenizer import ByteTokenizer
    self.tokenizer, self.add_bos, self.running, self.failure = ByteTokenizer(), False, True, None
    self.metrics, self.vision = None, None  # a text-only model

  def room(self, prompt_len):
    return 64

  def submit_all(self, items, share_prefill=False):
    return [self._submit(*item) for item in items]

  def _submit(self, prompt, params, images=None, pan_and_scan=None):
    from spec_tpu.serving.request import ABORTED, Request
    r = Request(0, self.tokenizer.encode(prompt), params, self.tokenizer)

    def fail():
      r._deliver(self.tokenizer.encode("partial "))
      time.sleep(0.2)
      r._finish(ABORTED, error=OSError("device lost"))
    threading.Thread(target=fail, daemon=True).start()
    return r


def test_an_engine_failure_reaches_clients_as_a_503_or_an_error_event():
  from spec_tpu.serving import openai_api
  app = openai_api.build_app(_FailingEngine(), "m")
  with _served(app) as url:
    # Given an engine that fails while a request is in it, a plain request gets an OpenAI-shaped
    # 503 (not a bare 500),
    status, body = _post(url, "/v1/completions", b'{"model": "m", "prompt": "x"}')
    assert status == 503 and body["error"]["type"] == "server_error", body
    # and a stream gets the text made so far, an error event, and its end.
    req = urllib.request.Request(url + "/v1/completions", method="POST",
                                 data=b'{"model": "m", "prompt": "x", "stream": true}',
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      events = [line[len("data: "):] for line in r.read().decode().splitlines() if line]
    assert json.loads(events[0])["choices"][0]["text"] == "partial "
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"


class _SilentEngine(_FailingEngine):
  """An engine whose requests never finish (a stuck device, an endless generation)."""

  def __init__(self):
    super().__init__()
    self.requests = []

  def _submit(self, prompt, params, images=None, pan_and_scan=None):
    from spec_tpu.serving.request import Request
    prompt = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    r = Request(0, prompt, params, self.tokenizer)
    r._deliver(self.tokenizer.encode("so far"))
    self.requests.append(r)
    return r


def test_a_request_past_the_time_limit_is_cancelled_and_answered_504():
  from spec_tpu.serving import openai_api
  engine = _SilentEngine()
  app = openai_api.build_app(engine, "m", limits=openai_api.Limits(request_timeout_s=0.5))
  with _served(app) as url:
    # Given a server with a 0.5 s limit and requests that would never finish, a plain request
    # gets a 504 and its request is cancelled (its slot freed),
    started = time.monotonic()
    status, body = _post(url, "/v1/completions", b'{"model": "m", "prompt": "x"}')
    assert status == 504 and body["error"]["code"] == "timeout", body
    assert 0.4 < time.monotonic() - started < 10 and engine.requests[-1].cancelled
    # and a stream gets what was made, then a timeout error event and its end.
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                 data=b'{"model": "m", "stream": true, "messages": '
                                      b'[{"role": "user", "content": "x"}]}',
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      events = [line[len("data: "):] for line in r.read().decode().splitlines() if line]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "so far"
    assert json.loads(events[-2])["error"]["code"] == "timeout"
    assert events[-1] == "[DONE]" and engine.requests[-1].cancelled


def _tiny_random_config():
  config = tiny_random.get_config()
  config.model.checkpoint = config.draft.checkpoint = ""
  return config


@functools.cache
def _tiny_random_tokenizer():
  config = _tiny_random_config()
  return common.load_tokenizer(config, common.resolve(config))


GREEDY_PROMPTS = ("def add(a, b):", "import os\n", "class Stack:\n    def push(self, x):",
                  "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n")
GREEDY_TOKENS = 20


@functools.cache
def _tiny_random_greedy():
  """{prompt: tokens} of configs/tiny_random.py's target decoding GREEDY_PROMPTS greedily
  (GREEDY_TOKENS each) without speculation, in a Sampler here (random weights are a function
  of the config), the prompts encoded as the server encodes them. One batch, one compile, for
  every test that asks."""
  import jax
  from spec_tpu import sharding
  from spec_tpu.decoding.sampler import Sampler
  from spec_tpu.decoding.sampling import SamplingParams
  config = _tiny_random_config()
  setup = common.resolve(config)
  tok = _tiny_random_tokenizer()
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  sampler = Sampler(common.build_pair(setup, mesh, tokenizer=tok, use_draft=False))
  add_bos = bool(config.run.add_bos)
  result = sampler.generate([tok.encode(p, add_bos=add_bos) for p in GREEDY_PROMPTS],
                            max_new_tokens=GREEDY_TOKENS,
                            sampling=SamplingParams(temperature=0.0))
  return dict(zip(GREEDY_PROMPTS, result.tokens))
