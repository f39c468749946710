"""What every converter shares: error types, dtype names, conversion plans and their checks, the
fill of the decoder's params from a plan, tree and file helpers.

A converter (hf.py, recurrent_convert.py, gemma_lib.py) writes a plan: one Step per destination
tensor, (source name, source shape, destination path, source array -> ours). Every name, shape
and dtype of the plan is checked (check_plan) before any tensor is read; then fill_params copies
each source tensor into its slice of the decoder's params (models/model.py layout), one at a
time.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu import sharding
from spec_tpu.models import layout, model, quant
from spec_tpu.models.config import FLOAT_DTYPES, ModelConfig


class ConversionError(ValueError):
  """A checkpoint from another framework that spec_tpu cannot convert faithfully."""


class HFConversionError(ConversionError):
  """A Hugging Face checkpoint that spec_tpu cannot convert faithfully."""


class GemmaConversionError(ConversionError):
  """A gemma library checkpoint that spec_tpu cannot convert faithfully."""


def float_dtype(dtype, error: type[ConversionError] = HFConversionError) -> str:
  """The canonical name of the float dtype converted weights take, or `error`."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:  # not a dtype name at all
    name = str(dtype)
  if name not in FLOAT_DTYPES:
    raise error(f"weights convert to one of {FLOAT_DTYPES}, not {name} (the source's declared "
                "dtype unless --dtype names one; int8 weights: --quantize=int8)")
  return name


# ---------------------------------------------------------------- plans

# (source name, source shape, destination path in params, source array -> ours). A path is
# ("embed",), ("final_norm",), ("unembed",) or ("layers", i, ...) for layer i.
Step = tuple[str, tuple[int, ...], tuple, Callable[[np.ndarray], np.ndarray]]


def same(a):
  return a


def transpose(a):
  return a.T


def check_plan(plan: list[Step], names: set[str], shape_of, dtype_of, *,
               ignorable: Callable[[str], bool], error: type[ConversionError], context: str,
               unexpected_hint: str) -> None:
  """Every name the plan reads exists with the planned shape and a float dtype, and the source
  holds nothing else (but what `ignorable` allows): weights are never dropped silently.
  `context` says what the plan was made from (e.g. "config.json: 2 layers, ..."),
  `unexpected_hint` what an unexpected tensor may be."""
  wanted = {s[0] for s in plan}
  missing = [s[0] for s in plan if s[0] not in names]
  if missing:
    raise error(f"missing tensor {missing[0]!r} ({len(missing)} missing in all; {context})")
  unexpected = sorted(n for n in names - wanted if not ignorable(n))
  if unexpected:
    raise error(f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all): "
                f"the checkpoint holds weights the decoder would not use ({unexpected_hint}); "
                "refusing rather than dropping them")
  for name, want, _, _ in plan:
    found = tuple(shape_of(name))
    if found != tuple(want):
      raise error(f"tensor {name!r} has shape {found}, expected {tuple(want)} ({context})")
    if not jnp.issubdtype(dtype_of(name), jnp.floating):
      raise error(f"tensor {name!r} has dtype {dtype_of(name)}; expected floating point "
                  "(quantized checkpoints are not supported)")


def _empty_params(cfg: ModelConfig, dtype) -> dict:
  """Uninitialised numpy arrays in the params layout (np.empty: pages are only touched as the
  tensors are copied in, so memory grows with the conversion, never past the output). Float
  leaves get dtype; a quantized weight's int8 values and float32 scales keep theirs."""
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))

  def empty(path, x):
    keep = x.dtype == jnp.int8 or quant.is_scale_path(path)
    return np.empty(x.shape, x.dtype if keep else dtype)

  return jax.tree_util.tree_map_with_path(empty, shapes)


