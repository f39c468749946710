"""lm-evaluation-harness against the server, as users run it: its `local-completions` model
(lm_eval.models.openai_completions.LocalCompletionsAPI) talks to an in-process server of the
embedded pair on 127.0.0.1, tokenizing through the server's /tokenize (no tokenizer download)
and scoring a local task file (no dataset download). The scores it gets are checked against a
recompute from the target's own forward pass.
"""

import functools
import json
import math
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

from spec_tpu import setup, sharding, tokenizer
from spec_tpu.models import model
from spec_tpu.serving import Engine, openai_api
from test_serve import _served

MODEL, KEY = "stdlib_target", "eval-key"


@pytest.fixture(scope="module")
def served():
  """(url, pair) of an in-process server of the embedded pair (one device, K = 2 fixed)."""
  tok = tokenizer.load()
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  pair = setup.load_checkpoints("spec_tpu/assets/target", "spec_tpu/assets/draft", mesh=mesh,
                                tokenizer=tok)
  engine = Engine(pair, num_slots=4, max_len=256, k=2, adaptive_k=False, logprobs_k=1,
                  rounds_per_step=4).start()
  app = openai_api.build_app(engine, MODEL, limits=openai_api.Limits(api_key=KEY))
  try:
    with _served(app) as url:
      yield url, pair
  finally:
    engine.shutdown()


def _lm(url, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what its completions requests send
  return LocalCompletionsAPI(base_url=url + "/v1/completions", model=MODEL, auth_token=KEY,
                             max_length=200, max_gen_toks=12)


@functools.cache
def _forward(cfg):
  return jax.jit(lambda params, tokens: model.forward_full(params, cfg, tokens))


def _log_softmax(pair, tokens):
  """float64 log q(. | tokens[:j + 1]) at every position j, from one forward over exactly
  these tokens (the target computes in bfloat16: a padded width would round differently)."""
  cfg = pair.target_cfg
  logits = np.asarray(_forward(cfg)(pair.target_params, np.asarray([tokens], np.int32))[0],
                      np.float64)[:, :cfg.num_tokens]
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _reference_scores(pair, context_tokens, continuation_tokens):
  """(sum of log p(continuation | context), whether each token is the argmax)."""
  logq = _log_softmax(pair, context_tokens + continuation_tokens)
  at = np.arange(len(context_tokens) - 1, logq.shape[0] - 1)
  cont = np.asarray(continuation_tokens, np.int64)
  return float(logq[at, cont].sum()), bool(np.all(logq[at].argmax(-1) == cont))


def _reference_greedy(pair, tokens, n):
  """The target's n greedy tokens after `tokens`: a forward per token, each over the same
  right-padded width (one compile; causal, so the padding changes nothing before it)."""
  width = len(tokens) + n
  row = np.zeros((width,), np.int64)
  row[:len(tokens)] = tokens
  for j in range(len(tokens), width):
    row[j] = _log_softmax(pair, row.tolist())[j - 1].argmax()
  return row[len(tokens):].tolist()


def _split(tok, context, continuation):
  """The tokens lm-eval scores for a (context, continuation) pair, split as it documents for
  causal models: the context's trailing whitespace moved to the continuation, the context's
  own tokens, then the whole text's tokens after as many."""
  stripped = context.rstrip()
  continuation, context = context[len(stripped):] + continuation, stripped
  ctx = tok.encode(context)
  return ctx, tok.encode(context + continuation)[len(ctx):]


PAIRS = [("def add(a, b):\n    return", " a + b"),
         ("for i in range(10):\n    print(", "i)"),
         ("x = [1, 2, 3]\ny = len(", "x)"),
         ("class Stack:\n    def push(self, x):\n        self.items.", "append(x)")]
WRONG = [" b - a", "x)", "y)", "pop(x)"]  # a worse choice for each, for the task file


def test_loglikelihood_and_generation_through_local_completions(served, monkeypatch):
  url, pair = served
  lm = _lm(url, monkeypatch)
  tok = pair.tokenizer
  # Given lm-eval's client, which found the server's tokenizer endpoints on its own,
  assert lm.tokenizer_backend == "remote"
  # when it generates until a stop string (greedy, K = 2 speculation on the server),
  contexts = ["import os\nimport", "def fib(n):\n    "]
  texts = lm.generate_until([Instance("generate_until", {},
                                      (c, {"until": ["\n\n"], "max_gen_toks": 12}), i)
                             for i, c in enumerate(contexts)], disable_tqdm=True)
  # then each text is the target's greedy continuation, cut before the stop string;
  for context, text in zip(contexts, texts):
    want = tok.decode(_reference_greedy(pair, tok.encode(context), 12))
    assert text == want.split("\n\n")[0]
  # and when it scores continuations (echo + logprobs, as its loglikelihood requests ask),
  # the fixed pairs and its own greedy text,
  pairs = PAIRS + [(contexts[0], texts[0])]
  got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                         disable_tqdm=True)
  # then each score is the target's log-probability of the continuation's tokens given the
  # context, as a forward pass computes it, and its is-greedy flag the argmax check (true for
  # the greedy text, false for the others).
  for (context, continuation), (score, greedy) in zip(pairs, got):
    want, want_greedy = _reference_scores(pair, *_split(tok, context, continuation))
    # (bfloat16 activations: another program shape may round a logprob by ~1e-3)
    assert math.isclose(score, want, abs_tol=2e-2), (context, score, want)
    assert greedy == want_greedy
  assert [g for _, g in got] == [False] * len(PAIRS) + [True]


