"""Structured-output costs: the grammar libraries side by side on one schema (compile time and
host mask time per token at a vocabulary), and the engine's tokens/s and acceptance with and
without a schema at several K. launch/grammar_bench.py prints and saves both;
docs/structured.md holds the figures.

The libraries: xgrammar and llguidance compute a token mask per step on the host from a
pushdown matcher (neither is a dependency: a missing one is reported, not measured);
outlines-core, which spec_tpu uses, compiles the schema to a token-level DFA once, and the
engine then masks on device by a table lookup (decoding/grammar.py).
"""

from __future__ import annotations

import json
import time

import numpy as np

from spec_tpu.decoding import grammar as grammar_lib

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["int", "str", "list"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "kind", "ok", "tags"],
    "additionalProperties": False,
}
# The same shape without length bounds: a grammar library checks fewer tokens per step where no
# counter runs (a bounded string makes every short token's acceptance depend on the count).
PLAIN_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["int", "str", "list"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "kind", "ok", "tags"],
    "additionalProperties": False,
}
SCHEMAS = {"bounded": SCHEMA, "plain": PLAIN_SCHEMA}
# A record with formats, a nested object and a pattern: the largest automaton of the table
# sizes below.
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "created": {"type": "string", "format": "date-time"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "[0-9]{5}"}}, "required": ["city", "zip"]},
    },
    "required": ["id", "email", "created", "score", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = '{"name": "parse", "kind": "list", "ok": true, "tags": ["io", "str"]}'


def synthetic_vocabulary(base: list, size: int, seed: int = 0) -> list:
  """base (a real tokenizer's pieces) extended with distinct random pieces up to `size`
  tokens, shaped like a large vocabulary's: 85% words (letters, some capitalised, half with a
  leading space, 2-12 bytes), 15% runs of digits, punctuation and spaces (1-4 bytes)."""
  rng = np.random.default_rng(seed)
  letters = list("abcdefghijklmnopqrstuvwxyz")
  other = list("0123456789 _.,:;\"'{}[]()-")
  seen = set(p for p in base if p)
  out = list(base)
  while len(out) < size:
    if rng.random() < 0.85:
      word = "".join(rng.choice(letters, int(rng.integers(2, 13))))
      word = word.capitalize() if rng.random() < 0.2 else word
      piece = ((" " if rng.random() < 0.5 else "") + word).encode()
    else:
      piece = "".join(rng.choice(other, int(rng.integers(1, 5)))).encode()
    if piece not in seen:
      seen.add(piece)
      out.append(piece)
  return out


def _greedy_tokens(pieces: list, text: str) -> list[int]:
  """text split into the longest pieces first (any valid spelling does for a mask walk)."""
  data = text.encode()
  index = {p: i for i, p in enumerate(pieces) if p}
  longest = max(len(p) for p in index)
  out, i = [], 0
  while i < len(data):
    for n in range(min(longest, len(data) - i), 0, -1):
      if data[i:i + n] in index:
        out.append(index[data[i:i + n]])
        i += n
        break
    else:
      raise ValueError(f"no piece spells {data[i:i + 1]!r}")
  return out


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _warm(walk, repeats: int = 3) -> float:
  """Seconds of the fastest of `repeats` walks after a first (caches filled, as in serving
  after the first request of a schema)."""
  walk()
  return min(_timed(walk)[1] for _ in range(repeats))


def _xgrammar(pieces, eos, tokens, schema):
  import xgrammar as xgr  # its bitmasks are torch tensors: it imports torch itself
  vocab = [p if p else b"<|special|>" for p in pieces]
  info = xgr.TokenizerInfo(vocab, vocab_size=len(vocab), stop_token_ids=[eos])
  compiled, compile_s = _timed(lambda: xgr.GrammarCompiler(info, cache_enabled=False)
                               .compile_json_schema(json.dumps(schema)))
  matcher = xgr.GrammarMatcher(compiled)
  mask = xgr.allocate_token_bitmask(1, len(vocab))

  def walk():
    matcher.reset()
    for t in tokens:
      matcher.fill_next_token_bitmask(mask)
      assert matcher.accept_token(t)
    matcher.fill_next_token_bitmask(mask)
  walk_s = _warm(walk)
  matcher.rollback(3)  # the rollback API: back over the last tokens
  return dict(compile_s=compile_s, mask_us=1e6 * walk_s / (len(tokens) + 1),
              rollback="GrammarMatcher.rollback(n), fork()")


class _Tok:
  def __init__(self, pieces, eos):
    self.tokens = [p if p else b"" for p in pieces]
    self.eos_token_id, self.bos_token_id = eos, None
    self.special_token_ids = [i for i, p in enumerate(pieces) if not p]

  def __call__(self, data):
    return _greedy_tokens(self.tokens, data.decode() if isinstance(data, bytes) else data)


def _llguidance(pieces, eos, tokens, schema):
  import llguidance
  import llguidance.numpy as lnp
  tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tok(pieces, eos)))
  grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
  matcher, compile_s = _timed(lambda: llguidance.LLMatcher(tok, grammar))
  mask = lnp.allocate_token_bitmask(1, tok.vocab_size)

  def walk():
    matcher.reset()
    for t in tokens:
      lnp.fill_next_token_bitmask(matcher, mask, 0)
      assert matcher.consume_token(t), matcher.get_error()
    lnp.fill_next_token_bitmask(matcher, mask, 0)
  walk_s = _warm(walk)
  matcher.rollback(3)
  return dict(compile_s=compile_s, mask_us=1e6 * walk_s / (len(tokens) + 1),
              rollback="LLMatcher.rollback(n), deep_copy()")


