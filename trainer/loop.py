"""The host loop of a run, in phases: set up -> restore -> train -> (evaluate, save).

`train_and_evaluate` runs them in order; each phase is a short function over
the `Run` that `set_up` builds. The FrozenBN final phase is which program runs
at step t (`Run.program_at`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from trainer import data as data_lib
from trainer import pretrained, rundir, steps
from trainer.bn_modes import BN_MODES
from trainer.checkpoints import CheckpointError, Checkpoints
from trainer.config import Config
from trainer.distributed import setup_devices
from trainer.evaluation import Evaluator
from trainer.input import DeviceFeed, Pixels, StreamFeed, local_rows, plan_batches
from trainer.parallel import Parallel, make_parallel
from trainer.preemption import Preempted, StopSignals
from trainer.state import TrainState, create_train_state, initialize_from_torch, make_model, make_optimizer

__all__ = ["CheckpointError", "NonFiniteLossError", "Preempted", "setup_devices", "train_and_evaluate"]


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite: the run stops."""


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


def _open_data(config: Config):
  """The dataset on every process: process 0 prepares a shared data dir, the others
  open it after (or prepare their own)."""
  if jax.process_count() == 1:
    return open_data_of(config)
  data = open_data_of(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("jaxbn: the data is prepared")
  return data or open_data_of(config)


@dataclasses.dataclass
class Run:
  """What the phases of one run share (built by `set_up`)."""

  config: Config
  out: Path
  primary: bool  # this process writes the run's files
  num_classes: int
  parallel: Parallel
  open_feed: Any  # start step -> the training input (DeviceFeed or StreamFeed)
  evaluator: Evaluator
  checkpoints: Checkpoints
  step_kwargs: dict  # the training step's model, optimizer, batches, schedule, pixels
  write_data_info: Any  # () -> None: OUT/data.json

  def frozen(self, step: int) -> bool:
    """Whether `step` is in the FrozenBN final phase (--frozen-bn-steps)."""
    frozen_steps = self.config.frozen_bn_steps
    return bool(frozen_steps) and step >= self.config.steps - frozen_steps

  def program_at(self, state, step: int, resident: bool):
    """The training program of `step`: BN's, or FrozenBN's in the final phase."""
    return self.parallel.step_program(state, resident=resident, frozen_bn=self.frozen(step), **self.step_kwargs)


def set_up(config: Config, devices) -> tuple[Run, TrainState]:
  """The run's data, models, placement, input and evaluation, and its fresh portable state."""
  all_devices = devices if jax.process_count() == 1 else jax.devices()
  num_devices = len(all_devices)
  global_batch = config.global_batch(num_devices)
  data = _open_data(config)
  batches, path = plan_batches(config, data, global_batch)
  pixels = _pixels(config.normalize, data)
  train_source, test_source = data.train, data.test
  if path == "device":
    train_images, train_labels = data_lib.read_split(data.train)
    train_source = ArraySource(train_images, train_labels)
    test_source = ArraySource(*data_lib.read_split(data.test))

  micro_batch = config.micro_batch(num_devices)  # the global batch without --accumulate-steps
  groups = config.normalization_groups(num_devices)
  statistics_batch = micro_batch // groups if groups else micro_batch  # examples per BN statistic in training
  parallel = make_parallel(config.parallel, all_devices, stat_rows=groups)
  rows = local_rows(global_batch, all_devices, jax.process_index())

  def open_feed(start: int):
    if path == "device":
      return DeviceFeed(parallel, train_images, train_labels, batches, rows)
    return StreamFeed(parallel, train_source, batches, rows, start, config.steps, config.input_workers)

  per_device = global_batch // num_devices
  local_devices = range(rows.start // per_device, rows.stop // per_device)
  eval_model = make_model(config, data.num_classes)  # reads the pooled running statistics
  evaluator = Evaluator(
    config, parallel, eval_model, batches, train_source, test_source, pixels, statistics_batch, local_devices
  )
  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)
  run = Run(
    config=config,
    out=out,
    primary=jax.process_index() == 0,
    num_classes=data.num_classes,
    parallel=parallel,
    open_feed=open_feed,
    evaluator=evaluator,
    checkpoints=Checkpoints(out),
    step_kwargs=dict(
      model=make_model(config, data.num_classes, num_devices),
      optimizer=make_optimizer(config),
      batches=batches,
      bn_schedule=BN_MODES[config.bn].schedule(config.steps),
      pixels=pixels,
      label_smoothing=config.label_smoothing,
      accumulation=steps.Accumulation(config.accumulate_steps, config.bn_momentum)
      if config.accumulate_steps > 1
      else None,
      weight_ema=config.weight_ema or None,
    ),
    write_data_info=functools.partial(rundir.write_data_info, out, data.num_classes, batches.image_shape, pixels),
  )
  return run, create_train_state(config, batches.image_shape, num_classes=data.num_classes)


# torchvision's and timm's ImageNet models expect pixels standardized with these (0-1 scale)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pixels(normalize: str, data) -> Pixels:
  """--normalize: x / 255, the training split's per-channel statistics, or ImageNet's (their
  mean over the colours for images of one channel)."""
  if normalize == "standardize":
    return Pixels(*data.channel_stats())
  if normalize == "imagenet":
    mean, std = (np.asarray(s) * 255 for s in (IMAGENET_MEAN, IMAGENET_STD))
    if data.channels != 3:
      mean, std = np.full(data.channels, mean.mean()), np.full(data.channels, std.mean())
    return Pixels(mean, std)
  return steps.UNIT


@dataclasses.dataclass
class Start:
  """Where training starts: the placed state, its step, and the losses of the period so far."""

  state: Any
  step: int
  losses: list
  metrics: rundir.Metrics


def restore(run: Run, fresh: TrainState) -> Start | dict:
  """The placed state to train from: the last checkpoint with --resume (and the
  per-device rows and losses a preemption left), else `fresh`. A finished run:
  its last metrics record instead (nothing to train, nothing rewritten)."""
  config, checkpoints = run.config, run.checkpoints
  resume_step = checkpoints.latest_step() if config.resume else None
  state = fresh
  if resume_step is not None:
    if resume_step >= config.steps:
      return rundir.Metrics(run.out / "metrics.jsonl", resume_step, enabled=False).last
    state = checkpoints.restore(resume_step, fresh)
  elif config.init_from:
    state, notes = initialize_from_torch(config, fresh, run.num_classes)
    for note in notes if run.primary else ():
      print(note, file=sys.stderr, flush=True)
  if run.primary:
    rundir.write_config(config)  # on resume only --steps can have changed
    run.write_data_info()
  metrics = rundir.Metrics(run.out / "metrics.jsonl", resume_step, enabled=run.primary)
  pending = rundir.read_pending(run.out, step=resume_step) if resume_step is not None else None
  state = run.parallel.put_state(state, rows=pending.rows if pending else None)
  step = int(resume_step or 0)
  if run.frozen(step):  # resumed in the frozen phase: its statistics are the pooled ones
    state = run.parallel.synchronize(state)
  return Start(state, step, pending.losses if pending else [], metrics)


def train_and_evaluate(config: Config, devices=None) -> dict:
  """Trains as configured; returns the last metrics record.

  Raises `rundir.RunDirError` (before any work) when OUT holds another run,
  `ConfigError` when the flags do not fit the data or the devices,
  `NonFiniteLossError` when the loss stops being finite, `CheckpointError`
  when a checkpoint cannot be saved; the last good checkpoint stays in both.
  """
  rundir.check(config)
  if config.init_from and rundir.last_checkpoint(Path(config.out)) is None:  # a fresh run will read it
    pretrained.check_file(config.init_from)
  run, fresh = set_up(config, devices or setup_devices(config))
  start = restore(run, fresh)
  if isinstance(start, dict):
    return start
  return train(run, start)


def train(run: Run, start: Start) -> dict:
  """Steps from `start` to --steps, evaluating and saving every period; the last record."""
  config, parallel = run.config, run.parallel
  state, step, losses, metrics = start.state, start.step, start.losses, start.metrics
  # wall_time (seconds) continues across a resume
  start_time, last = time.time() - ((metrics.last or {}).get("wall_time") or 0.0), None
  show = config.progress if config.progress is not None else sys.stderr.isatty()
  bar = tqdm(total=config.steps, initial=step, disable=not show or not run.primary)
  feed = run.open_feed(step)
  # Steps dispatched ahead of the device. On CPU host devices none: several
  # collective programs in flight can deadlock XLA:CPU's in-process rendezvous.
  in_flight = 0 if parallel.devices[0].platform == "cpu" else 2
  period_start = time.time()
  program = run.program_at(state, step, feed.path == "device")
  stop = StopSignals(jax.process_count())
  try:
    while step < config.steps:
      if run.frozen(step) and not run.frozen(step - 1):  # the phase begins: pooled, then fixed
        state = parallel.synchronize(state)
        program = run.program_at(state, step, feed.path == "device")
      state, loss = program(state, *feed.inputs(step))  # dispatched: the host runs ahead...
      losses.append(loss)
      if len(losses) > in_flight:  # ...by a bounded number of steps
        jax.block_until_ready(losses[-1 - in_flight])
      step += 1
      bar.update(1)
      if step % config.eval_every == 0 or step == config.steps:
        state, last = evaluate_and_save(run, state, step, _floats(losses), time.time() - period_start)
        last["wall_time"] = time.time() - start_time
        metrics.write(last)
        losses, period_start = [], time.time()
        bar.set_postfix(acc=f"{last['test_accuracy']:.4f}", loss=f"{last['train_loss']:.4f}")
        _stop_if_not_finite(run, step, last)
        if step % config.checkpoint_every == 0 or step == config.steps:
          run.checkpoints.save(step, parallel.portable_state(state))
      if stop.should_stop(step) and step < config.steps:
        save_and_stop(run, state, step, losses, stop.received or "a signal")
  finally:
    stop.close()
    bar.close()
    feed.close()
  run.checkpoints.wait_until_finished()
  assert last is not None
  return last


def evaluate_and_save(run: Run, state, step: int, losses: list[float], period_seconds: float):
  """The state with pooled running statistics, and the evaluation record of `step`."""
  state = run.parallel.synchronize(state)
  return state, run.evaluator.record(step, state, losses, period_seconds)


def _stop_if_not_finite(run: Run, step: int, record: dict) -> None:
  if math.isfinite(record["train_loss"]):
    return
  kept = run.checkpoints.latest_step()
  raise NonFiniteLossError(
    f"step {step}: the training loss is {record['train_loss']}; the run stopped "
    f"({'its checkpoint of step ' + str(kept) + ' is kept' if kept else 'no checkpoint was saved'}). "
    f"Try a lower --lr (now {run.config.lr}), BN (--bn sync or per-device), or a smaller --init-std."
  )


def save_and_stop(run: Run, state, step: int, losses: list, signal_name: str):
  """A stop signal mid-period: checkpoint, and keep per-device BN's rows as they are
  (an uninterrupted run pools them only at the next evaluation) beside the losses so
  far; then raise Preempted."""
  rows = run.parallel.row_stats(state) if run.parallel.per_device_bn else None
  state = run.parallel.synchronize(state)
  run.checkpoints.save(step, run.parallel.portable_state(state))
  if run.primary:
    rundir.write_pending(run.out, step, _floats(losses), rows)
  run.checkpoints.wait_until_finished()
  raise Preempted(step, signal_name)
