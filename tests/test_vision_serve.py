"""Images through the OpenAI-compatible server: the real `openai` client sends a base64 image
in a chat message, plain and streamed; local files only under the allow-list; remote URLs
refused unless the server fetches them (from a local http.server here), and then only image
bodies within the limits; Pan & Scan as the server's default or a request's choice; bad images
refused with a 400 that names the problem."""

import base64
import contextlib
import functools
import http.server
import io
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from spec_tpu.models import model
from spec_tpu.models.config import ModelConfig
from spec_tpu.models.vision import prompt as prompt_lib
from spec_tpu.models.vision.config import VisionConfig
from spec_tpu.pair import Pair
from spec_tpu.serving import chat, image_urls
from spec_tpu.serving.engine import Engine
from spec_tpu.serving.request import GenerationParams
from spec_tpu.tokenizer import ByteTokenizer

openai = pytest.importorskip("openai")

TOK = ByteTokenizer()
# Byte-level ids: \x01 and \x02 stand for start/end_of_image, "\n" for the block's newlines.
VISION = VisionConfig(image_size=14, patch_size=7, width=8, num_layers=1, num_heads=2,
                      mlp_dim=16, num_soft_tokens=4, start_id=5, end_id=6, image_id=TOK.vocab_size,
                      newline_id=14)
CFG = ModelConfig(name="byte_vision", vocab_size=TOK.vocab_size, d_model=16, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=8, ffw_dim=32, vision=VISION,
                  tokenizer="bytes")
IMAGE = np.random.default_rng(0).integers(0, 256, (9, 12, 3), dtype=np.uint8)
# Wide enough for Pan & Scan's 2 crops (blocky, so its PNG stays small).
WIDE = np.random.default_rng(1).integers(0, 256, (30, 70, 3), dtype=np.uint8).repeat(
    10, 0).repeat(10, 1)


def _png(image) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


@contextlib.contextmanager
def _client(app):
  """The real openai client on `app`, served by uvicorn on a thread."""
  import uvicorn
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert time.monotonic() < deadline
    time.sleep(0.05)
  try:
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                        max_retries=0, timeout=120)
  finally:
    server.should_exit = True
    thread.join(timeout=30)


@functools.lru_cache(maxsize=None)
def _params():
  return model.init_params(CFG, jax.random.key(0))


