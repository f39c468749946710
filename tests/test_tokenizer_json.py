"""tokenizer.json tokenizers (the `tokenizers` library): a tiny Llama-3-style byte-level BPE built
here serves text through the engine and the OpenAI server, streams multi-byte characters split
across tokens intact, renders its chat template, and a vocabulary that does not fit is refused.
"""

import json
import os
import sys

import jax
import pytest

from test_tokenizer import HARD_TEXTS

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spec_tpu import tokenizer as tokenizer_lib
from spec_tpu.checkpoints import _convert
from spec_tpu.pair import Pair, check_pair
from spec_tpu.models import model
from spec_tpu.models.config import get_preset
from spec_tpu.serving import Engine, GenerationParams, chat
from spec_tpu.serving.request import Request
from spec_tpu.tokenizer import JsonTokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
# Llama 3's template, as its tokenizer_config.json ships it (less the tool-calling branches).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Characters no merge covers (the training text is ASCII): each is 2-4 byte tokens.
SPLIT_TEXT = "naïve 日本語 🎉 → ok"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  """A converted checkpoint's tokenizer/ directory holding only tokenizer.json and its configs."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def hello(world):\n    return the quick brown fox jumps over the "
                           "lazy dog; pack my box with five dozen liquor jugs\n" * 20], trainer)
  root = tmp_path_factory.mktemp("json_ckpt")
  d = root / "tokenizer"
  d.mkdir()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
       "chat_template": LLAMA3_TEMPLATE}))
  (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0,
                                                         "eos_token_id": [1, 4]}))
  return root


def test_loaded_from_the_checkpoint_directory_with_its_special_ids(tok_dir):
  tok = tokenizer_lib.load(tok_dir)
  assert isinstance(tok, JsonTokenizer) and tok.vocab_size == 300
  assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (0, 1, (1, 4), -1)
  # The name is the one launch.convert records for the same file.
  assert tok.name == _convert.tokenizer_id(tok_dir / "tokenizer") and tok.name.startswith("json:")
  assert tokenizer_lib.verifiable(tok.name)
  # A directory that also has a tokenizer.model reads that (the sentencepiece reference).
  assert tokenizer_lib.load(tok_dir / "tokenizer" / "tokenizer.json").name == tok.name


def test_byte_level_bpe_round_trips_exactly(tok_dir):
  tok = tokenizer_lib.load(tok_dir)
  for text in HARD_TEXTS + [SPLIT_TEXT]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text, repr(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.encode_batch(HARD_TEXTS) == [tok.encode(t) for t in HARD_TEXTS]
  ids = tok.encode("hi", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  # A special token's text encodes as the token (chat templates rely on it) and decodes to
  # nothing, as do ids past the vocabulary.
  assert tok.encode("a<|eot_id|>b") == tok.encode("a") + [4] + tok.encode("b")
  assert tok.decode(tok.encode("a<|eot_id|>b") + [300, 5000]) == "ab"
  with pytest.raises(ValueError, match="token ids"):
    tok.decode([-1])


def test_multibyte_characters_split_across_tokens_stream_intact(tok_dir):
  tok = tokenizer_lib.load(tok_dir)
  ids = tok.encode(SPLIT_TEXT)
  assert len(ids) > len(SPLIT_TEXT)  # the characters really are split over several tokens
  request = Request(0, tok.encode("x"), GenerationParams(max_new_tokens=64), tok)
  pieces = [request._detok.push(i) for i in ids]
  pieces.append(request._detok.flush())
  assert "".join(pieces) == SPLIT_TEXT
  assert not any("\ufffd" in p for p in pieces)
  assert "" in pieces[:-1]  # held back while a character was incomplete


def test_llama3_chat_template_renders_system_and_user_turns(tok_dir):
  template = chat.load(str(tok_dir))
  text, bos = template.render([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi 日本"}])
  assert bos  # the BOS string became a flag: the engine adds the id
  assert text == ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi 日本<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
  ids = tokenizer_lib.load(tok_dir).encode(text)
  assert ids.count(2) == 3 and ids.count(3) == 3 and ids.count(4) == 2  # header/eot tokens


@pytest.fixture(scope="module")
def json_engine(tok_dir):
  tok = tokenizer_lib.load(tok_dir)
  target = get_preset("tiny").replace(name="tiny_json", vocab_size=tok.vocab_size,
                                      tokenizer=tok.name)
  draft = target.replace(name="tiny_json_draft", num_layers=1)
  pair = Pair(model.init_params(target, jax.random.key(0)), target,
              draft_params=model.init_params(draft, jax.random.key(1)), draft_cfg=draft,
              eos_ids=tok.eos_ids, pad_id=tok.pad_id, tokenizer=tok)
  # Controls: a logit_bias makes a chosen EOS id the one sampled.
  return Engine(pair, num_slots=2, max_len=96, k=2, adaptive_k=False, tokenizer=tok,
                rounds_per_step=2, add_bos=True, controls=True, max_logit_bias=1), tok


def test_engine_serves_a_text_prompt_streamed_as_decoded(json_engine):
  engine, tok = json_engine
  request = engine.submit(SPLIT_TEXT, GenerationParams(max_new_tokens=40, seed=5,
                                                       temperature=1.0))
  while engine.step():
    pass
  chunks = list(request)
  done = request.result()
  assert done.stats.prompt_tokens == len(tok.encode(SPLIT_TEXT)) + 1  # with BOS
  assert "".join(c.text for c in chunks) == done.text == tok.decode(done.tokens)
  assert len(done.tokens) > 5


def test_either_eos_id_of_the_checkpoint_stops_a_request(json_engine):
  # Given generation_config.json's two EOS ids (<|end_of_text|> 1, <|eot_id|> 4); when a
  # request is biased towards one of them (about a third of each step's mass); then it stops
  # at its first one with finish reason "stop"; unbiased, it runs to its length.
  engine, tok = json_engine
  assert engine.pair.eos_ids == tok.eos_ids == (1, 4)
  params = lambda **kw: GenerationParams(max_new_tokens=12, seed=3, temperature=1.0, **kw)
  requests = {i: engine.submit("hello", params(logit_bias=((i, 5.0),))) for i in (1, 4)}
  plain = engine.submit("hello", params())
  while engine.step():
    pass
  for i, r in requests.items():
    done = r.result()
    assert (done.tokens[-1], done.finish_reason) == (i, "stop"), done
    assert not {1, 4} & set(done.tokens[:-1])
  # Not only the prefill's token: a round's emitted tokens are cut at an EOS too.
  assert max(len(r.result().tokens) for r in requests.values()) > 1
  assert not {1, 4} & set(plain.result().tokens) and plain.result().finish_reason == "length"


def test_server_streamed_text_equals_plain_text(json_engine, tok_dir):
  from fastapi.testclient import TestClient
  from spec_tpu.serving import openai_api
  engine, tok = json_engine
  app = openai_api.build_app(engine.start(), "tiny_json", chat.load(str(tok_dir)))
  try:
    client = TestClient(app)
    body = {"model": "tiny_json", "prompt": SPLIT_TEXT, "max_tokens": 24, "seed": 11,
            "temperature": 1.0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    streamed = ""
    with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
      for line in r.iter_lines():
        if line.startswith("data: {"):
          streamed += json.loads(line[6:])["choices"][0]["text"]
    assert streamed == plain and plain
    reply = client.post("/v1/chat/completions", json={
        "model": "tiny_json", "max_tokens": 8, "seed": 1,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    for eos in (1, 4):  # a chat turn ends at either EOS id: finish reason "stop"
      reply = client.post("/v1/chat/completions", json={
          "model": "tiny_json", "max_tokens": 12, "seed": 3, "logit_bias": {str(eos): 30},
          "messages": [{"role": "user", "content": "Hi"}]})
      assert reply.json()["choices"][0]["finish_reason"] == "stop", reply.text
  finally:
    engine.shutdown()


def test_a_vocabulary_that_does_not_match_is_refused(tok_dir):
  """Across backends: a checkpoint recording a sentencepiece tokenizer and one recording this
  tokenizer.json are different vocabularies, and a model smaller than the tokenizer too."""
  tok = tokenizer_lib.load(tok_dir)
  target = get_preset("tiny").replace(vocab_size=300, tokenizer=tok.name)
  with pytest.raises(ValueError, match=r"^draft tokenizer 'sp:0123456789ab' differs from "
                                       r"target tokenizer 'json:"):
    check_pair(target, target.replace(tokenizer="sp:0123456789ab"))
  from configs import tiny_random
  from spec_tpu import setup as common
  config = tiny_random.get_config()
  config.model.checkpoint = config.draft.checkpoint = ""
  config.model.tokenizer = config.draft.tokenizer = str(tok_dir)
  config.model.fields.vocab_size = config.draft.fields.vocab_size = 256
  with pytest.raises(common.SetupError, match=rf"tokenizer '{tok_dir}' has 300 tokens but "
                                              r"target random_tiny_target only 256$"):
    common.load_tokenizer(config, common.resolve(config))
