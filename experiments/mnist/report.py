"""results.json -> results.md (table beside the paper's numbers) and plots.

``pipeline.run`` calls :func:`write_all` at the end of every run. To redraw
the table and plots of a finished run (e.g. one from a machine without
matplotlib)::

  python -m experiments.mnist.report WORKDIR   # reads WORKDIR/results.json
  python -m experiments.mnist.report --partial WORKDIR   # an unfinished run
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import pathlib
import sys

import numpy as np

from kdjax import checkpoint
from kdjax.paper import cli


def _fmt(values) -> str:
  v = np.asarray(values, dtype=float)
  if v.size == 1:
    return f"{v[0]:g}"
  return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _fmt_rate(values) -> str:
  v = 100 * np.asarray(values, dtype=float)
  if v.size == 1:
    return f"{v[0]:.1f}%"
  return f"{v.mean():.1f}% ± {v.std(ddof=1):.1f}"


def markdown(results: dict) -> str:
  lines = [
      f"Device: {results['device']}; jax {results['jax_version']}; "
      f"commit {results['git_commit']}; total {results['total_seconds']} s."
      + (" **Unfinished run: the rows finished so far.**"
         if results.get("partial") else ""),
      "",
      "| row | test errors (mean ± std over seeds) | paper | extra | seconds |",
      "| --- | --- | --- | --- | --- |",
  ]
  for r in results["rows"]:
    extra = []
    if "errors_on_3" in r:
      extra.append(f"on 3s: {_fmt(r['errors_on_3'])} / "
                   f"{r.get('num_test_3s', 1010)} "
                   f"(paper {r.get('paper_errors_on_3')})")
    if "test_error_rate" in r:
      extra.append(f"error rate {_fmt_rate(r['test_error_rate'])} "
                   f"(paper {100 * r['paper_test_error_rate']:.1f}%)")
    if "bias_shift" in r:
      extra.append(f"shift {_fmt(r['bias_shift'])} on validation "
                   f"(paper {r.get('paper_bias_shift')}, on test)")
    if "num_train" in r:
      extra.append(f"{r['num_train']} training images")
    if r.get("jitter"):
      extra.append(f"±{r['jitter']}-pixel jitter")
    if r.get("dropout"):
      extra.append(f"student dropout {r['dropout'][0]:g} / {r['dropout'][1]:g}")
    if "val_errors" in r:
      extra.append(f"validation errors {_fmt(r['val_errors'])}")
    paper = r.get("paper_test_errors")
    lines.append(f"| `{r['name']}` | {_fmt(r['test_errors'])} "
                 f"(n={len(r['test_errors'])}) | "
                 f"{'' if paper is None else paper} | {'; '.join(extra)} | "
                 f"{r['seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend, or None (with a message).

  The experiments' plots are optional: a machine without matplotlib (a bare
  accelerator image) still writes every number.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: plot skipped.", file=sys.stderr)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: pathlib.Path) -> None:
  """Saves a figure as PNG, atomically (no half-written plot), and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  png = io.BytesIO()
  fig.tight_layout()
  fig.savefig(png, dpi=120, format="png")
  plt.close(fig)
  checkpoint.write_atomic(path, png.getvalue())


def plot_sweep(results: dict, path: pathlib.Path) -> bool:
  rows = [r for r in results["rows"] if r["name"].startswith("sweep_w")]
  if not rows:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for width in sorted({r["width"] for r in rows}):
    rs = sorted((r for r in rows if r["width"] == width),
                key=lambda r: r["temperature"])
    t = [r["temperature"] for r in rs]
    m = [np.mean(r["test_errors"]) for r in rs]
    s = [np.std(r["test_errors"]) for r in rs]
    line = ax.errorbar(t, m, yerr=s, marker="o", capsize=3,
                       label=f"{width}-{width}, test")
    if all("val_errors" in r for r in rs):  # T is chosen on these.
      ax.plot(t, [np.mean(r["val_errors"]) for r in rs], ls="--", marker=".",
              color=line[0].get_color(), label=f"{width}-{width}, validation")
  ax.set_xscale("log")
  ax.set_xlabel("temperature T")
  ax.set_ylabel("errors (of 10,000)")
  ax.set_title("Distilled students: errors vs temperature")
  ax.legend(title="student")
  ax.grid(True, which="both", alpha=0.3)
  save_figure(fig, path)
  return True


