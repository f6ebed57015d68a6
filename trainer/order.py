"""Which example goes where: the batch of every step as a function of (seed, step, position).

Epoch e visits the training set in the order of a permutation that depends on
(seed, e) only; the global batch of step t is slice t mod (steps per epoch) of
it, and position p of that batch holds its p-th example. Every augmentation
draws from a key of (seed, step, p). Nothing depends on how the devices are
split over processes, on the input path, or on where a run was resumed.

The order is computed on the host for both input paths. The hash is written
once for NumPy (host) and jax.numpy (the device-resident path draws its
augmentation inside the jitted step): both give the same bits.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_GOLDEN = 0x9E3779B9
AUGMENT_STREAM = 1  # keys for augmentation draws are apart from the order's


def mix32(x, xp: Any = np):
  """A bijective avalanche hash of uint32 values (lowbias32, C. Wellons); wraps around."""
  if xp is np:
    with np.errstate(over="ignore"):  # NumPy scalars warn where arrays wrap silently
      return _mix32(x, xp)
  return _mix32(x, xp)


def _mix32(x, xp):
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * xp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def hash_key(*parts, xp: Any = np):
  """One uint32 per element of the broadcast parts, mixing them in order."""
  h = xp.asarray(_GOLDEN, dtype=xp.uint32)
  for part in parts:
    h = mix32(h ^ xp.asarray(part).astype(xp.uint32), xp)
  return h


@functools.lru_cache(maxsize=2)  # this epoch's and the next one's, in every process and worker
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the n training examples."""
  return np.argsort(hash_key(seed, epoch, np.arange(n, dtype=np.uint32)), kind="stable")


def steps_per_epoch(n: int, global_batch: int) -> int:
  """Full batches per epoch; the remainder of each epoch's order is skipped."""
  return n // global_batch


def example_indices(seed: int, step: int, positions: np.ndarray, n: int, global_batch: int) -> np.ndarray:
  """Training-set indices of `positions` of the global batch of `step`."""
  per_epoch = steps_per_epoch(n, global_batch)
  return epoch_permutation(seed, step // per_epoch, n)[(step % per_epoch) * global_batch + positions]
