"""A run's checkpoints: OUT/checkpoints/STEP, the portable training state (orbax).

Old runs stay loadable when the training state gains a field: a checkpoint is
restored field by field, and a field it does not hold keeps the fresh state's
value (see CONTRIBUTING, "Adding a field to the training state").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import orbax.checkpoint as ocp

from trainer import cli, rundir
from trainer.config import Config
from trainer.state import TrainState, create_train_state

KEPT = 2  # the newest checkpoints kept


class CheckpointError(RuntimeError):
  """A checkpoint could not be written."""


class Checkpoints:
  """The checkpoints of the run in `out`."""

  def __init__(self, out: Path):
    self.out = Path(out)
    self._manager = ocp.CheckpointManager(
      (self.out / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=KEPT, enable_async_checkpointing=False),
      item_handlers=ocp.StandardCheckpointHandler(),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, fresh):
    """The state saved at `step`, in the structure of `fresh` (a dataclass pytree
    such as `TrainState`); fields the checkpoint lacks keep `fresh`'s values."""
    saved = set(self._manager.item_metadata(step).tree)
    fields = {f.name: getattr(fresh, f.name) for f in dataclasses.fields(fresh)}
    target = {name: value for name, value in fields.items() if name in saved}
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    return fresh.replace(**restored)

  def save(self, step: int, state) -> None:
    """Saves the portable state of `step`; CheckpointError in one line when it cannot."""
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state))
    except Exception as error:
      kept = self.latest_step()
      raise CheckpointError(
        f"step {step}: the checkpoint could not be saved under {self.out / 'checkpoints'} "
        f"({cli.first_line(error)}); "
        f"{'the checkpoint of step ' + str(kept) + ' is kept' if kept else 'no earlier checkpoint exists'}."
        f" Free space or fix permissions, then run again with --resume."
      ) from error

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()


def load_run(out: str | Path, step: int | None = None) -> tuple[Config, TrainState, int]:
  """A finished or interrupted run's configuration and portable state at `step`
  (default: its last checkpoint), and that step; ValueError in one line when OUT holds none."""
  out = Path(out)
  if not (out / "config.json").is_file() or not (out / "data.json").is_file():
    raise ValueError(f"{out}: not a train.py run directory (no config.json and data.json)")
  config = Config(**json.loads((out / "config.json").read_text()))
  info = rundir.read_data_info(out)
  checkpoints = Checkpoints(out)
  step = checkpoints.latest_step() if step is None else step
  if step is None or step not in checkpoints._manager.all_steps():
    raise ValueError(f"{out}: no checkpoint{'' if step is None else f' of step {step}'} in {out / 'checkpoints'}")
  fresh = create_train_state(config, tuple(info["image_shape"]), num_classes=info["num_classes"])
  return config, checkpoints.restore(step, fresh), step
