"""Tests for kdjax.specialists (paper, Section 5) against float64 references.

Every function is compared with an independent float64 NumPy (or SciPy)
computation: a hand-written covariance and a brute-force k-means optimum
for the clusters, per-example loops for the data and the labels, the exact
Bayes posterior of a discrete model for the dustbin correction, an
independently written training loop for the vmapped specialists, and an EM
(multiplicative fixed-point) solver of eq. 5 for the combination.
Tolerances are float32 rounding, sampling error or the documented solver
residual; each is derived where it is used.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses, specialists as sp
from kdjax.paper import models

EPS32 = float(np.finfo(np.float32).eps)


# -----------------------------------------------------------------------------
# Subsets.
# -----------------------------------------------------------------------------


def test_as_subsets_canonical_form():
  out = sp.as_subsets([[7, 3], (3, 5), np.array([9], np.int64)], 10)
  assert [s.tolist() for s in out] == [[3, 7], [3, 5], [9]]
  assert all(s.dtype == np.int32 for s in out)
  # Idempotent.
  again = sp.as_subsets(out, 10)
  assert all(np.array_equal(a, b) for a, b in zip(out, again))


@pytest.mark.parametrize("subsets,error", [
    ([], ValueError),
    ([[]], ValueError),
    ([[0, 10]], ValueError),
    ([[-1, 2]], ValueError),
    ([[1, 1, 2]], ValueError),
    ([[0.0, 1.0]], TypeError),
    (np.array([1, 2]), ValueError),
])
def test_as_subsets_rejects(subsets, error):
  with pytest.raises(error):
    sp.as_subsets(subsets, 10)


# -----------------------------------------------------------------------------
# Confusable clusters.
# -----------------------------------------------------------------------------


def _grouped_probs(seed, groups, num_classes, n=600):
  """Predictions that spread each example's mass over one group of classes."""
  rng = np.random.default_rng(seed)
  p = np.zeros((n, num_classes))
  for i in range(n):
    g = groups[rng.integers(len(groups))]
    p[i, g] = rng.dirichlet(np.ones(len(g)))
  return 0.95 * p + 0.05 * rng.dirichlet(np.ones(num_classes), size=n)


def _ref_cov_columns(p):
  p = np.asarray(p, np.float64)
  d = p - p.mean(axis=0)
  return (d.T @ d / (len(p) - 1)).T  # row c = column c of the covariance


def _sse(points, clusters):
  return sum(np.sum((points[c] - points[c].mean(axis=0))**2) for c in clusters)


def _partitions(items, k):
  """Every partition of ``items`` into ``k`` non-empty blocks."""
  for labels in itertools.product(range(k), repeat=len(items) - 1):
    labels = (0,) + labels  # item 0 in block 0: each partition once per order
    if len(set(labels)) == k and all(
        labels.index(j) < labels.index(j + 1) for j in range(k - 1)):
      yield [np.array([i for i, l in zip(items, labels) if l == j])
             for j in range(k)]


def test_clusters_recover_confusable_groups():
  groups = [[0, 4, 7], [1, 2], [3, 5, 6, 8]]  # not contiguous
  p = _grouped_probs(0, groups, 9)
  for seed in range(3):
    clusters = sp.confusable_clusters(p, 3, seed=seed)
    assert sorted(c.tolist() for c in clusters) == sorted(groups)


