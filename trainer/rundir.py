"""The run directory OUT: never overwritten, never mixed with another configuration."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flax import traverse_util

from trainer.config import Config


class RunDirError(ValueError):
  """OUT holds a run that this command would overwrite or mix with another one."""


def holds_run(out: Path) -> bool:
  return (
    (out / "config.json").exists()
    or (out / "metrics.jsonl").exists()
    or ((out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()))
  )


def last_checkpoint(out: Path) -> int | None:
  """The step of the newest finished checkpoint in OUT (orbax names it by its step)."""
  steps = [int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps, default=None)


def move_aside(out: Path) -> Path:
  """--overwrite: the old run is renamed, not deleted."""
  aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
  out.rename(aside)
  return aside


def check(config: Config) -> None:
  """Refuses, before any work, a command that would overwrite or mix runs."""
  out = Path(config.out)
  if not holds_run(out):
    return
  if not config.resume:
    raise RunDirError(
      f"--out: {out} already holds a run; continue it with --resume, or start a new one "
      f"there with --overwrite (the old run is kept, renamed to {out.name}.old-<date>-<time>)."
    )
  saved_path = out / "config.json"
  if not saved_path.exists():
    raise RunDirError(f"--resume: {out} holds no config.json, so its configuration is unknown; use another --out.")
  saved = Config(**json.loads(saved_path.read_text()))
  diffs = config.differences(saved)
  if diffs:
    raise RunDirError(
      f"--resume: the configuration differs from the run in {out}: {'; '.join(diffs)}. "
      f"Only --steps may change on resume; use another --out for a new run."
    )


def write_config(config: Config) -> None:
  (Path(config.out) / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


class Metrics:
  """OUT/metrics.jsonl, one JSON line per evaluation (non-finite numbers as null);
  on resume, cut to the checkpoint."""

  def __init__(self, path: Path, resume_step: int | None, enabled: bool):
    self.path, self.enabled = path, enabled
    self.kept = []
    if resume_step is not None and path.exists():
      self.kept = [
        json.loads(line) for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
      ]
    if enabled:
      path.write_text("".join(json.dumps(r) + "\n" for r in self.kept))

  @property
  def last(self) -> dict | None:
    return self.kept[-1] if self.kept else None

  def write(self, record: dict):
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    self.kept.append(record)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def write_data_info(out: Path, num_classes: int, image_shape, pixels) -> None:
  """OUT/data.json: what the model was built for and how pixels were scaled,
  so that a checkpoint can be used without opening the dataset."""
  info = {
    "num_classes": num_classes,
    "image_shape": list(image_shape),
    "pixel_mean": np.asarray(pixels.mean).tolist(),
    "pixel_std": np.asarray(pixels.std).tolist(),
  }
  (out / "data.json").write_text(json.dumps(info, indent=1) + "\n")


def read_data_info(out: Path) -> dict:
  return json.loads((Path(out) / "data.json").read_text())


PENDING = "pending.npz"  # what a preemption left of an unfinished evaluation period


class Pending(NamedTuple):
  losses: list[float]  # each step's training loss since the last evaluation
  rows: dict | None  # per-device BN: the running statistics' rows (the checkpoint holds them pooled)


def write_pending(out: Path, step: int, losses: list[float], rows: dict | None) -> None:
  arrays = {"step": np.asarray(step), "losses": np.asarray(losses, np.float64)}
  if rows is not None:
    arrays.update({"rows/" + "/".join(k): v for k, v in traverse_util.flatten_dict(rows).items()})
  with open(out / PENDING, "wb") as f:
    np.savez(f, **arrays)


def read_pending(out: Path, step: int) -> Pending | None:
  """What the preemption at `step` left, or None (the run stopped elsewhere, or was killed)."""
  path = out / PENDING
  if not path.exists():
    return None
  with np.load(path) as saved:
    if int(saved["step"]) != step:
      return None
    rows = {tuple(k.split("/")[1:]): saved[k] for k in saved.files if k.startswith("rows/")}
    return Pending([float(v) for v in saved["losses"]], traverse_util.unflatten_dict(rows) if rows else None)
