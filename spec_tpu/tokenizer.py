"""Tokenizers, one interface: sentencepiece models (tokenizer.model), tokenizer.json files (the
`tokenizers` library: byte-level BPE and the rest of Hugging Face's fast tokenizers), and a
byte-level fallback.

    tok = load("/ckpt/llama3")   # a checkpoint or tokenizer directory: picks the backend
    ids = tok.encode("text", add_bos=True); text = tok.decode(ids)

The interface: name, vocab_size, pad_id/unk_id/bos_id (-1: none), eos_id and eos_ids (every id
that ends a generation; generation_config.json's list where the directory has one),
encode(text, add_bos, add_eos), encode_batch(texts), decode(ids), id_to_piece(i). decode drops
special tokens (pad, bos, eos, ...) and ids past the vocabulary, and writes an incomplete or
invalid UTF-8 sequence as U+FFFD, which is what incremental detokenisation waits on
(serving/request.py).

Exact round trips, `decode(encode(text)) == text` for any text: the byte tokenizer, the
sentencepiece models spec_tpu trains (byte fallback, no normalisation), and byte-level BPE
tokenizer.json files without a normalizer (Llama 3 and its like). A format that normalises
(NFKC) or adds a dummy prefix space does not promise it. In a tokenizer.json, text that spells an
added special token ("<|eot_id|>") encodes as that token, as transformers does: chat templates
rely on it.

`name` identifies a tokenizer by a hash of its file ("sp:...", "json:...", or "bytes"), the name
launch.convert records in a converted checkpoint's config, so a draft/target pair, or a
checkpoint and a tokenizer, that do not share a vocabulary are refused before speculative
sampling silently produces garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

ASSETS_DIR = Path(__file__).parent / "assets"
DEFAULT_MODEL_NAME = "stdlib_sp2048.model"
DEFAULT_MODEL_PATH = ASSETS_DIR / DEFAULT_MODEL_NAME

# sentencepiece writes spaces as U+2581 internally and decodes that character back as a space, so a
# literal U+2581 in the input is encoded as its UTF-8 bytes (byte-fallback pieces) instead.
_SP_SPACE = "\u2581"
_SP_SPACE_BYTES = tuple(f"<0x{b:02X}>" for b in _SP_SPACE.encode("utf-8"))


def _as_id_list(ids: Sequence[int] | np.ndarray, vocab_size: int) -> list[int]:
  """The ids to decode. Ids past the vocabulary decode to nothing, like pad/bos/eos: a model
  with more embedding rows than its tokenizer has tokens (padding rows) can sample them, and a
  server must not fail on its own output."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and ids.min() < 0:
    raise ValueError(f"token ids must be >= 0, got {ids.min()}")
  return ids[ids < vocab_size].tolist()