def _contracting_axes(cfg: ModelConfig):
  """plan path -> contracting axes of the (unstacked) weight there, from the logical axes the
  sharding rules use."""
  top = sharding.param_logical_axes(cfg.replace(quantize=None))

  def contracting(path):
    if path[0] == "layers":
      node = sharding.layer_logical_axes(cfg, cfg.layer_types[path[1]],
                                         kv_shared=path[1] >= cfg.num_cached_layers)
      path = path[2:]
    else:
      node = top
    for key in path:
      node = node[key]
    return quant.contracting_axes(node, path[-1])

  return contracting


def _destination(cfg: ModelConfig, params: dict, path: tuple):
  """(array, index) to copy a tensor with plan path `path` into: stacked layers take index g."""
  if path[0] != "layers":
    node, rest, index = params, path, ()
  else:
    part, j, g = layout.where(cfg, path[1])
    node, rest, index = params[part][j], path[2:], (() if g is None else (g,))
  for key in rest:
    node = node[key]
  return node, index


def fill_params(plan: list[Step], get: Callable[[str], np.ndarray], cfg: ModelConfig,
                dtype=None, release: Callable[[str], None] | None = None) -> dict:
  """The decoder's params (numpy, models/model.py layout) from a checked plan.

  The output's stacked arrays are allocated first and each source tensor is read (get), laid out
  and cast straight into its slice, one at a time, so peak memory is about one source tensor on
  top of the output; `release(name)` is called after a source tensor's last use (a converter
  holding the whole source in memory frees it as it goes). With cfg.quantize, each weight is
  quantized (quant.py, in numpy: the same values as at load time) as it is read, so the output
  allocated and held is the int8 model, never a float one.
  """
  dtype = np.dtype(jnp.dtype(dtype or cfg.dtype))
  params = _empty_params(cfg, dtype)
  contracting = _contracting_axes(cfg)
  last_use = {name: i for i, (name, _, _, _) in enumerate(plan)}
  written = set()
  for i, (name, _, path, arrange) in enumerate(plan):
    src = get(name)
    dst, at = _destination(cfg, params, path)
    if quant.is_quantized(dst):
      q = quant.quantize(arrange(src), contracting(path), xp=np)
      for key in ("w", "scale"):
        dst[key][at] = q[key]
        written.add((id(dst[key]), at))
      del q
    else:
      dst[at] = arrange(src)  # the layout change is a view; the assignment casts while copying
      written.add((id(dst), at))
    del src
    if release is not None and last_use[name] == i:
      release(name)
  # np.empty holds garbage until written: the plan must have filled every leaf and every layer.
  stacked = {"groups": cfg.num_groups, "shared_groups": cfg.num_shared_groups}
  expected = {(id(leaf), at) for key, sub in params.items() for leaf in jax.tree.leaves(sub)
              for at in ([(g,) for g in range(stacked[key])] if key in stacked else [()])}
  if written != expected:
    raise AssertionError(f"conversion plan fills {len(written)} of {len(expected)} arrays/slices")
  return params


def fill_vision(plan: list[Step], get: Callable[[str], np.ndarray], cfg: ModelConfig,
                dtype=None, release: Callable[[str], None] | None = None) -> dict:
  """params["vision"] (numpy, models/vision/siglip.py layout, float weights cast to dtype or
  cfg.dtype) from a checked plan whose paths are ("patch",), ..., or ("layers", leaf, i) for
  encoder layer i; `release` as in fill_params."""
  from spec_tpu.models.vision import siglip
  dtype = np.dtype(jnp.dtype(dtype or cfg.dtype))
  shapes = jax.eval_shape(lambda: siglip.init_params(cfg.vision, cfg.d_model, jax.random.key(0),
                                                     dtype))
  params = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), shapes)
  last_use = {name: i for i, (name, _, _, _) in enumerate(plan)}
  written = set()
  for i, (name, _, path, arrange) in enumerate(plan):
    *keys, at = path if path[0] == "layers" else path + ((),)
    node = params
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]][at] = arrange(np.asarray(get(name)))  # cast while copying
    written.add((id(node[keys[-1]]), at))
    if release is not None and last_use[name] == i:
      release(name)
  # np.empty holds garbage until written: the plan must have filled every leaf and every layer.
  expected = {(id(leaf), at) for key, sub in params.items() for leaf in jax.tree.leaves(sub)
              for at in (range(cfg.vision.num_layers) if key == "layers" else [()])}
  if written != expected:
    raise AssertionError(f"vision plan fills {len(written)} of {len(expected)} arrays/slices")
  return params


