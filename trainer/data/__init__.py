"""Image-classification data by name or folder, through tensorflow-datasets.

  mnist, fashion_mnist   their IDX files (`trainer.data.idx`): prepared data, `--idx-dir`,
                         Debian's dataset-fashion-mnist, or the official download
  any other TFDS name    an image-classification dataset (features `image`, `label`),
                         prepared under the data dir as array_record
  --image-folder DIR     one's own images, DIR/train/CLASS/* and DIR/test/CLASS/*
                         (`trainer.data.folder`), prepared once the same way

Prepared data is read through TFDS's data source (random access, records
decoded to NumPy): training needs no TensorFlow. `open_dataset` returns an
`ImageData`; `load` reads a small one whole into memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import io
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from trainer import cli
from trainer.augment import as_hwc, read
from trainer.data import folder, idx
from trainer.data.errors import DatasetError, DatasetNotFoundError, reachable
from trainer.data.idx import read_idx

__all__ = [
  "DATASETS",
  "Dataset",
  "DatasetError",
  "DatasetNotFoundError",
  "DatasetSpec",
  "ImageData",
  "load",
  "open_dataset",
  "read_idx",
]

STATS_SAMPLE = 10_000  # training images the per-channel mean/std are computed over (at most)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How a named dataset differs from a plain TFDS image-classification one."""

  builder: Any = None  # (data_dir, idx_dir, **kwargs) -> a prepared TFDS builder; None: tfds.builder(name)
  hflip: bool = True  # is a mirrored image the same class? (not for digits)
  test_split: str | None = None  # None: "test", or "validation" where there is no test split


# One entry per dataset that needs one; any other TFDS name works as a plain one.
DATASETS = {
  "mnist": DatasetSpec(builder=functools.partial(idx.prepare, "mnist"), hflip=False),
  "fashion_mnist": DatasetSpec(builder=functools.partial(idx.prepare, "fashion_mnist")),
  "svhn_cropped": DatasetSpec(hflip=False),
}


