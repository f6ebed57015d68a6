"""The training library behind train.py: pmapped training with per-device or
synced BN, whole-dataset evaluation, metrics, checkpoints and exact resume.

The dataset lives on every device; each step draws its batch there from a
fresh per-epoch permutation, and many steps run per dispatch (`lax.scan`), so
the host does no per-step work. This file is the one place that wraps the
steps in `jax.pmap`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import struct
from jax import lax
from tqdm import tqdm

import jaxbn
from jaxbn import data as data_lib
from jaxbn.models import MLP, InceptionNet

AXIS = "batch"  # the pmapped device axis
PERCENTILES = (15, 50, 85)


@dataclasses.dataclass
class Config:
  """Everything a run depends on; written to OUT/config.json."""
  dataset: str = "fashion_mnist"
  idx_dir: str | None = None
  data_dir: str | None = "data"
  model: str = "mlp"                  # mlp | inception
  bn: str = "none"                    # none | per-device | sync
  devices: int | None = None          # None: every device
  batch_size: int = 60                # per device
  steps: int = 50_000
  optimizer: str = "sgd"              # sgd | momentum | adam
  lr: float = 0.5
  lr_decay_steps: int = 0             # 0: constant learning rate
  lr_decay_rate: float = 1.0          # lr *= rate every lr_decay_steps (staircase)
  weight_decay: float = 0.0
  activation: str | None = None       # sigmoid | relu; None: the model's default
  dropout: float = 0.0
  init_std: float = 0.1               # MLP weights ~ N(0, init_std²)
  width: int = 4                      # InceptionNet channel multiplier
  bn_momentum: float = 0.99
  eval_every: int = 1000
  checkpoint_every: int = 10_000      # a multiple of eval_every
  seed: int = 0
  out: str = "runs/default"
  resume: bool = False
  progress: bool | None = None        # None: only on a terminal

  def __post_init__(self):
    choices = dict(model=("mlp", "inception"), bn=("none", "per-device", "sync"),
                   optimizer=("sgd", "momentum", "adam"), activation=(None, "sigmoid", "relu"))
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}.")
    for name in ("batch_size", "steps", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}.")
    if self.checkpoint_every % self.eval_every:
      raise ValueError(f"checkpoint_every: expected a multiple of eval_every ({self.eval_every}), "
                       f"got {self.checkpoint_every}.")


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ---- model and optimizer -------------------------------------------------


def make_model(config: Config, synced: bool | None = None) -> nn.Module:
  """The configured model; `synced` overrides whether BN syncs over AXIS."""
  synced = config.bn == "sync" if synced is None else synced
  norm = None
  if config.bn != "none":
    norm = functools.partial(jaxbn.BatchNorm, momentum=config.bn_momentum,
                             axis_name=AXIS if synced else None)
  activation = {"sigmoid": nn.sigmoid, "relu": nn.relu, None: None}[config.activation]
  if config.model == "mlp":
    return MLP(norm=norm, init_std=config.init_std, activation=activation or nn.sigmoid)
  return InceptionNet(norm=norm, dropout=config.dropout, width=config.width,
                      activation=activation or nn.relu)


def make_optimizer(config: Config) -> optax.GradientTransformation:
  lr = config.lr
  if config.lr_decay_steps:
    lr = optax.exponential_decay(config.lr, config.lr_decay_steps, config.lr_decay_rate, staircase=True)
  update = {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=0.9),
            "adam": lambda: optax.adam(lr)}[config.optimizer]()
  if not config.weight_decay:
    return update
  kernels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == "kernel", params)
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels), update)


def create_train_state(config: Config, model: nn.Module, image_shape) -> TrainState:
  key = jax.random.key(config.seed)
  variables = model.init({"params": key, "dropout": key}, jnp.zeros((2, *image_shape)), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=make_optimizer(config).init(params))


def _preprocess(images):
  return images.astype(jnp.float32) / 255.0


# ---- one step, many steps, evaluation (run under pmap) --------------------


def train_step(state: TrainState, images, labels, model, optimizer, dropout_key):
  """One SGD step on this device's batch; gradients averaged over devices."""
  def loss_fn(params):
    (logits, _), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, _preprocess(images), train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates.get("batch_stats", {})

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
  return state, lax.pmean(loss, AXIS)


