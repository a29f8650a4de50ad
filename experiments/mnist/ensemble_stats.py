r"""The §4 experiment's pure parts: the coverage split, its objective, and
the fraction of an ensemble's gain a distilled net keeps, with a bootstrap.

**Gain kept.** With ``b`` the errors of a baseline (one net: the mean
member, or the control trained as long as the student), ``e`` the
ensemble's and ``d`` the distilled net's (means over seeds),

.. math::  \mathrm{kept} = \frac{b - d}{b - e},

undefined when the ensemble does not beat the baseline (``b <= e``). The
paper's speech figure is (60.8 - 58.9) / (61.1 - 58.9) = 86%.

**Bootstrap.** :func:`bootstrap_kept` resamples the evaluation images (with
replacement, the same images for every net of a replicate) and the seeds
(with replacement; *paired*: the distilled net and the baseline of one seed
share its initialisation and data order, so one draw of seed indices serves
both), and takes the 2.5 and 97.5 percentiles of ``kept`` over replicates
whose resampled gain is positive.

**Coverage arm.** The members see part ``A`` of the training split; the
student sees all of it, with hard labels and soft targets on ``A`` and soft
targets **only** on the rest (:func:`coverage_objective`): on the rest,
where the members have never been, the ensemble's outputs are all it learns.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kdjax import losses


def gain_kept(baseline, ensemble_errors, distilled) -> float | None:
  """``(mean(baseline) - mean(distilled)) / (mean(baseline) - ensemble)``.

  None when the ensemble is not better than the baseline.
  """
  b = float(np.mean(baseline))
  gain = b - float(np.mean(ensemble_errors))
  if gain <= 0:
    return None
  return (b - float(np.mean(distilled))) / gain


def wrong(logits, labels) -> np.ndarray:
  """``[N]`` bool: the images ``logits`` (``[N, C]``) get wrong."""
  return np.asarray(np.argmax(np.asarray(logits), -1) != np.asarray(labels))


def bootstrap_kept(base_wrong, ens_wrong, dist_wrong, *, paired: bool,
                   num_samples: int = 2000, seed: int = 0) -> dict:
  """The fraction kept, its bootstrap interval, and the gain's.

  Args:
    base_wrong: ``[S_b, N]`` bool, the baseline nets' wrong images.
    ens_wrong: ``[N]`` bool, the ensemble's.
    dist_wrong: ``[S_d, N]`` bool, the distilled nets'.
    paired: the row ``i`` of both is one seed (``S_b == S_d``): resample
      the seeds once for both. Otherwise each is resampled on its own.
    num_samples: bootstrap replicates.
    seed: the resampling's seed.

  Returns:
    ``{"kept", "kept_lo", "kept_hi", "gain", "gain_lo", "gain_hi",
    "frac_no_gain", "baseline", "ensemble", "distilled"}``: point values
    from the data (mean error counts, of ``N`` images), 95% percentile
    intervals, and the fraction of replicates whose gain is not positive
    (they have no ``kept``).

  Raises:
    ValueError: shapes that do not match, or ``paired`` with different
      seed counts.
  """
  base = np.asarray(base_wrong, bool)
  dist = np.asarray(dist_wrong, bool)
  ens = np.asarray(ens_wrong, bool)
  if base.ndim != 2 or dist.ndim != 2 or ens.ndim != 1 or not (
      base.shape[1] == dist.shape[1] == ens.shape[0]):
    raise ValueError(
        f"bootstrap_kept needs base [S, N], ens [N], dist [S, N]; got "
        f"{base.shape}, {ens.shape}, {dist.shape}.")
  if paired and base.shape[0] != dist.shape[0]:
    raise ValueError(f"paired=True needs as many baseline as distilled "
                     f"seeds; got {base.shape[0]} and {dist.shape[0]}.")
  n = ens.shape[0]
  rng = np.random.default_rng(seed)
  b_c, d_c = base.sum(1).astype(float), dist.sum(1).astype(float)
  e_c = float(ens.sum())
  point_gain = b_c.mean() - e_c
  point = None if point_gain <= 0 else (b_c.mean() - d_c.mean()) / point_gain
  kept, gains = [], []
  for _ in range(num_samples):
    w = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
    sb = rng.integers(0, base.shape[0], base.shape[0])
    sd = sb if paired else rng.integers(0, dist.shape[0], dist.shape[0])
    b = (base[sb] @ w).mean()
    d = (dist[sd] @ w).mean()
    g = b - float(ens @ w)
    gains.append(g)
    if g > 0:
      kept.append((b - d) / g)
  lo, hi = (np.percentile(kept, [2.5, 97.5]) if kept else (np.nan, np.nan))
  glo, ghi = np.percentile(gains, [2.5, 97.5])
  return {"kept": point, "kept_lo": float(lo), "kept_hi": float(hi),
          "gain": float(point_gain), "gain_lo": float(glo),
          "gain_hi": float(ghi),
          "frac_no_gain": float(np.mean(np.asarray(gains) <= 0)),
          "baseline": float(b_c.mean()), "ensemble": e_c,
          "distilled": float(d_c.mean())}


def coverage_split(n: int, part: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """``(part_idx, rest_idx)``: a seeded split of ``range(n)``, both sorted.

  Raises:
    ValueError: ``part`` not in ``[1, n - 1]``.
  """
  if not 0 < part < n:
    raise ValueError(f"coverage part must be in [1, {n - 1}] (the members' "
                     f"share of {n} training images); got {part}.")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[:part]), np.sort(perm[part:])


def coverage_transfer(images, labels, part_idx) -> dict:
  """The student's transfer set: every image, ``'labelled'`` on ``A`` only.

  The labels of the rest are kept (the batch needs a label array) but
  :func:`coverage_objective` never reads them.
  """
  labelled = np.zeros(len(labels), bool)
  labelled[np.asarray(part_idx)] = True
  return {"image": jnp.asarray(images), "label": jnp.asarray(labels),
          "labelled": jnp.asarray(labelled)}


def coverage_objective(s, t, batch, *, temperature, alpha):
  """``kd`` (hard + soft) where ``batch['labelled']``, else ``T^2 KL`` only.

  A kdjax objective (:mod:`kdjax.objectives`); declare the field with
  ``kdjax.Fields(extra=("labelled",))``. On an unlabelled example the loss
  and its gradient do not depend on the label.
  """
  lab = batch["labelled"]
  soft = losses.distillation_loss(s, t, temperature)
  # The label of an unlabelled example is replaced before it is read.
  y = jnp.where(lab, batch["label"], 0)
  kd = losses.kd_objective(s, t, y, temperature=temperature, alpha=alpha)
  return jnp.where(lab, kd, soft), {"soft_loss": soft}