@dataclasses.dataclass
class ImageData:
  """A dataset's two splits as random-access sources, and what training needs to know of it.

  `train[i]` / `test[i]` are records {"image": uint8 (H, W) or (H, W, C), "label": int}.
  `image_shape` is (H, W, C) when every image has it (then the data can live on
  the devices), else None. `stats_path`: where the per-channel statistics are cached.
  """

  name: str
  train: Any
  test: Any
  num_classes: int
  class_names: list[str]
  channels: int
  image_shape: tuple[int, int, int] | None
  hflip: bool
  stats_path: Path

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the training images (0-255 scale),
    over at most STATS_SAMPLE of them spread evenly over the split; cached."""
    if self.stats_path.exists():
      cached = json.loads(self.stats_path.read_text())
      return np.asarray(cached["mean"]), np.asarray(cached["std"])
    n = len(self.train)
    picks = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).astype(np.int64))
    total = np.zeros(self.channels)
    squares = np.zeros(self.channels)
    count = 0
    for start in range(0, len(picks), 1000):
      for record in read(self.train, picks[start : start + 1000].tolist()):
        pixels = as_hwc(record["image"]).reshape(-1, self.channels).astype(np.float64)
        total += pixels.sum(0)
        squares += np.square(pixels).sum(0)
        count += pixels.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0))
    std = np.where(std > 0, std, 1.0)  # a constant channel: only shift it
    with contextlib.suppress(OSError):  # a read-only data dir: compute again next time
      self.stats_path.write_text(
        json.dumps({"mean": mean.tolist(), "std": std.tolist(), "images": len(picks)}, indent=1) + "\n"
      )
    return mean, std


def open_dataset(
  name: str | None = None,
  *,
  image_folder: str | None = None,
  data_dir: str | None = "data",
  idx_dir: str | None = None,
  quiet: bool = True,
  **kwargs,
) -> ImageData:
  """Prepares the dataset (once) and opens its splits; DatasetError in one line otherwise."""
  with _quiet() if quiet else contextlib.nullcontext():
    if image_folder is not None:
      builder = folder.ImageFolder(root=image_folder, data_dir=data_dir, file_format="array_record")
      label = f"--image-folder {image_folder}"
      _prepare(builder, label)
      spec = DatasetSpec()
    else:
      assert name is not None
      spec = DATASETS.get(name, DatasetSpec())
      label = f"--dataset {name}"
      if idx_dir is not None and spec.builder is None:
        raise DatasetError(f"--idx-dir: only for mnist and fashion_mnist (IDX files), not {name}.")
      if spec.builder is not None:
        builder = spec.builder(data_dir, idx_dir, **kwargs)
      else:
        builder = _tfds_builder(name, data_dir)
        _prepare(builder, label)
    return _open(builder, label, spec)


def _tfds_builder(name: str, data_dir: str | None):
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(
      name, sorted({*DATASETS, *tfds.list_builders(with_community_datasets=False)}), n=1, cutoff=0.8
    )
    hint = f"did you mean {close[0]}? " if close else ""
    raise DatasetNotFoundError(
      f"--dataset: TFDS knows no dataset {name!r} ({hint}see tfds.list_builders()); "
      f"for your own images use --image-folder DIR."
    ) from None
  except (ModuleNotFoundError, ImportError) as error:
    raise DatasetError(f"--dataset {name}: its TFDS builder needs {error.name or error} to load.") from None


def _prepare(builder, label: str) -> None:
  """download_and_prepare, failing within seconds offline and in one line otherwise."""
  if (Path(builder.data_dir) / "dataset_info.json").exists():
    return
  try:
    with _downloads_fail_fast(builder, label):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except DatasetError:
    raise
  except ModuleNotFoundError as error:
    raise DatasetError(
      f"{label}: preparing it needs {error.name} (`pip install {error.name}`), once; training then reads the "
      f"prepared array_record files under {builder.data_dir} without it."
    ) from None
  except Exception as error:  # manual downloads missing, corrupt archives, ...
    raise DatasetError(f"{label}: could not be prepared under {builder.data_dir} ({cli.first_line(error)}).") from None


@contextlib.contextmanager
def _downloads_fail_fast(builder, label: str):
  """Offline, TFDS retries each download for minutes: probe every host first."""
  manager = tfds.download.DownloadManager

  def probed(method):
    def download(self, url_or_urls, *args, **kwargs):
      for url in _urls(url_or_urls):
        try:
          reachable(url)
        except OSError as error:
          raise DatasetNotFoundError(
            f"{label}: not prepared under {Path(builder.data_dir).parent.parent}, and its download from {url} "
            f"failed ({type(error).__name__}: {error}). Prepare it once where there is network "
            f"(`tfds build {builder.name} --file_format=array_record --data_dir=DIR`) and pass --data-dir DIR, "
            f"or train on your own images with --image-folder DIR."
          ) from None
      return method(self, url_or_urls, *args, **kwargs)

    return download

  originals = {name: getattr(manager, name) for name in ("download", "download_and_extract")}
  try:
    for name, method in originals.items():
      setattr(manager, name, probed(method))
    yield
  finally:
    for name, method in originals.items():
      setattr(manager, name, method)


def _urls(tree) -> list[str]:
  if isinstance(tree, str):
    return [tree]
  if isinstance(tree, dict):
    tree = list(tree.values())
  if isinstance(tree, list | tuple):
    return [u for item in tree for u in _urls(item)]
  url = getattr(tree, "url", None)  # tfds.download.Resource
  return [url] if isinstance(url, str) else []


def _open(builder, label: str, spec: DatasetSpec) -> ImageData:
  info = builder.info
  features = info.features
  if "image" not in features or "label" not in features:
    raise DatasetError(
      f"{label}: not an image-classification dataset (its features are {', '.join(features)}; "
      f"expected 'image' and 'label')."
    )
  splits = list(info.splits)
  test_split = spec.test_split or ("test" if "test" in splits or not splits else "validation")
  for split in ("train", test_split):
    if splits and split not in splits:
      raise DatasetError(f"{label}: has no {split!r} split (it has {', '.join(splits)}).")
  shape = tuple(features["image"].shape)
  channels = 1 if len(shape) == 2 else shape[-1]
  fixed = None if None in shape else (shape[0], shape[1], channels)
  return ImageData(
    name=label,
    train=builder.as_data_source(split="train"),
    test=builder.as_data_source(split=test_split),
    num_classes=features["label"].num_classes,
    class_names=list(features["label"].names),
    channels=channels,
    image_shape=fixed,
    hflip=spec.hflip,
    stats_path=Path(builder.data_dir) / "jaxbn_channel_stats.json",
  )


@contextlib.contextmanager
def _quiet():
  """No TFDS progress bars, log lines or stdout chatter."""
  tfds.disable_progress_bar()
  logging.getLogger("absl").setLevel(logging.ERROR)  # e.g. "OpenCV is not installed", at every first decode
  with contextlib.redirect_stdout(io.StringIO()):
    yield


# ---- small datasets in memory ---------------------------------------------


class Dataset(NamedTuple):
  """A whole dataset in host memory: uint8 images (N, H, W, C), int32 labels."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


def read_split(source) -> tuple[np.ndarray, np.ndarray]:
  """Every record of a split whose images share one shape."""
  records = read(source, range(len(source)))
  images = np.stack([as_hwc(r["image"]) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int32)
  return images, labels


def load(name: str, data_dir: str | None = "data", idx_dir: str | None = None, **kwargs) -> Dataset:
  """A dataset of one image shape, prepared if needed and read whole."""
  data = open_dataset(name, data_dir=data_dir, idx_dir=idx_dir, **kwargs)
  return Dataset(*read_split(data.train), *read_split(data.test), num_classes=data.num_classes)