def test_clusters_are_the_brute_force_kmeans_optimum():
  """On well-separated groups, k-means reaches the exact float64 optimum."""
  groups = [[0, 3], [1, 5, 6], [2, 4]]
  p = _grouped_probs(1, groups, 7)
  points = _ref_cov_columns(p)
  best = min(_sse(points, c) for c in _partitions(list(range(7)), 3))
  clusters = sp.confusable_clusters(p, 3)
  np.testing.assert_allclose(_sse(points, clusters), best, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clusters_partition_and_lloyd_fixed_point(seed):
  """Random predictions: a partition, each class nearest its own centroid."""
  rng = np.random.default_rng(10 + seed)
  p = rng.dirichlet(0.3 * np.ones(12), size=200)
  clusters = sp.confusable_clusters(p, 4, seed=seed, num_iters=1000)
  assert len(clusters) == 4 and all(len(c) for c in clusters)
  assert sorted(np.concatenate(clusters).tolist()) == list(range(12))
  assert [int(c[0]) for c in clusters] == sorted(int(c[0]) for c in clusters)
  assert all(np.array_equal(c, np.sort(c)) for c in clusters)
  points = _ref_cov_columns(p)
  centres = np.stack([points[c].mean(axis=0) for c in clusters])
  d2 = np.sum((points[:, None] - centres[None])**2, axis=-1)
  owner = np.empty(12, int)
  for j, c in enumerate(clusters):
    owner[c] = j
  own = d2[np.arange(12), owner]
  assert np.all(own <= d2.min(axis=1) * (1 + 1e-12))
  # Deterministic by seed.
  again = sp.confusable_clusters(p, 4, seed=seed, num_iters=1000)
  assert all(np.array_equal(a, b) for a, b in zip(clusters, again))


@pytest.mark.parametrize("seed", [0, 1])
def test_clusters_normalize_is_kmeans_on_unit_columns(seed):
  """normalize=True: a Lloyd fixed point on the unit-normalised columns."""
  rng = np.random.default_rng(20 + seed)
  p = rng.dirichlet(0.3 * np.ones(12), size=200)
  clusters = sp.confusable_clusters(p, 4, seed=seed, num_iters=1000,
                                    normalize=True)
  assert sorted(np.concatenate(clusters).tolist()) == list(range(12))
  points = _ref_cov_columns(p)
  unit = points / np.linalg.norm(points, axis=1, keepdims=True)
  centres = np.stack([unit[c].mean(axis=0) for c in clusters])
  d2 = np.sum((unit[:, None] - centres[None])**2, axis=-1)
  owner = np.empty(12, int)
  for j, c in enumerate(clusters):
    owner[c] = j
  assert np.all(d2[np.arange(12), owner] <= d2.min(axis=1) * (1 + 1e-12))
  # Scaling every probability's spread (hence every column) changes nothing.
  q = 0.5 * p + 0.5 / 12
  again = sp.confusable_clusters(q, 4, seed=seed, num_iters=1000,
                                 normalize=True)
  assert all(np.array_equal(x, y) for x, y in zip(clusters, again))


def test_clusters_edge_cases():
  p = np.random.default_rng(0).dirichlet(np.ones(5), size=20)
  assert [c.tolist() for c in sp.confusable_clusters(p, 1)] == [[0, 1, 2, 3, 4]]
  assert [c.tolist() for c in sp.confusable_clusters(p, 5)] == [[0], [1], [2],
                                                                [3], [4]]
  # Classes never predicted have identical (zero) columns: still non-empty.
  q = np.concatenate([p, np.zeros((20, 3))], axis=1)
  clusters = sp.confusable_clusters(q, 7)
  assert len(clusters) == 7 and all(len(c) for c in clusters)
  with pytest.raises(ValueError, match="exceeds"):
    sp.confusable_clusters(p, 6)
  with pytest.raises(ValueError):
    sp.confusable_clusters(p[0], 2)


# -----------------------------------------------------------------------------
# A specialist's data and labels.
# -----------------------------------------------------------------------------


def _labels(seed, n=1000, num_classes=10):
  rng = np.random.default_rng(seed)
  return rng.choice(num_classes, size=n,
                    p=rng.dirichlet(3 * np.ones(num_classes)))


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_specialist_indices_default_uses_every_subset_example_once(fraction):
  y = _labels(0)
  subset = [2, 7]
  d = sp.specialist_indices(y, subset, seed=3, fraction_in_subset=fraction)
  inside = np.isin(y[d.indices], subset)
  pool_in = np.flatnonzero(np.isin(y, subset))
  assert sorted(d.indices[inside].tolist()) == pool_in.tolist()
  assert len(np.unique(d.indices)) == len(d.indices)  # no repeats
  assert abs(inside.mean() - fraction) <= 1.0 / len(d.indices)
  assert d.data_share == pytest.approx(len(pool_in) / len(y), rel=1e-15)
  assert d.specialist_share == pytest.approx(inside.mean(), rel=1e-15)
  assert d.oversampling == pytest.approx(inside.mean() * len(y) / len(pool_in),
                                         rel=1e-12)


def test_specialist_indices_fixed_size_cycles_evenly():
  y = _labels(1, n=300)
  subset = [4]
  n_pool = int(np.sum(y == 4))
  n = 6 * n_pool + 10  # needs 3 copies of the subset and a bit more
  d = sp.specialist_indices(y, subset, num_examples=n, seed=0)
  assert len(d.indices) == n
  counts = np.bincount(d.indices[y[d.indices] == 4], minlength=len(y))
  used = counts[y == 4]
  half = n // 2
  assert used.sum() == half
  assert used.min() == half // n_pool and used.max() == -(-half // n_pool)
  # The others: drawn without replacement (there are enough).
  others = d.indices[y[d.indices] != 4]
  assert len(np.unique(others)) == len(others) == n - half


def test_specialist_indices_deterministic_by_seed():
  y = _labels(2)
  a = sp.specialist_indices(y, [0, 1], seed=5, num_examples=200)
  b = sp.specialist_indices(y, [1, 0], seed=5, num_examples=200)
  c = sp.specialist_indices(y, [0, 1], seed=6, num_examples=200)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)