def _outlines(pieces, eos, tokens, schema):
  from outlines_core import Index, Vocabulary
  import collections
  by_bytes = collections.defaultdict(list)
  for i, p in enumerate(pieces):
    if p:
      by_bytes[p].append(i)
  vocabulary = Vocabulary(eos, dict(by_bytes))
  regex = grammar_lib.schema_regex(schema)
  index, compile_s = _timed(lambda: Index(regex, vocabulary))

  def walk():
    s = index.get_initial_state()
    for t in tokens:
      index.get_allowed_tokens(s)
      s = index.get_next_state(s, t)
    index.get_allowed_tokens(s)
  walk_s = _warm(walk)
  # spec_tpu's table: the automaton's states x token classes, and a class per token.
  g, table_s = _timed(lambda: grammar_lib.GrammarCompiler(
      pieces, eos, len(pieces), max_states=2 ** 20).regex(regex))
  return dict(compile_s=compile_s, mask_us=1e6 * walk_s / (len(tokens) + 1),
              rollback="a DFA: the state is an int (keep the one to return to)",
              states=g.num_states, table_mib=g.num_states * len(pieces) * 4 / 2 ** 20,
              classes=g.num_classes, table_s=table_s,
              compact_mib=(g.next_sc.size + g.cls_v.size + g.mask_s.size +
                           g.bits_mw.size) * 4 / 2 ** 20)


LIBRARIES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "outlines-core": _outlines}


def compare_libraries(base_pieces: list, eos: int, sizes=(2048, 262144), schemas=SCHEMAS,
                      document: str = DOCUMENT) -> list[dict]:
  """One row per (vocabulary size, schema, library): compile seconds, host mask microseconds
  per token (walking `document`, which follows every schema), how it rolls back."""
  rows = []
  for size in sizes:
    pieces = synthetic_vocabulary(base_pieces, size) if size > len(base_pieces) \
        else list(base_pieces[:size])
    tokens = _greedy_tokens(pieces, document)
    for schema_name, schema in schemas.items():
      for name, fn in LIBRARIES.items():
        row = dict(library=name, vocab=size, schema=schema_name, doc_tokens=len(tokens))
        try:
          row.update(fn(pieces, eos, tokens, schema))
        except ImportError as e:
          row.update(error=f"not installed ({e.name})")
        rows.append(row)
  return rows


