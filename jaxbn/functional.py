"""The functional core of jaxbn: Batch Normalization on exact batch statistics.

Imports jax only. Everything else in jaxbn (the Linen and NNX modules, the
helpers, the training library) calls these functions for the math; the
statistics themselves are `jaxbn.reductions`' (re-exported here).

Batch Normalization (Ioffe & Szegedy 2015, Algorithm 1), per feature, over the
m valid elements of the (possibly cross-replica) batch:

    mu   = (1/m) Σ x_i
    var  = (1/m) Σ (x_i - mu)^2
    y_i  = gamma * (x_i - mu) / sqrt(var + eps) + beta
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn.checks import (
  UnboundAxisNameError,
  check_axis_name,
  check_feature_array,
  check_hyperparameters,
  check_input,
  check_mask,
  feature_axes,
)
from jaxbn.reductions import (
  AxisName,
  Moments,
  canonical_groups,
  exact_moments,
  expand,
  group_batch,
  groups_of,
  moments,
  moments_and_shift,
  pool_stats,
  real_dot,
  real_dtype,
  reduction_axes,
  reduction_dtype,
)

__all__ = [
  "BNOptions",
  "Moments",
  "Renorm",
  "UnboundAxisNameError",
  "batch_norm",
  "combine_groups",
  "feature_axes",
  "groups_of",
  "moments",
  "normalize",
  "pool_stats",
]


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


def _vary_like(value: jax.Array, like: jax.Array) -> jax.Array:
  """Marks `value` as varying over the manual axes `like` varies over.

  Inside shard_map a replicated parameter meets per-device activations; doing
  this before the custom JVP lets JAX's own transpose of the cast sum the
  per-device parameter gradients, exactly as plain autodiff would.
  """
  varying: frozenset = getattr(jax.typeof(like).manual_axis_type, "varying", frozenset())
  missing = tuple(a for a in varying if a not in getattr(jax.typeof(value).manual_axis_type, "varying", frozenset()))
  return lax.pcast(value, missing, to="varying") if missing else value


def combine_groups(stats: dict[str, Any]) -> dict[str, jax.Array]:
  """Deprecated alias of `pool_stats(stats)` (one public name per formula); warns."""
  warnings.warn(
    "jaxbn.functional.combine_groups is deprecated: use jaxbn.pool_stats (the same law of total variance)",
    DeprecationWarning,
    stacklevel=2,
  )
  return pool_stats(stats)


# --------------------------------------------------------------------------
# Training-mode normalization, differentiated by a linear JVP rule.


def _scale_and_shift(x, mean, inv, scale, bias, faxes, out_dtype):
  """y = (x - mean) * (scale * inv) + bias, computed in the statistics dtype."""
  dtype = reduction_dtype(x.dtype)
  e = lambda v: expand(v.astype(dtype), x.ndim, faxes)
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
  stats = exact_moments(x, mask, faxes, axis_name, groups)
  inv = _batch_inv_std(stats, epsilon)
  scale, bias = _renormed(scale, bias, *_renorm_correction(stats, epsilon, renorm))
  return _scale_and_shift(x, stats.mean, inv, scale, bias, faxes, out_dtype), stats


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
  stats, shift = moments_and_shift(x, mask, faxes, axis_name, groups)
  inv = _batch_inv_std(stats, epsilon)
  r, d_renorm = _renorm_correction(stats, epsilon, renorm)
  scale_r, bias_d = _renormed(scale, bias, r, d_renorm)
  y = _scale_and_shift(x, stats.mean, inv, scale_r, bias_d, faxes, out_dtype)
  dtype = reduction_dtype(x.dtype)
  raxes = reduction_axes(x.ndim, faxes)
  e = lambda v: expand(v, x.ndim, faxes)
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
    sum_centered = jnp.sum(real_dot(valid(d), dxv), raxes) - real_dot(offset, sum_dx)
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
  stat_dtype = reduction_dtype(x.dtype)
  running_mean, running_var, scale, bias = _checked_variables(params, stats, fshape, stat_dtype)
  mask = check_mask(mask, x.shape)
  out_dtype = jnp.dtype(x.dtype if o.dtype is None else o.dtype)

  if not training:
    inv = lax.rsqrt(running_var.astype(real_dtype(stat_dtype)) + o.epsilon)
    y = _scale_and_shift(x, running_mean, inv, scale.astype(stat_dtype), bias, faxes, out_dtype)
    return y, stats

  if o.axis_name is not None:
    check_axis_name(o.axis_name)
  scale, bias = _vary_like(scale, x), _vary_like(bias, x)
  cfg = _TrainConfig(
    faxes=faxes,
    epsilon=float(o.epsilon),
    axis_name=o.axis_name,
    groups=canonical_groups(o.axis_index_groups),
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
  stat_dtype = reduction_dtype(x.dtype)
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
  xg, mask, gaxes = group_batch(
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


def _explicit_spec(x, axis):
  """PartitionSpec (axis's entry, None, ...) when x is sharded over explicit mesh axes."""
  if not jax.sharding.get_abstract_mesh().explicit_axes:
    return None
  entry = jax.typeof(x).sharding.spec[axis]
  return None if entry is None else jax.sharding.PartitionSpec(entry)
