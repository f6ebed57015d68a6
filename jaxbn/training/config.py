"""The configuration of a training run (written to OUT/config.json)."""

from __future__ import annotations

import dataclasses

PARALLEL_STYLES = ("jit", "shard_map", "pmap")
BN_MODES = ("none", "per-device", "sync")


@dataclasses.dataclass
class Config:
  """Everything a run depends on; written to OUT/config.json."""
  dataset: str = "fashion_mnist"
  idx_dir: str | None = None
  data_dir: str | None = "data"
  model: str = "mlp"                  # mlp | inception
  bn: str = "none"                    # none | per-device | sync
  parallel: str = "jit"               # jit | shard_map | pmap: how the step spans the devices
  devices: int | None = None          # None: every device
  batch_size: int = 60                # per device
  steps: int = 50_000
  optimizer: str = "sgd"              # sgd | momentum | adam
  lr: float = 0.5
  lr_decay_steps: int = 0             # 0: constant learning rate
  lr_decay_rate: float = 1.0          # lr *= rate every lr_decay_steps (staircase)
  weight_decay: float = 0.0
  activation: str | None = None       # sigmoid | relu; None: the model's default
  dropout: float = 0.0
  init_std: float = 0.1               # MLP weights ~ N(0, init_std²)
  width: int = 4                      # InceptionNet channel multiplier
  bn_momentum: float = 0.99
  eval_every: int = 1000
  checkpoint_every: int = 10_000      # a multiple of eval_every
  seed: int = 0
  out: str = "runs/default"
  resume: bool = False
  progress: bool | None = None        # None: only on a terminal

  def __post_init__(self):
    choices = dict(model=("mlp", "inception"), bn=BN_MODES, parallel=PARALLEL_STYLES,
                   optimizer=("sgd", "momentum", "adam"), activation=(None, "sigmoid", "relu"))
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}.")
    for name in ("batch_size", "steps", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}.")
    if self.checkpoint_every % self.eval_every:
      raise ValueError(f"checkpoint_every: expected a multiple of eval_every ({self.eval_every}), "
                       f"got {self.checkpoint_every}.")
