"""The README's API example runs as written (with one epoch and a temp
workdir), and its result tables are the committed JSONs' own."""
import contextlib
import io
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _api_block(index: int = 0) -> str:
  text = (ROOT / "README.md").read_text()
  section = text.split("## The API in a few lines", 1)[1].split("## Results")[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)[index]


@pytest.mark.integration
def test_readme_api_example_runs(mnist_dir, tmp_path, monkeypatch):
  code = _api_block()
  assert "epochs=2" in code and '"runs/readme"' in code
  code = code.replace("epochs=2", "epochs=1").replace(
      '"runs/readme"', repr(str(tmp_path / "readme")))
  monkeypatch.chdir(tmp_path)  # The shipped teacher is found from anywhere.
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  errors = int(re.search(r"test errors: (\d+)", out.getvalue()).group(1))
  # One epoch of distillation from the shipped teacher: a working student.
  assert errors < 400, out.getvalue()
  assert (tmp_path / "readme" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_readme_any_model_example_runs(monkeypatch):
  """The BatchNorm student and the masked sequence batch, as written."""
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_api_block(1), "README.md", "exec"), {})  # pylint: disable=exec-used
  lines = out.getvalue().strip().splitlines()
  assert len(lines) == 2 and float(lines[-1]) > 0


RESULTS = ROOT / "experiments" / "mnist" / "results"


@pytest.mark.parametrize("name, page, prefix", [
    ("quick_cpu", "README.md", "experiments/mnist/results/"),
    ("table_cpu", "experiments/mnist/README.md", "experiments/mnist/results/")])
def test_readme_tables_are_generated_from_committed_results(name, page,
                                                            prefix):
  from experiments.mnist import report  # pylint: disable=g-import-not-at-top
  results = json.loads((RESULTS / f"{name}.json").read_text())
  table = report.markdown(results).split("\n", 2)[2].strip()
  readme = (ROOT / page).read_text()
  assert table in readme, f"{page}'s {name} table differs from {name}.json"
  assert (RESULTS / f"{name}.md").read_text() == report.markdown(results)
  assert f"Source: [`{prefix}{name}.json`]" in readme
  assert results["git_commit"][:7] in readme


def test_readme_teacher_figures_match_its_record():
  info = json.loads((ROOT / "experiments" / "mnist" / "teacher" /
                     "teacher_cpu.json").read_text())
  readme = (ROOT / "experiments" / "mnist" / "README.md").read_text()
  assert (f"**{info['test_errors']} test errors** ({info['val_errors']} on "
          "validation") in readme


def test_readme_example_tables_come_from_the_committed_jsons():
  from examples import report  # pylint: disable=g-import-not-at-top
  assert report.batchnorm_table() in (ROOT / "README.md").read_text()
  assert report.grain_summary() in (ROOT / "README.md").read_text()
  assert report.char_lm_table() in (ROOT / "README.md").read_text()


def test_readme_benchmark_table_comes_from_the_committed_json():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "bench_report", ROOT / "benchmarks" / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.headline() in (ROOT / "README.md").read_text()
  assert module.chunked_table() in (ROOT / "README.md").read_text()


def test_readme_ensemble_and_specialist_figures_come_from_the_jsons():
  import numpy as np  # pylint: disable=g-import-not-at-top
  readme = (ROOT / "README.md").read_text()
  fmt = lambda v: (f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}"
                   if len(v) > 1 else f"{v[0]}")
  from experiments.mnist import ensemble  # pylint: disable=g-import-not-at-top
  ens = json.loads((RESULTS / "ensemble_cpu.json").read_text())
  assert ensemble.readme_table(ens) in readme
  assert ens["git_commit"][:7] in readme
  spec = json.loads((ROOT / "experiments" / "specialists" / "results" /
                     "specialists_cpu.json").read_text())
  for r in spec["rows"]:
    if "test_errors" in r and r["name"].startswith("generalist"):
      assert fmt(r["test_errors"]) in readme, r["name"]


def test_readme_specialists_regime_tables_come_from_the_json():
  from experiments.specialists import report  # pylint: disable=g-import-not-at-top
  readme = (ROOT / "README.md").read_text()
  path = "experiments/specialists/results/regime_cpu.json"
  res = json.loads((ROOT / path).read_text())
  assert report.regime_table(res) in readme
  assert report.differences_table(res) in readme
  assert f"Source: [`{path}`]" in readme
  for name in ("regime_cpu", "regime_cpu_long"):
    path = f"experiments/specialists/results/{name}.json"
    res = json.loads((ROOT / path).read_text())
    assert report.regime_table(res) in readme, name
    assert f"{name}.json" in readme and res["git_commit"][:7] in readme
    assert (ROOT / path.replace(".json", ".md")).read_text() == (
        report.regime_markdown(res))


def test_readme_main_table_text_comes_from_table_cpu():
  """The jittered-transfer rows quoted under the demo table: mean ± SE and
  the per-seed values of table_cpu.json."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  readme = (ROOT / "README.md").read_text()
  rows = {r["name"]: r for r in json.loads(
      (RESULTS / "table_cpu.json").read_text())["rows"]}
  for name in ("distilled_T20_jitter", "distilled_T20",
               "student_alone_jitter", "student_alone"):
    assert f"`{name}`" in readme, name
    for key in ("test_errors", "val_errors"):
      v = np.asarray(rows[name][key], float)
      se = v.std(ddof=1) / np.sqrt(v.size)
      each = ", ".join(str(int(x)) for x in v)
      assert f"{v.mean():.1f} ± {se:.1f} ({each})" in readme, (name, key)
