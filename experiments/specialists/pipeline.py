"""The paper's Section 5 on the 100-class MNIST pairs, end to end.

``run(config, workdir)`` does, for every seed in ``config.seeds``:

1. trains a **generalist** MLP on the training pairs (:func:`kdjax.fit`,
   ``objective="hard"``);
2. finds ``num_clusters`` **confusable subsets** by k-means on the
   covariance of its predicted probabilities on the *validation* pairs
   (:func:`kdjax.specialists.confusable_clusters`), plus any hand-given
   ``config.specialists.extra_subsets`` (they may overlap);
3. trains one **specialist** per subset, started from the generalist with
   its output layer cut to the subset plus a dustbin, on data that is half
   from its subset and half from the rest; specialists of one subset size
   are trained together as one vmapped program
   (:func:`kdjax.specialists.train_specialists`); their dustbin logits are
   then corrected for the oversampling
   (:func:`kdjax.specialists.dustbin_shift`);
4. **combines** generalist and active specialists on the *test* pairs by
   the paper's eq. 5 (:func:`kdjax.specialists.combine`).

The test set chooses nothing: the clusters come from the validation split,
every reported number is the last epoch's.

``results.json``::

  {"config", "git_commit", "device", "environment", "total_seconds",
   "rows": [{"name": "generalist", "test_errors": [per seed],
             "conditional_accuracy": [per seed], "num_conditional": [...]},
            {"name": "generalist_plus_specialists", ...same keys...}],
   "seeds": [{"seed", "subsets", "dustbin_shifts", "specialist_losses",
              "by_covering": [{"num_covering", "num_test",
                               "generalist_correct", "combined_correct",
                               "delta_correct", "relative_accuracy_change"}],
              "seconds"}]}

*Conditional accuracy* is the accuracy on the test pairs whose true class
belongs to at least one **active** specialist's subset (the pairs the
specialists were asked about). ``by_covering`` groups the test pairs by the
number of active specialists whose subset holds the true class (the
paper's Table 4) and gives, per group, the change in correct top-1
predictions from the generalist to the combination.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.specialists import data as pair_data
from kdjax import models, provenance, specialists as sp
from kdjax.train import TrainState
from kdjax.trainer import fit

NUM_CLASSES = pair_data.NUM_CLASSES
IMAGE_SHAPE = (28, 56)


def _adam(lr: float, total_steps: int):
  return optax.adam(optax.cosine_decay_schedule(lr, max(total_steps, 1)))


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(apply, params, images):
  return apply(params, images, False, None)


def predict(apply, params, images, chunk: int = 2000) -> np.ndarray:
  """Eval-mode logits ``[N, C]`` in chunks (float32, on the host)."""
  return np.concatenate([np.asarray(_logits(apply, params,
                                            jnp.asarray(images[i:i + chunk])))
                         for i in range(0, len(images), chunk)])


def _softmax(logits) -> np.ndarray:
  return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def train_generalist(config, train: pair_data.Pairs, seed: int):
  """The generalist: an MLP over all 100 classes, hard labels."""
  g = config.generalist
  net = models.MLP(tuple(g.hidden), num_classes=NUM_CLASSES)
  apply = models.linen_student_apply(net)
  key = jax.random.key(seed)
  params = models.init_params(net, jax.random.fold_in(key, 0),
                              input_shape=(1,) + IMAGE_SHAPE)
  steps = g.epochs * (len(train) // g.batch_size)
  state = TrainState.create(apply_fn=apply, params=params,
                            tx=_adam(g.lr, steps))
  state, _ = fit(state, None, {"image": jnp.asarray(train.images),
                               "label": jnp.asarray(train.labels)},
                 epochs=g.epochs, batch_size=g.batch_size,
                 rng=jax.random.fold_in(key, 1), objective="hard",
                 progress=False, desc="generalist")
  return apply, state.params


def train_all_specialists(config, generalist_params, subsets, train, seed):
  """Every specialist, vmapped per subset size; returns a list of (apply, params)."""
  s = config.specialists
  hidden = tuple(config.generalist.hidden)
  idx, lab, sdata = sp.specialist_datasets(
      train.labels, subsets, num_examples=s.num_examples, seed=1000 * seed,
      fraction_in_subset=s.fraction_in_subset, num_classes=NUM_CLASSES)
  images = jnp.asarray(train.images)
  key = jax.random.key(seed)
  out = [None] * len(subsets)
  loss_hist = [None] * len(subsets)
  for k in sorted({len(sub) for sub in subsets}):
    group = [m for m, sub in enumerate(subsets) if len(sub) == k]
    apply = models.linen_student_apply(models.MLP(hidden, num_classes=k + 1))
    params = sp.stack_params([sp.init_from_generalist(generalist_params,
                                                      subsets[m])
                              for m in group])
    steps = s.epochs * (s.num_examples // s.batch_size)
    rngs = jnp.stack([jax.random.fold_in(key, 100 + m) for m in group])
    params, hist = sp.train_specialists(
        apply, params, images, idx[group], lab[group],
        tx=_adam(s.lr, steps), epochs=s.epochs, batch_size=s.batch_size,
        rngs=rngs)
    for j, m in enumerate(group):
      out[m] = (apply, sp.unstack_params(params, j))
      loss_hist[m] = np.asarray(hist[j]).tolist()
  return out, sdata, loss_hist


def evaluate(p_g, q, labels, subsets, active):
  """Errors, conditional accuracies and the by-covering table."""
  labels = np.asarray(labels)
  g_ok = np.argmax(p_g, -1) == labels
  c_ok = np.argmax(q, -1) == labels
  member = np.zeros((len(subsets), NUM_CLASSES), bool)
  for m, sub in enumerate(subsets):
    member[m, sub] = True
  covering = np.sum(np.asarray(active) & member[:, labels].T, axis=1)
  cond = covering > 0
  table = []
  for k in range(int(covering.max(initial=0)) + 1):
    rows = covering == k
    if not rows.any():
      continue
    gc, cc = int(g_ok[rows].sum()), int(c_ok[rows].sum())
    table.append({"num_covering": k, "num_test": int(rows.sum()),
                  "generalist_correct": gc, "combined_correct": cc,
                  "delta_correct": cc - gc,
                  "relative_accuracy_change": (cc - gc) / gc if gc else None})

  def cond_acc(ok):
    return float(ok[cond].mean()) if cond.any() else None

  return {"generalist_errors": int((~g_ok).sum()),
          "combined_errors": int((~c_ok).sum()),
          "generalist_conditional_accuracy": cond_acc(g_ok),
          "combined_conditional_accuracy": cond_acc(c_ok),
          "num_conditional": int(cond.sum()), "by_covering": table}


def run_seed(config, pairs, seed: int) -> dict:
  t0 = time.time()
  apply, params = train_generalist(config, pairs["train"], seed)
  p_val = _softmax(predict(apply, params, pairs["val"].images))
  s = config.specialists
  subsets = list(sp.confusable_clusters(p_val, s.num_clusters,
                                        seed=s.cluster_seed))
  subsets += [list(x) for x in s.extra_subsets]
  subsets = sp.as_subsets(subsets, NUM_CLASSES)
  trained, sdata, loss_hist = train_all_specialists(config, params, subsets,
                                                    pairs["train"], seed)
  test = pairs["test"]
  p_g = _softmax(predict(apply, params, test.images))
  spec_probs = [_softmax(sp.correct_dustbin(predict(a, p, test.images),
                                            d.dustbin_shift))
                for (a, p), d in zip(trained, sdata)]
  c = config.combine
  active = np.asarray(sp.active_specialists(p_g, subsets, top_n=c.top_n))
  q = np.asarray(sp.combine(p_g, spec_probs, subsets, active=active,
                            num_steps=c.num_steps,
                            learning_rate=c.learning_rate))
  metrics = evaluate(p_g, q, test.labels, subsets, active)
  metrics.update(seed=int(seed), subsets=[x.tolist() for x in subsets],
                 dustbin_shifts=[float(d.dustbin_shift) for d in sdata],
                 specialist_losses=loss_hist,
                 mean_active=float(active.sum(1).mean()),
                 seconds=time.time() - t0)
  return metrics


def run(config, workdir) -> dict:
  """Runs every seed and writes ``<workdir>/results.json``; returns it."""
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  pairs = pair_data.load_pair_splits(
      config.data_dir or None, config.train_pairs, config.val_pairs,
      config.test_pairs, seed=config.pair_seed, num_val=config.num_val,
      split_seed=config.split_seed)
  seeds = [run_seed(config, pairs, int(s)) for s in config.seeds]
  rows = []
  for name, prefix in (("generalist", "generalist"),
                       ("generalist_plus_specialists", "combined")):
    rows.append({
        "name": name,
        "test_errors": [r[f"{prefix}_errors"] for r in seeds],
        "conditional_accuracy": [r[f"{prefix}_conditional_accuracy"]
                                 for r in seeds],
        "num_conditional": [r["num_conditional"] for r in seeds],
        "num_test": len(pairs["test"])})
  results = {
      "config": config.to_dict(),
      "git_commit": provenance.git_commit(str(pathlib.Path(__file__).parent)),
      "device": provenance.device_description(),
      "environment": provenance.environment(),
      "total_seconds": time.time() - t0,
      "rows": rows,
      "seeds": seeds,
  }
  (workdir / "results.json").write_text(
      json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
  return results