def test_specialist_indices_rejects():
  y = np.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="dustbin"):
    sp.specialist_indices(y, [0, 1])
  with pytest.raises(ValueError, match="fraction"):
    sp.specialist_indices(y, [0], fraction_in_subset=1.0)
  with pytest.raises(ValueError):
    sp.specialist_indices(y, [5], num_classes=2)


def test_specialist_labels_match_loop_reference():
  y = _labels(3, n=200)
  subset = [8, 1, 5]
  out = sp.specialist_labels(y, subset)
  order = sorted(subset)
  ref = [order.index(c) if c in order else len(order) for c in y.tolist()]
  assert out.dtype == np.int32
  assert out.tolist() == ref
  with pytest.raises(ValueError):
    sp.specialist_labels([0, 11], [1], num_classes=10)


def test_specialist_datasets_stack_per_specialist():
  y = _labels(4)
  subsets = [[0, 1], [5, 6], [2, 9]]
  idx, lab, data = sp.specialist_datasets(y, subsets, num_examples=120, seed=7)
  assert idx.shape == lab.shape == (3, 120)
  for m, s in enumerate(subsets):
    alone = sp.specialist_indices(y, s, seed=7 + m, num_examples=120)
    np.testing.assert_array_equal(idx[m], alone.indices)
    np.testing.assert_array_equal(lab[m], sp.specialist_labels(y[idx[m]], s))
    assert data[m].data_share == alone.data_share


# -----------------------------------------------------------------------------
# The dustbin correction: calibration on the deployment priors.
# -----------------------------------------------------------------------------


def _discrete_model(seed, num_x=6, num_classes=8):
  """Priors pi [C] and likelihoods L [X, C] (columns sum to one)."""
  rng = np.random.default_rng(seed)
  pi = rng.dirichlet(2 * np.ones(num_classes))
  lik = rng.dirichlet(0.7 * np.ones(num_x), size=num_classes).T
  return pi, lik


def _grouped_posterior(pi, lik, subset):
  """Exact p(y | x) over (subset classes, dustbin), float64, [X, k + 1]."""
  joint = lik * pi[None]
  post = joint / joint.sum(axis=1, keepdims=True)
  rest = np.setdiff1d(np.arange(len(pi)), subset)
  return np.concatenate([post[:, subset], post[:, rest].sum(1, keepdims=True)],
                        axis=1)


@pytest.mark.parametrize("specialist_share", [0.5, 0.8, 0.1])
def test_dustbin_shift_recovers_the_exact_posterior(specialist_share):
  """The Bayes optimum on resampled data, corrected, is the true posterior."""
  pi, lik = _discrete_model(0)
  subset = np.array([1, 4, 6])
  s = pi[subset].sum()
  a, b = specialist_share / s, (1 - specialist_share) / (1 - s)
  pi_train = np.where(np.isin(np.arange(len(pi)), subset), a * pi, b * pi)
  trained = _grouped_posterior(pi_train, lik, subset)  # what training learns
  truth = _grouped_posterior(pi, lik, subset)
  shift = sp.dustbin_shift(s, specialist_share)
  np.testing.assert_allclose(float(shift), math.log(a / b), rtol=1e-6,
                             atol=1e-6)
  corrected = jax.nn.softmax(sp.correct_dustbin(np.log(trained), shift))
  # float32 softmax of a float32 logit: error ~ a few eps.
  np.testing.assert_allclose(corrected, truth, rtol=0, atol=16 * EPS32)
  # Not calibrated without it (nor with the opposite sign, nor with log a).
  for wrong in (0.0, -float(shift), math.log(a)):
    off = jax.nn.softmax(sp.correct_dustbin(np.log(trained), wrong))
    if abs(wrong - float(shift)) > 1e-3:
      assert np.max(np.abs(np.asarray(off) - truth)) > 1e-3


