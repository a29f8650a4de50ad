"""Command-line entry points: a user's mistake is one line and exit status 2.

A wrong config value, missing or corrupt data, a workdir that holds another
run or a checkpoint of another model is the user's to fix, and a traceback
through kdjax's internals only hides the one line that says how. The
``python -m experiments.*`` entry points run their ``main`` through
:func:`run_main`, which prints such an error as::

  error: <the exception's message>

on stderr and exits with status 2 (what argparse and absl use for usage
errors). Any other exception is a bug and keeps its traceback. The flag
``--traceback`` (removed from the arguments before ``main`` sees them) or
the environment variable ``KDJAX_TRACEBACK=1`` shows the full traceback of
a user error too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

from kdjax import checkpoint, validate
from kdjax.paper import data

__all__ = ["InputError", "InputNotFoundError", "USER_ERRORS",
           "TRACEBACK_FLAG", "EXIT_USER_ERROR", "HELP_EPILOG",
           "traceback_requested", "user_errors", "run_main",
           "check_config_file", "run_config_main"]


class InputError(ValueError):
  """A command's input (a workdir, a row, a file it names) is unusable."""


class InputNotFoundError(InputError, FileNotFoundError):
  """A command's input does not exist (also a ``FileNotFoundError``)."""


# The exceptions that report a user's mistake, not a bug in kdjax.
USER_ERRORS: tuple[type[BaseException], ...] = (
    validate.ConfigError,               # a config key, type or value
    data.DataError,                     # missing or malformed data files
    validate.WorkdirMismatchError,      # the workdir holds another run
    checkpoint.CheckpointMismatchError,  # a checkpoint of another model
    InputError,                         # a workdir or file named by the user
)
TRACEBACK_FLAG = "--traceback"
EXIT_USER_ERROR = 2
_ENV = "KDJAX_TRACEBACK"
# For an argparse parser's epilog (run_main handles the flag itself).
HELP_EPILOG = ("A mistake in the arguments, the data or the workdir is "
               "printed as one line 'error: ...' with exit status 2; add "
               f"{TRACEBACK_FLAG} (or set {_ENV}=1) for the full traceback.")


def traceback_requested(argv: Sequence[str] = ()) -> bool:
  """Whether ``argv`` holds ``--traceback`` or ``$KDJAX_TRACEBACK`` is set.

  ``KDJAX_TRACEBACK`` counts when set to anything but ``''``, ``0``,
  ``false`` or ``no``.
  """
  env = os.environ.get(_ENV, "").strip().lower()
  return TRACEBACK_FLAG in argv or env not in ("", "0", "false", "no")


@contextlib.contextmanager
def user_errors(show_traceback: bool = False) -> Iterator[None]:
  """Turns a :data:`USER_ERRORS` exception into ``error: ...`` and exit 2.

  Args:
    show_traceback: re-raise instead (the full traceback, exit status 1).
  """
  try:
    yield
  except USER_ERRORS as e:
    if show_traceback:
      raise
    message = str(e) or type(e).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_main(main: Callable[[list[str]], Optional[int]],
             argv: Optional[Sequence[str]] = None) -> NoReturn:
  """Exits with ``main(args)``'s status, a user error printed as one line.

  Args:
    main: called with the command-line arguments (without the program name
      and without ``--traceback``); returns an exit status or ``None``.
    argv: the arguments; default ``sys.argv[1:]``.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  show = traceback_requested(args)
  args = [a for a in args if a != TRACEBACK_FLAG]
  with user_errors(show):
    status = main(args)
  sys.exit(status)


def _parse_config_flags(argv):
  """absl's flag parsing, with an unknown ``--config.KEY`` as a ConfigError.

  ml_collections raises a bare AttributeError (with a traceback through
  absl) for an override of a key the config does not have.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # str(e) is "'key'", then maybe a line "Did you mean ...?"; KeyError's
    # repr quotes it once more.
    lines = str(e).strip("\"'").replace("\\n", "\n").split("\n")
    key = lines[0].strip("\\'\"")
    culprits = [a for a in argv[1:] if a.startswith("--config.")
                and key in a.split("=", 1)[0].split(".")]
    if not culprits:
      raise
    hint = " ".join(line.strip("\\'\"") for line in lines[1:])
    raise validate.ConfigError(
        f"unknown config key {key!r} in {', '.join(culprits)}"
        + (f". {hint}" if hint else "")) from e


def _config_path(argv: Sequence[str]) -> Optional[str]:
  """The file named by ``--config=FILE`` or ``--config FILE`` in ``argv``.

  ml_collections accepts ``FILE:ARG`` (an argument for ``get_config``); the
  part before the first ``:`` is the file.
  """
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      value = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return value.split(":", 1)[0]
  return None


def check_config_file(argv: Sequence[str]) -> None:
  """Refuses a ``--config`` file that does not exist (one line, exit 2).

  Without this, ml_collections reports it as a 50-line traceback through
  absl when the config is first read.

  Raises:
    kdjax.validate.ConfigError: the file is missing or is a directory.
  """
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise validate.ConfigError(
        f"--config file {path!r} {what} (relative paths are read from "
        f"{os.getcwd()}); pass a config file such as "
        "--config=experiments/mnist/configs/quick.py.")


def run_config_main(run: Callable[[Any, str], Any],
                    config_help: str) -> NoReturn:
  """A ``python -m`` entry point: ``--config=FILE --workdir=DIR``, then
  ``run(config, workdir)``.

  ``--config`` is an ml_collections config file (locked; any field can be
  overridden as ``--config.KEY=VALUE``, an unknown key is a
  :class:`kdjax.validate.ConfigError`), ``--workdir`` the output
  directory; both are required and no positional argument is accepted. A
  ``--config`` file that does not exist is a one-line error
  (:func:`check_config_file`).
  absl parses the flags (its own usage errors are unchanged), orbax's
  per-save INFO lines are kept out of the console, and the whole runs
  through :func:`run_main` (one-line user errors, ``--traceback``).

  Args:
    run: ``run(config, workdir)``, the experiment.
    config_help: the ``--config`` flag's help text.
  """
  # pylint: disable=g-import-not-at-top
  from absl import app, flags, logging
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  config = config_flags.DEFINE_config_file("config", None, config_help,
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Keep orbax's per-save INFO lines out of the console; progress is tqdm's.
    logging.set_verbosity(logging.WARNING)
    run(config.value, workdir.value)

  def start(args):
    check_config_file(args)
    return app.run(main, argv=[sys.argv[0], *args],
                   flags_parser=_parse_config_flags)

  run_main(start)
