"""Runs launcher commands one after another in one process, each as `python -m launch.X ...` would
run it (launch.cli.run: flag parsing, main, exit status), with absl's flags reset in between. The
suite pays one interpreter and JAX start-up for many commands; tests/test_documented_commands.py
drives it.

    python tests/run_launchers.py COMMANDS.json RESULTS.jsonl

COMMANDS.json: a list of argv lists, ["launch.sample", "--config=...", ...], or ["python", CODE]
for a Python example (run as a script's top level would run it). For each command one
line is appended to RESULTS.jsonl as soon as it ends: {"index", "rc", "seconds", "cpu_seconds",
"log"} (log: its stdout and stderr). A command that hangs leaves the lines of those before it.
"""

import contextlib
import importlib
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags  # noqa: E402

from launch import cli  # noqa: E402


@contextlib.contextmanager
def _captured(path):
  """stdout and stderr of everything (Python, absl logging, C++) go to `path`."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(path, "wb") as f:
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def run_one(argv: list[str], log_path: str) -> int:
  """One command: imports the launcher afresh (its flags are defined at import) and runs it."""
  module, args = argv[0], argv[1:]
  defined_before = set(flags.FLAGS)
  sys.argv = [module] + args  # ml_collections reads config overrides from sys.argv
  rc = 0
  with _captured(log_path):
    try:
      if module == "python":
        exec(compile(args[0], "<example>", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
        return 0
      sys.modules.pop(module, None)
      launcher = importlib.import_module(module)
      cli.run(launcher.main)
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
        rc = 1
      else:
        rc = e.code or 0
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      rc = 1
    finally:
      # The next launcher defines flags of the same names (and config overrides are flags too).
      for name in set(flags.FLAGS) - defined_before:
        delattr(flags.FLAGS, name)
      sys.modules.pop(module, None)
  return rc


def main(commands_path: str, results_path: str) -> None:
  os.chdir(REPO)  # configs are named relative to the repository root
  # The process's devices are those its XLA_FLAGS ask for, whichever command comes first (a
  # launcher that sets jax_num_cpu_devices for its own mesh would otherwise fix them for all).
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  with open(commands_path) as f:
    commands = json.load(f)
  log_dir = os.path.dirname(os.path.abspath(results_path))
  for index, argv in enumerate(commands):
    log_path = os.path.join(log_dir, f"command_{index}.log")
    start, cpu_start = time.perf_counter(), time.process_time()
    rc = run_one(argv, log_path)
    with open(log_path, errors="replace") as f:
      log = f.read()
    with open(results_path, "a") as f:
      f.write(json.dumps({"index": index, "rc": rc, "log": log,
                          "seconds": time.perf_counter() - start,
                          "cpu_seconds": time.process_time() - cpu_start}) + "\n")


if __name__ == "__main__":
  main(*sys.argv[1:])
