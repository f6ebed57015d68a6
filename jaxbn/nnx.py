"""`jaxbn.nnx.BatchNorm`: a drop-in replacement for `flax.nnx.BatchNorm`.

Same constructor, attributes (`scale`, `bias` params; `mean`, `var` batch
stats), call signature and dtypes as flax's module; the math is
`jaxbn.batch_norm`.
"""

from __future__ import annotations

import typing as tp

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxbn import functional

__all__ = ["BatchNorm"]


class BatchNorm(nnx.Module):
  """Batch Normalization (Ioffe & Szegedy 2015) with exact synced statistics.

  y = scale * (x - mean) / sqrt(var + epsilon) + bias per feature: batch
  statistics in training (`use_running_average=False`, which also updates
  `self.mean` / `self.var` by `momentum`), the stored ones otherwise. With
  `axis_name`, statistics are those of the whole cross-replica batch. See
  `jaxbn.batch_norm` for the full semantics.

  Arguments: as `flax.nnx.BatchNorm`, plus `unbiased` and `skip_nonfinite`
  (see `jaxbn.batch_norm`). `use_fast_variance` is accepted for
  compatibility; jaxbn always uses its stable single pass.
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
      bias_init: tp.Any = initializers.zeros_init(),
      scale_init: tp.Any = initializers.ones_init(),
      axis_name: tp.Any = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      unbiased: bool = False,
      skip_nonfinite: bool = True,
      rngs: nnx.Rngs,
  ):
    feature_shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.scale = (nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype))
                  if use_scale else nnx.data(None))
    self.bias = (nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype))
                 if use_bias else nnx.data(None))
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
    self.unbiased = unbiased
    self.skip_nonfinite = skip_nonfinite

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes `x`; `use_running_average` overrides the attribute."""
    use_running_average = (self.use_running_average if use_running_average is None
                           else use_running_average)
    if use_running_average is None:
      raise ValueError(
          "use_running_average: not given to BatchNorm's constructor nor its call; "
          "pass True (inference) or False (training) to either.")
    x = functional._check_input(x)
    params = {}
    if self.scale is not None:
      params["scale"] = self.scale[...]
    if self.bias is not None:
      params["bias"] = self.bias[...]
    # flax.nnx promotes the input with the statistics and parameters.
    out_dtype = dtypes.canonicalize_dtype(
        x, self.mean[...], self.var[...], *params.values(), dtype=self.dtype)
    y, new_stats = functional.batch_norm(
        x, params, {"mean": self.mean[...], "var": self.var[...]},
        training=not use_running_average,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        mask=mask,
        unbiased=self.unbiased,
        skip_nonfinite=self.skip_nonfinite,
        dtype=out_dtype,
    )
    if not use_running_average:
      self.mean[...] = new_stats["mean"]
      self.var[...] = new_stats["var"]
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view` (and `Module.eval()` / `.train()`)."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
