"""Vectorised sweeps: K students trained in one compiled program.

Because :class:`kdjax.train.TrainState` carries the objective's
hyperparameters as arrays (``state.hparams``: temperature, alpha, beta,
...), a ``jax.vmap`` over a stacked state is a sweep over seeds and any of
them: the paper's temperature sweep becomes one run.

>>> import jax, jax.numpy as jnp, optax
>>> from kdjax import sweep, train
>>> def init(rng, temperature, alpha):
...   params = {"w": jax.random.normal(rng, (4, 3))}
...   return train.TrainState.create(
...       apply_fn=lambda p, x, train, rng: x @ p["w"], params=params,
...       tx=optax.sgd(0.1), temperature=temperature, alpha=alpha)
>>> states = sweep.create_sweep(init, seeds=[0, 1], temperatures=[2.0, 20.0],
...                             alphas=[0.1, 0.1])
>>> states.temperature
Array([ 2., 20.], dtype=float32)

Any other hyperparameter is swept by name, with an ``init(rng)`` that
builds one member's state (here the JSD's ``beta``, read by the objective
``"jsd"``):

>>> def init_one(rng):
...   params = {"w": jax.random.normal(rng, (4, 3))}
...   return train.TrainState.create(
...       apply_fn=lambda p, x, train, rng: x @ p["w"], params=params,
...       tx=optax.sgd(0.1), temperature=2.0)
>>> states = sweep.create_sweep(init_one, seeds=[0, 0],
...                             hparams={"beta": [0.1, 0.9]})
>>> states.hparams["beta"]
Array([0.1, 0.9], dtype=float32)

Each member of a sweep is the same run done alone, to float32 rounding
(tested to rtol 1e-5 over an epoch): members share the teacher and the data
but have their own key, hence their own initialisation, dropout masks and
data order. Batched and solo matmuls round differently, so over many
epochs a member and its solo run drift apart (the README's tuning section
has one: 94 validation errors solo, 107 as a member, after 40 epochs).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import hparams as hparams_lib
from kdjax._types import PyTree

__all__ = ["create_sweep", "sweep_keys", "vmap_epoch", "vmap_step", "member",
           "num_members"]



def sweep_keys(seeds: Sequence[int]) -> jax.Array:
  """One base key per member: ``jax.random.key(seed)`` stacked."""
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


def create_sweep(init_fn: Callable, *, seeds: Sequence[int],
                 temperatures: Optional[Sequence[float]] = None,
                 alphas: Optional[Sequence[float]] = None,
                 hparams: Optional[Mapping[str, Sequence[float]]] = None
                 ) -> PyTree:
  """Stacked initial states, one per member.

  Two forms:

  * ``create_sweep(init_fn, seeds=, temperatures=, alphas=)``:
    ``init_fn(rng, temperature, alpha) -> TrainState`` makes member ``i``
    from ``seeds[i]``, ``temperatures[i]`` and ``alphas[i]``.
  * ``create_sweep(init_fn, seeds=, hparams={name: values})``:
    ``init_fn(rng) -> TrainState`` makes a member from its seed, and
    member ``i`` then holds ``values[i]`` for each ``name`` (added to the
    state's ``hparams`` or replacing the value there). A name may not be
    one of the state's schedules.

  Args:
    init_fn: see above; it is vmapped, so it must be traceable (the
      temperature and alpha of the first form arrive as tracers).
    seeds, temperatures, alphas, hparams: sequences of equal length K (use
      ``itertools.product`` for a grid). The values are checked
      (:func:`kdjax.hparams.check_value`).

  Returns:
    A TrainState whose every array leaf has a leading axis of size K.
  """
  k = len(seeds)
  if hparams is not None and (temperatures is not None or
                              alphas is not None):
    raise ValueError("pass either temperatures= and alphas= (init_fn(rng, "
                     "temperature, alpha)) or hparams= (init_fn(rng)), not "
                     "both; put the temperatures and alphas in hparams.")
  legacy = hparams is None
  swept = ({"temperature": temperatures, "alpha": alphas} if legacy
           else dict(hparams))
  lengths = {name: None if v is None else len(v) for name, v in
             swept.items()}
  if not k or any(n != k for n in lengths.values()):
    what = ", ".join(f"{name}: {n}" for name, n in lengths.items())
    raise ValueError(
        f"seeds and the swept values must be non-empty and of equal length, "
        f"got seeds: {k}, {what}.")
  for name, values in swept.items():
    hparams_lib.check_name(name)
    for v in values:
      hparams_lib.check_value(name, float(v))
  keys = sweep_keys(seeds)
  columns = {name: jnp.asarray(v, jnp.float32) for name, v in swept.items()}
  if legacy:
    return jax.jit(jax.vmap(init_fn))(keys, columns["temperature"],
                                      columns["alpha"])

  def init(rng, values):
    state = init_fn(rng)
    scheduled = sorted(set(values) & {n for n, _ in state.schedules})
    if scheduled:
      raise ValueError(f"hyperparameter(s) {scheduled} are schedules in the "
                       "state init_fn returns; sweep either the schedule or "
                       "the value, not both.")
    return state.replace(hparams={**state.hparams, **values})

  return jax.jit(jax.vmap(init))(keys, columns)


def vmap_epoch(epoch_fn: Callable) -> Callable:
  """``epoch_fn`` mapped over stacked states and per-member keys.

  The teacher, the data and the epoch index are shared (``in_axes=None``).
  """
  return jax.vmap(epoch_fn, in_axes=(0, None, None, 0, None))


def vmap_step(step: Callable) -> Callable:
  """A train step mapped over stacked states and per-member keys."""
  return jax.vmap(step, in_axes=(0, None, None, 0))


def num_members(states: PyTree) -> int:
  return int(np.shape(states.step)[0])


def member(states: PyTree, i: int) -> PyTree:
  """The ``i``-th member of a stacked sweep state."""
  return jax.tree.map(lambda x: x[i], states)