def test_a_local_task_file_is_scored_with_no_download(served, monkeypatch, tmp_path):
  url, pair = served
  tok = pair.tokenizer
  # Given a multiple-choice task written as lm-eval's YAML over a local JSON-lines file,
  docs = [{"context": c, "choices": [right, wrong], "answer": 0}
          for (c, right), wrong in zip(PAIRS, WRONG)]
  (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "stdlib_choice.yaml").write_text(
      "task: stdlib_choice\n"
      "dataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
      "test_split: test\n"
      "output_type: multiple_choice\n"
      "doc_to_text: '{{context}}'\n"
      "doc_to_choice: '{{choices}}'\n"
      "doc_to_target: answer\n"
      "target_delimiter: ''\n"
      "metric_list:\n  - metric: acc\n")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lm_eval import simple_evaluate  # imports `datasets`: only the test that needs it
  from lm_eval.tasks import TaskManager
  # when lm-eval evaluates it through the server,
  results = simple_evaluate(model=_lm(url, monkeypatch), tasks=["stdlib_choice"],
                            task_manager=TaskManager(include_path=str(tmp_path),
                                                     include_defaults=False),
                            log_samples=True)
  # then its accuracy is the share of documents whose right choice the target scores higher,
  # by the same recompute.
  right = []
  for d in docs:
    scores = [_reference_scores(pair, *_split(tok, d["context"], choice))[0]
              for choice in d["choices"]]
    right.append(int(np.argmax(scores)) == d["answer"])
  assert results["results"]["stdlib_choice"]["acc,none"] == pytest.approx(np.mean(right))


def test_tokenizer_endpoints_as_vllm_serves_them(served):
  url, pair = served
  tok = pair.tokenizer

  def call(path, body=None, key=KEY):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
      with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  text = "def f(x):\n    return x"
  # /tokenize gives the server's own encoding of a text prompt, /detokenize inverts it,
  status, out = call("/tokenize", {"prompt": text, "add_special_tokens": False})
  assert status == 200 and out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"])
  assert call("/detokenize", {"tokens": out["tokens"]}) == (200, {"prompt": text})
  # /tokenizer_info names the special tokens and the context,
  status, info = call("/tokenizer_info")
  assert status == 200 and info["eos_token_id"] == pair.eos_ids[0]
  assert info["eos_token"] == tok.id_to_piece(pair.eos_ids[0]) and info["model_max_length"] == 256
  # and each needs the key, refuses bad input in one line, and names no other model.
  assert call("/tokenize", {"prompt": text}, key=None)[0] == 401
  assert call("/detokenize", {"tokens": [-1]})[0] == 400
  assert call("/tokenize", {"prompt": 3})[0] == 400
  assert call("/tokenize", {"prompt": text, "model": "other"})[0] == 404
