"""The command line: a user's mistake is one line on stderr and exit status 2.

Every subprocess here fails before loading data or compiling anything
(about a second or two each, mostly imports).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from kdjax import checkpoint, validate
from kdjax.paper import cli, data

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = "--config=experiments/mnist/configs/quick.py"


def _run(module, *args, traceback_env=None):
  env = {k: v for k, v in os.environ.items() if k != "KDJAX_TRACEBACK"}
  env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  if traceback_env is not None:
    env["KDJAX_TRACEBACK"] = traceback_env
  return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ")
  assert "Traceback" not in proc.stderr
  for f in fragments:
    assert f in lines[0]


@pytest.mark.integration
def test_bad_config_value(tmp_path):
  proc = _run("experiments.mnist.main", QUICK, f"--workdir={tmp_path / 'w'}",
              "--config.student.distill.alpha=1.5")
  _assert_one_line_error(proc, "student.distill.alpha", "[0, 1]", "1.5")
  assert not (tmp_path / "w").exists()  # refused before the workdir is made


@pytest.mark.integration
def test_unknown_config_key(tmp_path):
  proc = _run("experiments.mnist.main", QUICK, f"--workdir={tmp_path}",
              "--config.studnt.width=1")
  _assert_one_line_error(proc, "unknown config key 'studnt'",
                         "--config.studnt.width=1", 'Did you mean "student"')


@pytest.mark.integration
def test_missing_data_dir(tmp_path):
  proc = _run("experiments.mnist.main", QUICK, f"--workdir={tmp_path / 'w'}",
              f"--config.data_dir={tmp_path / 'no_mnist'}")
  _assert_one_line_error(proc, "MNIST data directory", "does not exist")


@pytest.mark.integration
def test_a_failed_data_load_leaves_no_record(tmp_path):
  # A bad data_dir used to leave run_config.json behind, which then refused
  # the corrected rerun in the same workdir as "a different configuration".
  proc = _run("experiments.mnist.main", QUICK, f"--workdir={tmp_path / 'w'}",
              f"--config.data_dir={tmp_path / 'no_mnist'}")
  assert proc.returncode == 2
  assert not (tmp_path / "w" / "run_config.json").exists()


@pytest.mark.integration
@pytest.mark.parametrize("module", ["experiments.mnist.main",
                                    "experiments.mnist.ensemble",
                                    "experiments.specialists.main"])
def test_missing_config_file(tmp_path, module):
  proc = _run(module, f"--config={tmp_path / 'nope.py'}",
              f"--workdir={tmp_path / 'w'}")
  _assert_one_line_error(proc, "--config file", "nope.py", "does not exist",
                         "--config=experiments/mnist/configs/quick.py")
  proc = _run(module, "--config", str(tmp_path), f"--workdir={tmp_path}")
  _assert_one_line_error(proc, "is a directory")


@pytest.mark.integration
def test_workdir_of_another_run(tmp_path):
  (tmp_path / "run_config.json").write_text(json.dumps({"another": "run"}))
  proc = _run("experiments.mnist.main", QUICK, f"--workdir={tmp_path}")
  _assert_one_line_error(proc, "holds a run with a different configuration")


@pytest.mark.integration
@pytest.mark.parametrize("how", ["env", "flag"])
def test_traceback_on_request(tmp_path, how):
  args = [QUICK, f"--workdir={tmp_path}", "--config.student.distill.alpha=1.5"]
  if how == "flag":
    proc = _run("experiments.mnist.main", *args, "--traceback")
  else:
    proc = _run("experiments.mnist.main", *args, traceback_env="1")
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert "kdjax.validate.ConfigError: config key 'student.distill.alpha'" in (
      proc.stderr)


@pytest.mark.integration
def test_absl_flag_errors_are_absls(tmp_path):
  proc = _run("experiments.mnist.main", QUICK)  # no --workdir
  assert proc.returncode == 1
  assert "Flag --workdir must have a value other than None" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _run("experiments.mnist.main", QUICK, f"--workdir={tmp_path}", "x")
  assert proc.returncode == 1
  assert "Unexpected arguments: ['x']" in proc.stderr


@pytest.mark.integration
def test_fidelity_of_a_missing_workdir(tmp_path):
  proc = _run("experiments.mnist.fidelity", tmp_path / "nope", "distilled_T20")
  _assert_one_line_error(proc, "run_config.json does not exist")


@pytest.mark.integration
def test_collect_of_an_unfinished_run(tmp_path):
  proc = _run("experiments.mnist.collect", tmp_path, "--out",
              tmp_path / "x.json")
  _assert_one_line_error(proc, "results.json does not exist")


# ----------------------------------------------------------------------------
# cli.run_main in this process.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    validate.ConfigError("bad value"),
    validate.WorkdirMismatchError("another run"),
    data.DataNotFoundError("no data"),
    data.IdxFormatError("corrupt"),
    checkpoint.CheckpointMismatchError("another model"),
    cli.InputNotFoundError("no such workdir"),
])
def test_run_main_user_errors(error, capsys, monkeypatch):
  monkeypatch.delenv("KDJAX_TRACEBACK", raising=False)

  def main(argv):
    raise error
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(main, [])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"error: {error}\n"


def test_run_main_passes_args_status_and_bugs(monkeypatch):
  monkeypatch.delenv("KDJAX_TRACEBACK", raising=False)
  seen = []

  def main(argv):
    seen.append(argv)
    return 3
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(main, ["a", "--traceback", "--b=1"])
  assert exit_info.value.code == 3
  assert seen == [["a", "--b=1"]]

  def bug(argv):
    raise RuntimeError("a bug keeps its traceback")
  with pytest.raises(RuntimeError):
    cli.run_main(bug, [])

  def user_error(argv):
    raise validate.ConfigError("shown in full")
  with pytest.raises(validate.ConfigError):
    cli.run_main(user_error, ["--traceback"])
  monkeypatch.setenv("KDJAX_TRACEBACK", "1")
  with pytest.raises(validate.ConfigError):
    cli.run_main(user_error, [])
  monkeypatch.setenv("KDJAX_TRACEBACK", "0")
  with pytest.raises(SystemExit):
    cli.run_main(user_error, [])


def test_input_errors_keep_their_builtin_types():
  assert issubclass(cli.InputNotFoundError, FileNotFoundError)
  assert issubclass(cli.InputNotFoundError, ValueError)
  assert issubclass(validate.WorkdirMismatchError, ValueError)
