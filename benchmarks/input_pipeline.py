"""The streamed input against the device-resident one: training steps per second, and the pipeline alone.

    python benchmarks/input_pipeline.py [--rounds 5] [--steps 20] [--workers N]

ResNet-20 on Fashion-MNIST (global batch 128, crop-flip, one device): train.py's
own step program fed by `trainer.input.StreamFeed` (each step's batch read from
the TFDS data source and augmented by grain's worker processes, then placed on
the device) and by `DeviceFeed` (the split on the device, the batch gathered
there), `--steps` steps per sample, the two interleaved round by round. Then the
stream alone, without a model: images per second one host can deliver.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer
from benchmarks import common
from trainer import cli
from trainer import data as data_lib
from trainer.input import DeviceFeed, Pixels, StreamFeed, default_workers, plan_batches


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20, help="training steps per timed sample")
  parser.add_argument("--workers", type=int, default=None, help="grain worker processes (default: cores - 1)")
  parser.add_argument("--data-dir", default="data")
  args = parser.parse_args(argv)
  workers = default_workers() if args.workers is None else args.workers
  config = trainer.Config(model="resnet20", dataset="fashion_mnist", bn="sync", data_dir=args.data_dir)
  data = data_lib.open_dataset("fashion_mnist", data_dir=args.data_dir)
  batches, _ = plan_batches(config, data, config.global_batch(1))
  pixels = Pixels(*data.channel_stats())
  parallel = trainer.make_parallel("jit", jax.devices()[:1])
  state = parallel.put_state(trainer.create_train_state(config, batches.image_shape, num_classes=10))
  kwargs = dict(
    model=trainer.make_model(config, 10, 1),
    optimizer=trainer.make_optimizer(config),
    batches=batches,
    pixels=pixels,
  )
  rows = range(batches.global_batch)
  total = args.steps * (2 * args.rounds + 1)
  feeds = {
    "device": (DeviceFeed(parallel, *data_lib.read_split(data.train), batches, rows), True),
    "stream": (StreamFeed(parallel, data.train, batches, rows, 0, total, workers), False),
  }
  programs = {name: parallel.step_program(state, resident=resident, **kwargs) for name, (_, resident) in feeds.items()}
  position = dict.fromkeys(feeds, 0)

  def run(name, state, count):
    feed = feeds[name][0]
    for _ in range(count):
      state, loss = programs[name](state, *feed.inputs(position[name]))
      jax.block_until_ready(loss)  # as train.py does on CPU host devices
      position[name] += 1
    return state

  for name in feeds:  # compile and warm up (the stream's workers start)
    state = run(name, state, args.steps)
  samples: dict[str, list[float]] = {name: [] for name in feeds}
  names = list(feeds)
  for r in range(args.rounds):
    for name in names[r % 2 :] + names[: r % 2]:
      start = time.perf_counter()
      state = run(name, state, args.steps)
      samples[name].append((time.perf_counter() - start) / args.steps)
  step_s = {name: float(np.median(v)) for name, v in samples.items()}
  for feed, _ in feeds.values():
    feed.close()

  # The pipeline alone: steps of the global batch delivered per second, no model.
  alone = StreamFeed(parallel, data.train, batches, rows, 0, 10 * args.steps + 8, workers)
  alone.inputs(0)  # the workers are up
  start = time.perf_counter()
  for step in range(1, 10 * args.steps):
    jax.block_until_ready(alone.inputs(step))
  images_per_s = (10 * args.steps - 1) * batches.global_batch / (time.perf_counter() - start)
  alone.close()

  result = [
    {"input": "device", "steps/s": 1 / step_s["device"], "images/s": batches.global_batch / step_s["device"]},
    {
      "input": f"stream ({workers} workers)",
      "steps/s": 1 / step_s["stream"],
      "images/s": batches.global_batch / step_s["stream"],
      "vs device": step_s["device"] / step_s["stream"],
    },
    {"input": f"stream alone, no model ({workers} workers)", "images/s": images_per_s},
  ]
  path = common.save("input_pipeline", result, "python benchmarks/input_pipeline.py " + " ".join(argv or sys.argv[1:]))
  print(common.table(result, ["input", "steps/s", "images/s", "vs device"]))
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
