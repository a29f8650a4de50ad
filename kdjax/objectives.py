r"""Training objectives: functions, found by name in one registry.

An objective is a function

``objective(student_logits, teacher_logits, batch, *, <hyperparameters>)
-> loss`` or ``-> (loss, aux)``

returning the **per-position** loss, of shape ``student_logits.shape[:-1]``
(one value per example, or per token for sequences), and optionally a dict
``aux`` of per-position values to be logged (weighted like the loss). The
train step reduces it as ``sum(w * loss) / sum(w)`` over the global batch
(:mod:`kdjax.step`). ``batch`` is the step's batch, with the labels under
``"label"`` whatever field :class:`kdjax.fields.Fields` names them;
``teacher_logits`` is None for an objective that needs no teacher.

**An objective declares the hyperparameters it reads**: the parameters
after ``(student_logits, teacher_logits, batch)`` are their names (or
:class:`Objective`'s ``hparams=`` says so). The step passes it exactly
those, from the state's ``hparams`` (:mod:`kdjax.hparams`: each may be a
schedule, is logged in the metrics and can be swept under ``vmap``). A
parameter with a default is optional: the state's value when the state
has one, else the default. :func:`kdjax.fit` refuses, before compiling, a
state missing one that has no default, or holding one that the objective
does not read (besides ``temperature`` and ``alpha``, which every state
holds).

Built-ins (``T`` the temperature, ``p = softmax(v/T)`` the teacher,
``q = softmax(z/T)`` the student; each reads exactly the names listed):

* ``"kd"`` reads ``temperature``, ``alpha``:
  ``alpha CE(y, softmax(z)) + (1 - alpha) T^2 KL(p || q)``
  (:func:`kdjax.losses.kd_objective`).
* ``"soft"`` reads ``temperature``: ``T^2 KL(p || q)``
  (:func:`kdjax.losses.distillation_loss`).
* ``"logit_matching"`` reads nothing: the squared logit difference of
  eq. 4 (:func:`kdjax.losses.logit_matching_loss`).
* ``"hard"`` reads nothing: ``CE(y, softmax(z))``; no teacher.
* ``"reverse_kl"`` reads ``temperature``: ``T^2 KL(q || p)``, mode-seeking
  (:func:`kdjax.losses.reverse_distillation_loss`).
* ``"jsd"`` reads ``temperature`` and ``beta`` (0.5 when the state holds
  none): ``T^2 JSD_beta(p, q) / (beta (1 - beta))``, the mixture
  ``beta p + (1 - beta) q`` (:func:`kdjax.losses.generalized_jsd_loss`);
  :func:`jsd` fixes ``beta`` instead.
* ``"topk"`` reads ``temperature``: ``T^2 KL`` from the batch's cached
  ``"topk_values"`` / ``"topk_indices"``
  (:func:`kdjax.losses.topk.topk_distillation_loss`; declare them:
  ``Fields(extra=("topk_values", "topk_indices"))``); no teacher is run.
* ``"chunked_kd"``, ``"chunked_soft"``, ``"chunked_reverse_kl"``,
  ``"chunked_jsd"``, ``"chunked_topk"``: the same losses as ``"kd"``,
  ``"soft"``, ``"reverse_kl"``, ``"jsd"`` and ``"topk"``, computed by the
  fused chunked loss from the student's (and teacher's) hidden states and
  output projection, never holding ``[tokens, V]`` logits: hidden-state
  objectives (``form="hidden"``, :mod:`kdjax.fused`; build the student and
  teacher with ``head=``). :func:`chunked` makes the other combinations.

The soft objectives log ``soft_loss`` (and ``hard_loss`` when the batch
has labels). To train any of them with the hard labels mixed in, wrap it:
:func:`with_hard_labels` gives ``alpha CE(y, q_1) + (1 - alpha) L`` and
reads ``alpha`` besides the wrapped objective's hyperparameters.

A new loss plugs in without editing kdjax: pass the function itself as the
step's ``objective``, or :func:`register` it under a name:

>>> import jax.numpy as jnp
>>> from kdjax import losses, objectives
>>> def reverse_ce(s, t, batch, *, temperature):
...   p = losses.tempered_softmax(s, temperature)
...   return -jnp.sum(p * losses.tempered_log_softmax(t, temperature), -1)
>>> obj = objectives.register("reverse_ce", reverse_ce)
>>> obj.needs_teacher, obj.hparams
(True, ('temperature',))
>>> objectives.with_hard_labels(obj).hparams
('temperature', 'alpha')
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from typing import Callable, Mapping, Optional, Union

import jax.numpy as jnp

from kdjax import hparams as hparams_lib
from kdjax import records
from kdjax import losses

__all__ = ["Objective", "register", "get", "names", "jsd", "with_hard_labels",
           "chunked", "check_hparams", "record", "REGISTRY"]

_P = inspect.Parameter


def _declared(fn: Callable, name: str, form: str = "logits"
              ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(names, optional)``: the hyperparameters ``fn``'s signature reads."""
  if not callable(fn):
    raise TypeError(f"objective {name!r} is not callable: got "
                    f"{type(fn).__name__}.")
  usage = ("an objective is called as fn(student_logits, teacher_logits, "
           "batch, *, <hyperparameters>) -> per-position loss")
  first = 3
  if form == "hidden":
    usage = ("a hidden-state objective is called as fn(student, teacher, "
             "batch, weights, *, <hyperparameters>) -> (sum, terms)")
    first = 4
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    raise TypeError(
        f"objective {name!r}'s signature cannot be read; wrap it as "
        f"kdjax.objectives.Objective(fn, {name!r}, hparams=(...)) naming the "
        "hyperparameters it reads.") from None
  params = list(sig.parameters.values())
  kinds = [p.kind for p in params]
  positional = [p for p in params
                if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
  if len(positional) < first and _P.VAR_POSITIONAL not in kinds:
    raise TypeError(f"objective {name!r} has signature {name}{sig}, but "
                    f"{usage}.")
  if _P.VAR_KEYWORD in kinds:
    raise TypeError(
        f"objective {name!r} takes **kwargs, so the hyperparameters it reads "
        f"cannot be told from its signature {name}{sig}; name them: "
        f"kdjax.objectives.Objective(fn, {name!r}, hparams=('temperature', "
        "...)).")
  rest = positional[first:] + [p for p in params
                               if p.kind == _P.KEYWORD_ONLY]
  for p in rest:
    if p.kind == _P.POSITIONAL_ONLY:
      raise TypeError(f"objective {name!r}: hyperparameter {p.name!r} is "
                      f"positional-only, but {usage}.")
    hparams_lib.check_name(p.name)
  return (tuple(p.name for p in rest),
          tuple(p.name for p in rest if p.default is not _P.empty))


@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective function and what it needs from the step.

  Attributes:
    fn: ``(student_logits, teacher_logits, batch, *, <hyperparameters>)
      -> loss | (loss, aux)``, per position.
    name: a name for records (``fit.json``) and messages.
    needs_teacher: the step must supply teacher logits (online or cached).
    needs_labels: the batch must carry labels.
    hparams: the names of the hyperparameters ``fn`` reads, in order. None
      (the default): read from ``fn``'s signature, every parameter after
      the first three.
    optional: those of ``hparams`` that ``fn`` has a default for (passed
      only when the state holds them). Read from the signature with
      ``hparams``; an explicit ``hparams`` is all required unless listed
      here.
    form: ``"logits"`` (the default: ``fn`` gets logits and returns
      per-position losses) or ``"hidden"``: ``fn(student, teacher, batch,
      weights, *, <hyperparameters>) -> (sum, terms)`` gets hidden states
      and output projections (:class:`kdjax.heads.Hidden`) and returns
      weighted sums (:mod:`kdjax.fused`).
  """
  fn: Callable
  name: str
  needs_teacher: bool = True
  needs_labels: bool = False
  hparams: Optional[tuple[str, ...]] = None
  optional: tuple[str, ...] = ()
  form: str = "logits"

  def __post_init__(self):
    if self.form not in ("logits", "hidden"):
      raise ValueError(f"objective {self.name!r}: form must be 'logits' or "
                       f"'hidden', got {self.form!r}.")
    if self.hparams is None:
      names, optional = _declared(self.fn, self.name, self.form)
      object.__setattr__(self, "hparams", names)
      object.__setattr__(self, "optional", optional)
      return
    object.__setattr__(self, "hparams", tuple(self.hparams))
    object.__setattr__(self, "optional", tuple(self.optional))
    for n in self.hparams:
      hparams_lib.check_name(n)
    extra = set(self.optional) - set(self.hparams)
    if extra:
      raise ValueError(f"objective {self.name!r}: optional {sorted(extra)} "
                       f"are not among its hparams {self.hparams}.")

  @property
  def required(self) -> tuple[str, ...]:
    """The hyperparameters the state must hold."""
    return tuple(n for n in self.hparams if n not in self.optional)

  def select(self, values: Mapping) -> dict:
    """The entries of ``values`` this objective reads (what the step passes).

    Raises:
      ValueError: a required one is missing (see :func:`check_hparams`).
    """
    check_hparams(self, values)
    return {n: values[n] for n in self.hparams if n in values}

  def __call__(self, student_logits, teacher_logits, batch, *args,
               **hparams):
    """``(loss, aux)``, given exactly the hyperparameters it declares.

    A hidden-state objective (``form="hidden"``) takes the weights as a
    fourth argument and returns weighted sums (:mod:`kdjax.fused`).

    Raises:
      TypeError: a hyperparameter it does not read (it would be ignored).
      ValueError: a required one is missing.
    """
    unread = sorted(set(hparams) - set(self.hparams))
    if unread:
      raise TypeError(
          f"objective {self.name!r} reads {list(self.hparams)}, not "
          f"{unread}: pass only those (Objective.select(values) picks them).")
    check_hparams(self, hparams)
    out = self.fn(student_logits, teacher_logits, batch, *args, **hparams)
    loss, aux = out if isinstance(out, tuple) else (out, {})
    return loss, dict(aux)


def check_hparams(objective: Objective, available, *,
                  where: str = "the state", unread: bool = False) -> None:
  """Raises if ``available`` (names) lacks a hyperparameter ``objective``
  requires, naming it and how to add it.

  With ``unread`` (what :func:`kdjax.fit` checks), also if ``available``
  holds one that ``objective`` does not read, other than ``temperature``
  and ``alpha`` (which every state holds): a misspelt ``"betta"`` would
  otherwise be silently unused while ``"jsd"`` took its default beta.
  """
  extra = sorted(set(available) - set(objective.hparams) -
                 set(hparams_lib.DEFAULTS))
  if unread and extra:
    raise ValueError(
        f"{where} holds the hyperparameter(s) {extra}, which objective "
        f"{objective.name!r} does not read (it reads "
        f"{list(objective.hparams)}); drop them from the state's hparams, "
        "or use an objective that reads them.")
  missing = [n for n in objective.required if n not in available]
  if missing:
    example = ", ".join(f"{n!r}: ..." for n in missing)
    raise ValueError(
        f"objective {objective.name!r} reads the hyperparameter(s) "
        f"{missing}, which {where} does not hold (it holds "
        f"{sorted(available)}). Add them: kdjax.TrainState.create(..., "
        f"hparams={{{example}}}) (a number or a schedule each), or in a "
        "sweep kdjax.sweep.create_sweep(..., hparams={...}).")


# ----------------------------------------------------------------------------
# The built-ins.
# ----------------------------------------------------------------------------


def _kd(s, t, batch, *, temperature, alpha):
  hard = losses.hard_label_loss(s, batch["label"])
  soft = losses.distillation_loss(s, t, temperature)
  total = losses.kd_objective(s, t, batch["label"], temperature=temperature,
                              alpha=alpha)
  return total, {"hard_loss": hard, "soft_loss": soft}


def _with_hard(soft, batch, s):
  aux = {"soft_loss": soft}
  if "label" in batch:
    aux["hard_loss"] = losses.hard_label_loss(s, batch["label"])
  return soft, aux


def _soft(s, t, batch, *, temperature):
  return _with_hard(losses.distillation_loss(s, t, temperature), batch, s)


def _logit_matching(s, t, batch):
  return _with_hard(losses.logit_matching_loss(s, t), batch, s)


def _hard(s, t, batch):
  del t  # None: the objective needs no teacher.
  hard = losses.hard_label_loss(s, batch["label"])
  return hard, {"hard_loss": hard}


def _reverse_kl(s, t, batch, *, temperature):
  return _with_hard(losses.reverse_distillation_loss(s, t, temperature),
                    batch, s)


def _jsd(s, t, batch, *, temperature, beta=0.5):
  # generalized_jsd_loss checks a concrete beta; the state's is checked when
  # the state is made.
  return _with_hard(losses.generalized_jsd_loss(s, t, temperature, beta=beta),
                    batch, s)


@functools.lru_cache(maxsize=None)
def _fixed_jsd(beta: float) -> "Objective":
  fn = functools.partial(_jsd, beta=beta)
  return Objective(fn, f"jsd(beta={beta:g})", needs_teacher=True,
                   hparams=("temperature",))


def jsd(beta: Optional[float] = None) -> "Objective":
  """The generalised JSD objective, ``beta`` the teacher's weight.

  ``jsd()`` is the registered ``"jsd"``: it reads ``beta`` from the state
  (0.5 when the state holds none), so ``beta`` can be scheduled and swept.
  ``jsd(beta)`` fixes it instead (a Python number, checked here) and reads
  only the temperature.
  """
  if beta is None:
    return REGISTRY["jsd"]
  losses.generalized_jsd_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 1.0,
                              beta=beta)  # Checks beta now, not when traced.
  return _fixed_jsd(float(beta))


def _topk_loss(s, t, batch, *, temperature):
  from kdjax.losses import topk  # pylint: disable=g-import-not-at-top
  del t  # None: the teacher's top-k logits are in the batch.
  if "topk_values" not in batch or "topk_indices" not in batch:
    raise ValueError(
        "objective 'topk' reads the batch's cached 'topk_values' and "
        "'topk_indices' (kdjax.losses.topk.topk_targets); add them and declare "
        "them with kdjax.Fields(extra=('topk_values', 'topk_indices')).")
  soft = topk.topk_distillation_loss(s, batch["topk_values"],
                                     batch["topk_indices"], temperature)
  return _with_hard(soft, batch, s)


@dataclasses.dataclass(frozen=True)
class _HardLabels:
  """``alpha CE(y, softmax(z)) + (1 - alpha) * inner`` (see below)."""
  inner: Objective

  def __call__(self, s, t, batch, **hp):
    alpha = hp.pop("alpha")
    soft, aux = self.inner(s, t, batch, **hp)
    hard = losses.hard_label_loss(s, batch["label"])
    return (alpha * hard + (1 - alpha) * soft,
            {**aux, "soft_loss": soft, "hard_loss": hard})


def with_hard_labels(objective: Union[str, Objective, Callable]
                     ) -> Objective:
  r"""``objective`` with the hard labels mixed in, weighted by ``alpha``.

  .. math::
    L = \alpha\, \mathrm{CE}(y, \mathrm{softmax}(z))
      + (1 - \alpha)\, L_\mathrm{objective}

  The result reads ``alpha`` besides ``objective``'s own hyperparameters
  and needs labels; it logs ``soft_loss`` (the wrapped loss) and
  ``hard_loss``. ``with_hard_labels("soft")`` is the paper's objective
  (``"kd"`` computes the same with the ``alpha = 0`` guard of
  :func:`kdjax.losses.kd_objective`: there a NaN hard term, from a label
  outside ``[0, C)``, counts 0; here the product ``0 * NaN`` does not).

  >>> from kdjax import objectives
  >>> obj = objectives.with_hard_labels("reverse_kl")
  >>> obj.name, obj.hparams, obj.needs_labels
  ('with_hard_labels(reverse_kl)', ('temperature', 'alpha'), True)

  Raises:
    ValueError: ``objective`` already reads ``alpha``.
  """
  inner = get(objective)
  if inner.form == "hidden":
    raise ValueError(
        f"objective {inner.name!r} works from hidden states; mix the hard "
        "labels in with kdjax.objectives.chunked(..., hard_labels=True).")
  if "alpha" in inner.hparams:
    raise ValueError(f"objective {inner.name!r} already reads alpha; "
                     "with_hard_labels would mix the hard labels in twice.")
  return Objective(_HardLabels(inner), f"with_hard_labels({inner.name})",
                   needs_teacher=inner.needs_teacher, needs_labels=True,
                   hparams=inner.hparams + ("alpha",),
                   optional=inner.optional)


REGISTRY: dict[str, Objective] = {}


def register(name: str, fn: Callable, *, needs_teacher: bool = True,
             needs_labels: bool = False, overwrite: bool = False,
             hparams: Optional[tuple[str, ...]] = None,
             optional: tuple[str, ...] = (),
             form: str = "logits") -> Objective:
  """Registers ``fn`` as the objective ``name`` (see the module docstring).

  ``hparams``: the names of the hyperparameters ``fn`` reads, if its
  signature does not say, and ``optional`` those of them with a default
  (see :class:`Objective`); ``form="hidden"`` for a hidden-state objective
  (:mod:`kdjax.fused`).

  Raises:
    TypeError: ``fn`` does not have an objective's signature.
    ValueError: ``name`` is taken (unless ``overwrite``).
  """
  obj = Objective(fn, name, needs_teacher=needs_teacher,
                  needs_labels=needs_labels, hparams=hparams,
                  optional=optional if hparams is not None else (),
                  form=form)
  if name in REGISTRY and not overwrite:
    raise ValueError(f"objective {name!r} is already registered; pass "
                     "overwrite=True to replace it.")
  REGISTRY[name] = obj
  return obj


register("kd", _kd, needs_teacher=True, needs_labels=True)
register("soft", _soft, needs_teacher=True)
register("logit_matching", _logit_matching, needs_teacher=True)
register("hard", _hard, needs_teacher=False, needs_labels=True)
register("reverse_kl", _reverse_kl, needs_teacher=True)
register("jsd", _jsd, needs_teacher=True)
register("topk", _topk_loss, needs_teacher=False)


def chunked(divergence: str = "forward_kl", *, hard_labels: bool = False,
            topk: bool = False, chunk_size: int = 512,
            tail: str = "renormalize") -> Objective:
  """A hidden-state objective: the fused chunked loss (:mod:`kdjax.fused`).

  Args:
    divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (reads
      ``beta``, 0.5 when the state holds none).
    hard_labels: mix in ``alpha CE(y, softmax(z))`` (reads ``alpha``; the
      ``alpha = 0`` guard of ``"kd"``); needs labels.
    topk: the teacher is the batch's cached ``"topk_values"`` /
      ``"topk_indices"`` (forward KL only); no teacher is run.
    chunk_size: positions per chunk (memory against speed, see
      :mod:`kdjax.chunked`).
    tail: the top-k tail mode (:func:`kdjax.topk.topk_distillation_loss`;
      ``"bucket"`` reads the batch's ``"topk_tail"``).

  ``chunked()`` is the registered ``"chunked_soft"``,
  ``chunked(hard_labels=True)`` ``"chunked_kd"``.

  >>> from kdjax import objectives
  >>> obj = objectives.chunked("reverse_kl", hard_labels=True)
  >>> obj.form, obj.hparams, obj.needs_labels
  ('hidden', ('temperature', 'alpha'), True)
  """
  from kdjax.losses import chunked as chunked_lib  # pylint: disable=g-import-not-at-top
  from kdjax import fused  # pylint: disable=g-import-not-at-top
  if divergence not in chunked_lib.DIVERGENCES:
    raise ValueError(f"divergence must be one of {chunked_lib.DIVERGENCES}, "
                     f"got {divergence!r}.")
  if topk and divergence != "forward_kl":
    raise ValueError(
        f"divergence={divergence!r} from cached top-k targets is not "
        "offered: it needs the teacher's probability of every class, which "
        "a top-k cache does not hold; use divergence='forward_kl' or an "
        "online teacher.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or (
      chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got "
                     f"{chunk_size!r}.")
  fn = fused.ChunkedObjective(divergence, bool(hard_labels), bool(topk),
                              chunk_size, tail)
  hp = ("temperature",) + (("alpha",) if hard_labels else ()) + (
      ("beta",) if divergence == "jsd" else ())
  name = (f"chunked({divergence}, hard_labels={bool(hard_labels)}, "
          f"topk={bool(topk)}, chunk_size={chunk_size}, tail={tail})")
  return Objective(fn, name, needs_teacher=not topk,
                   needs_labels=bool(hard_labels), hparams=hp,
                   optional=("beta",) if divergence == "jsd" else (),
                   form="hidden")


for _name, _obj in [("chunked_kd", chunked(hard_labels=True)),
                    ("chunked_soft", chunked()),
                    ("chunked_reverse_kl", chunked("reverse_kl")),
                    ("chunked_jsd", chunked("jsd")),
                    ("chunked_topk", chunked(topk=True))]:
  REGISTRY[_name] = dataclasses.replace(_obj, name=_name)
# kdjax's own: fit.json names them; any other objective is recorded with a
# hash of its code too.
_BUILTINS = dict(REGISTRY)


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(objective: Union[str, Objective, Callable]) -> Objective:
  """The :class:`Objective` for a registered name, an Objective or a function.

  A bare function is taken to need a teacher and no labels, and to read the
  hyperparameters its signature names; wrap it in :class:`Objective` (or
  :func:`register` it) to say otherwise.

  Raises:
    ValueError: an unknown name (the registered ones are listed).
    TypeError: a function with the wrong signature.
  """
  if isinstance(objective, Objective):
    return objective
  if isinstance(objective, str):
    if objective not in REGISTRY:
      raise ValueError(f"objective must be one of {names()} or a function, "
                       f"got {objective!r}.")
    return REGISTRY[objective]
  name = getattr(objective, "__qualname__", type(objective).__name__)
  return Objective(objective, name)


def record(objective: Objective) -> dict:
  """What ``fit.json`` records of an objective: its identity.

  A kdjax built-in by its name, as always (``{"objective": "kd"}``); any
  other (a function, a registered or wrapped one) also by
  ``"objective_code"``: its qualified name, a hash of its code
  (:func:`kdjax.hparams.fingerprint`), the hyperparameters it reads and the
  Python version the hash was taken under. A resumed run whose objective
  was edited is then refused instead of silently mixing two objectives.
  """
  obj = get(objective)
  if _BUILTINS.get(obj.name) == obj:
    return {"objective": obj.name}
  fn = obj.fn
  qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
  module = records.recorded_module(
      getattr(fn, "__module__", type(fn).__module__))
  return {"objective": obj.name, "objective_code": {
      "qualname": f"{module}.{qualname}",
      "sha256": hparams_lib.fingerprint(obj),
      "hparams": list(obj.hparams),
      "python": "{}.{}".format(*sys.version_info[:2])}}
