"""Exact batch statistics: per-feature moments of a batch, across replicas and
groups of examples, and the pooling of several sets of statistics.

Imports jax only; `jaxbn.functional` builds Batch Normalization on these.

Statistics are exact for any split of the global batch over replicas: every
replica contributes its (count, mean, M2) and they are combined with Chan's
parallel formula, so unequal or empty replicas weigh exactly what they hold.
Within a replica the sums are shifted by one sample of the feature, which keeps
the single pass over x accurate when |mean| / std is large.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn.checks import axis_names, check_axis_name, check_input, check_mask, feature_axes

__all__ = ["AxisName", "Moments", "groups_of", "moments", "pool_stats"]

AxisName = Hashable | tuple[Hashable, ...]


class Moments(NamedTuple):
  """Exact per-feature statistics of a (possibly cross-replica) batch.

  count: number of valid elements per feature (float).
  mean:  mean of the valid elements.
  var:   biased variance (divided by count) of the valid elements.
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count: the public name
  mean: jax.Array
  var: jax.Array


def is_manual(axis_name) -> bool:
  """True under shard_map and pmap (manual mesh axes); False under vmap."""
  manual = jax.sharding.get_abstract_mesh().manual_axes
  return all(name in manual for name in axis_names(axis_name))


def reduction_dtype(dtype) -> jnp.dtype:
  # Reduce in float32 at least; float64 and complex inputs keep their precision.
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  return jnp.finfo(dtype).dtype


def abs_sq(v: jax.Array) -> jax.Array:
  return jnp.square(v.real) + jnp.square(v.imag) if jnp.iscomplexobj(v) else v * v


def real_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Re(conj(a) b): the real inner product that a complex variance varies by."""
  return (a.real * b.real + a.imag * b.imag) if jnp.iscomplexobj(a) else a * b


def reduction_axes(ndim, faxes):
  return tuple(a for a in range(ndim) if a not in faxes)


def expand(v: jax.Array, ndim: int, faxes: tuple[int, ...]) -> jax.Array:
  """Per-feature array of shape feature_shape -> broadcastable against x."""
  return jnp.expand_dims(v, reduction_axes(ndim, faxes))


def _shifted_moments(x, mask, faxes):
  """(count, mean, M2, shift) in one pass, shifted by each feature's first sample.

  Sums of (x - shift) do not cancel catastrophically when |mean| >> std.
  For complex x, M2 is the real sum of |x - mean|^2.
  """
  raxes = reduction_axes(x.ndim, faxes)
  dtype = reduction_dtype(x.dtype)
  real = real_dtype(dtype)
  xs = x.astype(dtype)
  first_index = tuple(0 if a in raxes else slice(None) for a in range(x.ndim))
  first = lax.stop_gradient(_take(xs, first_index))
  if mask is None:
    count = jnp.full(first.shape, math.prod(x.shape[a] for a in raxes), real)
    d = xs - expand(first, x.ndim, faxes)
  else:
    m = jnp.broadcast_to(mask, x.shape)
    first = jnp.where(_take(m, first_index), first, 0)
    count = jnp.sum(m, raxes, dtype=real)
    d = jnp.where(m, xs - expand(first, x.ndim, faxes), 0)
  s1 = jnp.sum(d, raxes)
  s2 = jnp.sum(abs_sq(d), raxes)
  safe = jnp.maximum(count, 1)
  return count, first + s1 / safe, jnp.maximum(s2 - abs_sq(s1) / safe, 0), first


def _combine(count, mean, m2):
  """Chan et al.'s pairwise formula over the leading (replica) axis."""
  total = jnp.sum(count, 0)
  safe = jnp.maximum(total, 1)
  global_mean = jnp.sum(count * mean, 0) / safe
  global_m2 = jnp.sum(m2, 0) + jnp.sum(count * abs_sq(mean - global_mean), 0)
  return total, global_mean, global_m2


