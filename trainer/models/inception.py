"""A small Inception-style convnet for 28x28 inputs (paper §4.2, scaled down)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class ConvUnit(nn.Module):
  """conv -> BN -> activation (conv bias only without BN)."""

  features: int
  kernel: int
  norm: Callable[..., nn.Module] | None
  activation: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    k = (self.kernel, self.kernel)
    x = nn.Conv(self.features, k, strides=self.strides, padding="SAME", use_bias=self.norm is None, dtype=self.dtype)(x)
    if self.norm is not None:
      x = self.norm(use_running_average=not train, dtype=self.dtype)(x)
    return self.activation(x)


class InceptionModule(nn.Module):
  """Four branches: 1x1; 1x1->3x3; 1x1->3x3->3x3 (the paper's double 3x3); pool->1x1."""

  branch1: int
  reduce3: int
  branch3: int
  reduce33: int
  branch33: int
  pool_proj: int
  norm: Callable[..., nn.Module] | None
  activation: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    unit = lambda f, k: ConvUnit(f, k, self.norm, self.activation, self.dtype)
    b1 = unit(self.branch1, 1)(x, train)
    b3 = unit(self.branch3, 3)(unit(self.reduce3, 1)(x, train), train)
    b33 = unit(self.reduce33, 1)(x, train)
    b33 = unit(self.branch33, 3)(unit(self.branch33, 3)(b33, train), train)
    bp = nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME")
    bp = unit(self.pool_proj, 1)(bp, train)
    return jax.numpy.concatenate([b1, b3, b33, bp], axis=-1)


class InceptionNet(nn.Module):
  """Stem conv, two inception modules, 2x2 pool, two more, global average pool.

  `width` scales every layer's channels. Returns `(logits, {})`.
  """

  num_classes: int = 10
  norm: Callable[..., nn.Module] | None = None
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout: float = 0.0
  width: int = 4
  dtype: Any = jnp.float32  # of the computation; parameters stay float32

  @nn.compact
  def __call__(self, x, train: bool):
    if x.ndim == 3:
      x = x[..., None]
    x = x.astype(self.dtype)
    w = self.width
    module = lambda scale: InceptionModule(
      2 * scale * w // 2,
      scale * w // 2,
      scale * w,
      scale * w // 4,
      scale * w // 2,
      scale * w // 2,
      self.norm,
      self.activation,
      self.dtype,
    )
    x = ConvUnit(2 * w, 3, self.norm, self.activation, self.dtype)(x, train)  # 28x28
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 14x14
    x = module(2)(x, train)
    x = module(2)(x, train)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 7x7
    x = module(4)(x, train)
    x = module(4)(x, train)
    x = x.mean(axis=(1, 2))
    if train and self.dropout > 0:
      # jnp.where, not nn.Dropout's lax.select: under jit on an Explicit mesh x is
      # batch-sharded and the mask replicated, which lax.select refuses.
      keep = 1.0 - self.dropout
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
      x = jnp.where(mask, x / keep, 0.0)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32), {}