def _epoch_permutation(key, epoch, n):
  return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def train_chunk(state, images, labels, *, num_steps, model, optimizer, seed, global_batch):
  """`num_steps` steps in one dispatch, drawing batches on device.

  Epoch e visits the training set in the order of a permutation seeded by
  (seed, e); the global batch of step s is its slice s, and device d takes
  rows d*B..(d+1)*B of it. Everything depends on the step only, so a resumed
  run draws exactly the batches an uninterrupted one would.
  """
  n = images.shape[0]
  per_epoch = n // global_batch
  per_device = global_batch // lax.axis_size(AXIS)
  device = lax.axis_index(AXIS)
  data_key, dropout_root = jax.random.split(jax.random.key(seed + 1))

  def body(carry, _):
    state, epoch, perm = carry
    step = state.step
    step_epoch = step // per_epoch
    perm = lax.cond(step_epoch == epoch, lambda: perm,
                    lambda: _epoch_permutation(data_key, step_epoch, n))
    start = (step % per_epoch) * global_batch + device * per_device
    idx = lax.dynamic_slice(perm, (start,), (per_device,))
    dropout_key = jax.random.fold_in(jax.random.fold_in(dropout_root, step), device)
    state, loss = train_step(state, images[idx], labels[idx], model, optimizer, dropout_key)
    return (state, step_epoch, perm), loss

  epoch = state.step // per_epoch
  carry = (state, epoch, _epoch_permutation(data_key, epoch, n))
  (state, _, _), losses = lax.scan(body, carry, None, length=num_steps)
  return state, losses.mean()


def eval_step(state: TrainState, images, labels, valid, model, chunk: int):
  """Loss and accuracy over this device's share of the test set (running stats).

  Returns the sums over valid examples, and the pre-activation of unit 0 of
  the last hidden layer per example (for the MLP), psum'd over devices.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def body(_, batch):
    x, y, v = batch
    logits, extras = model.apply(variables, _preprocess(x), train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y)
    tracked = extras.get("last_preactivation", jnp.zeros((x.shape[0], 1)))[:, 0]
    return None, (jnp.sum(jnp.where(v, loss, 0)), jnp.sum(v & correct), tracked)

  reshape = lambda a: a.reshape(-1, chunk, *a.shape[1:])
  _, (loss, correct, tracked) = lax.scan(body, None, (reshape(images), reshape(labels), reshape(valid)))
  sums = lax.psum({"loss": loss.sum(), "correct": correct.sum(), "count": valid.sum()}, AXIS)
  return sums, tracked.reshape(-1)


def sync_state(state: TrainState) -> TrainState:
  """Per-device BN: one set of running statistics on every device."""
  return state.replace(batch_stats=jaxbn.sync_batch_stats(state.batch_stats, AXIS))


# ---- host side ------------------------------------------------------------


def setup_devices(config: Config, coordinator=None, num_processes=None, process_id=None,
                  auto_detect=False):
  """Starts JAX (several processes if asked) and returns the local devices to use.

  Several processes: pass the coordinator, or `auto_detect` to let JAX find
  the cluster (SLURM, TPU pods, ...).
  """
  if config.devices:
    jax.config.update("jax_num_cpu_devices", config.devices)
  if auto_detect or coordinator or num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  devices = jax.local_devices()
  if config.devices:
    if len(devices) < config.devices:
      raise ValueError(f"devices: asked for {config.devices}, this process has {len(devices)}.")
    devices = devices[:config.devices]
  return devices


def _shard_test_set(images, labels, num_devices, chunk):
  """Pads the test set to whole chunks per device; `valid` marks real examples."""
  n = images.shape[0]
  per_device = -(-n // (num_devices * chunk)) * chunk
  total = per_device * num_devices
  pad = lambda a: np.concatenate([a, np.zeros((total - n, *a.shape[1:]), a.dtype)])
  valid = np.arange(total) < n
  shape = lambda a: a.reshape(num_devices, per_device, *a.shape[1:])
  return shape(pad(images)), shape(pad(labels)), shape(valid)


def _per_device(mesh, tree):
  """Host arrays with this process's devices on the leading axis -> pmap inputs."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def _replicate(mesh, tree, num_local):
  return _per_device(mesh, jax.tree.map(lambda a: np.broadcast_to(a, (num_local, *np.shape(a))), tree))


