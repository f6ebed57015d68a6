"""The BN modes of train.py, one registry entry each.

A mode says which jaxbn layer normalizes and over which examples; `norm` turns
it into the layer factory a model is built with, for one parallel style:

  none        no normalization (the paper's baseline)
  per-device  each device normalizes its own batch. jit: `batch_groups` with one
              group per device (each device's shard is one group, no collective);
              shard_map and pmap: no axis_name. Running statistics: one row per
              device, pooled (`jaxbn.sync_batch_stats`) for evaluation and checkpoints.
  sync        the statistics of the whole global batch. jit: a plain reduction over
              the batch-sharded array; shard_map and pmap: axis_name over the devices.
  renorm      Batch Renorm (Ioffe 2017) per device, correcting toward the running
              statistics pooled over the devices.

Adding a mode is one entry.
"""

from __future__ import annotations

import dataclasses
import functools

import jaxbn

AXIS = "batch"  # the device axis of every parallel style


@dataclasses.dataclass(frozen=True)
class BNMode:
  layer: type | None  # the jaxbn Linen module; None: no normalization
  per_device: bool  # statistics of each device's examples, running statistics one row per device
  summary: str

  @property
  def has_population_statistics(self) -> bool:
    """Algorithm 2 re-estimates what this mode normalizes with (renorm trains on corrected ones)."""
    return self.layer is jaxbn.BatchNorm

  def groups(self, group_size: int | None, global_batch: int, num_devices: int) -> int | None:
    """The normalization groups of the global batch: one per device, or of
    `group_size` examples (`--bn-group-size`), each device holding whole groups;
    None for modes that normalize over the global batch."""
    if not self.per_device:
      return None
    if group_size is None:
      return num_devices
    groups, rest = divmod(global_batch, group_size)
    if rest or groups % num_devices:
      from trainer.config import ConfigError

      raise ConfigError(
        f"--bn-group-size: {group_size} must split the global batch of {global_batch} into groups that the "
        f"{num_devices} devices hold whole (a divisor of the per-device batch {global_batch // num_devices})"
      )
    return groups

  def norm(self, momentum: float, style: str, groups: int | None = None, placed: bool = True):
    """The layer factory for models run by `style` (`groups`: see `groups`);
    `placed=False`: the portable model (one set of statistics, no axis)."""
    if self.layer is None:
      return None
    kwargs: dict = {"momentum": momentum}
    if placed:
      local = style != "jit"  # shard_map, pmap: the step runs per device over AXIS
      if self.per_device:
        kwargs["batch_groups"] = groups
        if self.layer is jaxbn.BatchRenorm and local:  # each device holds its own rows
          kwargs["stats_axis_name"] = AXIS
      elif local:
        kwargs["axis_name"] = AXIS
    return functools.partial(self.layer, **kwargs)


BN_MODES: dict[str, BNMode] = {
  "none": BNMode(None, False, "no normalization"),
  "per-device": BNMode(jaxbn.BatchNorm, True, "BN with each device's batch"),
  "sync": BNMode(jaxbn.BatchNorm, False, "BN with the global batch"),
  "renorm": BNMode(
    jaxbn.BatchRenorm,
    True,
    "Batch Renorm with each device's batch (r_max 1->3, d_max 0->5 from 10%% to 60%% of --steps)",
  ),
}
