"""Training steps per second: no BN, jaxbn, flax.linen.BatchNorm; BN's share.

    python benchmarks/train_steps.py [--rounds 10]

Runs the training library's own multi-step chunk, jitted (one device, batches
drawn on device) for the paper's MLP (batch 60) and the Inception-style net
(batch 32). BN's share of a step = (t_with_bn - t_without) / t_with_bn.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxbn
import trainer
from benchmarks import common
from trainer.input import Batches
from trainer.models import MLP, InceptionNet

STEPS = {"mlp": 200, "inception": 10}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6000, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, 6000).astype(np.int32)
  device = jax.devices()[:1]
  rows = []
  for name, batch, config in (
    ("mlp", 60, trainer.Config(model="mlp", lr=0.5)),
    ("inception", 32, trainer.Config(model="inception", optimizer="momentum", lr=0.01)),
  ):
    fns, fargs = {}, {}
    for bn, norm in (("no BN", None), ("jaxbn", jaxbn.BatchNorm), ("flax", nn.BatchNorm)):
      if norm is not None:
        norm = functools.partial(norm, momentum=0.99)
      model = MLP(norm=norm) if name == "mlp" else InceptionNet(norm=norm, width=config.width)
      optimizer = trainer.make_optimizer(config)
      state = trainer.create_train_state(config, (28, 28), model)
      chunk = functools.partial(
        trainer.train_chunk,
        num_steps=STEPS[name],
        model=model,
        optimizer=optimizer,
        batches=Batches(0, len(labels), batch, "none", 28, 1, hflip=False),
        num_devices=1,
        local=False,
        resident=True,
      )
      put = lambda a: jax.device_put(a, device[0])
      fns[bn] = chunk
      fargs[bn] = (jax.tree.map(put, state), put(images), put(labels))
    times = common.time_interleaved(fns, fargs, rounds=args.rounds, inner=1)
    for bn, seconds in times.items():
      per_step = seconds / STEPS[name]
      row = {"model": name, "batch": batch, "BN": bn, "ms/step": per_step * 1e3, "steps/s": 1 / per_step}
      if bn != "no BN":
        row["BN share of step"] = (seconds - times["no BN"]) / seconds
      rows.append(row)
    print(f"{name}: " + ", ".join(f"{k} {STEPS[name] / v:.0f} steps/s" for k, v in times.items()), flush=True)
  path = common.save("train_steps", rows, "python benchmarks/train_steps.py " + " ".join(argv or sys.argv[1:]))
  print()
  print(common.table(rows, ["model", "batch", "BN", "ms/step", "steps/s", "BN share of step"]))
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
