"""Orbax checkpoints of a params pytree plus its ModelConfig (or a Gemma 4 assistant drafter's
AssistantConfig), with an integrity manifest.

Layout of a checkpoint directory:
    params/               orbax StandardCheckpointer output (arrays, sharded writes by every process)
    spec_tpu_config.json  {"format", "version", "config": ModelConfig.to_dict(), "extra": {...}}
    manifest.json         sha256 and size of every other file; written LAST

Format versions (of the params pytree; the files are the same):
  1  "layers": a list of num_layers per-layer dicts; attention projections q, k, v are d h e
  2  "groups" (stacked per period of the layer pattern) and "remainder" (spec_tpu/models/
     layout.py); q, k, v are heads-major, h d e (spec_tpu/models/model.py says why)
Version 1 checkpoints still load: restore reads them in the old layout (sharded straight into
each layer's part of the requested shardings) and converts them leaf by leaf, freeing each old
leaf as it goes, so memory stays near one copy of the weights.

Why a manifest: orbax CRC-checks its index but not chunk data, so damaged bytes can restore as
silently wrong weights. Why a temporary sibling + rename: a save that dies half-way must never leave
a directory that looks complete. The manifest is written last inside the temporary directory and the
rename is atomic, so "manifest present and matching" means "the save finished and nothing changed".

Paths are local or shared POSIX filesystems (os.rename must be atomic there); not gs:// URLs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spec_tpu.models import config as config_lib
from spec_tpu.models import model
from spec_tpu.models import layout
from spec_tpu.models import quant
from spec_tpu.models.config import ModelConfig

FORMAT = "spec_tpu.checkpoint"
VERSION = 2  # params in the grouped layout (module docstring); 1 = a list of layers
PARAMS_DIR = "params"
CONFIG_FILE = "spec_tpu_config.json"
MANIFEST_FILE = "manifest.json"
_CHUNK = 8 << 20  # hash in 8 MiB reads: memory stays flat however large a file is


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, damaged, or does not fit the request."""


def _err(path, problem: str) -> CheckpointError:
  return CheckpointError(f"checkpoint {os.fspath(path)!r}: {problem}")


# ---------------------------------------------------------------- integrity manifest

def _hash_file(path: str) -> tuple[str, int]:
  h, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return h.hexdigest(), size


def _list_files(root: str) -> list[str]:
  """Relative paths of every file under root, manifest excluded, sorted for a stable manifest."""
  out = []
  for dirpath, _, files in os.walk(root):
    for name in files:
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      if rel != MANIFEST_FILE:
        out.append(rel.replace(os.sep, "/"))
  return sorted(out)


def _hash_all(root: str, rels: list[str]) -> dict[str, tuple[str, int]]:
  # hashlib releases the GIL on large buffers, so threads overlap reading and hashing many files.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    digests = pool.map(lambda r: _hash_file(os.path.join(root, r)), rels)
    return dict(zip(rels, digests))


def _write_manifest(root: str) -> None:
  files = {rel: {"sha256": d, "size": s} for rel, (d, s) in _hash_all(root, _list_files(root)).items()}
  _write_json(os.path.join(root, MANIFEST_FILE),
              {"format": FORMAT, "version": VERSION, "files": files})


def _read_manifest(path: str) -> dict[str, dict[str, Any]]:
  mpath = os.path.join(path, MANIFEST_FILE)
  if not os.path.isdir(path):
    raise _err(path, "no such directory")
  if not os.path.isfile(mpath):
    raise _err(path, f"no {MANIFEST_FILE}: incomplete or not a spec_tpu checkpoint")
  try:
    with open(mpath) as f:
      manifest = json.load(f)
    files = manifest["files"]
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
      raise ValueError(f"format {manifest.get('format')!r}")
  except (ValueError, KeyError, TypeError) as e:
    raise _err(path, f"{MANIFEST_FILE} is unreadable ({e}): incomplete or not a spec_tpu "
               "checkpoint") from None
  return files


def fingerprint(path) -> str:
  """Names a checkpoint's content: the sha256 of its manifest, which holds the sha256 of every
  other file. Cheap (one small file) and the same wherever the directory is moved."""
  path = os.fspath(path)
  _read_manifest(path)
  digest, _ = _hash_file(os.path.join(path, MANIFEST_FILE))
  return "sha256:" + digest[:16]


