"""Section 5 in the paper's regime: the fresh-pairs generator, the new
clustering (against float64 references) and a one-step run of the
experiment (experiments/specialists/regime.py) on a few examples."""
import json
import warnings

import numpy as np
import pytest

from experiments.specialists import data as pair_data
from kdjax import specialists as sp

# -----------------------------------------------------------------------------
# Fresh pairs: no leakage, balance, determinism.
# -----------------------------------------------------------------------------


def _id_images(ids):
  """28x28 images whose first two pixels spell their id (id < 65536)."""
  x = np.zeros((len(ids), 28, 28), np.uint8)
  x[:, 0, 0] = np.asarray(ids) % 256
  x[:, 0, 1] = np.asarray(ids) // 256
  return x


def _decode(half):
  return half[:, 0, 0].astype(np.int64) + 256 * half[:, 0, 1].astype(np.int64)


def test_fresh_pairs_use_only_their_splits_images():
  rng = np.random.default_rng(0)
  ids = rng.permutation(3000)
  digits = rng.integers(0, 10, size=3000)
  train_ids, val_ids = ids[:2000], ids[2000:]
  gen = pair_data.FreshPairs(_id_images(train_ids), digits[train_ids],
                             num_pairs=1000, batch_size=100, seed=3)
  seen = set()
  for epoch in range(3):
    batches = gen(epoch)
    assert len(batches) == 10
    for i in range(len(batches)):
      b = batches[i]
      assert b["image"].shape == (100, 28, 56) and b["image"].dtype == np.uint8
      left = _decode(b["image"][:, :, :28])
      right = _decode(b["image"][:, :, 28:])
      seen.update(left.tolist() + right.tolist())
      # The label is the pair of the two images' own digits.
      lab = dict(zip(ids.tolist(), digits[ids].tolist()))
      np.testing.assert_array_equal(
          b["label"], [10 * lab[l] + lab[r] for l, r in zip(left, right)])
  assert seen <= set(train_ids.tolist())
  assert not seen & set(val_ids.tolist())
  assert len(seen) > 1500  # most training images are used


def test_real_splits_are_disjoint(mnist_dir):
  splits = pair_data.split_images(mnist_dir)
  tr, va = splits["train"][2], splits["val"][2]
  assert len(tr) == 50_000 and len(va) == 10_000
  assert not set(tr.tolist()) & set(va.tolist())
  x_file, _ = __import__("kdjax").data.load_mnist("train", mnist_dir)
  np.testing.assert_array_equal(splits["train"][0], x_file[tr])


def test_fresh_pairs_are_balanced_and_fresh_each_epoch():
  rng = np.random.default_rng(1)
  digits = rng.integers(0, 10, size=500)
  gen = pair_data.FreshPairs(_id_images(np.arange(500)), digits,
                             num_pairs=1234, batch_size=1234, seed=[7, 1])
  _, _, c0 = gen.epoch_indices(0)
  counts = np.bincount(c0, minlength=100)
  assert counts.sum() == 1234 and set(counts.tolist()) <= {12, 13}
  l0, r0, _ = gen.epoch_indices(0)
  l0b, r0b, c0b = gen.epoch_indices(0)
  np.testing.assert_array_equal(l0, l0b)  # the same epoch, the same pairs
  np.testing.assert_array_equal(c0, c0b)
  l1, _, c1 = gen.epoch_indices(1)
  assert not np.array_equal(c0, c1) and not np.array_equal(l0, l1)
  # Left and right images have the class's digits.
  np.testing.assert_array_equal(digits[l0], c0 // 10)
  np.testing.assert_array_equal(digits[r0], c0 % 10)


def test_specialist_pairs_are_half_from_the_subset():
  rng = np.random.default_rng(2)
  digits = rng.integers(0, 10, size=500)
  subset = np.array([3, 13, 23, 30, 31])
  inside = np.zeros(100, bool)
  inside[subset] = True
  table = sp.specialist_labels(np.arange(100), subset)
  gen = pair_data.FreshPairs(
      _id_images(np.arange(500)), digits, num_pairs=1000, batch_size=1000,
      seed=0, probs=pair_data.subset_probs(subset), label_map=table,
      in_subset=inside)
  _, _, c = gen.epoch_indices(0)
  counts = np.bincount(c, minlength=100)
  assert counts[subset].sum() == 500 and set(counts[subset]) == {100}
  assert set(counts[~inside].tolist()) <= {5, 6}
  b = gen(0)[0]
  np.testing.assert_array_equal(b["label"], table[c])
  np.testing.assert_array_equal(b["in_subset"], inside[c])
  assert set(b["label"].tolist()) == set(range(6))  # 0..4 and the dustbin


def test_fresh_pairs_refuse_bad_input():
  x, y = _id_images(np.arange(50)), np.arange(50) % 10
  with pytest.raises(ValueError, match="batch_size"):
    pair_data.FreshPairs(x, y, num_pairs=10, batch_size=20, seed=0)
  with pytest.raises(ValueError, match="digits"):
    pair_data.FreshPairs(x, y % 9, num_pairs=10, batch_size=5, seed=0)
  with pytest.raises(ValueError, match="probs"):
    pair_data.FreshPairs(x, y, num_pairs=10, batch_size=5, seed=0,
                         probs=np.ones(100))
  with pytest.raises(ValueError, match="not all"):
    pair_data.subset_probs(np.arange(100))


def test_row_column_families_overlap_and_cover():
  fam = pair_data.row_column_families()
  assert len(fam) == 20 and all(len(f) == 10 for f in fam)
  per_class = np.bincount(np.concatenate(fam), minlength=100)
  assert set(per_class.tolist()) == {2}  # each class: one row, one column
  assert fam[3] == list(range(30, 40)) and fam[17] == list(range(7, 100, 10))


# -----------------------------------------------------------------------------
# Clustering against float64 references.
# -----------------------------------------------------------------------------


def _blocks(seed, groups, num_classes, n=2000, spread=0.3):
  """Confident predictions; the rest of the mass within the true group."""
  rng = np.random.default_rng(seed)
  p = np.zeros((n, num_classes))
  for i in range(n):
    g = groups[rng.integers(len(groups))]
    c = g[rng.integers(len(g))]
    p[i, g] = spread * rng.dirichlet(np.ones(len(g)))
    p[i, c] += 1.0 - spread
  return p


def test_coprediction_affinity_matches_loop_reference():
  p = np.random.default_rng(0).dirichlet(np.ones(6), size=40).astype(
      np.float32)
  ref = np.zeros((6, 6))
  for c in range(6):
    for d in range(6):
      if c != d:
        ref[c, d] = sum(float(p[n, c]) * float(p[n, d])
                        for n in range(40)) / 40
  out = sp.coprediction_affinity(p)
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)


