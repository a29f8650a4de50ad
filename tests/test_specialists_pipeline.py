"""A tiny end-to-end run of experiments/specialists on real MNIST (< 60 s;
the integration tier) and a one-step one on a few synthetic images (the
unit tier).

Checks the wiring and the bookkeeping, not the accuracy: results.json has
both rows with one entry per seed, the subsets are the validation clusters
(a partition) plus the hand-given overlapping one, the dustbin shifts are
log((1 - s) / s) for the balanced classes (s = k / 100, s' = 1/2), and the
by-covering table adds up to the test set and to the errors.
"""
import json
import math

import numpy as np
import pytest

from experiments.specialists import pipeline
from experiments.specialists.configs import quick


@pytest.fixture
def tiny_config(mnist_dir):
  c = quick.get_config()
  c.data_dir = str(mnist_dir)
  c.train_pairs, c.val_pairs, c.test_pairs = 2000, 1000, 1000
  c.generalist.hidden = (32,)
  c.generalist.epochs = 2
  c.seeds = (0,)
  c.specialists.num_clusters = (4,)
  c.specialists.normalize_columns = (False,)
  c.specialists.extra_subsets = ((3, 13, 23),)
  c.specialists.num_examples = 512
  c.specialists.epochs = 1
  c.specialists.batch_size = 64
  c.combine.top_n = (1, 2)
  c.combine.num_steps = (100,)
  c.soft.temperatures = (2.0,)
  return c


