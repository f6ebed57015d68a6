"""One ResNet training step with jaxbn's BN against the same model with flax's, and without BN.

    python benchmarks/resnet_steps.py [--rounds 10]

The step is train.py's own (`trainer.steps.train_step`: forward, backward, the
recipe's optimizer, running statistics), timed as `benchmarks/train_steps.py`
times it: jitted on one device over a fixed batch of uint8 images, in float32 and in bfloat16 (`--dtype`: the
computation; parameters and BN statistics stay float32). The models are
trainer.models' ResNets with the norm injected: `jaxbn.BatchNorm` or
`flax.linen.BatchNorm` (both momentum 0.9), or none. Ratios are measured side
by side, interleaved in one run; images/s = batch / step time.

Sizes: ResNet-20 at 32x32 (CIFAR) and ResNet-50 at a small size on a CPU;
on an accelerator ResNet-20 at a larger batch and ResNet-50 at 224x224.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common
from benchmarks.train_steps import rows_of, time_steps
from trainer import cli

# (name, image side, batch) per platform
CASES = {
  "cpu": [("resnet20", 32, 128), ("resnet50", 64, 16)],
  "accelerator": [("resnet20", 32, 1024), ("resnet50", 224, 256)],
}


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  rows = []
  for name, side, batch in CASES["cpu" if device.platform == "cpu" else "accelerator"]:
    for dtype in ("float32", "bfloat16"):
      times = time_steps(name, (side, side, 3), batch, dtype, args.rounds, 1, device)
      rows += rows_of(times, model=name, image=f"{side}x{side}", batch=batch, dtype=dtype)
      print(
        f"{name} {side}px batch {batch} {dtype}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()),
        flush=True,
      )
  path = common.save("resnet_steps", rows, "python benchmarks/resnet_steps.py " + " ".join(argv or sys.argv[1:]))
  print()
  columns = ["model", "image", "batch", "dtype", "BN", "ms/step", "images/s", "vs flax", "BN share of step"]
  print(common.table(rows, columns))
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
