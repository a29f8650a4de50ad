"""Runs the specialists experiment: flags only, the logic is in pipeline.py.

  python -m experiments.specialists.main \
      --config=experiments/specialists/configs/quick.py --workdir=runs/spec

Writes WORKDIR/results.json.
"""

from experiments.specialists import pipeline
from kdjax import cli

if __name__ == "__main__":
  cli.run_config_main(
      pipeline.run, "Path to an experiments/specialists/configs/*.py file.")
