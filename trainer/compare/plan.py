"""A comparison of normalization batches: which train.py runs it is, and where each size runs.

The normalization batch n is the number of examples one BN statistic is computed over. With
D devices and a global batch G (per-device batch b = G / D), each size is placed as E4 does:

  n < b    per-device BN on the D devices, groups of n examples in each device's batch
  n = b    per-device BN on the D devices
  n > b    groups of n examples of the global batch, on one device (it holds all G)
  "sync"   synced BN: the whole global batch over the D devices

Everything here is pure (no JAX, no files), so the placement and the run list are tested alone.
"""

from __future__ import annotations

import dataclasses

SYNC = "sync"
MODES = {"BN": "bn", "Batch Renorm": "renorm", "FrozenBN final phase": "frozen"}  # mode -> run-name slug
REPAIRS = {"renorm": "Batch Renorm", "frozen": "FrozenBN final phase"}  # --repairs names
FROZEN_SHARE = 5  # the FrozenBN final phase: the last 1/5 of the steps
DEFAULT_POPULATION_SAMPLES = 10_000  # PreciseBN's training samples (Wu & Johnson: 10^3-10^4 suffice)


class PlanError(ValueError):
  """A sweep that cannot run: the message starts with the flag."""


def parse_sizes(text: str, flag: str = "--normalization-batch") -> list:
  """'2,8,sync' -> [2, 8, 'sync'] (sorted, no repeats)."""
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise PlanError(f"{flag}: expected a list of sizes and/or sync, e.g. 2,8,32,sync; got {text!r}")
  sizes = []
  for item in items:
    if item == SYNC:
      sizes.append(SYNC)
    elif item.isdigit() and int(item) > 0:
      sizes.append(int(item))
    else:
      raise PlanError(f"{flag}: expected positive integers or sync, got {item!r}")
  return sorted(set(sizes), key=order_key)


def parse_seeds(text: str) -> list[int]:
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items or not all(t.isdigit() for t in items):
    raise PlanError(f"--seeds: expected a list of non-negative integers, e.g. 0,1,2; got {text!r}")
  return sorted({int(t) for t in items})


def parse_repairs(text: str) -> list[str]:
  items = [t.strip() for t in text.split(",") if t.strip()]
  unknown = [t for t in items if t not in REPAIRS]
  if unknown:
    raise PlanError(f"--repairs: expected some of {', '.join(REPAIRS)}, got {', '.join(unknown)}")
  return [r for r in REPAIRS if r in items]


def order_key(size) -> float:
  """Sizes in order, synced BN last."""
  return float("inf") if size == SYNC else float(size)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One train.py run of the comparison."""

  size: int | str
  mode: str  # a key of MODES
  seed: int
  flags: dict  # train.py flags (Config field -> value) this run adds to the sweep's own

  @property
  def name(self) -> str:
    size = SYNC if self.size == SYNC else f"n{self.size}"
    return f"{MODES[self.mode]}-{size}-seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Sweep:
  sizes: list
  seeds: list[int]
  repairs: list[str] = dataclasses.field(default_factory=list)
  repair_sizes: list = dataclasses.field(default_factory=list)
  population_samples: int = DEFAULT_POPULATION_SAMPLES

  def check(self, global_batch: int, devices: int) -> None:
    """PlanError for a size that cannot be placed, or a repair that cannot run."""
    per_device = global_batch // devices
    for n in self.sizes:
      if n == SYNC:
        continue
      if n < per_device and per_device % n:
        raise PlanError(
          f"--normalization-batch: {n} does not divide the per-device batch of {per_device} "
          f"(global batch {global_batch} over {devices} devices)"
        )
      if n > per_device and (n > global_batch or global_batch % n):
        raise PlanError(f"--normalization-batch: {n} does not divide the global batch of {global_batch}")
    if self.repairs and not self.repair_sizes:
      raise PlanError("--repair-sizes: give the sizes to try the repairs at (e.g. 2,4)")
    if self.repair_sizes and not self.repairs:
      raise PlanError("--repairs: give the repairs to try at --repair-sizes (renorm, frozen)")
    missing = [str(n) for n in self.repair_sizes if n not in self.sizes]
    if missing:
      raise PlanError(f"--repair-sizes: {', '.join(missing)} not in --normalization-batch")
    if "renorm" in self.repairs and SYNC in self.repair_sizes:
      raise PlanError("--repair-sizes: Batch Renorm is per-device BN's repair; sync is not a size for it")
    if self.population_samples < 1:
      raise PlanError(f"--population-samples: expected a positive integer, got {self.population_samples}")

  def runs(self, global_batch: int, devices: int, steps: int) -> list[RunSpec]:
    """Every run, seed by seed (so a sweep stopped early has whole seeds)."""
    out = []
    for seed in self.seeds:
      for n in self.sizes:
        modes = ["BN"] + [REPAIRS[r] for r in self.repairs if n in self.repair_sizes]
        for mode in modes:
          flags = {**placement(n, global_batch, devices), "seed": seed, "eval_batch_stats": True}
          if mode == "Batch Renorm":
            flags["bn"] = "renorm"
          else:
            normalized = global_batch if n == SYNC else n
            flags["population_batches"] = max(1, self.population_samples // normalized)
            flags["population_estimator"] = "both"
          if mode == "FrozenBN final phase":
            flags["frozen_bn_steps"] = max(1, steps // FROZEN_SHARE)
          out.append(RunSpec(n, mode, seed, flags))
    return out


def placement(size, global_batch: int, devices: int) -> dict:
  """train.py flags that normalize over `size` examples (see the module docstring)."""
  per_device = global_batch // devices
  if size == SYNC:
    return {"bn": "sync", "devices": devices}
  if size <= per_device:
    return {"bn": "per-device", "devices": devices, **({"bn_group_size": size} if size < per_device else {})}
  return {"bn": "per-device", "devices": 1, **({"bn_group_size": size} if size < global_batch else {})}


def describe(size, global_batch: int, devices: int) -> str:
  """One line: where `size` runs."""
  per_device = global_batch // devices
  if size == SYNC:
    return f"synced BN: the global batch of {global_batch} over {devices} device(s)"
  if size < per_device:
    return f"per-device BN on {devices} devices, groups of {size} in each device's {per_device}"
  if size == per_device:
    return f"per-device BN on {devices} devices ({per_device} each)"
  if size < global_batch:
    return f"groups of {size} of the global batch of {global_batch}, on one device"
  return f"the whole global batch of {global_batch} on one device"