def test_dustbin_correction_calibrates_a_specialist_on_resampled_data():
  """The whole chain on samples: specialist_indices, counts, correction.

  The "specialist" is the maximum-likelihood (count) estimate of
  p'(y | x) on its resampled data. After the correction it must match the
  exact deployment posterior within its sampling error: per cell, 6
  standard errors of a proportion estimated from that x's examples, times
  the correction's largest change of a probability's odds, exp(|shift|).
  """
  pi, lik = _discrete_model(1)
  rng = np.random.default_rng(0)
  n = 400_000
  y = rng.choice(len(pi), size=n, p=pi)
  cdf = np.cumsum(lik, axis=0)
  x = (rng.random(n)[:, None] > cdf[:, y].T).sum(axis=1)
  subset = np.array([0, 5])
  d = sp.specialist_indices(y, subset, seed=1)
  xs, ys = x[d.indices], sp.specialist_labels(y[d.indices], subset)
  counts = np.zeros((lik.shape[0], len(subset) + 1))
  np.add.at(counts, (xs, ys), 1.0)
  learned = counts / counts.sum(axis=1, keepdims=True)
  truth = _grouped_posterior(pi, lik, subset)
  shift = float(d.dustbin_shift)
  corrected = np.asarray(jax.nn.softmax(
      sp.correct_dustbin(np.log(learned), d.dustbin_shift)), np.float64)
  se = np.sqrt(learned * (1 - learned) / counts.sum(axis=1, keepdims=True))
  tol = 6 * np.exp(abs(shift)) * se + 16 * EPS32
  assert np.all(np.abs(corrected - truth) <= tol)
  # The uncorrected specialist is miscalibrated far beyond that.
  assert np.max(np.abs(learned - truth) - tol) > 0.02


def test_correct_dustbin_touches_only_the_last_logit():
  z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)),
                  jnp.bfloat16)
  out = sp.correct_dustbin(z, jnp.array([1.0, 2.0, 3.0]))
  assert out.dtype == jnp.float32
  ref = np.asarray(z.astype(jnp.float32), np.float64)
  ref[:, -1] += [1.0, 2.0, 3.0]
  np.testing.assert_allclose(out, ref, rtol=EPS32)


# -----------------------------------------------------------------------------
# A specialist's start.
# -----------------------------------------------------------------------------


def _generalist(seed, num_classes=10, width=6, in_dim=5):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"hidden_0": {"kernel": f32(in_dim, width), "bias": f32(width)},
          "logits": {"kernel": f32(width, num_classes),
                     "bias": f32(num_classes)}}


def test_init_from_generalist_matches_reference():
  gen = _generalist(0)
  before = jax.tree.map(np.array, gen)
  subset = [7, 2, 3]
  spec = sp.init_from_generalist(gen, subset)
  k, b = np.asarray(gen["logits"]["kernel"], np.float64), np.asarray(
      gen["logits"]["bias"], np.float64)
  order = [2, 3, 7]
  rest = [c for c in range(10) if c not in order]
  ref_k = np.concatenate([k[:, order], k[:, rest].mean(1, keepdims=True)], 1)
  ref_b = np.concatenate([b[order], [b[rest].mean() + math.log(len(rest))]])
  np.testing.assert_allclose(spec["logits"]["kernel"], ref_k, rtol=4 * EPS32,
                             atol=4 * EPS32 * np.abs(k).max())
  np.testing.assert_allclose(spec["logits"]["bias"], ref_b, rtol=4 * EPS32,
                             atol=8 * EPS32 * np.abs(ref_b).max())
  np.testing.assert_array_equal(spec["hidden_0"]["kernel"],
                                gen["hidden_0"]["kernel"])
  # The generalist is unchanged.
  jax.tree.map(np.testing.assert_array_equal, gen, before)


