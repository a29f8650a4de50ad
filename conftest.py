"""Root pytest setup, loaded before any test module or doctest imports jax.

Eight virtual CPU devices let the pmap and sharded-jit forms of the train
step run on a CPU-only machine.

``kdjax.fit``'s default mesh is every device (data parallel, see
:mod:`kdjax.mesh`). Tests written for one device keep it: each test runs
with a one-device default mesh unless it is marked ``all_devices``, where
``fit(mesh=None)`` sees all 8 devices, as a user's program would.

Tests come in two tiers: ``make test`` runs the unit tier
(``-m "not integration"``), ``make test-all`` both. A test still marked
``slow`` (the marker's old name) is in the integration tier too.
"""
import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The deprecated module names (kdjax.train, kdjax.trainer, kdjax.hostdata,
# and the old names of the modules that moved into kdjax.losses and
# kdjax.paper) are aliases of other modules: each replaces itself in
# sys.modules. Their doctests are collected from the modules they stand for.
_ROOT = pathlib.Path(__file__).resolve().parent
collect_ignore = [
    str(path.relative_to(_ROOT))
    for path in sorted((_ROOT / "kdjax").glob("*.py"))
    if "sys.modules[__name__] = " in path.read_text()]


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker("slow"):
      item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _one_device_default_mesh(request):
  if request.node.get_closest_marker("all_devices") is not None:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import mesh  # pylint: disable=g-import-not-at-top
  with mesh.use_default_mesh(mesh.make_mesh(devices=jax.devices()[:1])):
    yield
