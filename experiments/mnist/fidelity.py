"""How well a run's students match their teacher, on and off the transfer set.

  python -m experiments.mnist.fidelity WORKDIR ROW [--out FILE.json]

``WORKDIR`` is a finished ``experiments.mnist.main`` run and ``ROW`` the
name of one of its student programs (``distilled_T20``, ``sweep_w800``,
...: a folder of ``WORKDIR/students/``). The final checkpoint of that row is
restored (its structure rebuilt from the row's ``run_config.json``) and
each member is compared with the run's teacher on the 50k transfer images,
the 10k validation images and the 10k test images:

* ``errors``: misclassified images;
* ``disagreements``: images where student and teacher top-1 differ;
* ``kl_T20``: the mean of :math:`T^2\\,\\mathrm{KL}(p_T \\| q_T)` at
  :math:`T = 20` (``kdjax.losses.distillation_loss``, the soft term the
  students were trained on when their T was 20);
* ``logit_rmse``: the root-mean-square difference of the zero-meaned
  logits, :math:`\\sqrt{\\mathrm{mean}((z - \\bar z) - (v - \\bar v))^2}`,
  which the soft term approaches at high T (paper, eq. 4).

Fidelity on the transfer set against fidelity off it separates "the student
could not fit its teacher" (optimisation) from "it fits the teacher where it
was shown it and not between those points" (generalisation); see Stanton et
al., 2021, "Does knowledge distillation really work?". A few seconds on the
CPU for a row of 9 students.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.mnist import pipeline
from kdjax import checkpoint, losses, sweep
from kdjax.paper import cli, provenance


def _stats(student: np.ndarray, teacher: np.ndarray,
           labels: np.ndarray) -> dict:
  zs = student - student.mean(-1, keepdims=True)
  zt = teacher - teacher.mean(-1, keepdims=True)
  kl = losses.distillation_loss(jnp.asarray(student), jnp.asarray(teacher),
                                20.0)
  disagreements = int(np.sum(student.argmax(-1) != teacher.argmax(-1)))
  return {"errors": pipeline.errors(student, labels),
          "disagreements": disagreements,
          "kl_T20": round(float(np.mean(np.asarray(kl, np.float64))), 4),
          "logit_rmse": round(float(np.sqrt(np.mean(np.square(
              zs.astype(np.float64) - zt)))), 4)}


def fidelity(workdir: str | pathlib.Path, row: str) -> dict:
  """Per-member fidelity of ``row``'s final students to the run's teacher."""
  workdir = pathlib.Path(workdir)
  folder = workdir / "students" / row
  for needed in (workdir / "run_config.json", folder / "run_config.json"):
    if not needed.exists():
      raise cli.InputNotFoundError(
          f"{needed} does not exist: WORKDIR must be a run of "
          "experiments.mnist.main and ROW one of the folders in "
          f"{workdir / 'students'}.")
  config = ml_collections.ConfigDict(
      json.loads((workdir / "run_config.json").read_text()))
  rc = json.loads((folder / "run_config.json").read_text())
  like, apply = pipeline.initial_students(
      rc["width"], ml_collections.ConfigDict(rc["optimizer"]),
      (rc["n"] // rc["batch_size"]) * rc["epochs"], seeds=rc["seeds"],
      temperatures=rc["temperatures"], alphas=rc["alphas"],
      dropout=rc.get("dropout", (0.0, 0.0)))
  ckpt = checkpoint.Checkpointer(folder / "checkpoints")
  try:
    restored = ckpt.restore_latest(like)
  finally:
    ckpt.close()
  if restored is None:
    raise cli.InputNotFoundError(f"no checkpoint in {folder / 'checkpoints'}.")
  state, meta = restored
  if int(meta["epoch"]) != rc["epochs"]:
    raise cli.InputError(f"{row} stopped at epoch {meta['epoch']} of "
                         f"{rc['epochs']}: not a finished row.")

  if not config.teacher.path:  # Trained in the run: load what it saved.
    saved = workdir / config.teacher.get("save_to", "")
    if not config.teacher.get("save_to", "") or not saved.exists():
      raise cli.InputNotFoundError(
          f"the run in {workdir} trained its teacher without saving it "
          "(config.teacher.save_to); its students cannot be compared with it.")
    config.teacher.path = str(saved.absolute())
  splits = pipeline.load_splits(config)
  teacher, t_params, _, _ = pipeline.get_teacher(config, splits, workdir)
  t_apply = lambda p, x, train, rng: teacher.apply_fn(p, {}, x)
  sets = {"transfer": (splits.train_images, splits.train_labels),
          "val": (splits.val_images, splits.val_labels),
          "test": (splits.test_images, splits.test_labels)}
  if rc["n"] != len(splits.train_labels):
    sets.pop("transfer")  # A transfer subset: its images are not recorded.
  t_logits = {k: pipeline.predict_logits(t_apply, t_params, x)
              for k, (x, _) in sets.items()}
  members = []
  for i, (seed, temp, alpha) in enumerate(zip(rc["seeds"], rc["temperatures"],
                                              rc["alphas"])):
    params = sweep.member(state.params, i)
    member = {"seed": seed, "temperature": temp, "alpha": alpha}
    for k, (x, y) in sets.items():
      member[k] = _stats(pipeline.predict_logits(apply, params, x),
                         t_logits[k], y)
    members.append(member)
  env = provenance.environment()
  return {"workdir": workdir.name, "row": row, "epochs": rc["epochs"],
          "width": rc["width"], "objective": rc["objective"],
          "command": pipeline.command_line(),
          "git_commit": provenance.git_commit(
              str(pathlib.Path(__file__).parent)),
          "device": env["device"], "jax_version": env["jax_version"],
          "teacher": {k: {"errors": pipeline.errors(t_logits[k], sets[k][1])}
                      for k in sets},
          "members": members}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   epilog=cli.HELP_EPILOG)
  parser.add_argument("workdir")
  parser.add_argument("row")
  parser.add_argument("--out", help="write the JSON here (atomically)")
  args = parser.parse_args(argv)
  result = fidelity(args.workdir, args.row)
  text = json.dumps(result, indent=2) + "\n"
  if args.out:
    checkpoint.write_atomic(args.out, text)
  for m in result["members"]:
    print(f"T={m['temperature']:g} seed {m['seed']}: " + "; ".join(
        f"{k} {m[k]['errors']} errors, {m[k]['disagreements']} disagreements, "
        f"KL {m[k]['kl_T20']}, logit RMSE {m[k]['logit_rmse']}"
        for k in ("transfer", "val", "test") if k in m))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