def stacked(params: Mapping, cfg: ModelConfig, stack_fn: Callable = np.stack) -> dict:
  """The decoder's params (models/model.py) from the unstacked layout {..., layers: [one dict
  per layer]}: the per-layer dicts stacked per period of the layer pattern (layout.stack)."""
  groups, remainder = layout.stack(cfg, params["layers"], stack_fn)
  out = {k: v for k, v in params.items() if k != "layers"}
  return dict(out, groups=groups, remainder=remainder)


def shortest_period(kinds: list[str]) -> tuple[str, ...]:
  """The shortest prefix whose cyclic repetition gives every layer's kind."""
  for p in range(1, len(kinds) + 1):
    if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
      return tuple(kinds[:p])
  raise AssertionError("unreachable: the full list is its own period")


# ---------------------------------------------------------------- trees and files

def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested mapping (keys joined with '/')."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def jax_tree_to_numpy(tree):
  """Nested dicts with numpy leaves (orbax restores jax or numpy arrays)."""
  if isinstance(tree, Mapping):
    return {k: jax_tree_to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def restore_orbax_tree(src: str, error: type[ConversionError], what: str) -> dict:
  """The param tree of an orbax PyTree checkpoint directory, numpy leaves; `error` naming `what`
  was expected for a directory that is not one."""
  import orbax.checkpoint as ocp  # heavy: only once there is work to do

  if not os.path.isdir(src):
    raise error(f"source {src!r} is not a directory (expected the orbax checkpoint directory "
                f"of {what})")
  try:
    tree = ocp.PyTreeCheckpointer().restore(src)
  except Exception as e:  # orbax raises many types for a directory that is not its format
    message = str(e).splitlines()[0] if str(e) else ""
    raise error(f"cannot restore {src!r} as an orbax checkpoint of {what}: "
                f"{type(e).__name__}: {message}") from None
  if not isinstance(tree, Mapping):
    raise error(f"{src!r} holds a {type(tree).__name__}, not a param tree of {what}")
  return jax_tree_to_numpy(tree)


def file_id(path: str, tag: str) -> str:
  """'<tag>:<first 12 hex digits of the file's sha256>': names a tokenizer by its file, so a
  draft and a target made with different tokenizers are told apart (sizes alone can coincide).
  spec_tpu.tokenizer names a loaded tokenizer the same way."""
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    while chunk := fh.read(8 << 20):
      h.update(chunk)
  return f"{tag}:{h.hexdigest()[:12]}"


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")  # newer checkpoints keep the chat template apart
TOKENIZER_DIR = "tokenizer"  # where a converted checkpoint keeps them


def tokenizer_id(src: str) -> str:
  """The name of the tokenizer in directory src ("sp:..." for tokenizer.model, else "json:..."
  for tokenizer.json, the file spec_tpu.tokenizer.load would read there); "" if neither."""
  for name, tag in (("tokenizer.model", "sp"), ("tokenizer.json", "json")):
    path = os.path.join(src, name)
    if os.path.isfile(path):
      return file_id(path, tag)
  return ""


def tokenizer_files(src: str, names: Iterable[str] = TOKENIZER_FILES) -> dict[str, str]:
  """Checkpoint-relative path -> source path of the tokenizer files present in src."""
  return {f"{TOKENIZER_DIR}/{n}": os.path.join(src, n) for n in names
          if os.path.isfile(os.path.join(src, n))}