def _gather_replicas(value, axis_name, axis_index_groups):
  """Every replica's `value` (of its group), stacked on a new leading axis.

  One collective. all_gather cannot take uneven groups, so with groups each
  replica writes its value into its own slot of a zero array and the slots
  are summed (adding zeros is exact).
  """
  if axis_index_groups is None:
    if is_manual(axis_name):
      return lax.all_gather(value, axis_name, to="invarying")
    # vmap's all_gather takes one name at a time; under vmap it moves no data.
    for name in reversed(axis_names(axis_name)):
      value = lax.all_gather(value, name, to="varying")
    return value.reshape((-1, *value.shape[len(axis_names(axis_name)) :]))
  slot = [0] * sum(len(g) for g in axis_index_groups)
  for group in axis_index_groups:
    for position, replica in enumerate(group):
      slot[replica] = position
  size = max(len(g) for g in axis_index_groups)
  own = jnp.asarray(slot)[lax.axis_index(axis_name)]
  onehot = (jnp.arange(size) == own).astype(value.dtype)
  slots = onehot.reshape((size,) + (1,) * value.ndim) * value
  return lax.psum(slots, axis_name, axis_index_groups=axis_index_groups)


def exact_moments(x, mask, faxes, axis_name, axis_index_groups) -> Moments:
  """`moments` on checked arguments (feature axes resolved, groups canonical)."""
  return moments_and_shift(x, mask, faxes, axis_name, axis_index_groups)[0]


def moments_and_shift(x, mask, faxes, axis_name, axis_index_groups) -> tuple[Moments, jax.Array]:
  """The batch's Moments and this replica's shift (see _shifted_moments)."""
  count, mean, m2, shift = _shifted_moments(x, mask, faxes)
  if axis_name is not None:
    # Every replica's (count, mean, M2), combined exactly. Empty slots of a
    # smaller group have count 0 and weigh nothing.
    gathered = _gather_replicas(
      jnp.stack([count.astype(mean.dtype), mean, m2.astype(mean.dtype)]), axis_name, axis_index_groups
    )
    count, mean, m2 = _combine(gathered[:, 0].real, gathered[:, 1], gathered[:, 2].real)
  var = m2 / jnp.maximum(count, 1)
  mean = jnp.where(count > 0, mean, 0)
  return Moments(count, mean, var), shift


def canonical_groups(axis_index_groups):
  """`axis_index_groups` as a hashable tuple of tuples (None stays None)."""
  if axis_index_groups is None:
    return None
  return tuple(tuple(int(i) for i in group) for group in axis_index_groups)


def group_batch(x, mask, faxes, batch_groups, batch_axis, axis_name):
  """Splits the batch axis into (batch_groups, examples per group).

  Returns x and mask reshaped, and the feature axes with the new group axis
  among them, so that the statistics of each group are per-"feature" ones.
  Under jit with the batch sharded over a mesh axis of batch_groups devices,
  each group is one device's shard and its statistics need no collective.
  """
  if isinstance(batch_groups, bool) or not isinstance(batch_groups, numbers.Integral) or batch_groups < 1:
    raise ValueError(f"batch_groups: expected a positive integer or None, got {batch_groups!r}.")
  if axis_name is not None:
    raise ValueError(
      "batch_groups: statistics per group of examples cannot be combined with axis_name "
      f"(got axis_name={axis_name!r}); use one or the other."
    )
  if not isinstance(batch_axis, numbers.Integral) or not -x.ndim <= batch_axis < x.ndim:
    raise ValueError(f"batch_axis: expected an axis of the rank-{x.ndim} input, got {batch_axis!r}.")
  b = int(batch_axis) % x.ndim
  if b in faxes or any(f < b for f in faxes):
    raise ValueError(f"batch_axis: expected an axis before every feature axis {faxes}, got {batch_axis}.")
  n = x.shape[b]
  if n % batch_groups:
    raise ValueError(
      f"batch_groups: the batch axis {b} has {n} examples, which do not split into {batch_groups} equal groups."
    )
  shape = (*x.shape[:b], batch_groups, n // batch_groups, *x.shape[b + 1 :])
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape).reshape(shape)
  return x.reshape(shape), mask, (b, *tuple(f + 1 for f in faxes))


