"""The input pipeline: which images each step trains on, and how they reach the devices.

`Batches` is the run's plan: the global batch of step t and each example's
augmentation are a function of (seed, t, position in the global batch) only
(`trainer.data.order`), so every layout of devices over processes, every input
path and every resume sees the same run.

Two paths feed the same training step:

  device  (`DeviceFeed`) the training split lives on every device; each step
          gathers its batch there from the indices the host computes. For small
          datasets of one image shape (MNIST, CIFAR), with none or crop-flip.
  stream  (`StreamFeed`) each process reads only its own devices' rows of the
          global batch from the TFDS data source through grain (worker processes
          decode and augment ahead of the step), and the rows become one global
          array (`Parallel.put_batch`).

Evaluation reads the test split on the host, each process its own rows, in
batches padded with a `valid` mask (`eval_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer import augment, order
from trainer.augment import as_hwc
from trainer.errors import ConfigError
from trainer.models import MODELS

if TYPE_CHECKING:
  from trainer.data import ImageData

DEVICE_LIMIT_BYTES = 2 << 30  # the training split lives on the devices up to this size (--input auto)
SMALL_IMAGES = 64  # up to this side: CIFAR's crop-flip; above: the ImageNet random-resized crop


class Pixels:
  """uint8 pixels -> float32 (x - mean) / std per channel; 'unit' is mean 0, std 255 (x / 255)."""

  def __init__(self, mean, std):
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def __call__(self, images):
    return (images.astype(np.float32) - self.mean) / self.std


@dataclasses.dataclass(frozen=True)
class Batches:
  """The batches of a run: order, augmentation and image size."""

  seed: int
  n: int  # training examples
  global_batch: int
  augment: str  # none | crop-flip | random-resized-crop
  image_size: int
  channels: int
  hflip: bool

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  @property
  def steps_per_epoch(self) -> int:
    return order.steps_per_epoch(self.n, self.global_batch)

  def host_batch(self, source, step: int, rows: range) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of the global batch of `step`, read from `source` and augmented."""
    positions = np.arange(rows.start, rows.stop, dtype=np.uint32)
    records = augment.read(source, self.indices(step, rows).tolist())
    labels = np.asarray([r["label"] for r in records], np.int32)
    if self.augment == "random-resized-crop":
      images = np.stack(
        [
          augment.random_resized_crop(
            as_hwc(r["image"]), self.image_size, augment.host_rng(self.seed, step, int(p)), self.hflip
          )
          for r, p in zip(records, positions, strict=True)
        ]
      )
      return images, labels
    images = np.stack([augment.resize(as_hwc(r["image"]), self.image_size) for r in records])
    if self.augment == "crop-flip":
      images = augment.crop_flip_numpy(images, augment.crop_flip_draws(self.seed, step, positions, self.hflip))
    return images, labels

  def indices(self, step: int, rows: range) -> np.ndarray:
    """Training-set indices of rows `rows` of the global batch of `step`."""
    positions = np.arange(rows.start, rows.stop, dtype=np.uint32)
    return order.example_indices(self.seed, step, positions, self.n, self.global_batch).astype(np.int32)

  def device_batch(self, images, labels, step, positions, index):
    """The rows `positions` (their training-set `index`) of the global batch of
    `step`, inside a jitted step, from the training split on the device."""
    import jax.numpy as jnp

    batch, batch_labels = images[index], labels[index]
    if self.augment == "crop-flip":
      draws = augment.crop_flip_draws(self.seed, step, positions.astype(jnp.uint32), self.hflip, xp=jnp)
      batch = augment.crop_flip_jax(batch, draws)
    return batch, batch_labels

  def eval_image(self, image: np.ndarray) -> np.ndarray:
    image = as_hwc(image)
    if self.augment == "random-resized-crop":
      return augment.center_crop(image, self.image_size)
    return augment.resize(image, self.image_size)


def plan_batches(config, data: ImageData, global_batch: int) -> tuple[Batches, str]:
  """The run's Batches and its input path, from the flags and the data; ConfigError if they clash."""
  native = data.image_shape
  size = config.image_size or (native[0] if native and native[0] == native[1] else None)
  if size is None:
    raise ConfigError(
      f"--image-size: {data.name} has images of {'varying' if native is None else 'non-square'} size; "
      f"give the side the model should see (e.g. 224)"
    )
  choice = config.augment
  if choice in (None, "auto"):
    choice = MODELS[config.model].augment or ("crop-flip" if size <= SMALL_IMAGES else "random-resized-crop")
  if len(data.train) < global_batch:
    raise ConfigError(
      f"--batch-size: a global batch of {global_batch} exceeds the {len(data.train)} training examples of {data.name}"
    )
  batches = Batches(config.seed, len(data.train), global_batch, choice, size, data.channels, data.hflip)
  fits = native is not None and native[:2] == (size, size) and choice != "random-resized-crop"
  path = config.input
  if path == "auto":
    fits = fits and len(data.train) * size * size * data.channels <= DEVICE_LIMIT_BYTES
    path = "device" if fits else "stream"
  elif path == "device" and not fits:
    raise ConfigError(
      f"--input device: needs a training split of one image shape, trained at that size without "
      f"random-resized-crop ({data.name}: images {native or 'of varying size'}, --image-size {size}, "
      f"--augment {choice}); use --input stream"
    )
  return batches, path


