"""`jaxbn.BatchNorm`: a drop-in replacement for `flax.linen.BatchNorm`.

Same fields, defaults, call signature, variable names, shapes and dtypes as
flax's module; the math is `jaxbn.batch_norm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes, initializers

from jaxbn import checks, functional, layer_call

Array = jax.Array


class BatchNorm(nn.Module):
  """Batch Normalization (Ioffe & Szegedy 2015) with exact synced statistics.

  y = scale * (x - mean) / sqrt(var + epsilon) + bias, per feature, with the
  batch's statistics in training (`use_running_average=False`) and the running
  ones in `batch_stats` otherwise. Training updates

      mean <- momentum * mean + (1 - momentum) * batch_mean

  (and likewise `var`), except during `init`. With `axis_name`, statistics
  are those of the whole cross-replica batch (exact for unequal or masked
  replicas). See `jaxbn.batch_norm` for the full semantics.

  Attributes: as `flax.linen.BatchNorm`, plus
    unbiased: update the running variance with n/(n-1) * batch variance.
    skip_nonfinite: keep the running statistics of a feature whose batch
      statistics are not finite.
    batch_groups: statistics per group of consecutive examples (ghost BN);
      under `jax.jit` with the batch sharded over G devices, G groups is
      per-device BN without a collective. The running statistics then hold
      one set per group, shape (G, features); a call uses as many groups as
      the rows it sees (under `shard_map` with the statistics sharded over
      the devices: this device's groups). See `jaxbn.batch_norm`.
  `use_fast_variance` is accepted so that configurations written for flax
  load unchanged; jaxbn always uses its stable single pass. With
  `force_float32_reductions=False` the running statistics are stored in
  `param_dtype`, as flax stores them (jaxbn still reduces in float32).
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased: bool = False
  skip_nonfinite: bool = True
  batch_groups: int | None = None

  call_kind = nn.nowrap(layer_call.plain_kind)  # what this class adds to BN's call (jaxbn.layer_call)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: Array | None = None):
    """Normalizes `x`; see the class docstring.

    Args:
      x: the input.
      use_running_average: overrides the field of the same name.
      mask: boolean, broadcastable to x: the elements that enter the statistics.
    """
    return run_on_variables_of(self, self, x, use_running_average, mask=mask)


class BatchRenorm(BatchNorm):
  """Batch Renormalization (Ioffe 2017): `jaxbn.batch_renorm` as a Linen module.

  Fields, variables and call as `BatchNorm` (checkpoints interchange), plus
    r_max, d_max: the clipping limits of r and d; a call may override them
      (`layer(x, r_max=..., d_max=...)`, e.g. from `jaxbn.renorm_schedule`).
    stats_axis_name: per-device statistics under shard_map/pmap: the device
      axis to pool the running statistics over for r and d (see
      `jaxbn.batch_renorm`).
  """

  r_max: float = 3.0
  d_max: float = 5.0
  stats_axis_name: Any = None

  call_kind = nn.nowrap(layer_call.renorm_kind)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: Array | None = None, r_max=None, d_max=None):
    """Normalizes `x`; `r_max`/`d_max` override the fields for this call."""
    return run_on_variables_of(self, self, x, use_running_average, mask=mask, r_max=r_max, d_max=d_max)


class FrozenBatchNorm(BatchNorm):
  """BN that always normalizes with its stored statistics and never updates them.

      y = scale * (x - mean) / sqrt(var + epsilon) + bias

  in training and inference alike (detectron2's FrozenBatchNorm2d; the
  final-epochs remedy of Wu & Johnson 2021). Variables are BatchNorm's (names,
  shapes, dtypes), so a BN checkpoint loads into it and back; a fresh layer is
  the identity (var starts at 1 - epsilon). `use_running_average` is accepted
  and has no effect.

  Attributes: as `BatchNorm`, plus
    train_affine: False (default): `scale` and `bias` get no gradient. Their
      gradient is zero, but an optimizer's weight decay would still shrink
      them: leave them out of it (e.g. `optax.add_decayed_weights(wd,
      mask=...)` or `optax.multi_transform` with `optax.set_to_zero()` for
      their paths).
  """

  train_affine: bool = False

  call_kind = nn.nowrap(layer_call.frozen_kind)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: Array | None = None):
    """Normalizes `x` with the stored statistics (`mask` is accepted and unused)."""
    return run_on_variables_of(self, self, x, use_running_average, mask=mask)


def run_on_variables_of(
  holder: nn.Module, layer: BatchNorm, x, use_running_average, *, mask=None, r_max=None, d_max=None
):
  """The call of every jaxbn Linen layer: `layer`'s kind and fields, on `holder`'s
  variables (`holder` is `layer`, or under `jaxbn.swap_batch_norm` the flax or
  jaxbn module being called)."""
  kind = layer.call_kind(r_max, d_max)
  use_running_average = kind.frozen or nn.merge_param(
    "use_running_average", layer.use_running_average, use_running_average
  )
  x = checks.check_input(x)
  faxes = functional.feature_axes(x.ndim, layer.axis)
  fshape = tuple(x.shape[a] for a in faxes)

  stats_dtype = jnp.float32 if layer.force_float32_reductions else layer.param_dtype
  stats_shape = fshape if layer.batch_groups is None else (layer.batch_groups, *fshape)
  # frozen: a fresh layer is y = x
  var_init = (lambda s, d: jnp.full(s, 1 - layer.epsilon, d)) if kind.frozen else jnp.ones
  ra_mean = holder.variable("batch_stats", "mean", jnp.zeros, stats_shape, stats_dtype)
  ra_var = holder.variable("batch_stats", "var", var_init, stats_shape, stats_dtype)
  params = {}
  if layer.use_scale:
    params["scale"] = holder.param("scale", layer.scale_init, fshape, layer.param_dtype)
  if layer.use_bias:
    params["bias"] = holder.param("bias", layer.bias_init, fshape, layer.param_dtype)
  # flax's output dtype: the promotion of the input and the parameters used.
  out_dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=layer.dtype)

  initializing = holder.is_initializing()
  stats = {"mean": ra_mean.value, "var": ra_var.value}
  y, new_stats = layer_call.normalize_layer(
    layer,
    kind,
    x,
    params,
    stats,
    feature_axes=faxes,
    out_dtype=out_dtype,
    training=not use_running_average,
    mask=mask,
    initializing=initializing,  # as in flax, init needs no bound axis and leaves the statistics alone
    owner=holder,
  )
  if not use_running_average and not initializing:
    ra_mean.value = new_stats["mean"]
    ra_var.value = new_stats["var"]
  return y
