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

Each pytest process (each xdist worker) keeps JAX's persistent compilation
cache in a fresh temporary directory of its own, removed at the end: a
computation compiled again in a later test (the same train step built anew,
the same tiny net in another test) is loaded instead of recompiled. It is
the same executable, so no number changes; subprocesses do not use it
(it is set with ``jax.config``, not the environment), and nothing is kept
between runs. ``KDJAX_TEST_XLA_CACHE=0`` turns it off.

Hypothesis profiles: ``unit`` (the default) draws few examples of the
property tests whose examples each compile (new shapes); ``thorough``
(``make test-all``: ``--hypothesis-profile=thorough``) draws more. Both
draw at random each run, so either can fail.
"""
import os
import pathlib
import shutil
import tempfile

import hypothesis
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

hypothesis.settings.register_profile("unit", max_examples=6, deadline=None)
hypothesis.settings.register_profile("thorough", max_examples=25,
                                     deadline=None)
hypothesis.settings.load_profile("unit")  # --hypothesis-profile overrides.

# The deprecated module names (kdjax.train, kdjax.trainer, kdjax.hostdata,
# and the old names of the modules that moved into kdjax.losses and
# kdjax.paper) are aliases of other modules: each replaces itself in
# sys.modules. Their doctests are collected from the modules they stand for.
_ROOT = pathlib.Path(__file__).resolve().parent
collect_ignore = [
    str(path.relative_to(_ROOT))
    for path in sorted((_ROOT / "kdjax").glob("*.py"))
    if "sys.modules[__name__] = " in path.read_text()]


def pytest_configure(config):
  if os.environ.get("KDJAX_TEST_XLA_CACHE", "1") == "0":
    return
  import jax  # pylint: disable=g-import-not-at-top
  cache = tempfile.mkdtemp(prefix="kdjax-test-xla-cache-")
  config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
