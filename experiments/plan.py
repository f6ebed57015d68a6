"""The experiments of SPEC §7 as lists of train.py runs, at two sizes.

`full` is what `make reproduce` runs and the committed report comes from;
`default` is the scaled-down set `make train` runs (12.4 minutes with set-up on a
2-core CPU). Every run is a train.py command line.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Run:
  experiment: str
  name: str
  args: tuple[str, ...]
  labels: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


E1_LR = 0.5  # plain SGD for both arms (the paper does not state its optimizer)
E1_SWEEP = (0.05, 0.2, 1.0, 5.0, 20.0)
E3_BATCHES = (2, 4, 8, 16, 32)

SIZES = {
    "full": dict(e1_steps=50_000, e1_eval=500, e1_seeds=(0, 1), sweep_steps=10_000, sweep_eval=1000,
                 e2_steps=3000, e2_eval=250, e2_decay=600, e3_steps=3000, e3_eval=500, e3_seeds=(0, 1)),
    "default": dict(e1_steps=10_000, e1_eval=500, e1_seeds=(0, 1), sweep_steps=2000, sweep_eval=1000,
                    e2_steps=600, e2_eval=200, e2_decay=120, e3_steps=1000, e3_eval=500, e3_seeds=(0,)),
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


def _flags(**kw) -> tuple[str, ...]:
  out = []
  for key, value in kw.items():
    out += [f"--{key.replace('_', '-')}", str(value)]
  return tuple(out)


def runs(size: str) -> list[Run]:
  s = SIZES[size]
  plan = []
  for seed in s["e1_seeds"]:
    for bn in ("none", "sync"):
      plan.append(Run("e1", f"{'bn' if bn != 'none' else 'baseline'}-seed{seed}", _flags(
          model="mlp", bn=bn, lr=E1_LR, steps=s["e1_steps"], eval_every=s["e1_eval"],
          checkpoint_every=s["e1_steps"], seed=seed, devices=1),
          {"bn": bn != "none", "seed": seed}))
  for lr in E1_SWEEP:
    for bn in ("none", "sync"):
      plan.append(Run("e1_sweep", f"{'bn' if bn != 'none' else 'baseline'}-lr{lr:g}", _flags(
          model="mlp", bn=bn, lr=lr, steps=s["sweep_steps"], eval_every=s["sweep_eval"],
          checkpoint_every=s["sweep_steps"], seed=0, devices=1),
          {"bn": bn != "none", "lr": lr}))
  for row, override in E2_ROWS.items():
    cfg = {**E2_BASE, **override}
    plan.append(Run("e2", row.lower().replace(" ", "-").replace("(", "").replace(")", ""), _flags(
        model="inception", bn=cfg["bn"], optimizer="momentum", lr=cfg["lr"], dropout=cfg["dropout"],
        weight_decay=cfg["weight_decay"], lr_decay_steps=max(1, s["e2_decay"] // cfg["decay"]),
        lr_decay_rate=0.7, activation=cfg.get("activation", "relu"), batch_size=32, steps=s["e2_steps"],
        eval_every=s["e2_eval"], checkpoint_every=s["e2_steps"], seed=0, devices=1),
        {"row": row}))
  for seed in s["e3_seeds"]:
    for batch in E3_BATCHES:
      for mode, bn, devices, per_device in (("per-device BN", "per-device", 8, batch),
                                            ("synced BN", "sync", 8, batch),
                                            ("one device, global batch", "sync", 1, 8 * batch),
                                            ("no BN", "none", 8, batch)):
        plan.append(Run("e3", f"{bn}-d{devices}-b{per_device}-seed{seed}", _flags(
            model="mlp", bn=bn, lr=E1_LR, devices=devices, batch_size=per_device, steps=s["e3_steps"],
            eval_every=s["e3_eval"], checkpoint_every=s["e3_steps"], seed=seed),
            {"mode": mode, "per_device_batch": batch, "seed": seed}))
  return plan
