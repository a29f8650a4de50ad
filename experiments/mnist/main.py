"""Runs the paper's MNIST experiments: flags only, the logic is in pipeline.py.

  python -m experiments.mnist.main --config=experiments/mnist/configs/quick.py \
      --workdir=runs/demo [--config.seeds=[0] --config.student.distill.epochs=5]

``--config`` is an ml_collections config file; any field can be overridden
from the command line. Results go to WORKDIR/results.json (+ .md, plots).
Re-running with the same WORKDIR resumes from checkpoints.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.mnist import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiments/mnist/configs/*.py file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Keep orbax's per-save INFO lines out of the console; progress is tqdm's.
  logging.set_verbosity(logging.WARNING)
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
