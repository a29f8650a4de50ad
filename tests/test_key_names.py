"""Leaf names (checkpoint.leaf_specs, constraints) are those fit.json records.

``leaf_specs`` and ``constraints.default_predicate`` name key-path entries
with ``jax.tree_util.keystr(..., simple=True)``; each module had its own
``_key_name`` before. The names are in the ``fit.json`` of every workdir, so
they must not change: these tests compare them with the old function.
"""
import collections
import dataclasses

import flax
import jax
import numpy as np
import optax

from kdjax import checkpoint, train
from kdjax.paper import constraints, models


def _old_key_name(key) -> str:
  """kdjax.checkpoint._key_name before it was replaced by keystr."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _old_leaf_names(tree) -> list[str]:
  return [".".join(_old_key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _train_state():
  net = models.paper_student(width=8)
  shapes = jax.eval_shape(
      lambda: models.init_params(net, jax.random.key(0), (1, 28, 28)))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                  shapes)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.sgd(0.1, momentum=0.9))
  return train.TrainState.create(apply_fn=lambda p, x, train, rng: x,
                                 params=params, tx=tx,
                                 temperature=2.0, alpha=0.5)


@flax.struct.dataclass
class _Pair:
  first: np.ndarray
  second: dict


@dataclasses.dataclass
class _Opaque:  # not a pytree: a leaf
  value: int


_NT = collections.namedtuple("_NT", ["mu", "nu"])


def test_train_state_names_are_unchanged():
  state = _train_state()
  specs = checkpoint.leaf_specs(state)
  assert list(specs) == _old_leaf_names(state)
  assert specs["params.hidden_0.kernel"] == "(784, 8) float32"
  assert specs["opt_state.1.0.trace.logits.bias"] == "(10,) float32"
  # The hyperparameters moved into state.hparams (issue #19); fit.json
  # records and checkpoints of the old names ("temperature", "alpha") are
  # read by kdjax.hparams (tests/test_hparams.py resumes such a workdir).
  assert {"step", "hparams.temperature", "hparams.alpha", "skipped"} <= set(
      specs)


def test_names_of_dicts_lists_tuples_dataclasses_are_unchanged():
  z = np.zeros(2, np.float32)
  tree = {"a": [z, (z, {"b": z})], "ints": {3: z, 10: z}, "nt": _NT(z, z),
          "pair": _Pair(first=z, second={"c": [z]}),
          "frozen": flax.core.FrozenDict({"d": z})}
  specs = checkpoint.leaf_specs(tree)
  assert list(specs) == _old_leaf_names(tree)
  assert sorted(specs) == sorted([
      "a.0", "a.1.0", "a.1.1.b", "frozen.d", "ints.10", "ints.3", "nt.mu",
      "nt.nu", "pair.first", "pair.second.c.0"])


def test_vmapped_sweep_state_names_are_unchanged():
  state = _train_state()
  stacked = jax.tree_util.tree_map(lambda x: np.stack([x, x]), state)
  assert list(checkpoint.leaf_specs(stacked)) == _old_leaf_names(stacked)


def test_default_predicate_picks_kernels_by_their_last_key():
  state = _train_state()
  picked = [jax.tree_util.keystr(path, simple=True, separator=".")
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                state.params)[0]
            if constraints.default_predicate(path, leaf)]
  assert picked == ["hidden_0.kernel", "hidden_1.kernel", "logits.kernel"]
  z = np.zeros((2, 2))
  path = jax.tree_util.tree_flatten_with_path(_Pair(z, {}))[0][0][0]
  assert not constraints.default_predicate(path, z)  # an attribute 'first'
  assert not constraints.default_predicate((), z)
  kernel_path = (jax.tree_util.DictKey("kernel"),)
  assert constraints.default_predicate(kernel_path, z)
  assert constraints.default_predicate(list(kernel_path), z)
  assert not constraints.default_predicate(kernel_path, np.zeros(2))
  assert _old_key_name(_Opaque(1)) == str(_Opaque(1))  # the old fallback
