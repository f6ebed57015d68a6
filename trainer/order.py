"""Which example goes where: the batch of every step as a function of (seed, step, position).

Epoch e visits the training set in the order of a permutation that depends on
(seed, e) only; the global batch of step t is slice t mod (steps per epoch) of
it, and position p of that batch holds its p-th example. Every augmentation
draws from a key of (seed, step, p). Nothing depends on how the devices are
split over processes, on the input path, or on where a run was resumed.

The hash is written once for NumPy (the streamed input, on the host) and
jax.numpy (the device-resident input, inside the jitted step): both give the
same bits, so both paths see the same batches.
"""

from __future__ import annotations

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


def epoch_permutation(seed: int, epoch, n: int, xp: Any = np):
  """The order in which epoch `epoch` visits the n training examples."""
  keys = hash_key(seed, epoch, xp.arange(n, dtype=xp.uint32), xp=xp)
  return xp.argsort(keys, stable=True) if xp is not np else np.argsort(keys, kind="stable")


def steps_per_epoch(n: int, global_batch: int) -> int:
  """Full batches per epoch; the remainder of each epoch's order is skipped."""
  return n // global_batch


def example_indices(seed: int, step: int, positions: np.ndarray, n: int, global_batch: int, cache: dict | None = None):
  """Training-set indices of `positions` of the global batch of `step` (host)."""
  per_epoch = steps_per_epoch(n, global_batch)
  epoch = step // per_epoch
  if cache is None or cache.get("epoch") != epoch:
    permutation = epoch_permutation(seed, epoch, n)
    if cache is None:
      return permutation[(step % per_epoch) * global_batch + positions]
    cache.update(epoch=epoch, permutation=permutation)
  return cache["permutation"][(step % per_epoch) * global_batch + positions]
