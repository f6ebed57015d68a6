"""The host loop of a run: set up, restore, train step by step, evaluate, checkpoint."""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from trainer import cli, rundir, steps
from trainer import data as data_lib
from trainer.bn_modes import BN_MODES
from trainer.config import Config
from trainer.distributed import setup_devices
from trainer.evaluation import Evaluator
from trainer.input import DeviceFeed, Pixels, StreamFeed, local_rows, plan_batches
from trainer.parallel import make_parallel
from trainer.preemption import Preempted, StopSignals
from trainer.state import create_train_state, make_model, make_optimizer

__all__ = ["CheckpointError", "NonFiniteLossError", "Preempted", "setup_devices", "train_and_evaluate"]


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite: the run stops."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written."""


class ArraySource:
  """A split held in memory, read like a TFDS data source."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitems__(self, indices):
    return [{"image": self.images[i], "label": int(self.labels[i])} for i in indices]


def _floats(losses: list) -> list[float]:
  """Per-step losses as floats: replicated scalars (pmap: the first device's), or floats already."""
  return [
    value if isinstance(value, float) else float(np.asarray(value.addressable_shards[0].data).reshape(-1)[0])
    for value in losses
  ]


def open_data_of(config: Config):
  """The run's dataset, prepared first if it is not yet (DatasetError in one line otherwise)."""
  return data_lib.open_dataset(
    None if config.image_folder else config.dataset,
    image_folder=config.image_folder,
    data_dir=config.data_dir,
    idx_dir=config.idx_dir,
  )


def train_and_evaluate(config: Config, devices=None) -> dict:
  """Trains as configured; returns the last metrics record.

  Raises `rundir.RunDirError` (before any work) when OUT holds another run,
  `ConfigError` when the flags do not fit the data or the devices,
  `NonFiniteLossError` when the loss stops being finite, `CheckpointError`
  when a checkpoint cannot be saved; the last good checkpoint stays in both.
  """
  rundir.check(config)
  devices = devices or setup_devices(config)
  all_devices = devices if jax.process_count() == 1 else jax.devices()
  num_devices = len(all_devices)
  global_batch = config.global_batch(num_devices)
  primary = jax.process_index() == 0
  out = Path(config.out)

  open_data = functools.partial(open_data_of, config)

  if jax.process_count() == 1:
    data = open_data()
  else:  # process 0 prepares a shared data dir; the others open it after (or prepare their own)
    data = open_data() if primary else None
    multihost_utils.sync_global_devices("jaxbn: the data is prepared")
    data = data or open_data()
  batches, path = plan_batches(config, data, global_batch)
  pixels = Pixels(*data.channel_stats()) if config.normalize == "standardize" else steps.UNIT
  train_source, test_source = data.train, data.test
  if path == "device":
    train_images, train_labels = data_lib.read_split(data.train)
    train_source = ArraySource(train_images, train_labels)
    test_source = ArraySource(*data_lib.read_split(data.test))

  groups = BN_MODES[config.bn].groups(config.bn_group_size, global_batch, num_devices)
  statistics_batch = global_batch // groups if groups else global_batch  # examples per BN statistic in training
  model, optimizer = make_model(config, data.num_classes, num_devices, global_batch), make_optimizer(config)
  eval_model = make_model(config, data.num_classes)  # reads the pooled running statistics
  state = create_train_state(config, batches.image_shape, num_classes=data.num_classes)
  out.mkdir(parents=True, exist_ok=True)
  checkpoints = ocp.CheckpointManager(
    (out / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
  )
  resume_step = None
  if config.resume and checkpoints.latest_step() is not None:
    resume_step = checkpoints.latest_step()
    if resume_step >= config.steps:  # finished: nothing to train, nothing to rewrite
      return rundir.Metrics(out / "metrics.jsonl", resume_step, enabled=False).last
    state = checkpoints.restore(resume_step, args=ocp.args.StandardRestore(state))
  if primary:
    rundir.write_config(config)  # on resume only --steps can have changed
    rundir.write_data_info(out, data.num_classes, batches.image_shape, pixels)
  metrics = rundir.Metrics(out / "metrics.jsonl", resume_step, enabled=primary)

  parallel = make_parallel(config.parallel, all_devices, stat_rows=groups)
  pending = rundir.read_pending(out, step=resume_step) if resume_step is not None else None
  state = parallel.put_state(state, rows=pending.rows if pending else None)
  step = int(resume_step or 0)
  rows = local_rows(global_batch, all_devices, jax.process_index())
  if path == "device":
    feed = DeviceFeed(parallel, train_images, train_labels, batches, rows)
  else:
    feed = StreamFeed(parallel, train_source, batches, rows, step, config.steps, config.input_workers)
  step_kwargs = dict(
    model=model,
    optimizer=optimizer,
    batches=batches,
    bn_schedule=BN_MODES[config.bn].schedule(config.steps),
    pixels=pixels,
    label_smoothing=config.label_smoothing,
  )
  per_device = global_batch // num_devices
  local_devices = range(rows.start // per_device, rows.stop // per_device)
  evaluator = Evaluator(
    config, parallel, eval_model, batches, train_source, test_source, pixels, statistics_batch, local_devices
  )

  def frozen(step):
    return bool(config.frozen_bn_steps) and step >= config.steps - config.frozen_bn_steps

  # wall_time (seconds) continues across a resume
  start_time, last = time.time() - ((metrics.last or {}).get("wall_time") or 0.0), None
  show = config.progress if config.progress is not None else sys.stderr.isatty()
  bar = tqdm(total=config.steps, initial=step, disable=not show or not primary)
  losses: list = pending.losses if pending else []
  # Steps dispatched ahead of the device. On CPU host devices none: several
  # collective programs in flight can deadlock XLA:CPU's in-process rendezvous.
  in_flight = 0 if all_devices[0].platform == "cpu" else 2
  period_start = time.time()
  if frozen(step):  # resumed in the frozen phase
    state = parallel.synchronize(state)
  program = parallel.train_step(state, resident=feed.path == "device", frozen_bn=frozen(step), **step_kwargs)
  stop = StopSignals(jax.process_count())
  try:
    while step < config.steps:
      if frozen(step) and step == config.steps - config.frozen_bn_steps:  # the phase begins: pooled, then fixed
        state = parallel.synchronize(state)
        program = parallel.train_step(state, resident=feed.path == "device", frozen_bn=True, **step_kwargs)
      state, loss = program(state, *feed.inputs(step))  # dispatched: the host runs ahead...
      losses.append(loss)
      if len(losses) > in_flight:  # ...by a bounded number of steps
        jax.block_until_ready(losses[-1 - in_flight])
      step += 1
      bar.update(1)
      if step % config.eval_every == 0 or step == config.steps:
        state = parallel.synchronize(state)
        last = evaluator.record(step, state, _floats(losses), time.time() - period_start)
        last["wall_time"] = time.time() - start_time
        losses = []
        metrics.write(last)
        bar.set_postfix(acc=f"{last['test_accuracy']:.4f}", loss=f"{last['train_loss']:.4f}")
        if not math.isfinite(last["train_loss"]):
          kept = checkpoints.latest_step()
          raise NonFiniteLossError(
            f"step {step}: the training loss is {last['train_loss']}; the run stopped "
            f"({'its checkpoint of step ' + str(kept) + ' is kept' if kept else 'no checkpoint was saved'}). "
            f"Try a lower --lr (now {config.lr}), BN (--bn sync or per-device), or a smaller --init-std."
          )
        if step % config.checkpoint_every == 0 or step == config.steps:
          _save(checkpoints, step, parallel.portable_state(state), out)
        period_start = time.time()
      if stop.should_stop(step) and step < config.steps:
        # Mid-period: per-device BN's rows are kept as they are (an uninterrupted
        # run pools them only at the next evaluation), beside the losses so far.
        rows = parallel.row_stats(state) if groups else None
        state = parallel.synchronize(state)
        _save(checkpoints, step, parallel.portable_state(state), out)
        if primary:
          rundir.write_pending(out, step, _floats(losses), rows)
        checkpoints.wait_until_finished()
        raise Preempted(step, stop.received or "a signal")
  finally:
    stop.close()
    bar.close()
    feed.close()
  checkpoints.wait_until_finished()
  assert last is not None
  return last


def _save(checkpoints, step: int, state, out: Path) -> None:
  try:
    checkpoints.save(step, args=ocp.args.StandardSave(state))
  except Exception as error:
    kept = checkpoints.latest_step()
    raise CheckpointError(
      f"step {step}: the checkpoint could not be saved under {out / 'checkpoints'} "
      f"({cli.first_line(error)}); "
      f"{'the checkpoint of step ' + str(kept) + ' is kept' if kept else 'no earlier checkpoint exists'}."
      f" Free space or fix permissions, then run again with --resume."
    ) from error
