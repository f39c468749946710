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
from spec_tpu.models import layout, quant, recurrent
from spec_tpu.models.config import GLOBAL, LOCAL, RECURRENT, ModelConfig

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


def layer_logical_axes(cfg: ModelConfig, kind: str, kv_shared: bool = False) -> dict:
  """Logical axes of one (unstacked) layer's params of the given kind (kv_shared: a layer that
  reads its donor's cache, without k/v weights)."""
  if kind not in (LOCAL, GLOBAL, RECURRENT):
    raise ValueError(f"no logical axes for layer kind {kind!r}")
  ffw = {"up": ("embed", "ffw"), "down": ("ffw", "embed")}
  if cfg.ffw_activation != "gelu":
    ffw["gate"] = ("embed", "ffw")
  if cfg.ffw_bias:
    ffw.update({name + "_bias": axes[-1:] for name, axes in list(ffw.items())})
  if kind == RECURRENT:
    return {"recurrent_norm": ("embed",), "recurrent": dict(recurrent.PARAM_AXES),
            "ffw_norm": ("embed",), "ffw": ffw}
  attn = {"q": ("heads", "embed", "head_dim"), "k": ("kv_heads", "embed", "head_dim"),
          "v": ("kv_heads", "embed", "head_dim"), "o": ("heads", "head_dim", "embed")}
  if cfg.qk_norm:
    attn.update(q_norm=("head_dim",), k_norm=("head_dim",))
  if cfg.attn_out_bias:
    attn["o_bias"] = ("embed",)
  if kind == GLOBAL and cfg.global_k_eq_v:
    del attn["v"]
  if kv_shared:
    for name in ("k", "v", "k_norm"):
      attn.pop(name, None)
  layer = {"attn_norm": ("embed",), "attn": attn, "ffw_norm": ("embed",), "ffw": ffw}
  if cfg.post_attn_norm:
    layer["post_attn_norm"] = ("embed",)
  if cfg.post_ffw_norm:
    layer["post_ffw_norm"] = ("embed",)
  if cfg.ple_dim:
    layer.update(ple_gate=("embed", None), ple_out=(None, "embed"), ple_norm=("embed",))
  if cfg.layer_scalar:
    layer["layer_scalar"] = (None,)
  return layer


def param_logical_axes(cfg: ModelConfig) -> dict:
  """Logical axes of every param, in the pytree layout of spec_tpu.models.model (stacked group
  entries lead with 'layers')."""
  stacked = lambda axes: jax.tree.map(lambda ax: ("layers",) + ax, axes, is_leaf=_is_axes)  # noqa: E731
  pattern = cfg.layer_pattern
  axes = {"embed": ("vocab", "embed"), "final_norm": ("embed",),
          "groups": [stacked(layer_logical_axes(cfg, kind)) for kind in pattern]
                    if cfg.num_groups else [],
          "remainder": [layer_logical_axes(cfg, layout.remainder_kind(cfg, r))
                        for r in range(cfg.num_remainder)]}
  if cfg.kv_shared_layers:
    shared = cfg.shared_pattern
    axes["shared_groups"] = [stacked(layer_logical_axes(cfg, kind, kv_shared=True))
                             for kind in shared] if cfg.num_shared_groups else []
    axes["shared_remainder"] = [layer_logical_axes(cfg, shared[r], kv_shared=True)
                                for r in range(cfg.num_shared_remainder)]
  if cfg.ple_dim:
    axes.update(ple_embed=("vocab", None), ple_proj=("embed", None), ple_proj_norm=(None,))
  if not cfg.tie_embeddings:
    axes["unembed"] = ("embed", "vocab")
  if cfg.quantize:
    # int8 values shard as the weight; scales as its output axes (quant.py).
    axes = quant.quantized_logical_axes(axes, embed=cfg.tie_embeddings)
  return axes


def _is_axes(x):
  # Non-empty: an empty tuple is a pytree node (e.g. a cache with no remainder layers).
  return isinstance(x, tuple) and bool(x) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = TENSOR_PARALLEL,
                    params_shape=None) -> dict:
  """NamedShardings for the params; shapes come from params_shape (arrays or ShapeDtypeStructs)
  or, if omitted, from the config."""
  if params_shape is None:
    from spec_tpu.models import model
    params_shape = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  axes = param_logical_axes(cfg)
  return jax.tree.map(lambda ax, x: NamedSharding(mesh, spec_for(ax, x.shape, mesh, rules)),
                      axes, params_shape, is_leaf=_is_axes)


def cache_shardings(cache: cache_lib.Cache, mesh: Mesh,
                    rules: Rules = TENSOR_PARALLEL) -> cache_lib.Cache:
  """Caches shard by batch and (KV) heads, replicated where heads < model shards; stacked
  entries keep every layer on every device (the 'layers' axis maps to no mesh axis)."""
  return jax.tree.map(lambda ax, x: NamedSharding(mesh, spec_for(ax, x.shape, mesh, rules)),
                      cache_lib.logical_axes(cache), cache, is_leaf=_is_axes)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = TENSOR_PARALLEL):
  """Arrays whose leading dimension is the batch (tokens, lengths, per-row state)."""
  return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params, cfg: ModelConfig, mesh: Mesh, rules: Rules = TENSOR_PARALLEL):
  return jax.device_put(params, param_shardings(cfg, mesh, rules, params))
