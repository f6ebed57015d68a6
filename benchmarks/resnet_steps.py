"""One ResNet training step with jaxbn's BN against the same model with flax's, and without BN.

    python benchmarks/resnet_steps.py [--rounds 10]

The step is train.py's own (`trainer.steps.train_step`: forward, backward,
momentum SGD with weight decay, running statistics), jitted on one device over
a fixed batch of uint8 images, in float32 and in bfloat16 (`--dtype`: the
computation; parameters and BN statistics stay float32). The models are
trainer.models' ResNets with the norm injected: `jaxbn.BatchNorm` or
`flax.linen.BatchNorm` (both momentum 0.9), or none. Ratios are measured side
by side, interleaved in one run; images/s = batch / step time.

Sizes: ResNet-20 at 32x32 (CIFAR) and ResNet-50 at a small size on a CPU;
on an accelerator ResNet-20 at a larger batch and ResNet-50 at 224x224.
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
from trainer import steps
from trainer.models.resnet import ResNet20, ResNet50

# (name, model, image side, batch) per platform
CASES = {
  "cpu": [("resnet20", ResNet20, 32, 128), ("resnet50", ResNet50, 64, 16)],
  "accelerator": [("resnet20", ResNet20, 32, 1024), ("resnet50", ResNet50, 224, 256)],
}
NORMS = {"no BN": None, "jaxbn": jaxbn.BatchNorm, "flax": nn.BatchNorm}


def step_fn(name, norm, dtype):
  config = trainer.Config(model=name, dtype=dtype)
  layer = None if norm is None else functools.partial(norm, momentum=0.9)
  cls = {"resnet20": ResNet20, "resnet50": ResNet50}[name]
  model = cls(norm=layer, num_classes=10, dtype=jax.numpy.dtype(dtype))
  optimizer = trainer.make_optimizer(config)
  step = functools.partial(
    steps.train_step, model=model, optimizer=optimizer, dropout_key=jax.random.key(0), local=False
  )
  return config, model, step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  platform = jax.devices()[0].platform
  device = jax.devices()[0]
  rows = []
  for name, _, side, batch in CASES["cpu" if platform == "cpu" else "accelerator"]:
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch, side, side, 3)).astype(np.uint8), device)
    labels = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), device)
    for dtype in ("float32", "bfloat16"):
      fns, fargs = {}, {}
      for bn, norm in NORMS.items():
        config, model, step = step_fn(name, norm, dtype)
        state = trainer.create_train_state(config, (side, side, 3), model)
        fns[bn] = lambda s, x, y, step=step: step(s, x, y)
        fargs[bn] = (jax.device_put(state, device), images, labels)
      times = common.time_interleaved(fns, fargs, rounds=args.rounds, inner=1)
      for bn, seconds in times.items():
        row = {
          "model": name,
          "image": f"{side}x{side}",
          "batch": batch,
          "dtype": dtype,
          "BN": bn,
          "ms/step": seconds * 1e3,
          "images/s": batch / seconds,
        }
        if bn != "no BN":
          row["vs flax"] = seconds / times["flax"]
          row["BN share of step"] = (seconds - times["no BN"]) / seconds
        rows.append(row)
      print(
        f"{name} {side}px batch {batch} {dtype}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()),
        flush=True,
      )
  path = common.save("resnet_steps", rows, "python benchmarks/resnet_steps.py " + " ".join(argv or sys.argv[1:]))
  print()
  print(
    common.table(rows, ["model", "image", "batch", "dtype", "BN", "ms/step", "images/s", "vs flax", "BN share of step"])
  )
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
