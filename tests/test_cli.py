"""What a launcher prints around its own output: other libraries' INFO logs only at a raised
--verbosity, and no probe of an accelerator the machine does not have."""

import logging
import os
import sys

from launch import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_only_this_repositorys_info_lines_pass():
  # Given INFO lines from the launchers and the library, and from another library (orbax);
  ours = [os.path.join(REPO, "launch", "sample.py"), os.path.join(REPO, "spec_tpu", "setup.py")]
  theirs = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpointer.py"
  # then ours pass and theirs do not, while every warning passes.
  assert all(cli._own_or_important(_record(p, logging.INFO)) for p in ours)
  assert not cli._own_or_important(_record(theirs, logging.INFO))
  assert cli._own_or_important(_record(theirs, logging.WARNING))


def test_cpu_is_chosen_only_where_nothing_was_and_no_accelerator_exists(monkeypatch):
  monkeypatch.delitem(sys.modules, "jax", raising=False)  # as before a launcher imports JAX
  for chosen, accelerator, want in ((None, False, "cpu"), (None, True, None),
                                    ("tpu", False, "tpu")):
    if chosen is None:
      monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
      monkeypatch.setenv("JAX_PLATFORMS", chosen)
    monkeypatch.setattr(cli, "_accelerator_present", lambda a=accelerator: a)
    cli.default_platform()
    assert os.environ.get("JAX_PLATFORMS") == want
