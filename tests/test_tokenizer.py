"""Tokenizers: exact round trips, special ids, training, and the shipped model."""

import numpy as np
import pytest

from spec_tpu.training import corpus, tokenizer_training
from spec_tpu import tokenizer as tokenizer_lib
from spec_tpu.tokenizer import ByteTokenizer, Tokenizer

# Cases that break naive setups: sentencepiece drops or rewrites whitespace and newlines by default,
# and writes spaces as U+2581 internally.
HARD_TEXTS = [
  "",
  "\n",
  "  leading spaces\n",
  "def f(x):\n\tif x:\n\t\treturn 1\n\n\n    return  2   \n",
  "a\r\nb\r\n\x0c\x0b\x00\n",
  "blank lines\n\n\n\n\nend\n\n",
  "no trailing newline",
  "s = 'é ü ß 日本語 🎉 \u00a0\u3000 \u200b'\n",
  "literal \u2581 lower block \u2581\u2581 x\u2581\n",
  " " * 33 + "\t" * 5 + "\n",
]


@pytest.fixture(scope="module")
def heldout_sample():
  _, heldout = corpus.split(corpus.stdlib_files())
  return [corpus.read_text([f]) for f in heldout[:8]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A vocab-400 BPE model on ~200 KB of training files (trains in well under a second)."""
  train, _ = corpus.split(corpus.stdlib_files())
  prefix = tmp_path_factory.mktemp("sp") / "tiny"
  return tokenizer_training.train_tokenizer(train, prefix, vocab_size=400, max_bytes=200_000)


def test_byte_tokenizer_round_trips_arbitrary_unicode():
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)
  for _ in range(50):
    cps = rng.integers(0, 0x110000, size=int(rng.integers(0, 64)))
    text = "".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000)  # no lone surrogates in UTF-8
    ids = tok.encode(text)
    assert all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  for text in HARD_TEXTS:
    assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_specials():
  tok = ByteTokenizer()
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 3, 260)
  ids = tok.encode("hi", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode([tok.pad_id] + ids + [tok.pad_id]) == "hi"
  assert tok.decode(np.array(ids, np.int32)) == "hi"
  assert tok.decode([ord("h") + 4, 0xC3 + 4]) == "h\ufffd"  # cut UTF-8 decodes, never raises
  # Past the vocabulary: nothing (a model with padding rows can sample such ids; a server must
  # not fail on its own output).
  assert tok.decode([260]) == ""
  with pytest.raises(ValueError, match="token ids"):
    tok.decode([-1])
  assert tokenizer_lib.load("bytes").name == "bytes"


def test_trained_model_round_trips_exactly(tiny_model, heldout_sample):
  tok = Tokenizer.load(tiny_model)
  assert tok.vocab_size == 400
  for text in HARD_TEXTS + heldout_sample:
    ids = tok.encode(text)
    assert tok.decode(ids) == text, repr(text[:200])
    assert all(0 <= i < tok.vocab_size and i != tok.unk_id for i in ids)
  joined = "\n".join(heldout_sample)
  assert tok.encode_batch(heldout_sample + HARD_TEXTS) == [tok.encode(t) for t in heldout_sample
                                                           + HARD_TEXTS]
  assert len(tok.encode(joined)) < len(joined.encode())  # merges learned something


def test_trained_model_specials_and_name(tiny_model, tmp_path):
  tok = Tokenizer.load(tiny_model)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  ids = tok.encode("x = 1\n", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode([tok.pad_id] + ids) == "x = 1\n"
  assert tok.decode(ids[:2] + [tok.vocab_size]) == tok.decode(ids[:2])
  with pytest.raises(ValueError, match="token ids"):
    tok.decode([-1])
  assert tok.name.startswith("sp:") and len(tok.name) == 15
  assert Tokenizer.load(tiny_model).name == tok.name
  assert tok.name != Tokenizer.load(tokenizer_training.train_tokenizer(
      "a b c\n" * 2000 + "".join(map(chr, range(32, 127))), tmp_path / "other", 350)).name


def test_training_is_deterministic(tiny_model, tmp_path):
  train, _ = corpus.split(corpus.stdlib_files())
  again = tokenizer_training.train_tokenizer(train, tmp_path / "again", vocab_size=400, max_bytes=200_000)
  assert again.read_bytes() == tiny_model.read_bytes()


def test_training_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="no training text"):
    tokenizer_training.train_tokenizer("", tmp_path / "empty")
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer_training.train_tokenizer("def f(): pass\n" * 100, tmp_path / "small", vocab_size=100)
  with pytest.raises(FileNotFoundError):
    Tokenizer.load(tmp_path / "missing.model")


@pytest.mark.skipif(not tokenizer_lib.DEFAULT_MODEL_PATH.is_file(), reason="shipped model not built")
def test_shipped_tokenizer(heldout_sample):
  tok = tokenizer_lib.load()
  assert tok.vocab_size == 2048 and (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  for text in HARD_TEXTS + heldout_sample:
    assert tok.decode(tok.encode(text)) == text
  # Regression guard on compression (3.3 bytes/token on the held-out split with Python 3.11).
  assert tokenizer_training.bytes_per_token(tok, "\n".join(heldout_sample)) > 2.8

