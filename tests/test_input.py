"""The input pipeline's definitions: batch order, augmentation, the host and device paths agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import augment, order
from trainer.input import Batches, eval_batches, local_rows


class _Source:
  """A split in memory, read like a TFDS data source."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitems__(self, indices):
    return [{"image": self.images[i], "label": int(self.labels[i])} for i in indices]


def _data(n=100, size=12, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, channels)).astype(np.uint8), rng.integers(0, 10, n).astype(np.int32)


def test_each_epoch_visits_every_example_once_in_its_own_order():
  orders = [order.epoch_permutation(7, epoch, 1000) for epoch in range(3)]
  for permutation in orders:
    assert sorted(permutation.tolist()) == list(range(1000))
  assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
  assert not np.array_equal(orders[0], order.epoch_permutation(8, 0, 1000))  # the seed matters
  np.testing.assert_array_equal(orders[1], order.epoch_permutation(7, 1, 1000))  # and nothing else


def test_numpy_and_jax_draw_the_same_augmentation():
  positions = np.arange(64, dtype=np.uint32)
  host = augment.crop_flip_draws(5, 17, positions, True)
  device = jax.jit(lambda p: augment.crop_flip_draws(5, jnp.int32(17), p, True, xp=jnp))(jnp.asarray(positions))
  for a, b in zip(host, device, strict=True):
    np.testing.assert_array_equal(a, b)
  images, _ = _data(64)
  np.testing.assert_array_equal(augment.crop_flip_numpy(images, host), jax.jit(augment.crop_flip_jax)(images, device))


def test_crop_flip_is_a_crop_of_the_zero_padded_image_or_its_mirror():
  """Oracle: search every offset and both mirrors for the one that gives the output."""
  images, _ = _data(40, size=8)
  draws = augment.crop_flip_draws(0, 3, np.arange(40, dtype=np.uint32), True)
  out = augment.crop_flip_numpy(images, draws)
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  found_flips = set()
  for i in range(40):
    matches = [
      (dy, dx, flip)
      for dy in range(9)
      for dx in range(9)
      for flip in (0, 1)
      if np.array_equal(
        out[i], (padded[i, dy : dy + 8, dx : dx + 8])[:, ::-1] if flip else padded[i, dy : dy + 8, dx : dx + 8]
      )
    ]
    assert matches, i
    found_flips.update(m[2] for m in matches)
  assert found_flips == {0, 1}
  # Without hflip (digits), nothing is mirrored.
  assert not augment.crop_flip_draws(0, 3, np.arange(40, dtype=np.uint32), False)[2].any()


def test_a_batchs_rows_do_not_depend_on_how_they_are_split():
  """The batch of a step is a function of (seed, step, position): any split of
  the rows over processes reads the same examples with the same augmentation."""
  images, labels = _data(100)
  source = _Source(images, labels)
  batches = Batches(seed=1, n=100, global_batch=16, augment="crop-flip", image_size=12, channels=3, hflip=True)
  for step in (0, 5, 6, 13):  # 6 steps per epoch: the second epoch's order too
    whole = batches.host_batch(source, step, range(16))
    halves = [batches.host_batch(source, step, rows) for rows in (range(0, 4), range(4, 16))]
    np.testing.assert_array_equal(whole[0], np.concatenate([h[0] for h in halves]))
    np.testing.assert_array_equal(whole[1], np.concatenate([h[1] for h in halves]))


def test_host_and_device_paths_give_the_same_batches():
  images, labels = _data(100)
  batches = Batches(seed=2, n=100, global_batch=16, augment="crop-flip", image_size=12, channels=3, hflip=True)

  @jax.jit
  def device(step, index):
    return batches.device_batch(jnp.asarray(images), jnp.asarray(labels), step, jnp.arange(16), index)

  for step in (0, 7, 12):
    host = batches.host_batch(_Source(images, labels), step, range(16))
    on_device = device(jnp.int32(step), batches.indices(step, range(16)))
    np.testing.assert_array_equal(host[0], on_device[0])
    np.testing.assert_array_equal(host[1], on_device[1])


def test_an_epoch_visits_each_example_once():
  images, labels = _data(100)
  images[:, 0, 0, 0] = np.arange(100)  # tag every example
  batches = Batches(seed=0, n=100, global_batch=10, augment="none", image_size=12, channels=3, hflip=False)
  seen = np.concatenate([batches.host_batch(_Source(images, labels), s, range(10))[0][:, 0, 0, 0] for s in range(10)])
  assert sorted(seen.tolist()) == list(range(100))


def test_random_resized_crop_and_centre_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (60, 90, 3)).astype(np.uint8)
  crops = [augment.random_resized_crop(image, 32, np.random.default_rng(s), True) for s in range(20)]
  assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
  assert len({c.tobytes() for c in crops}) == 20  # different draws, different crops
  # Centre crop: a vertical stripe in the middle of a wide image stays in the middle.
  wide = np.zeros((40, 80, 1), np.uint8)
  wide[:, 38:42] = 255
  centre = augment.center_crop(wide, 16)
  assert centre.shape == (16, 16, 1)
  columns = centre[..., 0].mean(0)
  assert columns[7:9].min() > 100 and columns[:4].max() < 10 and columns[-4:].max() < 10


def test_evaluation_batches_cover_the_test_split_once():
  images, labels = _data(37)
  batches = Batches(seed=0, n=37, global_batch=8, augment="crop-flip", image_size=12, channels=3, hflip=True)
  seen = []
  for process in (range(0, 2), range(2, 4)):  # two processes of two devices each
    for x, y, valid in eval_batches(_Source(images, labels), batches, 4, process, 3):
      assert x.shape == (2, 3, 12, 12, 3)
      seen += [(img.tobytes(), int(lab)) for img, lab in zip(x[valid], y[valid], strict=True)]
  assert sorted(seen) == sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels, strict=True))


def test_a_process_reads_its_own_devices_rows():
  class Device:
    def __init__(self, process_index):
      self.process_index = process_index

  devices = [Device(p) for p in (0, 0, 1, 1)]
  assert local_rows(32, devices, 0) == range(0, 16) and local_rows(32, devices, 1) == range(16, 32)
  with pytest.raises(ValueError, match="not consecutive"):
    local_rows(32, [Device(p) for p in (0, 1, 0, 1)], 0)
