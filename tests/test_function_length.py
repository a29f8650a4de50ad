"""No function in kdjax/ is longer than 100 lines (issue #19).

A long function with many flags at the centre of a library is where each
new capability became one more keyword; the engine is built from small
functions instead. Parsed with ``ast`` (nothing is imported), nested
functions counted on their own and inside their parent.
"""
import ast
import pathlib

LIMIT = 100
ROOT = pathlib.Path(__file__).resolve().parent.parent / "kdjax"


def long_functions(root: pathlib.Path = ROOT, limit: int = LIMIT):
  """``[(file:line name, length)]`` of every function over ``limit`` lines."""
  out = []
  for path in sorted(root.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        length = node.end_lineno - first + 1
        if length > limit:
          out.append((f"{path.relative_to(root.parent)}:{node.lineno} "
                      f"{node.name}", length))
  return out


def test_no_function_over_100_lines():
  assert long_functions() == []


def test_the_checker_finds_a_long_function(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(LIMIT))
  (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
  (tmp_path / "short.py").write_text("def g():\n  return 1\n")
  found = long_functions(tmp_path)
  assert [(name.split()[-1], n) for name, n in found] == [("f", LIMIT + 1)]
