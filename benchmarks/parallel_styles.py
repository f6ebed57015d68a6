"""Per-device and synced BN in every parallel style, on 8 host devices.

    python benchmarks/parallel_styles.py [--rounds 10]

1. Collectives per BN layer (one jaxbn.BatchNorm, training mode), counted in
   the compiled program, forward and forward+backward (dL/dx only; a
   replicated parameter's gradient needs its data-parallel all-reduce in any
   style), for jit with a sharded batch, shard_map and pmap.
2. Time per training step of the E3 MLP (sigmoid 784-100-100-100-10, batch 8
   per device) through train.py's own training chunk, styles interleaved:
   the training chunk only, no evaluation.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxbn  # noqa: E402
import trainer  # noqa: E402
from benchmarks import common  # noqa: E402
from trainer import cli  # noqa: E402
from trainer.input import Batches, DeviceFeed  # noqa: E402

STYLES, MODES = trainer.PARALLEL_STYLES, ("per-device", "sync")
STEPS_PER_SAMPLE = 100


def collectives(text: str) -> str:
  ops = re.findall(r"= [^=]*? (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", text)
  return ", ".join(f"{ops.count(op)} {op}" for op in sorted(set(ops))) or "none"


def layer_programs(style: str, mode: str, devices):
  """Compiled text of one BN layer, forward and forward+backward (dL/dx), placed and
  spanned over the devices by the style's `trainer.Parallel` (as train.py's steps are)."""
  d, b, c = len(devices), 16, 64
  x = np.random.default_rng(0).normal(size=(d * b, c)).astype(np.float32)
  per_device = mode == "per-device"
  parallel = trainer.make_parallel(style, devices, stat_rows=d if per_device else None)
  kwargs = {"batch_groups": d} if per_device else ({"axis_name": trainer.AXIS} if parallel.local else {})
  layer = jaxbn.BatchNorm(use_running_average=False, **kwargs)
  variables = layer.init(jax.random.key(0), x[:b])
  placed = {
    "params": parallel.replicate(variables["params"]),
    "batch_stats": parallel.put_batch_stats(variables["batch_stats"]),  # per-device: one row per device already
  }
  stats_spec = P(trainer.AXIS) if per_device else P()
  specs = {"params": P(), "batch_stats": stats_spec}

  def forward(variables, x):
    return layer.apply(variables, x, mutable=["batch_stats"])

  def backward(variables, x):
    return jax.grad(lambda x: jnp.sum(forward(variables, x)[0] ** 2))(x)

  xs = parallel.put_batch(x)
  texts = []
  for fn, out in ((forward, (P(trainer.AXIS), {"batch_stats": stats_spec})), (backward, P(trainer.AXIS))):
    texts.append(parallel.lower(fn, (specs, P(trainer.AXIS)), out, placed, xs).compile().as_text())
  return texts


def main(argv=None):
  parser = cli.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  devices = jax.devices()
  assert len(devices) == 8, len(devices)
  rows = []
  for mode in MODES:
    for style in STYLES:
      fwd, both = layer_programs(style, mode, devices)
      rows.append(
        {"BN": mode, "style": style, "collectives fwd": collectives(fwd), "collectives fwd+bwd (dx)": collectives(both)}
      )
  print(common.table(rows, list(rows[0])))

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6000, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, 6000).astype(np.int32)
  fns, fargs = {}, {}
  for mode in MODES:
    for style in STYLES:
      config = trainer.Config(model="mlp", bn=mode, parallel=style, batch_size=8, lr=0.5)
      parallel = trainer.make_parallel(style, devices, stat_rows=len(devices) if mode == "per-device" else None)
      state = parallel.put_state(trainer.create_train_state(config, (28, 28)))
      batches = Batches(0, len(labels), 8 * len(devices), "none", 28, 1, hflip=False)
      program = parallel.step_program(
        state,
        resident=True,
        model=trainer.make_model(config, num_devices=len(devices)),
        optimizer=trainer.make_optimizer(config),
        batches=batches,
      )
      feed = DeviceFeed(parallel, images, labels, batches, range(batches.global_batch))
      # Donation consumes the state: every call gets a fresh copy.
      fns[f"{mode} {style}"] = lambda s, *data, program=program: program(jax.tree.map(jnp.copy, s), *data)
      fargs[f"{mode} {style}"] = (state, *feed.inputs(0))
  times = common.time_interleaved(fns, fargs, rounds=args.rounds, inner=STEPS_PER_SAMPLE, jit=False)
  timing = []
  for name, seconds in times.items():
    mode, style = name.split()
    timing.append({"BN": mode, "style": style, "ms/step": seconds * 1e3, "vs pmap": seconds / times[f"{mode} pmap"]})
  print()
  print(common.table(timing, list(timing[0])))
  path = common.save(
    "parallel_styles", rows + timing, "python benchmarks/parallel_styles.py " + " ".join(argv or sys.argv[1:])
  )
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
