"""The host loop: devices, data placement, evaluation records, checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

import jaxbn
from trainer import data as data_lib
from trainer import rundir, steps
from trainer.config import Config, per_device_statistics, statistics_batch
from trainer.parallel import Parallel
from trainer.state import create_train_state, make_model, make_optimizer, make_renorm_schedule

PERCENTILES = (15, 50, 85)
EVAL_CHUNK = 500  # test examples per device per evaluation step


def setup_devices(
  config: Config, coordinator=None, num_processes=None, process_id=None, auto_detect=False, timeout: int = 120
):
  """Starts JAX (several processes if asked) and returns this process's devices to use.

  Several processes: pass the coordinator, or `auto_detect` to let JAX find
  the cluster (SLURM, TPU pods, ...). A process that cannot reach the others
  within `timeout` seconds raises ConnectionError naming the address.
  """
  if config.devices:
    jax.config.update("jax_num_cpu_devices", config.devices)
  if auto_detect or coordinator or num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the auto-detected coordinator"
    if coordinator and process_id:
      _wait_for(coordinator, timeout, process_id)
    # JAX ends the process (a C++ abort, no Python exception) when the others
    # do not all arrive in time: say beforehand what it waits for, and keep
    # the abort's stack trace out of the way.
    log = Path(tempfile.gettempdir()) / f"jaxbn-distributed-{os.getpid()}.log"
    print(
      f"process {process_id}: waiting up to {timeout} s (--connect-timeout) for "
      f"{num_processes or 'all'} processes at {address}; JAX's own messages: {log}",
      file=sys.stderr,
      flush=True,
    )
    with _stderr_to(log):
      jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
      )
  devices = jax.local_devices()
  if config.devices:
    if len(devices) < config.devices:
      raise ValueError(f"devices: asked for {config.devices}, this process has {len(devices)}.")
    devices = devices[: config.devices]
  return devices


def _wait_for(address: str, timeout: int, process_id) -> None:
  """A non-coordinator process: the coordinator's port must open within `timeout` s."""
  host, port = address.rsplit(":", 1)
  deadline = time.time() + timeout
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=5).close()
      return
    except OSError:
      if time.time() > deadline:
        raise ConnectionError(
          f"process {process_id}: no coordinator at {address} within {timeout} s; start process 0 "
          f"with the same --coordinator, or raise --connect-timeout."
        ) from None
      time.sleep(0.5)


@contextlib.contextmanager
def _stderr_to(path: Path):
  """Sends file descriptor 2 (where C++ code writes) to `path` for a while."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "ab") as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _split_test_set(images, labels, num_devices, chunk):
  """Pads the test set to whole chunks per device; `valid` marks real examples.
  Every array gets a leading axis of one entry per device."""
  n = images.shape[0]
  per_device = -(-n // (num_devices * chunk)) * chunk
  total = per_device * num_devices
  pad = lambda a: np.concatenate([a, np.zeros((total - n, *a.shape[1:]), a.dtype)])
  valid = np.arange(total) < n
  shape = lambda a: a.reshape(num_devices, per_device, *a.shape[1:])
  return shape(pad(images)), shape(pad(labels)), shape(valid)


def population_batches(config: Config, images, num_devices: int):
  """Algorithm 2's training batches: `config.population_batches` disjoint
  batches of the size BN's statistics had in training, from a fixed sample of
  the training set (the same one at every evaluation)."""
  size = statistics_batch(config, num_devices)
  count = min(config.population_batches, images.shape[0] // size)
  order = np.random.default_rng(config.seed).permutation(images.shape[0])[: count * size]
  return np.asarray(steps.preprocess(images[order])).reshape(count, size, *images.shape[1:])


def with_population_statistics(state, model, batches):
  """The (portable) state with its running averages replaced by Algorithm 2's
  population statistics of its current weights."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return state.replace(batch_stats=jaxbn.population_stats(model, variables, batches, train=False))


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite: the run stops."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written."""


