"""Fresh-clone reruns of ``make demo`` reproduce the committed demo results.

Each ``experiments/mnist/results/reruns/quick_cpu_<commit>.json`` is the
results.json of ``make demo`` run in a fresh clone of that commit (CPU, the
command in the file). Every error count and every parameter hash the
committed ``quick_cpu.json`` records must be equal in it: the README's
"reproduced bit for bit" rests on this.
"""
import json
import pathlib

RESULTS = (pathlib.Path(__file__).resolve().parents[1] / "experiments" /
           "mnist" / "results")


def _known_keys(config: dict, ref: dict) -> dict:
  """``config`` without the keys added to the configs after ``ref`` was run.

  Such a key must hold configs/default.py's value, which is the behaviour
  from before it existed (e.g. ``student.input_dropout = 0.0``); any other
  value is kept, so the comparison with ``ref`` fails.
  """
  from experiments.mnist.configs import default  # pylint: disable=g-import-not-at-top

  def strip(c, r, d):
    out = {}
    for k, v in c.items():
      if k not in r and k in d and v == d[k]:
        continue
      out[k] = strip(v, r[k], d.get(k, {})) if (
          isinstance(v, dict) and isinstance(r.get(k), dict)) else v
    return out

  return strip(config, ref, default.get_config().to_dict())


def test_reruns_reproduce_the_committed_demo_bit_for_bit():
  ref = json.loads((RESULTS / "quick_cpu.json").read_text())
  ref_rows = {r["name"]: r for r in ref["rows"]}
  reruns = sorted((RESULTS / "reruns").glob("quick_cpu_*.json"))
  assert reruns
  for path in reruns:
    rerun = json.loads(path.read_text())
    assert path.name == f"quick_cpu_{rerun['git_commit'][:7]}.json", path
    assert _known_keys(rerun["config"], ref["config"]) == ref["config"], path
    rows = {r["name"]: r for r in rerun["rows"]}
    assert list(rows) == list(ref_rows), path
    for name, r in ref_rows.items():
      for key in ("test_errors", "val_errors", "errors_on_3"):
        if key in r:
          assert rows[name][key] == r[key], (path.name, name, key)
    for key, sha in ref["params_sha256"].items():
      assert rerun["params_sha256"][key] == sha, (path.name, key)