@pytest.mark.integration
def test_tiny_run_writes_consistent_results(tiny_config, tmp_path):
  results = pipeline.run(tiny_config, tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
  names = [r["name"] for r in results["rows"]]
  assert names == ["generalist", "generalist_plus_specialists",
                   "generalist_plus_soft_specialists"]
  for row in results["rows"]:
    assert len(row["test_errors"]) == 1 and 0 <= row["test_errors"][0] <= 1000
  (seed,) = results["seeds"]
  subsets = seed["subsets"]
  clusters, extra = subsets[:4], subsets[4:]
  assert sorted(sum(clusters, [])) == list(range(100))
  assert extra == [[3, 13, 23]]
  for sub, shift in zip(subsets, seed["dustbin_shifts"]):
    s = len(sub) / 100
    assert shift == pytest.approx(math.log((1 - s) / s), rel=1e-5, abs=1e-5)
  table = seed["by_covering"]
  assert sum(r["num_test"] for r in table) == 1000
  delta = sum(r["delta_correct"] for r in table)
  assert delta == seed["generalist_errors"] - seed["combined_errors"]
  assert all(np.isfinite(l).all() for l in seed["specialist_losses"])


def test_smoke_one_step_per_model(tiny_mnist_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  c = quick.get_config()
  c.data_dir = str(tiny_mnist_dir)
  c.num_val = 100
  c.train_pairs, c.val_pairs, c.test_pairs = 200, 100, 100
  c.generalist.hidden = (8,)
  c.generalist.epochs = 1
  c.generalist.batch_size = 200
  c.seeds = (0,)
  c.specialists.num_clusters = (2,)
  c.specialists.normalize_columns = (False,)
  c.specialists.num_examples = 32
  c.specialists.epochs = 1
  c.specialists.batch_size = 32
  c.combine.top_n = (1,)
  c.combine.num_steps = (2,)
  c.soft.temperatures = (2.0,)
  results = pipeline.run(c, tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
  assert [r["name"] for r in results["rows"]] == [
      "generalist", "generalist_plus_specialists",
      "generalist_plus_soft_specialists"]
  for row in results["rows"]:
    assert len(row["test_errors"]) == 1 and 0 <= row["test_errors"][0] <= 100
  assert on_disk["environment"]["cpu"]


def test_evaluate_matches_loop_reference():
  rng = np.random.default_rng(0)
  n = 300
  labels = rng.integers(0, 100, size=n)
  p_g = rng.dirichlet(np.ones(100), size=n)
  q = rng.dirichlet(np.ones(100), size=n)
  subsets = [np.arange(0, 50), np.arange(40, 60), np.array([7, 99])]
  active = rng.random((n, 3)) < 0.5
  out = pipeline.evaluate(p_g, q, labels, subsets, active)
  cover = [sum(bool(active[i, m]) and labels[i] in subsets[m]
               for m in range(3)) for i in range(n)]
  g_ok = [int(np.argmax(p_g[i]) == labels[i]) for i in range(n)]
  c_ok = [int(np.argmax(q[i]) == labels[i]) for i in range(n)]
  assert out["generalist_errors"] == n - sum(g_ok)
  assert out["combined_errors"] == n - sum(c_ok)
  cond = [i for i in range(n) if cover[i] > 0]
  assert out["num_conditional"] == len(cond)
  assert out["combined_conditional_accuracy"] == pytest.approx(
      np.mean([c_ok[i] for i in cond]), rel=1e-12)
  for row in out["by_covering"]:
    rows = [i for i in range(n) if cover[i] == row["num_covering"]]
    assert row["num_test"] == len(rows)
    assert row["generalist_correct"] == sum(g_ok[i] for i in rows)
    assert row["combined_correct"] == sum(c_ok[i] for i in rows)
  assert {r["num_covering"] for r in out["by_covering"]} == set(cover)


@pytest.mark.integration
def test_tiny_run_chooses_on_validation(tiny_config, tmp_path):
  results = pipeline.run(tiny_config, tmp_path)
  (seed,) = results["seeds"]
  sel = seed["selection"]
  assert [(g["normalize_columns"], g["num_clusters"], g["top_n"],
           g["num_steps"]) for g in sel["grid"]] == [(False, 4, 1, 100),
                                                     (False, 4, 2, 100)]
  best = min(sel["grid"], key=lambda g: g["val_errors"])
  assert results["choice"]["top_n"] == best["top_n"]
  soft_best = min(sel["soft_grid"], key=lambda g: g["val_errors"])
  assert results["choice"]["soft_top_n"] == soft_best["top_n"]
  assert results["choice"]["temperature"] == 2.0
  by = {r["name"]: r for r in results["rows"]}
  assert by["generalist_plus_specialists"]["val_errors"] == [
      best["val_errors"]]
  assert by["generalist_plus_soft_specialists"]["val_errors"] == [
      soft_best["val_errors"]]
  soft = seed["soft"]
  assert sum(r["num_test"] for r in soft["by_covering"]) == 1000
  assert all(np.isfinite(l).all() for l in seed["soft_specialist_losses"])
  assert (tmp_path / "results.md").read_text().count("Table 4") == 2
  assert (tmp_path / "specialists.png").stat().st_size > 0


def test_combine_full_is_eq5_with_all_class_subsets():
  """Full-softmax specialists: the library's eq. 5 with empty dustbins."""
  from kdjax import specialists as sp
  rng = np.random.default_rng(1)
  b, c, m = 64, 10, 3
  p_g = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
  full = [rng.dirichlet(np.ones(c), size=b).astype(np.float32)
          for _ in range(m)]
  active = rng.random((b, m)) < 0.6
  with_dustbin = [np.concatenate([p, np.zeros((b, 1), np.float32)], 1)
                  for p in full]
  ref = sp.combine(p_g, with_dustbin, [np.arange(c)] * m, active=active,
                   num_steps=2000)
  np.testing.assert_allclose(pipeline.combine_full(p_g, full, active), ref,
                             atol=2e-4)


@pytest.mark.integration
def test_soft_specialist_loss_mixes_hard_and_soft_targets():
  """One step's loss: hard CE on subset labels, T^2 KL to p_g elsewhere."""
  import jax
  import jax.numpy as jnp
  import optax
  from kdjax import losses
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 100)), jnp.float32)
  apply = lambda p, x, train, rng: x.reshape(x.shape[0], -1)[:, :4] @ p
  images = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2, 2)),
                       jnp.float32)
  g_logits = jnp.asarray(np.random.default_rng(2).normal(size=(6, 100)),
                         jnp.float32)
  idx = jnp.arange(6)[None]
  y = jnp.asarray([[3, 50, 3, 7, 50, 99]])
  member = np.zeros((1, 100), bool)
  member[0, [3, 7]] = True
  t = 4.0
  fn = pipeline._soft_train_fn(apply, optax.sgd(0.0), 1, 6)  # pylint: disable=protected-access
  _, hist = fn(w[None], images, g_logits, idx, y, jnp.asarray(member),
               jnp.asarray([t]), jnp.stack([jax.random.key(0)]))
  z = apply(w, images, False, None)
  inside = member[0][np.asarray(y[0])]
  expected = np.where(inside, losses.hard_label_loss(z, y[0]),
                      losses.distillation_loss(z, g_logits, t)).mean()
  # The batch order is permuted; the mean over the whole epoch is not.
  np.testing.assert_allclose(np.asarray(hist)[0, 0], expected, rtol=1e-5)
