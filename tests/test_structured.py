"""Structured output through the server: JSON schemas, json_object and regexes constrain the
embedded pair's samples (K = 4 drafts, masks on the draft's p and the target's q), through the
real `openai` client, streamed and not; bad grammars are 400s and the server keeps serving.
(The law under a grammar is tested on the toy pair: tests/test_engine.py.)"""

import json
import os
import re
import sys

import jsonschema
import numpy as np
import openai
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spec_tpu.decoding import grammar, grammar_bench  # noqa: E402
from test_serve import _served  # noqa: E402

SCHEMA = grammar_bench.SCHEMA  # the schema the benchmark measures
# Samples per call (n), streamed and not; SPEC_TPU_JSON_SAMPLES=50 is the documented run of
# 100 (docs/structured.md).
SAMPLES = int(os.environ.get("SPEC_TPU_JSON_SAMPLES", 4))


@pytest.fixture(scope="module")
def engine():
  from configs import default
  from spec_tpu import setup
  from spec_tpu.serving import Engine
  pair = setup.load_pair(default.get_config())
  # One grammar table for all slots: a request bringing another grammar waits for it, and
  # every change of grammar rewrites it.
  engine = Engine(pair, num_slots=min(SAMPLES, 16), max_len=192, k=4, adaptive_k=False,
                  rounds_per_step=4, max_rounds_per_step=4, grammar_states=512,
                  grammar_tables=1, coupling="gumbel")  # as launch.serve runs it
  engine.warm_up([4])  # as launch.serve does: the step and the automaton-writing programs
  engine.start()
  try:
    yield engine
  finally:
    engine.shutdown()


@pytest.fixture(scope="module")
def url(engine):
  from spec_tpu.serving import openai_api
  with _served(openai_api.build_app(engine, "stdlib")) as u:
    yield u


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
  assert stats["judged"] > 0 and 0 <= stats["mask_rejected"] <= stats["judged"]


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
  # a grammar larger than the engine's table (states or token classes) is refused.
  with pytest.raises(grammar.GrammarError, match="grammar_states=1"):
    grammar.GrammarCompiler(pieces, 6, 7, max_states=1).regex("(ab)+c")
  with pytest.raises(grammar.GrammarError, match="grammar_classes=2"):
    grammar.GrammarCompiler(pieces, 6, 7, max_states=8, max_classes=2).regex("(ab)+c")
  with pytest.raises(grammar.GrammarError, match="grammar_masks=1"):
    grammar.GrammarCompiler(pieces, 6, 7, max_states=8, max_masks=1).regex("(ab)+c")


def _outlines_reference(pieces, eos, pattern):
  """(transitions, initial state, final states) of outlines-core's own Index over the same
  vocabulary: the automaton before any renumbering or compaction."""
  import collections
  from outlines_core import Index, Vocabulary
  by_bytes = collections.defaultdict(list)
  for i, b in enumerate(pieces):
    if b and i != eos:
      by_bytes[b].append(i)
  index = Index(pattern, Vocabulary(eos, dict(by_bytes)))
  return index.get_transitions(), index.get_initial_state(), set(index.get_final_states())


@pytest.mark.parametrize("name", ["bounded", "plain", "json_object", "regex"])
def test_the_compact_table_gives_the_automatons_transitions_for_every_token(name):
  # Given the embedded pair's 2048-token vocabulary and a schema or regex,
  from configs import default
  from spec_tpu import setup
  cfg = default.get_config()
  tok = setup.load_tokenizer(cfg, setup.resolve(cfg))
  pieces, v = grammar.token_bytes(tok), tok.vocab_size
  pattern = {"bounded": grammar.schema_regex(grammar_bench.SCHEMA),
             "plain": grammar.schema_regex(grammar_bench.PLAIN_SCHEMA),
             "json_object": grammar.json_object_regex(),
             "regex": r"(-?[0-9]{1,3}|[a-z]+ [a-z]+)"}[name]
  g = grammar.GrammarCompiler(pieces, tok.eos_id, v, max_states=512).regex(pattern)
  # when it is compiled to token classes (far fewer than tokens),
  assert g.cls_v.shape == (v,) and g.num_classes < v // 8
  # then every state's transition on every token, EOS included, is outlines-core's own
  # (walked from both starts together: each of its states maps to one of ours).
  transitions, start, finals = _outlines_reference(pieces, tok.eos_id, pattern)
  ours, todo, walked = {start: 0}, [start], {start}
  while todo:
    s = todo.pop()
    want = np.full(v, -2, np.int64)  # -2: not allowed
    out = transitions.get(s, {})
    want[np.fromiter(out.keys(), np.int64, len(out))] = np.fromiter(out.values(), np.int64,
                                                                    len(out))
    got = g.next_sc[ours[s], g.cls_v]
    allowed = want != -2
    allowed[tok.eos_id] = s in finals
    np.testing.assert_array_equal(got >= 0, allowed)
    assert s not in finals or got[tok.eos_id] == ours[s]
    allowed[tok.eos_id] = False
    for ref, mine in set(zip(want[allowed].tolist(), got[allowed].tolist())):
      assert ours.setdefault(ref, mine) == mine, (ref, mine)
      if ref not in walked:
        walked.add(ref)
        todo.append(ref)
  assert len(ours) == g.num_states == len(set(ours.values()))
  # The device's lookups (a table at pool offset 1, after the unconstrained state 0) give
  # the same masks, from the bit-packed sets, and the same next states.
  import jax.numpy as jnp
  from spec_tpu.decoding import decode
  dense = g.next_sv
  pool = decode.GrammarPool(
      next_sc=jnp.asarray(np.concatenate([np.zeros((1, g.num_classes), np.int32),
                                          np.where(g.next_sc >= 0, g.next_sc + 1, -1)])),
      table_s=jnp.asarray(np.r_[0, np.ones(g.num_states, np.int32)]),
      cls_tv=jnp.asarray(np.stack([np.zeros(v, np.int32), g.cls_v])),
      mask_s=jnp.asarray(np.r_[0, g.mask_s + 1].astype(np.int32)),
      bits_mw=jnp.asarray(np.concatenate([np.full((1, g.bits_mw.shape[1]), 2 ** 32 - 1,
                                                  np.uint32), g.bits_mw])))
  states = jnp.arange(1, g.num_states + 1)
  np.testing.assert_array_equal(decode._allowed(pool, states), dense >= 0)
  np.testing.assert_array_equal(
      decode._advance(pool, jnp.broadcast_to(states[:, None], dense.shape),
                      jnp.broadcast_to(jnp.arange(v)[None, :], dense.shape)),
      np.where(dense >= 0, dense + 1, 0))
  assert decode._allowed(pool, jnp.zeros((1,), jnp.int32)).all()


