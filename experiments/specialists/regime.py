r"""Section 5 in the paper's regime: a generalist that underfits abundant data.

The first run (:mod:`experiments.specialists.pipeline`, 20k fixed pairs)
could not test the paper's claim: its generalist was starved of data (it
fitted its 20k pairs) and its specialists, fine-tuned on the same pairs,
added no data. Here, ``run(config, workdir)`` does, for every seed:

1. **Generalist.** A network of deliberately limited capacity
   (``config.generalist.model``, e.g. a 64-unit MLP) trained on pairs drawn
   afresh each epoch from the training split's own images
   (:class:`experiments.specialists.data.FreshPairs`; 50k² possible pairs,
   so it sees almost no pair twice and cannot overfit them: it underfits,
   which the run measures as its error on fresh training pairs beside its
   validation error). Validation and test pairs are fixed, each from its
   own split's images.
2. **Subsets.** Candidate families, each a list of class subsets: the
   task's natural overlapping row/column families (``a*`` and ``*b``,
   :func:`~experiments.specialists.data.row_column_families`) and
   data-driven partitions from the generalist's *validation* predictions
   (:func:`kdjax.specialists.spectral_clusters`, the co-prediction matrix
   with its diagonal removed; or :func:`~kdjax.specialists.\
confusable_clusters` with ``remove_diagonal`` and ``normalize``).
3. **Dustbin specialists**, one per subset, each as big as the generalist
   (the same model with ``k + 1`` outputs), started from the generalist
   with its output layer cut (:func:`kdjax.specialists.init_from_generalist`)
   and trained on their own fresh pairs, half from their subset
   (:func:`~experiments.specialists.data.subset_probs`); dustbin logits
   then raised by the exact prior shift
   (:func:`kdjax.specialists.dustbin_shift`). They add capacity (one more
   generalist-sized net per subset) where the confusions are.
4. **Soft specialists** (the paper's §6): a full softmax, started from the
   generalist, on the same fresh pairs, hard labels for their subset's
   classes and the generalist's tempered soft targets (online teacher,
   ``T^2 KL``) for the rest; classes outside the subset get the dustbin's
   prior shift. Combined by eq. 5's closed form (the arithmetic mean).
5. **Controls.** ``compute``: the generalist trained further, from the same
   start as the specialists, on as many fresh pairs as all the specialists
   together (same parameters, the specialists' training compute). ``wide``
   (optional): a generalist with ``1 + M`` times the hidden units (about
   the whole system's parameters), from scratch, on as many pairs as give
   it the whole system's training compute (parameters x examples).

**Choices on validation** (seed 0 only; the other seeds reuse them, with
their own clusters found on their own validation predictions): the
family (by the dustbin combination's validation errors, over ``top_n``),
then the soft specialists' ``T`` and ``top_n``. The test set chooses
nothing; numbers are last-epoch.

Every network is trained by :func:`kdjax.fit` on a host source (the fresh
pairs; one specialist per call). This file holds no training loop.
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
from experiments.specialists import pipeline
from kdjax import checkpoint, losses, objectives
from kdjax.paper import models, provenance
from kdjax import specialists as sp
from kdjax.fields import Fields
from kdjax.teacher import Teacher
from kdjax.fitting import fit
from kdjax.options import StepSpec
from kdjax.step import TrainState

NUM_CLASSES = pair_data.NUM_CLASSES
IMAGE_SHAPE = (28, 56)


# ----------------------------------------------------------------------------
# Models and training (all through kdjax.fit).
# ----------------------------------------------------------------------------


def _model_key(model, scale: int = 1) -> tuple:
  """A hashable description of ``config.generalist.model`` (width x scale)."""
  if model.kind == "mlp":
    return ("mlp", tuple(int(h) * scale for h in model.hidden))
  if model.kind == "cnn":
    return ("cnn", tuple(int(f) for f in model.features),
            int(model.dense) * scale)
  raise ValueError(f"generalist.model.kind must be 'mlp' or 'cnn', got "
                   f"{model.kind!r}.")


@functools.lru_cache(maxsize=64)
def _net(key: tuple, num_classes: int):
  """``(module, apply)``, one apply per architecture (one compilation)."""
  if key[0] == "mlp":
    net = models.MLP(key[1], num_classes=num_classes)
  else:
    net = models.CNN(num_classes=num_classes, features=key[1], dense=key[2])
  return net, models.linen_student_apply(net)


def _init(key: tuple, num_classes: int, rng) -> dict:
  return models.init_params(_net(key, num_classes)[0], rng,
                            input_shape=(1,) + IMAGE_SHAPE)


@functools.lru_cache(maxsize=64)
def _adam(lr: float, total_steps: int):
  """One optimizer object per setting: the state's static ``tx`` is then
  the same, so a second fit of the same architecture does not recompile."""
  return optax.adam(optax.cosine_decay_schedule(lr, max(total_steps, 1)))


def _soft_specialist_loss(s, t, batch, *, temperature, alpha):
  """Per example: hard CE in the subset, ``T^2 KL(p_T || q_T)`` outside."""
  del alpha
  hard = losses.hard_label_loss(s, batch["label"])
  soft = losses.distillation_loss(s, t, temperature)
  return (jnp.where(batch["in_subset"], hard, soft),
          {"hard_loss": hard, "soft_loss": soft})


SOFT_SPECIALIST = objectives.Objective(
    _soft_specialist_loss, name="soft_specialist", needs_teacher=True,
    needs_labels=True)


def train(key: tuple, num_classes: int, params, source, *, epochs: int,
          lr: float, rng, teacher=None, objective="hard",
          temperature: float = 1.0, fields=None, desc: str = "train"):
  """``params`` trained by :func:`kdjax.fit` on ``source``; ``(params,
  per-epoch losses)``. Adam with a cosine decay from ``lr`` to 0."""
  apply = _net(key, num_classes)[1]
  steps = epochs * (source.num_pairs // source.batch_size)
  state = TrainState.create(apply_fn=apply, params=params,
                            tx=_adam(float(lr), int(steps)),
                            temperature=temperature, alpha=0.0)
  state, hist = fit(state, teacher, source, epochs=epochs, rng=rng,
                    spec=StepSpec(objective, fields=fields), progress=False,
                    desc=desc)
  return state.params, [round(float(h["loss"]), 4) for h in hist]


def predict(key, num_classes, params, images) -> np.ndarray:
  return pipeline.predict(_net(key, num_classes)[1], params, images)


# ----------------------------------------------------------------------------
# Subsets.
# ----------------------------------------------------------------------------


def family_subsets(name: str, p_val, seed: int) -> tuple[np.ndarray, ...]:
  """The subsets of candidate family ``name``.

  ``rows_columns``: the 20 overlapping families ``a*``, ``*b``;
  ``spectral_K``: :func:`kdjax.specialists.spectral_clusters` with ``K``
  clusters; ``kmeans_K``: k-means on the covariance columns with the
  diagonal removed and unit-normalised; ``rawkmeans_K``: the paper's raw
  columns (warns: degenerate here).
  """
  if name == "rows_columns":
    subsets = pair_data.row_column_families()
  else:
    kind, _, k = name.rpartition("_")
    if kind == "spectral":
      subsets = sp.spectral_clusters(p_val, int(k), seed=seed)
    elif kind == "kmeans":
      subsets = sp.confusable_clusters(p_val, int(k), seed=seed,
                                       normalize=True, remove_diagonal=True)
    elif kind == "rawkmeans":
      subsets = sp.confusable_clusters(p_val, int(k), seed=seed)
    else:
      raise ValueError(f"unknown subset family {name!r}: use rows_columns, "
                       "spectral_K, kmeans_K or rawkmeans_K.")
  return sp.as_subsets(subsets, NUM_CLASSES)


# ----------------------------------------------------------------------------
# Specialists.
# ----------------------------------------------------------------------------


def _specialist_source(config, train_split, subset, seed, m, in_subset=False):
  s = config.specialists
  images, labels, _ = train_split
  inside = np.zeros(NUM_CLASSES, bool)
  inside[subset] = True
  return pair_data.FreshPairs(
      images, labels, num_pairs=s.pairs_per_epoch, batch_size=s.batch_size,
      seed=[seed, 1, m], probs=pair_data.subset_probs(
          subset, s.fraction_in_subset),
      label_map=(None if in_subset else
                 sp.specialist_labels(np.arange(NUM_CLASSES), subset)),
      in_subset=inside if in_subset else None)


def _shift(config, subset) -> float:
  return float(sp.dustbin_shift(len(subset) / NUM_CLASSES,
                                config.specialists.fraction_in_subset))


def dustbin_specialists(config, key, g_params, subsets, train_split, seed):
  """Trains one dustbin specialist per subset: ``(params list, losses)``."""
  s = config.specialists
  out, hist = [], []
  for m, sub in enumerate(subsets):
    params, h = train(
        key, len(sub) + 1, sp.init_from_generalist(g_params, sub),
        _specialist_source(config, train_split, sub, seed, m),
        epochs=s.epochs, lr=s.lr, rng=jax.random.key(10_000 * seed + m),
        desc=f"specialist {m}")
    out.append(params)
    hist.append(h)
  return out, hist


def dustbin_probs(config, key, params_list, subsets, images):
  return [pipeline._softmax(sp.correct_dustbin(  # pylint: disable=protected-access
      predict(key, len(sub) + 1, p, images), _shift(config, sub)))
          for p, sub in zip(params_list, subsets)]


def soft_specialists(config, key, g_params, subsets, train_split, seed,
                     temperature):
  """Full-softmax specialists (online generalist teacher) per subset."""
  s = config.specialists
  teacher = Teacher.from_fn(_net(key, NUM_CLASSES)[1], g_params)
  out, hist = [], []
  for m, sub in enumerate(subsets):
    params, h = train(
        key, NUM_CLASSES, g_params,
        _specialist_source(config, train_split, sub, seed, m, True),
        epochs=s.epochs, lr=s.lr, rng=jax.random.key(10_000 * seed + m),
        teacher=teacher, objective=SOFT_SPECIALIST,
        temperature=float(temperature), fields=Fields(extra=("in_subset",)),
        desc=f"soft specialist {m}")
    out.append(params)
    hist.append(h)
  return out, hist


def soft_probs(config, key, params_list, subsets, images):
  out = []
  for p, sub in zip(params_list, subsets):
    outside = np.ones(NUM_CLASSES, np.float32)
    outside[sub] = 0.0
    z = predict(key, NUM_CLASSES, p, images) + _shift(config, sub) * outside
    out.append(pipeline._softmax(z))  # pylint: disable=protected-access
  return out


def combine_dustbin(config, p_g, probs, subsets, top_n):
  act = np.asarray(sp.active_specialists(p_g, subsets, top_n=int(top_n)))
  q = np.asarray(sp.combine(p_g, probs, subsets, active=act,
                            num_steps=int(config.combine.num_steps),
                            learning_rate=config.combine.learning_rate))
  return q, act


def combine_soft(p_g, probs, subsets, top_n):
  act = np.asarray(sp.active_specialists(p_g, subsets, top_n=int(top_n)))
  return pipeline.combine_full(p_g, probs, act), act


# ----------------------------------------------------------------------------
# One seed: choices on validation, numbers on test.
# ----------------------------------------------------------------------------


def _errors(q, labels) -> int:
  return int(np.sum(np.argmax(q, -1) != np.asarray(labels)))


def _probs(key, num_classes, params, pairs) -> np.ndarray:
  return pipeline._softmax(predict(key, num_classes, params, pairs.images))  # pylint: disable=protected-access


def _choose_family(config, gkey, g_params, p_val, val, train_split, seed):
  """Every candidate family's specialists; the best on validation."""
  s, grid, cache = config.specialists, [], {}
  for name in s.families:
    subsets = family_subsets(name, p_val, s.cluster_seed)
    params, hist = dustbin_specialists(config, gkey, g_params, subsets,
                                       train_split, seed)
    cache[name] = (subsets, params, hist)
    v_probs = dustbin_probs(config, gkey, params, subsets, val.images)
    for top_n in config.combine.top_n:
      q, _ = combine_dustbin(config, p_val, v_probs, subsets, top_n)
      grid.append({"family": name, "num_specialists": len(subsets),
                   "top_n": int(top_n), "val_errors": _errors(q, val.labels)})
  best = min(grid, key=lambda g: g["val_errors"])  # ties: first in order
  return {"family": best["family"], "top_n": best["top_n"]}, grid, cache


