"""MNIST and Fashion-MNIST from their IDX files, as TFDS builders (no TensorFlow).

The builders read the four IDX files of a dataset, from the first of:

1. an already prepared TFDS data dir (prepared data is reused);
2. a local directory of IDX files (`idx_dir`, or for Fashion-MNIST Debian's
   `dataset-fashion-mnist` package at /usr/share/datasets/fashion-mnist);
3. a download from the dataset's official location, checked against SHA-256.

Data prepared from an `idx_dir` records the SHA-256 of its files, so another
`idx_dir` rebuilds it instead of being shadowed by it (`prepare`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from trainer.data.errors import DatasetError, DatasetNotFoundError, reachable

__all__ = ["BUILDERS", "SOURCES", "prepare", "read_idx"]

_IDX_DTYPES = {
  0x08: np.uint8,
  0x09: np.int8,
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a dataset comes from and what it holds."""

  url_base: str
  sha256: dict[str, str]  # file name (.gz) -> SHA-256 of the download
  class_names: tuple[str, ...]
  local_dir: str | None = None  # a system-wide copy, if a package provides one


SOURCES = {
  "mnist": Source(
    url_base="https://storage.googleapis.com/cvdf-datasets/mnist/",
    sha256={
      "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
      "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
      "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
      "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    class_names=tuple(str(i) for i in range(10)),
  ),
  "fashion_mnist": Source(
    url_base="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    sha256={
      "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
      "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
      "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
      "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    class_names=(
      "T-shirt/top",
      "Trouser",
      "Pullover",
      "Dress",
      "Coat",
      "Sandal",
      "Shirt",
      "Sneaker",
      "Bag",
      "Ankle boot",
    ),
    local_dir="/usr/share/datasets/fashion-mnist",
  ),
}


# ---- IDX ---------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (plain or gzip): magic 0x0000TTNN, NN big-endian dims."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as error:  # corrupt or truncated gzip, unreadable file
    raise DatasetError(f"{path}: cannot be read ({type(error).__name__}: {error}).") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DatasetError(f"{path}: not an IDX file (bad magic number).")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise DatasetError(f"{path}: unknown IDX element type 0x{type_code:02x}.")
  header = 4 + 4 * ndim
  shape = struct.unpack(f">{ndim}I", data[4:header])
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise DatasetError(f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(data)}.")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
  for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
    if (directory / name).is_file():
      return directory / name
  return None


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


