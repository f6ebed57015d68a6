"""The functional core of jaxbn: batch statistics and Batch Normalization.

Imports jax only. Everything else in jaxbn (the Linen and NNX modules, the
helpers, the training library) calls these functions for the math.

Batch Normalization (Ioffe & Szegedy 2015, Algorithm 1), per feature, over the
m valid elements of the (possibly cross-replica) batch:

    mu   = (1/m) Σ x_i
    var  = (1/m) Σ (x_i - mu)^2
    y_i  = gamma * (x_i - mu) / sqrt(var + eps) + beta

Statistics are exact for any split of the global batch over replicas: every
replica contributes its (count, mean, M2) and they are combined with Chan's
parallel formula, so unequal or empty replicas weigh exactly what they hold.
Within a replica the sums are shifted by one sample of the feature, which keeps
the single pass over x accurate when |mean| / std is large.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn.checks import (
  UnboundAxisNameError,
  axis_names,
  check_axis_name,
  check_feature_array,
  check_hyperparameters,
  check_input,
  check_mask,
  feature_axes,
)

__all__ = [
  "BNOptions",
  "Moments",
  "Renorm",
  "UnboundAxisNameError",
  "batch_norm",
  "combine_groups",
  "feature_axes",
  "moments",
  "normalize",
  "pool_stats",
]

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


class Renorm(NamedTuple):
  """Batch Renormalization's part of `BNOptions` (see `jaxbn.batch_renorm`).

  r_max, d_max: the clipping limits of r and d (may be traced).
  reference: the running statistics to correct toward; None: the `stats` given.
  stats_axis_name: pool the reference over this device axis first (per-device
    statistics under shard_map / pmap).
  """

  r_max: Any
  d_max: Any
  reference: dict[str, Any] | None = None
  stats_axis_name: AxisName | None = None


class BNOptions(NamedTuple):
  """Everything `normalize` takes besides the arrays: `batch_norm`'s keywords, and
  `renorm` (None: plain BN). The Linen and NNX modules build one from their fields."""

  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: AxisName | None = None
  axis_index_groups: Sequence[Sequence[int]] | None = None
  unbiased: bool = False
  skip_nonfinite: bool = True
  dtype: Any = None
  batch_groups: int | None = None
  batch_axis: int = 0
  renorm: Renorm | None = None

  @classmethod
  def from_keywords(cls, keywords: dict[str, Any], renorm: Renorm | None = None) -> BNOptions:
    """The options among a function's keyword arguments (`batch_norm`'s and
    `batch_renorm`'s, whose names are these fields: a test checks it)."""
    return cls(**{name: keywords[name] for name in cls._fields if name != "renorm"}, renorm=renorm)


def _is_manual(axis_name) -> bool:
  """True under shard_map and pmap (manual mesh axes); False under vmap."""
  manual = jax.sharding.get_abstract_mesh().manual_axes
  return all(name in manual for name in axis_names(axis_name))


def _vary_like(value: jax.Array, like: jax.Array) -> jax.Array:
  """Marks `value` as varying over the manual axes `like` varies over.

  Inside shard_map a replicated parameter meets per-device activations; doing
  this before the custom JVP lets JAX's own transpose of the cast sum the
  per-device parameter gradients, exactly as plain autodiff would.
  """
  varying: frozenset = getattr(jax.typeof(like).manual_axis_type, "varying", frozenset())
  missing = tuple(a for a in varying if a not in getattr(jax.typeof(value).manual_axis_type, "varying", frozenset()))
  return lax.pcast(value, missing, to="varying") if missing else value


# --------------------------------------------------------------------------
# Statistics.


def _stat_dtype(dtype) -> jnp.dtype:
  # Reduce in float32 at least; float64 and complex inputs keep their precision.
  return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype) -> jnp.dtype:
  return jnp.finfo(dtype).dtype


def _abs_sq(v: jax.Array) -> jax.Array:
  return jnp.square(v.real) + jnp.square(v.imag) if jnp.iscomplexobj(v) else v * v