def _choose_soft(config, gkey, g_params, subsets, p_val, val, train_split,
                 seed, choice):
  temps = ([choice["temperature"]] if "temperature" in choice
           else list(config.soft.temperatures))
  grid, cache = [], {}
  for t in temps:
    params, hist = soft_specialists(config, gkey, g_params, subsets,
                                    train_split, seed, t)
    cache[float(t)] = (params, hist)
    v_probs = soft_probs(config, gkey, params, subsets, val.images)
    for top_n in config.combine.top_n:
      q, _ = combine_soft(p_val, v_probs, subsets, top_n)
      grid.append({"temperature": float(t), "top_n": int(top_n),
                   "val_errors": _errors(q, val.labels)})
  if "temperature" in choice:
    best = next(g for g in grid if g["top_n"] == choice["soft_top_n"])
  else:
    best = min(grid, key=lambda g: g["val_errors"])
  return ({"temperature": best["temperature"], "soft_top_n": best["top_n"]},
          grid, cache[best["temperature"]])


def _controls(config, gkey, g_params, subsets, train_split, seed, g_compute,
              spec_compute):
  """The compute-matched generalist and (optionally) the wide one."""
  s, g = config.specialists, config.generalist
  images, labels, _ = train_split
  out = {}
  src = pair_data.FreshPairs(images, labels, num_pairs=s.pairs_per_epoch,
                             batch_size=s.batch_size, seed=[seed, 2])
  out["compute"] = (gkey, train(
      gkey, NUM_CLASSES, g_params, src, epochs=len(subsets) * s.epochs,
      lr=s.lr, rng=jax.random.key(10_000 * seed + 9_999),
      desc="compute-matched generalist"), len(subsets) * s.epochs
                    * s.pairs_per_epoch)
  if config.control.wide:
    wkey = _model_key(g.model, 1 + len(subsets))
    init = _init(wkey, NUM_CLASSES, jax.random.key(seed + 777))
    budget = g_compute + spec_compute
    epochs = max(1, round(budget / models.count_params(init)
                          / g.pairs_per_epoch))
    src = pair_data.FreshPairs(images, labels, num_pairs=g.pairs_per_epoch,
                               batch_size=g.batch_size, seed=[seed, 3])
    out["wide"] = (wkey, train(
        wkey, NUM_CLASSES, init, src, epochs=epochs, lr=g.lr,
        rng=jax.random.key(10_000 * seed + 9_998), desc="wide generalist"),
                   epochs * g.pairs_per_epoch)
  return out