# ---- TFDS builders --------------------------------------------------------


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder over the four IDX files of an MNIST-format dataset."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE: Source

  def __init__(
    self, *, idx_dir: str | None = None, url_base: str | None = None, sha256: dict[str, str] | None = None, **kwargs
  ):
    self._idx_dir = idx_dir
    self._url_base = url_base or self.SOURCE.url_base
    self._checksums = sha256 or self.SOURCE.sha256
    super().__init__(**kwargs)
    # Where it is prepared; while preparing, TFDS's data_dir is a temporary "incomplete.*" one.
    self._prepared_dir = self.data_dir
    # A pickled copy (grain's workers) is rebuilt with these.
    self._original_state.update(idx_dir=idx_dir, url_base=url_base, sha256=sha256)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"{self.name} from its IDX files (28x28 grayscale, 10 classes).",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=list(self.SOURCE.class_names)),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def local_idx_dir(self) -> Path | None:
    """The IDX directory to read, or None to download."""
    if self._idx_dir and not Path(self._idx_dir).is_dir():
      raise DatasetNotFoundError(f"--idx-dir: {self._idx_dir} is not a directory.")
    for directory in (self._idx_dir, self.SOURCE.local_dir):
      if directory and all(_find_idx(Path(directory), s) for pair in _FILES.values() for s in pair):
        return Path(directory)
    if self._idx_dir:
      missing = [s for pair in _FILES.values() for s in pair if not _find_idx(Path(self._idx_dir), s)]
      raise DatasetNotFoundError(f"idx_dir: {self._idx_dir} lacks the IDX files {missing} (.gz or plain).")
    return None

  def _split_generators(self, dl_manager):
    directory = self.local_idx_dir()
    if directory is not None:
      paths = {split: tuple(_find_idx(directory, s) for s in stems) for split, stems in _FILES.items()}
    else:
      urls = {stem: self._url_base + stem + ".gz" for pair in _FILES.values() for stem in pair}
      try:
        reachable(self._url_base)  # fail in seconds offline, not after TFDS's retries
        files = dl_manager.download(urls)
      except Exception as error:  # no network, server down, ...
        raise DatasetNotFoundError(self._how_to_get(error)) from error
      for stem, path in files.items():
        expected, actual = self._checksums[stem + ".gz"], _sha256(Path(path))
        if expected != actual:
          raise DatasetError(f"{urls[stem]}: SHA-256 {actual} does not match the expected {expected}.")
      paths = {split: tuple(Path(files[s]) for s in stems) for split, stems in _FILES.items()}
    return {split: self._generate_examples(*pair) for split, pair in paths.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
      raise DatasetError(
        f"{images_path}, {labels_path}: expected (N, 28, 28) images and (N,) labels, "
        f"got {images.shape} and {labels.shape}."
      )
    classes = len(self.SOURCE.class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
      raise DatasetError(
        f"{labels_path}: labels must be 0..{classes - 1}, found {int(labels.min())}..{int(labels.max())}."
      )
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image, "label": int(label)}

  def _how_to_get(self, error) -> str:
    local = (
      f" install Debian's dataset-fashion-mnist (files at {self.SOURCE.local_dir}), or" if self.SOURCE.local_dir else ""
    )
    return (
      f"--dataset {self.name}: not prepared under {self._prepared_dir}, no IDX files given, and the download "
      f"from {self._url_base} failed ({type(error).__name__}: {error}). To get it:{local} pass "
      f"--idx-dir DIR with the four IDX files (train-images-idx3-ubyte[.gz], ...), or run once "
      f"with network access."
    )


class Mnist(_IdxBuilder, skip_registration=True):
  SOURCE = SOURCES["mnist"]


class FashionMnist(_IdxBuilder, skip_registration=True):
  SOURCE = SOURCES["fashion_mnist"]


BUILDERS = {"mnist": Mnist, "fashion_mnist": FashionMnist}


SOURCE_RECORD = "jaxbn_source.json"  # beside the prepared data: what it was built from


def _idx_checksums(directory: Path) -> dict[str, str]:
  return {stem: _sha256(path) for pair in _FILES.values() for stem in pair if (path := _find_idx(directory, stem))}


def prepare(name: str, data_dir: str | None, idx_dir: str | None = None, **kwargs) -> _IdxBuilder:
  """The prepared builder of `name` (prepared now if it is not yet).

  Data prepared before records the SHA-256 of the IDX files it was built
  from; a given `idx_dir` with other files rebuilds it.
  """
  b = BUILDERS[name](data_dir=data_dir, file_format="array_record", idx_dir=idx_dir, **kwargs)
  record = Path(b.data_dir) / SOURCE_RECORD
  wanted = None
  if idx_dir is not None:
    directory = b.local_idx_dir()  # raises for a missing directory or files
    assert directory is not None
    wanted = _idx_checksums(directory)
    prepared = Path(b.data_dir) / "dataset_info.json"
    if prepared.exists() and (not record.exists() or json.loads(record.read_text()) != wanted):
      shutil.rmtree(b.data_dir)  # built from other files: rebuild from these
      b = BUILDERS[name](data_dir=data_dir, file_format="array_record", idx_dir=idx_dir, **kwargs)
  b.download_and_prepare()
  if wanted is not None and not record.exists():
    record.write_text(json.dumps(wanted, indent=2) + "\n")
  return b
