"""Gradient accumulation (--accumulate-steps K): the compiled step's temporary memory and its time.

    python benchmarks/accumulation.py [--rounds 3]

The step is train.py's own (`trainer.steps.train_step`, synced BN, the recipe's
optimizer) on one device, the batch run as K micro-batches one after the other (a
scan): K = 1, 2, 4, 8. For each K: the temporary bytes of the compiled program
(XLA's `memory_analysis`: activations and workspace, not the parameters or the
inputs), their share of K = 1's, and the step time, K's timed side by side,
interleaved in one run; the ratio is to K = 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer
from benchmarks import common
from trainer import cli, steps

KS = (1, 2, 4, 8)
# (model, image side, batch) per platform
CASES = {
  "cpu": [("resnet20", 32, 64), ("resnet50", 64, 32)],
  "accelerator": [("resnet20", 32, 1024), ("resnet50", 224, 64)],
}


def step_programs(name: str, side: int, batch: int, device):
  """K -> (the jitted step, its arguments, the compiled program's temporary bytes)."""
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, side, side, 3)).astype(np.uint8), device)
  labels = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), device)
  programs = {}
  for k in KS:
    config = trainer.Config(model=name, bn="sync", global_batch_size=batch, accumulate_steps=k, image_size=side)
    step = jax.jit(
      functools.partial(
        steps.train_step,
        model=trainer.make_model(config, num_devices=1),
        optimizer=trainer.make_optimizer(config),
        dropout_key=jax.random.key(0),
        local=False,
        accumulation=steps.Accumulation(k, config.bn_momentum) if k > 1 else None,
      )
    )
    state = jax.device_put(trainer.create_train_state(config, (side, side, 3)), device)
    memory = step.lower(state, images, labels).compile().memory_analysis()
    programs[k] = (step, (state, images, labels), memory.temp_size_in_bytes)
  return programs


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  rows = []
  for name, side, batch in CASES["cpu" if device.platform == "cpu" else "accelerator"]:
    programs = step_programs(name, side, batch, device)
    times = common.time_interleaved(
      {k: p[0] for k, p in programs.items()}, {k: p[1] for k, p in programs.items()}, rounds=args.rounds, inner=1,
      jit=False,
    )  # fmt: skip
    base_bytes, base_time = programs[1][2], times[1]
    for k, (_, _, temp) in programs.items():
      rows.append(
        {
          "model": name,
          "image": f"{side}x{side}",
          "batch": batch,
          "K": k,
          "micro-batch": batch // k,
          "temp MiB": temp / 2**20,
          "share of K=1 temp": temp / base_bytes,
          "ms/step": times[k] * 1e3,
          "time vs K=1": times[k] / base_time,
        }
      )
      print(f"{name} K={k}: temp {temp / 2**20:.1f} MiB, {times[k] * 1e3:.0f} ms/step", flush=True)
  path = common.save("accumulation", rows, "python benchmarks/accumulation.py " + " ".join(argv or sys.argv[1:]))
  print()
  print(common.table(rows, list(rows[0])))
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
