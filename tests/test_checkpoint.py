"""Checkpoint save/restore: resharding on restore, integrity checks, atomic layout, config round trip,
and a stored config that must describe the stored arrays."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spec_tpu.checkpoints import checkpoint
from spec_tpu.checkpoints.checkpoint import CheckpointError
from spec_tpu.models import model
from spec_tpu.models.config import ModelConfig

CONFIG = ModelConfig(name="tiny", vocab_size=64, d_model=16, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=4, ffw_dim=32, dtype="bfloat16")
# Most tests here exercise orbax plumbing on a hand-made tree (shaped to shard over every mesh
# below), which is not the params tree CONFIG implies.
_restore = functools.partial(checkpoint.restore, check_config=False)


def _mesh(a, b):
  return jax.make_mesh((a, b), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _specs():
  # Same structure as _params(): dims divisible by 8 so every mesh below can shard them.
  return {"embed": P("model", None), "layers": [{"w": P("data", "model")}, {"w": P(None, "model")}]}


def _params(mesh):
  rng = np.random.default_rng(0)
  host = {"embed": rng.standard_normal((64, 16), dtype=np.float32),
          "layers": [{"w": rng.standard_normal((16, 32)).astype(jnp.bfloat16)},
                     {"w": rng.standard_normal((16, 32)).astype(jnp.bfloat16)}]}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs())
  return jax.tree.map(jax.device_put, host, shardings), host


def _assert_same(restored, host):
  assert jax.tree.structure(restored) == jax.tree.structure(host)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "model"
  params, host = _params(_mesh(2, 4))
  checkpoint.save(path, params, CONFIG, extra={"source": "unit test"})
  return path, host


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_restore_onto_other_meshes(saved, shape):
  path, host = saved
  mesh = _mesh(*shape)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs())
  params, config = _restore(path, shardings=shardings)
  _assert_same(params, host)
  assert config == CONFIG
  for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert leaf.sharding == sh  # placed straight into the requested layout


def test_restore_one_device_and_single_sharding(saved):
  path, host = saved
  params, _ = _restore(path)
  _assert_same(params, host)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(params))
  replicated = NamedSharding(_mesh(2, 4), P())
  params, _ = _restore(path, shardings=replicated, verify=False)
  _assert_same(params, host)
  assert all(x.sharding == replicated for x in jax.tree.leaves(params))


def test_restore_dtype_cast(saved):
  path, host = saved
  params, _ = _restore(path, dtype="float32")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(np.asarray(params["layers"][0]["w"]),
                                host["layers"][0]["w"].astype(np.float32))


def test_bad_dtype(saved):
  with pytest.raises(CheckpointError, match="bad dtype 'float99'"):
    checkpoint.restore(saved[0], dtype="float99", verify=False)
  with pytest.raises(CheckpointError, match="bad dtype 'int8'"):  # would truncate every weight
    checkpoint.restore(saved[0], dtype="int8", verify=False)


def test_config_and_extra_round_trip(saved):
  path, _ = saved
  assert checkpoint.load_config(path) == CONFIG
  assert checkpoint.load_extra(path) == {"source": "unit test"}
  # No temporary sibling left behind by a finished save.
  assert sorted(os.listdir(path.parent)) == ["model"]


def test_mismatched_shardings_tree(saved):
  path, _ = saved
  with pytest.raises(CheckpointError, match="do not match"):
    _restore(path, shardings={"embed": NamedSharding(_mesh(2, 4), P())})


def test_refuses_existing_destination_unless_overwrite(tmp_path):
  params, _ = _params(_mesh(2, 4))
  path = tmp_path / "model"
  checkpoint.save(path, params, CONFIG)
  with pytest.raises(CheckpointError, match="exists.*overwrite=True"):
    checkpoint.save(path, params, CONFIG)
  other = CONFIG.replace(name="tiny2")
  checkpoint.save(path, params, other, overwrite=True)
  assert checkpoint.load_config(path) == other
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_bad_extra_is_refused_before_writing(tmp_path):
  params, _ = _params(_mesh(2, 4))
  with pytest.raises(CheckpointError, match="JSON"):
    checkpoint.save(tmp_path / "model", params, CONFIG, extra={"x": object()})
  assert not os.listdir(tmp_path)


def test_extra_files_are_sealed_with_the_weights(tmp_path):
  # Given a tokenizer file saved inside the checkpoint,
  params, _ = _params(_mesh(2, 4))
  (tmp_path / "tok.model").write_bytes(b"vocab")
  path = tmp_path / "model"
  checkpoint.save(path, params, CONFIG, files={"tokenizer/tok.model": str(tmp_path / "tok.model")})
  assert (path / "tokenizer" / "tok.model").read_bytes() == b"vocab"
  checkpoint.verify(path)
  # when it is altered, then the checkpoint no longer verifies.
  (path / "tokenizer" / "tok.model").write_bytes(b"vocaB")
  with pytest.raises(CheckpointError, match="tok.model"):
    checkpoint.verify(path)
  with pytest.raises(CheckpointError, match="inside the checkpoint"):
    checkpoint.save(tmp_path / "m2", params, CONFIG, files={"../x": str(tmp_path / "tok.model")})


@pytest.fixture
def fresh(tmp_path):
  path = tmp_path / "model"
  params, _ = _params(_mesh(2, 4))
  checkpoint.save(path, params, CONFIG)
  return path


def _largest_file(path):
  files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


def test_damaged_data_is_refused(fresh):
  victim = _largest_file(fresh)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  rel = os.path.relpath(victim, fresh)
  with pytest.raises(CheckpointError, match=f"{rel}.*sha256"):
    checkpoint.restore(fresh)


def test_truncated_file_is_refused(fresh):
  victim = _largest_file(fresh)
  os.truncate(victim, os.path.getsize(victim) - 10)
  with pytest.raises(CheckpointError, match="truncated"):
    checkpoint.restore(fresh)


def test_missing_manifest_is_refused(fresh):
  os.remove(fresh / checkpoint.MANIFEST_FILE)
  for load in (checkpoint.restore, checkpoint.load_config):
    with pytest.raises(CheckpointError, match="incomplete or not a spec_tpu checkpoint"):
      load(fresh)


def test_missing_and_extra_files_are_refused(fresh):
  (fresh / "stray.bin").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="stray.bin.*not in the manifest"):
    checkpoint.restore(fresh)
  os.remove(fresh / "stray.bin")
  os.remove(_largest_file(fresh))
  with pytest.raises(CheckpointError, match="missing"):
    checkpoint.restore(fresh)


def test_damaged_config_is_refused(fresh):
  cfg = fresh / checkpoint.CONFIG_FILE
  meta = json.loads(cfg.read_text())
  meta["config"]["num_layers"] = 3
  cfg.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="spec_tpu_config.json"):
    checkpoint.load_config(fresh)


def test_not_a_directory(tmp_path):
  with pytest.raises(CheckpointError, match="no such directory"):
    checkpoint.restore(tmp_path / "nope")


def test_save_dying_half_way_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  params, host = _params(_mesh(2, 4))
  path = tmp_path / "model"

  def die(root):
    raise KeyboardInterrupt("killed while hashing")
  monkeypatch.setattr(checkpoint, "_write_manifest", die)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(path, params, CONFIG)
  assert not path.exists()
  monkeypatch.undo()
  checkpoint.save(path, params, CONFIG)  # the stale temporary directory is cleared, not an error
  _assert_same(_restore(path)[0], host)
  assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  """A real model's params saved with the config that made them."""
  path = tmp_path_factory.mktemp("model_ckpt") / "model"
  shapes = jax.eval_shape(lambda: model.init_params(CONFIG, jax.random.key(0)))
  checkpoint.save(path, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), CONFIG)
  return path