def table_sizes(base_pieces: list, eos: int, sizes=(2048, 262144)) -> list[dict]:
  """One row per (vocabulary size, grammar): the compiled automaton's states, token classes
  and distinct masks, its dense table's bytes (states x V int32) against the compact one's
  (states x classes int32, an int32 class per token, a bit per token per mask), and the
  compile seconds (outlines-core's index and the tables)."""
  grammars = {name: grammar_lib.schema_regex(schema)
              for name, schema in (*SCHEMAS.items(), ("nested", NESTED_SCHEMA))}
  grammars["json_object"] = grammar_lib.json_object_regex()
  rows = []
  for size in sizes:
    pieces = synthetic_vocabulary(base_pieces, size) if size > len(base_pieces) \
        else list(base_pieces[:size])
    compiler = grammar_lib.GrammarCompiler(pieces, eos, size, max_states=2 ** 20)
    for name, regex in grammars.items():
      g, seconds = _timed(lambda: compiler.regex(regex))
      rows.append(dict(vocab=size, grammar=name, states=g.num_states, classes=g.num_classes,
                       masks=g.num_masks, dense_mib=g.num_states * size * 4 / 2 ** 20,
                       compact_mib=(g.next_sc.size + g.cls_v.size + g.mask_s.size +
                                    g.bits_mw.size) * 4 / 2 ** 20,
                       compile_s=seconds))
  return rows


def format_table_sizes(rows: list[dict]) -> str:
  out = [f"{'vocab':>8}{'grammar':>12}{'states':>8}{'classes':>9}{'masks':>7}"
         f"{'dense MiB':>11}{'compact MiB':>13}{'compile s':>11}"]
  for r in rows:
    out.append(f"{r['vocab']:>8}{r['grammar']:>12}{r['states']:>8}{r['classes']:>9}"
               f"{r['masks']:>7}{r['dense_mib']:>11.1f}{r['compact_mib']:>13.2f}"
               f"{r['compile_s']:>11.2f}")
  return "\n".join(out)


def format_libraries(rows: list[dict]) -> str:
  out = [f"{'library':<14}{'vocab':>8}{'schema':>9}{'compile s':>11}{'mask us/token':>15}"
         f"  DFA states (dense int32 table)  token classes (compact table)"]
  for r in rows:
    head = f"{r['library']:<14}{r['vocab']:>8}{r['schema']:>9}"
    if "error" in r:
      out.append(f"{head}  {r['error']}")
      continue
    extra = (f"  {r['states']} ({r['table_mib']:.1f} MiB)  {r['classes']} "
             f"({r['compact_mib']:.2f} MiB)" if "states" in r else "")
    out.append(f"{head}{r['compile_s']:>11.3f}{r['mask_us']:>15.1f}{extra}")
  return "\n".join(out)


def engine_rows(engine, prompts, schema=SCHEMA, ks=(0, 4), samples: int = 16,
                max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0) -> list[dict]:
  """tokens/s, acceptance, mask refusals, requests ended by EOS (not cut by max_new_tokens)
  and schema-valid responses of `samples` requests (prompts cycled) with and without the
  schema at each K, on one engine (fixed K per run: Engine.step(k))."""
  from spec_tpu.serving import GenerationParams
  g = engine.grammars.json_schema(schema) if engine.grammars is not None else None
  rows = []
  for k in ks:
    for constrained in (False, True) if g is not None else (False,):
      params = [GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed * samples + i, grammar=g if constrained else None)
                for i in range(samples)]
      requests = engine.submit_all([(prompts[i % len(prompts)], params[i])
                                    for i in range(samples)])
      start, rounds0 = time.perf_counter(), engine.metrics.rounds
      while engine.step(k):
        pass
      seconds, rounds = time.perf_counter() - start, engine.metrics.rounds - rounds0
      stats = [r.result().stats for r in requests]
      new = sum(s.new_tokens for s in stats)
      judged = sum(s.judged for s in stats)
      valid = None
      if constrained:
        valid = sum(_valid(r.result().text, schema) for r in requests)
      stopped = sum(r.result().finish_reason == "stop" for r in requests)
      rows.append(dict(k=k, schema=constrained, grammars=g is not None, tokens=new,
                       seconds=seconds, rounds=rounds, ms_per_round=1e3 * seconds / rounds,
                       tokens_per_s=new / seconds,
                       acceptance=sum(s.accepted for s in stats) / judged if judged else None,
                       mask_rejected=sum(s.mask_rejected for s in stats), valid=valid,
                       stopped=stopped, samples=samples))
  return rows


def _valid(text: str, schema) -> bool:
  import jsonschema
  try:
    jsonschema.validate(json.loads(text), schema)
    return True
  except (ValueError, jsonschema.ValidationError):
    return False


