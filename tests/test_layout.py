"""The layout: the core does not import the paper's apparatus, every name
``kdjax`` exports is in the API reference, and the old module names still
work (deprecated aliases of the modules' new homes).

Cheap: the import check parses the sources with ``ast`` (nothing is run),
and the reference check reads ``docs/api.rst`` (no Sphinx build).
"""

import ast
import importlib
import pathlib
import re
import types

import pytest

import kdjax
from kdjax import records

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdjax"
# kdjax/<name>.py for every deprecated name of a moved module.
ALIASES = {PACKAGE / f"{name}.py" for name in kdjax._LAZY if name != "paper"}  # pylint: disable=protected-access
# What a core module must not import: the paper, and the moved modules by
# their deprecated names (kdjax.models is kdjax.paper.models).
FORBIDDEN = set(kdjax._LAZY)  # pylint: disable=protected-access


def _core_modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    if "paper" in path.relative_to(PACKAGE).parts or path in ALIASES:
      continue
    yield path


def _forbidden_imports(path):
  """``(line, what)`` for each import of the paper (or an old name)."""
  bad = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module]
      if node.module == "kdjax":
        names = [f"kdjax.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "kdjax" and len(parts) > 1 and parts[1] in FORBIDDEN:
        bad.append((node.lineno, name))
  return bad


def test_the_core_does_not_import_the_paper():
  core = list(_core_modules())
  assert PACKAGE / "fitting.py" in core and PACKAGE / "__init__.py" in core
  assert PACKAGE / "losses" / "topk.py" in core
  bad = {str(p.relative_to(ROOT)): _forbidden_imports(p) for p in core}
  assert not {k: v for k, v in bad.items() if v}


def test_the_import_check_sees_an_import_of_the_paper(tmp_path):
  # The check above must be able to fail.
  src = tmp_path / "m.py"
  src.write_text("import kdjax.paper.data\nfrom kdjax import models, step\n"
                 "from kdjax.paper import cli\nfrom kdjax.losses import topk\n"
                 "def f():\n  from kdjax.topk import topk_targets\n")
  assert [w for _, w in _forbidden_imports(src)] == [
      "kdjax.paper.data", "kdjax.models", "kdjax.paper", "kdjax.topk"]


@pytest.mark.parametrize("new,old", sorted(records.MOVED_FROM.items()))
def test_the_old_module_names_are_the_new_modules(new, old):
  module = importlib.import_module(new)
  if old == "kdjax.losses":  # The package re-exports divergences' names.
    assert all(getattr(importlib.import_module(old), n) is getattr(module, n)
               for n in module.__all__)
  else:
    assert importlib.import_module(old) is module
    assert getattr(kdjax, old.split(".")[1]) is module
  assert records.recorded_module(new) == old


def test_kdjax_losses_exports_every_loss():
  from kdjax import losses  # pylint: disable=g-import-not-at-top
  for module in (losses.divergences, losses.topk, losses.chunked):
    for name in module.__all__:
      assert getattr(losses, name) is getattr(module, name), name
      assert name in losses.__all__, name


def _documented_modules():
  text = (ROOT / "docs" / "api.rst").read_text()
  return re.findall(r"^\.\. automodule:: ([\w.]+)", text, re.M)


def test_every_exported_name_is_in_the_api_reference():
  documented = set(_documented_modules())
  missing = []
  for name in kdjax.__all__:
    obj = getattr(kdjax, name)
    if isinstance(obj, types.ModuleType):
      ok = obj.__name__ in documented
    else:
      home = importlib.import_module(obj.__module__)
      ok = obj.__module__ in documented and name in home.__all__
    if not ok:
      missing.append(name)
  assert not missing


def test_the_api_reference_has_no_dead_names():
  modules = _documented_modules()
  assert "kdjax.paper" in modules and "kdjax.losses.topk" in modules
  for name in modules:
    module = importlib.import_module(name)
    assert module.__name__ == name, f"{name} is an alias of {module.__name__}"
    for member in getattr(module, "__all__", ()):
      assert hasattr(module, member), f"{name}.{member}"
