"""Safetensors reader: values match the reference writers, sharded indexes, and clear errors on damage."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from spec_tpu.checkpoints.safetensors_io import SafetensorsError, SafetensorsIndex


def _tensors():
  rng = np.random.default_rng(0)
  return {"embed": rng.standard_normal((8, 4)).astype(np.float32),
          "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
          "half": rng.standard_normal((3,)).astype(np.float16),
          "flag": np.array([True, False]),
          "scalar": np.array(2.5, np.float32)}


def _write_raw(path, header: dict, data: bytes, header_len: int | None = None):
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def test_single_file_round_trip(tmp_path):
  want = _tensors()
  safetensors.numpy.save_file(want, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
  idx = SafetensorsIndex(tmp_path)
  assert idx.names() == sorted(want) and len(idx) == len(want)
  for name, arr in want.items():
    assert name in idx
    assert idx.shape(name) == arr.shape and idx.dtype(name) == arr.dtype
    got = idx.get(name)
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr)
  assert "nope" not in idx
  with pytest.raises(KeyError, match="nope"):
    idx.get("nope")


def test_bf16_from_torch_matches_bit_for_bit(tmp_path):
  t = torch.randn(5, 7, dtype=torch.float32).to(torch.bfloat16)
  safetensors.torch.save_file({"w": t}, str(tmp_path / "w.safetensors"))
  idx = SafetensorsIndex(tmp_path / "w.safetensors")  # a single file path also works
  got = idx.get("w")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def _write_sharded(root):
  want = _tensors()
  names = sorted(want)
  parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
  weight_map = {}
  for file, part in parts.items():
    safetensors.numpy.save_file({n: want[n] for n in part}, str(root / file))
    weight_map.update({n: file for n in part})
  (root / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
  return want, weight_map


def test_sharded_index(tmp_path):
  want, weight_map = _write_sharded(tmp_path)
  idx = SafetensorsIndex(tmp_path)
  assert idx.names() == sorted(want)
  assert idx.metadata == {"total_size": 1}
  for name, arr in want.items():
    assert os.path.basename(idx.file(name)) == weight_map[name]
    np.testing.assert_array_equal(idx.get(name), arr)


def test_index_errors(tmp_path):
  _, weight_map = _write_sharded(tmp_path)
  index = tmp_path / "model.safetensors.index.json"
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(SafetensorsError, match="refers to missing file 'model-00002-of-00002"):
    SafetensorsIndex(tmp_path)
  index.write_text(json.dumps({"weight_map": {"ghost": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(SafetensorsError, match="'ghost' is not in 'model-00001"):
    SafetensorsIndex(tmp_path)
  index.write_text("{not json")
  with pytest.raises(SafetensorsError, match="index.*invalid"):
    SafetensorsIndex(tmp_path)
  # A file name that is not a string, or that leaves the directory, is refused before opening.
  for bad in (5, None, "../model-00001-of-00002.safetensors", "/etc/passwd"):
    index.write_text(json.dumps({"weight_map": {"w": bad}}))
    with pytest.raises(SafetensorsError, match="'w' maps to .*not the name of a file in"):
      SafetensorsIndex(tmp_path)


def test_missing_inputs(tmp_path):
  with pytest.raises(SafetensorsError, match="no such file or directory"):
    SafetensorsIndex(tmp_path / "absent")
  with pytest.raises(SafetensorsError, match="neither"):
    SafetensorsIndex(tmp_path)
  safetensors.numpy.save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(SafetensorsError, match="other.safetensors"):
    SafetensorsIndex(tmp_path)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, header_len, match", [
    (None, b"", None, "not valid JSON"),
    ({"a": F32_2}, bytes(8), 10_000, "header length 10000 is larger than the file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None,
     "'a'.*not an ordered range"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None,
     "'a'.*run past the end.*truncated"),
    ({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), None,
     "'b'.*overlaps tensor 'a'"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None,
     "'a'.*unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None,
     "'a'.*holds 8 bytes but shape \\[3\\] x F32"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "'a'.*lacks"),
])
def test_damaged_headers(tmp_path, header, data, header_len, match):
  path = tmp_path / "model.safetensors"
  if header is None:
    path.write_bytes(struct.pack("<Q", 5) + b"{oops" + bytes(8))
  else:
    _write_raw(path, header, data, header_len)
  with pytest.raises(SafetensorsError, match=match) as info:
    SafetensorsIndex(tmp_path)
  assert "model.safetensors" in str(info.value)  # the message names the file


def test_truncated_file(tmp_path):
  path = tmp_path / "model.safetensors"
  safetensors.numpy.save_file(_tensors(), str(path))
  os.truncate(path, os.path.getsize(path) - 3)
  with pytest.raises(SafetensorsError, match="truncated"):
    SafetensorsIndex(tmp_path)
  os.truncate(path, 4)
  with pytest.raises(SafetensorsError, match="too short"):
    SafetensorsIndex(tmp_path)


def test_file_shrinking_after_open_is_caught(tmp_path):
  path = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({"a": np.ones(64, np.float32)}, str(path))
  idx = SafetensorsIndex(tmp_path)
  os.truncate(path, os.path.getsize(path) - 16)
  with pytest.raises(SafetensorsError, match="read 240 of 256 bytes"):
    idx.get("a")