def format_engine(rows: list[dict]) -> str:
  out = [f"{'engine':<15}{'K':>3}{'schema':>8}{'tokens':>8}{'tok/s':>9}{'ms/round':>10}"
         f"{'accept':>8}{'refused':>9}{'ended':>8}{'valid':>8}"]
  for r in rows:
    acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
    valid = "-" if r["valid"] is None else f"{r['valid']}/{r['samples']}"
    engine = "grammars" if r["grammars"] else "no grammars"
    out.append(f"{engine:<15}{r['k']:>3}{'yes' if r['schema'] else 'no':>8}{r['tokens']:>8}"
               f"{r['tokens_per_s']:>9.1f}{r['ms_per_round']:>10.2f}"
               f"{acc:>8}{r['mask_rejected']:>9}"
               f"{r['stopped']:>8}{valid:>8}")
  return "\n".join(out)


def run(config, output_dir: str, *, libraries: bool = True, engine: bool = True,
        sizes=(2048, 262144), samples: int = 16, max_new_tokens: int = 64,
        ks=None, repeats: int = 3) -> str:
  """The launcher's call: the library table at `sizes` (the config's tokenizer's pieces,
  extended synthetically past its size) and the engine table on the config's pair at K = 0
  and engine.k (engine.grammar_states from the config, at least 512), and on an engine built
  without grammars (the masks' cost to unconstrained rows). Writes results.json and
  table.txt under output_dir; returns the table."""
  import os
  from spec_tpu import setup
  from spec_tpu.serving import Engine
  os.makedirs(output_dir, exist_ok=True)
  s = setup.resolve(config)
  tok = setup.load_tokenizer(config, s)
  results, parts = {}, []
  if libraries:
    rows = compare_libraries(grammar_lib.token_bytes(tok), tok.eos_id, sizes)
    results["libraries"] = rows
    parts.append(format_libraries(rows))
    rows = table_sizes(grammar_lib.token_bytes(tok), tok.eos_id, sizes)
    results["table_sizes"] = rows
    parts.append(format_table_sizes(rows))
    settings = setup.engine_settings(config)
    # The device's share: a table of 512 states (the embedded pair's setting) and the engine's
    # default 1024 token classes per slot, at each size.
    rows = [mask_cost(settings.num_slots, max(settings.k, 1), size, states=512,
                      classes=min(1024, size)) for size in sizes]
    results["mask_cost"] = rows
    parts.append(format_mask_cost(rows))
  if engine:
    settings = setup.engine_settings(config)
    pair = setup.load_pair(config, s)
    k = settings.k
    prompts = [tok.encode(p) for p in config.run.prompts] or [[tok.eos_id]]
    ks = tuple(ks) if ks else tuple(sorted({0, k}))
    # The engine without grammar support too: what the masks cost the rows that have none.
    engines = [Engine(pair, num_slots=settings.num_slots, max_len=settings.context() or 256,
                      k=k, adaptive_k=False, max_rounds_per_step=settings.max_rounds_per_step,
                      coupling=settings.coupling, grammar_states=states)
               for states in (0, max(settings.grammar_states, 512))]
    for e in engines:  # compiles
      engine_rows(e, prompts, ks=ks, samples=samples, max_new_tokens=min(max_new_tokens, 16))
    # Interleaved repeats (the same seeds, so the same tokens), the fastest of each kept: a
    # loaded machine's noise is larger than a mask's cost.
    best = {}
    for _ in range(repeats):
      for e in engines:
        for row in engine_rows(e, prompts, ks=ks, samples=samples,
                               max_new_tokens=max_new_tokens):
          key = (row["grammars"], row["k"], row["schema"])
          if key not in best or row["seconds"] < best[key]["seconds"]:
            best[key] = row
    rows = list(best.values())
    results["engine"] = rows
    parts.append(format_engine(rows))
  table = "\n\n".join(parts)
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(output_dir, "table.txt"), "w") as f:
    f.write(table + "\n")
  return table