def test_spectral_embedding_is_the_top_eigenspace():
  """Row-normalised rows of the top-k eigenvectors of D^-1/2 A D^-1/2,
  compared through their Gram matrix (invariant to the basis chosen)."""
  p = _blocks(1, [[0, 1, 2], [3, 4], [5, 6, 7, 8]], 9, spread=0.5)
  a = sp.coprediction_affinity(p)
  k = 3
  deg = a.sum(1)
  m = a / np.sqrt(np.outer(deg, deg))
  vals, vecs = np.linalg.eig(m)  # general solver: an independent route
  order = np.argsort(-vals.real)
  assert vals.real[order[k - 1]] - vals.real[order[k]] > 1e-3  # a gap
  v = vecs.real[:, order[:k]]
  v, _ = np.linalg.qr(v)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  u = sp.spectral_embedding(a, k)
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(u @ u.T, vn @ vn.T, atol=1e-9)


def test_spectral_clusters_recover_blocks_where_raw_kmeans_is_degenerate():
  groups = [[0, 5, 9], [1, 2, 7, 11], [3, 4], [6, 8, 10]]
  p = _blocks(2, groups, 12, spread=0.1)
  want = sorted(sorted(g) for g in groups)
  for seed in range(3):
    got = sp.spectral_clusters(p, 4, seed=seed)
    assert sorted(c.tolist() for c in got) == want
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no warning without the diagonal
      got = sp.confusable_clusters(p, 4, seed=seed, normalize=True,
                                   remove_diagonal=True)
    assert sorted(np.concatenate(got).tolist()) == list(range(12))
  # The raw columns: the diagonal dominates, and k-means says so.
  cov = np.cov(p, rowvar=False)
  assert sp.diagonal_share(cov) > sp.DIAGONAL_SHARE_LIMIT
  with pytest.warns(sp.DegenerateClustersWarning, match="diagonal holds"):
    sp.confusable_clusters(p, 4)


def test_spectral_clusters_follow_a_relabelling_of_the_classes():
  groups = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
  p = _blocks(3, groups, 9, spread=0.4)
  perm = np.random.default_rng(0).permutation(9)
  base = sp.spectral_clusters(p, 3)
  moved = sp.spectral_clusters(p[:, perm], 3)
  # Class j of the permuted problem is class perm[j] of the original.
  assert sorted(sorted(perm[c].tolist()) for c in moved) == sorted(
      c.tolist() for c in base)


def test_spectral_input_checks():
  p = np.random.default_rng(0).dirichlet(np.ones(5), size=20)
  with pytest.raises(ValueError, match="exceeds"):
    sp.spectral_clusters(p, 6)
  with pytest.raises(ValueError, match="symmetric"):
    sp.spectral_embedding(np.triu(np.ones((3, 3))), 2)
  with pytest.raises(ValueError, match="non-negative"):
    sp.coprediction_affinity(-p)
  # A class never predicted: a zero row, still clustered (a partition).
  q = np.concatenate([p, np.zeros((20, 1))], axis=1)
  got = sp.spectral_clusters(q, 3)
  assert sorted(np.concatenate(got).tolist()) == list(range(6))


