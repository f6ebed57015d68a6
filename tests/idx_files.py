"""Small generated IDX datasets for tests (never the network)."""

import gzip
import struct
from pathlib import Path

import numpy as np

STEMS = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
  """IDX encoding, written out from the format's description (unsigned bytes)."""
  assert array.dtype == np.uint8
  return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_dataset(n_train=120, n_test=30, seed=0):
  """Images whose mean brightness encodes the label, so a model can learn them."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    base = (labels.astype(np.float64) * 25)[:, None, None]
    images = np.clip(base + rng.normal(0, 10, (n, 28, 28)), 0, 255).astype(np.uint8)
    out[split] = (images, labels)
  return out


def write_dataset(directory: Path, dataset, gz=True) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  for split, (images, labels) in dataset.items():
    for stem, array in zip(STEMS[split], (images, labels), strict=True):
      data = idx_bytes(array)
      if gz:
        (directory / (stem + ".gz")).write_bytes(gzip.compress(data))
      else:
        (directory / stem).write_bytes(data)
  return directory
