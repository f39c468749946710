"""The launchers' entry point: absl's app.run, with every mistake a user can make on the command line
reported as one line, `error: ...` on stderr and exit status 1, instead of a traceback or pages of
flag help.

Handled here, for every launcher alike: flags that do not parse, a `--config.a.b=v` override of a
field the config does not have, a config file that does not exist or whose get_config() refuses
its argument, stray positional arguments, and the errors the launchers and the library raise on
purpose (UserError below and the spec_tpu error classes such as CheckpointError). Anything else
is a bug and keeps its traceback.

This module imports absl and ml_collections only, so `--help` and flag errors stay fast.
"""

from __future__ import annotations

import glob
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


class UserError(ValueError):
  """Bad input from the user (flags, config, files): reported as one line, never a traceback."""


# Config flag name -> the config file used when the command line names none.
_CONFIG_DEFAULTS: dict[str, str] = {}


def define_config_file(name: str, default: str, help_string: str):
  """config_flags.DEFINE_config_file, but the default file is loaded with the command line, by
  parse_flags, not when the launcher module is imported: there a bad `--config.x=v` override
  ends in a traceback, before any error handling can run."""
  holder = config_flags.DEFINE_config_file(name, None, f"{help_string} (default: {default})")
  _CONFIG_DEFAULTS[name] = default
  # A key flag of the launcher that called this (as absl names it), so --helpshort lists it.
  caller = sys._getframe(1).f_globals.get("__name__")
  flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller,
                                           flags.FLAGS[name])
  return holder


def _with_default_configs(argv):
  argv = list(argv)
  for name, default in _CONFIG_DEFAULTS.items():
    if name in flags.FLAGS and not any(re.match(rf"^--?{re.escape(name)}(=|$)", a) for a in argv[1:]):
      argv.insert(1, f"--{name}={default}")
  return argv


def fail(message: str):
  """Ends the program with `error: message` on stderr and exit status 1."""
  sys.exit(f"error: {message}")


def int_list(name: str, values) -> list[int]:
  """A DEFINE_list flag's values as integers, or a UserError naming the flag."""
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UserError(f"--{name} takes comma-separated integers, got "
                    f"{','.join(map(str, values))!r}") from None


def check_output_file(flag: str, path: str) -> None:
  """A UserError unless `path` can be written (its directory exists and is writable): checked
  before the work whose result it receives."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UserError(f"--{flag} {path!r}: {parent!r} is not a writable directory")


def _one_line(message: str) -> str:
  # ml_collections puts the whole traceback of a failing get_config() into the flag error; its
  # first line names the flag and its last line says what went wrong.
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _unknown_field(argv, e: Exception) -> str:
  """The override that names a missing field (ml_collections raises AttributeError/KeyError)."""
  text = e
  while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError("'x'\n..."))
    text = text.args[0]
  first, _, hint = str(text).partition("\n")
  key = first.strip("\"' ")
  hint = hint.strip() or "a misspelt name? configs/common.py lists the schema"
  for arg in argv[1:]:
    name = arg.split("=", 1)[0].lstrip("-")
    if "." in name and key in name.split(".")[1:]:
      return f"{arg}: the config has no field {name.split('.', 1)[1]!r} ({hint})"
  return f"unknown config field {key!r} ({hint})"


def _check_config_files(flag_values) -> None:
  """A config file that cannot be loaded is only reported when first used (as a traceback)."""
  for name in _CONFIG_DEFAULTS:
    if name not in flag_values:
      continue
    flag = flag_values[name]
    value = flag.value
    if value is None:
      continue
    try:
      value.keys  # ml_collections' stand-in for a config that failed to load raises here
    except OSError as e:
      spec = getattr(flag, "config_filename", "") or ""
      path = spec.split(":", 1)[0]
      if path and not os.path.isfile(path):
        fail(f"--{flag.name}={spec}: no such config file (configs are the .py files in configs/, "
             "given relative to the repository root)")
      fail(f"--{flag.name}={spec}: {_one_line(str(e))}")


def parse_flags(argv):
  """absl's flag parsing, with one-line errors; returns argv[:1] (no positional arguments)."""
  flag_values = flags.FLAGS
  argv = _with_default_configs(argv)
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    fail(_one_line(str(e)))
  except (AttributeError, KeyError) as e:
    fail(_unknown_field(argv, e))
  if len(rest) > 1:
    fail(f"unexpected argument {rest[1]!r}: every option is a flag, --name=value "
         f"(--helpshort lists them)")
  _check_config_files(flag_values)
  return rest


def is_user_error(e: BaseException) -> bool:
  # The project's own error classes carry messages written for users; the library's live in
  # spec_tpu (CheckpointError, HFConversionError, SafetensorsError, ...).
  return isinstance(e, UserError) or any(
      c.__module__.split(".")[0] == "spec_tpu" for c in type(e).__mro__)


# This repository's code: its INFO lines are the launchers' progress; other libraries' (orbax
# logs every step of a save or restore) show only at a raised --verbosity.
_OWN_CODE = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
                  + os.sep for d in ("launch", "spec_tpu", "configs"))


def _own_or_important(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OWN_CODE)


def quiet_other_libraries() -> None:
  """Other libraries' INFO logs off unless --verbosity (-v) was given."""
  handler = logging.get_absl_handler()
  if flags.FLAGS["verbosity"].present:
    handler.removeFilter(_own_or_important)
  else:
    handler.addFilter(_own_or_important)


def _accelerator_present() -> bool:
  # Device files of TPU chips (v4: /dev/accel*; later chips: VFIO groups) and of GPUs.
  return any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*",
                                    "/dev/kfd"))


def default_platform() -> None:
  """JAX_PLATFORMS=cpu where nothing was chosen and the machine has no accelerator: otherwise
  an installed libtpu probes for a TPU that is not there, and prints pages of errors about it.
  A machine with an accelerator (or a JAX_PLATFORMS already set) is left to JAX's own choice."""
  if "JAX_PLATFORMS" not in os.environ and "jax" not in sys.modules and not _accelerator_present():
    os.environ["JAX_PLATFORMS"] = "cpu"


def run(main) -> None:
  """app.run(main) with one-line errors for flags, configs and deliberate user errors, and only
  the launcher's own progress on the console."""
  default_platform()

  def guarded(argv):
    quiet_other_libraries()
    try:
      return main(argv)
    except app.UsageError as e:
      fail(str(e))
    except Exception as e:  # pylint: disable=broad-except
      if is_user_error(e):
        fail(str(e))
      raise

  app.run(guarded, flags_parser=parse_flags)
