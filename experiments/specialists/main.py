"""Runs the specialists experiment: flags only, the logic is elsewhere.

  python -m experiments.specialists.main \
      --config=experiments/specialists/configs/regime_cpu.py --workdir=runs/spec

A config with ``pipeline = "regime"`` runs :mod:`.regime` (the paper's
regime: fresh pairs, capacity-limited generalist, controls); the others
run :mod:`.pipeline` (the first, data-starved run). Writes
WORKDIR/results.json (+ results.md and a plot).
"""

from experiments.specialists import pipeline, regime
from kdjax.paper import cli


def run(config, workdir):
  if config.get("pipeline", "fixed") == "regime":
    return regime.run(config, workdir)
  return pipeline.run(config, workdir)


if __name__ == "__main__":
  cli.run_config_main(
      run, "Path to an experiments/specialists/configs/*.py file.")