def groups_of(stats: dict[str, Any], feature_shape) -> int:
  """The number of groups that per-group running statistics hold (their leading axis)."""
  shape = jnp.shape(stats["mean"])
  if len(shape) != len(feature_shape) + 1 or tuple(shape[1:]) != tuple(feature_shape):
    raise ValueError(
      f'stats["mean"]: expected one row per group, shape (groups, *{tuple(feature_shape)}), got {shape}.'
    )
  return shape[0]


def moments(
  x,
  axis: int | Sequence[int] = -1,
  axis_name: AxisName | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  mask=None,
  *,
  batch_groups: int | None = None,
  batch_axis: int = 0,
) -> Moments:
  """Exact per-feature count, mean and biased variance of a batch.

  Args:
    x: numeric array (integers are cast to float32).
    axis: feature axis or axes; every other axis is reduced.
    axis_name: None for this device's batch, or a name (tuple of names) bound
      by pmap / shard_map / vmap for the whole cross-replica batch.
    axis_index_groups: reduce only within these replica groups.
    mask: boolean (or 0/1 integer) array broadcastable to x; False elements
      are not counted.
    batch_groups: statistics per group of consecutive examples along
      `batch_axis` (see `batch_norm`); the results then have a leading group axis.
    batch_axis: the axis that `batch_groups` splits.

  Returns:
    `Moments(count, mean, var)`, each of the feature shape, in float32
    (float64 for float64 input; a complex mean and the real variance of
    |x - mean|^2 for complex input). An empty batch gives count 0, mean 0, var 0.
  """
  x = check_input(x)
  faxes = feature_axes(x.ndim, axis)
  mask = check_mask(mask, x.shape)
  if batch_groups is not None:
    x, mask, faxes = group_batch(x, mask, faxes, batch_groups, batch_axis, axis_name)
  if axis_name is not None:
    check_axis_name(axis_name)
  return exact_moments(x, mask, faxes, axis_name, canonical_groups(axis_index_groups))


def pool_stats(stats: dict[str, Any], axis_name: AxisName | None = None, *, axis_index_groups=None) -> dict[str, Any]:
  """One set of running statistics from several (groups, devices), equally weighted:

      mean = mean_k mean_k
      var  = mean_k var_k + mean_k |mean_k - mean|^2

  (the law of total variance: the spread of the means is part of the variance
  of the pooled data). The sets lie on the leading axis (`axis_name=None`) or
  on the devices of a bound axis (`axis_name`, within `axis_index_groups`).
  """
  if axis_name is None:
    average = lambda v: jnp.mean(v, 0)
  else:
    average = lambda v: lax.pmean(v, axis_name, axis_index_groups=axis_index_groups)
  mean = average(stats["mean"])
  var = jnp.asarray(stats["var"])  # a JAX dtype (NumPy float64 becomes float32 without x64)
  return {"mean": mean, "var": average(var + abs_sq(stats["mean"] - mean).astype(var.dtype))}


def _take(x, index):
  """x[index] for a tuple of ints and full slices, also where an indexed axis
  is sharded over explicit mesh axes (JAX cannot slice one sample out of a
  sharded axis there): then in auto mode, where XLA fetches that sample."""
  if jax.sharding.get_abstract_mesh().explicit_axes:
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    if any(spec[a] is not None for a, i in enumerate(index) if not isinstance(i, slice)):
      out = jax.sharding.PartitionSpec(*(spec[a] for a, i in enumerate(index) if isinstance(i, slice)))
      return jax.sharding.auto_axes(lambda v: v[index], out_sharding=out)(x)
  return x[index]