def test_init_from_generalist_network_outputs():
  """Subset logits are the generalist's; the dustbin is Jensen's lower bound."""
  net = models.MLP((6,), num_classes=10)
  gen = _generalist(1)
  spec = sp.init_from_generalist(gen, [1, 8])
  snet = models.MLP((6,), num_classes=3)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 5)),
                  jnp.float32)
  zg = np.asarray(net.apply({"params": gen}, x), np.float64)
  zs = np.asarray(snet.apply({"params": spec}, x), np.float64)
  tol = 1e-5 * (1 + np.abs(zg).max())
  np.testing.assert_allclose(zs[:, :2], zg[:, [1, 8]], atol=tol)
  rest = [c for c in range(10) if c not in (1, 8)]
  lse = np.log(np.sum(np.exp(zg[:, rest]), axis=1))
  np.testing.assert_allclose(zs[:, 2], zg[:, rest].mean(1) + math.log(8),
                             atol=tol)
  assert np.all(zs[:, 2] <= lse + tol)
  # Equality when the classes outside the subset have equal logits.
  eq = dict(gen, logits={
      "kernel": gen["logits"]["kernel"].at[:, rest].set(
          gen["logits"]["kernel"][:, [0]]),
      "bias": gen["logits"]["bias"].at[jnp.array(rest)].set(0.3)})
  zs_eq = snet.apply({"params": sp.init_from_generalist(eq, [1, 8])}, x)
  zg_eq = np.asarray(net.apply({"params": eq}, x), np.float64)
  np.testing.assert_allclose(
      zs_eq[:, 2], np.log(np.sum(np.exp(zg_eq[:, rest]), axis=1)), atol=tol)


def test_init_from_generalist_rejects():
  gen = _generalist(0)
  with pytest.raises(ValueError, match="dustbin"):
    sp.init_from_generalist(gen, list(range(10)))
  with pytest.raises(ValueError, match="Dense"):
    sp.init_from_generalist(gen, [1], logits_key=("logits", "bias"))
  with pytest.raises(KeyError):
    sp.init_from_generalist(gen, [1], logits_key=("head",))


def test_stack_unstack_round_trip():
  trees = [_generalist(s) for s in range(3)]
  stacked = sp.stack_params(trees)
  assert stacked["logits"]["kernel"].shape == (3, 6, 10)
  for m, tree in enumerate(trees):
    jax.tree.map(np.testing.assert_array_equal, sp.unstack_params(stacked, m),
                 tree)


# -----------------------------------------------------------------------------
# Training all specialists at once.
# -----------------------------------------------------------------------------


def _tiny_problem(num_specialists=3):
  rng = np.random.default_rng(0)
  n_data, num_classes = 240, 6
  images = jnp.asarray(rng.standard_normal((n_data, 5)), jnp.float32)
  y = rng.integers(0, num_classes, size=n_data)
  subsets = [[0, 1], [2, 5], [3, 4]][:num_specialists]
  idx, lab, _ = sp.specialist_datasets(y, subsets, num_examples=48, seed=0)
  net = models.MLP((7,), num_classes=3)
  apply_fn = models.linen_student_apply(net)
  params = sp.stack_params(
      [sp.init_from_generalist(_generalist(s, num_classes, 7), sub)
       for s, sub in enumerate(subsets)])
  rngs = jax.random.split(jax.random.key(3), len(subsets))
  return apply_fn, params, images, idx, lab, rngs


