"""Runs the specialists experiment: flags only, the logic is in pipeline.py.

  python -m experiments.specialists.main \
      --config=experiments/specialists/configs/quick.py --workdir=runs/spec

Writes WORKDIR/results.json.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.specialists import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiments/specialists/configs/*.py file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
