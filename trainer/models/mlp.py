"""The MLP of the paper's MNIST experiment (§4.1): 784-100-100-100-10."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class MLP(nn.Module):
  """Fully connected net with sigmoid units and optional BN before each one.

  With `norm`, each hidden layer is Dense (no bias; BN's beta replaces it) ->
  BN -> activation. Weights start from N(0, init_std²), the paper's "small
  random Gaussian values".

  Returns `(logits, {"last_preactivation": ...})`: the input to the last hidden
  layer's nonlinearity, which the paper's Figure 1(b, c) follows.
  """

  hidden: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.sigmoid
  norm: Callable[..., nn.Module] | None = None
  init_std: float = 0.1
  dtype: Any = jnp.float32  # of the computation; parameters stay float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    init = nn.initializers.normal(self.init_std)
    preactivation = x
    for width in self.hidden:
      preactivation = nn.Dense(width, use_bias=self.norm is None, kernel_init=init, dtype=self.dtype)(x)
      if self.norm is not None:
        preactivation = self.norm(use_running_average=not train, dtype=self.dtype)(preactivation)
      x = self.activation(preactivation)
    logits = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype)(x)
    return logits.astype(jnp.float32), {"last_preactivation": preactivation}
