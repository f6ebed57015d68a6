"""The experiments of SPEC §7 as lists of train.py runs, at two sizes.

`full` is what `make reproduce` runs and the committed report comes from;
`default` is the scaled-down set `make train` runs. Every run is a train.py
command line; `labels` say where it goes in the report.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Run:
  experiment: str
  name: str
  args: tuple[str, ...]
  labels: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One E1 training setting, applied to both arms (with and without BN)."""

  optimizer: str  # sgd | momentum (0.9)
  lr: float
  init_std: float

  @property
  def name(self) -> str:
    return f"{self.optimizer}-lr{self.lr:g}-std{self.init_std:g}"

  @property
  def title(self) -> str:
    optimizer = "plain SGD" if self.optimizer == "sgd" else "momentum 0.9"
    return f"{optimizer}, lr {self.lr:g}, init std {self.init_std:g}"


# The paper states neither its optimizer nor its initialization scale, so E1
# is a grid. The first three are the settings of issue 12's table; the last
# two change one factor of a neighbour (learning rate; init std).
E1_SETTINGS = (
  Setting("sgd", 0.5, 0.1),
  Setting("momentum", 0.01, 0.01),
  Setting("sgd", 0.1, 1.0),
  Setting("sgd", 0.1, 0.1),
  Setting("momentum", 0.01, 0.1),
)
E1_SWEEP = (0.05, 0.2, 0.5, 1.0, 5.0, 20.0)  # plain SGD, init std 0.1
E3_BATCHES = (2, 4, 8, 16, 32)
E3_LR = 0.5
STYLES = ("jit", "shard_map", "pmap")

# E4: ResNet-20 on Fashion-MNIST at a global batch of 128; the normalization batch
# swept. Sizes up to the per-device batch (16) run per device on 8 host devices
# (smaller ones as groups of each device's batch); 32 and 64 as groups of the
# global batch on one device; 128 is synced BN over the 8 devices.
E4_STEPS = 600
E4_GLOBAL_BATCH = 128
E4_DEVICES = 8
E4_SIZES = (2, 4, 8, 16, 32, 64, 128)
E4_REPAIRS = (2, 4)  # where Batch Renorm and a FrozenBatchNorm final phase are tried
E4_PRECISE_SAMPLES = 10_000  # PreciseBN's training samples (Wu & Johnson: 10^3-10^4 suffice)
E4_FROZEN_SHARE = 5  # the FrozenBN phase: the last 1/5 of the steps
# E4-long: E4 at 4x its length (its recipe's step schedule stretched over 2,400 steps).
E4_LONG_STEPS = 4 * E4_STEPS
E4_LONG_SIZES = (2, 8, 32, 128)
E4_LONG_EVAL = 800

SIZES = {
  "full": dict(
    e1_steps=50_000,
    e1_eval=500,
    e1_seeds=(0, 1, 2),
    sweep_steps=10_000,
    sweep_eval=1000,
    e2_steps=3000,
    e2_eval=250,
    e2_decay=600,
    e2_seeds=(0, 1),
    e3_steps=3000,
    e3_eval=500,
    e3_seeds=(0, 1),
    e3_batches=E3_BATCHES,
    e3_styles=STYLES,
    population_batches=200,
    e4_steps=E4_STEPS,
    e4_seeds=(0, 1, 2),
    e4_sizes=E4_SIZES,
    e4_repairs=("Batch Renorm", "FrozenBN final phase"),
    e4_precise=E4_PRECISE_SAMPLES,
    e4_long_seeds=(0, 1),
  ),
  "default": dict(
    e1_steps=3000,
    e1_eval=500,
    e1_seeds=(0,),
    sweep_steps=2000,
    sweep_eval=1000,
    e2_steps=300,
    e2_eval=100,
    e2_decay=60,
    e2_seeds=(0,),
    e3_steps=1000,
    e3_eval=500,
    e3_seeds=(0,),
    e3_batches=(2, 8, 32),
    e3_styles=("jit",),
    population_batches=50,
    e4_steps=100,
    e4_seeds=(0,),
    e4_sizes=(2, 16),
    e4_repairs=("FrozenBN final phase",),
    e4_precise=1000,
  ),
}

# E2 rows: the paper's §4.2.1 variants at small scale. BN-xN: learning rate xN,
# dropout removed, learning-rate decay 6x faster, L2 weight decay / 5.
E2_BASE = dict(lr=0.01, dropout=0.2, weight_decay=4e-4, decay=1)
E2_ROWS = {
  "Baseline": dict(bn="none"),
  "BN-Baseline": dict(bn="sync"),
  "BN-x5": dict(bn="sync", lr=0.05, dropout=0.0, weight_decay=8e-5, decay=6),
  "BN-x30": dict(bn="sync", lr=0.3, dropout=0.0, weight_decay=8e-5, decay=6),
  "BN-x5-Sigmoid": dict(bn="sync", lr=0.05, dropout=0.0, weight_decay=8e-5, decay=6, activation="sigmoid"),
  "Sigmoid (no BN)": dict(bn="none", activation="sigmoid"),
}

# E3 modes: (label, --bn, devices, parallel styles). Every 8-device mode runs
# in every style for the first seed (their results must agree), in jit after.
E3_MODES = (
  ("per-device BN", "per-device", 8),
  ("synced BN", "sync", 8),
  ("Batch Renorm (per-device)", "renorm", 8),
  ("no BN", "none", 8),
  ("one device, global batch", "sync", 1),
)


def _flags(**kw) -> tuple[str, ...]:
  out = []
  for key, value in kw.items():
    out += [f"--{key.replace('_', '-')}", str(value)]
  return tuple(out)