def _edit_stored_config(src, dst, **fields):
  """Copies a checkpoint with its stored config edited and the manifest resealed, as someone
  editing spec_tpu_config.json by hand and re-running the sealing would."""
  shutil.copytree(src, dst)
  meta = json.loads((dst / checkpoint.CONFIG_FILE).read_text())
  meta["config"].update(fields)
  (dst / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
  checkpoint._write_manifest(str(dst))
  checkpoint.verify(dst)  # the integrity check alone cannot tell


def test_model_checkpoint_restores_with_its_config(saved_model):
  params, config = checkpoint.restore(saved_model)
  assert config == CONFIG
  assert checkpoint.implied_shapes(CONFIG) == checkpoint._shapes(params)


@pytest.mark.parametrize("fields, message", [
    # A dimension: named with both values.
    ({"d_model": 32}, "d_model is 32 in the config but 16 in the arrays"),
    ({"num_kv_heads": 4}, "num_kv_heads is 4 in the config but 2 in the arrays"),
    ({"ffw_dim": 48}, "ffw_dim is 48 in the config but 32 in the arrays"),
    # Layers stack along a leading axis: a wrong depth is a dimension too.
    ({"num_layers": 1}, "num_layers is 1 in the config but 2 in the arrays"),
    # Leaves the config implies but the arrays lack, or the other way round.
    ({"tie_embeddings": False}, r"params\['unembed'\] is missing from the arrays "
                                r"\(set by tie_embeddings\)"),
])
def test_stored_config_that_does_not_describe_the_arrays_is_refused(saved_model, tmp_path,
                                                                    fields, message):
  # Given a checkpoint whose stored config was edited (and resealed) after the save,
  edited = tmp_path / "edited"
  _edit_stored_config(saved_model, edited, **fields)
  # then restoring it fails, naming the field and what the arrays say, before reading any array.
  with pytest.raises(CheckpointError, match=f"does not match its arrays: .*{message}"):
    checkpoint.restore(edited)


# ---------------------------------------------------------------- format version 1 (list of layers)

def _v1_params(cfg):
  """Params as format version 1 stored them: one dict per layer under "layers", attention
  projections d h e."""
  from spec_tpu.models import layout, model
  params = model.init_params(cfg, jax.random.key(0))
  old = {k: v for k, v in params.items() if k not in ("groups", "remainder")}
  old["layers"] = [dict(lp, attn={n: jnp.swapaxes(w, 0, 1) if n in "qkv" else w
                                  for n, w in lp["attn"].items()})
                   for lp in layout.unstack(cfg, params["groups"], params["remainder"])]
  return params, old


def test_version_1_checkpoint_restores_sharded_in_the_grouped_layout(tmp_path, monkeypatch):
  from spec_tpu import sharding
  from spec_tpu.models import config as config_lib
  # Given a version-1 checkpoint of a 5-layer (local, global) model: 2 groups + 1 remainder layer,
  cfg = config_lib.get_preset("tiny_gemma2").replace(num_layers=5, num_heads=8)
  params, old = _v1_params(cfg)
  monkeypatch.setattr(checkpoint, "VERSION", 1)
  checkpoint.save(tmp_path / "v1", old, cfg)
  monkeypatch.undo()
  assert json.loads((tmp_path / "v1" / checkpoint.CONFIG_FILE).read_text())["version"] == 1
  # when it is restored onto a 2x4 mesh with the current layout's shardings,
  mesh = _mesh(2, 4)
  shardings = sharding.param_shardings(cfg, mesh)
  restored, restored_cfg = checkpoint.restore(tmp_path / "v1", shardings=shardings)
  # then it has the grouped layout, the same values, and each leaf sits on its sharding,
  assert restored_cfg == cfg
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(params),
                           jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(sh, got.ndim)
  assert restored["groups"][0]["attn"]["q"].sharding.spec == P(None, "model", None, None)
  assert restored["remainder"][0]["attn"]["q"].sharding.spec == P("model", None, None)
  # also onto one device, and a re-save writes the current version.
  single, _ = checkpoint.restore(tmp_path / "v1", verify=False)
  for got, want in zip(jax.tree.leaves(single), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  checkpoint.save(tmp_path / "v2", single, cfg)
  assert json.loads((tmp_path / "v2" / checkpoint.CONFIG_FILE).read_text())["version"] == 2


def test_checkpoint_from_a_newer_format_is_refused(tmp_path, monkeypatch):
  params, _ = _params(_mesh(2, 4))
  monkeypatch.setattr(checkpoint, "VERSION", 3)
  checkpoint.save(tmp_path / "model", params, CONFIG)
  monkeypatch.undo()
  with pytest.raises(CheckpointError, match="format version 3"):
    checkpoint.restore(tmp_path / "model")
