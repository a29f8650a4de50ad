"""Command-line entry points: a user's mistake is one line and exit status 2.

A wrong config value, missing or corrupt data, a workdir that holds another
run or a checkpoint of another model is the user's to fix, and a traceback
through kdjax's internals only hides the one line that says how. The
``python -m experiments.mnist.*`` entry points run their ``main`` through
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
from typing import Callable, Iterator, NoReturn, Optional, Sequence

from kdjax import checkpoint, data, validate

__all__ = ["InputError", "InputNotFoundError", "USER_ERRORS",
           "TRACEBACK_FLAG", "EXIT_USER_ERROR", "HELP_EPILOG",
           "traceback_requested", "user_errors", "run_main"]


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