def _real_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Re(conj(a) b): the real inner product that a complex variance varies by."""
  return (a.real * b.real + a.imag * b.imag) if jnp.iscomplexobj(a) else a * b


def _reduction_axes(ndim, faxes):
  return tuple(a for a in range(ndim) if a not in faxes)


def _expand(v: jax.Array, ndim: int, faxes: tuple[int, ...]) -> jax.Array:
  """Per-feature array of shape feature_shape -> broadcastable against x."""
  return jnp.expand_dims(v, _reduction_axes(ndim, faxes))


def _shifted_moments(x, mask, faxes):
  """(count, mean, M2, shift) in one pass, shifted by each feature's first sample.

  Sums of (x - shift) do not cancel catastrophically when |mean| >> std.
  For complex x, M2 is the real sum of |x - mean|^2.
  """
  raxes = _reduction_axes(x.ndim, faxes)
  dtype = _stat_dtype(x.dtype)
  real = _real_dtype(dtype)
  xs = x.astype(dtype)
  first_index = tuple(0 if a in raxes else slice(None) for a in range(x.ndim))
  first = lax.stop_gradient(_take(xs, first_index))
  if mask is None:
    count = jnp.full(first.shape, math.prod(x.shape[a] for a in raxes), real)
    d = xs - _expand(first, x.ndim, faxes)
  else:
    m = jnp.broadcast_to(mask, x.shape)
    first = jnp.where(_take(m, first_index), first, 0)
    count = jnp.sum(m, raxes, dtype=real)
    d = jnp.where(m, xs - _expand(first, x.ndim, faxes), 0)
  s1 = jnp.sum(d, raxes)
  s2 = jnp.sum(_abs_sq(d), raxes)
  safe = jnp.maximum(count, 1)
  return count, first + s1 / safe, jnp.maximum(s2 - _abs_sq(s1) / safe, 0), first


def _combine(count, mean, m2):
  """Chan et al.'s pairwise formula over the leading (replica) axis."""
  total = jnp.sum(count, 0)
  safe = jnp.maximum(total, 1)
  global_mean = jnp.sum(count * mean, 0) / safe
  global_m2 = jnp.sum(m2, 0) + jnp.sum(count * _abs_sq(mean - global_mean), 0)
  return total, global_mean, global_m2


def _gather_replicas(value, axis_name, axis_index_groups):
  """Every replica's `value` (of its group), stacked on a new leading axis.

  One collective. all_gather cannot take uneven groups, so with groups each
  replica writes its value into its own slot of a zero array and the slots
  are summed (adding zeros is exact).
  """
  if axis_index_groups is None:
    if _is_manual(axis_name):
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


def _moments(x, mask, faxes, axis_name, axis_index_groups) -> Moments:
  return _moments_and_shift(x, mask, faxes, axis_name, axis_index_groups)[0]


def _moments_and_shift(x, mask, faxes, axis_name, axis_index_groups) -> tuple[Moments, jax.Array]:
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


def _canonical_groups(axis_index_groups):
  if axis_index_groups is None:
    return None
  return tuple(tuple(int(i) for i in group) for group in axis_index_groups)


def _group_batch(x, mask, faxes, batch_groups, batch_axis, axis_name):
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


def combine_groups(stats: dict[str, Any]) -> dict[str, jax.Array]:
  """Deprecated alias of `pool_stats(stats)` (one public name per formula); warns."""
  warnings.warn(
    "jaxbn.functional.combine_groups is deprecated: use jaxbn.pool_stats (the same law of total variance)",
    DeprecationWarning,
    stacklevel=2,
  )
  return pool_stats(stats)


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
    x, mask, faxes = _group_batch(x, mask, faxes, batch_groups, batch_axis, axis_name)
  if axis_name is not None:
    check_axis_name(axis_name)
  return _moments(x, mask, faxes, axis_name, _canonical_groups(axis_index_groups))


# --------------------------------------------------------------------------
# Training-mode normalization, differentiated by a linear JVP rule.


def _normalize(x, mean, inv, scale, bias, faxes, out_dtype):
  """y = (x - mean) * (scale * inv) + bias, computed in the statistics dtype."""
  dtype = _stat_dtype(x.dtype)
  e = lambda v: _expand(v.astype(dtype), x.ndim, faxes)
  y = (x.astype(dtype) - e(mean)) * e(scale * inv) + e(bias)
  return y.astype(out_dtype)


def _batch_inv_std(stats: Moments, epsilon):
  """1/sqrt(var + eps); 0 for a feature with no valid element, whose
  normalized value is then 0 (y = bias), as for a batch of one."""
  return jnp.where(stats.count > 0, lax.rsqrt(stats.var + epsilon), 0)


