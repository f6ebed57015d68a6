"""Datasets beyond MNIST: a folder of one's own images, any TFDS name (mocked), and their errors.

No network: TFDS's mock_data fakes a named dataset, image folders are written here,
and 'offline' is a socket that refuses to connect.
"""

import dataclasses
import json
import socket
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import trainer
from trainer import data
from trainer.loop import train_and_evaluate


def write_folder(
  root: Path, classes=("cat", "dog", "emu"), per_class=(6, 3), size=(20, 24), seed=0, other_size=None
) -> Path:
  """DIR/{train,test}/CLASS/*.png|jpg: class k's images are brighter with k, so a model can learn them;
  every fourth image `other_size` when given."""
  rng = np.random.default_rng(seed)
  for split, count in zip(("train", "test"), per_class, strict=True):
    for k, name in enumerate(classes):
      directory = root / split / name
      directory.mkdir(parents=True)
      for i in range(count):
        shape = other_size if other_size and i % 4 == 1 else size
        pixels = np.clip(60 * k + rng.normal(40, 20, (*shape, 3)), 0, 255).astype(np.uint8)
        if i % 3 == 2:  # some grey images: stored as RGB
          Image.fromarray(pixels[..., 0]).save(directory / f"{i}.png")
        else:
          Image.fromarray(pixels).save(directory / f"{i}.{'jpg' if i % 2 else 'png'}")
  return root


def test_an_image_folder_becomes_a_dataset(tmp_path):
  root = write_folder(tmp_path / "images")
  (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # skipped, not an error
  ds = data.open_dataset(image_folder=str(root), data_dir=str(tmp_path / "tfds"))
  assert (len(ds.train), len(ds.test), ds.num_classes, ds.channels) == (18, 9, 3, 3)
  assert ds.image_shape == (20, 24, 3)  # every image has this size
  records = ds.train.__getitems__(list(range(18)))
  # Classes sorted by name: cat 0, dog 1, emu 2; each class's images keep their brightness.
  by_label = {k: [r["image"].mean() for r in records if r["label"] == k] for k in range(3)}
  assert [len(v) for v in by_label.values()] == [6, 6, 6]
  assert max(by_label[0]) < min(by_label[2])
  assert all(r["image"].shape == (20, 24, 3) for r in records)
  mean, std = ds.channel_stats()
  pixels = np.concatenate([r["image"].reshape(-1, 3) for r in records]).astype(np.float64)
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)


def test_a_changed_folder_is_prepared_again(tmp_path):
  root = write_folder(tmp_path / "images")
  first = data.open_dataset(image_folder=str(root), data_dir=str(tmp_path / "tfds"))
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "train" / "cat" / "new.png")
  second = data.open_dataset(image_folder=str(root), data_dir=str(tmp_path / "tfds"))
  assert (len(first.train), len(second.train)) == (18, 19)


@pytest.mark.parametrize(
  "damage,message",
  [
    (lambda r: __import__("shutil").rmtree(r / "test"), "has no test/ folder"),
    (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "the class folder .*dog is empty"),
    (
      lambda r: (r / "test" / "emu").rename(r / "test" / "owl"),
      r"classes of train/ and test/ differ \(only in train/: emu; only in test/: owl\)",
    ),
    (
      lambda r: (r / "train" / "cat" / "notes.txt").write_text("not an image"),
      r"train/cat/notes.txt is not a readable image",
    ),
    (
      lambda r: (r / "train" / "dog" / "2.png").write_bytes(b"\x89PNG broken"),
      r"train/dog/2.png is not a readable image",
    ),
  ],
)
def test_a_bad_image_folder_is_one_line_naming_what(tmp_path, damage, message):
  root = write_folder(tmp_path / "images")
  damage(root)
  with pytest.raises(data.DatasetError, match=message) as error:
    data.open_dataset(image_folder=str(root), data_dir=str(tmp_path / "tfds"))
  assert "\n" not in str(error.value)


def test_a_missing_image_folder(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match=r"--image-folder: .*nowhere is not a directory"):
    data.open_dataset(image_folder=str(tmp_path / "nowhere"), data_dir=str(tmp_path / "tfds"))


def test_a_named_tfds_dataset_through_its_data_source():
  with tfds.testing.mock_data(num_examples=12):
    ds = data.open_dataset("cifar100", data_dir="/unused")
    assert (ds.image_shape, ds.num_classes, len(ds.train)) == ((32, 32, 3), 100, 12)
    record = ds.test[3]
    assert record["image"].shape == (32, 32, 3) and 0 <= record["label"] < 100