def mask_cost(batch: int, k: int, vocab: int, states: int = 512, classes: int = 1024,
              repeats: int = 5, calls: int = 50) -> dict:
  """Microseconds per round of the mask work alone, on the default device: the row's state
  advanced over K drafts, K + 1 masks read from a pool of `batch` tables (states x classes,
  a class per token, a bit mask per state) and applied to the verified logits, and the
  draft's K masked
  positions, beside the same softmaxes without masks and with masks from a dense
  states x vocab table (at most 256 MiB of it: fewer states at large vocabularies), best of
  `repeats` interleaved runs of `calls` rounds."""
  import jax
  import jax.numpy as jnp
  from spec_tpu.decoding import decode
  rng = np.random.default_rng(0)
  pool_states = 1 + batch * states
  pool = decode.GrammarPool(
      next_sc=jnp.asarray(np.where(rng.random((pool_states, classes)) < 0.5, -1,
                                   rng.integers(0, pool_states, (pool_states, classes))
                                   ).astype(np.int32)),
      table_s=jnp.asarray(np.concatenate([[0], np.repeat(np.arange(1, batch + 1), states)]
                                         ).astype(np.int32)),
      cls_tv=jnp.asarray(rng.integers(0, classes, (1 + batch, vocab)).astype(np.int32)),
      mask_s=jnp.asarray(rng.integers(0, pool_states, (pool_states,)).astype(np.int32)),
      bits_mw=jnp.asarray(rng.integers(0, 2 ** 32, (pool_states, -(-vocab // 32)),
                                       dtype=np.uint64).astype(np.uint32)))
  logits = jnp.asarray(rng.normal(size=(batch, k + 1, vocab)).astype(np.float32))
  drafts = jnp.asarray(rng.integers(0, vocab, (batch, k)).astype(np.int32))
  g0 = jnp.asarray(rng.integers(0, pool_states, (batch,)).astype(np.int32))
  dense_states = 1 + batch * min(states, max(1, 2 ** 26 // (batch * vocab)))
  dense = jnp.asarray(np.where(rng.random((dense_states, vocab)) < 0.5, -1,
                               rng.integers(0, dense_states, (dense_states, vocab))
                               ).astype(np.int32))

  def masked_by(allowed_fn, advance, num_states):
    def masked(logits, drafts, g0):
      g = [g0 % num_states]
      for j in range(k):
        g.append(advance(g[-1], drafts[:, j]))
      g_bm = jnp.stack(g, axis=1)
      allowed = allowed_fn(g_bm)
      return jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1) \
          + jax.nn.softmax(jnp.where(allowed[:, :k], logits[:, :k], -jnp.inf), axis=-1).sum()
    return masked

  def plain(logits, drafts, g0):
    return jax.nn.softmax(logits, axis=-1) + jax.nn.softmax(logits[:, :k], axis=-1).sum()

  fns = {name: jax.jit(fn) for name, fn in (
      ("masked", masked_by(lambda g: decode._allowed(pool, g),
                           lambda g, x: decode._advance(pool, g, x), pool_states)),
      ("dense", masked_by(lambda g: dense[g] >= 0, lambda g, x: jnp.maximum(dense[g, x], 0),
                          dense_states)),
      ("plain", plain))}
  best = {name: float("inf") for name in fns}
  for fn in fns.values():
    fn(logits, drafts, g0).block_until_ready()
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn(logits, drafts, g0)
      out.block_until_ready()
      best[name] = min(best[name], (time.perf_counter() - start) / calls)
  pool_bytes = sum(x.size * x.dtype.itemsize for x in pool)
  return dict(batch=batch, k=k, vocab=vocab, states=states, classes=classes,
              table_mib=pool_bytes / 2 ** 20, masked_us=1e6 * best["masked"],
              plain_us=1e6 * best["plain"], mask_us=1e6 * (best["masked"] - best["plain"]),
              dense_mib=dense.size * 4 / 2 ** 20,
              dense_mask_us=1e6 * (best["dense"] - best["plain"]))


def format_mask_cost(rows: list[dict]) -> str:
  out = [f"{'batch':>6}{'K':>3}{'vocab':>8}{'pool MiB':>10}{'masked us':>11}{'plain us':>10}"
         f"{'mask us/round':>15}{'dense MiB':>11}{'dense mask us':>15}"]
  for r in rows:
    out.append(f"{r['batch']:>6}{r['k']:>3}{r['vocab']:>8}{r['table_mib']:>10.0f}"
               f"{r['masked_us']:>11.1f}{r['plain_us']:>10.1f}{r['mask_us']:>15.1f}"
               f"{r['dense_mib']:>11.0f}{r['dense_mask_us']:>15.1f}")
  return "\n".join(out)