def _renorm_correction(stats: Moments, epsilon, renorm):
  """Batch Renormalization's r and d (Ioffe 2017), constants of the gradient:

      r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mu_B - mu) / sigma, -d_max, d_max)

  with mu, sigma^2 + eps the running statistics. BN is r = 1, d = 0.
  """
  if renorm is None:
    return None, None
  running_mean, running_var, r_max, d_max = (lax.stop_gradient(v) for v in renorm)
  sigma = jnp.sqrt(running_var.astype(stats.var.dtype) + epsilon)
  r = jnp.clip(jnp.sqrt(stats.var + epsilon) / sigma, 1 / r_max, r_max)
  d = jnp.clip((stats.mean - running_mean.astype(stats.mean.dtype)) / sigma, -d_max, d_max)
  valid = stats.count > 0
  return lax.stop_gradient(jnp.where(valid, r, 1)), lax.stop_gradient(jnp.where(valid, d, 0))


class _TrainConfig(NamedTuple):
  """The static part of training-mode BN (hashable: the custom JVP's non-differentiable argument)."""

  faxes: tuple[int, ...]
  epsilon: float
  axis_name: Any
  groups: Any  # canonical axis_index_groups
  out_dtype: Any


def _train_primal(cfg: _TrainConfig, x, scale, bias, mask, renorm):
  faxes, epsilon, axis_name, groups, out_dtype = cfg
  stats = _moments(x, mask, faxes, axis_name, groups)
  inv = _batch_inv_std(stats, epsilon)
  scale, bias = _renormed(scale, bias, *_renorm_correction(stats, epsilon, renorm))
  return _normalize(x, stats.mean, inv, scale, bias, faxes, out_dtype), stats


def _renormed(scale, bias, r, d):
  """y = scale (r xhat + d) + bias = (scale r) xhat + (bias + scale d)."""
  return (scale, bias) if r is None else (scale * r, bias + scale * d)


_train = jax.custom_jvp(_train_primal, nondiff_argnums=(0,))


def _train_jvp(cfg, primals, tangents):
  """The tangent of training-mode BN, linear in (dx, dscale, dbias).

  With xhat = (x - mu) / sigma, a = scale / sigma and means over the m valid
  elements of the (cross-replica) batch:

      dy = a (dx - mean(dx) - xhat mean(Re(conj(xhat) dx))) + dscale xhat + dbias

  Reverse mode transposes this into the paper's closed form (§3),
  dx = a/m (m g - Σg - xhat Σ(g xhat)); both means cross replicas in one psum,
  so a synced layer costs one collective forward (the statistics) and one
  backward. Forward mode (jvp, jacfwd, linearize) uses it directly.

  xhat is written as (d - offset) / sigma with d = x - shift, the array the
  statistics pass already made: the backward's sums Σg and Σg·d then need no
  new full-size temporary, and offset = mu - shift is of the order of sigma
  (the shift is a sample of the feature), so nothing cancels.
  """
  faxes, epsilon, axis_name, groups, out_dtype = cfg
  x, scale, bias, mask, renorm = primals
  dx, dscale, dbias = tangents[:3]  # no derivative flows into the renorm statistics
  stats, shift = _moments_and_shift(x, mask, faxes, axis_name, groups)
  inv = _batch_inv_std(stats, epsilon)
  r, d_renorm = _renorm_correction(stats, epsilon, renorm)
  scale_r, bias_d = _renormed(scale, bias, r, d_renorm)
  y = _normalize(x, stats.mean, inv, scale_r, bias_d, faxes, out_dtype)
  dtype = _stat_dtype(x.dtype)
  raxes = _reduction_axes(x.ndim, faxes)
  e = lambda v: _expand(v, x.ndim, faxes)
  valid = (lambda v: v) if mask is None else (lambda v: jnp.where(mask, v, 0))
  d = x.astype(dtype) - e(shift)
  offset = stats.mean - shift
  a = scale_r.astype(dtype) * inv

  # dy = a dx + c1 d + c0, with per-feature c0, c1 linear in the tangents.
  dy: jax.Array | int = 0
  c0: jax.Array | None = None  # None: no term
  c1: jax.Array | None = None
  dmean, dvar = jnp.zeros_like(stats.mean), jnp.zeros_like(stats.var)
  if not _is_zero(dx):
    dxs = dx.astype(dtype)
    dxv = valid(dxs)
    sum_dx = jnp.sum(dxv, raxes)
    # Σ Re(conj(x - mu) dx) on this replica (each replica has its own shift).
    sum_centered = jnp.sum(_real_dot(valid(d), dxv), raxes) - _real_dot(offset, sum_dx)
    local = jnp.stack([sum_dx, sum_centered.astype(sum_dx.dtype)])
    total = local if axis_name is None else lax.psum(local, axis_name, axis_index_groups=groups)
    safe = jnp.maximum(stats.count, 1)
    dmean = jnp.where(stats.count > 0, total[0] / safe, 0)
    dproj = inv * total[1].real / safe  # mean(Re(conj(xhat) dx))
    dvar = 2 * dproj * jnp.sqrt(stats.var + epsilon)
    dy = e(a) * dxs
    c1 = -a * inv * dproj
    c0 = a * inv * dproj * offset - a * dmean
  if not _is_zero(dscale):  # y depends on scale through scale * (r xhat + d)
    ds, ds_shift = _renormed(dscale.astype(dtype), 0, r, d_renorm)
    c1 = inv * ds if c1 is None else c1 + inv * ds
    shifted = ds_shift - inv * ds * offset
    c0 = shifted if c0 is None else c0 + shifted
  if not _is_zero(dbias):
    c0 = dbias.astype(dtype) if c0 is None else c0 + dbias.astype(dtype)
  if c1 is not None:
    dy = dy + d * e(c1)
  if c0 is not None:
    dy = dy + e(c0)
  dy = jnp.broadcast_to(dy, y.shape).astype(y.dtype)
  return (y, stats), (dy, Moments(jnp.zeros_like(stats.count), dmean, dvar))


