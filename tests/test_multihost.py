"""Multi-host sampling: two processes of four CPU devices each (jax.distributed on localhost, gloo
collectives) produce the same tokens as one process with eight devices, whether the model axis
spans both processes or each batch is split between them.

Multi-process CPU jobs ignore SIGTERM and hang forever if a peer dies, so every process runs
under `timeout -s KILL`.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 300  # per process; a healthy run takes well under a minute


def _env(devices):
  env = dict(os.environ)
  # conftest's cheaper XLA:CPU backend flags carry over to the launched processes.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


PROMPTS = ["def add(a, b):", "import os", "class A:"]


def _cmd(output, *extra):
  return ["timeout", "-s", "KILL", str(LIMIT_S), sys.executable, "-m", "launch.sample",
          "--config=configs/tiny_random.py", "--config.model.checkpoint=",
          "--config.draft.checkpoint=", "--config.engine.num_slots=2",
          "--config.sampling.max_new_tokens=8", "--nocompare_ar",
          *[f"--prompt={p}" for p in PROMPTS], f"--output={output}", *extra]


def _tokens(path):
  with open(path) as f:
    return {r["id"]: r["tokens"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """Tokens of one process with eight devices: this one (conftest's), running what
  launch.sample runs with the same settings."""
  sys.path.insert(0, REPO)
  from configs import tiny_random
  from spec_tpu.serving import offline
  config = tiny_random.get_config()
  config.model.checkpoint = config.draft.checkpoint = ""
  config.engine.num_slots = 2
  config.sampling.max_new_tokens = 8
  path = tmp_path_factory.mktemp("single") / "single.jsonl"
  offline.run(config, PROMPTS, None, str(path), compare_ar=False)
  return _tokens(path)


@pytest.mark.parametrize("mesh", ["1,8", "2,4"])
def test_two_processes_sample_the_same_tokens_as_one(tmp_path, mesh, single):
  # Given the same prompts, seed and random-weight models,
  # when they are sampled by 2 processes x 4 devices, with the model axis spanning both (1x8)
  # or each batch split between them along the data axis (2x4: every process feeds one row),
  multi = tmp_path / "multi.jsonl"
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(multi, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", f"--config.mesh.shape=({mesh})"),
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(2)]
  logs = [p.communicate(timeout=LIMIT_S + 30)[0].decode(errors="replace") for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{logs[i][-3000:]}"
  # then process 0 alone wrote every prompt, with the single process's tokens.
  assert _tokens(multi) == single
  assert len(multi.read_text().splitlines()) == 3
