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

from experiments.mnist import pipeline
from kdjax.paper import cli

if __name__ == "__main__":
  cli.run_config_main(pipeline.run,
                      "Path to an experiments/mnist/configs/*.py file.")
