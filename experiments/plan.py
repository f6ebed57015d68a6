"""The experiments of SPEC §7 as lists of train.py runs, at two sizes.

`full` is what `make reproduce` runs and the committed report comes from;
`default` is the scaled-down set `make train` runs. Every run is a train.py
command line; `labels` say where it goes in the report.
"""

from __future__ import annotations

import dataclasses

from trainer import cli


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

# E4 and E4-long: per-device vs synced BN on ResNet-20, Fashion-MNIST, global batch 128 on 8 host
# devices; compare.py with these settings (the one code path for such studies). Sizes up to the
# per-device batch (16) run per device, 32 and 64 as groups on one device, sync over the 8 devices.
E4_TRAINING = ("--model", "resnet20", "--dataset", "fashion_mnist", "--global-batch-size", "128", "--devices", "8")

# E5: averaged weights (--weight-ema) on E4's synced-BN run. The decay is a choice no paper fixes
# for 600 steps: a time constant of 100 steps and one of 500 (most of the run).
E5_DECAYS = (0.99, 0.998)
E5_POPULATION_BATCHES = 78  # PreciseBN over 10,000 training samples (78 batches of 128), as E4


def _compare_flags(steps: int, eval_every: int, sizes: str, seeds: str, repairs: str, repair_sizes: str, samples: int):
  return (
    *E4_TRAINING,
    *("--steps", str(steps), "--eval-every", str(eval_every), "--checkpoint-every", str(eval_every)),
    *("--normalization-batch", sizes, "--seeds", seeds),
    *(("--repairs", repairs, "--repair-sizes", repair_sizes) if repairs else ()),
    *("--population-samples", str(samples)),
  )


# size -> experiment -> compare.py's flags (experiments/run.py adds --out, --data-dir and --shard)
COMPARISONS = {
  "full": {
    "e4": _compare_flags(600, 600, "2,4,8,16,32,64,sync", "0,1,2", "renorm,frozen", "2,4", 10_000),
    # E4-long: 4x E4's length (its step schedule stretched over 2,400 steps)
    "e4_long": _compare_flags(2400, 800, "2,8,32,sync", "0,1", "frozen", "2", 10_000),
  },
  "default": {"e4": _compare_flags(100, 100, "2,16,sync", "0", "frozen", "2", 1000)},
  # make compare-device: E4 at 30 epochs (30 x 60,000 / 128 steps) on one accelerator, all seven sizes (as
  # groups of the one device's batch, `--devices 1` given last), 2 seeds, four runs at once, bfloat16
  "device": {
    "e4": (
      *_compare_flags(14_100, 14_100, "2,4,8,16,32,64,sync", "0,1", "", "", 10_000),
      *("--devices", "1", "--jobs", "4", "--dtype", "bfloat16"),
    )
  },
}

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
    e5_steps=600,
    e5_eval=200,
    e5_seeds=(0, 1),
    e5_decays=E5_DECAYS,
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
    out += [cli.flag(key), str(value)]
  return tuple(out)


def _arm(bn: str) -> str:
  return "bn" if bn != "none" else "baseline"


def runs(size: str) -> list[Run]:
  if size not in SIZES:  # a size of comparisons only (device)
    return []
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
  for decay in s.get("e5_decays", ()):
    for seed in s["e5_seeds"]:
      plan.append(
        Run(
          "e5",
          f"ema{decay:g}-seed{seed}",
          (
            *E4_TRAINING,
            *_flags(bn="sync", steps=s["e5_steps"], eval_every=s["e5_eval"], checkpoint_every=s["e5_eval"], seed=seed),
            *_flags(weight_ema=decay, weight_ema_bn="both", population_batches=E5_POPULATION_BATCHES),
          ),
          {"decay": decay, "seed": seed},
        )
      )
  return plan