def _is_zero(tangent) -> bool:
  return type(tangent) is jax.custom_derivatives.SymbolicZero


_train.defjvp(_train_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------
# The public function.


def batch_norm(
  x,
  params: dict[str, Any] | None,
  stats: dict[str, Any],
  *,
  training: bool,
  axis: int | Sequence[int] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  axis_name: AxisName | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  mask=None,
  unbiased: bool = False,
  skip_nonfinite: bool = True,
  dtype=None,
  batch_groups: int | None = None,
  batch_axis: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Batch Normalization as a pure function: returns `(y, new_stats)`.

  Training (`training=True`), per feature over the valid elements of the
  batch (of every replica on `axis_name`):

      y = scale * (x - mu_B) / sqrt(var_B + epsilon) + bias
      new_stats["mean"] = momentum * stats["mean"] + (1 - momentum) * mu_B
      new_stats["var"]  = momentum * stats["var"]  + (1 - momentum) * v_B

  where v_B = var_B, or n/(n-1) * var_B with `unbiased=True` (n the number of
  valid elements). A feature with a single value normalizes to 0 (flax's
  behaviour, which `init` with a batch of one relies on). Derivatives come
  from a linear JVP rule: forward mode works, and reverse mode transposes it
  into the paper's closed form (§3), with one collective forward and one
  backward when synced.

  Inference (`training=False`): y = scale * (x - mean) / sqrt(var + epsilon)
  + bias with the running `stats`, which are returned unchanged.

  Args:
    x: input (float32, bfloat16, float16, float64, complex; integers are
      cast to float32). Complex input has a complex mean and the real
      variance of |x - mean|^2, as in flax.
    params: {"scale": feature_shape, "bias": feature_shape}; a missing key (or
      None for params) means scale 1 / bias 0.
    stats: {"mean": feature_shape, "var": feature_shape} running statistics.
    training: use batch statistics and update `stats` (True) or use `stats`.
    axis: feature axis or axes (as in flax.linen.BatchNorm).
    momentum: running-average decay, in [0, 1] (Flax/Keras meaning).
    epsilon: added to the variance, >= 0.
    axis_name: None for per-device statistics; a name (tuple of names) bound
      by pmap / shard_map / vmap for statistics of the cross-replica batch.
    axis_index_groups: sync only within these replica groups.
    mask: boolean (or 0/1 integer), broadcastable to x: the elements that
      count. Every element is normalized; only valid ones enter the
      statistics. A feature with no valid element outputs `bias` (its
      normalized value is 0) and keeps its running statistics.
    unbiased: update the running variance with n/(n-1) * var_B (Algorithm 2,
      PyTorch) instead of var_B.
    skip_nonfinite: keep a feature's running statistics unchanged when its
      batch statistics are not finite (NaN/inf in the batch) or it had no
      valid element, instead of writing NaN into them. The output still shows
      the non-finite values.
    dtype: output dtype; None keeps x.dtype.
    batch_groups: None, or split `batch_axis` into this many groups of
      consecutive examples and normalize each group with its own statistics
      (ghost / virtual BN). Under `jax.jit` with the batch sharded over G
      devices, `batch_groups=G` is per-device BN: each device's shard is one
      group and no collective is needed (a plain reduction over a sharded
      batch is global: XLA inserts the all-reduce). `stats` then holds one set
      of running statistics per group, shape (G, *feature_shape) (a
      feature-shaped one is broadcast), and each group updates its own, as
      each device does in pmap's per-device mode; `jaxbn.pool_stats` (or
      `sync_batch_stats`) pools them before evaluation. In inference,
      per-group `stats` are pooled the same way.
    batch_axis: the axis `batch_groups` splits (before every feature axis).

  Returns:
    `(y, new_stats)`; running statistics carry no gradient.
  """
  options = BNOptions.from_keywords(locals())
  return normalize(x, params, stats, options, training=training, mask=mask)


def normalize(
  x, params: dict[str, Any] | None, stats: dict[str, Any], options: BNOptions, *, training: bool, mask=None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The core every jaxbn function and layer calls: BN (or, with `options.renorm`, Batch
  Renormalization) of `x` with `options`; returns `(y, new_stats)`.

  `batch_norm(x, params, stats, training=t, mask=m, **keywords)` is
  `normalize(x, params, stats, BNOptions(**keywords), training=t, mask=m)`.
  """
  o = options
  x = check_input(x)
  faxes = feature_axes(x.ndim, o.axis)
  fshape = tuple(x.shape[a] for a in faxes)
  if o.batch_groups is not None:
    return _grouped_batch_norm(x, params, stats, faxes, o, training=training, mask=mask)
  check_hyperparameters(o.momentum, o.epsilon)
  stat_dtype = _stat_dtype(x.dtype)
  running_mean, running_var, scale, bias = _checked_variables(params, stats, fshape, stat_dtype)
  mask = check_mask(mask, x.shape)
  out_dtype = jnp.dtype(x.dtype if o.dtype is None else o.dtype)

  if not training:
    inv = lax.rsqrt(running_var.astype(_real_dtype(stat_dtype)) + o.epsilon)
    y = _normalize(x, running_mean, inv, scale.astype(stat_dtype), bias, faxes, out_dtype)
    return y, stats

  if o.axis_name is not None:
    check_axis_name(o.axis_name)
  scale, bias = _vary_like(scale, x), _vary_like(bias, x)
  cfg = _TrainConfig(
    faxes=faxes,
    epsilon=float(o.epsilon),
    axis_name=o.axis_name,
    groups=_canonical_groups(o.axis_index_groups),
    out_dtype=out_dtype,
  )
  renorm = None if o.renorm is None else _renorm_reference(o.renorm, x, running_mean, running_var, fshape)
  y, batch = _train(cfg, x, scale, bias, mask, renorm)
  return y, _updated_running_stats(o, running_mean, running_var, jax.tree.map(lax.stop_gradient, batch))


def _checked_variables(params, stats, fshape, stat_dtype):
  """(running mean, running var, scale, bias) of feature shape; a missing scale is 1, bias 0.
  ValueError naming the argument for a wrong key or shape."""
  if not isinstance(stats, dict) or set(stats) != {"mean", "var"}:
    raise ValueError(
      f"stats: expected a dict with keys 'mean' and 'var', got "
      f"{sorted(stats) if isinstance(stats, dict) else type(stats).__name__}."
    )
  params = {} if params is None else params
  unknown = set(params) - {"scale", "bias"}
  if unknown:
    raise ValueError(f"params: unexpected keys {sorted(unknown)}; expected 'scale' and/or 'bias'.")
  running_mean = check_feature_array(stats["mean"], 'stats["mean"]', fshape)
  running_var = check_feature_array(stats["var"], 'stats["var"]', fshape)
  param_dtype = jnp.result_type(*params.values()) if params else stat_dtype
  scale = (
    check_feature_array(params["scale"], 'params["scale"]', fshape)
    if "scale" in params
    else jnp.ones(fshape, param_dtype)
  )
  bias = (
    check_feature_array(params["bias"], 'params["bias"]', fshape)
    if "bias" in params
    else jnp.zeros(fshape, param_dtype)
  )
  return running_mean, running_var, scale, bias


def _renorm_reference(renorm: Renorm, x, running_mean, running_var, fshape):
  """Batch Renorm's (reference mean, reference var, r_max, d_max): the running statistics,
  or the given reference, pooled over `stats_axis_name` when set."""
  if jnp.iscomplexobj(x):
    raise TypeError(f"x: Batch Renormalization expects real input, got dtype {x.dtype}.")
  reference = {"mean": running_mean, "var": running_var} if renorm.reference is None else renorm.reference
  if renorm.stats_axis_name is not None:
    check_axis_name(renorm.stats_axis_name)
    reference = pool_stats(reference, renorm.stats_axis_name)
  reference = {k: jnp.broadcast_to(v, fshape) for k, v in reference.items()}
  stat_dtype = _stat_dtype(x.dtype)
  return (
    reference["mean"],
    reference["var"],
    jnp.asarray(renorm.r_max, stat_dtype),
    jnp.asarray(renorm.d_max, stat_dtype),
  )


def _updated_running_stats(o: BNOptions, running_mean, running_var, batch) -> dict[str, jax.Array]:
  """The moving average of the running statistics toward the batch's (unbiased on request;
  kept where the batch's are not finite with `skip_nonfinite`)."""
  batch_var = batch.var
  if o.unbiased:
    batch_var = batch_var * batch.count / jnp.maximum(batch.count - 1, 1)
  new_mean = o.momentum * running_mean + (1 - o.momentum) * batch.mean
  new_var = o.momentum * running_var + (1 - o.momentum) * batch_var
  if o.skip_nonfinite:
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch_var)
    new_mean = jnp.where(ok, new_mean, running_mean)
    new_var = jnp.where(ok, new_var, running_var)
  # Running statistics keep their dtype (a scan carry or checkpoint stays
  # valid), except that a real running mean of complex input becomes complex.
  mean_dtype = (
    jnp.promote_types(running_mean.dtype, batch.mean.dtype) if jnp.iscomplexobj(batch.mean) else running_mean.dtype
  )
  return {"mean": new_mean.astype(mean_dtype), "var": new_var.astype(running_var.dtype)}