def verify(path) -> None:
  """Checks every file against the manifest; raises CheckpointError naming the first bad file."""
  _check_files(os.fspath(path))


def _check_files(path: str) -> None:
  expected = _read_manifest(path)
  present = set(_list_files(path))
  if missing := sorted(set(expected) - present):
    raise _err(path, f"file {missing[0]!r} listed in the manifest is missing "
               f"({len(missing)} missing in all)")
  if unexpected := sorted(present - set(expected)):
    raise _err(path, f"file {unexpected[0]!r} is not in the manifest (added after the save?)")
  # Sizes first: cheap, and a truncated file gets the plainer message.
  for rel, want in expected.items():
    size = os.path.getsize(os.path.join(path, rel))
    if size != want["size"]:
      raise _err(path, f"file {rel!r} has {size} bytes, manifest says {want['size']} "
                 "(truncated or damaged)")
  for rel, (digest, _) in _hash_all(path, sorted(expected)).items():
    if digest != expected[rel]["sha256"]:
      raise _err(path, f"file {rel!r} fails its sha256 check (damaged data)")


# ---------------------------------------------------------------- multi-host helpers

def _is_primary() -> bool:
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"spec_tpu_checkpoint_{name}")


def _all_agree(ok: bool) -> bool:
  """Process 0's verdict, shared with every process so they all raise or all go on together."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)  # makes a rename durable, not just visible
  finally:
    os.close(fd)


# ---------------------------------------------------------------- save

def _as_arrays(params):
  def conv(x):
    if isinstance(x, jax.Array):
      return x
    if isinstance(x, (np.ndarray, np.generic, int, float)):
      return jnp.asarray(x)
    raise TypeError(f"params leaves must be arrays, got {type(x).__name__}")
  return jax.tree.map(conv, params)


def check_destination(path, overwrite: bool = False, source=None) -> str:
  """Raises CheckpointError unless `path` can receive a checkpoint: absent (or overwrite), its
  parent an existing, writable directory, and (a conversion's) `source` neither it nor inside
  it. Cheap: callers run it before reading any weights, so a conversion or a training run is
  not lost to a destination it cannot write. Returns the absolute path."""
  path = os.path.abspath(os.fspath(path))
  if source is not None:
    source = os.path.abspath(os.fspath(source))
    if source == path or source.startswith(path + os.sep):
      raise _err(path, f"the destination would replace the source {source!r}")
  if os.path.exists(path) and not overwrite:
    raise _err(path, "destination exists; pass overwrite=True (--overwrite) to replace it")
  if os.path.exists(path) and not os.path.isdir(path):
    raise _err(path, "destination is a file, not a checkpoint directory")
  parent = os.path.dirname(path)
  probe = parent
  while not os.path.exists(probe):  # save() creates missing parents (os.makedirs)
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise _err(path, f"{probe!r} is a file, not a directory: the checkpoint cannot go under it")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise _err(path, f"directory {probe!r} is not writable")
  return path


def save(path, params, config: ModelConfig, *, extra: dict | None = None,
         overwrite: bool = False, files: dict[str, str] | None = None) -> None:
  """Saves params (a pytree of jax arrays, possibly sharded) and config to directory `path`.

  Every process must call this (orbax writes each process's shards); process 0 alone writes the
  config and manifest and renames. `extra` is any JSON-serialisable dict (e.g. conversion source).
  `files` maps relative paths inside the checkpoint to files to copy in (e.g. tokenizer files);
  they are copied before the manifest is written, so they are hash-checked with the weights.
  """
  path = check_destination(path, overwrite)
  if not isinstance(config, (ModelConfig, config_lib.AssistantConfig)):
    raise _err(path, f"config must be a ModelConfig or an AssistantConfig, got "
               f"{type(config).__name__}")
  try:
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "extra": extra or {}}
    json.dumps(meta)
  except TypeError as e:
    raise _err(path, f"extra must be JSON-serialisable: {e}") from None
  try:
    params = _as_arrays(params)
  except TypeError as e:
    raise _err(path, str(e)) from None

  # Deterministic name: every host must agree on it without talking. A leftover from a dead save
  # is garbage by construction (it never got renamed), so it is safe to delete.
  parent, base = os.path.split(path)
  tmp = os.path.join(parent, f".{base}.spec_tpu-tmp")
  if _is_primary():
    shutil.rmtree(tmp, ignore_errors=True)
    try:
      os.makedirs(tmp)
    except OSError as e:
      raise _err(path, f"cannot create {tmp!r}: {e.strerror or e}") from None
  _barrier("tmp_ready")

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    ckptr.wait_until_finished()  # async by default; also a cross-process barrier
  _barrier("arrays_written")

  if _is_primary():
    _write_json(os.path.join(tmp, CONFIG_FILE), meta)
    for rel, src in (files or {}).items():
      dst = os.path.normpath(os.path.join(tmp, rel))
      if not dst.startswith(tmp + os.sep) or rel.split("/")[0] in (PARAMS_DIR, CONFIG_FILE):
        raise _err(path, f"extra file path {rel!r} must stay inside the checkpoint")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
    _write_manifest(tmp)  # last: its presence marks a complete checkpoint
    if os.path.exists(path):
      # rename() cannot replace a non-empty directory: move the old one aside, then drop it.
      old = os.path.join(parent, f".{base}.spec_tpu-old")
      shutil.rmtree(old, ignore_errors=True)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
    _fsync_dir(parent)
  _barrier("renamed")


# ---------------------------------------------------------------- load

def _read_meta(path: str, manifest: dict[str, dict[str, Any]]) -> dict[str, Any]:
  cpath = os.path.join(path, CONFIG_FILE)
  if CONFIG_FILE not in manifest or not os.path.isfile(cpath):
    raise _err(path, f"no {CONFIG_FILE}: not a spec_tpu checkpoint")
  with open(cpath, "rb") as f:
    raw = f.read()
  if hashlib.sha256(raw).hexdigest() != manifest[CONFIG_FILE]["sha256"]:
    raise _err(path, f"file {CONFIG_FILE!r} fails its sha256 check (damaged data)")
  return json.loads(raw)


def load_config(path) -> ModelConfig:
  """The ModelConfig (or AssistantConfig) stored with a checkpoint (checks the config file,
  not the arrays)."""
  path = os.fspath(path)
  return _config(path, _read_meta(path, _read_manifest(path)))


def _config(path: str, meta: dict) -> ModelConfig:
  try:
    return config_lib.config_from_dict(meta["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise _err(path, f"stored config is invalid: {e}") from None


def load_extra(path) -> dict:
  """The `extra` dict given to save()."""
  path = os.fspath(path)
  return _read_meta(path, _read_manifest(path)).get("extra", {})


# ---------------------------------------------------------------- config against arrays
#
# The stored ModelConfig decides how the weights are used (head splits, norms, RoPE, ...), so a
# config that does not describe the arrays (edited after the save, or copied from another model)
# must not load. The shapes a config implies come from the model itself: jax.eval_shape of
# model.init_params, compared leaf by leaf with the stored array metadata. Nothing here knows the
# params layout; a mismatch is traced back to config fields by changing one field at a time and
# seeing which leaves and axes move.

# Fields that name or type things but never set a shape.
_NOT_SHAPE_FIELDS = ("name", "tokenizer", "dtype")
_MAX_REPORTED = 4


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): tuple(int(d) for d in x.shape) for p, x in leaves}


def implied_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Leaf path -> the shape model.init_params gives it under `config` (nothing allocated)."""
  return _shapes(jax.eval_shape(lambda: model.init_params(config, jax.random.key(0))))


def _one_field_variants(config: ModelConfig):
  """(field, config with that field alone changed) for every field that may set a shape."""
  if isinstance(config, config_lib.AssistantConfig):  # its layers' fields, and its own
    yield "backbone_d_model", config.replace(backbone_d_model=config.backbone_d_model + 1)
    for name, layers in _one_field_variants(config.layers):
      try:
        yield name, config.replace(layers=layers)
      except ValueError:
        continue
    return
  presets = list(config_lib.PRESETS.values())
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name in _NOT_SHAPE_FIELDS or isinstance(value, float):
      continue
    if isinstance(value, bool):
      candidates = [not value]
    elif isinstance(value, int):
      candidates = [value + 1, 2 * value, value - 1, value // 2]
    else:  # strings, tuples, optional values: values the presets use
      candidates = [getattr(p, field.name) for p in presets]
    for candidate in candidates:
      if candidate == value or isinstance(candidate, float):
        continue
      try:
        yield field.name, config.replace(**{field.name: candidate})
        break
      except (ValueError, TypeError):  # not a valid config on its own: try the next value
        continue


def _fields_setting(config: ModelConfig, implied: dict, variants: dict, leaf: str,
                    axis: int | None) -> list[str]:
  """Config fields whose change moves this leaf's axis (or, axis None, its presence)."""
  found = []
  for name, shapes in variants.items():
    if axis is None:
      moved = (leaf in shapes) != (leaf in implied)
    else:
      moved = (leaf in shapes and len(shapes[leaf]) == len(implied[leaf])
               and shapes[leaf][axis] != implied[leaf][axis])
    if moved:
      found.append(name)
  return found


def _value(config, field: str):
  if isinstance(config, config_lib.AssistantConfig) and not hasattr(config, field):
    return getattr(config.layers, field)
  return getattr(config, field)


def check_arrays(path, config: ModelConfig, stored_tree) -> None:
  """Raises CheckpointError, naming the config fields at fault, unless every leaf of the stored
  params has exactly the shape `config` implies (and no leaf is missing or extra)."""
  path = os.fspath(path)
  stored, implied = _shapes(stored_tree), implied_shapes(config)
  if stored == implied:
    return
  variants = {name: implied_shapes(v) for name, v in _one_field_variants(config)}
  claims = {}     # field -> the value the arrays imply for it (when a dimension equals the field)
  others = []     # what cannot be put as "field X should be Y"
  unmatched = {}  # (where, fields) -> leaves present on one side only
  for leaf in sorted(set(stored) | set(implied)):
    if leaf not in stored or leaf not in implied:
      where = "missing from the arrays" if leaf not in stored else "in the arrays, not implied"
      fields = tuple(_fields_setting(config, implied, variants, leaf, None))
      unmatched.setdefault((where, fields), []).append(leaf)
      continue
    have, want = stored[leaf], implied[leaf]
    if have == want:
      continue
    if len(have) != len(want):
      others.append(f"params{leaf} has shape {have}, the config implies {want}")
      continue
    for axis, (h, w) in enumerate(zip(have, want)):
      if h == w:
        continue
      fields = _fields_setting(config, implied, variants, leaf, axis)
      direct = [f for f in fields if _value(config, f) == w]
      if len(direct) == 1 and claims.get(direct[0], h) == h:
        claims[direct[0]] = h
      else:
        others.append(f"params{leaf} has shape {have}, the config implies {want}"
                      + (f" (axis {axis} is set by {', '.join(fields)})" if fields else ""))
  for (where, fields), leaves in unmatched.items():
    some = f"params{leaves[0]}" + (f" and {len(leaves) - 1} more leaves" if len(leaves) > 1
                                   else "")
    others.append(f"{some} {'are' if len(leaves) > 1 else 'is'} {where}"
                  + (f" (set by {', '.join(fields)})" if fields else ""))
  phrases = [f"{f} is {_value(config, f)} in the config but {h} in the arrays"
             for f, h in claims.items()] + others
  more = len(phrases) - _MAX_REPORTED
  raise _err(path, "its stored config does not match its arrays: "
             + "; ".join(phrases[:_MAX_REPORTED]) + (f"; and {more} more" if more > 0 else "")
             + " (config edited after the save, or arrays of another model)")


def _abstract_tree(path: str, metadata_tree, shardings, dtype):
  """ShapeDtypeStruct leaves carrying the target shardings: orbax then reads each shard in place."""
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, metadata_tree)

  def leaf(path, meta, sharding):
    if not isinstance(sharding, jax.sharding.Sharding):
      raise TypeError(f"a leaf is {type(sharding).__name__}, not a jax.sharding.Sharding")
    # Cast floats only: integer leaves (e.g. int8 weights) must keep their exact values, and so
    # must the float32 scales of int8 weights (they are part of the quantized model).
    cast = (dtype is not None and jnp.issubdtype(meta.dtype, jnp.floating)
            and not quant.is_scale_path(path))
    return jax.ShapeDtypeStruct(tuple(meta.shape), dtype if cast else meta.dtype,
                                sharding=sharding)

  try:
    return jax.tree_util.tree_map_with_path(leaf, metadata_tree, shardings)
  except (ValueError, TypeError) as e:
    raise _err(path, "shardings do not match the stored params tree "
               f"{jax.tree.structure(metadata_tree)}: {e}") from None


def _verified_meta(path: str, verify: bool) -> dict:
  """The checkpoint's metadata, once process 0 has checked its files against the manifest
  (verify) or read the manifest, and every process agrees it may go on."""
  problem = None
  if _is_primary():
    try:
      (_check_files if verify else _read_manifest)(path)
    except CheckpointError as e:
      problem = e
  if not _all_agree(problem is None):
    raise problem or _err(path, "process 0 found the checkpoint damaged or incomplete")
  return _read_meta(path, _read_manifest(path))


def restore(path, *, shardings=None, dtype=None, verify: bool = True,
            check_config: bool = True):
  """Returns (params, config). Arrays are read straight into `shardings`, nothing gathered.

  shardings: None (first local device), one Sharding for every leaf, or a pytree of Shardings with
  the structure of the params in the current layout (sharding.param_shardings), whatever the
  version and mesh they were saved with.
  dtype: optional cast of floating-point leaves. verify: check the manifest hashes first (process 0
  reads every file once; skip only for checkpoints just verified). check_config: the stored
  config must imply exactly the stored array shapes (check_arrays); off only for params trees
  that are not a model's.
  """
  path = os.path.abspath(os.fspath(path))
  try:
    dtype = None if dtype is None else jnp.dtype(dtype)
  except TypeError as e:
    raise _err(path, f"bad dtype {dtype!r}: {e}") from None
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise _err(path, f"bad dtype {dtype.name!r}: float leaves cast to a float type (int8 weights: "
               "quantize)")
  meta = _verified_meta(path, verify)
  config, version = _config(path, meta), meta.get("version")
  if version not in (1, VERSION):
    raise _err(path, f"format version {version!r} is not one this spec_tpu reads (1..{VERSION}); "
               "a newer spec_tpu wrote it?")

  params_dir = os.path.join(path, PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      step_meta = ckptr.metadata(params_dir)
    except (FileNotFoundError, ValueError) as e:
      raise _err(path, f"orbax cannot read the params metadata: {e}") from None
    item = getattr(step_meta, "item_metadata", step_meta)
    tree = getattr(item, "tree", item)  # the plain nested dicts/lists, as saved
    v1 = version == 1 and isinstance(tree, dict) and isinstance(tree.get("layers"), list)
    if check_config and not v1:
      check_arrays(path, config, tree)
    stored_shardings = _v1_shardings(config, shardings) if v1 else shardings
    abstract = _abstract_tree(path, tree, stored_shardings, dtype)
    params = ckptr.restore(params_dir, abstract)
  if v1:
    params = _v1_to_grouped(config, params, shardings)
    if check_config:  # version 1 stored another layout: its shapes are checked once converted
      check_arrays(path, config, params)
  return params, config


def restore_transformed(path, *, shardings, transform, chunk_bytes: int = 1 << 30,
                        verify: bool = True):
  """restore() that hands each leaf to transform(keypath, array) as soon as it is read and keeps
  only the result: (params, config). Leaves are read a few at a time (up to chunk_bytes of this
  process's shards per read), so memory holds the transformed params plus one chunk of stored
  ones, never the whole stored model. Used to quantize a float checkpoint while loading it:
  a bfloat16 70B does not fit 8 v5e chips, its int8 form does.

  shardings: a pytree of Shardings with the stored params' structure (where each stored leaf is
  read to). transform must keep a leaf's place in the tree (it may replace it with a subtree).
  """
  path = os.path.abspath(os.fspath(path))
  meta = _verified_meta(path, verify)
  config = _config(path, meta)
  if meta.get("version") != VERSION:
    # An older layout is regrouped by restore() (leaf by leaf, about one copy of the model);
    # the transform then runs on the result, freeing each stored leaf as it goes.
    params, config = restore(path, shardings=shardings, verify=False)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    del params
    return jax.tree_util.tree_unflatten(treedef, [transform(p, x) for p, x in flat]), config
  params_dir = os.path.join(path, PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      step_meta = ckptr.metadata(params_dir)
    except (FileNotFoundError, ValueError) as e:
      raise _err(path, f"orbax cannot read the params metadata: {e}") from None
  item = getattr(step_meta, "item_metadata", step_meta)
  tree = getattr(item, "tree", item)
  abstract = _abstract_tree(path, tree, shardings, None)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  chunks, size = [[]], 0
  for i, (_, x) in enumerate(flat):
    n = x.sharding.shard_shape(x.shape)
    n = int(np.prod(n)) * np.dtype(x.dtype).itemsize
    if chunks[-1] and size + n > chunk_bytes:
      chunks.append([])
      size = 0
    chunks[-1].append(i)
    size += n
  out = [None] * len(flat)
  handler = ocp.PyTreeCheckpointHandler()
  with ocp.Checkpointer(handler) as ckptr:
    for chunk in chunks:
      wanted = set(chunk)
      item = [x if i in wanted else ocp.PLACEHOLDER for i, (_, x) in enumerate(flat)]
      args = [ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype) if i in wanted
              else ocp.PLACEHOLDER for i, (_, x) in enumerate(flat)]
      restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=jax.tree_util.tree_unflatten(treedef, item),
          restore_args=jax.tree_util.tree_unflatten(treedef, args)))
      leaves = jax.tree_util.tree_leaves(restored, is_leaf=lambda x: x is ocp.PLACEHOLDER)
      for i in chunk:
        out[i] = transform(flat[i][0], leaves[i])
      del restored, leaves
  return jax.tree_util.tree_unflatten(treedef, out), config


# ---------------------------------------------------------------- version 1 (list of layers)

_V1_HEADS_MINOR = ("q", "k", "v")  # version 1 stored these d h e; now h d e


def _is_v1_projection(path) -> bool:
  keys = tuple(getattr(p, "key", None) for p in path)
  return len(keys) == 2 and keys[0] == "attn" and keys[1] in _V1_HEADS_MINOR


def _v1_leaf_sharding(path, sharding, stacked: bool):
  """The sharding of one layer's version-1 leaf, from the current layout's (stacked) one."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * 4  # padded: a spec may omit trailing axes
  if stacked:
    spec = spec[1:]
  if _is_v1_projection(path):
    spec[0], spec[1] = spec[1], spec[0]  # h d e -> d h e
  while spec and spec[-1] is None:
    spec.pop()
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _v1_shardings(config: ModelConfig, shardings):
  """The requested (current-layout) shardings rearranged as the version-1 tree."""
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  old = {k: v for k, v in shardings.items() if k not in ("groups", "remainder")}
  old["layers"] = []
  for i in range(config.num_layers):
    part, j, g = layout.where(config, i)
    old["layers"].append(jax.tree_util.tree_map_with_path(
        lambda path, sh, stacked=g is not None: _v1_leaf_sharding(path, sh, stacked),
        shardings[part][j]))
  return old


def _v1_to_grouped(config: ModelConfig, params: dict, shardings) -> dict:
  """Version-1 params (restored) in the current layout. Converts leaf by leaf and deletes each
  old leaf once converted: the extra memory is one new leaf, not a second copy of the model."""
  layers = params.pop("layers")
  flat = [jax.tree_util.tree_flatten_with_path(lp) for lp in layers]

  def convert(arrays, path, target, stacked: bool):
    if not stacked and not _is_v1_projection(path):
      return arrays[0]  # unchanged, and already restored onto its sharding

    def fn(*xs):
      x = jnp.stack(xs) if stacked else xs[0]
      return jnp.swapaxes(x, -3, -2) if _is_v1_projection(path) else x  # d h e -> h d e

    new = (jax.jit(fn, out_shardings=target)(*arrays)
           if isinstance(target, jax.sharding.Sharding) else fn(*arrays))
    for a in arrays:
      a.delete()
    return new

  def targets(part: str, idx: int, num_leaves: int):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
      return [shardings] * num_leaves
    return jax.tree.leaves(shardings[part][idx])

  p, n = len(config.layer_pattern), config.num_groups * len(config.layer_pattern)
  groups = []
  for j in range(p if config.num_groups else 0):
    members = list(range(j, n, p))
    paths = [path for path, _ in flat[j][0]]
    tgt = targets("groups", j, len(paths))
    leaves = [convert([flat[i][0][m][1] for i in members], paths[m], tgt[m], stacked=True)
              for m in range(len(paths))]
    groups.append(jax.tree.unflatten(jax.tree.structure(layers[j]), leaves))
  remainder = []
  for r, i in enumerate(range(n, config.num_layers)):
    tgt = targets("remainder", r, len(flat[i][0]))
    leaves = [convert([leaf], path, tgt[m], stacked=False)
              for m, (path, leaf) in enumerate(flat[i][0])]
    remainder.append(jax.tree.unflatten(jax.tree.structure(layers[i]), leaves))
  params["groups"], params["remainder"] = groups, remainder
  return params