# -----------------------------------------------------------------------------
# The experiment, one step of everything on a few examples.
# -----------------------------------------------------------------------------


def test_regime_one_step_smoke_one_seed(tiny_mnist_dir, tmp_path,
                                        monkeypatch):
  """The unit tier's smoke: one seed, one family, one top_n, few steps.

  Every row of the experiment, its JSON, table and figure, on the tiny
  synthetic MNIST; two seeds and a grid of 2 x 2: the integration test below.
  """
  from experiments.specialists import regime, report
  from experiments.specialists.configs import regime_cpu
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  c = regime_cpu.get_config()
  c.data_dir = str(tiny_mnist_dir)
  c.num_val = 100
  c.seeds = (0,)
  c.val_pairs = c.test_pairs = 100
  c.generalist.model.hidden = (8,)
  c.generalist.pairs_per_epoch = c.generalist.batch_size = 64
  c.generalist.epochs = 1
  c.specialists.families = ("spectral_2",)
  c.specialists.pairs_per_epoch = c.specialists.batch_size = 32
  c.specialists.epochs = 1
  c.combine.top_n = (1,)
  c.combine.num_steps = 1
  c.soft.temperatures = (2.0,)
  res = regime.run(c, tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert [r["name"] for r in on_disk["rows"]] == list(regime.ROWS)
  (s0,) = res["seeds"]
  assert [(g["family"], g["top_n"]) for g in s0["selection"]["grid"]] == [
      ("spectral_2", 1)]
  assert res["choice"]["family"] == "spectral_2"
  assert len(s0["subsets"]) == 2
  assert s0["train_examples"]["compute"] == 2 * 32
  assert s0["params"]["compute"] == s0["params"]["generalist"]
  for r in res["rows"]:
    assert len(r["test_errors"]) == 1
    assert all(0 <= e <= 100 for e in r["test_errors"])
  assert sum(r["num_test"] for r in s0["by_covering"]) == 100
  assert report.regime_table(res) in (tmp_path / "results.md").read_text()
  assert (tmp_path / "specialists.png").stat().st_size > 0


@pytest.mark.integration  # 2 seeds, a 2 x 2 grid; the unit smoke: above
def test_regime_one_step_smoke(mnist_dir, tmp_path, monkeypatch):
  from experiments.specialists import regime, report
  from experiments.specialists.configs import regime_cpu
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  c = regime_cpu.get_config()
  c.data_dir = str(mnist_dir)
  c.seeds = (0, 1)
  c.val_pairs = c.test_pairs = 200
  c.generalist.model.hidden = (8,)
  c.generalist.pairs_per_epoch = c.generalist.batch_size = 64
  c.generalist.epochs = 1
  c.specialists.families = ("spectral_2", "spectral_3")
  c.specialists.pairs_per_epoch = c.specialists.batch_size = 32
  c.specialists.epochs = 1
  c.combine.top_n = (1, 2)
  c.combine.num_steps = 5
  c.soft.temperatures = (2.0,)
  res = regime.run(c, tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert [r["name"] for r in on_disk["rows"]] == list(regime.ROWS)
  s0, s1 = res["seeds"]
  grid = s0["selection"]["grid"]
  assert [(g["family"], g["top_n"]) for g in grid] == [
      ("spectral_2", 1), ("spectral_2", 2), ("spectral_3", 1),
      ("spectral_3", 2)]
  best = min(grid, key=lambda g: g["val_errors"])
  assert res["choice"]["family"] == best["family"]
  assert s1["selection"] is None and s1["choice"] == res["choice"]
  m = len(s0["subsets"])
  assert m == int(best["family"][-1])
  # The compute-matched control saw as many pairs as all the specialists.
  assert s0["train_examples"]["compute"] == m * 32
  assert s0["params"]["compute"] == s0["params"]["generalist"]
  assert s0["params"]["wide"] > m * s0["params"]["generalist"]
  for r in res["rows"]:
    assert len(r["test_errors"]) == 2
    assert all(0 <= e <= 200 for e in r["test_errors"])
  table = s0["by_covering"]
  assert sum(r["num_test"] for r in table) == 200
  assert sum(r["delta_correct"] for r in table) == (
      s0["rows"]["test"]["generalist"][0]
      - s0["rows"]["test"]["generalist_plus_specialists"][0])
  d = res["paired_differences"][0]
  assert d["per_seed"] == [
      r["rows"]["test"]["generalist_plus_specialists"][0]
      - r["rows"]["test"]["control_compute"][0] for r in res["seeds"]]
  assert report.regime_table(res) in (tmp_path / "results.md").read_text()
  assert (tmp_path / "specialists.png").stat().st_size > 0
