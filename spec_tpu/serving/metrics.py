"""What the engine counts, and its Prometheus text exposition (format 0.0.4), written by hand:
a few counters, gauges and one histogram do not need a client library."""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time

# Time to first token, seconds: from a few ms (accelerator, idle) to a long queue.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


@dataclasses.dataclass
class Histogram:
  buckets: tuple[float, ...]
  counts: list = None
  total: float = 0.0
  count: int = 0

  def __post_init__(self):
    self.counts = [0] * len(self.buckets)

  def observe(self, x: float) -> None:
    for i, b in enumerate(self.buckets):
      if x <= b:
        self.counts[i] += 1
    self.total += x
    self.count += 1


class EngineMetrics:
  """Counters the engine thread updates; `snapshot()` and `prometheus()` read them from any
  thread."""

  def __init__(self):
    self._lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    with self._lock:
      self.generated_tokens = 0
      self.prompt_tokens = 0
      self.requests = collections.Counter()  # by finish reason
      self.accepted = 0
      self.judged = 0
      self.steps = 0
      self.rounds = 0
      self.ttft = Histogram(TTFT_BUCKETS)
      self._recent = collections.deque()  # (time, tokens) of the last RATE_WINDOW_S
      self.gauges = {}

  def add_tokens(self, n: int, now: float | None = None) -> None:
    now = time.perf_counter() if now is None else now
    with self._lock:
      self.generated_tokens += n
      self._recent.append((now, n))

  def add(self, **counts) -> None:
    with self._lock:
      for name, n in counts.items():
        setattr(self, name, getattr(self, name) + n)

  def finished(self, reason: str, ttft: float | None) -> None:
    with self._lock:
      self.requests[reason] += 1
      if ttft is not None and math.isfinite(ttft):
        self.ttft.observe(ttft)

  def set(self, **gauges) -> None:
    with self._lock:
      self.gauges.update(gauges)

  def tokens_per_second(self, now: float | None = None) -> float:
    now = time.perf_counter() if now is None else now
    with self._lock:
      while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
        self._recent.popleft()
      return sum(n for _, n in self._recent) / RATE_WINDOW_S

  def snapshot(self) -> dict:
    tps = self.tokens_per_second()
    with self._lock:
      return dict(
          generated_tokens=self.generated_tokens, prompt_tokens=self.prompt_tokens,
          requests=dict(self.requests), accepted=self.accepted, judged=self.judged,
          acceptance_rate=self.accepted / self.judged if self.judged else float("nan"),
          steps=self.steps, rounds=self.rounds, tokens_per_second=tps,
          ttft_count=self.ttft.count,
          ttft_mean_s=self.ttft.total / self.ttft.count if self.ttft.count else float("nan"),
          **self.gauges)

  def prometheus(self, prefix: str = "spec_tpu") -> str:
    """The Prometheus text format: HELP and TYPE lines, then samples."""
    tps = self.tokens_per_second()
    lines = []

    def metric(name, kind, help_text, samples):
      lines.append(f"# HELP {prefix}_{name} {help_text}")
      lines.append(f"# TYPE {prefix}_{name} {kind}")
      for suffix, labels, value in samples:
        label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        lines.append(f"{prefix}_{name}{suffix}{label} {_number(value)}")

    with self._lock:
      g = self.gauges
      metric("generated_tokens_total", "counter", "Tokens generated.",
             [("", {}, self.generated_tokens)])
      metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.",
             [("", {}, self.prompt_tokens)])
      metric("requests_total", "counter", "Finished requests by finish reason.",
             [("", {"finish_reason": r}, n) for r, n in sorted(self.requests.items())]
             or [("", {"finish_reason": "stop"}, 0)])
      metric("tokens_per_second", "gauge",
             f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", [("", {}, tps)])
      metric("queue_length", "gauge", "Requests waiting for a slot.",
             [("", {}, g.get("queue_length", 0))])
      metric("active_slots", "gauge", "Slots holding a running request.",
             [("", {}, g.get("active_slots", 0))])
      metric("slots", "gauge", "Slots (the batch).", [("", {}, g.get("slots", 0))])
      metric("draft_tokens_accepted_total", "counter", "Draft tokens accepted.",
             [("", {}, self.accepted)])
      metric("draft_tokens_judged_total", "counter", "Draft tokens judged by the target.",
             [("", {}, self.judged)])
      metric("acceptance_rate", "gauge", "Accepted / judged draft tokens since start.",
             [("", {}, self.accepted / self.judged if self.judged else float("nan"))])
      metric("k", "gauge", "Draft tokens per round in use (0 = speculation off).",
             [("", {}, g.get("k", 0))])
      metric("rounds_per_step", "gauge", "Speculative rounds per device call (N).",
             [("", {}, g.get("rounds_per_step", 0))])
      metric("draft_cost_ratio", "gauge", "Measured c: a draft step's cost in target steps.",
             [("", {}, g.get("c", float("nan")))])
      metric("expected_speedup", "gauge", "The K policy's estimated speedup over K = 0.",
             [("", {}, g.get("expected_speedup", float("nan")))])
      if "grammar_tables" in g:  # an engine with structured output
        metric("grammar_tables", "gauge", "Grammar tables on device (one compiled grammar "
               "each, shared by the slots using it).", [("", {}, g["grammar_tables"])])
        metric("grammar_tables_in_use", "gauge", "Grammar tables a running request uses.",
               [("", {}, g["grammar_tables_in_use"])])
        metric("grammar_table_writes_total", "counter", "Grammars written to the device.",
               [("", {}, g["grammar_table_writes"])])
        metric("grammar_pool_bytes", "gauge", "Device bytes of the grammar pool.",
               [("", {}, g["grammar_pool_bytes"])])
      h = self.ttft
      samples = [("_bucket", {"le": _number(b)}, c) for b, c in zip(h.buckets, h.counts)]
      samples += [("_bucket", {"le": "+Inf"}, h.count), ("_sum", {}, h.total),
                  ("_count", {}, h.count)]
      metric("time_to_first_token_seconds", "histogram",
             "Submission to first token, per request.", samples)
    return "\n".join(lines) + "\n"


def _number(x) -> str:
  x = float(x)
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "+Inf" if x > 0 else "-Inf"
  return repr(int(x)) if x.is_integer() and abs(x) < 2 ** 53 else repr(x)
