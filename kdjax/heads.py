r"""Hidden states and the output projection instead of logits.

A language model's last layer maps final hidden states ``h [..., D]`` to
logits ``z = h W + b [..., V]``. At a large vocabulary ``V`` those logits
(and the softmaxes and cotangents the loss's gradient keeps) dominate the
train step's memory. The fused chunked loss (:mod:`kdjax.chunked`) never
holds them: it needs ``h``, ``W`` and ``b`` instead. This module is how a
:class:`kdjax.Student` or :class:`kdjax.Teacher` gives them.

**The design: a head named at construction.** ``Student.from_linen(module,
variables, head="logits")`` (likewise ``Student.from_nnx``,
``Teacher.from_linen``, ``Teacher.from_nnx``) runs the unchanged model, but
when the submodule named ``head`` is called, its input ``h`` and its
parameters are captured and returned in place of its output: the forward
returns a :class:`Hidden` ``(states, kernel, bias)`` instead of logits.
Why this and not a forward that the user rewrites to return
``(hidden, head)``:

* the model is not edited: the same module (and the same variables, the
  same checkpoint) serves the logits objectives, evaluation and the
  hidden-state objectives; a model whose head is ``nn.Dense`` /
  ``nnx.Linear`` (or a tied ``nn.Embed.attend`` / ``nnx.Embed.attend``)
  works as it is;
* the kernel is read from the params tree that the step differentiates,
  so its gradient (and FSDP's sharding of it) is the params' own;
* the head's logits are never computed, so nothing ``[N, V]`` is built.

The rule it relies on, checked on every call: the head is the model's
**last** operation, its output returned as is. A model that transforms its
logits after the head (a soft cap, a slice, a scale) is refused with an
error naming the head, because the captured ``h W + b`` would not be its
logits.

A :class:`Hidden` is also usable where logits are wanted:
:meth:`Hidden.logits` computes them (``h W + b``, what the head's ``__call__``
computes), and the train step does so for every logits objective, so a
student built with a head trains with any objective; only the hidden-state
objectives (:mod:`kdjax.fused`) avoid the ``[N, V]`` logits.

>>> import flax.linen as nn, jax, jax.numpy as jnp
>>> import kdjax
>>> class LM(nn.Module):
...   @nn.compact
...   def __call__(self, x, train=False):
...     return nn.Dense(7, name="head")(nn.Dense(4)(x))
>>> lm = LM(); x = jnp.ones((2, 3))
>>> variables = lm.init(jax.random.key(0), x)
>>> out, _ = kdjax.Student.from_linen(lm, variables, head="head")(x)
>>> out.states.shape, out.kernel.shape, out.shape
((2, 4), (4, 7), (2, 7))
>>> bool(jnp.allclose(out.logits(), lm.apply(variables, x), atol=1e-6))
True
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

__all__ = ["Hidden", "to_logits", "linen_call", "linen_head", "nnx_head",
           "check_head"]


@flax.struct.dataclass
class Hidden:
  """Final hidden states and the output projection: logits, unevaluated.

  Attributes:
    states: ``[..., D]`` hidden states (the head's input).
    kernel: ``[D, V]`` output projection.
    bias: ``[V]`` output bias, or None.
  """
  states: jax.Array
  kernel: jax.Array
  bias: Optional[jax.Array] = None

  @property
  def shape(self) -> tuple[int, ...]:
    """The logits' shape, ``states.shape[:-1] + (V,)``."""
    return tuple(self.states.shape[:-1]) + (self.kernel.shape[-1],)

  @property
  def num_classes(self) -> int:
    return int(self.kernel.shape[-1])

  def logits(self) -> jax.Array:
    """``states @ kernel + bias`` in their promoted dtype (as ``nn.Dense``)."""
    dtype = jnp.result_type(self.states, self.kernel)
    z = jnp.dot(self.states.astype(dtype), self.kernel.astype(dtype))
    return z if self.bias is None else z + self.bias.astype(dtype)


def to_logits(out: Any) -> Any:
  """``out.logits()`` for a :class:`Hidden`, else ``out`` (logits already)."""
  return out.logits() if isinstance(out, Hidden) else out


def _path(head: str) -> tuple[str, ...]:
  if not isinstance(head, str) or not head or any(
      not p for p in head.split("/")):
    raise ValueError(f"head must name the output layer's submodule, e.g. "
                     f"'logits' or 'decoder/lm_head', got {head!r}.")
  return tuple(head.split("/"))


def _hidden(head: str, x, kernel, bias) -> Hidden:
  if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(
        f"head {head!r}: its input has shape {x.shape} and its kernel "
        f"{kernel.shape}; a head must be a [D, V] projection of [..., D] "
        "hidden states (nn.Dense / nnx.Linear, or a tied Embed.attend).")
  if bias is not None and bias.shape != (kernel.shape[1],):
    raise ValueError(f"head {head!r}: bias shape {bias.shape}, want "
                     f"({kernel.shape[1]},).")
  return Hidden(x, kernel, bias)


def _not_last(head: str, what: str) -> ValueError:
  return ValueError(
      f"head {head!r}: the model's output is not the head's output ({what})."
      " The head must be the model's last operation, its output returned as "
      "is (no soft cap, slice or scale after it); build the student/teacher "
      "without head= to train on its logits.")


def _checked_call(head: str, captured: list, call):
  """``call()``, an error inside it after the capture named as such."""
  try:
    return call()
  except (TypeError, AttributeError) as e:
    if captured:  # The model used the Hidden as if it were logits.
      raise _not_last(head, f"it computed with it: {e}") from e
    raise


def linen_call(head: str, call):
  """``call()`` (a linen ``apply``) with the head at ``head`` captured.

  Returns the :class:`Hidden` the model returned (see :func:`check_head`).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  interceptor, captured = linen_head(head)
  with nn.intercept_methods(interceptor):
    out = _checked_call(head, captured, call)
  return out, captured


def check_head(head: str, out: Any, captured: list) -> Hidden:
  """The model's output, which must be the captured :class:`Hidden`.

  Raises:
    ValueError: the head was never called, or the model did something to
      its output before returning it.
  """
  if not captured:
    raise ValueError(
        f"head {head!r}: the model never called a submodule of that path; "
        "name the output layer ('/'-separated attribute names, e.g. "
        "'decoder/lm_head').")
  if out is not captured[-1]:
    raise _not_last(head, f"it returned {type(out).__name__}")
  return out


def linen_head(head: str):
  """``(interceptor, captured)`` for ``nn.intercept_methods``.

  The interceptor replaces the call of the submodule at path ``head``
  (``nn.Dense``'s ``__call__``, or ``nn.Embed.attend`` for tied
  embeddings) by a :class:`Hidden` of its input and parameters, appended to
  ``captured``.
  """
  path, captured = _path(head), []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None or tuple(module.path) != path:
      return next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    if "embedding" in params:  # Tied: Embed.attend(h) = h @ embedding.T.
      if context.method_name != "attend":
        return next_fun(*args, **kwargs)
      kernel, bias = params["embedding"].T, None
    elif context.method_name == "__call__" and "kernel" in params:
      kernel, bias = params["kernel"], params.get("bias")
    else:
      raise ValueError(
          f"head {head!r} is a {type(module).__name__} called through "
          f"{context.method_name!r}: a head must be an nn.Dense (a 'kernel' "
          "[D, V] and optional 'bias') or an nn.Embed used by attend().")
    out = _hidden(head, args[0], kernel, bias)
    captured.append(out)
    return out

  return interceptor, captured


class _NNXCapture:
  """Stands in for an NNX head for one call: returns a :class:`Hidden`."""

  def __init__(self, head: str, module, captured: list):
    self.head, self.module, self.captured = head, module, captured

  def __call__(self, x, *args, **kwargs):
    m = self.module
    if hasattr(m, "embedding") and not hasattr(m, "kernel"):
      return m(x, *args, **kwargs)  # A tied Embed's lookup: not the head.
    if not hasattr(m, "kernel"):
      raise ValueError(f"head {self.head!r} is a {type(m).__name__}: a head "
                       "must be an nnx.Linear (kernel [D, V], optional bias) "
                       "or an nnx.Embed used by attend().")
    bias = getattr(m, "bias", None)
    bias = None if bias is None else bias[...]
    out = _hidden(self.head, x, m.kernel[...], bias)
    self.captured.append(out)
    return out

  def attend(self, x):
    out = _hidden(self.head, x, self.module.embedding[...].T, None)
    self.captured.append(out)
    return out


def nnx_head(module, head: str, call):
  """``call(module)`` with the NNX submodule at ``head`` captured.

  The submodule (``nnx.Linear``, or an ``nnx.Embed`` whose ``attend`` is
  the head) is swapped for a stand-in for the call and put back after it
  (also on an error), so the module's graph is unchanged for the split
  that follows. Returns the call's output, checked by :func:`check_head`.
  """
  path, captured = _path(head), []
  parent = module
  for name in path[:-1]:
    parent = getattr(parent, name, None)
    if parent is None:
      break
  original = None if parent is None else getattr(parent, path[-1], None)
  if original is None:
    raise ValueError(f"head {head!r}: the NNX module has no submodule at "
                     "that path ('/'-separated attribute names).")
  stand_in = _NNXCapture(head, original, captured)
  object.__setattr__(parent, path[-1], stand_in)
  try:
    out = _checked_call(head, captured, lambda: call(module))
  finally:
    object.__setattr__(parent, path[-1], original)
  return check_head(head, out, captured)
