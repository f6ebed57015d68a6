"""Training and evaluation steps, written once for every parallel style and input path.

`local=True`: the function runs per device (shard_map, pmap) on this
device's share and talks to the others over the axis `AXIS`; `local=False`:
it runs on global arrays under jax.jit, where XLA places the collectives.
`parallel.Parallel` is the one place that wraps these functions.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax import lax

import jaxbn
from trainer.input import Batches, Pixels
from trainer.mesh import AXIS

if TYPE_CHECKING:
  from trainer.state import TrainState

UNIT = Pixels(0.0, 255.0)  # x / 255: the paper models' input


def _varying(tree):
  """Marks replicated values as per-device (shard_map), so that the gradient
  of this device's loss is this device's and `pmean` averages it, as under
  pmap (where every value already is per-device)."""

  def vary(value):
    if AXIS in getattr(jax.typeof(value), "vma", frozenset()):
      return value
    return lax.pcast(value, AXIS, to="varying")

  return jax.tree.map(vary, tree)


def _with_step_parameters(schedule, step):
  """Passes this step's arguments (`bn_modes.StepParameters`) to every layer of their class."""
  arguments = schedule(step)

  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, schedule.layer) and context.method_name == "__call__":
      kwargs = {**kwargs, **arguments}
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(intercept)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy of integer labels, optionally against smoothed targets."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


class Accumulation(NamedTuple):
  """Gradient accumulation: `steps` micro-batches per optimizer step. The model's BN
  layers are built with momentum 0 (a pass leaves the micro-batch's moments) and the
  running statistics are updated once per step with `momentum`
  (`jaxbn.accumulate_batch_stats`)."""

  steps: int
  momentum: float


def micro_batches(x, steps: int, num_devices: int, local: bool):
  """(rows, ...) -> (steps, rows / steps, ...): micro-batch j holds the j-th slice of
  every device's share, so each device normalizes its own part of every micro-batch."""
  if local:  # this device's share
    return x.reshape(steps, -1, *x.shape[1:])
  x = x.reshape(num_devices, steps, -1, *x.shape[1:])  # device-major rows, as the batch is sharded
  return jnp.swapaxes(x, 0, 1).reshape(steps, -1, *x.shape[3:])


def _accumulated(gradient, params, images, labels, dropout_key):
  """The micro-batches (leading axis) one after the other: their mean loss, their BN
  moments stacked, and their mean gradient (`gradient`: jax.value_and_grad of the loss)."""
  k = images.shape[0]

  def micro_step(grad_sum, micro):
    index, images, labels = micro
    (loss, stats), grads = gradient(params, images, labels, jax.random.fold_in(dropout_key, index))
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, stats)

  micro = (jnp.arange(k), images, labels)
  grad_sum, (losses, micro_stats) = lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), micro)
  return jnp.mean(losses), micro_stats, jax.tree.map(lambda g: g / k, grad_sum)


def train_step(
  state: TrainState,
  images,
  labels,
  model,
  optimizer,
  dropout_key,
  local: bool,
  bn_schedule=None,
  pixels: Pixels = UNIT,
  label_smoothing: float = 0.0,
  frozen_bn: bool = False,
  accumulation: Accumulation | None = None,
  num_devices: int = 1,
  weight_ema: float | None = None,
):
  """One optimizer step on the batch of uint8 images (this device's share when `local`).

  `bn_schedule`: the BN mode's per-step layer arguments (`BNMode.schedule`), e.g.
  Batch Renorm's (r_max, d_max).
  `frozen_bn`: every BN layer runs as `jaxbn.FrozenBatchNorm` (its running
  statistics fixed; scale and bias still trained).
  `accumulation`: the batch runs as micro-batches one after the other (a scan:
  activations live for one micro-batch), the gradient is their mean, and the
  running statistics take one update from their pooled moments.
  `weight_ema`: the decay of the averaged weights (`average_weights`).
  """

  def loss_fn(params, images, labels, dropout_key):
    limits = contextlib.nullcontext() if bn_schedule is None else _with_step_parameters(bn_schedule, state.step)
    frozen = jaxbn.swap_batch_norm("frozen", train_affine=True) if frozen_bn else contextlib.nullcontext()
    with limits, frozen:
      (logits, _), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        pixels(images),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
      )
    return cross_entropy(logits, labels, label_smoothing), updates.get("batch_stats", {})

  gradient = jax.value_and_grad(loss_fn, has_aux=True)
  params = _varying(state.params) if local else state.params
  if accumulation is None:
    (loss, batch_stats), grads = gradient(params, images, labels, dropout_key)
  else:
    micro = tuple(micro_batches(a, accumulation.steps, num_devices, local) for a in (images, labels))
    loss, micro_stats, grads = _accumulated(gradient, params, *micro, dropout_key)
    batch_stats = state.batch_stats  # FrozenBN: fixed
    if not frozen_bn and state.batch_stats:
      batch_stats = jaxbn.accumulate_batch_stats(state.batch_stats, micro_stats, accumulation.momentum)
  if local:
    grads = lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  if weight_ema is not None:
    state = average_weights(state, weight_ema, local)
  return state, (lax.pmean(loss, AXIS) if local else loss)