def run_seed(config, data, seed: int, choice=None) -> dict:
  """One seed; ``choice`` None chooses every setting on validation."""
  t0 = time.time()
  train_split, val, test = data["train"], data["val"], data["test"]
  g = config.generalist
  gkey = _model_key(g.model)
  src = pair_data.FreshPairs(train_split[0], train_split[1],
                             num_pairs=g.pairs_per_epoch,
                             batch_size=g.batch_size, seed=[seed, 0])
  g_params, g_hist = train(gkey, NUM_CLASSES, _init(
      gkey, NUM_CLASSES, jax.random.key(seed)), src, epochs=g.epochs,
                           lr=g.lr, rng=jax.random.key(10_000 * seed + 5_000),
                           desc="generalist")
  fresh = pair_data.FreshPairs(train_split[0], train_split[1],
                               num_pairs=len(val), batch_size=len(val),
                               seed=[seed, 4])(0)[0]
  g_fresh_train_errors = _errors(pipeline._softmax(predict(  # pylint: disable=protected-access
      gkey, NUM_CLASSES, g_params, fresh["image"])), fresh["label"])
  p_val, p_g = (_probs(gkey, NUM_CLASSES, g_params, val),
                _probs(gkey, NUM_CLASSES, g_params, test))
  t_g = time.time() - t0
  selection = {}
  if choice is None:
    choice, selection["grid"], cache = _choose_family(
        config, gkey, g_params, p_val, val, train_split, seed)
    subsets, s_params, s_hist = cache[choice["family"]]
  else:
    subsets = family_subsets(choice["family"], p_val,
                             config.specialists.cluster_seed)
    s_params, s_hist = dustbin_specialists(config, gkey, g_params, subsets,
                                           train_split, seed)
  soft_choice, selection["soft_grid"], (f_params, f_hist) = _choose_soft(
      config, gkey, g_params, subsets, p_val, val, train_split, seed, choice)
  choice = {**choice, **soft_choice}
  s = config.specialists
  g_n = models.count_params(g_params)
  g_compute = g_n * g.epochs * g.pairs_per_epoch
  spec_compute = sum(models.count_params(p) for p in s_params) * (
      s.epochs * s.pairs_per_epoch)
  controls = _controls(config, gkey, g_params, subsets, train_split, seed,
                       g_compute, spec_compute)
  out = _evaluate_seed(config, gkey, choice, subsets, s_params, f_params,
                       controls, p_g, p_val, val, test)
  out.update(
      seed=int(seed), choice=choice,
      selection=selection if "grid" in selection else None,
      subsets=[x.tolist() for x in subsets],
      generalist_fresh_train_errors=g_fresh_train_errors,
      num_fresh_train=len(val), generalist_losses=g_hist,
      specialist_losses=s_hist, soft_specialist_losses=f_hist,
      dustbin_shifts=[_shift(config, sub) for sub in subsets],
      params={"generalist": g_n,
              "specialists": [models.count_params(p) for p in s_params],
              **{k: models.count_params(v[1][0])
                 for k, v in controls.items()}},
      train_examples={"generalist": g.epochs * g.pairs_per_epoch,
                      "per_specialist": s.epochs * s.pairs_per_epoch,
                      **{k: v[2] for k, v in controls.items()}},
      compute={"generalist": g_compute, "specialists": spec_compute},
      generalist_seconds=round(t_g, 1),
      seconds=round(time.time() - t0, 1))
  return out