def _loop_reference(apply_fn, params, images, idx, lab, key, tx, epochs, bs):
  """One specialist, written out step by step from the documented rule."""
  opt = tx.init(params)
  n = len(idx)
  epoch_losses = []

  @jax.jit
  def grad_fn(p, x, t):
    return jax.value_and_grad(
        lambda p: jnp.mean(losses.hard_label_loss(apply_fn(p, x), t)))(p)

  for e in range(epochs):
    k = jax.random.fold_in(key, e)
    perm = np.asarray(jax.random.permutation(k, n))
    step_losses = []
    for s in range(n // bs):
      b = perm[s * bs:(s + 1) * bs]
      loss, g = grad_fn(params, images[idx[b]], lab[b])
      updates, opt = tx.update(g, opt, params)
      params = optax.apply_updates(params, updates)
      step_losses.append(float(loss))
    epoch_losses.append(np.mean(step_losses))
  return params, np.array(epoch_losses)


@pytest.mark.integration
def test_vmapped_specialists_equal_solo_runs():
  apply_fn, params, images, idx, lab, rngs = _tiny_problem()
  tx = optax.sgd(0.2, momentum=0.9)
  out, hist = sp.train_specialists(apply_fn, params, images, idx, lab, tx=tx,
                                   epochs=3, batch_size=16, rngs=rngs)
  assert hist.shape == (3, 3)
  assert np.all(np.asarray(hist[:, -1]) < np.asarray(hist[:, 0]))
  for m in range(3):
    solo, solo_hist = sp.train_specialists(
        apply_fn, sp.stack_params([sp.unstack_params(params, m)]), images,
        idx[m:m + 1], lab[m:m + 1], tx=tx, epochs=3, batch_size=16,
        rngs=rngs[m:m + 1])
    # float32 rounding of batched vs. single matmuls, over 9 steps.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b[0], rtol=1e-5, atol=1e-5), sp.unstack_params(out, m), solo)
    np.testing.assert_allclose(hist[m], solo_hist[0], rtol=1e-5)
    ref, ref_hist = _loop_reference(apply_fn, sp.unstack_params(params, m),
                                    images, idx[m], lab[m], rngs[m], tx, 3, 16)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-5), sp.unstack_params(out, m), ref)
    np.testing.assert_allclose(hist[m], ref_hist, rtol=1e-5)


def test_train_specialists_rejects():
  apply_fn, params, images, idx, lab, rngs = _tiny_problem()
  kw = dict(tx=optax.sgd(0.1), epochs=1, batch_size=8, rngs=rngs)
  with pytest.raises(ValueError, match="leading axis"):
    sp.train_specialists(apply_fn, params, images, idx[:2], lab[:2],
                         **dict(kw, rngs=rngs[:2]))
  with pytest.raises(ValueError, match="batch_size"):
    sp.train_specialists(apply_fn, params, images, idx, lab,
                         **dict(kw, batch_size=49))
  with pytest.raises(ValueError, match="rngs"):
    sp.train_specialists(apply_fn, params, images, idx, lab,
                         **dict(kw, rngs=rngs[:1]))


# -----------------------------------------------------------------------------
# Combined inference (eq. 5).
# -----------------------------------------------------------------------------

B, C = 24, 12
SUBSETS = [[0, 1, 2], [2, 3, 4, 5], [6, 7], [0, 8, 9, 10]]


def _simplex(rng, shape, scale):
  z = scale * rng.standard_normal(shape)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _grouped(q, subset):
  """q restricted to ``subset`` plus the dustbin mass (float64)."""
  rest = np.setdiff1d(np.arange(q.shape[-1]), subset)
  return np.concatenate([q[:, subset], q[:, rest].sum(1, keepdims=True)], 1)


def _ref_objective(q, p_g, p_m, subsets, active):
  """Eq. 5 in float64 (unnormalised), per input."""
  def kl(p, r):
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.sum(np.where(p > 0, p * (np.log(p) - np.log(r)), 0.0), axis=1)
  f = kl(p_g, q)
  for m, s in enumerate(subsets):
    f = f + active[:, m] * kl(p_m[m], _grouped(q, np.asarray(s)))
  return f


def _ref_em(p_g, p_m, subsets, active, tol=1e-15, max_iters=200_000):
  """Float64 minimiser of eq. 5 by the EM fixed point (independent solver).

  Setting the gradient in q (on the simplex) to zero gives
  q_i (1 + |A|) = p_g,i + sum_{m in A} [p_m,j(i) if i in S^m else
  p_m,dust q_i / q(rest of S^m)], whose iteration decreases the convex
  objective monotonically (it is EM for a mixture likelihood).
  """
  q = p_g.copy()
  weight = 1.0 + active.sum(axis=1, keepdims=True)
  for _ in range(max_iters):
    num = p_g.copy()
    for m, s in enumerate(subsets):
      s = np.asarray(s)
      rest = np.setdiff1d(np.arange(q.shape[1]), s)
      t = np.zeros_like(q)
      t[:, s] = p_m[m][:, :-1]
      mass = q[:, rest].sum(axis=1, keepdims=True)
      with np.errstate(divide="ignore", invalid="ignore"):
        t[:, rest] = np.where(mass > 0, p_m[m][:, -1:] * q[:, rest] / mass, 0.0)
      num += active[:, m:m + 1] * t
    new = num / weight
    if np.max(np.abs(new - q)) < tol:
      return new
    q = new
  raise AssertionError("EM did not converge")


