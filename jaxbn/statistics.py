"""Helpers around running statistics: combining devices, Algorithm 2."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from jaxbn import checks, functional
from jaxbn.linen import BatchNorm

__all__ = ["population_stats", "sync_batch_stats"]


def _is_stats(node) -> bool:
  return isinstance(node, Mapping) and set(node) == {"mean", "var"}


def _map_stats(fn, tree):
  """Applies fn to every {"mean", "var"} dict of a nested dict."""
  if _is_stats(tree):
    return fn(tree)
  if isinstance(tree, Mapping):
    return {k: _map_stats(fn, v) for k, v in tree.items()}
  raise TypeError(
    f"batch_stats: expected nested dicts whose leaves are {{'mean', 'var'}} "
    f"dicts (a Linen 'batch_stats' collection or nnx.to_pure_dict of BatchStat "
    f"state), found {type(tree).__name__}."
  )


def sync_batch_stats(batch_stats, axis_name=None, *, axis_index_groups=None):
  """One set of running statistics from per-device ones.

  For each BN layer, with per-device running (mean_d, var_d):

      mean = mean over devices of mean_d
      var  = mean over devices of var_d + variance over devices of mean_d

  (the law of total variance: the device means' spread is part of the
  variance of the pooled data). Use it in per-device BN before evaluating or
  checkpointing.

  Args:
    batch_stats: nested dict of {"mean", "var"} dicts (Linen's 'batch_stats').
    axis_name: the device axis bound by pmap / shard_map / vmap; or None when
      the arrays carry the devices (or the groups of `batch_groups`) on their
      leading axis, which the result then no longer has.
    axis_index_groups: combine only within these device groups.
  """
  if axis_name is None:
    combine = functional.combine_groups
  else:
    checks.check_axis_name(axis_name)

    def combine(s):
      mean = lax.pmean(s["mean"], axis_name, axis_index_groups=axis_index_groups)
      spread = jnp.square(s["mean"] - mean)
      var = lax.pmean(s["var"] + spread, axis_name, axis_index_groups=axis_index_groups)
      return {"mean": mean, "var": var}

  return _map_stats(combine, batch_stats)


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def population_stats(
  model: nn.Module,
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  **apply_kwargs,
) -> dict:
  """Population statistics of every BN layer (paper, Algorithm 2).

  Runs the model over `batches` with each BN layer (jaxbn.BatchNorm or
  flax.linen.BatchNorm) normalizing by its batch statistics, as the training
  network does, and returns new 'batch_stats' with, per layer,

      mean = mean over batches of mu_B
      var  = mean over batches of m/(m-1) * var_B     (m: batch count)

  Each batch's statistics are its own: layers that sync over an `axis_name`
  are run unsynced here, so no transform needs to bind it.

  Args:
    model: a Linen model containing BN layers.
    variables: its variables ('params' and 'batch_stats', ...).
    batches: an iterable of model inputs; a tuple is passed as positional
      arguments, anything else as the single argument.
    **apply_kwargs: passed to `model.apply` (e.g. `train=False` to switch off
      dropout; BN layers use batch statistics regardless).

  Returns:
    The new 'batch_stats' collection (same structure as the input's).
  """

  def batch_moments(variables, batch):
    """{layer path: Moments of that layer's input} for one batch."""
    recorded: dict[tuple[str, ...], functional.Moments] = {}
    replacing: list[nn.Module] = []  # non-empty while a replacement layer runs (not intercepted)

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if replacing or context.method_name != "__call__" or not isinstance(module, (BatchNorm, nn.BatchNorm)):
        return next_fun(*args, **kwargs)
      x, mask = args[0], kwargs.get("mask")
      assert module.scope is not None  # a bound module (inside apply)
      recorded[module.scope.path] = functional.moments(x, axis=module.axis, mask=mask)
      # The layer as the training network runs it, on its own variables.
      training = module.clone(parent=None, use_running_average=False, axis_name=None)
      replacing.append(module)
      try:
        y, _ = training.apply(module.variables, x, mask=mask, mutable=["batch_stats"])
      finally:
        replacing.pop()
      return y

    args = batch if isinstance(batch, tuple) else (batch,)
    with nn.intercept_methods(intercept):
      model.apply(variables, *args, mutable=["batch_stats"], **apply_kwargs)
    return recorded

  step = jax.jit(batch_moments)
  sums, num_batches = None, 0
  for batch in batches:
    moments = step(variables, batch)
    unbiased = {path: (m.mean, m.var * m.count / jnp.maximum(m.count - 1, 1)) for path, m in moments.items()}
    sums = unbiased if sums is None else jax.tree.map(jnp.add, sums, unbiased)
    num_batches += 1
  if sums is None:
    raise ValueError("batches: expected at least one batch, got none.")

  new_stats = _map_stats(dict, variables["batch_stats"])  # a mutable copy
  for path, (mean_sum, var_sum) in sums.items():
    _set_path(new_stats, path, {"mean": mean_sum / num_batches, "var": var_sum / num_batches})
  return new_stats