def _evaluate_seed(config, gkey, choice, subsets, s_params, f_params,
                   controls, p_g, p_val, val, test) -> dict:
  """Test (and validation) errors of every row at the chosen settings."""
  rows = {}
  for split, p, pairs in (("test", p_g, test), ("val", p_val, val)):
    q, act = combine_dustbin(config, p, dustbin_probs(
        config, gkey, s_params, subsets, pairs.images), subsets,
                             choice["top_n"])
    q_soft, act_soft = combine_soft(p, soft_probs(
        config, gkey, f_params, subsets, pairs.images), subsets,
                                    choice["soft_top_n"])
    hard = pipeline.evaluate(p, q, pairs.labels, subsets, act)
    soft = pipeline.evaluate(p, q_soft, pairs.labels, subsets, act_soft)
    r = {"generalist": (hard["generalist_errors"],
                        hard["generalist_conditional_accuracy"]),
         "generalist_plus_specialists": (
             hard["combined_errors"], hard["combined_conditional_accuracy"]),
         "generalist_plus_soft_specialists": (
             soft["combined_errors"], soft["combined_conditional_accuracy"])}
    for name, (key, (params, _), _) in controls.items():
      pc = _probs(key, NUM_CLASSES, params, pairs)
      ev = pipeline.evaluate(p, pc, pairs.labels, subsets, act)
      r[f"control_{name}"] = (ev["combined_errors"],
                              ev["combined_conditional_accuracy"])
    rows[split] = r
    if split == "test":
      by_covering, soft_by_covering = hard["by_covering"], soft["by_covering"]
      num_cond, soft_num_cond = hard["num_conditional"], soft[
          "num_conditional"]
      mean_active = float(act.sum(1).mean())
  return {"rows": rows, "by_covering": by_covering,
          "soft_by_covering": soft_by_covering, "num_conditional": num_cond,
          "soft_num_conditional": soft_num_cond, "mean_active": mean_active}


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------

