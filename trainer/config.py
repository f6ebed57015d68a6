"""The configuration of a training run (written to OUT/config.json)."""

from __future__ import annotations

import dataclasses
import math

PARALLEL_STYLES = ("jit", "shard_map", "pmap")
BN_MODES = ("none", "per-device", "sync", "renorm")
DATASETS = ("mnist", "fashion_mnist")
TRAIN_EXAMPLES = 60_000  # both datasets
CHECKPOINT_STEPS = 10_000  # checkpoint_every's default, rounded up to a multiple of eval_every

# Flags that may differ when a run is resumed: where and how to show it, and
# (only upwards) how long it trains.
RESUMABLE = ("out", "resume", "progress", "steps", "data_dir")


class ConfigError(ValueError):
  """A bad flag value or combination: the message starts with the flag."""


@dataclasses.dataclass
class Config:
  """Everything a run depends on; written to OUT/config.json."""

  dataset: str = "fashion_mnist"
  idx_dir: str | None = None
  data_dir: str | None = "data"
  model: str = "mlp"  # mlp | inception
  bn: str = "none"  # none | per-device | sync | renorm
  parallel: str = "jit"  # jit | shard_map | pmap: how the step spans the devices
  devices: int | None = None  # None: every device
  batch_size: int = 60  # per device
  steps: int = 50_000
  optimizer: str = "sgd"  # sgd | momentum | adam
  lr: float = 0.5
  lr_decay_steps: int = 0  # 0: constant learning rate
  lr_decay_rate: float = 1.0  # lr *= rate every lr_decay_steps (staircase)
  weight_decay: float = 0.0
  activation: str | None = None  # sigmoid | relu; None: the model's default
  dropout: float = 0.0
  init_std: float = 0.1  # MLP weights ~ N(0, init_std²)
  width: int = 4  # InceptionNet channel multiplier
  bn_momentum: float = 0.99
  eval_every: int = 1000
  population_batches: int = 0  # >0: also evaluate with Algorithm 2's statistics over this many batches
  checkpoint_every: int | None = None  # None: every 10,000 steps, rounded up to a multiple of eval_every
  seed: int = 0
  out: str = "runs/default"
  resume: bool = False
  progress: bool | None = None  # None: only on a terminal

  def __post_init__(self):
    choices = dict(
      dataset=DATASETS,
      model=("mlp", "inception"),
      bn=BN_MODES,
      parallel=PARALLEL_STYLES,
      optimizer=("sgd", "momentum", "adam"),
      activation=(None, "sigmoid", "relu"),
    )
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        _fail(name, f"expected one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
    for name in ("batch_size", "steps", "eval_every", "width"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        _fail(name, f"expected a positive integer, got {getattr(self, name)}")
    if self.devices is not None and self.devices < 1:
      _fail("devices", f"expected a positive integer, got {self.devices}")
    if not isinstance(self.population_batches, int) or self.population_batches < 0:
      _fail("population_batches", f"expected 0 (off) or a positive integer, got {self.population_batches}")
    if self.population_batches and self.bn not in ("per-device", "sync"):
      _fail("population_batches", f"needs --bn per-device or sync (BN's training statistics), got --bn {self.bn}")
    if self.lr_decay_steps < 0:
      _fail("lr_decay_steps", f"expected 0 (off) or a positive integer, got {self.lr_decay_steps}")
    for name in ("lr", "init_std", "lr_decay_rate"):
      value = getattr(self, name)
      if not math.isfinite(value) or value <= 0:
        _fail(name, f"expected a finite positive number, got {value}")
    if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
      _fail("weight_decay", f"expected a finite number >= 0, got {self.weight_decay}")
    if not 0 <= self.dropout < 1:
      _fail("dropout", f"expected a rate in [0, 1), got {self.dropout}")
    if not 0 <= self.bn_momentum <= 1:
      _fail("bn_momentum", f"expected a value in [0, 1], got {self.bn_momentum}")
    if self.checkpoint_every is None:
      self.checkpoint_every = -(-CHECKPOINT_STEPS // self.eval_every) * self.eval_every
    if self.checkpoint_every < 1 or self.checkpoint_every % self.eval_every:
      _fail(
        "checkpoint_every",
        f"expected a positive multiple of --eval-every ({self.eval_every}), got {self.checkpoint_every}",
      )
    if self.devices is not None and self.batch_size * self.devices > TRAIN_EXAMPLES:
      _fail(
        "batch_size",
        f"{self.batch_size} per device x {self.devices} devices exceeds the {TRAIN_EXAMPLES} training examples",
      )

  def differences(self, other: Config) -> list[str]:
    """The flags (as --name value) of `self` that differ from `other`'s, but
    those a resumed run may change."""
    diffs = []
    for field in dataclasses.fields(self):
      if field.name in RESUMABLE:
        continue
      mine, theirs = getattr(self, field.name), getattr(other, field.name)
      if mine != theirs:
        diffs.append(f"--{field.name.replace('_', '-')} {mine} (the run has {theirs})")
    return diffs


def _fail(name: str, message: str):
  raise ConfigError(f"--{name.replace('_', '-')}: {message}")


def statistics_batch(config: Config, num_devices: int) -> int:
  """The examples one BN statistic is computed over in training."""
  return config.batch_size * (num_devices if config.bn == "sync" else 1)


def per_device_statistics(config: Config) -> bool:
  """BN modes whose running statistics are kept per device (one row each)."""
  return config.bn in ("per-device", "renorm")
