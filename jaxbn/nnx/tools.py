"""Tools for NNX models one did not write: switching their BN layers, PreciseBN."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxbn import checks, layer_call
from jaxbn.nnx.layers import BatchNorm, BatchRenorm, FrozenBatchNorm
from jaxbn.statistics import PopulationEstimate

__all__ = ["KINDS", "population_stats", "swap_batch_norm"]

# The kinds a BN layer can be switched to; adding one is one entry.
KINDS: dict[str, type[BatchNorm]] = {"batch_norm": BatchNorm, "frozen": FrozenBatchNorm, "renorm": BatchRenorm}
_CARRIED = ("scale", "bias", "mean", "var")


def _arguments(cls) -> tuple[str, ...]:
  """The constructor arguments of a kind (its own and BatchNorm's)."""
  names = set()
  for klass in (cls, BatchNorm):
    parameters = inspect.signature(klass.__init__).parameters.items()
    names |= {n for n, p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"}
  return tuple(sorted(names - {"rngs", "kwargs"}))


def _is_bn(node) -> bool:
  return isinstance(node, nnx.BatchNorm | BatchNorm)


def _set(model, path, value) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def swap_batch_norm(model, kind: str = "batch_norm", *, skip_frozen: bool = False, **fields):
  """Replaces, in place, every `flax.nnx.BatchNorm` and jaxbn NNX layer of `model`
  by the jaxbn layer of `kind` ("batch_norm", "frozen", "renorm") with the old
  layer's arguments, `fields` overriding them, and its parameters and statistics
  (the same Variables; statistics broadcast to one row per group for
  `batch_groups`). `skip_frozen`: leave FrozenBatchNorm layers as they are.
  Returns `model`.
  """
  cls = checks.choose("kind", kind, KINDS)
  names = _arguments(cls)
  unknown = sorted(set(fields) - set(names))
  if unknown:
    raise ValueError(
      f"{unknown[0]}: not an argument of {cls.__name__} (kind={kind!r}); its arguments: {', '.join(names)}."
    )
  found = [
    (p, m) for p, m in nnx.iter_graph(model) if _is_bn(m) and not (skip_frozen and isinstance(m, FrozenBatchNorm))
  ]
  if any(not path for path, _ in found):
    raise ValueError("model: is itself a BN layer; swap the layers of a model that contains them.")
  for path, old in found:
    own = {n: getattr(old, n) for n in names if hasattr(old, n) and n not in ("scale_init", "bias_init")}
    own["use_bias"], own["use_scale"] = old.bias is not None, old.scale is not None
    new = cls(**{**own, **fields}, rngs=nnx.Rngs(0))
    for name in _CARRIED:
      variable = getattr(old, name)
      if variable is None:
        continue
      mine = getattr(new, name)
      if jnp.shape(variable[...]) == jnp.shape(mine[...]):
        setattr(new, name, variable)  # the same Variable: its sharding and metadata come along
      else:  # one row per group from the feature-shaped statistics
        mine[...] = jnp.broadcast_to(variable[...], jnp.shape(mine[...])).astype(mine[...].dtype)
    _set(model, path, new)
  return model


def population_stats(model, batches: Iterable[Any], *, estimator: str = "paper"):
  """PreciseBN for NNX: sets, in place, the statistics of every BN layer of `model`
  (flax's or jaxbn's, FrozenBatchNorm excepted) to the population statistics of
  its inputs over `batches` (`jaxbn.statistics.PopulationEstimate`: "paper" or
  "pooled"), as fvcore's `update_bn_stats` does. The layers normalize with the
  statistics of each batch, as in training (unsynced); the rest of the model
  runs as it is set (call `model.eval()` first to switch off dropout). A layer
  with `batch_groups` is estimated at its normalization batch. A tuple batch
  is passed as positional arguments. Returns `model`.
  """
  estimate = PopulationEstimate(estimator)
  work = swap_batch_norm(nnx.clone(model), "batch_norm", skip_frozen=True, use_running_average=False, axis_name=None)

  @nnx.jit
  def batch_moments(work, batch):
    with layer_call.recording() as recorded:
      work(*batch) if isinstance(batch, tuple) else work(batch)
    paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_graph(work) if isinstance(m, BatchNorm)}
    return {paths[id(r.owner)]: r.moments for r in recorded}

  grouped = {
    "/".join(map(str, p)): m.batch_groups is not None for p, m in nnx.iter_graph(work) if isinstance(m, BatchNorm)
  }
  for batch in batches:
    for key, moments in batch_moments(work, batch).items():
      estimate.add(key, moments, grouped=grouped[key])
  if not estimate.layers():
    raise ValueError("batches: expected at least one batch, got none.")
  for path, layer in nnx.iter_graph(model):
    key = "/".join(map(str, path))
    if _is_bn(layer) and key in estimate.layers():
      for name, value in estimate.result(key).items():
        variable = getattr(layer, name)
        variable[...] = jnp.broadcast_to(jnp.asarray(value), jnp.shape(variable[...])).astype(variable[...].dtype)
  return model
