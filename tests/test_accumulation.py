"""Gradient accumulation (--accumulate-steps): the step against a one-device oracle.

With K micro-batches, each device normalizes its own part of each micro-batch
(per-device BN) or the micro-batch over all devices (synced BN). The oracle is
one device, no accumulation: ghost BN over the whole batch, reordered so that
micro-batch j is contiguous, with one group per device's part of a micro-batch
(per-device) or one per micro-batch (synced). Its layers run with momentum 0 so
their rows are the groups' moments; the running statistics' one update per step is
then computed in NumPy float64 from those rows (law of total variance, then the
moving average).
"""

import jax
import numpy as np
import optax
import pytest

import jaxbn
import trainer
from trainer import steps
from trainer.input import Batches
from trainer.models import MLP

DEVICES, PER_DEVICE, K, STEPS = 8, 8, 2, 3  # groups of 4: BN over 2 examples is ill-conditioned
MOMENTUM = 0.9


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (STEPS, DEVICES * PER_DEVICE, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, (STEPS, DEVICES * PER_DEVICE)).astype(np.int32)
  return images, labels


def _micro_major(x):
  """Global rows (device-major) -> micro-batch-major: micro j = every device's j-th slice."""
  x = x.reshape(DEVICES, K, PER_DEVICE // K, *x.shape[1:])
  return np.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])


def _config(bn, style):
  return trainer.Config(
    model="mlp",
    bn=bn,
    parallel=style,
    batch_size=PER_DEVICE,
    accumulate_steps=K,
    bn_momentum=MOMENTUM,
    optimizer="momentum",
    lr=0.1,
    init_std=0.3,
  )


def _harness(config, images, labels):
  """STEPS steps as train.py runs them: the losses, the parameters and per-device rows or the statistics."""
  per_device_bn = config.bn == "per-device"
  parallel = trainer.make_parallel(config.parallel, jax.devices(), stat_rows=DEVICES if per_device_bn else None)
  batches = Batches(0, 1000, DEVICES * PER_DEVICE, "none", 28, 1, hflip=False)
  state = parallel.put_state(trainer.create_train_state(config, (28, 28, 1)))
  program = parallel.step_program(
    state,
    resident=False,
    model=trainer.make_model(config, num_devices=DEVICES),
    optimizer=trainer.make_optimizer(config),
    batches=batches,
    accumulation=steps.Accumulation(K, MOMENTUM),
  )
  losses = []
  for step in range(STEPS):
    state, loss = program(state, parallel.put_batch(images[step]), parallel.put_batch(labels[step]))
    losses.append(float(np.asarray(loss.addressable_shards[0].data).reshape(-1)[0]))
  stats = parallel.row_stats(state) if per_device_bn else parallel.portable_state(state).batch_stats
  return np.array(losses), parallel.portable_state(parallel.synchronize(state)).params, stats


def _one_update(running, rows, targets):
  """NumPy float64: target row i pools the groups targets[i] of `rows` (the law of total
  variance, equal sizes) and takes one moving-average step toward them."""
  out = {}
  for name, layer in rows.items():
    mean, var = np.float64(layer["mean"]), np.float64(layer["var"])
    pooled_mean = np.stack([mean[t].mean(0) for t in targets])
    pooled_var = np.stack([var[t].mean(0) + ((mean[t] - mean[t].mean(0)) ** 2).mean(0) for t in targets])
    out[name] = {
      "mean": MOMENTUM * running[name]["mean"] + (1 - MOMENTUM) * pooled_mean,
      "var": MOMENTUM * running[name]["var"] + (1 - MOMENTUM) * pooled_var,
    }
  return out


def _oracle(config, images, labels):
  per_device_bn = config.bn == "per-device"
  groups = DEVICES * K if per_device_bn else K
  norm = lambda **kwargs: jaxbn.BatchNorm(batch_groups=groups, momentum=0.0, **kwargs)
  model = MLP(norm=norm, init_std=config.init_std)
  state = trainer.create_train_state(config, (28, 28, 1))
  optimizer = trainer.make_optimizer(config)
  params, opt_state = state.params, state.opt_state
  # per-device rows: device d pools its K groups (j * DEVICES + d); synced: one set from the K micro-batches
  targets = [[j * DEVICES + d for j in range(K)] for d in range(DEVICES)] if per_device_bn else [list(range(K))]
  running = {  # float64, one row per target
    name: {k: np.repeat(np.float64(v)[None], len(targets), 0) for k, v in layer.items()}
    for name, layer in state.batch_stats.items()
  }
  unread = jax.tree.map(lambda a: np.zeros((groups, *a.shape), np.float32), state.batch_stats)  # training mode
  losses = []
  for step in range(STEPS):
    x = _micro_major(images[step]).astype(np.float32) / 255
    y = _micro_major(labels[step])

    def loss_fn(params, x=x, y=y):
      (logits, _), updates = model.apply(
        {"params": params, "batch_stats": unread},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    (loss, rows), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
    running = _one_update(running, jax.tree.map(np.asarray, rows), targets)
  return np.array(losses), params, running


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["per-device", "sync"])
@pytest.mark.parametrize("style", trainer.PARALLEL_STYLES)
def test_accumulated_steps_equal_ghost_bn_of_the_whole_batch(bn, style):
  assert jax.device_count() == DEVICES
  config = _config(bn, style)
  images, labels = _batches()
  losses, params, stats = _harness(config, images, labels)
  want_losses, want_params, want_stats = _oracle(config, images, labels)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, want_params)
  for name, layer in want_stats.items():
    for k, want in layer.items():
      got = np.asarray(stats[name][k])
      np.testing.assert_allclose(got, want if bn == "per-device" else want[0], rtol=1e-5, atol=1e-6)