ROWS = ("generalist", "generalist_plus_specialists",
        "generalist_plus_soft_specialists", "control_compute", "control_wide")


def summary(values) -> dict:
  """Mean, sample std and standard error of per-seed values."""
  v = np.asarray(values, np.float64)
  std = float(v.std(ddof=1)) if v.size > 1 else None
  return {"mean": float(v.mean()), "std": std,
          "se": std / np.sqrt(v.size) if std is not None else None}


def load_data(config) -> dict:
  """Training-split images (for fresh pairs); fixed val and test pairs."""
  splits = pair_data.split_images(config.data_dir or None,
                                  num_val=config.num_val,
                                  split_seed=config.split_seed)
  out = {"train": splits["train"]}
  for i, (name, n) in enumerate((("val", config.val_pairs),
                                 ("test", config.test_pairs))):
    x, y, _ = splits[name]
    out[name] = pair_data.make_pairs(x, y, n, seed=[config.pair_seed, 1 + i])
  return out


def _rows(seeds, num_test) -> list[dict]:
  rows = []
  for name in ROWS:
    if name not in seeds[0]["rows"]["test"]:
      continue
    test = [r["rows"]["test"][name][0] for r in seeds]
    rows.append({
        "name": name, "test_errors": test,
        "val_errors": [r["rows"]["val"][name][0] for r in seeds],
        "conditional_accuracy": [r["rows"]["test"][name][1] for r in seeds],
        "num_test": num_test, "test_summary": summary(test)})
  return rows