def _inputs(seed, scale=3.0, subsets=SUBSETS):
  rng = np.random.default_rng(seed)
  p_g = _simplex(rng, (B, C), scale)
  p_m = [_simplex(rng, (B, len(s) + 1), scale) for s in subsets]
  active = rng.random((B, len(subsets))) < 0.6
  return p_g, p_m, active


def test_active_specialists_match_loop_reference():
  p_g, _, _ = _inputs(0)
  for top_n in (1, 2, 4):
    act = np.asarray(sp.active_specialists(p_g, SUBSETS, top_n=top_n))
    for b in range(B):
      top = set(np.argsort(-p_g[b], kind="stable")[:top_n].tolist())
      assert act[b].tolist() == [bool(top & set(s)) for s in SUBSETS]


def test_combine_without_active_specialist_is_the_generalist():
  p_g, p_m, _ = _inputs(1)
  q = sp.combine(p_g, p_m, SUBSETS, active=np.zeros((B, 4), bool))
  np.testing.assert_array_equal(q, p_g.astype(np.float32))
  # With the top-1 rule: subsets that never meet the top class.
  p_g2 = p_g.copy()
  p_g2[:, 11] += 10.0
  p_g2 /= p_g2.sum(1, keepdims=True)
  q2 = sp.combine(p_g2, p_m, SUBSETS)
  np.testing.assert_array_equal(q2, p_g2.astype(np.float32))
  # Only the rows without an active specialist are left alone.
  mixed = np.zeros((B, 4), bool)
  mixed[::2, 1] = True
  q3 = np.asarray(sp.combine(p_g, p_m, SUBSETS, active=mixed))
  np.testing.assert_array_equal(q3[1::2], p_g[1::2].astype(np.float32))
  assert np.all(np.max(np.abs(q3[::2] - p_g[::2]), axis=1) > 1e-3)


