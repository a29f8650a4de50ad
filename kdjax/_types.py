"""Type aliases shared by kdjax's modules (annotations only)."""

from typing import Any

# A nested structure of arrays that jax.tree_util can flatten (dicts, lists,
# tuples, dataclasses such as kdjax.TrainState, ...). As in optax and chex,
# an alias for documentation, not a checked type.
PyTree = Any

__all__ = ["PyTree"]
