"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275), its r_max/d_max
schedule, and folding inference-mode BN into the preceding layer.

Imports jax only; the math is jaxbn.functional's core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import functional

__all__ = ["batch_renorm", "fold_batch_norm", "renorm_schedule"]


def batch_renorm(
  x,
  params: dict[str, Any] | None,
  stats: dict[str, Any],
  *,
  training: bool,
  r_max=None,
  d_max=None,
  axis: int | Sequence[int] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  axis_name=None,
  axis_index_groups=None,
  mask=None,
  unbiased: bool = False,
  skip_nonfinite: bool = True,
  dtype=None,
  batch_groups: int | None = None,
  batch_axis: int = 0,
  stats_axis_name=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Batch Renormalization as a pure function: returns `(y, new_stats)`.

  Training, with mu_B, sigma_B = sqrt(var_B + eps) the batch statistics (of
  the cross-replica batch on `axis_name`, exact as in `batch_norm`) and mu,
  sigma = sqrt(var + eps) the running ones in `stats`:

      r = clip(sigma_B / sigma, 1 / r_max, r_max)
      d = clip((mu_B - mu) / sigma, -d_max, d_max)
      y = scale * ((x - mu_B) / sigma_B * r + d) + bias

  r and d are constants of the gradient. `r_max = 1, d_max = 0` is exactly
  BN; without clipping the training output equals the inference output.
  `r_max`, `d_max` may be traced values (schedules under jit: see
  `renorm_schedule`); inference never uses them, so they are needed only
  with `training=True` (a `ValueError` names the missing one). Running statistics update as in `batch_norm` and have
  its layout, so checkpoints interchange; inference is BN's.

  Per-device Batch Renorm corrects toward the running statistics pooled over
  the devices (the law of total variance, as `sync_batch_stats`), the
  estimate of the population's: with `batch_groups`, each group is corrected
  toward the pooled rows of `stats`; under shard_map/pmap, where each device
  holds its own running statistics, `stats_axis_name` names the device axis
  to pool them over (one small collective of per-feature vectors).

  Every other argument is `batch_norm`'s.
  """
  if training:
    for name, value in (("r_max", r_max), ("d_max", d_max)):
      if value is None:
        raise ValueError(f"{name}: Batch Renorm needs it in training (e.g. r_max=3.0, d_max=5.0); got None.")
  else:  # inference is BN's: the limits are never read
    r_max, d_max = 1.0, 0.0
  renorm = functional.Renorm(r_max=r_max, d_max=d_max, stats_axis_name=stats_axis_name)
  options = functional.BNOptions.from_keywords(locals(), renorm)
  return functional.normalize(x, params, stats, options, training=training, mask=mask)


def renorm_schedule(
  ramp_steps: int, *, warmup_steps: int = 0, r_max: float = 3.0, d_max: float = 5.0
) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """The paper's relaxation of the clipping: step -> (r_max, d_max).

  Plain BN (r_max 1, d_max 0) for `warmup_steps`, then both limits ramp
  linearly to `r_max` and `d_max` over `ramp_steps` and stay there (the paper:
  5k steps of BN, then r_max 1 -> 3 over 40k steps and d_max 0 -> 5 over 25k).
  The step may be traced (an optax-style step count).
  """
  if ramp_steps < 1 or warmup_steps < 0:
    raise ValueError(f"ramp_steps, warmup_steps: expected >= 1 and >= 0, got {ramp_steps}, {warmup_steps}.")
  if r_max < 1 or d_max < 0:
    raise ValueError(f"r_max, d_max: expected >= 1 and >= 0, got {r_max}, {d_max}.")

  def schedule(step):
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - warmup_steps) / ramp_steps, 0.0, 1.0)
    return 1.0 + (r_max - 1.0) * progress, d_max * progress

  return schedule


def fold_batch_norm(
  kernel, bias, bn_params: dict[str, Any] | None, bn_stats: dict[str, Any], *, epsilon: float = 1e-5
) -> tuple[jax.Array, jax.Array]:
  """Folds inference-mode BN into the Dense or Conv layer before it.

  For z = x @ kernel + bias (flax layout: output features on the kernel's
  last axis; `bias=None` when the layer has none) followed by
  BN(z) = scale * (z - mean) / sqrt(var + epsilon) + beta:

      kernel' = kernel * s,   bias' = (bias - mean) * s + beta,   s = scale / sqrt(var + epsilon)

  so the folded layer alone gives BN's output. Returns `(kernel', bias')`.
  """
  kernel = jnp.asarray(kernel)
  features = kernel.shape[-1]
  for name, value in (("bn_stats['mean']", bn_stats["mean"]), ("bn_stats['var']", bn_stats["var"])):
    if jnp.shape(value) != (features,):
      raise ValueError(f"{name}: expected shape ({features},) (the kernel's output features), got {jnp.shape(value)}.")
  bn_params = bn_params or {}
  dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  scale = jnp.asarray(bn_params.get("scale", jnp.ones(features)), dtype)
  beta = jnp.asarray(bn_params.get("bias", jnp.zeros(features)), dtype)
  s = scale / jnp.sqrt(jnp.asarray(bn_stats["var"], dtype) + epsilon)
  bias = jnp.zeros(features, dtype) if bias is None else jnp.asarray(bias, dtype)
  new_bias = (bias - jnp.asarray(bn_stats["mean"], dtype)) * s + beta
  return (kernel * s).astype(kernel.dtype), new_bias.astype(kernel.dtype)