def average_weights(state: TrainState, decay: float, local: bool) -> TrainState:
  """One step of the weight average (Polyak; timm's model EMA), after the optimizer's:

      ema_params      := decay * ema_params      + (1 - decay) * params
      ema_batch_stats := decay * ema_batch_stats + (1 - decay) * running statistics

  the running statistics pooled over per-device BN's rows first (law of total
  variance; `local`: this device's rows, then over the devices), so the averaged
  statistics go with the averaged weights as one set.
  """
  stats = state.batch_stats
  rows = jax.tree.leaves(stats) and jax.tree.leaves(stats)[0].ndim > jax.tree.leaves(state.ema_batch_stats)[0].ndim
  if rows:
    stats = jaxbn.sync_batch_stats(stats)
    if local:
      stats = jaxbn.sync_batch_stats(stats, AXIS)
  average = lambda old, new: decay * old + (1 - decay) * new
  return state.replace(
    ema_params=jax.tree.map(average, state.ema_params, state.params),
    ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, stats),
  )


def train_batch(
  state, images, labels, index=None, *, batches: Batches, num_devices, local, batch_sharding=None, **step_kwargs
):
  """One training step of the run: the state and the step's loss.

  Streamed input: images/labels are this step's batch (this device's rows when
  `local`). Device-resident input: they are the whole training split, on
  every device, and `index` holds the batch's example indices (computed on the
  host, `Batches.indices`); the step gathers them and augments them there.
  Device d takes rows d*B..(d+1)*B of the global batch (under jit: the batch
  is sharded so). The dropout key depends on the step (and the device) only.

  One step per dispatch, not a `lax.scan` of many: XLA:CPU runs a ResNet's
  convolutions inside a loop about 20 times slower than outside one.
  """
  _, dropout_root = jax.random.split(jax.random.key(batches.seed + 1))
  dropout_key = jax.random.fold_in(dropout_root, state.step)
  if index is not None:
    per_device = batches.global_batch // num_devices
    positions = (
      lax.axis_index(AXIS) * per_device + jnp.arange(per_device) if local else jnp.arange(batches.global_batch)
    )
    images, labels = batches.device_batch(images, labels, state.step, positions, index)
  if local:
    dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(AXIS))
  elif batch_sharding is not None:
    images = jax.sharding.reshard(images, batch_sharding)
    labels = jax.sharding.reshard(labels, batch_sharding)
  return train_step(state, images, labels, dropout_key=dropout_key, local=local, num_devices=num_devices, **step_kwargs)


def _with_mask(valid):
  """Passes `valid` (one flag per example) as every BN layer's mask."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.BatchNorm | jaxbn.BatchNorm):
      x = args[0]
      kwargs = {**kwargs, "mask": valid.reshape(valid.shape + (1,) * (x.ndim - 1))}
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(intercept)


def eval_step(
  state: TrainState, images, labels, valid, model, local: bool, pixels: Pixels = UNIT, batch_stats_groups=None
):
  """Loss and accuracy sums over the valid test examples given (running statistics),
  and the pre-activation of unit 0 of the last hidden layer per example (MLP).

  `local`: this device's share, sums over every device (psum).
  `batch_stats_groups`: instead of the running statistics, every BN layer
  normalizes each of this many groups of examples with the group's own
  statistics (padding excluded), as training does.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if batch_stats_groups is None:
    logits, extras = model.apply(variables, pixels(images), train=False)
  else:
    swap = jaxbn.swap_batch_norm(batch_groups=batch_stats_groups, use_running_average=False, axis_name=None)
    with _with_mask(valid), swap:
      (logits, extras), _ = model.apply(variables, pixels(images), train=False, mutable=["batch_stats"])
  # log_softmax, not optax's loss: under jit-style evaluation (vmap over the
  # device-sharded axis of an Explicit mesh) optax's logsumexp select fails
  # JAX's sharding check for some models (the sigmoid Inception net).
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  correct = jnp.argmax(logits, -1) == labels
  tracked = extras.get("last_preactivation", jnp.zeros((images.shape[0], 1)))[:, 0]
  sums = {"loss": jnp.sum(jnp.where(valid, loss, 0)), "correct": jnp.sum(valid & correct), "count": valid.sum()}
  return (lax.psum(sums, AXIS) if local else sums), tracked
