"""Model, optimizer and the portable training state.

The portable state (what checkpoints hold) has one set of BN running
statistics per layer, of the feature shape, whatever the BN mode and the
parallel style; `parallel.Parallel` widens it to one row per device for
per-device BN and pools it back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from trainer import pretrained
from trainer.bn_modes import BN_MODES
from trainer.config import STEP_DECAY_AT, Config
from trainer.models import MODELS
from trainer.parallel import STYLES

__all__ = [
  "TrainState",
  "create_train_state",
  "initialize_from_torch",
  "learning_rate",
  "make_model",
  "make_optimizer",
]


class TrainState(struct.PyTreeNode):
  """The portable training state. A field added later needs a default: runs saved
  before it restore with the fresh value (`trainer.checkpoints`)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # --weight-ema: the averaged weights and the running statistics averaged alongside
  # them (one set, pooled over per-device BN's rows); None when off
  ema_params: Any = None
  ema_batch_stats: Any = None


def make_model(config: Config, num_classes: int = 10, num_devices: int | None = None) -> nn.Module:
  """The configured model as a parallel style runs it over `num_devices`
  devices (see `bn_modes`), on micro-batches with --accumulate-steps; without
  `num_devices`: the model that evaluates
  the portable state (one set of statistics, no groups, no axis)."""
  mode = BN_MODES[config.bn]
  groups, momentum = None, config.bn_momentum
  if num_devices is not None:  # the training model normalizes micro-batches (the whole batch without accumulation)
    groups = config.normalization_groups(num_devices)
    if config.accumulate_steps > 1:
      momentum = 0.0  # a pass leaves the micro-batch's moments; the step updates once (`steps.Accumulation`)
  norm = mode.norm(momentum, STYLES[config.parallel].local, groups, placed=num_devices is not None, config=config)
  return MODELS[config.model].build(config, norm, num_classes, jnp.dtype(config.dtype))


def learning_rate(config: Config) -> optax.Schedule:
  """Step -> learning rate: the --schedule after a linear --warmup-steps from 0."""
  lr, warmup, steps = config.lr, config.warmup_steps, config.steps
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.0)
  if config.schedule == "step":
    main = optax.piecewise_constant_schedule(lr, {round(share * steps) - warmup: 0.1 for share in STEP_DECAY_AT})
  elif config.lr_decay_steps:
    main = optax.exponential_decay(lr, config.lr_decay_steps, config.lr_decay_rate, staircase=True)
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decayed(params):
  """Weight decay applies to kernels (rank > 1), never to BN's scale and bias or to biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """The configured optimizer; for fine-tuning (--freeze-stages, --lr-backbone-scale) one
  per part of the model: frozen (no update, no decay), backbone (x S), head."""
  lr = learning_rate(config)
  if config.optimizer == "adam":
    update = optax.adam(lr)
  else:
    update = optax.sgd(lr, momentum=0.9 if config.optimizer == "momentum" else None, nesterov=bool(config.nesterov))
  if config.weight_decay:
    update = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decayed), update)
  if config.freeze_stages is None and config.lr_backbone_scale == 1:
    return update  # the optimizer state of runs without fine-tuning flags is unchanged
  parts = {"head": update, "backbone": optax.chain(update, optax.scale(config.lr_backbone_scale))}
  return optax.multi_transform({**parts, "frozen": optax.set_to_zero()}, _model_parts(config))


def _model_parts(config: Config):
  """params -> "frozen", "backbone" or "head" per leaf, by the PyTorch stage of its module."""
  names = MODELS[config.model].torch_names_of(config)
  frozen_through = -1 if config.freeze_stages is None else config.freeze_stages

  def part(path, _):
    stage = pretrained.stage_of(names[tuple(key.key for key in path[:-1])])
    if stage is None:
      return "head"
    return "frozen" if stage <= frozen_through else "backbone"

  return lambda params: jax.tree_util.tree_map_with_path(part, params)


def initialize_from_torch(config: Config, state: TrainState, num_classes: int) -> tuple[TrainState, list[str]]:
  """`state` with the weights of --init-from (`trainer.pretrained`), and the notes to show."""
  names = MODELS[config.model].torch_names_of(config)
  fresh = {"params": state.params, "batch_stats": state.batch_stats}
  loaded, notes = pretrained.from_torch(pretrained.read_state_dict(config.init_from), fresh, names, config.init_from)
  params, batch_stats = (jax.tree.map(jnp.asarray, loaded[c]) for c in ("params", "batch_stats"))
  state = state.replace(params=params, batch_stats=batch_stats)
  if config.weight_ema:
    state = state.replace(ema_params=params, ema_batch_stats=batch_stats)
  return state, notes


def create_train_state(
  config: Config, image_shape, model: nn.Module | None = None, num_classes: int = 10
) -> TrainState:
  """The portable initial state (running statistics of the feature shape) of
  `model`, by default the configured one."""
  key = jax.random.key(config.seed)
  model = make_model(config, num_classes) if model is None else model
  variables = model.init({"params": key, "dropout": key}, jnp.zeros((2, *image_shape)), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=make_optimizer(config).init(params),
    ema_params=params if config.weight_ema else None,
    ema_batch_stats=variables.get("batch_stats", {}) if config.weight_ema else None,
  )
