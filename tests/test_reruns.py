"""Reruns of ``make demo`` reproduce the committed demo of their machine kind.

XLA:CPU compiles for the CPU it runs on: its kernels, and so the float
rounding of every sum, depend on the CPU's vector extensions (AVX2,
AVX-512, ...). A run is bit-identical to another only on the same *kind* of
machine: the same vector extensions, the same host core count and the same
jax, flax and optax versions (``environment`` in results.json, from
:func:`kdjax.paper.provenance.environment`). Results JSONs written before the
CPU was recorded (``quick_cpu.json`` and the older reruns) have no CPU record:
"no record" is a kind of its own, the machine that wrote ``quick_cpu.json``.

* ``results/quick_cpu.json``: the README's demo table, the reference of the
  "no record" kind.
* ``results/machines/quick_cpu_<kind>.json``: the first ``make demo`` on
  another machine kind, the reference of that kind.
* ``results/reruns/quick_cpu_<commit>.json``: ``make demo`` in a clean
  checkout of that commit. Every error count and parameter hash of the
  reference of its kind must be equal in it: the README's "bit for bit"
  rests on this. A rerun of a kind without a reference is an error (commit
  the first run of a new kind under ``machines/``).
"""
import json
import pathlib
import re

import pytest

RESULTS = (pathlib.Path(__file__).resolve().parents[1] / "experiments" /
           "mnist" / "results")
NO_RECORD = "no CPU record"


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


def _host_cores(device) -> int | None:
  """The core count in a device line ``'cpu: ... (x86_64, 2 host cores)'``."""
  found = re.search(r"(\d+) host cores", device or "")
  return int(found.group(1)) if found else None


def machine_kind(results: dict) -> tuple:
  """What must be equal for two runs to be bit-identical.

  The CPU's vector extensions and schedulable cores (or ``NO_RECORD``),
  the device line (it holds the host's core count; XLA:CPU sizes its
  thread pool by the cores it may use) and the versions of jax, flax and
  optax. A CPU that could not be read
  (``vector_extensions`` None) is a kind never equal to another run's.
  """
  env = results.get("environment", {})
  cpu = env.get("cpu")
  if cpu is None:
    isa = NO_RECORD
  elif cpu.get("vector_extensions") is None:
    isa = ("unknown CPU", object())  # equal to no other run's kind
  else:
    # Records from before schedulable_cores (e31cc63) ran on every core.
    cores = cpu.get("schedulable_cores") or _host_cores(env.get("device"))
    isa = (tuple(cpu["vector_extensions"]), cores)
  return (isa, env.get("device"), env.get("jax_version"),
          env.get("flax_version"), env.get("optax_version"))


def _load(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def _references() -> dict:
  """Machine kind -> (path, results) of its reference run."""
  refs = {}
  for path in [RESULTS / "quick_cpu.json",
               *sorted((RESULTS / "machines").glob("quick_cpu_*.json"))]:
    results = _load(path)
    kind = machine_kind(results)
    assert kind not in refs, f"{path.name} and {refs[kind][0].name}: one kind"
    refs[kind] = (path, results)
  return refs


def _assert_bit_identical(path, rerun, ref):
  ref_rows = {r["name"]: r for r in ref["rows"]}
  rows = {r["name"]: r for r in rerun["rows"]}
  assert list(rows) == list(ref_rows), path
  for name, r in ref_rows.items():
    for key in ("test_errors", "val_errors", "errors_on_3"):
      if key in r:
        assert rows[name][key] == r[key], (path.name, name, key)
  for key, sha in ref["params_sha256"].items():
    assert rerun["params_sha256"][key] == sha, (path.name, key)


def test_machine_kind_is_the_vector_extensions_and_versions():
  env = {"jax_version": "0.10.2", "flax_version": "0.12.8",
         "optax_version": "0.2.8",
         "device": "cpu: 1 x cpu (x86_64, 2 host cores)"}
  avx2 = {"model": "AMD EPYC", "vector_extensions": ["avx", "avx2"]}
  other_model = {"model": "Intel Xeon", "vector_extensions": ["avx", "avx2"]}
  avx512 = {"model": "AMD EPYC", "vector_extensions": ["avx2", "avx512f"]}
  kind = lambda **e: machine_kind({"environment": {**env, **e}})
  assert kind() == kind() and kind()[0] == NO_RECORD
  assert kind(cpu=avx2) == kind(cpu=other_model)  # the model is not the kind
  assert kind(cpu=avx2) != kind(cpu=avx512) != kind()
  assert kind(cpu=avx2) != kind(cpu=avx2, jax_version="0.10.3")
  assert kind(cpu=avx2) != kind(cpu={**avx2, "schedulable_cores": 1})
  assert kind(cpu=avx2) == kind(cpu={**avx2, "schedulable_cores": 2})
  assert kind(cpu=avx2) != kind(cpu=avx2,
                                device="cpu: 1 x cpu (x86_64, 8 host cores)")
  unknown = {"model": None, "vector_extensions": None}
  assert kind(cpu=unknown) != kind(cpu=unknown)


@pytest.mark.integration
def test_machine_references_run_the_committed_demo():
  """Each kind's reference is the demo of quick_cpu.json (same config)."""
  refs = _references()
  demo = _load(RESULTS / "quick_cpu.json")
  for path, ref in refs.values():
    assert ref["rows"] and ref["params_sha256"], path
    assert _known_keys(ref["config"], demo["config"]) == demo["config"], path
    if path.parent.name == "machines":
      assert ref["environment"]["cpu"]["vector_extensions"], path


@pytest.mark.integration
def test_reruns_reproduce_the_reference_of_their_kind_bit_for_bit():
  refs = _references()
  reruns = sorted((RESULTS / "reruns").glob("quick_cpu_*.json"))
  assert reruns
  seen = set()
  for path in reruns:
    rerun = _load(path)
    assert path.name == f"quick_cpu_{rerun['git_commit'][:7]}.json", path
    kind = machine_kind(rerun)
    assert kind in refs, (
        f"{path.name}: no reference of its machine kind {kind}; commit the "
        "first run of a kind as results/machines/quick_cpu_<kind>.json")
    ref_path, ref = refs[kind]
    assert _known_keys(rerun["config"], ref["config"]) == ref["config"], path
    _assert_bit_identical(path, rerun, ref)
    seen.add(ref_path.name)
  # Every machine kind's reference has at least one rerun.
  assert seen == {p.name for p, _ in refs.values()}