def train_and_evaluate(config: Config, devices=None) -> dict:
  """Trains as configured; returns the last metrics record.

  Raises `rundir.RunDirError` (before any work) when OUT holds another run,
  `NonFiniteLossError` when the loss stops being finite, `CheckpointError`
  when a checkpoint cannot be saved; the last good checkpoint stays in both.
  """
  rundir.check(config)
  devices = devices or setup_devices(config)
  all_devices = devices if jax.process_count() == 1 else jax.devices()
  num_devices = len(all_devices)
  global_batch = config.batch_size * num_devices
  primary = jax.process_index() == 0
  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)

  dataset = data_lib.load(config.dataset, data_dir=config.data_dir, idx_dir=config.idx_dir)
  if global_batch > dataset.train_images.shape[0]:
    raise ValueError(f"batch_size: {config.batch_size} x {num_devices} devices exceeds the training set.")
  model, optimizer = make_model(config, num_devices), make_optimizer(config)
  eval_model = make_model(config)  # reads the pooled running statistics
  renorm_schedule = make_renorm_schedule(config)
  state = create_train_state(config, dataset.train_images.shape[1:])

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
  metrics = rundir.Metrics(out / "metrics.jsonl", resume_step, enabled=primary)

  parallel = Parallel(config.parallel, all_devices, per_device_bn=per_device_statistics(config))
  state = parallel.put_state(state)
  train_images, train_labels = parallel.replicate((dataset.train_images, dataset.train_labels))
  test_host = _split_test_set(dataset.test_images, dataset.test_labels, num_devices, EVAL_CHUNK)
  test = parallel.shard(test_host)
  valid = test_host[2].reshape(-1)
  population = population_batches(config, dataset.train_images, num_devices) if config.population_batches else None

  step = int(resume_step or 0)
  # wall_time (seconds) continues across a resume
  start_time, last = time.time() - ((metrics.last or {}).get("wall_time") or 0.0), None
  show = config.progress if config.progress is not None else sys.stderr.isatty()
  bar = tqdm(total=config.steps, initial=step, disable=not show or not primary)
  while step < config.steps:
    num_steps = min(config.eval_every - step % config.eval_every, config.steps - step)
    chunk = parallel.train_chunk(
      state,
      num_steps,
      model=model,
      optimizer=optimizer,
      seed=config.seed,
      global_batch=global_batch,
      renorm_schedule=renorm_schedule,
    )
    t0 = time.time()
    state, train_loss = chunk(state, train_images, train_labels)
    train_loss = float(np.asarray(train_loss.addressable_shards[0].data).reshape(-1)[0])  # waits
    steps_per_sec = num_steps / (time.time() - t0)  # training only, not the evaluation below
    step += num_steps
    state = parallel.synchronize(state)
    sums, tracked = parallel.evaluate(state, *test, model=eval_model, chunk=EVAL_CHUNK)
    record = {
      "step": step,
      "train_loss": train_loss,
      "test_loss": sums["loss"] / sums["count"],
      "test_accuracy": sums["correct"] / sums["count"],
      "wall_time": time.time() - start_time,
      "steps_per_sec": steps_per_sec,
    }
    if population is not None:
      pop_state = with_population_statistics(parallel.portable_state(state), eval_model, population)
      pop_sums, _ = parallel.evaluate(parallel.put_state(pop_state), *test, model=eval_model, chunk=EVAL_CHUNK)
      record.update(
        test_loss_population=pop_sums["loss"] / pop_sums["count"],
        test_accuracy_population=pop_sums["correct"] / pop_sums["count"],
      )
    if config.model == "mlp":
      values = tracked[valid]
      record.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)})
    metrics.write(record)
    bar.update(num_steps)
    bar.set_postfix(acc=f"{record['test_accuracy']:.4f}", loss=f"{train_loss:.4f}")
    if not math.isfinite(train_loss):
      bar.close()
      kept = checkpoints.latest_step()
      raise NonFiniteLossError(
        f"step {step}: the training loss is {train_loss}; the run stopped "
        f"({'its checkpoint of step ' + str(kept) + ' is kept' if kept else 'no checkpoint was saved'}). "
        f"Try a lower --lr (now {config.lr}), BN (--bn sync or per-device), or a smaller --init-std."
      )
    if step % config.checkpoint_every == 0 or step == config.steps:
      try:
        checkpoints.save(step, args=ocp.args.StandardSave(parallel.portable_state(state)))
      except Exception as error:
        bar.close()
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        kept = checkpoints.latest_step()
        raise CheckpointError(
          f"step {step}: the checkpoint could not be saved under {out / 'checkpoints'} "
          f"({type(error).__name__}: {reason}); "
          f"{'the checkpoint of step ' + str(kept) + ' is kept' if kept else 'no earlier checkpoint exists'}."
          f" Free space or fix permissions, then run again with --resume."
        ) from error
    last = record
  bar.close()
  checkpoints.wait_until_finished()
  return last
