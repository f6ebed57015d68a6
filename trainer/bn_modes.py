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
              statistics pooled over the devices; its limits follow a schedule.
  frozen      FrozenBN (detectron2's fine-tuning default): every layer normalizes
              with its stored statistics (from --init-from), never updated; scale and
              bias trained unless --freeze-bn-affine.

Adding a mode is one entry: nothing outside this file tests a mode by name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jaxbn
from trainer.errors import ConfigError
from trainer.mesh import AXIS

# step -> the keyword arguments this step passes to every layer of the mode's class
StepSchedule = Callable[[Any], dict[str, Any]]


def _renorm_limits(steps: int) -> StepSchedule:
  """Batch Renorm's limits over a run of `steps` (the paper's schedule scaled to
  it): plain BN for the first 10% of the steps, then r_max 1 -> 3 and d_max
  0 -> 5 linearly until 60%, then constant."""
  limits = jaxbn.renorm_schedule(max(steps // 2, 1), warmup_steps=steps // 10)

  def schedule(step):
    r_max, d_max = limits(step)
    return {"r_max": r_max, "d_max": d_max}

  return schedule


@dataclasses.dataclass(frozen=True)
class BNMode:
  layer: type | None  # the jaxbn Linen module; None: no normalization
  per_device: bool  # statistics of each device's examples, running statistics one row per device
  summary: str
  # Algorithm 2 (PreciseBN) re-estimates what this mode normalizes with (renorm trains on corrected ones)
  has_population_statistics: bool = False
  # each device's layer reads the running statistics pooled over the devices (renorm's correction)
  reads_pooled_running_statistics: bool = False
  # steps -> the per-step layer arguments of a run that long; None: the layer takes none
  step_schedule: Callable[[int], StepSchedule] | None = None
  # normalizes training batches with their own statistics (False: none, or fixed statistics)
  batch_statistics: bool = True
  # config -> the mode's own layer arguments (e.g. FrozenBN's train_affine)
  layer_options: Callable[[Any], dict[str, Any]] | None = None

  def groups(
    self, group_size: int | None, global_batch: int, num_devices: int, what: str = "global batch"
  ) -> int | None:
    """The normalization groups of the global batch (or a micro-batch of it, `what`): one per device, or of
    `group_size` examples (`--bn-group-size`), each device holding whole groups;
    None for modes that normalize over the global batch."""
    if not self.per_device:
      return None
    if group_size is None:
      return num_devices
    groups, rest = divmod(global_batch, group_size)
    if rest or groups % num_devices:
      raise ConfigError(
        f"--bn-group-size: {group_size} must split the {what} of {global_batch} into groups that the "
        f"{num_devices} devices hold whole (a divisor of the per-device {what} {global_batch // num_devices})"
      )
    return groups

  def norm(self, momentum: float, local: bool, groups: int | None = None, placed: bool = True, config=None):
    """The layer factory for models run per device over AXIS (`local`: shard_map,
    pmap) or globally (jit); `groups`: see `groups`; `placed=False`: the portable
    model (one set of statistics, no axis); `config`: the run's, for `layer_options`."""
    if self.layer is None:
      return None
    kwargs: dict = {"momentum": momentum}
    if self.layer_options is not None and config is not None:
      kwargs.update(self.layer_options(config))
    if placed:
      if self.per_device:
        kwargs["batch_groups"] = groups
        if self.reads_pooled_running_statistics and local:  # each device holds its own rows
          kwargs["stats_axis_name"] = AXIS
      elif local:
        kwargs["axis_name"] = AXIS
    return functools.partial(self.layer, **kwargs)

  def schedule(self, steps: int) -> StepParameters | None:
    """The per-step layer arguments of a run of `steps`; None when the mode has none."""
    if self.step_schedule is None:
      return None
    return StepParameters(self.layer, self.step_schedule(steps))


@dataclasses.dataclass(frozen=True)
class StepParameters:
  """Arguments that change with the step, passed to every layer of one class."""

  layer: type
  schedule: StepSchedule

  def __call__(self, step):
    return self.schedule(step)


BN_MODES: dict[str, BNMode] = {
  "none": BNMode(None, False, "no normalization", batch_statistics=False),
  "per-device": BNMode(jaxbn.BatchNorm, True, "BN with each device's batch", has_population_statistics=True),
  "sync": BNMode(jaxbn.BatchNorm, False, "BN with the global batch", has_population_statistics=True),
  "renorm": BNMode(
    jaxbn.BatchRenorm,
    True,
    "Batch Renorm with each device's batch (r_max 1->3, d_max 0->5 from 10%% to 60%% of --steps)",
    reads_pooled_running_statistics=True,
    step_schedule=_renorm_limits,
  ),
  "frozen": BNMode(
    jaxbn.FrozenBatchNorm,
    False,
    "FrozenBN: the stored statistics (from --init-from) fixed; scale and bias trained unless --freeze-bn-affine",
    batch_statistics=False,
    layer_options=lambda config: {"train_affine": not config.freeze_bn_affine},
  ),
}
