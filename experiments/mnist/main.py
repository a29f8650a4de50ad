"""Runs the paper's MNIST experiments: flags only, the logic is in pipeline.py.

  python -m experiments.mnist.main \\
      --config=experiments/mnist/configs/quick.py --workdir=runs/demo \\
      [--config.seeds=[0] --config.student.distill.epochs=5]

``--config`` is an ml_collections config file; any field can be overridden
from the command line. Results go to WORKDIR/results.json (+ .md, plots).
Re-running with the same WORKDIR resumes from checkpoints.

A mistake the user can fix (a bad config value, missing or corrupt MNIST
files, a WORKDIR that holds another run, a checkpoint of another model) is
printed as one line, ``error: ...``, with exit status 2; add --traceback (or
set KDJAX_TRACEBACK=1) for the full traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.mnist import pipeline
from kdjax import cli, validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiments/mnist/configs/*.py file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """absl's flag parsing, with an unknown ``--config.KEY`` as a ConfigError.

  ml_collections raises a bare AttributeError (with a traceback through
  absl) for an override of a key the config does not have.
  """
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Keep orbax's per-save INFO lines out of the console; progress is tqdm's.
  logging.set_verbosity(logging.WARNING)
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  # absl parses the flags (its own usage errors are unchanged); run_main
  # takes --traceback out before it does.
  cli.run_main(lambda args: app.run(main, argv=[sys.argv[0], *args],
                                    flags_parser=_parse_flags))