def plot_table(results: dict, path: pathlib.Path) -> bool:
  rows = [r for r in results["rows"] if not r["name"].startswith("sweep_w")]
  if not rows:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [r["name"] for r in rows]
  ours = [np.mean(r["test_errors"]) for r in rows]
  err = [np.std(r["test_errors"]) for r in rows]
  paper = [r.get("paper_test_errors") or np.nan for r in rows]
  y = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
  ax.barh(y - 0.2, ours, 0.4, xerr=err, label="kdjax", capsize=2)
  ax.barh(y + 0.2, paper, 0.4, label="paper")
  ax.set_yticks(y, names)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel("test errors (of 10,000, log scale)")
  ax.legend()
  save_figure(fig, path)
  return True


def write_plots(results: dict, workdir: pathlib.Path) -> list[str]:
  """Draws table.png and sweep_temperature.png; returns the files written.

  Without matplotlib (e.g. a bare accelerator image) the plots are skipped
  with a message on stderr instead of failing the run: results.json and
  results.md hold every number, and ``python -m experiments.mnist.report
  WORKDIR`` draws the plots later where matplotlib is installed.
  """
  if importlib.util.find_spec("matplotlib") is None:
    print(f"matplotlib is not installed: plots skipped. Install it "
          f"(pip install 'matplotlib>=3.9') and run `python -m "
          f"experiments.mnist.report {workdir}` to draw them.",
          file=sys.stderr, flush=True)
    return []
  workdir = pathlib.Path(workdir)
  written = []
  if plot_sweep(results, workdir / "sweep_temperature.png"):
    written.append("sweep_temperature.png")
  if plot_table(results, workdir / "table.png"):
    written.append("table.png")
  return written


PARTIAL = "results.partial.json"


def _write_json(results: dict, path: pathlib.Path) -> None:
  checkpoint.write_atomic(path, json.dumps(results, indent=2, default=str)
                          + "\n")


def write_partial(results: dict, workdir: pathlib.Path) -> None:
  """Writes the rows finished so far to ``results.partial.json`` (atomically).

  A run that is interrupted keeps them there; ``results.json`` (what
  ``collect.py`` and the README read) only ever holds a finished run.
  """
  _write_json({**results, "partial": True}, pathlib.Path(workdir) / PARTIAL)


def write_all(results: dict, workdir: pathlib.Path) -> None:
  """Writes results.json (atomically), results.md and the plots, and removes
  the run's ``results.partial.json``."""
  workdir = pathlib.Path(workdir)
  _write_json(results, workdir / "results.json")
  (workdir / PARTIAL).unlink(missing_ok=True)
  md = markdown(results)
  checkpoint.write_atomic(workdir / "results.md", md)
  write_plots(results, workdir)
  print(md, flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description="Redraws results.md and the plots of a finished run.",
      epilog=cli.HELP_EPILOG)
  parser.add_argument("workdir", help="a run's workdir (holds results.json)")
  parser.add_argument("--partial", action="store_true",
                      help=f"draw an unfinished run's rows from {PARTIAL}")
  args = parser.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  path = workdir / (PARTIAL if args.partial else "results.json")
  if not path.exists():
    hint = ("" if args.partial or not (workdir / PARTIAL).exists() else
            f"; the run did not finish: add --partial to draw {PARTIAL}")
    raise SystemExit(f"{path} does not exist: pass the --workdir of a finished "
                     f"run of experiments/mnist/main.py{hint}.")
  results = json.loads(path.read_text())
  checkpoint.write_atomic(workdir / "results.md", markdown(results))
  written = write_plots(results, workdir)
  print(f"wrote {workdir / 'results.md'}" +
        "".join(f", {workdir / f}" for f in written))


if __name__ == "__main__":
  cli.run_main(main)
