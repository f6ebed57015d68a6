#!/usr/bin/env python
"""Per-device vs synced BN, compared on your model, data and devices: a sweep of normalization batches.

    python compare.py --model resnet20 --dataset cifar10 --normalization-batch 2,4,8,16,32,sync --out runs/cmp
    python compare.py --model resnet20 --image-folder DIR --steps 2000 --normalization-batch 4,16,sync --out runs/mine

Every train.py flag that describes training is taken as it is (the model's recipe fills the rest).
The normalization batch (the examples one BN statistic is computed over) is swept: below the
per-device batch, groups of each device's batch; equal to it, per-device BN; above it, groups of the
global batch on one device; `sync`, synced BN over the whole global batch. Each run is an ordinary
train.py run in OUT/runs/NAME (its checkpoints, refusals and resume hold run by run), evaluated
four ways at the end (running averages, PreciseBN pooled and paper, test-batch statistics).
Run the same command again: finished runs are skipped, interrupted ones resume; more sizes or
seeds add runs. OUT/report.md, OUT/summary.json and OUT/accuracy.png are written at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import train
from trainer import cli
from trainer.compare import plan
from trainer.config import Config, ConfigError

# Config fields compare.py sets per run (the sweep), and train.py flags it does not take.
SWEPT = (
  "bn",
  "bn_group_size",
  "frozen_bn_steps",
  "population_batches",
  "population_estimator",
  "eval_batch_stats",
  "seed",
  "out",
)


def make_parser():
  parser = cli.ArgumentParser(
    prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sweep = parser.add_argument_group("the comparison")
  sweep.add_argument(
    "--normalization-batch",
    required=True,
    metavar="LIST",
    help="normalization batches to compare: sizes and/or sync, e.g. 2,4,8,32,sync",
  )
  sweep.add_argument("--seeds", default="0,1,2", metavar="LIST", help="seeds of every setting (default: 0,1,2)")
  sweep.add_argument(
    "--repairs",
    default="",
    metavar="LIST",
    help="also try renorm (Batch Renorm) and/or frozen (a FrozenBN final "
    f"phase: the last 1/{plan.FROZEN_SHARE} of the steps) at --repair-sizes",
  )
  sweep.add_argument("--repair-sizes", default="", metavar="LIST", help="sizes of the sweep to try the repairs at")
  sweep.add_argument(
    "--population-samples",
    type=int,
    default=plan.DEFAULT_POPULATION_SAMPLES,
    metavar="N",
    help=f"PreciseBN's training samples per evaluation (default: {plan.DEFAULT_POPULATION_SAMPLES:,})",
  )
  sweep.add_argument("--out", required=True, help="the sweep's directory (runs, report.md, summary.json)")
  sweep.add_argument(
    "--jobs",
    type=int,
    default=1,
    metavar="N",
    help="runs at once on this host; each sees every device, so on a GPU host N runs share the GPUs "
    "(each gets 1/N of their memory) and on a CPU host the cores (default: 1)",
  )
  sweep.add_argument(
    "--shard",
    metavar="K/N",
    help="this process trains every N-th run from the K-th (0-based): N processes or hosts sharing --out",
  )
  training = parser.add_argument_group("training (train.py's flags; see train.py --help)")
  train.add_config_flags(training, skip=SWEPT)
  return parser


def parse_args(argv=None):
  """The sweep, the training flags given, and the resolved Config; a one-line usage error otherwise."""
  parser = make_parser()
  args = parser.parse_args(argv)
  given = {
    name: value for name, value in vars(args).items() if name in Config.__dataclass_fields__ and value is not None
  }
  given.pop("out", None)
  try:
    sweep = plan.Sweep(
      sizes=plan.parse_sizes(args.normalization_batch),
      seeds=plan.parse_seeds(args.seeds),
      repairs=plan.parse_repairs(args.repairs),
      repair_sizes=plan.parse_sizes(args.repair_sizes, "--repair-sizes") if args.repair_sizes.strip() else [],
      population_samples=args.population_samples,
    )
    config = Config(**given, bn="sync")
    devices = config.devices or _device_count()
    global_batch = config.global_batch(devices)
    sweep.check(global_batch, devices)
    if args.jobs < 1:
      raise plan.PlanError(f"--jobs: expected a positive integer, got {args.jobs}")
    shard = cli.shard(args.shard)
  except (plan.PlanError, ConfigError, ValueError) as error:
    parser.error(str(error))
  return args, sweep, given, config, devices, global_batch, shard


def _device_count() -> int:
  import jax

  return jax.device_count()


def main(argv=None):
  args, sweep, given, config, devices, global_batch, (k, n) = parse_args(argv)
  from trainer.compare.sweep import Stopped, SweepDir, adopted, run_all

  command = "python compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
  out = SweepDir(Path(args.out))
  # the devices every run sees: fixed in the sweep's training flags, so a later command must match
  train_flags = {**given, "devices": devices}
  _claim_and_prepare(out, train_flags, config)
  specs = sweep.runs(global_batch, devices, config.steps)
  print(f"{len(specs)} runs ({len(sweep.seeds)} seeds), global batch {global_batch}, {config.steps:,} steps each:")
  for size in sweep.sizes:
    print(f"  normalization batch {size}: {plan.describe(size, global_batch, devices)}")
  mine = specs[k::n]
  todo = [s for s in mine if not out.finished(s.name)]
  known = out.state()["runs"]
  for spec in mine:  # finished before DIR had a record of it (e.g. trained by train.py itself): adopt it
    if spec not in todo and spec.name not in known:
      out.record(spec.name, adopted(spec, train_flags, out))
  print(f"{len(mine) - len(todo)} of this process's {len(mine)} runs finished already; training {len(todo)}")
  env = dict(os.environ)
  if args.jobs > 1:  # GPU memory: each run preallocates its share, not 75% of it
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.jobs:.3f}")
  try:
    failed = run_all(todo, train_flags, out, args.jobs, env)
  except Stopped:
    print(f"stopped: the runs in progress saved their step; continue with: {command}", file=sys.stderr)
    sys.exit(0)
  finished = _write_report(out, sweep, train_flags, config, global_batch, devices, command)
  print(f"{finished} runs finished in {args.out}; report: {out.out / 'report.md'}")
  if failed:
    sys.exit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (their train.log says why)")


def _claim_and_prepare(out, train_flags: dict, config: Config) -> None:
  """The sweep's training flags (or a one-line refusal), and the dataset prepared once, before the
  runs (and other shards sharing the data dir) open it at the same time."""
  from trainer.data import DatasetError
  from trainer.loop import open_data_of

  try:
    out.claim(train_flags)
  except plan.PlanError as error:
    make_parser().error(str(error))
  try:
    with out.locked():
      open_data_of(config)
  except DatasetError as error:
    sys.exit(f"error: {error}")


def _write_report(out, sweep, train_flags, config, global_batch: int, devices: int, command: str) -> int:
  """report.md, summary.json and the figure of every finished run in DIR (under its lock: whichever
  shard finishes last writes the whole); returns how many runs that is."""
  from trainer import provenance
  from trainer.compare import report

  with out.locked():
    records, infos = out.records()
    sizes = sorted({r["normalization_batch"] for r in records} | set(sweep.sizes), key=plan.order_key)
    flags = {
      **train_flags,
      "normalization_batch": sweep.sizes,
      "seeds": sweep.seeds,
      "repairs": sweep.repairs,
      "repair_sizes": sweep.repair_sizes,
      "population_samples": sweep.population_samples,
    }
    about = {
      "title": _title(config),
      "command": command,
      "commits": sorted({i.get("commit", "?") for i in infos}) or [provenance.commit()],
      "machine": out.state().get("machine", provenance.machine()),
      "wall_time_min": sum(i.get("wall_time_s", 0.0) for i in infos) / 60,
      "runs": len(records),
      "placements": {n: plan.describe(n, global_batch, devices) for n in sizes},
      "global_batch": global_batch,
      "steps": config.steps,
    }
    report.write(out.out, records, flags, about)
  return len(records)


def _title(config: Config) -> str:
  data = f"images in {config.image_folder}" if config.image_folder else config.dataset
  return f"{config.model} on {data}"


if __name__ == "__main__":
  main()
