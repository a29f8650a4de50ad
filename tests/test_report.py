"""experiments/mnist/report.py: the results table and plots."""
import pytest

from experiments.mnist import report


def _sweep_rows(with_val):
  rows = []
  for width in (30, 800):
    for t in (1.0, 20.0):
      r = {"name": f"sweep_w{width}_T{t:g}", "width": width, "temperature": t,
           "test_errors": [100 + width // 10], "paper_test_errors": None,
           "seconds": 1.0}
      if with_val:
        r["val_errors"] = [120]
      rows.append(r)
  return rows


@pytest.mark.parametrize("with_val", [False, True])
def test_plot_sweep_writes_a_png(tmp_path, with_val):
  path = tmp_path / "sweep.png"
  assert report.plot_sweep({"rows": _sweep_rows(with_val)}, path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_their_rows_write_nothing(tmp_path):
  assert not report.plot_sweep({"rows": [{"name": "teacher"}]},
                               tmp_path / "a.png")
  assert not report.plot_table({"rows": _sweep_rows(False)}, tmp_path / "b.png")
  assert not list(tmp_path.iterdir())


def test_markdown_formats_seeds_and_extras():
  results = {"device": "cpu", "jax_version": "0", "git_commit": "abc",
             "total_seconds": 1.0, "rows": [
                 {"name": "omit3_after_shift", "test_errors": [140, 142, 138],
                  "paper_test_errors": 109, "seconds": 0.04,
                  "errors_on_3": [39, 41, 37], "num_test_3s": 1010,
                  "paper_errors_on_3": 14, "bias_shift": [3.5, 3.75, 3.5],
                  "paper_bias_shift": 3.5, "val_errors": [150, 150, 150]}]}
  row = report.markdown(results).splitlines()[-1]
  assert row.startswith("| `omit3_after_shift` | 140.0 ± 2.0 (n=3) | 109 |")
  assert "on 3s: 39.0 ± 2.0 / 1010 (paper 14)" in row
  assert "shift 3.6 ± 0.1 on validation (paper 3.5, on test)" in row
  assert "validation errors 150.0 ± 0.0" in row


def _results():
  return {"device": "cpu", "jax_version": "0", "git_commit": "abc",
          "total_seconds": 1.0,
          "rows": [{"name": "teacher", "test_errors": [63],
                    "paper_test_errors": 67, "seconds": 1.0}]
                  + _sweep_rows(True)}


def test_cli_redraws_a_finished_run(tmp_path, capsys):
  import json  # pylint: disable=g-import-not-at-top
  (tmp_path / "results.json").write_text(json.dumps(_results()))
  report.main([str(tmp_path)])
  assert (tmp_path / "results.md").read_text() == report.markdown(_results())
  assert (tmp_path / "table.png").exists()
  assert (tmp_path / "sweep_temperature.png").exists()
  assert "wrote" in capsys.readouterr().out


def test_cli_names_a_workdir_without_results(tmp_path):
  with pytest.raises(SystemExit, match="results.json does not exist: pass the "
                     "--workdir of a finished run"):
    report.main([str(tmp_path)])


def test_missing_matplotlib_skips_plots_and_keeps_the_numbers(tmp_path, capsys,
                                                              monkeypatch):
  real = report.importlib.util.find_spec
  monkeypatch.setattr(report.importlib.util, "find_spec",
                      lambda name, *a: None if name == "matplotlib"
                      else real(name, *a))
  report.write_all(_results(), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json",
                                                        "results.md"]
  err = capsys.readouterr().err
  assert "matplotlib is not installed: plots skipped" in err
  assert f"python -m experiments.mnist.report {tmp_path}" in err


def test_partial_results_are_replaced_by_the_finished_run(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  report.write_partial(_results(), tmp_path)
  partial = json.loads((tmp_path / report.PARTIAL).read_text())
  assert partial["partial"] is True and partial["rows"] == _results()["rows"]
  assert not (tmp_path / "results.json").exists()
  report.write_all(_results(), tmp_path)
  assert not (tmp_path / report.PARTIAL).exists()
  assert "partial" not in json.loads((tmp_path / "results.json").read_text())
  assert not list(tmp_path.glob("*.tmp"))


def test_cli_draws_an_unfinished_run_with_partial(tmp_path):
  report.write_partial(_results(), tmp_path)
  with pytest.raises(SystemExit, match="did not finish: add --partial"):
    report.main([str(tmp_path)])
  report.main(["--partial", str(tmp_path)])
  md = (tmp_path / "results.md").read_text()
  assert md == report.markdown({**_results(), "partial": True})
  assert "Unfinished run" in md.splitlines()[0]
  assert "Unfinished run" not in report.markdown(_results())
  assert (tmp_path / "table.png").exists()
  assert not list(tmp_path.glob("*.tmp"))
