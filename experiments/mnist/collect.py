"""Gathers several runs' results.json into one record (e.g. a tuning study).

  python -m experiments.mnist.collect \\
      --out experiments/mnist/results/tuning_cpu.json \\
      --note "why these runs" runs/tune/*/

``--append`` adds the runs to an existing record instead (a run whose
workdir name is already there is replaced in place) and appends the note.

For each workdir it keeps the command, commit, device, wall time and, per
row, the validation and test errors (choices are made on the validation
errors only; the test errors are recorded so that nothing is hidden). A
teacher trained in the run also contributes its validation curve from
``teacher/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from kdjax import checkpoint
from kdjax.paper import cli


def collect(workdirs, note: str = "") -> dict:
  runs = []
  for w in workdirs:
    w = pathlib.Path(w)
    path = w / "results.json"
    if not path.exists():
      raise cli.InputNotFoundError(
          f"{path} does not exist: is {w} a finished run of "
          "experiments/mnist/main.py?")
    r = json.loads(path.read_text())
    run = {"workdir": w.name, "command": r.get("command"),
           "git_commit": r["git_commit"], "device": r["device"],
           "total_seconds": r["total_seconds"],
           "rows": [{k: row[k] for k in ("name", "val_errors", "test_errors",
                                         "epochs", "alpha", "temperature",
                                         "jitter", "dropout", "num_train",
                                         "width", "source") if k in row}
                    for row in r["rows"]]}
    curve = w / "teacher" / "metrics.jsonl"
    if curve.exists():
      run["teacher_val_errors_by_epoch"] = {
          str(m["epoch"]): m["val_errors"]
          for m in map(json.loads, curve.read_text().splitlines())
          if "val_errors" in m}
    runs.append(run)
  return {"note": note, "chosen_on": "validation errors (10k held-out "
          "training images); test errors are recorded, never used to choose",
          "runs": runs}


def merge(old: dict, new: dict) -> dict:
  """``old`` with ``new``'s runs added (a workdir name already there: replaced
  in place)."""
  runs = list(old["runs"])
  index = {r["workdir"]: i for i, r in enumerate(runs)}
  for r in new["runs"]:
    if r["workdir"] in index:
      print(f"replacing the record's entry {r['workdir']!r} (entries are "
            "keyed by the workdir's folder name)", file=sys.stderr)
      runs[index[r["workdir"]]] = r
    else:
      index[r["workdir"]] = len(runs)
      runs.append(r)
  note = " ".join(n for n in (old.get("note", ""), new["note"]) if n)
  return {**old, "note": note, "runs": runs}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   epilog=cli.HELP_EPILOG)
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", required=True)
  parser.add_argument("--note", default="")
  parser.add_argument("--append", action="store_true",
                      help="add to the existing --out record")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  record = collect(args.workdirs, args.note)
  if args.append:
    if not out.exists():
      raise SystemExit(f"--append: {out} does not exist; drop --append to "
                       "start a new record.")
    record = merge(json.loads(out.read_text()), record)
  checkpoint.write_atomic(out, json.dumps(record, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run_main(main)