#: Two-sided 95% quantiles of Student's t by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447,
        7: 2.365, 8: 2.306, 9: 2.262}


def paired_differences(seeds, a: str, b: str, split: str = "test") -> dict:
  """Per-seed errors of row ``a`` minus row ``b``, their mean and SE, and a
  95% t interval (n - 1 degrees of freedom)."""
  d = [r["rows"][split][a][0] - r["rows"][split][b][0] for r in seeds]
  s = summary(d)
  half = (T975.get(len(d) - 1, 1.96) * s["se"]
          if s["se"] is not None else None)
  return {"a": a, "b": b, "split": split, "per_seed": d, **s,
          "ci95": None if half is None else [s["mean"] - half,
                                             s["mean"] + half]}


def run(config, workdir) -> dict:
  """Runs every seed; writes ``<workdir>/results.json`` (+ .md, .png)."""
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = load_data(config)
  seeds, choice = [], None
  for s in config.seeds:
    seeds.append(run_seed(config, data, int(s), choice))
    choice = seeds[0]["choice"]
    t = seeds[-1]["rows"]["test"]
    print(f"seed {s} ({seeds[-1]['seconds']:.0f}s, {choice}): "
          + ", ".join(f"{k} {v[0]}" for k, v in t.items()), flush=True)
  names = list(seeds[0]["rows"]["test"])
  diffs = [paired_differences(seeds, a, b, split)
           for split in ("test", "val")
           for a, b in (("generalist_plus_specialists", "control_compute"),
                        ("generalist_plus_soft_specialists",
                         "control_compute"),
                        ("generalist_plus_specialists", "generalist"),
                        ("generalist_plus_soft_specialists", "generalist"),
                        ("control_wide", "control_compute"))
           if a in names and b in names]
  env = provenance.environment()
  results = {
      "config": config.to_dict(),
      "git_commit": provenance.git_commit(str(pathlib.Path(__file__).parent)),
      "jax_version": env["jax_version"],
      "device": provenance.device_description(), "environment": env,
      "command": _command_line(), "cpu_note": config.cpu_note,
      "total_seconds": round(time.time() - t0, 1), "choice": choice,
      "chosen_on": f"validation, seed {seeds[0]['seed']}",
      "rows": _rows(seeds, len(data["test"])),
      "paired_differences": diffs, "seeds": seeds}
  checkpoint.write_atomic(
      workdir / "results.json",
      json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
  from experiments.specialists import report  # pylint: disable=g-import-not-at-top
  report.write_regime(results, workdir)
  return results


def _command_line() -> str:
  import sys  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv)
  if argv and pathlib.PurePath(argv[0]).parent.name == "specialists":
    argv[0] = ("python -m experiments.specialists."
               f"{pathlib.PurePath(argv[0]).stem}")
  return " ".join(argv)
