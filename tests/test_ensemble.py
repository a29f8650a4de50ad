"""experiments/mnist/ensemble.py (§4): the statistics, the coverage arm's
split and objective, and a smoke run on a few real MNIST examples."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.mnist import ensemble
from experiments.mnist import ensemble_stats as stats


def test_gain_kept():
  assert stats.gain_kept([100, 120], [80], [90, 100]) == pytest.approx(0.5)
  assert stats.gain_kept([100], [100], [90]) is None


def _wrong(rng, n, p):
  return rng.random(n) < p


def test_bootstrap_point_values_and_exact_cases():
  rng = np.random.default_rng(0)
  n = 2000
  base = np.stack([_wrong(rng, n, 0.05) for _ in range(3)])
  ens = _wrong(rng, n, 0.02)
  dist = np.stack([_wrong(rng, n, 0.03) for _ in range(3)])
  k = stats.bootstrap_kept(base, ens, dist, paired=True, num_samples=200)
  assert k["kept"] == pytest.approx(stats.gain_kept(
      base.sum(1), [ens.sum()], dist.sum(1)))
  assert k["gain"] == pytest.approx(base.sum(1).mean() - ens.sum())
  assert k["kept_lo"] <= k["kept"] <= k["kept_hi"]
  assert k["gain_lo"] <= k["gain"] <= k["gain_hi"]
  # A distilled net that is the ensemble keeps all of it in every replicate;
  # one that is the baseline (paired) keeps none.
  same = stats.bootstrap_kept(base, ens, np.stack([ens] * 3), paired=True,
                              num_samples=100)
  assert same["kept"] == same["kept_lo"] == same["kept_hi"] == 1.0
  none = stats.bootstrap_kept(base, ens, base, paired=True, num_samples=100)
  assert none["kept"] == none["kept_lo"] == none["kept_hi"] == 0.0
  # Unpaired, the seeds are drawn apart: the interval widens.
  unp = stats.bootstrap_kept(base, ens, base, paired=False, num_samples=300)
  assert unp["kept_lo"] < 0 < unp["kept_hi"]


def test_bootstrap_refuses_bad_shapes():
  with pytest.raises(ValueError, match="paired=True"):
    stats.bootstrap_kept(np.zeros((3, 5), bool), np.zeros(5, bool),
                         np.zeros((2, 5), bool), paired=True)
  with pytest.raises(ValueError, match="needs base"):
    stats.bootstrap_kept(np.zeros((3, 5), bool), np.zeros(4, bool),
                         np.zeros((3, 5), bool), paired=False)


def test_coverage_split_is_a_seeded_partition():
  part, rest = stats.coverage_split(100, 30, seed=3)
  assert len(part) == 30 and len(rest) == 70
  assert not set(part) & set(rest)
  assert sorted(set(part) | set(rest)) == list(range(100))
  again, _ = stats.coverage_split(100, 30, seed=3)
  np.testing.assert_array_equal(part, again)
  for bad in (0, 100):
    with pytest.raises(ValueError, match="coverage part"):
      stats.coverage_split(100, bad, seed=0)


def _ref_loss(s, t, y, lab, temp, alpha):
  """float64 NumPy: kd where labelled, T^2 KL(p_T || q_T) elsewhere."""
  s, t = np.float64(s), np.float64(t)
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp, lq = log_softmax(t / temp), log_softmax(s / temp)
  soft = temp ** 2 * (np.exp(lp) * (lp - lq)).sum(-1)
  ce = -log_softmax(s)[np.arange(len(y)), y]
  return np.where(lab, alpha * ce + (1 - alpha) * soft, soft)


@pytest.mark.integration
def test_coverage_objective_soft_only_off_the_members_part():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(6, 10)).astype(np.float32) * 3
  t = rng.normal(size=(6, 10)).astype(np.float32) * 3
  y = rng.integers(0, 10, 6)
  lab = np.array([True, False, True, False, False, True])
  batch = {"label": jnp.asarray(y), "labelled": jnp.asarray(lab)}
  loss, aux = stats.coverage_objective(jnp.asarray(s), jnp.asarray(t), batch,
                                       temperature=4.0, alpha=0.3)
  np.testing.assert_allclose(loss, _ref_loss(s, t, y, lab, 4.0, 0.3),
                             rtol=1e-5, atol=1e-5)
  assert "soft_loss" in aux

  # The rest's labels are never read: other labels there, same loss and
  # gradient; a labelled example's label does matter.
  def grad(labels):
    b = {"label": jnp.asarray(labels), "labelled": jnp.asarray(lab)}
    f = lambda z: jnp.sum(stats.coverage_objective(
        z, jnp.asarray(t), b, temperature=4.0, alpha=0.3)[0])
    return jax.grad(f)(jnp.asarray(s))
  y2 = np.where(lab, y, (y + 1) % 10)
  np.testing.assert_array_equal(grad(y), grad(y2))
  y3 = np.where(lab, (y + 1) % 10, y)
  assert not np.allclose(grad(y), grad(y3))


def _smoke_config(mnist_dir):
  from experiments.mnist.configs import ensemble_cpu
  c = ensemble_cpu.get_config()
  c.data_dir = str(mnist_dir)
  c.batch_size = 100
  e = c.ensemble
  e.num_members = 3
  e.width = 8
  e.epochs = 1
  e.num_train = 200  # two steps an epoch
  e.num_eval = 100
  e.regimes = ((2, 0.0, 0.0), (0, 0.0, 0.2))
  e.regime_members = 2
  e.grid_temperatures = (4.0,)
  e.grid_alphas = (0.1, 0.5)
  e.seeds = (0, 1)
  e.coverage.part = 120
  e.bootstrap_samples = 20
  return c


@pytest.mark.integration
def test_smoke_run_and_the_coverage_arms_data(mnist_dir, tmp_path,
                                              monkeypatch):
  """One small run end to end; every net's data and teacher spied on."""
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  calls = {}
  real_fit = ensemble.fit

  def spy(state, teacher, data, **kw):
    calls[kw["desc"]] = (teacher, data, kw["objective"], kw.get("fields"))
    return real_fit(state, teacher, data, **kw)

  monkeypatch.setattr(ensemble, "fit", spy)
  c = _smoke_config(mnist_dir)
  results = ensemble.run(c, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))

  # The coverage split: the members never see the rest; the student sees
  # every image, labelled on the members' part only, with the coverage
  # members' ensemble as its teacher and the soft-only objective.
  from experiments.mnist import pipeline
  splits = pipeline.load_splits(c)
  x, y = splits.train_images[:200], splits.train_labels[:200]
  part, rest = stats.coverage_split(200, 120, seed=0)
  _, m_data, m_obj, _ = calls["coverage_members"]
  np.testing.assert_array_equal(m_data["image"], x[part])
  assert m_obj == "hard" and not set(part) & set(rest)
  teacher, s_data, s_obj, s_fields = calls["coverage_distilled"]
  np.testing.assert_array_equal(s_data["image"], x)
  np.testing.assert_array_equal(s_data["label"], y)
  np.testing.assert_array_equal(np.flatnonzero(s_data["labelled"]), part)
  assert s_obj is stats.coverage_objective
  assert "labelled" in s_fields.extra
  assert len(teacher.params) == 3  # the coverage members' ensemble
  # The main arm's students query the full members' ensemble online.
  assert calls["distilled_1ep"][0] is not None
  assert calls["distilled_2ep"][2] == "kd"

  by = {r["name"]: r for r in saved["rows"]}
  assert list(by) == [
      "members", "members_mean_logits", "members_arithmetic",
      "distilled_1ep", "control_1ep", "distilled_2ep", "control_2ep",
      "coverage_members", "coverage_members_mean_logits",
      "coverage_members_arithmetic", "coverage_distilled",
      "coverage_control_1ep", "coverage_control_2ep"]
  assert by["control_1ep"]["test_errors"] == (
      by["members"]["test_errors"][:2])
  for r in saved["rows"]:
    assert len(r["val_errors"]) == len(r["test_errors"])
    assert all(0 <= v <= 100 for v in r["test_errors"] + r["val_errors"])
  t = saved["tuning"]
  assert t["regimes"]["chosen"] in [[2, 0.0, 0.0], [0, 0.0, 0.2]]
  best = min(t["regimes"]["candidates"],
             key=lambda x: x["ensemble_val_errors"])
  assert t["regimes"]["chosen"] == [best["jitter"], best["input_dropout"],
                                    best["hidden_dropout"]]
  pts = {(p["temperature"], p["alpha"]): p["val_errors"]
         for p in t["grid"]["points"]}
  assert pts[tuple(t["grid"]["chosen"])] == min(pts.values())
  assert set(saved["analysis"]) == {"distilled_1ep", "distilled_2ep",
                                    "coverage_distilled"}
  a = saved["analysis"]["distilled_2ep"]["vs_control"]
  assert set(a) == {"test", "val", "pooled", "paired_diff"}
  assert a["paired_diff"]["test"] == [
      d - b for d, b in zip(by["distilled_2ep"]["test_errors"],
                            by["control_2ep"]["test_errors"])]
  assert len(set(saved["params_sha256"]["members"])) == 3
  assert (tmp_path / "results.md").read_text().count("| coverage_") >= 5
  assert (tmp_path / "ensemble.png").stat().st_size > 0
