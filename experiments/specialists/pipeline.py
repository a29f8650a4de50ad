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
4. trains one **soft specialist** per subset (the paper's Section 6
   proposal, :func:`train_soft_specialists`): a full softmax over the 100
   classes, started from the generalist, on the same examples, with hard
   targets for its subset's classes and the generalist's soft targets
   (``T^2 KL`` at temperature ``T``) for the others; the classes outside
   the subset get the same prior correction as the dustbin;
5. **combines** generalist and active specialists on the *test* pairs by
   the paper's eq. 5: :func:`kdjax.specialists.combine` for the dustbin
   specialists, its closed form (the arithmetic mean of the active full
   distributions, :func:`combine_full`) for the soft ones.

**Choices on validation.** ``specialists.normalize_columns`` (k-means on
the raw or the unit-normalised covariance columns, which sets the
clusters' sizes: raw columns put most classes in one large cluster),
``specialists.num_clusters``, ``combine.top_n`` and ``combine.num_steps``
are grids: the first seed trains the specialists for every (normalize,
number of clusters) and keeps the (normalize, num_clusters, top_n,
num_steps) whose combination makes the fewest errors
on the validation pairs (ties: the first in grid order); then the soft
specialists' ``T`` (``soft.temperatures``) and their ``top_n`` likewise, on
the chosen clusters. The other seeds reuse the choice (their clusters are
their own generalist's, found on validation). The test set chooses
nothing; every reported number is the last epoch's.

``results.json``::

  {"config", "git_commit", "jax_version", "device", "environment",
   "command", "total_seconds", "choice", "chosen_on",
   "rows": [{"name", "test_errors": [per seed], "val_errors": [per seed],
             "conditional_accuracy": [per seed], "num_conditional": [...],
             "num_test"}] for generalist, generalist_plus_specialists,
             generalist_plus_soft_specialists,
   "seeds": [{"seed", "subsets", "choice", "selection" (first seed: the
              grids and their validation errors), "dustbin_shifts",
              "specialist_losses", "soft_specialist_losses",
              "by_covering": [{"num_covering", "num_test",
                               "generalist_correct", "combined_correct",
                               "delta_correct", "relative_accuracy_change"}],
              "soft": {"combined_errors", "by_covering", ...},
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
import itertools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.specialists import data as pair_data
import kdjax.loop
from kdjax import checkpoint, losses, specialists as sp
from kdjax.paper import models, provenance
from kdjax.step import TrainState
from kdjax.fitting import fit

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
                 rng=jax.random.fold_in(key, 1), spec="hard",
                 progress=False, desc="generalist")
  return apply, state.params


def train_all_specialists(config, generalist_params, subsets, train, seed):
  """Every specialist, vmapped per subset size: a list of (apply, params)."""
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


# ----------------------------------------------------------------------------
# Soft specialists (the paper's Section 6 proposal): a full softmax.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _soft_train_fn(apply_fn, tx, epochs, batch_size):
  """The jitted run of :func:`train_soft_specialists`, vmapped over members."""

  def one(params, images, g_logits, idx, y, in_subset, temperature, key):

    def loss_fn(p, x, t, v):
      z = apply_fn(p, x, False, None)
      hard = losses.hard_label_loss(z, t)
      soft = losses.distillation_loss(z, v, temperature)  # T^2 KL(p_g || q)
      return jnp.mean(jnp.where(in_subset[t], hard, soft))

    def step(carry, b):
      p, opt = carry
      i = jnp.take(idx, b)
      loss, grads = jax.value_and_grad(loss_fn)(
          p, jnp.take(images, i, axis=0), jnp.take(y, b),
          jnp.take(g_logits, i, axis=0))
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), loss

    # The epochs are kdjax's (kdjax.loop.scan_epochs): epoch e permutes the
    # member's examples with fold_in(key, e).
    (params, _), epoch_losses = kdjax.loop.scan_epochs(
        step, (params, tx.init(params)), key=key, epochs=epochs,
        num_examples=idx.shape[0], batch_size=batch_size)
    return params, epoch_losses

  return jax.jit(jax.vmap(one, in_axes=(0, None, None, 0, 0, 0, 0, 0)))


def train_soft_specialists(config, generalist_params, g_train_logits, subsets,
                           train, seed, temperatures):
  r"""Full-softmax specialists, one per (temperature, subset), one program.

  Specialist ``m`` starts as the generalist (all 100 outputs), sees the
  same examples as the dustbin specialist of its subset (half from the
  subset, :func:`kdjax.specialists.specialist_datasets`) and minimises, per
  example,

  .. math::
    \ell = \begin{cases} -\log q_y & y \in S^m \\
      T^2\,\mathrm{KL}(p^g_T \,\|\, q_T) & y \notin S^m \end{cases}

  (hard targets for its own classes, the generalist's tempered soft targets
  for the others; :func:`kdjax.losses.distillation_loss`), averaged over
  the batch.

  Returns:
    ``(apply, [[params per subset] per temperature], sdata, losses)``.
  """
  s = config.specialists
  net = models.MLP(tuple(config.generalist.hidden), num_classes=NUM_CLASSES)
  apply = models.linen_student_apply(net)
  idx, _, sdata = sp.specialist_datasets(
      train.labels, subsets, num_examples=s.num_examples, seed=1000 * seed,
      fraction_in_subset=s.fraction_in_subset, num_classes=NUM_CLASSES)
  labels = np.asarray(train.labels)[idx]
  member = np.zeros((len(subsets), NUM_CLASSES), bool)
  for m, sub in enumerate(subsets):
    member[m, sub] = True
  num_t, num_m = len(temperatures), len(subsets)
  rep = lambda a: np.concatenate([a] * num_t)
  temps = np.repeat(np.asarray(temperatures, np.float32), num_m)
  key = jax.random.key(seed)
  rngs = jnp.stack([jax.random.fold_in(key, 100 + m)
                    for _ in range(num_t) for m in range(num_m)])
  params = sp.stack_params([generalist_params] * (num_t * num_m))
  steps = s.epochs * (s.num_examples // s.batch_size)
  run = _soft_train_fn(apply, _adam(s.lr, steps), s.epochs, s.batch_size)
  params, hist = run(params, jnp.asarray(train.images),
                     jnp.asarray(g_train_logits), jnp.asarray(rep(idx)),
                     jnp.asarray(rep(labels)), jnp.asarray(rep(member)),
                     jnp.asarray(temps), rngs)
  out = [[sp.unstack_params(params, t * num_m + m) for m in range(num_m)]
         for t in range(num_t)]
  return apply, out, sdata, np.asarray(hist).tolist()


def soft_specialist_probs(apply, params_list, sdata, subsets, images):
  """Full distributions, prior-corrected like the dustbin.

  The subset was oversampled in training (share ``s'`` instead of ``s``),
  so every class outside it gets the dustbin's correction
  (:func:`kdjax.specialists.dustbin_shift`) added to its logit.
  """
  out = []
  for p, d, sub in zip(params_list, sdata, subsets):
    outside = np.ones(NUM_CLASSES, np.float32)
    outside[sub] = 0.0
    z = predict(apply, p, images) + float(d.dustbin_shift) * outside
    out.append(_softmax(z))
  return out


def combine_full(p_g, full_probs, active) -> np.ndarray:
  r"""Eq. 5 when every specialist is a full distribution over the classes.

  :math:`\min_q \mathrm{KL}(p^g\|q) + \sum_{m\in A}\mathrm{KL}(p^m\|q)` is
  solved in closed form by the arithmetic mean
  :math:`q = (p^g + \sum_{m \in A} p^m) / (1 + |A|)` (what
  :func:`kdjax.specialists.combine` converges to with subsets holding every
  class and empty dustbins; tested).
  """
  active = np.asarray(active, np.float64)
  num = np.asarray(p_g, np.float64) + np.einsum(
      "bm,mbc->bc", active, np.stack(full_probs).astype(np.float64))
  return num / (1.0 + active.sum(1, keepdims=True))


# ----------------------------------------------------------------------------
# One seed: choices on validation, numbers on test.
# ----------------------------------------------------------------------------


def _errors(q, labels) -> int:
  return int(np.sum(np.argmax(q, -1) != np.asarray(labels)))


def _subsets(config, p_val, num_clusters, normalize):
  s = config.specialists
  subsets = list(sp.confusable_clusters(p_val, int(num_clusters),
                                        seed=s.cluster_seed,
                                        normalize=bool(normalize)))
  subsets += [list(x) for x in s.extra_subsets]
  return sp.as_subsets(subsets, NUM_CLASSES)


def _hard_probs(trained, sdata, images):
  return [_softmax(sp.correct_dustbin(predict(a, p, images), d.dustbin_shift))
          for (a, p), d in zip(trained, sdata)]


def run_seed(config, pairs, seed: int, choice=None) -> dict:
  """One seed; ``choice`` None chooses every hyperparameter on validation.

  The grids: ``specialists.num_clusters`` x ``combine.top_n`` x
  ``combine.num_steps`` for the dustbin specialists (validation errors of
  the combination), then ``soft.temperatures`` x ``combine.top_n`` for the
  soft specialists on the chosen clusters. With ``choice`` given (the
  first seed's), the other seeds reuse it (their clusters are still their
  own generalist's, found on validation).
  """
  t0 = time.time()
  train, val, test = pairs["train"], pairs["val"], pairs["test"]
  apply, params = train_generalist(config, train, seed)
  p_val = _softmax(predict(apply, params, val.images))
  p_g = _softmax(predict(apply, params, test.images))
  c = config.combine
  selection = None
  if choice is None:
    grid, cache = [], {}
    for norm, nc in itertools.product(config.specialists.normalize_columns,
                                      config.specialists.num_clusters):
      subsets = _subsets(config, p_val, nc, norm)
      trained, sdata, loss_hist = train_all_specialists(
          config, params, subsets, train, seed)
      cache[(bool(norm), int(nc))] = (subsets, trained, sdata, loss_hist)
      v_probs = _hard_probs(trained, sdata, val.images)
      for top_n in c.top_n:
        act = np.asarray(sp.active_specialists(p_val, subsets, top_n=top_n))
        for steps in c.num_steps:
          q = sp.combine(p_val, v_probs, subsets, active=act,
                         num_steps=int(steps), learning_rate=c.learning_rate)
          grid.append({"normalize_columns": bool(norm),
                       "num_clusters": int(nc), "top_n": int(top_n),
                       "num_steps": int(steps),
                       "val_errors": _errors(q, val.labels)})
    # Ties go to the first in grid order (plain covariance, fewer clusters,
    # smaller top_n, fewer steps).
    best = min(grid, key=lambda g: g["val_errors"])
    choice = {k: best[k] for k in ("normalize_columns", "num_clusters",
                                   "top_n", "num_steps")}
    subsets, trained, sdata, loss_hist = cache[
        (choice["normalize_columns"], choice["num_clusters"])]
    selection = {"seed": int(seed), "grid": grid}
  else:
    subsets = _subsets(config, p_val, choice["num_clusters"],
                       choice["normalize_columns"])
    trained, sdata, loss_hist = train_all_specialists(config, params, subsets,
                                                      train, seed)
  t_hard = time.time() - t0

  # Soft specialists on the same subsets.
  t1 = time.time()
  temps = (list(config.soft.temperatures) if "temperature" not in choice
           else [choice["temperature"]])
  g_train = predict(apply, params, train.images)
  s_apply, s_params, s_sdata, s_hist = train_soft_specialists(
      config, params, g_train, subsets, train, seed, temps)
  if "temperature" not in choice:
    soft_grid = []
    for t, plist in zip(temps, s_params):
      v_probs = soft_specialist_probs(s_apply, plist, s_sdata, subsets,
                                      val.images)
      for top_n in c.top_n:
        act = np.asarray(sp.active_specialists(p_val, subsets, top_n=top_n))
        soft_grid.append({"temperature": float(t), "top_n": int(top_n),
                          "val_errors": _errors(
                              combine_full(p_val, v_probs, act), val.labels)})
    best = min(soft_grid, key=lambda g: g["val_errors"])
    choice = {**choice, "temperature": best["temperature"],
              "soft_top_n": best["top_n"]}
    selection["soft_grid"] = soft_grid
    selection["chosen"] = choice
    t_index = temps.index(choice["temperature"])
  else:
    t_index = 0
  s_params = s_params[t_index]
  t_soft = time.time() - t1

  # Test: the combinations at the chosen settings, and validation errors.
  def hard_combined(p, images):
    act = np.asarray(sp.active_specialists(p, subsets,
                                           top_n=choice["top_n"]))
    probs = _hard_probs(trained, sdata, images)
    q = np.asarray(sp.combine(p, probs, subsets, active=act,
                              num_steps=choice["num_steps"],
                              learning_rate=c.learning_rate))
    return q, act

  def soft_combined(p, images):
    act = np.asarray(sp.active_specialists(p, subsets,
                                           top_n=choice["soft_top_n"]))
    probs = soft_specialist_probs(s_apply, s_params, s_sdata, subsets, images)
    return combine_full(p, probs, act), act

  q, active = hard_combined(p_g, test.images)
  metrics = evaluate(p_g, q, test.labels, subsets, active)
  q_soft, active_soft = soft_combined(p_g, test.images)
  soft = evaluate(p_g, q_soft, test.labels, subsets, active_soft)
  val_q = (hard_combined(p_val, val.images)[0] if selection is None else None)
  metrics.update(
      seed=int(seed), subsets=[x.tolist() for x in subsets],
      choice=choice, selection=selection,
      generalist_val_errors=_errors(p_val, val.labels),
      combined_val_errors=(
          _errors(val_q, val.labels) if val_q is not None
          else min(g["val_errors"] for g in selection["grid"])),
      soft_val_errors=_errors(soft_combined(p_val, val.images)[0],
                              val.labels),
      dustbin_shifts=[float(d.dustbin_shift) for d in sdata],
      specialist_losses=loss_hist, soft_specialist_losses=s_hist,
      mean_active=float(active.sum(1).mean()),
      soft_mean_active=float(active_soft.sum(1).mean()),
      soft={k: soft[k] for k in ("combined_errors",
                                 "combined_conditional_accuracy",
                                 "generalist_conditional_accuracy",
                                 "num_conditional", "by_covering")},
      hard_seconds=round(t_hard, 1), soft_seconds=round(t_soft, 1),
      seconds=round(time.time() - t0, 1))
  return metrics


def run(config, workdir) -> dict:
  """Runs every seed and writes ``<workdir>/results.json`` (+ .md, .png)."""
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  pairs = pair_data.load_pair_splits(
      config.data_dir or None, config.train_pairs, config.val_pairs,
      config.test_pairs, seed=config.pair_seed, num_val=config.num_val,
      split_seed=config.split_seed)
  seeds, choice = [], None
  for s in config.seeds:
    seeds.append(run_seed(config, pairs, int(s), choice))
    choice = seeds[0]["choice"]
    print(f"seed {s}: generalist {seeds[-1]['generalist_errors']}, "
          f"+specialists {seeds[-1]['combined_errors']}, +soft specialists "
          f"{seeds[-1]['soft']['combined_errors']} test errors "
          f"({seeds[-1]['seconds']:.0f}s; choice {choice})", flush=True)
  rows = []
  for name, get, val_key in (
      ("generalist", lambda r: (r["generalist_errors"],
                                r["generalist_conditional_accuracy"]),
       "generalist_val_errors"),
      ("generalist_plus_specialists",
       lambda r: (r["combined_errors"], r["combined_conditional_accuracy"]),
       "combined_val_errors"),
      ("generalist_plus_soft_specialists",
       lambda r: (r["soft"]["combined_errors"],
                  r["soft"]["combined_conditional_accuracy"]),
       "soft_val_errors")):
    rows.append({
        "name": name,
        "test_errors": [get(r)[0] for r in seeds],
        "val_errors": [r[val_key] for r in seeds],
        "conditional_accuracy": [get(r)[1] for r in seeds],
        # The soft row's active set may differ (its own top_n).
        "num_conditional": [
            (r["soft"] if "soft" in name else r)["num_conditional"]
            for r in seeds],
        "num_test": len(pairs["test"])})
  env = provenance.environment()
  results = {
      "config": config.to_dict(),
      "git_commit": provenance.git_commit(str(pathlib.Path(__file__).parent)),
      "jax_version": env["jax_version"],
      "device": provenance.device_description(),
      "environment": env,
      "command": _command_line(),
      "total_seconds": round(time.time() - t0, 1),
      "choice": choice,
      "chosen_on": f"validation, seed {seeds[0]['seed']}",
      "rows": rows,
      "seeds": seeds,
  }
  checkpoint.write_atomic(
      workdir / "results.json",
      json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
  from experiments.specialists import report  # pylint: disable=g-import-not-at-top
  report.write_all(results, workdir)
  return results


def _command_line() -> str:
  import sys  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv)
  if argv and pathlib.PurePath(argv[0]).parent.name == "specialists":
    stem = pathlib.PurePath(argv[0]).stem
    argv[0] = f"python -m experiments.specialists.{stem}"
  return " ".join(argv)
