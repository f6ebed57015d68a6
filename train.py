#!/usr/bin/env python
"""Train the paper's models with jaxbn: no BN, per-device or synced BN, on every device.

    python train.py --dataset fashion_mnist --model mlp --bn sync --devices 8 --steps 2000 --out runs/x

Defaults for --model mlp are the paper's Figure 1 setup (batch 60, 50,000 steps, sigmoid
MLP); --model inception changes the defaults marked "inception". A run writes
OUT/config.json, OUT/metrics.jsonl and OUT/checkpoints/; see README.md.
"""

import argparse
import dataclasses
import sys

from trainer.config import Config, ConfigError

INCEPTION_DEFAULTS = dict(batch_size=32, steps=10_000, optimizer="momentum", lr=0.01, eval_every=500)

# flag -> (type or choices, help); defaults come from Config (and INCEPTION_DEFAULTS).
FLAGS = {
  "dataset": (["mnist", "fashion_mnist"], "dataset by name"),
  "idx_dir": (
    str,
    "directory with the four IDX files (train-images-idx3-ubyte[.gz], ...); prepared data from other files is rebuilt",
  ),
  "data_dir": (str, "TFDS data dir; prepared data is reused"),
  "model": (["mlp", "inception"], "the paper's MLP 784-100-100-100-10 or a small Inception-style convnet"),
  "bn": (
    ["none", "per-device", "sync", "renorm"],
    "no BN, BN with each device's batch, BN with the global batch, or Batch Renorm with each "
    "device's batch (r_max 1->3, d_max 0->5 from 10%% to 60%% of --steps)",
  ),
  "parallel": (
    ["jit", "shard_map", "pmap"],
    "how the step spans the devices: jax.jit over sharded arrays, jax.jit(jax.shard_map(...)) or jax.pmap",
  ),
  "devices": (int, "devices to use (on CPU: host devices to create; default: every device)"),
  "batch_size": (int, "examples per device per step (global batch = this x devices)"),
  "steps": (int, "training steps (raise it with --resume to train longer)"),
  "optimizer": (["sgd", "momentum", "adam"], "optax optimizer (momentum: 0.9)"),
  "lr": (float, "learning rate"),
  "lr_decay_steps": (int, "multiply the learning rate by --lr-decay-rate every N steps (0: off)"),
  "lr_decay_rate": (float, "staircase decay factor"),
  "weight_decay": (float, "L2 weight decay on kernels"),
  "activation": (["sigmoid", "relu"], "hidden activation (default: sigmoid for mlp, relu for inception)"),
  "dropout": (float, "dropout rate (inception)"),
  "init_std": (float, "MLP weights ~ N(0, init_std^2)"),
  "width": (int, "inception channel multiplier"),
  "bn_momentum": (float, "running-average decay of BN statistics (flax meaning)"),
  "eval_every": (int, "evaluate on the whole test set every N steps (also the steps per dispatch)"),
  "population_batches": (
    int,
    "also evaluate with population statistics (paper Algorithm 2) over N "
    "training batches of the size BN normalizes over in training (one device's "
    "for per-device BN); 0: off",
  ),
  "checkpoint_every": (
    int,
    "checkpoint every N steps, a multiple of --eval-every (default: 10,000 rounded up to one), and at the end",
  ),
  "seed": (int, "random seed (initialization, data order, dropout)"),
  "out": (str, "run directory"),
}


def _default(name):
  field = {f.name: f for f in dataclasses.fields(Config)}[name]
  text = "" if field.default is None else f" (default: {field.default}"
  if name in INCEPTION_DEFAULTS:
    text += f"; inception: {INCEPTION_DEFAULTS[name]}"
  return text + ")" if text else ""


def make_parser():
  parser = argparse.ArgumentParser(
    prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  for name, (kind, text) in FLAGS.items():
    flag = "--" + name.replace("_", "-")
    if isinstance(kind, list):
      parser.add_argument(flag, choices=kind, help=text + _default(name))
    else:
      parser.add_argument(flag, type=kind, metavar=name.upper(), help=text + _default(name))
  parser.add_argument(
    "--resume",
    action="store_true",
    default=None,
    help="continue the run in OUT from its latest checkpoint (its configuration must "
    "match, but --steps); a finished run prints its final metrics",
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="start a new run in an OUT that holds one; the old run is renamed, not deleted",
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    default=None,
    help="no progress bar (default: a bar on a terminal only)",
  )
  parser.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, for several processes")
  parser.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
  parser.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
  parser.add_argument(
    "--connect-timeout",
    type=int,
    default=120,
    metavar="SECONDS",
    help="give up when the other processes are not reached within this time (default: 120)",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="jax.distributed.initialize() with JAX's cluster auto-detection (SLURM, TPU pods, ...)",
  )
  return parser


def parse_args(argv=None):
  """The configuration, or a one-line usage error (exit 2) before any work."""
  parser = make_parser()
  args = parser.parse_args(argv)
  given = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
  defaults = INCEPTION_DEFAULTS if given.get("model") == "inception" else {}
  try:
    config = Config(**{**defaults, **given})
  except ConfigError as error:
    parser.error(str(error))
  if args.overwrite and config.resume:
    parser.error("--overwrite: cannot be combined with --resume")
  several = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in several) and not all(v is not None for v in several):
    parser.error("--coordinator, --num-processes and --process-id: give all three, or none")
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id: expected 0..{args.num_processes - 1}, got {args.process_id}")
  if args.connect_timeout < 1:
    parser.error(f"--connect-timeout: expected a positive number of seconds, got {args.connect_timeout}")
  return config, args, parser


def main(argv=None):
  config, args, parser = parse_args(argv)
  # The training stack is imported only now: --help and usage errors stay fast.
  from pathlib import Path

  from trainer import rundir
  from trainer.data import DatasetError
  from trainer.loop import CheckpointError, NonFiniteLossError, setup_devices, train_and_evaluate

  try:
    if args.overwrite and rundir.holds_run(Path(config.out)):
      print(f"--overwrite: the old run is now {rundir.move_aside(Path(config.out))}", file=sys.stderr)
    rundir.check(config)
    devices = setup_devices(
      config,
      args.coordinator,
      args.num_processes,
      args.process_id,
      auto_detect=args.distributed,
      timeout=args.connect_timeout,
    )
    last = train_and_evaluate(config, devices)
  except rundir.RunDirError as error:
    parser.error(str(error))
  except (DatasetError, NonFiniteLossError, CheckpointError, ConnectionError) as error:
    sys.exit(f"error: {error}")
  print(
    f"step {last['step']}: test accuracy {last['test_accuracy']:.4f}, "
    f"test loss {last['test_loss']:.4f} (wall time {last['wall_time']:.1f} s)"
  )


if __name__ == "__main__":
  main()
