"""Gathers several runs' results.json into one record (e.g. a tuning study).

  python -m experiments.mnist.collect --out experiments/mnist/results/tuning_cpu.json \\
      --note "why these runs" runs/tune/*/

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


def collect(workdirs, note: str = "") -> dict:
  runs = []
  for w in workdirs:
    w = pathlib.Path(w)
    path = w / "results.json"
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist: is {w} a finished run "
                              "of experiments/mnist/main.py?")
    r = json.loads(path.read_text())
    run = {"workdir": w.name, "command": r.get("command"),
           "git_commit": r["git_commit"], "device": r["device"],
           "total_seconds": r["total_seconds"],
           "rows": [{k: row[k] for k in ("name", "val_errors", "test_errors",
                                         "epochs", "alpha", "temperature",
                                         "jitter", "source") if k in row}
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", required=True)
  parser.add_argument("--note", default="")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.write_text(json.dumps(collect(args.workdirs, args.note), indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