def _local(array) -> np.ndarray:
  """This process's devices' values, stacked."""
  return np.stack([np.asarray(s.data)[0] for s in array.addressable_shards])


def _first(array) -> np.ndarray:
  """The value on this process's first device (replicated values are equal)."""
  return np.asarray(array.addressable_shards[0].data)[0]


class _Metrics:
  """OUT/metrics.jsonl, one line per evaluation; on resume, cut to the checkpoint."""

  def __init__(self, path: Path, resume_step: int | None, enabled: bool):
    self.path, self.enabled = path, enabled
    if not enabled:
      return
    kept = []
    if resume_step is not None and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line and json.loads(line)["step"] <= resume_step]
    path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: Config, devices=None) -> dict:
  """Trains as configured; returns the last metrics record."""
  devices = devices or setup_devices(config)
  num_local = len(devices)
  num_devices = num_local * jax.process_count()
  global_batch = config.batch_size * num_devices
  primary = jax.process_index() == 0
  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)

  dataset = data_lib.load(config.dataset, data_dir=config.data_dir, idx_dir=config.idx_dir)
  if global_batch > dataset.train_images.shape[0]:
    raise ValueError(f"batch_size: {config.batch_size} x {num_devices} devices exceeds the training set.")
  model, optimizer = make_model(config), make_optimizer(config)
  state = create_train_state(config, model, dataset.train_images.shape[1:])

  checkpoints = ocp.CheckpointManager(
      (out / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  resume_step = None
  if config.resume and checkpoints.latest_step() is not None:
    resume_step = checkpoints.latest_step()
    state = checkpoints.restore(resume_step, args=ocp.args.StandardRestore(state))
  elif primary:
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
  metrics = _Metrics(out / "metrics.jsonl", resume_step, enabled=primary)

  mesh = jax.sharding.Mesh(np.array(devices if jax.process_count() == 1 else jax.devices()), (AXIS,))
  state = _replicate(mesh, state, num_local)
  train_images, train_labels = _replicate(mesh, (dataset.train_images, dataset.train_labels), num_local)
  chunk = 500
  test = _per_device(mesh, _shard_test_set(dataset.test_images, dataset.test_labels, num_local, chunk))

  # With several processes pmap spans every process's devices.
  pmap = functools.partial(jax.pmap, axis_name=AXIS,
                           devices=devices if jax.process_count() == 1 else None)
  evaluate = pmap(functools.partial(eval_step, model=model, chunk=chunk))
  synchronize = pmap(sync_state)
  chunk_fns = {}

  step = int(resume_step or 0)
  start_time, last = time.time(), None
  bar = tqdm(total=config.steps, initial=step, disable=not (config.progress if config.progress is not None
                                                            else sys.stderr.isatty()) or not primary)
  while step < config.steps:
    num_steps = min(config.eval_every - step % config.eval_every, config.steps - step)
    if num_steps not in chunk_fns:
      chunk_fns[num_steps] = pmap(
          functools.partial(train_chunk, num_steps=num_steps, model=model, optimizer=optimizer,
                            seed=config.seed, global_batch=global_batch),
          donate_argnums=(0,))
    t0 = time.time()
    state, train_loss = chunk_fns[num_steps](state, train_images, train_labels)
    train_loss = float(_first(train_loss))  # waits for the chunk
    steps_per_sec = num_steps / (time.time() - t0)  # training only, not the evaluation below
    step += num_steps
    if config.bn == "per-device":
      state = synchronize(state)
    sums, tracked = evaluate(state, *test)
    sums = jax.tree.map(lambda a: float(_first(a)), sums)
    record = {"step": step, "train_loss": train_loss, "test_loss": sums["loss"] / sums["count"],
              "test_accuracy": sums["correct"] / sums["count"],
              "wall_time": time.time() - start_time,
              "steps_per_sec": steps_per_sec}
    if config.model == "mlp":
      values = _local(tracked).reshape(-1)[_local(test[2]).reshape(-1)]
      record.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))})
    metrics.write(record)
    bar.update(num_steps)
    bar.set_postfix(acc=f"{record['test_accuracy']:.4f}", loss=f"{train_loss:.4f}")
    if step % config.checkpoint_every == 0 or step == config.steps:
      checkpoints.save(step, args=ocp.args.StandardSave(jax.tree.map(_first, state)))
    last = record
  bar.close()
  checkpoints.wait_until_finished()
  return last