def test_combine_with_agreeing_specialists_is_the_generalist():
  p_g, _, active = _inputs(2)
  p_m = [_grouped(p_g, np.asarray(s)) for s in SUBSETS]
  q = sp.combine(p_g, p_m, SUBSETS, active=active)
  # The gradient vanishes at z = log p_g up to rounding of p_m's dustbin sum.
  np.testing.assert_allclose(q, p_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed,scale", [(3, 3.0), (4, 5.0)])
def test_combine_matches_float64_reference(seed, scale):
  p_g, p_m, active = _inputs(seed, scale)
  q_ref = _ref_em(p_g, p_m, SUBSETS, active)
  q = np.asarray(sp.combine(p_g, p_m, SUBSETS, active=active), np.float64)
  f = _ref_objective(q / q.sum(1, keepdims=True), p_g, p_m, SUBSETS, active)
  f_ref = _ref_objective(q_ref, p_g, p_m, SUBSETS, active)
  # The reference is the minimum (to float64 rounding) ...
  assert np.all(f >= f_ref - 1e-12)
  # ... and the float32 fixed-step solver reaches it: the documented
  # residual is a few 1e-6 in q; an objective error ~ (#terms) x float32
  # rounding of the KLs.
  np.testing.assert_allclose(q, q_ref, rtol=0, atol=2e-5)
  assert np.all(f - f_ref <= 10 * EPS32 * (1 + active.sum(1)))


@pytest.mark.integration
def test_combine_matches_scipy_minimiser():
  """A second independent reference: L-BFGS on z in float64."""
  scipy_optimize = pytest.importorskip("scipy.optimize")
  p_g, p_m, active = _inputs(5)
  p_g, p_m, active = p_g[:4], [p[:4] for p in p_m], active[:4]

  def f(flat):
    """Eq. 5 and its gradient in z: sum over terms of q - (target in q)."""
    z = flat.reshape(4, C)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    grad = q - p_g
    for m, s in enumerate(SUBSETS):
      rest = np.setdiff1d(np.arange(C), s)
      target = np.zeros_like(q)
      target[:, s] = p_m[m][:, :-1]
      target[:, rest] = p_m[m][:, -1:] * q[:, rest] / q[:, rest].sum(
          1, keepdims=True)
      grad += active[:, m:m + 1] * (q - target)
    return _ref_objective(q, p_g, p_m, SUBSETS, active).sum(), grad.ravel()

  res = scipy_optimize.minimize(f, np.log(p_g).ravel(), jac=True,
                                method="L-BFGS-B",
                                options=dict(maxiter=5000, ftol=1e-15,
                                             gtol=1e-10))
  z = res.x.reshape(4, C)
  q_scipy = np.exp(z - z.max(1, keepdims=True))
  q_scipy /= q_scipy.sum(1, keepdims=True)
  np.testing.assert_allclose(q_scipy, _ref_em(p_g, p_m, SUBSETS, active),
                             atol=1e-5)
  q = sp.combine(p_g, p_m, SUBSETS, active=active)
  np.testing.assert_allclose(q, q_scipy, atol=2e-5)


def test_combine_full_models_give_the_arithmetic_mean():
  """Specialists over every class (empty dustbin): q = mean of the p's."""
  rng = np.random.default_rng(6)
  full = [list(range(C))] * 3
  p_g = _simplex(rng, (B, C), 2.0)
  p_m = [np.concatenate([_simplex(rng, (B, C), 2.0), np.zeros((B, 1))], 1)
         for _ in full]
  active = rng.random((B, 3)) < 0.6
  q = sp.combine(p_g, p_m, full, active=active)
  ref = (p_g + sum(active[:, m:m + 1] * p_m[m][:, :C] for m in range(3))) / (
      1 + active.sum(1, keepdims=True))
  np.testing.assert_allclose(q, ref, rtol=0, atol=2e-5)
  np.testing.assert_allclose(q, _ref_em(p_g, p_m, full, active), atol=2e-5)


@pytest.mark.integration
def test_combine_is_per_example_and_jittable():
  p_g, p_m, active = _inputs(7)
  q = sp.combine(p_g, p_m, SUBSETS, top_n=2, num_steps=200)
  jitted = jax.jit(lambda pg, pm: sp.combine(pg, pm, SUBSETS, top_n=2,
                                             num_steps=200))(p_g, p_m)
  np.testing.assert_allclose(jitted, q, rtol=1e-6, atol=1e-7)
  # Each row is solved on its own: a row alone gives the same answer.
  row = sp.combine(p_g[5:6], [p[5:6] for p in p_m], SUBSETS, top_n=2,
                   num_steps=200)
  np.testing.assert_allclose(row[0], q[5], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(q, axis=1), 1.0, rtol=4 * EPS32 * C)


@pytest.mark.integration
def test_combine_zero_probabilities_are_finite():
  p_g, p_m, active = _inputs(8)
  p_g[:, 3] = 0.0
  p_g /= p_g.sum(1, keepdims=True)
  p_m[1][:, 0] = 0.0
  p_m[1] /= p_m[1].sum(1, keepdims=True)
  q = np.asarray(sp.combine(p_g, p_m, SUBSETS, active=active))
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q, _ref_em(p_g, p_m, SUBSETS, active), atol=2e-5)
  z = jnp.log(jnp.asarray(q))
  g = jax.grad(lambda z: sp.combination_objective(z, p_g, p_m, SUBSETS,
                                                  active).sum())(z)
  assert np.all(np.isfinite(g))


def test_combine_rejects():
  p_g, p_m, active = _inputs(9)
  with pytest.raises(ValueError, match="specialist_probs"):
    sp.combine(p_g, p_m[:3], SUBSETS)
  with pytest.raises(ValueError, match=r"\[B, 4\]"):
    sp.combine(p_g, [p_m[1]] + p_m[1:], SUBSETS)
  with pytest.raises(ValueError, match="active"):
    sp.combine(p_g, p_m, SUBSETS, active=active[:, :2])
  with pytest.raises(ValueError, match="top_n"):
    sp.combine(p_g, p_m, SUBSETS, top_n=C + 1)
