#!/usr/bin/env python
"""Train the paper's models with jaxbn, per-device or synced BN, on every device.

    python train.py --dataset fashion_mnist --model mlp --bn sync --devices 8 --steps 2000 --out runs/x

Defaults for --model mlp are the paper's Figure 1 setup (batch 60, 50,000 steps,
sigmoid MLP). See README.md for every flag.
"""

import argparse
import dataclasses
import sys

from jaxbn.data import DatasetNotFoundError
from jaxbn.training import Config, setup_devices, train_and_evaluate

INCEPTION_DEFAULTS = dict(batch_size=32, steps=10_000, optimizer="momentum", lr=0.01, eval_every=500)


def parse_args(argv=None):
  fields = {f.name: f for f in dataclasses.fields(Config)}
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", choices=["mnist", "fashion_mnist"])
  parser.add_argument("--idx-dir", help="directory with the four IDX files")
  parser.add_argument("--data-dir", help="TFDS data dir (prepared data is reused)")
  parser.add_argument("--model", choices=["mlp", "inception"])
  parser.add_argument("--bn", choices=["none", "per-device", "sync"])
  parser.add_argument("--parallel", choices=["jit", "shard_map", "pmap"],
                      help="how the step spans the devices: jax.jit over sharded arrays (default), "
                           "jax.jit(jax.shard_map(...)) or jax.pmap")
  parser.add_argument("--devices", type=int, help="devices to use (on CPU: host devices to create)")
  parser.add_argument("--batch-size", type=int, help="per device")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--lr", type=float)
  parser.add_argument("--lr-decay-steps", type=int)
  parser.add_argument("--lr-decay-rate", type=float)
  parser.add_argument("--optimizer", choices=["sgd", "momentum", "adam"])
  parser.add_argument("--weight-decay", type=float)
  parser.add_argument("--activation", choices=["sigmoid", "relu"])
  parser.add_argument("--dropout", type=float)
  parser.add_argument("--init-std", type=float)
  parser.add_argument("--width", type=int)
  parser.add_argument("--bn-momentum", type=float)
  parser.add_argument("--eval-every", type=int)
  parser.add_argument("--checkpoint-every", type=int)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--out")
  parser.add_argument("--resume", action="store_true", default=None, help="continue from OUT's checkpoint")
  parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
  parser.add_argument("--coordinator", help="host:port of process 0, for several processes")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with JAX's cluster auto-detection (SLURM, TPU pods, ...)")
  args = parser.parse_args(argv)
  given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
  defaults = INCEPTION_DEFAULTS if given.get("model") == "inception" else {}
  config = Config(**{**defaults, **given})
  return config, args


def main(argv=None):
  config, args = parse_args(argv)
  devices = setup_devices(config, args.coordinator, args.num_processes, args.process_id,
                          auto_detect=args.distributed)
  try:
    last = train_and_evaluate(config, devices)
  except DatasetNotFoundError as error:
    sys.exit(f"error: {error}")
  print(f"step {last['step']}: test accuracy {last['test_accuracy']:.4f}, "
        f"test loss {last['test_loss']:.4f} ({last['wall_time']:.1f} s)")


if __name__ == "__main__":
  main()
