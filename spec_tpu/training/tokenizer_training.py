"""Training sentencepiece tokenizers for code: the trainer settings, and the shipped model's build.

The tokenizer itself (loading, encoding, decoding) is spec_tpu/tokenizer.py.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from spec_tpu.tokenizer import ASSETS_DIR, BOS_ID, EOS_ID, PAD_ID, UNK_ID, ByteTokenizer, Tokenizer
from spec_tpu.training import corpus


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
