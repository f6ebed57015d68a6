"""Model, optimizer and the portable training state.

The portable state (what checkpoints hold) has one set of BN running
statistics per layer, of the feature shape, whatever the BN mode and the
parallel style; `parallel.Parallel` widens it to one row per device for
per-device BN and pools it back.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

import jaxbn
from trainer.config import Config, per_device_statistics
from trainer.models import MLP, InceptionNet

AXIS = "batch"  # the device axis of every parallel style


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_model(config: Config, num_devices: int | None = None) -> nn.Module:
  """The configured model as a parallel style runs it.

  Per-device BN (and Batch Renorm, `--bn renorm`, per device) keeps one
  row of running statistics per device
  (`batch_groups=num_devices`): under jit each device's shard of the batch
  is one group; under shard_map and pmap each device sees its own row. Synced
  BN names the device axis, except under jit, where a plain reduction over
  the sharded batch already is the global one. Without `num_devices`: the
  model that evaluates the portable state (no groups, no axis).
  """
  norm = None
  if config.bn != "none":
    kwargs = {}
    if num_devices is not None and per_device_statistics(config):
      kwargs["batch_groups"] = num_devices
    if num_devices is not None and config.bn == "sync" and config.parallel != "jit":
      kwargs["axis_name"] = AXIS
    layer = jaxbn.BatchNorm
    if config.bn == "renorm":
      layer = jaxbn.BatchRenorm
      if num_devices is not None and config.parallel != "jit":  # each device holds its own row
        kwargs["stats_axis_name"] = AXIS
    norm = functools.partial(layer, momentum=config.bn_momentum, **kwargs)
  activation = {"sigmoid": nn.sigmoid, "relu": nn.relu, None: None}[config.activation]
  if config.model == "mlp":
    return MLP(norm=norm, init_std=config.init_std, activation=activation or nn.sigmoid)
  return InceptionNet(norm=norm, dropout=config.dropout, width=config.width, activation=activation or nn.relu)


def make_renorm_schedule(config: Config):
  """--bn renorm: Batch Renorm's limits over the run (the paper's schedule
  scaled to --steps): plain BN for the first 10% of the steps, then r_max
  1 -> 3 and d_max 0 -> 5 linearly until 60%, then constant. None otherwise."""
  if config.bn != "renorm":
    return None
  return jaxbn.renorm_schedule(max(config.steps // 2, 1), warmup_steps=config.steps // 10)


def make_optimizer(config: Config) -> optax.GradientTransformation:
  lr = config.lr
  if config.lr_decay_steps:
    lr = optax.exponential_decay(config.lr, config.lr_decay_steps, config.lr_decay_rate, staircase=True)
  update = {
    "sgd": lambda: optax.sgd(lr),
    "momentum": lambda: optax.sgd(lr, momentum=0.9),
    "adam": lambda: optax.adam(lr),
  }[config.optimizer]()
  if not config.weight_decay:
    return update
  kernels = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels), update)


def create_train_state(config: Config, image_shape, model: nn.Module | None = None) -> TrainState:
  """The portable initial state (running statistics of the feature shape) of
  `model`, by default the configured one."""
  key = jax.random.key(config.seed)
  model = make_model(config) if model is None else model
  variables = model.init({"params": key, "dropout": key}, jnp.zeros((2, *image_shape)), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=make_optimizer(config).init(params),
  )