def _arm(bn: str) -> str:
  return "bn" if bn != "none" else "baseline"


def runs(size: str) -> list[Run]:
  s = SIZES[size]
  plan = []
  for setting in E1_SETTINGS:
    for seed in s["e1_seeds"]:
      for bn in ("none", "sync"):
        plan.append(
          Run(
            "e1",
            f"{setting.name}-{_arm(bn)}-seed{seed}",
            _flags(
              model="mlp",
              bn=bn,
              optimizer=setting.optimizer,
              lr=setting.lr,
              init_std=setting.init_std,
              steps=s["e1_steps"],
              eval_every=s["e1_eval"],
              checkpoint_every=s["e1_steps"],
              seed=seed,
              devices=1,
            ),
            {"setting": setting.name, "title": setting.title, "bn": bn != "none", "seed": seed},
          )
        )
  for lr in E1_SWEEP:
    for bn in ("none", "sync"):
      plan.append(
        Run(
          "e1_sweep",
          f"{_arm(bn)}-lr{lr:g}",
          _flags(
            model="mlp",
            bn=bn,
            lr=lr,
            steps=s["sweep_steps"],
            eval_every=s["sweep_eval"],
            checkpoint_every=s["sweep_steps"],
            seed=0,
            devices=1,
          ),
          {"bn": bn != "none", "lr": lr},
        )
      )
  for seed in s["e2_seeds"]:
    for row, override in E2_ROWS.items():
      cfg = {**E2_BASE, **override}
      slug = row.lower().replace(" ", "-").replace("(", "").replace(")", "")
      plan.append(
        Run(
          "e2",
          f"{slug}-seed{seed}",
          _flags(
            model="inception",
            bn=cfg["bn"],
            optimizer="momentum",
            lr=cfg["lr"],
            dropout=cfg["dropout"],
            weight_decay=cfg["weight_decay"],
            lr_decay_steps=max(1, s["e2_decay"] // cfg["decay"]),
            lr_decay_rate=0.7,
            activation=cfg.get("activation", "relu"),
            batch_size=32,
            steps=s["e2_steps"],
            eval_every=s["e2_eval"],
            checkpoint_every=s["e2_steps"],
            seed=seed,
            devices=1,
          ),
          {"row": row, "seed": seed},
        )
      )
  for i, seed in enumerate(s["e3_seeds"]):
    for batch in s["e3_batches"]:
      for mode, bn, devices in E3_MODES:
        for style in s["e3_styles"] if i == 0 and devices > 1 else ("jit",):
          per_device = batch if devices > 1 else 8 * batch
          extra = {"population_batches": s["population_batches"]} if bn in ("per-device", "sync") else {}
          plan.append(
            Run(
              "e3",
              f"{bn}-{style}-d{devices}-b{per_device}-seed{seed}",
              _flags(
                model="mlp",
                bn=bn,
                parallel=style,
                lr=E3_LR,
                devices=devices,
                batch_size=per_device,
                steps=s["e3_steps"],
                eval_every=s["e3_eval"],
                checkpoint_every=s["e3_steps"],
                seed=seed,
                **extra,
              ),
              {"mode": mode, "style": style, "per_device_batch": batch, "seed": seed},
            )
          )
  for seed in s["e4_seeds"]:
    for size in s["e4_sizes"]:
      plan.append(_e4_run(s["e4_steps"], seed, size, "BN", s["e4_precise"]))
      for mode in s["e4_repairs"] if size in E4_REPAIRS else ():
        plan.append(_e4_run(s["e4_steps"], seed, size, mode, s["e4_precise"]))
  for seed in s.get("e4_long_seeds", ()):
    for size in E4_LONG_SIZES:
      plan.append(_e4_run(E4_LONG_STEPS, seed, size, "BN", s["e4_precise"], "e4_long", E4_LONG_EVAL))
    plan.append(_e4_run(E4_LONG_STEPS, seed, 2, "FrozenBN final phase", s["e4_precise"], "e4_long", E4_LONG_EVAL))
  return plan


def _e4_run(
  steps: int, seed: int, size: int, mode: str, precise: int, experiment: str = "e4", eval_every: int | None = None
) -> Run:
  """One E4 run: normalization batch `size` of the global 128, evaluated four ways at the end."""
  per_device = E4_GLOBAL_BATCH // E4_DEVICES
  if size == E4_GLOBAL_BATCH:
    placement = dict(bn="sync", devices=E4_DEVICES)
  elif size <= per_device:
    placement = dict(bn="per-device", devices=E4_DEVICES, **({"bn_group_size": size} if size < per_device else {}))
  else:
    placement = dict(bn="per-device", devices=1, bn_group_size=size)
  extra: dict = {"eval_batch_stats": ""}
  if mode == "Batch Renorm":
    placement["bn"] = "renorm"
  else:
    extra.update(population_batches=max(1, precise // size), population_estimator="both")
  if mode == "FrozenBN final phase":
    extra["frozen_bn_steps"] = steps // E4_FROZEN_SHARE
  slug = {"BN": "bn", "Batch Renorm": "renorm", "FrozenBN final phase": "frozen"}[mode]
  args = _flags(
    model="resnet20",
    dataset="fashion_mnist",
    global_batch_size=E4_GLOBAL_BATCH,
    steps=steps,
    eval_every=eval_every or steps,
    checkpoint_every=eval_every or steps,
    seed=seed,
    **placement,
    **extra,
  )
  return Run(
    experiment,
    f"{slug}-n{size}-seed{seed}",
    tuple(a for a in args if a != ""),
    {"mode": mode, "size": size, "seed": seed},
  )
