"""Root pytest setup, loaded before any test module or doctest imports jax.

Eight virtual CPU devices let the pmap and sharded-jit forms of the train
step run on a CPU-only machine.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
