"""Switching the BN layers of a Linen model one did not write: `jaxbn.swap_batch_norm`.

    with jaxbn.swap_batch_norm(batch_groups=8):      # per-device BN under jit, 8 devices
      variables = model.init(key, x)
      y, updates = model.apply(variables, x, mutable=["batch_stats"])

Under the context manager every `flax.linen.BatchNorm` (and every jaxbn layer)
called through `init` / `apply` runs as the jaxbn layer of the chosen kind,
with its own fields and the ones given overriding them, on the same variables
(PyTorch's `convert_sync_batchnorm`, detectron2's `convert_frozen_batchnorm`,
without editing the model's code).
"""

from __future__ import annotations

import contextlib
import dataclasses

from flax import linen as nn

from jaxbn import checks
from jaxbn.linen import BatchNorm, BatchRenorm, FrozenBatchNorm, run_on_variables_of

__all__ = ["KINDS", "swap_batch_norm"]

# The kinds a BN layer can be switched to; adding one is one entry.
KINDS: dict[str, type[BatchNorm]] = {"batch_norm": BatchNorm, "frozen": FrozenBatchNorm, "renorm": BatchRenorm}
_NOT_FIELDS = ("parent", "name")


def fields_of(kind: str, overrides: dict) -> tuple[type[BatchNorm], tuple[str, ...]]:
  """The class of `kind` and its fields; ValueError naming a bad kind or field."""
  cls = checks.choose("kind", kind, KINDS)
  names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in _NOT_FIELDS)
  unknown = sorted(set(overrides) - set(names))
  if unknown:
    raise ValueError(f"{unknown[0]}: not a field of {cls.__name__} (kind={kind!r}); its fields: {', '.join(names)}.")
  return cls, names


@contextlib.contextmanager
def swap_batch_norm(kind: str = "batch_norm", *, skip_frozen: bool = False, **fields):
  """Runs every Linen BN layer (flax's or jaxbn's) called inside as the jaxbn layer of `kind`.

  Args:
    kind: "batch_norm" (`jaxbn.BatchNorm`), "frozen" (`jaxbn.FrozenBatchNorm`)
      or "renorm" (`jaxbn.BatchRenorm`).
    skip_frozen: leave `jaxbn.FrozenBatchNorm` layers as they are.
    **fields: fields of that layer that override the swapped layer's own
      (e.g. `batch_groups=8`, `axis_name="batch"`, `train_affine=True`).

  Each layer keeps its variables (names, shapes): a checkpoint of the model
  loads as it is. A layer's own fields (momentum, epsilon, axis, ...) carry
  over; its `scale_init`/`bias_init` too, for `init`. With `batch_groups`
  over a model whose statistics have the feature shape, training returns one
  row per group (pool them with `jaxbn.sync_batch_stats`).
  """
  cls, names = fields_of(kind, fields)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name != "__call__"
      or not isinstance(module, nn.BatchNorm | BatchNorm)
      or (skip_frozen and isinstance(module, FrozenBatchNorm))
    ):
      return next_fun(*args, **kwargs)
    own = {name: getattr(module, name) for name in names if hasattr(module, name)}
    layer = cls(**{**own, **fields}, parent=None)
    x, *rest = args
    use_running_average = rest[0] if rest else kwargs.pop("use_running_average", None)
    limits = {k: kwargs.get(k) for k in ("r_max", "d_max")}  # Batch Renorm's; other kinds leave them unread
    return run_on_variables_of(module, layer, x, use_running_average, mask=kwargs.get("mask"), **limits)

  with nn.intercept_methods(intercept):
    yield