# The served engine's settings; the image benchmark's engine takes the same, so the programs
# both compile are one (same HLO: the run's compilation cache holds it once).
ENGINE = dict(num_slots=2, max_len=160, k=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  from spec_tpu.serving import openai_api
  allowed = tmp_path_factory.mktemp("images")
  (allowed / "a.png").write_bytes(_png(IMAGE))
  engine = Engine(Pair(_params(), CFG, tokenizer=TOK), **ENGINE).start()
  app = openai_api.build_app(engine, "m", image_dirs=[str(allowed)])
  try:
    with _client(app) as client:
      yield client, engine, allowed
  finally:
    engine.shutdown()


def _messages(url, text="what is this?"):
  return [{"role": "user", "content": [{"type": "text", "text": "look: "},
                                        {"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}]


def test_chat_with_a_base64_image_plain_and_streamed(served):
  client, engine, allowed = served
  kw = dict(model="m", max_tokens=8, temperature=0.0)
  plain = client.chat.completions.create(messages=_messages(_data_url(_png(IMAGE))), **kw)
  streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
      messages=_messages(_data_url(_png(IMAGE))), stream=True, **kw))
  assert plain.choices[0].message.content == streamed
  # The request is the engine's own with the image where its part was (fallback template:
  # each message's text on its own line), and a file under the allow-list reads the same.
  want = engine.submit(TOK.encode("look: ") + [VISION.start_id] + TOK.encode("what is this?\n"),
                       GenerationParams(max_new_tokens=8, temperature=0.0),
                       [_png(IMAGE)]).result(timeout=120).text
  assert plain.choices[0].message.content == want
  from_file = client.chat.completions.create(messages=_messages(str(allowed / "a.png")), **kw)
  assert from_file.choices[0].message.content == want
  # The image matters: another one (or none) gives another answer for this model.
  other = np.random.default_rng(5).integers(0, 256, (14, 14, 3), dtype=np.uint8)
  answers = {client.chat.completions.create(messages=_messages(_data_url(_png(x))), **kw)
             .choices[0].message.content for x in (other, other[::-1], other[:, ::-1])}
  assert answers - {want}


@pytest.mark.parametrize("url,match", [
    ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ("/etc/passwd", "outside the directories images may be read from"),
    ("data:image/png;base64,@@@", "invalid base64"),
    (_data_url(b"definitely not a picture"), "not in an image format"),
    (_data_url(_png(IMAGE)[:50]), "cannot be decoded"),
], ids=["remote", "outside_allow_list", "bad_base64", "unknown_format", "truncated"])
def test_bad_images_get_a_400_and_the_server_keeps_serving(served, url, match):
  client, _, _ = served
  with pytest.raises(openai.BadRequestError, match=match):
    client.chat.completions.create(model="m", messages=_messages(url), max_tokens=2)
  ok = client.chat.completions.create(model="m", max_tokens=2,
                                      messages=[{"role": "user", "content": "hi"}])
  assert ok.choices[0].finish_reason == "length"


def test_image_parts_need_a_model_that_reads_images():
  with pytest.raises(chat.ChatTemplateError, match="does not read images"):
    chat.message_text([{"type": "image_url", "image_url": {"url": "data:,"}}])
  urls = []
  assert chat.message_text([{"type": "text", "text": "a" + chat.IMAGE_MARK},
                            {"type": "image_url", "image_url": {"url": "u"}}], urls) == (
      "a" + chat.IMAGE_MARK)
  assert urls == ["u"]


class _ImageHost(http.server.BaseHTTPRequestHandler):
  """Serves PAGES: path -> (status, content type, body); /slow answers after a second."""
  PAGES = {"/wide.png": (200, "image/png", _png(WIDE)),
           "/page.html": (200, "text/html", b"<html>not a picture</html>"),
           "/fake.png": (200, "image/png", b"not a picture either")}

  def do_GET(self):
    if self.path == "/slow":
      time.sleep(1.0)
    status, kind, body = self.PAGES.get(self.path, (404, "text/plain", b"missing"))
    self.send_response(status)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    with contextlib.suppress(ConnectionError):  # a client that stopped reading (size limit)
      self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def image_host():
  """A local http.server (no outside network): its base URL."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
  thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_remote_images_are_fetched_only_when_enabled_and_within_limits(image_host, monkeypatch):
  fetch = image_urls.Fetch(timeout_s=5.0, max_bytes=1 << 20, private_hosts=True)
  wide = f"{image_host}/wide.png"
  assert image_urls.read(wide, fetch=fetch) == _png(WIDE)
  with pytest.raises(ValueError, match="remote image URLs are not fetched"):
    image_urls.read(wide)  # off by default
  for url, limits, match in [
      # The test's host is local: fetched only where private hosts are allowed.
      (wide, image_urls.Fetch(), "'127.0.0.1' is at 127.0.0.1, not a public address"),
      ("http://localhost:1/x.png", image_urls.Fetch(), "not a public address"),
      ("http://169.254.169.254/latest/", image_urls.Fetch(), "not a public address"),
      (f"{image_host}/missing.png", fetch, r"fetching .*/missing.png failed: HTTP 404"),
      (wide, image_urls.Fetch(max_bytes=1000, private_hosts=True), "is larger than the 1000 bytes"),
      (f"{image_host}/page.html", fetch, "is served as 'text/html', not as an image"),
      (f"{image_host}/slow", image_urls.Fetch(timeout_s=0.2, private_hosts=True),
       "failed: .*timed out"),
      ("http://127.0.0.1:1/x.png", fetch, "failed: .*refused"),
      ("ftp://127.0.0.1/x.png", fetch, "remote image URLs are not fetched")]:
    with pytest.raises(ValueError, match="^image: .*" + match):
      image_urls.read(url, fetch=limits)
  with pytest.raises(ValueError, match="needs a timeout > 0"):
    image_urls.Fetch(timeout_s=0)
  # A name that resolves to a public address when checked and an inward one when connected
  # (DNS rebinding) is refused where the connection lands.
  with monkeypatch.context() as m:
    m.setattr(image_urls, "_public_host", lambda url: None)
    with pytest.raises(ValueError, match="'127.0.0.1' connected to 127.0.0.1, not a public"):
      image_urls.read(wide, fetch=image_urls.Fetch())
    assert image_urls.read(wide, fetch=fetch) == _png(WIDE)
  # A redirect is checked like the first URL: a public host cannot bounce the fetch inward.
  request = urllib.request.Request("http://example.com/cat.png")
  with pytest.raises(urllib.error.HTTPError, match="redirected to '10.0.0.1' is at 10.0.0.1"):
    image_urls._Redirects(False).redirect_request(request, None, 302, "Found", {},
                                                  "http://10.0.0.1/cat.png")
  assert image_urls._Redirects(True).redirect_request(
      request, None, 302, "Found", {}, "http://10.0.0.1/cat.png").full_url.startswith("http://10.")


def test_pan_and_scan_through_the_server(served, image_host):
  """A request's mm_processor_kwargs turns Pan & Scan on (its prompt then holds the original's
  and 2 crops' blocks, with the words between them) and gives what Engine.submit gives with
  it; a server with it on by default and fetching on reads a remote image alike."""
  from spec_tpu.serving import openai_api
  client, engine, _ = served
  kw = dict(model="m", max_tokens=4, temperature=0.0)
  messages = _messages(_data_url(_png(WIDE)))
  on = {"mm_processor_kwargs": {"do_pan_and_scan": True}}
  plain = client.chat.completions.create(messages=messages, **kw)
  crops = client.chat.completions.create(messages=messages, extra_body=on, **kw)
  crop_text = prompt_lib.crop_text_ids(TOK.encode)
  # 2 crops: the words before the original, between it and the crops, and one separator.
  assert crops.usage.prompt_tokens == (plain.usage.prompt_tokens + 2 * VISION.block_len
                                       + sum(map(len, crop_text)))
  ids = TOK.encode("look: ") + [VISION.start_id] + TOK.encode("what is this?\n")
  want = engine.submit(ids, GenerationParams(max_new_tokens=4, temperature=0.0), [_png(WIDE)],
                       pan_and_scan=crop_text).result(timeout=120)
  assert crops.choices[0].message.content == want.text
  with pytest.raises(openai.BadRequestError, match="'mm_processor_kwargs' takes only"):
    client.chat.completions.create(messages=messages, extra_body={
        "mm_processor_kwargs": {"do_pan_and_scan": "yes"}}, **kw)
  app = openai_api.build_app(engine, "m", fetch=image_urls.Fetch(timeout_s=30, private_hosts=True),
                             pan_and_scan=True)
  with _client(app) as fetching:
    remote = _messages(f"{image_host}/wide.png")
    by_default = fetching.chat.completions.create(messages=remote, **kw)
    off = fetching.chat.completions.create(
        messages=remote, extra_body={"mm_processor_kwargs": {"do_pan_and_scan": False}}, **kw)
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
      fetching.chat.completions.create(messages=_messages(f"{image_host}/nope.png"), **kw)
    with pytest.raises(openai.BadRequestError, match="not in an image format"):
      fetching.chat.completions.create(messages=_messages(f"{image_host}/fake.png"), **kw)
  assert (by_default.choices[0].message.content, by_default.usage.prompt_tokens) == (
      crops.choices[0].message.content, crops.usage.prompt_tokens)
  assert (off.choices[0].message.content, off.usage.prompt_tokens) == (
      plain.choices[0].message.content, plain.usage.prompt_tokens)


def test_launch_sample_reads_the_images_a_jsonl_prompt_lists(tmp_path):
  """launch.sample's JSONL `images` (files beside the prompts file) reach the model: another
  picture in the same file gives another output; bad lists fail before any compile."""
  import json
  import sys
  from spec_tpu import tokenizer as tokenizer_lib
  from spec_tpu.checkpoints import checkpoint
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import tiny_random
  from spec_tpu.serving import offline
  tok = tokenizer_lib.load(None)
  vision = VISION.replace(start_id=2045, end_id=2046, newline_id=2044, image_id=2048)
  cfg = CFG.replace(name="sp_vision", vocab_size=tok.vocab_size, vision=vision,
                    tokenizer=tok.name)
  checkpoint.save(tmp_path / "ckpt", model.init_params(cfg, jax.random.key(1)), cfg)
  config = tiny_random.get_config()
  config.model.checkpoint = str(tmp_path / "ckpt")
  config.draft.preset = ""
  for name in config.draft.fields:
    config.draft.fields[name] = None
  config.draft.allow_random = False
  config.engine.num_slots = 2
  config.engine.k = 0
  config.sampling.update(max_new_tokens=6, temperature=0.0)
  square = np.random.default_rng(0).integers(0, 256, (14, 14, 3), dtype=np.uint8)
  (tmp_path / "square.png").write_bytes(_png(square))
  (tmp_path / "wide.png").write_bytes(_png(WIDE))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(line) + "\n" for line in [
      {"id": "a", "prompt": "x = <start_of_image> + 1", "images": ["square.png"]},
      {"id": "w", "prompt": "x = <start_of_image> + 1", "images": ["wide.png"]},
      {"id": "b", "prompt": "y = 2"}]))
  outputs = []
  # Without Pan & Scan, then with it (the wide picture becomes the original and 2 crops).
  for name, pan_and_scan in [("plain", False), ("crops", True)]:
    out = tmp_path / f"{name}.jsonl"
    config.run.pan_and_scan = pan_and_scan
    offline.run(config, [], str(prompts), str(out), compare_ar=False, multihost=False)
    lines = list(map(json.loads, out.read_text().splitlines()))
    assert all(r["settings"].get("pan_and_scan", False) == pan_and_scan for r in lines)
    outputs.append({r["id"]: r["tokens"] for r in lines})
  assert outputs[0]["b"] == outputs[1]["b"]
  assert len({tuple(outputs[0]["a"]), tuple(outputs[0]["w"]), tuple(outputs[1]["w"])}) == 3
  # A file written without Pan & Scan does not resume with it.
  with pytest.raises(offline.InputError, match="pan_and_scan is null in the file, true now"):
    offline.run(config, [], str(prompts), str(tmp_path / "plain.jsonl"), compare_ar=False,
                multihost=False)
  config.run.pan_and_scan = False
  for line, match in [({"prompt": "z", "images": ["missing.png"]}, "cannot read"),
                      ({"prompt": "<start_of_image><start_of_image>", "images": ["wide.png"]},
                       "marks 2 image place"),
                      ({"prompt": "z", "images": "wide.png"}, "images must be a list")]:
    prompts.write_text(json.dumps(line) + "\n")
    with pytest.raises(offline.InputError, match=match):
      offline.run(config, [], str(prompts), str(tmp_path / "bad.jsonl"), compare_ar=False,
                 multihost=False)


def test_image_bench_times_the_encoder_and_the_first_token():
  # Given an idle engine on the byte-level vision model and a text prompt,
  from spec_tpu.serving import image_bench
  engine = Engine(Pair(_params(), CFG), **ENGINE)
  prompt = TOK.encode("describe:")
  # when the benchmark runs with 0 and 2 images after it,
  rows = image_bench.measure(engine, prompt, counts=(0, 2), repeats=1)
  # then each row's prompt holds its image blocks, the encoder was timed where there are
  # images, and every request reached its first token.
  assert [r["prompt_tokens"] for r in rows] == [len(prompt), len(prompt) + 2 * VISION.block_len]
  assert [r["encoded_images"] for r in rows] == [0, 2]
  assert rows[0]["encode_s"] == 0 and rows[1]["encode_s"] > 0
  assert rows[1]["encode_s_per_image"] == rows[1]["encode_s"] / 2
  assert all(0 < r["ttft_s"] < 60 for r in rows)
  head = image_bench.format_table(rows).splitlines()[0].split()
  assert head[:3] == ["images", "encoded", "prompt"]
  with pytest.raises(ValueError, match="holds an image-block token id"):
    image_bench.measure(engine, prompt + [VISION.start_id], counts=(2,), repeats=1)
  # With Pan & Scan each (wide) image is encoded as the original and 2 crops, laid out as the
  # engine lays it out.
  crop_text = prompt_lib.crop_text_ids(TOK.encode)
  [row] = image_bench.measure(engine, prompt, counts=(1,), repeats=1, pan_and_scan=crop_text)
  assert row["encoded_images"] == 3 and row["encode_s_per_image"] == row["encode_s"] / 3
  assert row["prompt_tokens"] == len(prompt) + 3 * VISION.block_len + sum(map(len, crop_text))
  assert 0 < row["ttft_s"] < 60
