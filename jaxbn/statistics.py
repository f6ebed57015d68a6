"""Helpers around running statistics: combining devices, and population
statistics (PreciseBN) with the paper's or the pooled estimator."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from jaxbn import checks, functional, layer_call
from jaxbn.swap import swap_batch_norm

__all__ = ["ESTIMATORS", "PopulationEstimate", "accumulate_batch_stats", "population_stats", "sync_batch_stats"]

ESTIMATORS = ("paper", "pooled")


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

  (the law of total variance, `jaxbn.functional.pool_stats`: the device means'
  spread is part of the variance of the pooled data). Use it in per-device BN
  before evaluating or checkpointing.

  Args:
    batch_stats: nested dict of {"mean", "var"} dicts (Linen's 'batch_stats').
    axis_name: the device axis bound by pmap / shard_map / vmap; or None when
      the arrays carry the devices (or the groups of `batch_groups`) on their
      leading axis, which the result then no longer has.
    axis_index_groups: combine only within these device groups.
  """
  if axis_name is not None:
    checks.check_axis_name(axis_name)
  return _map_stats(lambda s: functional.pool_stats(s, axis_name, axis_index_groups=axis_index_groups), batch_stats)


def accumulate_batch_stats(running, micro_batch_stats, momentum: float):
  """The running statistics after one optimizer step over K micro-batches.

  Gradient accumulation normalizes each micro-batch by its own statistics; the
  running statistics are then updated once per step, from the moments of the
  whole step's batch, pooled exactly from the K micro-batches' (equal sizes):

      mean_B = mean_k mean_k,   var_B = mean_k var_k + mean_k |mean_k - mean_B|^2
      mean := momentum * mean + (1 - momentum) * mean_B   (and var likewise)

  so the momentum keeps its time scale in optimizer steps (K updates per step
  would shorten it K-fold and weigh the last micro-batch most).

  Args:
    running: the running statistics before the step (Linen's 'batch_stats', or
      `nnx.to_pure_dict` of the BatchStat state).
    micro_batch_stats: the same tree with a leading axis of K: each micro-batch's
      mean and biased variance, as a training pass with momentum 0 leaves them
      (`with jaxbn.swap_batch_norm(momentum=0.0): model.apply(...)`, or
      `jaxbn.nnx.swap_batch_norm(model, momentum=0.0)`; layers with
      `unbiased=False`, the default). Rows of `batch_groups` stay rows.
    momentum: the layers' momentum (flax's convention: the weight of the old value).
  """
  checks.check_hyperparameters(momentum, 0.0)
  batch = sync_batch_stats(micro_batch_stats)
  return jax.tree.map(lambda old, new: momentum * old + (1 - momentum) * new.astype(old.dtype), running, batch)


