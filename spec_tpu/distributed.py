"""Multi-process jobs: joining one, and agreeing on process 0's values."""

from __future__ import annotations

import jax
import numpy as np


def init(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> None:
  """jax.distributed.initialize(); with no arguments it finds the pod/cluster by itself."""
  kw = {}
  if coordinator_address:
    kw.update(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id)
  jax.distributed.initialize(**kw)


def all_agree(ok: bool) -> bool:
  """Process 0's verdict on every process, so they all stop together (none waits forever)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