def _grouped_batch_norm(x, params, stats, faxes, options: BNOptions, *, training, mask):
  """batch_norm with statistics per group of examples: the group axis becomes
  one more feature axis, and parameters and running statistics are broadcast
  over it."""
  batch_groups = options.batch_groups
  fshape = tuple(x.shape[a] for a in faxes)
  gshape = (batch_groups, *fshape)
  inner = options._replace(axis=faxes, axis_index_groups=None, batch_groups=None, batch_axis=0)
  if not isinstance(stats, dict) or set(stats) != {"mean", "var"}:
    return normalize(x, params, stats, inner, training=training, mask=mask)  # its error
  for key in ("mean", "var"):
    if jnp.shape(stats[key]) not in (fshape, gshape):
      raise ValueError(
        f'stats["{key}"]: expected shape {fshape} or, one set per group, {gshape}; got {jnp.shape(stats[key])}.'
      )
  if not training:
    pooled = pool_stats(stats) if jnp.shape(stats["mean"]) == gshape else stats
    return normalize(x, params, pooled, inner._replace(axis_name=None), training=False, mask=mask)[0], stats
  xg, mask, gaxes = _group_batch(
    x, None if mask is None else check_mask(mask, x.shape), faxes, batch_groups, options.batch_axis, options.axis_name
  )
  # Under explicit sharding, per-group values follow the batch's sharding.
  group_spec = _explicit_spec(xg, gaxes[0])

  def widen(v):
    v = jnp.broadcast_to(jnp.asarray(v), gshape)
    return v if group_spec is None else jax.sharding.reshard(v, group_spec)

  params = None if params is None else {k: widen(v) if jnp.shape(v) == fshape else v for k, v in params.items()}
  rows = {k: widen(v) for k, v in stats.items()}
  if options.renorm is not None:
    # Batch Renorm corrects every group toward the pooled running statistics,
    # the estimate of the population's (each group's own row is a part of it).
    reference = {k: widen(v) for k, v in pool_stats(rows).items()}
    inner = inner._replace(renorm=options.renorm._replace(reference=reference))
  y, new_stats = normalize(xg, params, rows, inner._replace(axis=gaxes, axis_name=None), training=True, mask=mask)
  return y.reshape(x.shape), new_stats


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
  return {"mean": mean, "var": average(var + _abs_sq(stats["mean"] - mean).astype(var.dtype))}


def _explicit_spec(x, axis):
  """PartitionSpec (axis's entry, None, ...) when x is sharded over explicit mesh axes."""
  if not jax.sharding.get_abstract_mesh().explicit_axes:
    return None
  entry = jax.typeof(x).sharding.spec[axis]
  return None if entry is None else jax.sharding.PartitionSpec(entry)


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
