"""`jaxbn.nnx.BatchNorm`: a drop-in replacement for `flax.nnx.BatchNorm`.

Same constructor (every argument of flax 0.12.8's), attributes (`scale`,
`bias` params; `mean`, `var` batch stats), call signature, `nnx.view`
support and dtypes as flax's module; the math is `jaxbn.batch_norm`.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxbn import checks, layer_call

__all__ = ["BatchNorm", "BatchRenorm", "FrozenBatchNorm"]

# flax's defaults, made once (the constructor's signature is flax's).
_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchNorm(nnx.Module):
  """Batch Normalization (Ioffe & Szegedy 2015) with exact synced statistics.

  y = scale * (x - mean) / sqrt(var + epsilon) + bias per feature: batch
  statistics in training (`use_running_average=False`, which also updates
  `self.mean` / `self.var` by `momentum`), the stored ones otherwise. With
  `axis_name`, statistics are those of the whole cross-replica batch. See
  `jaxbn.batch_norm` for the full semantics.

  Arguments: every argument of `flax.nnx.BatchNorm`, with flax's meaning
  (`promote_dtype` promotes `(x, mean, var, scale, bias)`; `scale_metadata`
  and `bias_metadata` go to the `nnx.Param`s), plus
    force_float32_reductions: as in `flax.linen.BatchNorm`: False stores the
      running statistics in `param_dtype`.
    unbiased, skip_nonfinite: see `jaxbn.batch_norm`.
    batch_groups: statistics per group of consecutive examples; G groups
      under `nnx.jit` with the batch sharded over G devices is per-device BN
      without a collective. `mean`/`var` then hold one row per group, and a
      call uses as many groups as rows it sees (inside `nnx.shard_map` with
      the BatchStats sharded over the devices: this device's).
  `use_fast_variance` is accepted for compatibility; jaxbn always uses its
  stable single pass.
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: tp.Any = None,
    param_dtype: tp.Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: tp.Any = _ZEROS,
    scale_init: tp.Any = _ONES,
    axis_name: tp.Any = None,
    axis_index_groups: tp.Any = None,
    use_fast_variance: bool = True,
    promote_dtype: tp.Callable[..., tp.Any] = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    force_float32_reductions: bool = True,
    unbiased: bool = False,
    skip_nonfinite: bool = True,
    batch_groups: int | None = None,
  ):
    feature_shape = (num_features,)
    stats_dtype = jnp.float32 if force_float32_reductions else param_dtype
    stats_shape = feature_shape if batch_groups is None else (batch_groups, num_features)
    self.mean = nnx.BatchStat(jnp.zeros(stats_shape, stats_dtype))
    self.var = nnx.BatchStat(jnp.ones(stats_shape, stats_dtype))
    # One key per created parameter, in flax's order, so that the layers
    # after this one initialize exactly as they would after flax's.
    self.scale = (
      nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
      if use_scale
      else nnx.data(None)
    )
    self.bias = (
      nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)
    )
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions
    self.unbiased = unbiased
    self.skip_nonfinite = skip_nonfinite
    self.batch_groups = batch_groups

  call_kind = layer_call.plain_kind  # what this class adds to BN's call (jaxbn.layer_call)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes `x`; `use_running_average` overrides the attribute."""
    return self._call(x, use_running_average, mask)

  def _call(self, x, use_running_average, mask, r_max=None, d_max=None):
    kind = self.call_kind(r_max, d_max)
    use_running_average = kind.frozen or (
      self.use_running_average if use_running_average is None else use_running_average
    )
    if use_running_average is None:
      raise ValueError(
        "use_running_average: not given to BatchNorm's constructor nor its call; "
        "pass True (inference) or False (training) to either, or use "
        "nnx.view(model, use_running_average=...)."
      )
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, mean, var, scale, bias = self.promote_dtype((x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    x = checks.check_input(x)
    params = {name: value for name, value in (("scale", scale), ("bias", bias)) if value is not None}
    # flax.nnx's output dtype: the (promoted) input and parameters, or `dtype`.
    out_dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=self.dtype)
    # Training updates the stored statistics; inference reads them promoted.
    stats = {"mean": self.mean[...], "var": self.var[...]} if not use_running_average else {"mean": mean, "var": var}
    y, new_stats = layer_call.normalize_layer(
      self,
      kind,
      x,
      params,
      stats,
      feature_axes=checks.feature_axes(x.ndim, self.axis),
      out_dtype=out_dtype,
      training=not use_running_average,
      mask=mask,
    )
    if not use_running_average:
      self.mean[...] = new_stats["mean"]
      self.var[...] = new_stats["var"]
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view`` (and ``Module.eval()`` / ``.train()``).

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
  """Batch Renormalization (Ioffe 2017): `jaxbn.batch_renorm` as an NNX module.

  Arguments, attributes and state as `BatchNorm` (checkpoints interchange),
  plus `r_max`, `d_max`, the clipping limits of r and d; a call may override
  them (`layer(x, r_max=..., d_max=...)`, e.g. from `jaxbn.renorm_schedule`),
  and `stats_axis_name` (see `jaxbn.batch_renorm`).
  """

  def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, stats_axis_name=None, **kwargs):
    super().__init__(num_features, **kwargs)
    self.r_max, self.d_max, self.stats_axis_name = r_max, d_max, stats_axis_name

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None, r_max=None, d_max=None):
    """Normalizes `x`; `r_max`/`d_max` override the attributes for this call."""
    return self._call(x, use_running_average, mask, r_max, d_max)

  call_kind = layer_call.renorm_kind


class FrozenBatchNorm(BatchNorm):
  """BN that always normalizes with its stored statistics and never updates them:
  `jaxbn.FrozenBatchNorm` as an NNX module.

  Arguments and state as `BatchNorm` (a BN checkpoint loads into it and back),
  plus `train_affine` (False: `scale` and `bias` get no gradient; keep them out
  of weight decay too, e.g. with an `nnx.Optimizer` whose `wrt` filter leaves
  them out). A fresh layer is the identity (var starts at 1 - epsilon).
  """

  def __init__(self, num_features: int, *, train_affine: bool = False, **kwargs):
    super().__init__(num_features, **kwargs)
    self.var[...] = jnp.full_like(self.var[...], 1 - self.epsilon)
    self.train_affine = train_affine

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes `x` with the stored statistics (`use_running_average`, `mask` have no effect)."""
    return self._call(x, use_running_average, mask)

  call_kind = layer_call.frozen_kind
