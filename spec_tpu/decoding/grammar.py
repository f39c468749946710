"""Structured output: a regex or JSON schema compiled to a token-level automaton the decode loop
holds on device.

A grammar constrains the target's law to the tokens its automaton allows after the prefix. The
automaton is deterministic over tokens, so the allowed set at every position is a function of
the prefix: the loop masks the draft's p at each drafted position (the state advanced over the
drafted tokens), the target's q at each of the K + 1 verified positions (the same states) and
the bonus position, and after acceptance keeps the state reached by the emitted tokens (the
rollback: the states of rejected drafts are simply not kept). EOS is allowed exactly in the
accepting states. Speculative sampling stays exact for the constrained law, and nothing leaves
the device between rounds (decode.py).

Compilation (host, once per grammar and tokenizer; `GrammarCompiler` caches it): a JSON schema
becomes a regex (outlines-core), the regex a DFA over the tokens' bytes (outlines-core's Index),
and that a table next[state, token] (int32, -1: not allowed) with the start state 0, held
compactly: most tokens behave alike in every state (the same column of the table), so the
table is stored as a class per token, cls[token], and next_cls[state, class], exactly
next[state, token] = next_cls[state, cls[token]] (a 256k-token vocabulary has a few hundred
classes for a JSON schema). A state's mask is one of few distinct allowed sets, each kept
bit-packed (a bit per token: a row costs V / 8 bytes, and the device reads it without a
gather). docs/structured.md compares the grammar libraries and gives the costs.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading

import numpy as np


class GrammarError(ValueError):
  """A response format, schema or regex that cannot constrain a generation (a 400)."""


# JSON Schema keywords the schema-to-regex translation enforces. It would drop any other
# (numeric bounds, multipleOf, uniqueItems, ...) silently, and the output might then fail its
# schema: those are refused instead.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "minLength", "maxLength", "pattern", "format"})
# Annotations only: they constrain nothing, whatever their value.
_ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "default", "examples",
                          "$comment"})
FORMATS = ("date-time", "date", "time", "uuid", "email", "uri")


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (arrays)
class TokenGrammar:
  """A compiled grammar: token v in state s leads to next_sc[s, cls_v[v]], -1 where v is not
  allowed (EOS maps an accepting state to itself). State 0 is the start. The same masks,
  bit-packed: v is allowed in s iff bit v % 32 of bits_mw[mask_s[s], v // 32] is set."""
  cls_v: np.ndarray    # int32 (V,): each token's class (tokens of one class act alike)
  next_sc: np.ndarray  # int32 (states, classes)
  mask_s: np.ndarray   # int32 (states,): the state's allowed set
  bits_mw: np.ndarray  # uint32 (allowed sets, ceil(V / 32))
  source: str  # the regex it was compiled from
  # What identifies the automaton: the regex and the vocabulary it was compiled over (slots
  # whose requests bring the same key share one table on device).
  key: str

  @property
  def num_states(self) -> int:
    return self.next_sc.shape[0]

  @property
  def num_classes(self) -> int:
    return self.next_sc.shape[1]

  @property
  def num_masks(self) -> int:
    return self.bits_mw.shape[0]

  @property
  def next_sv(self) -> np.ndarray:
    """The dense table next[state, token] (states x V int32: large for a large vocabulary)."""
    return self.next_sc[:, self.cls_v]


def token_classes(table_sv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(cls_v, next_sc): the table's distinct columns, exactly table_sv = next_sc[:, cls_v].
  Columns are grouped by a hash (a random linear form, fast at 256k tokens), then checked in
  full; a collision, never seen, falls back to sorting the columns themselves."""
  states = table_sv.shape[0]
  weights = np.random.default_rng(0).integers(1, 2 ** 63, size=states, dtype=np.uint64)
  signature = np.zeros(table_sv.shape[1], np.uint64)
  for s in range(states):  # row by row: no states x V int64 temporary
    signature += weights[s] * (table_sv[s] + 1).astype(np.uint64)
  _, first, cls_v = np.unique(signature, return_index=True, return_inverse=True)
  next_sc = table_sv[:, first]
  if not np.array_equal(next_sc[:, cls_v], table_sv):
    next_sc, cls_v = np.unique(table_sv, axis=1, return_inverse=True)
  return cls_v.reshape(-1).astype(np.int32), np.ascontiguousarray(next_sc, np.int32)


def mask_rows(cls_v: np.ndarray, next_sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mask_s, bits_mw): each state's allowed set among the distinct ones, and those sets
  bit-packed, token v at bit v % 32 of word v // 32 (little-endian)."""
  sets_mc, mask_s = np.unique(next_sc >= 0, axis=0, return_inverse=True)
  v = cls_v.shape[0]
  allowed_mv = np.zeros((sets_mc.shape[0], -(-v // 32) * 32), bool)
  allowed_mv[:, :v] = sets_mc[:, cls_v]
  bits = np.packbits(allowed_mv, axis=1, bitorder="little")
  return (mask_s.reshape(-1).astype(np.int32),
          np.ascontiguousarray(bits).view("<u4").astype(np.uint32))


def token_bytes(tokenizer) -> list[bytes | None]:
  """The bytes each token id stands for in generated text (None: a control token that never
  appears in it, such as pad, BOS or EOS)."""
  sp = getattr(tokenizer, "_sp", None)
  if sp is not None:  # sentencepiece
    out = []
    for i in range(tokenizer.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        out.append(None)
      elif sp.is_byte(i):
        out.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
      else:
        out.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out
  if getattr(tokenizer, "name", None) == "bytes":
    offset = tokenizer.vocab_size - 256
    return [None] * offset + [bytes([b]) for b in range(256)]
  raise GrammarError(f"structured output is not supported for the tokenizer {tokenizer!r} "
                     f"(sentencepiece and byte tokenizers are)")


def _check_schema(schema, path="schema"):
  """Refuses what the regex translation would not enforce (so a response could fail its
  schema) and what is not a JSON schema."""
  if isinstance(schema, bool):
    return
  if not isinstance(schema, dict):
    raise GrammarError(f"{path} must be an object, got {type(schema).__name__}")
  for key, value in schema.items():
    if key in _ANNOTATIONS:
      continue
    if key not in SUPPORTED_KEYWORDS:
      raise GrammarError(f"{path}: unsupported JSON Schema keyword {key!r} (it would not be "
                         f"enforced)")
    if key == "format" and value not in FORMATS:
      raise GrammarError(f"{path}: unsupported format {value!r} (supported: "
                         f"{', '.join(FORMATS)})")
    if key in ("properties", "$defs", "definitions"):
      if not isinstance(value, dict):
        raise GrammarError(f"{path}.{key} must be an object")
      for name, sub in value.items():
        _check_schema(sub, f"{path}.{key}.{name}")
    elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
      if not isinstance(value, list) or not value:
        raise GrammarError(f"{path}.{key} must be a non-empty array")
      for i, sub in enumerate(value):
        _check_schema(sub, f"{path}.{key}[{i}]")
    elif key in ("items", "additionalProperties") and not isinstance(value, bool):
      _check_schema(value, f"{path}.{key}")
    elif key == "type":
      types = value if isinstance(value, list) else [value]
      known = {"object", "array", "string", "number", "integer", "boolean", "null"}
      if not types or any(t not in known for t in types):
        raise GrammarError(f"{path}.type must be one of {sorted(known)}, got {value!r}")
    elif key == "required" and not (isinstance(value, list) and
                                     all(isinstance(x, str) for x in value)):
      raise GrammarError(f"{path}.required must be an array of property names")
    elif key == "enum" and not isinstance(value, list):
      raise GrammarError(f"{path}.enum must be an array")
    elif key in ("minLength", "maxLength", "minItems", "maxItems") and not (
        isinstance(value, int) and not isinstance(value, bool) and value >= 0):
      raise GrammarError(f"{path}.{key} must be a non-negative integer")


def schema_regex(schema) -> str:
  """The regex of a JSON schema's instances (compact JSON, optional single spaces)."""
  from outlines_core.json_schema import build_regex_from_schema
  _check_schema(schema)
  try:
    return build_regex_from_schema(json.dumps(schema))
  except Exception as e:  # the translation's own refusals (bad $ref, bad pattern, ...)
    raise GrammarError(f"invalid JSON schema: {_first_line(e)}") from None


def json_object_regex() -> str:
  """response_format json_object: a JSON object whose values are scalars or arrays of scalars.
  (A regex cannot nest without bound, and the translation's own unrolling of an untyped object,
  three levels deep, is a 1600-state automaton that takes 10 s to compile at a 2k vocabulary.)"""
  from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING, WHITESPACE as W
  scalar = f"({STRING}|{NUMBER}|{BOOLEAN}|{NULL})"
  value = f"({scalar}|\\[{W}({scalar}({W},{W}{scalar})*)?{W}\\])"
  member = f"{STRING}{W}:{W}{value}"
  return f"\\{{{W}({member}({W},{W}{member})*)?{W}\\}}"


def _first_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0]


class GrammarCompiler:
  """Compiles regexes and JSON schemas over one vocabulary to TokenGrammars, caching the last
  `cache_size` (thread-safe: the server compiles while the engine runs). pieces: each token's
  bytes (token_bytes; None: never in text). eos_ids: an id or several (each ends a generation,
  allowed exactly where the grammar accepts). max_states, max_classes, max_masks: the most
  automaton states, token classes and distinct allowed sets a grammar may have (the engine's
  table size; None: any)."""

  def __init__(self, pieces, eos_ids, num_tokens: int, *, max_states: int,
               max_classes: int | None = None, max_masks: int | None = None,
               cache_size: int = 64):
    from outlines_core import Vocabulary
    eos_ids = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids or ())
    if not eos_ids:
      raise GrammarError("structured output needs an EOS token (the grammar decides where "
                         "the generation may end)")
    by_bytes = collections.defaultdict(list)
    for i, b in enumerate(pieces[:num_tokens]):
      # Empty pieces would loop in place; control tokens never appear in text; an end token is
      # the table's own column.
      if b and i not in eos_ids:
        by_bytes[b].append(i)
    self._vocabulary = Vocabulary(eos_ids[0], dict(by_bytes))
    self.eos_ids, self.num_tokens, self.max_states = eos_ids, num_tokens, max_states
    self.max_classes, self.max_masks = max_classes, max_masks
    # The vocabulary's identity, part of every grammar's key.
    digest = hashlib.sha256(repr((sorted(by_bytes.items()), eos_ids, num_tokens)).encode())
    self._vocabulary_id = digest.hexdigest()[:16]
    self._cache: collections.OrderedDict[str, TokenGrammar] = collections.OrderedDict()
    self._cache_size = cache_size
    self._lock = threading.Lock()

  def regex(self, pattern: str) -> TokenGrammar:
    if not isinstance(pattern, str) or not pattern:
      raise GrammarError("the regex must be a non-empty string")
    with self._lock:
      if pattern in self._cache:
        self._cache.move_to_end(pattern)
        return self._cache[pattern]
    grammar = self._compile(pattern)
    with self._lock:
      self._cache[pattern] = grammar
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return grammar

  def json_schema(self, schema) -> TokenGrammar:
    return self.regex(schema_regex(schema))

  def _compile(self, pattern: str) -> TokenGrammar:
    from outlines_core import Index
    try:
      index = Index(pattern, self._vocabulary)
    except Exception as e:
      raise GrammarError(f"cannot compile the regex {pattern[:80]!r}: {_first_line(e)}") \
          from None
    transitions = index.get_transitions()
    start = index.get_initial_state()
    finals = set(index.get_final_states())
    # States numbered from the start, in breadth-first order (0 = start).
    order, seen = [start], {start}
    for s in order:
      for nxt in transitions.get(s, {}).values():
        if nxt not in seen:
          seen.add(nxt)
          order.append(nxt)
    if len(order) > self.max_states:
      raise GrammarError(f"the grammar needs {len(order)} automaton states, more than the "
                         f"engine's grammar_states={self.max_states}")
    # outlines-core's state ids -> ours, through a sorted array (vectorized per state: a
    # string state allows most of a 256k vocabulary).
    ids = np.array(order, np.int64)
    by_id = np.argsort(ids)
    table = np.full((len(order), self.num_tokens), -1, np.int32)
    eos = list(self.eos_ids)
    for i, s in enumerate(order):
      out = transitions.get(s, {})
      tokens = np.fromiter(out.keys(), np.int64, len(out))
      nexts = np.fromiter(out.values(), np.int64, len(out))
      keep = tokens < self.num_tokens
      table[i, tokens[keep]] = by_id[np.searchsorted(ids, nexts[keep], sorter=by_id)]
      table[i, eos] = i if s in finals else -1
    # A state that allows nothing would leave the target's law undefined; the index prunes
    # dead ends, so only a language with no string in this vocabulary gets here.
    if not (table[0] >= 0).any():
      raise GrammarError(f"the regex {pattern[:80]!r} matches no text these tokens can spell")
    if not (table >= 0).any(axis=1).all():
      raise GrammarError(f"the regex {pattern[:80]!r} has states these tokens cannot leave")
    cls_v, next_sc = token_classes(table)
    if self.max_classes is not None and next_sc.shape[1] > self.max_classes:
      raise GrammarError(f"the grammar needs {next_sc.shape[1]} token classes, more than the "
                         f"engine's grammar_classes={self.max_classes}")
    mask_s, bits_mw = mask_rows(cls_v, next_sc)
    if self.max_masks is not None and bits_mw.shape[0] > self.max_masks:
      raise GrammarError(f"the grammar needs {bits_mw.shape[0]} distinct token masks, more "
                         f"than the engine's grammar_masks={self.max_masks}")
    return TokenGrammar(cls_v, next_sc, mask_s, bits_mw, pattern,
                        key=f"{self._vocabulary_id}:{pattern}")
