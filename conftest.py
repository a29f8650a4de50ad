"""Root pytest setup, loaded before any test module or doctest imports jax.

Eight virtual CPU devices let the pmap and sharded-jit forms of the train
step run on a CPU-only machine.

Tests come in two tiers: ``make test`` runs the unit tier
(``-m "not integration"``), ``make test-all`` both. A test still marked
``slow`` (the marker's old name) is in the integration tier too.
"""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker("slow"):
      item.add_marker(pytest.mark.integration)