def test_a_dataset_without_image_and_label_is_refused():
  with (
    tfds.testing.mock_data(num_examples=4),
    pytest.raises(data.DatasetError, match="not an image-classification dataset"),
  ):
    data.open_dataset("imdb_reviews", data_dir="/unused")


def test_offline_an_unprepared_dataset_fails_within_seconds(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise OSError("Network is unreachable")

  monkeypatch.setattr(socket, "create_connection", offline)
  start = time.time()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.open_dataset("cifar10", data_dir=str(tmp_path))
  assert time.time() - start < 10
  message = str(error.value)
  assert "\n" not in message and "--dataset cifar10: not prepared under" in message
  assert "tfds build cifar10 --file_format=array_record" in message and "--image-folder" in message


@pytest.mark.slow
def test_train_on_a_mocked_named_dataset_every_style(tmp_path):
  """ResNet-20 on (mocked) CIFAR-10, streamed, in every parallel style: the same run."""
  assert jax.device_count() == 8
  base = trainer.Config(
    dataset="cifar10",
    model="resnet20",
    bn="per-device",
    devices=2,
    global_batch_size=8,
    steps=4,
    eval_every=2,
    input_workers=0,
    progress=False,
  )
  metrics = {}
  with tfds.testing.mock_data(num_examples=24):
    for style in trainer.PARALLEL_STYLES:
      config = dataclasses.replace(base, parallel=style, out=str(tmp_path / style))
      last = train_and_evaluate(config, devices=jax.devices()[:2])
      metrics[style] = [json.loads(line) for line in (tmp_path / style / "metrics.jsonl").read_text().splitlines()]
      assert last["step"] == 4 and np.isfinite(last["test_loss"])
  info = json.loads((tmp_path / "jit" / "data.json").read_text())
  assert info["num_classes"] == 10 and info["image_shape"] == [32, 32, 3]
  for style in ("shard_map", "pmap"):
    for a, b in zip(metrics["jit"], metrics[style], strict=True):
      for key in ("train_loss", "test_loss", "test_accuracy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (style, key)


def test_a_folder_of_varying_sizes_needs_an_image_size_and_large_images_stream(tmp_path):
  from trainer.config import Config, ConfigError
  from trainer.input import plan_batches

  root = write_folder(tmp_path / "images", other_size=(24, 20))
  ds = data.open_dataset(image_folder=str(root), data_dir=str(tmp_path / "tfds"))
  assert ds.image_shape is None  # no one size: images are resized to --image-size
  with pytest.raises(ConfigError, match=r"--image-size: .* varying size; give the side"):
    plan_batches(Config(model="resnet20", image_folder="x"), ds, 8)
  small, path = plan_batches(Config(model="resnet20", image_folder="x", image_size=24), ds, 8)
  assert (small.augment, small.image_shape, path) == ("crop-flip", (24, 24, 3), "stream")
  large, path = plan_batches(Config(model="resnet50", image_folder="x"), ds, 8)  # its recipe: 224 px
  assert (large.augment, large.image_size, path) == ("random-resized-crop", 224, "stream")
  with pytest.raises(ConfigError, match="--input device: needs a training split of one image shape"):
    plan_batches(Config(model="resnet20", image_folder="x", image_size=24, input="device"), ds, 8)
  with pytest.raises(ConfigError, match="--batch-size: a global batch of 64 exceeds the 18 training examples"):
    plan_batches(Config(model="resnet20", image_folder="x", image_size=24), ds, 64)


def test_a_folder_of_one_image_size_needs_no_image_size(tmp_path):
  from trainer.config import Config, ConfigError
  from trainer.input import plan_batches

  square = write_folder(tmp_path / "square", size=(16, 16))
  ds = data.open_dataset(image_folder=str(square), data_dir=str(tmp_path / "tfds"))
  assert ds.image_shape == (16, 16, 3)
  batches, path = plan_batches(Config(model="resnet20", image_folder="x"), ds, 8)
  assert (batches.augment, batches.image_shape, path) == ("crop-flip", (16, 16, 3), "device")
  wide = write_folder(tmp_path / "wide", size=(16, 20))  # one size, but not square: the side is still asked
  ds = data.open_dataset(image_folder=str(wide), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ConfigError, match=r"--image-size: .* non-square size"):
    plan_batches(Config(model="resnet20", image_folder="x"), ds, 8)
