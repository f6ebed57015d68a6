"""Random PyTorch-layout ResNet weights that NumPy alone can remake, for the torchvision fixtures.

`tests/fixtures/torchvision/make.py` (run once where torch and torchvision are
installed) fills torchvision's models with these weights and records what they
compute; the tests remake the same weights without torch and compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "torchvision"
IMAGE_SHAPE = (4, 3, 64, 64)  # the fixture's input, NCHW as PyTorch takes it


def random_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
  """A ResNet state dict of the given names and shapes: He-scaled kernels, BN affines and
  running statistics away from their initial values (so a wrong mapping shows)."""
  rng = np.random.RandomState(seed)  # the legacy generator: its stream never changes
  tensors = {}
  for name, shape in shapes.items():
    kind = name.rsplit(".", 1)[-1]
    if kind == "weight" and len(shape) > 1:  # convolution or linear
      value = rng.standard_normal(shape) * np.sqrt(1.0 / np.prod(shape[1:]))
    elif kind == "weight":  # BN scale
      value = rng.uniform(0.5, 1.5, shape)
    elif kind in ("bias", "running_mean"):
      value = rng.standard_normal(shape) * 0.1
    elif kind == "running_var":
      value = rng.uniform(0.5, 2.0, shape)
    else:
      raise ValueError(f"{name}: unexpected tensor kind {kind}")
    tensors[name] = value.astype(np.float32)
  return tensors


def fixture_images(seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).standard_normal(IMAGE_SHAPE).astype(np.float32)


def read_fixture(arch: str) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
  """(state-dict names -> shapes, the recorded outputs) of one fixture."""
  shapes = json.loads((FIXTURES / f"{arch}.json").read_text())
  with np.load(FIXTURES / f"{arch}.npz") as outputs:
    return shapes, dict(outputs)
