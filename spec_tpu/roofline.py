"""Roofline estimates of TPU step times from XLA's cost analysis of compiled programs.

An ESTIMATE, not a measurement. Per device, one compiled program (e.g. one target step) takes

    max(HBM bytes / HBM bandwidth, flops / peak bf16 flops)            the roofline
  + collectives * COLLECTIVE_LATENCY_S + collective bytes / ICI bandwidth

Flops and the collectives (all-reduce, all-gather, ...) are what the TPU compiler's cost
analysis and compiled HLO give for the program as compiled for that topology. HBM bytes are the
per-device bytes of the arrays a step must read (weights, every KV cache slot) from their
shapes and shardings: XLA:TPU's own "bytes accessed" sums the operands and results of every
op, fused float32 temporaries and copies to on-chip memory included, so it overstates HBM
traffic (4x for one Chinchilla 70B layer at batch 1) and does not add up across layers; it is
reported beside the estimate, not used in it. Left out: kernel launch and loop overheads, time
spent neither at full bandwidth nor at full flops (small matmuls, softmax, the sampling and
acceptance code between model calls), overlap of collectives with compute, and host work. So it
is closer to a lower bound for a well-tuned implementation than to a prediction; the collective
latency is an assumption (no figure is published), shown as its own term.

Chip figures: Cloud TPU documentation, system architecture tables of v4, v5e, v5p and v6e
(cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e), per chip. A JAX device is a chip, or
one TensorCore of a two-core chip when the topology exposes cores (v4 topologies from libtpu do:
16 devices on v4:2x2x2's 8 chips); a device then gets its share of the chip.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1 << 30
COLLECTIVE_LATENCY_S = 10e-6  # assumed fixed cost per collective (not published; see above)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes_per_s: float    # per chip
  bf16_flops_per_s: float   # peak, per chip
  ici_bytes_per_s: float    # bidirectional, per chip
  hbm_bytes: float          # capacity per chip
  cores: int                # TensorCores per chip


# Keyed by jax's device_kind.
CHIPS = {
    # v4: ICI is not in the Cloud table; 6 links of 50 GB/s each way (TPU v4 paper, ISCA 2023).
    "TPU v4": Chip("v4", 1200e9, 275e12, 600e9, 32 * GIB, 2),
    "TPU v5 lite": Chip("v5e", 819e9, 197e12, 400e9, 16 * GIB, 1),
    "TPU v5": Chip("v5p", 2765e9, 459e12, 1200e9, 95 * GIB, 2),
    "TPU v6 lite": Chip("v6e", 1640e9, 918e12, 800e9, 32 * GIB, 1),
}


def device_share(device) -> float:
  """The fraction of its chip a jax device is (1, or 1/2 for one core of a two-core chip)."""
  chip = CHIPS[device.device_kind]
  return min(1.0, getattr(device, "num_cores", chip.cores) / chip.cores)


@dataclasses.dataclass(frozen=True)
class Cost:
  """What one run of a compiled program costs one device."""
  flops: float             # XLA's cost analysis
  xla_bytes: float         # XLA's "bytes accessed" (reported only: see the module docstring;
                           # of the one-group program after `extrapolate`)
  collectives: int         # in the compiled HLO
  collective_bytes: float
  hbm_bytes: float = 0.0   # arrays the step must read, from shapes and shardings

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  def __sub__(self, other: "Cost") -> "Cost":
    return self + other.scaled(-1)

  def scaled(self, f: float) -> "Cost":
    return Cost(*(a * f for a in dataclasses.astuple(self)))


_COLLECTIVE = re.compile(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*?\s(all-reduce|all-gather|reduce-scatter|"
                         r"collective-permute|all-to-all)(?:-start)?\(")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo_text: str) -> tuple[int, float]:
  """(count, bytes) of the collectives in compiled HLO text (first result of async starts).
  All-reduces count twice their size (a ring sends and receives each byte twice)."""
  count, total = 0, 0.0
  for dtype, dims, op in _COLLECTIVE.findall(hlo_text):
    size = math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 4)
    count += 1
    total += size * (2 if op == "all-reduce" else 1)
  return count, total


def program_cost(compiled) -> Cost:
  """Cost of a compiled program with no loops over layers (while bodies count once in XLA's
  cost analysis, so scanned programs need `extrapolate`)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  n, nbytes = collectives(compiled.as_text())
  return Cost(flops=float(analysis.get("flops", 0.0)),
              xla_bytes=float(analysis.get("bytes accessed", 0.0)), collectives=n,
              collective_bytes=nbytes)


def extrapolate(one_group: Cost, two_groups: Cost, groups: int) -> Cost:
  """A model of `groups` identical layer groups from unrolled programs of one and of two: what
  one more group adds, times the groups past the first (exact when groups are identical).
  XLA's bytes accessed stay the one-group program's: they do not add up across layers."""
  total = one_group + (two_groups - one_group).scaled(groups - 1)
  return dataclasses.replace(total, xla_bytes=one_group.xla_bytes)


def seconds(cost: Cost, chip: Chip, share: float = 1.0,
            latency: float = COLLECTIVE_LATENCY_S) -> dict:
  """Estimated seconds of one run on one device (`share` of `chip`), with its parts."""
  memory = cost.hbm_bytes / (chip.hbm_bytes_per_s * share)
  compute = cost.flops / (chip.bf16_flops_per_s * share)
  # One direction of the device's share of the links carries its part of each collective.
  comm = cost.collectives * latency + cost.collective_bytes / (chip.ici_bytes_per_s / 2 * share)
  return dict(memory=memory, compute=compute, collectives=comm,
              roofline=max(memory, compute), total=max(memory, compute) + comm)


def speculative(target_step_s: float, verify_s: float, draft_step_s: float, k: int,
                acceptance: float) -> dict:
  """A round of K draft steps and one verification of K+1 tokens, at acceptance rate a:
  tokens per round (1 - a^(K+1)) / (1 - a) (Leviathan et al. 2023), ms per token, and the
  speedup over one target step per token. Also the paper's formula with c = draft / target
  step, which assumes verification costs one target step."""
  a = acceptance
  tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
  round_s = k * draft_step_s + verify_s
  c = draft_step_s / target_step_s
  return dict(round_s=round_s, tokens_per_round=tokens, s_per_token=round_s / tokens,
              speedup=tokens * target_step_s / round_s, c=c,
              formula_speedup=tokens / (k * c + 1))