class Tokenizer:
  """A sentencepiece model. Build with `Tokenizer.load(path)` or `Tokenizer(model_bytes)`."""

  def __init__(self, model_proto: bytes, eos_ids: Sequence[int] = ()):
    """eos_ids: the ids that end a generation (generation_config.json's); default the model's
    EOS piece."""
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.name = "sp:" + hashlib.sha256(model_proto).hexdigest()[:12]
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.unk_id = self._sp.unk_id()
    self.bos_id = self._sp.bos_id()
    self.eos_ids = _eos_ids(eos_ids, self._sp.eos_id(), self.vocab_size)
    self.eos_id = self.eos_ids[0] if self.eos_ids else -1
    self._space_byte_ids = [self._sp.piece_to_id(p) for p in _SP_SPACE_BYTES]
    if any(i == self.unk_id for i in self._space_byte_ids):
      raise ValueError("sentencepiece model lacks byte-fallback pieces; train with byte_fallback=True")

  @classmethod
  def load(cls, path: str | Path) -> "Tokenizer":
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"sentencepiece model not found: {path}")
    return cls(path.read_bytes())

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if _SP_SPACE in text:
      segments = self._sp.encode(text.split(_SP_SPACE))
      ids = list(segments[0])
      for seg in segments[1:]:
        ids += self._space_byte_ids
        ids += seg
    else:
      ids = self._sp.encode(text)
    if add_bos:
      ids.insert(0, self.bos_id)
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode() of each text; sentencepiece's batch call (threaded) where no text needs escaping."""
    texts = list(texts)
    if any(_SP_SPACE in t for t in texts):
      return [self.encode(t) for t in texts]
    return self._sp.encode(texts)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; pad/bos/eos and ids past the vocabulary decode to nothing, invalid UTF-8
    bytes to U+FFFD."""
    return self._sp.decode(_as_id_list(ids, self.vocab_size))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_id(self, piece: str) -> int | None:
    """The id of the piece spelled `piece` ("<end_of_turn>"), None if the model has none."""
    i = self._sp.piece_to_id(piece)
    return None if i == self.unk_id and piece != self.id_to_piece(i) else int(i)

  def __repr__(self) -> str:
    return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


class ByteTokenizer:
  """UTF-8 bytes shifted past the four special ids: vocab 260, no model file, nothing to train."""

  name = "bytes"
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
  eos_ids = (EOS_ID,)
  _OFFSET = 4
  vocab_size = 256 + _OFFSET

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + self._OFFSET).tolist()
    if add_bos:
      ids.insert(0, self.bos_id)
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(_as_id_list(ids, self.vocab_size), dtype=np.int64)
    data = (ids[ids >= self._OFFSET] - self._OFFSET).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    return ("<pad>", "<unk>", "<s>", "</s>")[i] if i < self._OFFSET else f"<0x{i - self._OFFSET:02X}>"

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class JsonTokenizer:
  """A tokenizer.json, read by the `tokenizers` library. Build with `JsonTokenizer.load(path)`
  (which also reads tokenizer_config.json and generation_config.json beside it) or
  `JsonTokenizer(data, config=..., generation=...)` with their parsed contents."""

  def __init__(self, data: bytes, *, config: dict | None = None,
               generation: dict | None = None):
    import tokenizers  # a dependency, but only tokenizer.json users pay for the import

    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
      raise ValueError(f"not a readable tokenizer.json: {str(e).splitlines()[0]}") from None
    # A tokenizer.json may carry truncation or padding settings meant for training batches:
    # prompts are neither cut nor padded here.
    self._tok.no_truncation()
    self._tok.no_padding()
    self.name = "json:" + hashlib.sha256(data).hexdigest()[:12]
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    config, generation = config or {}, generation or {}

    def special(key):  # tokenizer_config.json names the token; generation_config.json its id
      token = config.get(f"{key}_token")
      if isinstance(token, dict):
        token = token.get("content")
      found = self._tok.token_to_id(token) if isinstance(token, str) else None
      if found is None and isinstance(generation.get(f"{key}_token_id"), int):
        found = generation[f"{key}_token_id"]
      return -1 if found is None else int(found)

    self.pad_id, self.unk_id, self.bos_id = special("pad"), special("unk"), special("bos")
    listed = generation.get("eos_token_id")
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    self.eos_ids = _eos_ids(listed, special("eos"), self.vocab_size)
    self.eos_id = self.eos_ids[0] if self.eos_ids else -1

  @classmethod
  def load(cls, path: str | Path) -> "JsonTokenizer":
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    return cls(path.read_bytes(), config=_read_json(path.parent / "tokenizer_config.json"),
               generation=_read_json(path.parent / "generation_config.json"))

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of text; add_bos/add_eos add the BOS/EOS id where the tokenizer has one (as
    transformers' add_special_tokens does)."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos and self.bos_id >= 0:
      ids.insert(0, self.bos_id)
    if add_eos and self.eos_id >= 0:
      ids.append(self.eos_id)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode(_as_id_list(ids, self.vocab_size), skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) or ""

  def __repr__(self) -> str:
    return f"JsonTokenizer({self.name}, vocab_size={self.vocab_size})"


def _eos_ids(listed: Sequence[int], own: int, vocab_size: int) -> tuple[int, ...]:
  """generation_config.json's EOS ids where it lists any (in its order), else the tokenizer's
  own EOS token; ids outside the vocabulary are refused."""
  ids = tuple(int(i) for i in listed) or ((own,) if own >= 0 else ())
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"eos_token_id {bad[0]} is outside the tokenizer's {vocab_size} tokens")
  return ids


def _read_json(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None
  return data if isinstance(data, dict) else {}


TOKENIZER_SUBDIR = "tokenizer"  # where a converted checkpoint keeps its tokenizer files


def load(spec: str | Path | None = None) -> Tokenizer | JsonTokenizer | ByteTokenizer:
  """'bytes' -> ByteTokenizer; None -> the shipped stdlib tokenizer; a tokenizer.json file ->
  JsonTokenizer; another file -> a sentencepiece Tokenizer; a directory (a converted checkpoint,
  whose tokenizer files are in its tokenizer/, or a model directory) -> its tokenizer.model if it
  has one, else its tokenizer.json, with EOS ids from generation_config.json there."""
  if spec == "bytes":
    return ByteTokenizer()
  path = Path(DEFAULT_MODEL_PATH if spec is None else spec)
  if path.is_dir():
    if (path / TOKENIZER_SUBDIR).is_dir():
      path = path / TOKENIZER_SUBDIR
    if (path / "tokenizer.model").is_file():
      listed = _read_json(path / "generation_config.json").get("eos_token_id")
      listed = [listed] if isinstance(listed, int) else list(listed or [])
      return Tokenizer((path / "tokenizer.model").read_bytes(), eos_ids=listed)
    if (path / "tokenizer.json").is_file():
      return JsonTokenizer.load(path / "tokenizer.json")
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
  if path.suffix == ".json":
    return JsonTokenizer.load(path)
  return Tokenizer.load(path)


def verifiable(name: str) -> bool:
  """Whether a tokenizer name says which file it is (a hash: "sp:...", "json:...") or is the
  byte tokenizer, so two such names differ exactly when the vocabularies may. Other names
  ("gemma", a preset's) say which vocabulary family, not which file."""
  return name.startswith(("sp:", "json:")) or name == "bytes"
