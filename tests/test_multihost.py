"""Multi-host sampling: two processes of four CPU devices each (jax.distributed on localhost, gloo
collectives) produce the same tokens as one process with eight devices.

Multi-process CPU jobs ignore SIGTERM and hang forever if a peer dies, so every process runs
under `timeout -s KILL`.
"""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 300  # per process; a healthy run takes well under a minute


def _env(devices):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(output, *extra):
  return ["timeout", "-s", "KILL", str(LIMIT_S), sys.executable, "-m", "launch.sample",
          "--config=configs/tiny_random.py", "--config.model.checkpoint=",
          "--config.draft.checkpoint=", "--config.run.batch_size=2",
          "--config.sampling.max_new_tokens=8", "--nocompare_ar",
          "--prompt=def add(a, b):", "--prompt=import os", "--prompt=class A:",
          f"--output={output}", *extra]


def _tokens(path):
  with open(path) as f:
    return {r["id"]: r["tokens"] for r in map(json.loads, f)}


def test_two_processes_sample_the_same_tokens_as_one(tmp_path):
  # Given the same prompts, seed and random-weight models,
  single = tmp_path / "single.jsonl"
  subprocess.run(_cmd(single), cwd=REPO, env=_env(8), check=True, capture_output=True,
                 timeout=LIMIT_S + 30)
  # when they are sampled by 2 processes x 4 devices (mesh 1x8 across both),
  multi = tmp_path / "multi.jsonl"
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(multi, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(2)]
  logs = [p.communicate(timeout=LIMIT_S + 30)[0].decode(errors="replace") for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{logs[i][-3000:]}"
  # then process 0 alone wrote every prompt, with the single process's tokens.
  assert _tokens(multi) == _tokens(single)
  assert len(multi.read_text().splitlines()) == 3