def local_rows(global_batch: int, devices, process_index: int) -> range:
  """This process's rows of the global batch: its devices' consecutive shares."""
  per_device = global_batch // len(devices)
  mine = [i for i, d in enumerate(devices) if d.process_index == process_index]
  if mine != list(range(mine[0], mine[0] + len(mine))):
    raise ValueError("devices: this process's devices are not consecutive in the mesh")
  return range(mine[0] * per_device, (mine[-1] + 1) * per_device)


# ---- the two training paths -------------------------------------------------


class DeviceFeed:
  """The training split on every device; each step gathers its batch there from
  the example indices the host computes."""

  path = "device"

  def __init__(self, parallel, train_images: np.ndarray, train_labels: np.ndarray, batches: Batches, rows: range):
    self.parallel, self.batches, self.rows = parallel, batches, rows
    self.arrays = parallel.replicate((train_images, train_labels))

  def inputs(self, step: int):
    return (*self.arrays, self.parallel.put_indices(self.batches, step, self.rows))

  def close(self):
    pass


def _load_step(source, batches: Batches, rows: range, step: int):
  return batches.host_batch(source, step, rows)


def _quiet_worker(index: int, count: int) -> None:
  """A grain worker logs no TFDS notices ("OpenCV is not installed", at every first decode)."""
  del index, count
  import logging

  logging.getLogger("absl").setLevel(logging.ERROR)


def default_workers() -> int:
  return max(0, min(8, (os.cpu_count() or 1) - 1))


class StreamFeed:
  """This process's rows of every step's batch, read and augmented by grain ahead of the step."""

  path = "stream"

  def __init__(self, parallel, source, batches: Batches, rows: range, start: int, stop: int, workers: int | None):
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; train.py parses its own
      flags.FLAGS.mark_as_parsed()
    self.parallel = parallel
    self.next_step = start
    workers = default_workers() if workers is None else workers
    # A few steps past the end: an exhausted multiprocess iterator leaks its
    # shared-memory buffers, a closed one does not.
    dataset = grain.MapDataset.range(start, stop + 8).map(functools.partial(_load_step, source, batches, rows))
    # A few steps ahead: enough to hide reading, little memory for large images.
    iterable: Any = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 2, prefetch_buffer_size=2))
    if workers:
      options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
      iterable = iterable.mp_prefetch(options, worker_init_fn=_quiet_worker)
    self._iterator: Iterator = iter(iterable)

  def inputs(self, step: int):
    assert step == self.next_step, (step, self.next_step)
    images, labels = next(self._iterator)
    self.next_step += 1
    return self.parallel.put_batch(images), self.parallel.put_batch(labels)

  def close(self):
    """Stops the workers and frees their buffers (before interpreter shutdown)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
    self._iterator = iter(())
    gc.collect()


# ---- evaluation ---------------------------------------------------------------


def eval_batches(source, batches: Batches, num_devices: int, local_devices: range, per_device: int):
  """The test split in batches of `per_device` examples per device: this process's
  devices' shares (local_devices, per_device, ...) with a `valid` mask for the padding."""
  n = len(source)
  step = num_devices * per_device
  for start in range(0, n, step):
    shape = (len(local_devices), per_device)
    images = np.zeros((*shape, *batches.image_shape), np.uint8)
    labels = np.zeros(shape, np.int32)
    valid = np.zeros(shape, bool)
    for slot, device in enumerate(local_devices):
      first = start + device * per_device
      picks = list(range(first, min(first + per_device, n)))
      if not picks:
        continue
      records = augment.read(source, picks)
      images[slot, : len(picks)] = np.stack([batches.eval_image(r["image"]) for r in records])
      labels[slot, : len(picks)] = [r["label"] for r in records]
      valid[slot, : len(picks)] = True
    yield images, labels, valid


def eval_chunk(image_shape) -> int:
  """Test examples per device per evaluation call: 500 for 28x28 grey, fewer for larger images."""
  return int(np.clip((1 << 19) // int(np.prod(image_shape)), 16, 500))
