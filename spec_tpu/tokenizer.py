"""Tokenizers: a thin wrapper over sentencepiece, and a byte-level fallback with the same interface.

Both promise exact round trips, `decode(encode(text)) == text`, for any text: source code depends on
every space, tab and newline. Ids 0..3 are pad, unk, bos, eos in both.

`name` identifies a tokenizer (a hash of the model file), so a draft/target pair that does not share
a vocabulary can be refused before speculative sampling silently produces garbage.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from spec_tpu.training import corpus

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

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.name = "sp:" + hashlib.sha256(model_proto).hexdigest()[:12]
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.unk_id = self._sp.unk_id()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
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

  def __repr__(self) -> str:
    return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


class ByteTokenizer:
  """UTF-8 bytes shifted past the four special ids: vocab 260, no model file, nothing to train."""

  name = "bytes"
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
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


def load(spec: str | Path | None = None) -> Tokenizer | ByteTokenizer:
  """'bytes' -> ByteTokenizer; a path -> Tokenizer; None -> the shipped stdlib tokenizer."""
  if spec == "bytes":
    return ByteTokenizer()
  return Tokenizer.load(DEFAULT_MODEL_PATH if spec is None else spec)


# Trainer settings, chosen by held-out bytes/token on stdlib source at vocab 2048 while keeping exact
# round trips. Measured (3 MB of training text): prefix-whitespace BPE 2.72, + '\n' learned rather
# than a user-defined symbol 2.86, + pieces may span spaces 2.98, + no script split 3.09, + whitespace
# as suffix 3.16; unigram 2.58. On the full train split the final setting gives 3.30.
_TRAINER_OPTIONS = dict(
  model_type="bpe",                    # unigram: ~5% more tokens and 10-40x slower to train
  normalization_rule_name="identity",  # no NFKC: code must come back byte for byte
  remove_extra_whitespaces=False,
  add_dummy_prefix=False,              # no invented leading space
  byte_fallback=True,                  # any text encodes; never <unk>
  # Whitespace attaches to the end of a piece, so pieces such as ":\n        " (newline + indent)
  # and "def " can form; '\n' stays an ordinary character (not a user-defined symbol) for the same
  # reason. Pinning indentation runs as user-defined symbols measured worse than learning them.
  treat_whitespace_as_suffix=True,
  split_by_whitespace=False,
  split_by_unicode_script=False,       # lets "):" and ")\n" merge
  allow_whitespace_only_pieces=True,   # indentation runs
  pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
  input_sentence_size=0,               # use every chunk: no sampling, so training is deterministic
  shuffle_input_sentence=False,
  num_threads=1,
  max_sentence_length=1 << 16,         # bytes; chunks are ~4 KB, this only admits rare long lines
  minloglevel=2,
)
_CHUNK_BYTES = 4096


def _chunks(text: str, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[str]:
  """Whole lines (newlines kept) grouped into ~chunk_bytes pieces: the trainer's 'sentences'."""
  buf, size = [], 0
  for line in text.splitlines(keepends=True):
    buf.append(line)
    size += len(line)
    if size >= chunk_bytes:
      yield "".join(buf)
      buf, size = [], 0
  if buf:
    yield "".join(buf)


def train_tokenizer(text_or_files: str | Path | Iterable[Path], model_prefix: str | Path,
                    vocab_size: int = 2048, max_bytes: int | None = None) -> Path:
  """Train a BPE sentencepiece model and write `<model_prefix>.model`; returns its path.

  A `str` is the training text itself; a Path or an iterable of paths is read with
  `corpus.read_text`. The smallest workable vocab_size is ~260 + the number of distinct characters
  (about 350 for Python source), as byte-fallback pieces take 256 ids.
  """
  if isinstance(text_or_files, str):
    text = text_or_files if max_bytes is None else text_or_files.encode()[:max_bytes].decode(
      "utf-8", errors="ignore")
  else:
    files = [text_or_files] if isinstance(text_or_files, Path) else list(text_or_files)
    text = corpus.read_text(files, max_bytes=max_bytes)
  if not text:
    raise ValueError("no training text")
  out = Path(str(model_prefix) + ".model")
  out.parent.mkdir(parents=True, exist_ok=True)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=_chunks(text), model_writer=model,
                                   vocab_size=vocab_size, **_TRAINER_OPTIONS)
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from e
  out.write_bytes(model.getvalue())
  return out


def bytes_per_token(tok: Tokenizer | ByteTokenizer, text: str) -> float:
  return len(text.encode("utf-8")) / max(1, len(tok.encode(text)))


def build_default_tokenizer(out_dir: str | Path = ASSETS_DIR, vocab_size: int = 2048,
                            max_bytes: int = 30_000_000, verbose: bool = True) -> Path:
  """Train the shipped tokenizer on the stdlib train split; write `<out_dir>/stdlib_sp<vocab>.model`.

  Checks exact round trips on the held-out split and raises if any file fails.
  """
  files = corpus.stdlib_files()
  train_files, heldout_files = corpus.split(files)
  start = time.perf_counter()
  path = train_tokenizer(train_files, Path(out_dir) / f"stdlib_sp{vocab_size}",
                         vocab_size=vocab_size, max_bytes=max_bytes)
  seconds = time.perf_counter() - start
  tok = Tokenizer.load(path)
  heldout = corpus.read_text(heldout_files)
  ids = tok.encode(heldout)
  if tok.decode(ids) != heldout:
    raise RuntimeError(f"{path}: held-out text does not round-trip exactly")
  if verbose:
    print(f"{path}: {tok.name}, vocab {tok.vocab_size}, trained in {seconds:.1f}s on "
          f"{len(train_files)} files; held-out {len(heldout_files)} files, "
          f"{len(heldout.encode()) / len(ids):.3f} bytes/token")
  return path
