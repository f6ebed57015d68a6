"""Training and evaluation steps, written once for every parallel style.

`local=True`: the function runs per device (shard_map, pmap) on this
device's share and talks to the others over the axis `AXIS`; `local=False`:
it runs on global arrays under jax.jit, where XLA places the collectives.
`parallel.Parallel` is the one place that wraps these functions.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax import lax

import jaxbn
from trainer.state import AXIS, TrainState


def preprocess(images):
  """uint8 pixels -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def _varying(tree):
  """Marks replicated values as per-device (shard_map), so that the gradient
  of this device's loss is this device's and `pmean` averages it, as under
  pmap (where every value already is per-device)."""

  def vary(value):
    if AXIS in getattr(jax.typeof(value), "vma", frozenset()):
      return value
    return lax.pcast(value, AXIS, to="varying")

  return jax.tree.map(vary, tree)


def _with_renorm_limits(limits):
  """Passes this step's (r_max, d_max) to every BatchRenorm layer of a model."""

  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, jaxbn.BatchRenorm) and context.method_name == "__call__":
      kwargs = {**kwargs, "r_max": limits[0], "d_max": limits[1]}
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(intercept)


def train_step(state: TrainState, images, labels, model, optimizer, dropout_key, local: bool, renorm_schedule=None):
  """One optimizer step on the batch (this device's share when `local`).

  `renorm_schedule`: step -> (r_max, d_max) for the model's BatchRenorm layers.
  """

  def loss_fn(params):
    limits = contextlib.nullcontext() if renorm_schedule is None else _with_renorm_limits(renorm_schedule(state.step))
    with limits:
      (logits, _), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        preprocess(images),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
      )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates.get("batch_stats", {})

  if local:
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(_varying(state.params))
    grads = lax.pmean(grads, AXIS)
  else:
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return state, (lax.pmean(loss, AXIS) if local else loss)


def _epoch_permutation(key, epoch, n):
  return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def train_chunk(
  state,
  images,
  labels,
  *,
  num_steps,
  model,
  optimizer,
  seed,
  global_batch,
  num_devices,
  local,
  batch_sharding=None,
  renorm_schedule=None,
):
  """`num_steps` steps in one dispatch, drawing batches on device.

  Epoch e visits the training set in the order of a permutation seeded by
  (seed, e); the global batch of step s is its slice s, and device d takes
  rows d*B..(d+1)*B of it (under jit: the global batch is sharded so).
  Everything depends on the step only, so a resumed run draws exactly the
  batches an uninterrupted one would, in every parallel style.
  """
  n = images.shape[0]
  per_epoch = n // global_batch
  per_device = global_batch // num_devices
  data_key, dropout_root = jax.random.split(jax.random.key(seed + 1))

  def body(carry, _):
    state, epoch, perm = carry
    step = state.step
    step_epoch = step // per_epoch
    perm = lax.cond(step_epoch == epoch, lambda: perm, lambda: _epoch_permutation(data_key, step_epoch, n))
    start = (step % per_epoch) * global_batch
    dropout_key = jax.random.fold_in(dropout_root, step)
    if local:
      device = lax.axis_index(AXIS)
      idx = lax.dynamic_slice(perm, (start + device * per_device,), (per_device,))
      dropout_key = jax.random.fold_in(dropout_key, device)
      batch_images, batch_labels = images[idx], labels[idx]
    else:
      idx = lax.dynamic_slice(perm, (start,), (global_batch,))
      batch_images, batch_labels = images[idx], labels[idx]
      if batch_sharding is not None:
        batch_images = jax.sharding.reshard(batch_images, batch_sharding)
        batch_labels = jax.sharding.reshard(batch_labels, batch_sharding)
    state, loss = train_step(state, batch_images, batch_labels, model, optimizer, dropout_key, local, renorm_schedule)
    return (state, step_epoch, perm), loss

  epoch = state.step // per_epoch
  carry = (state, epoch, _epoch_permutation(data_key, epoch, n))
  (state, _, _), losses = lax.scan(body, carry, None, length=num_steps)
  return state, losses.mean()


def eval_step(state: TrainState, images, labels, valid, model, chunk: int, local: bool):
  """Loss and accuracy sums over the test examples given (running statistics),
  and the pre-activation of unit 0 of the last hidden layer per example (MLP).

  `local`: this device's share, sums over every device (psum).
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def body(_, batch):
    x, y, v = batch
    logits, extras = model.apply(variables, preprocess(x), train=False)
    # log_softmax, not optax's loss: under jit-style evaluation (vmap over the
    # device-sharded axis of an Explicit mesh) optax's logsumexp select fails
    # JAX's sharding check for some models (the sigmoid Inception net).
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(logits, -1) == y
    tracked = extras.get("last_preactivation", jnp.zeros((x.shape[0], 1)))[:, 0]
    return None, (jnp.sum(jnp.where(v, loss, 0)), jnp.sum(v & correct), tracked)

  reshape = lambda a: a.reshape(-1, chunk, *a.shape[1:])
  _, (loss, correct, tracked) = lax.scan(body, None, (reshape(images), reshape(labels), reshape(valid)))
  sums = {"loss": loss.sum(), "correct": correct.sum(), "count": valid.sum()}
  return (lax.psum(sums, AXIS) if local else sums), tracked.reshape(-1)
