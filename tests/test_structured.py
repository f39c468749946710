"""Structured output through the server: JSON schemas, json_object and regexes constrain the
embedded pair's samples (K = 4 drafts, masks on the draft's p and the target's q), through the
real `openai` client, streamed and not; bad grammars are 400s and the server keeps serving.
(The law under a grammar is tested on the toy pair: tests/test_engine.py.)"""

import json
import os
import re
import sys

import jsonschema
import openai
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spec_tpu.decoding import grammar, grammar_bench  # noqa: E402
from test_serve import _served  # noqa: E402

SCHEMA = grammar_bench.SCHEMA  # the schema the benchmark measures
# Samples per call (n), streamed and not; SPEC_TPU_JSON_SAMPLES=50 is the documented run of
# 100 (docs/structured.md).
SAMPLES = int(os.environ.get("SPEC_TPU_JSON_SAMPLES", 8))


@pytest.fixture(scope="module")
def url():
  from configs import default
  from spec_tpu import setup
  from spec_tpu.serving import Engine, openai_api
  pair = setup.load_pair(default.get_config())
  engine = Engine(pair, num_slots=min(SAMPLES, 16), max_len=192, k=4, adaptive_k=False,
                  rounds_per_step=4, max_rounds_per_step=4, grammar_states=512,
                  coupling="gumbel")  # as launch.serve runs it
  engine.warm_up([4])  # as launch.serve does: the step and the automaton-writing programs
  engine.start()
  try:
    with _served(openai_api.build_app(engine, "stdlib")) as u:
      yield u
  finally:
    engine.shutdown()


def _client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


PROMPT = [{"role": "user", "content": "def describe(x):\n    return "}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                  "strict": True}}


def test_json_schema_responses_parse_and_validate_streamed_and_not(url):
  client = _client(url)
  # Given a schema, sampled at temperature 1 (n samples in one request),
  reply = client.chat.completions.create(model="stdlib", messages=PROMPT, n=SAMPLES,
                                         temperature=1.0, max_tokens=96, response_format=FORMAT)
  texts = [c.message.content for c in reply.choices]
  # and streamed,
  stream = client.chat.completions.create(model="stdlib", messages=PROMPT, n=SAMPLES,
                                          temperature=1.0, max_tokens=96, seed=5,
                                          response_format=FORMAT, stream=True)
  parts = [""] * SAMPLES
  for chunk in stream:
    for c in chunk.choices:
      parts[c.index] += c.delta.content or ""
  # then every response parses and validates, ending because the grammar let it (EOS),
  for text in texts + parts:
    jsonschema.validate(json.loads(text), SCHEMA)
  assert all(c.finish_reason == "stop" for c in reply.choices)
  # and the per-request stats say how often the mask refused the draft's proposal.
  stats = reply.model_extra["spec_tpu"]
  assert stats["judged"] > 0 and stats["mask_rejected"] >= 0


def test_json_object_and_regex_constrain_the_text(url):
  client = _client(url)
  # Given json_object (any flat object) and a regex (the extension field), at temperature 1,
  reply = client.chat.completions.create(model="stdlib", messages=PROMPT, n=2, max_tokens=48,
                                         response_format={"type": "json_object"})
  # then each text is an object (or a prefix of one, where max_tokens cut it),
  for c in reply.choices:
    if c.finish_reason == "stop":
      assert isinstance(json.loads(c.message.content), dict)
    else:
      assert c.message.content.startswith("{")
  # and each regex sample matches the whole pattern.
  pattern = r"(self|cls)\.[a-z_]{1,6}\((x|y|[0-9])\)"
  done = client.chat.completions.create(model="stdlib", messages=PROMPT, n=2, max_tokens=32,
                                        extra_body={"guided_regex": pattern})
  for c in done.choices:
    assert re.fullmatch(pattern, c.message.content), c.message.content


@pytest.mark.parametrize("body, reason", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "type must be one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "multipleOf": 3}}}},
     "unsupported JSON Schema keyword 'multipleOf'"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/missing"}}}}, "invalid JSON schema"),
    ({"guided_regex": "a[^\\s\\S]"}, "cannot compile the regex"),
    ({"guided_regex": "("}, "cannot compile the regex"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_bad_grammars_are_400s_and_the_server_keeps_serving(url, body, reason):
  client = _client(url)
  with pytest.raises(openai.BadRequestError, match=re.escape(reason)):
    client.chat.completions.create(model="stdlib", messages=PROMPT, max_tokens=4,
                                   extra_body=body)
  ok = client.chat.completions.create(model="stdlib", messages=PROMPT, max_tokens=16,
                                      extra_body={"guided_regex": "(true|false)"})
  assert ok.choices[0].message.content in ("true", "false")


def test_a_grammar_compiles_to_the_automaton_of_its_language():
  # Given a byte vocabulary with multi-byte tokens beside the single bytes,
  pieces = [None, b"a", b"b", b"ab", b"ba", b"c", None]  # id 6: EOS
  g = grammar.GrammarCompiler(pieces, 6, 7, max_states=8).regex("(ab)+c")
  # when a token sequence is walked through its table,
  def walk(tokens):
    s = 0
    for t in tokens:
      s = g.next_sv[s, t]
      if s < 0:
        return None
    return s
  # then exactly the spellings of the language's prefixes are allowed, and EOS only after
  # a whole string;
  for tokens in ([1, 2, 5], [3, 5], [3, 1, 2, 5], [1, 4, 2, 5]):
    s = walk(tokens)
    assert s is not None and g.next_sv[s, 6] == s, tokens
  assert walk([2]) is None and walk([3, 3, 4]) is None and walk([5]) is None
  assert g.next_sv[walk([3]), 6] == -1
  # a grammar larger than the engine's table is refused.
  with pytest.raises(grammar.GrammarError, match="grammar_states=1"):
    grammar.GrammarCompiler(pieces, 6, 7, max_states=1).regex("(ab)+c")
