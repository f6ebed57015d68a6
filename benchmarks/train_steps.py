"""Training steps per second of the paper's models: no BN, jaxbn, flax.linen.BatchNorm; BN's share.

    python benchmarks/train_steps.py [--rounds 10]

train.py's own step (`trainer.steps.train_step`: forward, backward, the
optimizer, the running statistics), jitted on one device over a fixed batch,
dispatched `STEPS` times per sample as training dispatches it (one step per
dispatch), for the paper's MLP (batch 60) and the Inception-style net (batch
32). BN's share of a step = (t_with_bn - t_without) / t_with_bn.
`benchmarks/resnet_steps.py` does the same for the ResNets.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxbn
import trainer
from benchmarks import common
from trainer import (
  cli,
  steps,
)
from trainer.models import MODELS

NORMS = {"no BN": None, "jaxbn": jaxbn.BatchNorm, "flax": nn.BatchNorm}
# (name, batch, steps per timed sample)
CASES = [("mlp", 60, 200), ("inception", 32, 10)]


def time_steps(name: str, image_shape, batch: int, dtype: str, rounds: int, inner: int, device) -> dict:
  """Seconds per training step of model `name` with each norm of NORMS (momentum 0.9),
  interleaved; the step and the optimizer are the model's recipe's."""
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, *image_shape)).astype(np.uint8), device)
  labels = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), device)
  config = trainer.Config(model=name, dtype=dtype)
  fns, fargs = {}, {}
  for bn, norm in NORMS.items():
    layer = None if norm is None else functools.partial(norm, momentum=0.9)
    model = MODELS[name].build(config, layer, 10, jnp.dtype(dtype))
    step = functools.partial(
      steps.train_step,
      model=model,
      optimizer=trainer.make_optimizer(config),
      dropout_key=jax.random.key(0),
      local=False,
    )
    state = trainer.create_train_state(config, image_shape, model)
    fns[bn] = lambda s, x, y, step=step: step(s, x, y)
    fargs[bn] = (jax.device_put(state, device), images, labels)
  times = common.time_interleaved(fns, fargs, rounds=rounds, inner=inner)
  return times


def rows_of(times: dict, **labels) -> list[dict]:
  batch = labels["batch"]
  rows = []
  for bn, seconds in times.items():
    row = {**labels, "BN": bn, "ms/step": seconds * 1e3, "steps/s": 1 / seconds, "images/s": batch / seconds}
    if bn != "no BN":
      row["vs flax"] = seconds / times["flax"]
      row["BN share of step"] = (seconds - times["no BN"]) / seconds
    rows.append(row)
  return rows


def main(argv=None):
  parser = cli.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  rows = []
  for name, batch, inner in CASES:
    times = time_steps(name, (28, 28, 1), batch, "float32", args.rounds, inner, device)
    rows += rows_of(times, model=name, batch=batch)
    print(f"{name}: " + ", ".join(f"{k} {1 / v:.0f} steps/s" for k, v in times.items()), flush=True)
  path = common.save("train_steps", rows, "python benchmarks/train_steps.py " + " ".join(argv or sys.argv[1:]))
  print()
  print(common.table(rows, ["model", "batch", "BN", "ms/step", "steps/s", "vs flax", "BN share of step"]))
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
