"""The call every jaxbn layer makes, Linen and NNX alike.

A layer class says what it adds to BN through one hook, its `call_kind(r_max=None,
d_max=None) -> CallKind` method (one of `plain_kind`, `renorm_kind`, `frozen_kind`
below, shared by the Linen and the NNX class of that kind); the framework wrapper
reads its variables and hands them to `normalize_layer`, which does the rest.
`recording()` is how PreciseBN (`jaxbn.population_stats`,
`jaxbn.nnx.population_stats`) reads each layer's input statistics, in both.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import functional


class CallKind(NamedTuple):
  """What a layer class adds to BN's call.

  frozen: normalize with the stored statistics, in training too, and never
    update them (FrozenBatchNorm).
  train_affine: with `frozen`, whether `scale` and `bias` get gradients.
  renorm: Batch Renormalization's limits (BatchRenorm); None: plain BN.
  """

  frozen: bool = False
  train_affine: bool = True
  renorm: functional.Renorm | None = None


def plain_kind(layer, r_max=None, d_max=None) -> CallKind:
  """BatchNorm's hook: plain BN (`r_max`, `d_max` are Batch Renorm's and unused)."""
  return CallKind()


def renorm_kind(layer, r_max=None, d_max=None) -> CallKind:
  """BatchRenorm's hook: its limits, a call's `r_max` / `d_max` overriding the layer's."""
  return CallKind(
    renorm=functional.Renorm(
      layer.r_max if r_max is None else r_max,
      layer.d_max if d_max is None else d_max,
      stats_axis_name=layer.stats_axis_name,
    )
  )


def frozen_kind(layer, r_max=None, d_max=None) -> CallKind:
  """FrozenBatchNorm's hook."""
  return CallKind(frozen=True, train_affine=layer.train_affine)


# While `recording()` is active: the list each training-mode layer call appends to.
_RECORDED: contextvars.ContextVar[list | None] = contextvars.ContextVar("jaxbn_recorded", default=None)


class Recorded(NamedTuple):
  """One layer call seen by `recording()`."""

  owner: Any  # the module whose variables the call used (Linen: bound, with `.scope.path`; NNX: the layer)
  moments: functional.Moments  # of the layer's input, per group where it normalizes in groups
  grouped: bool


@contextlib.contextmanager
def recording() -> Iterator[list[Recorded]]:
  """Inside, every jaxbn layer that normalizes with its batch statistics (and
  every flax layer run as one by `swap_batch_norm`) appends a `Recorded` of its
  input to the list this yields. Works while tracing: the moments are the traced
  values of that call."""
  recorded: list[Recorded] = []
  token = _RECORDED.set(recorded)
  try:
    yield recorded
  finally:
    _RECORDED.reset(token)


def normalize_layer(
  layer,
  kind: CallKind,
  x,
  params: dict[str, Any],
  stats: dict[str, Any],
  *,
  feature_axes: tuple[int, ...],
  out_dtype,
  training: bool,
  mask=None,
  initializing: bool = False,
  owner=None,
) -> tuple[jax.Array, dict[str, Any]]:
  """`(y, new_stats)` of one layer call: `layer`'s fields (momentum, epsilon,
  axis_name, axis_index_groups, unbiased, skip_nonfinite, batch_groups) and
  `kind`, on `params` and `stats` as the wrapper read them. `training` is the
  wrapper's (a frozen kind never trains); `initializing`: Linen's `init`, which
  needs no bound axis and takes a batch of any size."""
  training = training and not kind.frozen
  if kind.frozen and not kind.train_affine:
    params = jax.tree.map(jax.lax.stop_gradient, params)
  fshape = tuple(x.shape[a] for a in feature_axes)
  groups = None
  if layer.batch_groups is not None:
    # One row per group; statistics of the feature shape (a checkpoint of plain
    # BN, or the pooled set) serve every group.
    groups = layer.batch_groups if jnp.shape(stats["mean"]) == fshape else functional.groups_of(stats, fshape)
  renorm = kind.renorm
  if initializing:
    stats = functional.pool_stats(stats) if groups is not None else stats
    groups, renorm = None, renorm and renorm._replace(stats_axis_name=None)
  recorded = _RECORDED.get()
  if recorded is not None and training and not initializing:
    moments = functional.moments(x, feature_axes, mask=mask, batch_groups=groups)
    recorded.append(Recorded(owner if owner is not None else layer, moments, groups is not None))
  options = functional.BNOptions(
    axis=feature_axes,
    momentum=layer.momentum,
    epsilon=layer.epsilon,
    axis_name=None if initializing else layer.axis_name,
    axis_index_groups=layer.axis_index_groups,
    unbiased=layer.unbiased,
    skip_nonfinite=layer.skip_nonfinite,
    dtype=out_dtype,
    batch_groups=groups,
    renorm=renorm,
  )
  return functional.normalize(x, params, stats, options, training=training, mask=mask)
