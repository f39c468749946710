"""Meshes and shardings from a short logical-axis rule table (after t5x partitioning).

Every array dimension gets a logical name; the rules map names to mesh axes. A dimension that
does not divide evenly over its mesh axis is replicated instead (this is how KV heads replicate
when there are fewer of them than model shards).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spec_tpu.models import cache as cache_lib
from spec_tpu.models import model
from spec_tpu.models.config import ModelConfig
# The params' logical axes are declared where the params are made (models/model.py).
from spec_tpu.models.model import is_axes, layer_logical_axes, param_logical_axes  # noqa: F401

Rules = tuple[tuple[str, str | None], ...]

# Megatron-style tensor parallelism over 'model', batch over 'data'.
TENSOR_PARALLEL: Rules = (
    ("batch", "data"),
    ("layers", None),  # the stacked axis of scanned layer groups: every device holds every layer
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("ffw", "model"),
    ("lru", "model"),  # RG-LRU width (recurrent layers): replicated where it does not divide
    ("embed", None),
    ("head_dim", None),
    ("cache_seq", None),
)
# Weights replicated over 'model' (a small draft often runs best this way: no collectives).
REPLICATED: Rules = (("batch", "data"),)

RULE_SETS = {"tensor_parallel": TENSOR_PARALLEL, "replicated": REPLICATED}


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = ("data", "model"),
              devices=None) -> Mesh:
  """A mesh over all (or the given) devices; the shape must use every device exactly."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis names {tuple(axis_names)} differ in length")
  if any(s <= 0 for s in shape):
    raise ValueError(f"mesh shape {shape} must be positive")
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but there are "
                     f"{len(devices)} ({devices[0].platform}); for simulated CPU devices set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  # Auto axes: shardings inside the program are propagated by the compiler from the
  # in/out shardings given at jit, which is what a tensor-parallel decoder wants.
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # topology-unaware fallback (e.g. simulated devices on odd shapes)
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, tuple(axis_names), axis_types=auto)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Rules) -> P:
  table = dict(rules)
  used, out = set(), []
  for name, dim in zip(logical, shape):
    axis = table.get(name) if name else None
    if axis is None or axis not in mesh.shape or axis in used or dim % mesh.shape[axis]:
      out.append(None)
    else:
      used.add(axis)
      out.append(axis)
  return P(*out)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = TENSOR_PARALLEL,
                    params_shape=None) -> dict:
  """NamedShardings for the params; shapes come from params_shape (arrays or ShapeDtypeStructs)
  or, if omitted, from the config."""
  if params_shape is None:
    params_shape = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  axes = param_logical_axes(cfg)
  return jax.tree.map(lambda ax, x: NamedSharding(mesh, spec_for(ax, x.shape, mesh, rules)),
                      axes, params_shape, is_leaf=is_axes)


def cache_shardings(cache: cache_lib.Cache, mesh: Mesh,
                    rules: Rules = TENSOR_PARALLEL) -> cache_lib.Cache:
  """Caches shard by batch and (KV) heads, replicated where heads < model shards; stacked
  entries keep every layer on every device (the 'layers' axis maps to no mesh axis)."""
  return jax.tree.map(lambda ax, x: NamedSharding(mesh, spec_for(ax, x.shape, mesh, rules)),
                      cache_lib.logical_axes(cache), cache, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = TENSOR_PARALLEL):
  """Arrays whose leading dimension is the batch (tokens, lengths, per-row state)."""
  return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params, cfg: ModelConfig, mesh: Mesh, rules: Rules = TENSOR_PARALLEL):
  return jax.device_put(params, param_shardings(cfg, mesh, rules, params))