def test_token_classes_rebuild_the_table_exactly():
  # Given a table whose columns repeat (and two that differ in one state only),
  rng = np.random.default_rng(0)
  distinct = rng.integers(-1, 5, size=(6, 40)).astype(np.int32)
  distinct[:, 1] = distinct[:, 0]
  distinct[3, 1] = distinct[3, 0] + 1
  table = distinct[:, rng.integers(0, 40, size=500)]
  # when its columns are grouped into classes,
  cls_v, next_sc = grammar.token_classes(table)
  # then the classes give the table back, one class per distinct column.
  np.testing.assert_array_equal(next_sc[:, cls_v], table)
  assert next_sc.shape[1] == np.unique(table, axis=1).shape[1]


def test_requests_with_another_grammar_wait_for_the_table_and_follow_their_own(engine):
  # Given an engine with one grammar table, and requests with two regexes submitted at once
  # (disjoint languages: a row reading the other's table would show),
  from spec_tpu.serving import GenerationParams
  patterns = ["[0-9]{6}x", "[0-9]{3}(yes|no)"]
  writes = engine.metrics.gauges["grammar_table_writes"]
  items = [("The answer is", GenerationParams(max_new_tokens=12, temperature=1.0, seed=i,
                                             grammar=engine.grammars.regex(patterns[i % 2])))
           for i in range(4)]
  requests = engine.submit_all(items)
  # then each request's text is a whole string of its own language,
  for i, r in enumerate(requests):
    done = r.result(timeout=60)
    assert re.fullmatch(patterns[i % 2], done.text), (patterns[i % 2], done.text)
  # the requests of one grammar shared the table (one write per change of grammar, at most
  # one per request), and no table is held after them.
  gauges = engine.metrics.gauges
  assert 2 <= gauges["grammar_table_writes"] - writes <= 4
  assert gauges["grammar_tables_in_use"] == 0 and gauges["grammar_tables"] == 1
  # (/metrics reports them, and the pool's size: 513 states x 1024 classes and a class map
  # and a mask each, 2 class maps, 513 masks of 2048 bits.)
  text = engine.metrics.prometheus()
  assert f"spec_tpu_grammar_pool_bytes {4 * (513 * 1026 + 2 * 2048 + 513 * 64)}" in text
  assert "spec_tpu_grammar_table_writes_total" in text


def test_grammar_tables_are_shared_by_key_and_reused_least_recently_used_first():
  from spec_tpu.serving.grammar_tables import GrammarTables
  tables = GrammarTables(2)
  # Given two requests with grammar a, then one with b,
  a1, a2, b = tables.acquire("a"), tables.acquire("a"), tables.acquire("b")
  # then the two share a's table, written once, and b has the other;
  assert a1 == a2 != b and tables.take_write(a1) and not tables.take_write(a2)
  assert tables.take_write(b) and tables.in_use == 2 and tables.writes == 2
  # a third grammar waits while both tables are used,
  assert tables.acquire("c") is None
  # and takes the least recently used free table once its requests finish, while a grammar
  # whose table was kept comes back without a write.
  tables.release(b)
  tables.release(a1)
  tables.release(a2)
  c = tables.acquire("c")
  assert c == a1 and tables.take_write(c)
  assert tables.acquire("b") == b and not tables.take_write(b)
  tables.release(c)
  with pytest.raises(RuntimeError, match="released more often"):
    tables.release(c)