class PopulationEstimate:
  """Population statistics of BN layers from the Moments of their inputs, batch by batch.

  "paper" (Algorithm 2 of Ioffe & Szegedy): over the batches B of m elements,

      mean = mean_B mu_B,   var = mean_B m/(m-1) var_B

  "pooled" (fvcore's PreciseBN since 2021): the mean and the biased variance of
  every element of every batch pooled, each batch weighing its element count
  (so a smaller or masked batch weighs less; for a convolution m = N*H*W):

      mean = sum_B m_B mu_B / M,   var = sum_B m_B (var_B + (mu_B - mean)^2) / M

  Moments with a leading group axis (a layer with `batch_groups`) count each
  group as a batch: the statistics of the normalization batch the layer
  trains with. A batch (group) with no valid element counts for nothing.
  Accumulates in float64 on the host (Chan's pairwise update for "pooled").
  """

  def __init__(self, estimator: str = "paper"):
    if estimator not in ESTIMATORS:
      raise ValueError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {estimator!r}.")
    self.estimator = estimator
    self._sums: dict[Any, list] = {}

  def add(self, key, moments: functional.Moments, grouped: bool = False) -> None:
    """One batch's Moments of layer `key` (with a leading group axis if `grouped`)."""
    count, mean, var = (np.asarray(v, np.float64) for v in moments)
    if not grouped:
      count, mean, var = count[None], mean[None], var[None]
    for n, mu, v in zip(count, mean, var, strict=True):
      self._add(key, n, mu, v)

  def _add(self, key, n, mu, v):
    valid = n > 0
    if key not in self._sums:
      self._sums[key] = [np.zeros_like(mu), np.zeros_like(mu), np.zeros_like(mu)]
    a, b, c = self._sums[key]
    if self.estimator == "paper":  # batches counted, sum of means, sum of unbiased variances
      self._sums[key] = [a + valid, b + np.where(valid, mu, 0), c + np.where(valid, v * n / np.maximum(n - 1, 1), 0)]
      return
    total = a + n  # elements, mean, M2 of everything so far (Chan et al.)
    safe = np.maximum(total, 1)
    delta = mu - b
    self._sums[key] = [total, b + delta * n / safe, c + v * n + np.abs(delta) ** 2 * a * n / safe]

  def layers(self):
    """The keys of the layers seen so far."""
    return self._sums.keys()

  def result(self, key) -> dict[str, np.ndarray]:
    a, b, c = self._sums[key]
    if self.estimator == "paper":
      safe = np.maximum(a, 1)
      return {"mean": b / safe, "var": c / safe}
    return {"mean": b, "var": c / np.maximum(a, 1)}


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def population_stats(
  model: nn.Module,
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  estimator: str = "paper",
  **apply_kwargs,
) -> dict:
  """Population statistics of every BN layer of a Linen model (PreciseBN).

  Runs the model over `batches` with each BN layer (`jaxbn.BatchNorm`,
  `jaxbn.BatchRenorm` or `flax.linen.BatchNorm`) run as `jaxbn.BatchNorm`
  normalizing by its batch statistics (`jaxbn.swap_batch_norm`), as the
  training network does, and returns new 'batch_stats'
  whose every layer holds the population statistics of its inputs
  (`PopulationEstimate`: `estimator="paper"`, the paper's Algorithm 2, or
  "pooled", fvcore's). A layer with `batch_groups` is estimated at its
  normalization batch (each group of a batch counts as one batch), and keeps
  its one-row-per-group shape (every row the same). `FrozenBatchNorm` layers
  keep their statistics. Each batch's statistics are its own: layers that sync
  over an `axis_name` are run unsynced here, so no transform needs to bind it.

  Args:
    model: a Linen model containing BN layers.
    variables: its variables ('params' and 'batch_stats', ...).
    batches: an iterable of model inputs; a tuple is passed as positional
      arguments, anything else as the single argument.
    estimator: "paper" or "pooled".
    **apply_kwargs: passed to `model.apply` (e.g. `train=False` to switch off
      dropout; BN layers use batch statistics regardless).

  Returns:
    The new 'batch_stats' collection (same structure and shapes as the input's).
  """
  estimate = PopulationEstimate(estimator)
  grouped: dict[tuple[str, ...], bool] = {}  # filled while tracing: static per layer

  def batch_moments(variables, batch):
    """{layer path: Moments of that layer's input} for one batch."""
    args = batch if isinstance(batch, tuple) else (batch,)
    # every BN layer but the frozen ones as the training network runs it, unsynced, its input recorded
    swapped = swap_batch_norm("batch_norm", skip_frozen=True, use_running_average=False, axis_name=None)
    with swapped, layer_call.recording() as recorded:
      model.apply(variables, *args, mutable=["batch_stats"], **apply_kwargs)
    for r in recorded:
      grouped[r.owner.scope.path] = r.grouped
    return {r.owner.scope.path: r.moments for r in recorded}

  step = jax.jit(batch_moments)
  for batch in batches:
    for path, moments in step(variables, batch).items():
      estimate.add(path, moments, grouped=grouped[path])
  if not estimate.layers():
    raise ValueError("batches: expected at least one batch, got none.")

  new_stats = _map_stats(dict, variables["batch_stats"])  # a mutable copy
  for path in estimate.layers():
    old = _get_path(variables["batch_stats"], path)
    _set_path(new_stats, path, _shaped(estimate.result(path), old))
  return new_stats


def _get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _shaped(stats: dict, like: Mapping) -> dict:
  """Population statistics in the layer's own shapes and dtypes (one row per group where it has rows)."""
  return {k: np.broadcast_to(v, np.shape(like[k])).astype(np.asarray(like[k]).dtype) for k, v in stats.items()}
