#!/usr/bin/env python
"""Train with jaxbn: no BN, per-device or synced BN, on every device, in any parallel style.

    python train.py --model resnet20 --dataset cifar10 --bn sync --out runs/r20
    python train.py --model resnet20 --image-folder DIR --dtype bfloat16 --out runs/mine
    python train.py --model mlp --bn per-device --devices 8 --steps 2000 --out runs/x

Each model has its published recipe (listed below); a flag given overrides it.
A run writes OUT/config.json, OUT/data.json, OUT/metrics.jsonl and
OUT/checkpoints/; see README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from trainer import cli
from trainer.bn_modes import BN_MODES
from trainer.config import DEFAULTS, Config, ConfigError
from trainer.models import MODELS, ModelOptions

# Config fields that are not flags of their own (see the options below).
NOT_FLAGS = ("resume", "progress")
MODEL_OPTIONS = {f.name for f in dataclasses.fields(ModelOptions)}


def _as_flag(name: str, value) -> str:
  return cli.flag(name) if value is True else f"{cli.flag(name)} {value}"


def _recipes() -> str:
  lines = ["models and their recipes (flags a model sets unless given):"]
  for name, spec in MODELS.items():
    recipe = ", ".join(_as_flag(k, v) for k, v in spec.recipe.items())
    lines.append(f"  {name:10} {spec.summary}\n  {'':10} {recipe}")
  lines.append("BN modes:")
  lines += [f"  {name:10} {mode.summary}" for name, mode in BN_MODES.items()]
  return "\n".join(lines).replace("%%", "%")


def _default(field: dataclasses.Field) -> str:
  if "(default:" in field.metadata["help"]:  # the help says it in its own words
    return ""
  if field.name in DEFAULTS:
    general = DEFAULTS[field.name]
    return " (default: the model's recipe" + ("" if general is None else f", else {general}") + ")"
  return "" if field.default is None else f" (default: {field.default})"


def add_config_flags(parser, skip=()) -> None:
  """A flag per Config field (but NOT_FLAGS and `skip`), with its help, default and choices;
  the flags of particular models (`ModelOptions`) last."""
  for field in sorted(dataclasses.fields(Config), key=lambda f: f.name in MODEL_OPTIONS):
    if field.name in NOT_FLAGS or field.name in skip:
      continue
    flag = cli.flag(field.name)
    help = field.metadata["help"] + _default(field)
    choices = field.metadata.get("choices")
    if field.type in ("bool", "bool | None"):
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
    elif choices:
      parser.add_argument(flag, choices=[c for c in choices if c is not None], help=help)
    else:
      kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(str(field.type), str)
      parser.add_argument(flag, type=kind, metavar=field.name.upper(), help=help)


def make_parser():
  parser = cli.ArgumentParser(
    prog="train.py", description=__doc__, epilog=_recipes(), formatter_class=argparse.RawDescriptionHelpFormatter
  )
  add_config_flags(parser)
  parser.add_argument(
    "--resume",
    action="store_true",
    default=None,
    help="continue the run in OUT from its latest checkpoint (its configuration must match, but --steps); "
    "a finished run prints its final metrics",
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
    "--peer-timeout",
    type=int,
    default=60,
    metavar="SECONDS",
    help="several processes: a process whose peer has not answered for this long (killed, crashed, machine "
    "gone) exits with one line instead of hanging on a collective (default: 60)",
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
  try:
    config = Config(**given)
  except ConfigError as error:
    parser.error(str(error))
  if args.overwrite and config.resume:
    parser.error("--overwrite: cannot be combined with --resume")
  several = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in several) and not all(v is not None for v in several):
    parser.error("--coordinator, --num-processes and --process-id: give all three, or none")
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id: expected 0..{args.num_processes - 1}, got {args.process_id}")
  for flag in ("connect_timeout", "peer_timeout"):
    if getattr(args, flag) < 1:
      parser.error(f"{cli.flag(flag)}: expected a positive number of seconds, got {getattr(args, flag)}")
  return config, args, parser


def main(argv=None):
  config, args, parser = parse_args(argv)
  # The training stack is imported only now: --help and usage errors stay fast.
  from pathlib import Path

  import jax

  from trainer import distributed, rundir
  from trainer.data import DatasetError
  from trainer.loop import CheckpointError, NonFiniteLossError, Preempted, setup_devices, train_and_evaluate

  again = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume", "--overwrite")]
  resume_command = f"python train.py {' '.join(again)} --resume"

  def resume_hint() -> str:
    step = rundir.last_checkpoint(Path(config.out))
    saved = f"the last checkpoint is step {step}" if step is not None else "no checkpoint was saved yet"
    return f"In {config.out} {saved}; with every process started again, continue with: {resume_command}"

  distributed.set_resume_hint(resume_hint)
  try:
    if args.overwrite and rundir.holds_run(Path(config.out)):
      print(f"--overwrite: the old run is now {rundir.move_aside(Path(config.out))}", file=sys.stderr)
    rundir.check(config)  # before the processes connect (train_and_evaluate checks again, for Python callers)
    if config.resume and not rundir.holds_run(Path(config.out)):
      # A requeued job runs its command again before the first checkpoint exists: start, but say so.
      print(f"--resume: {config.out} holds no run yet; starting a new one there", file=sys.stderr)
    devices = setup_devices(
      config,
      args.coordinator,
      args.num_processes,
      args.process_id,
      auto_detect=args.distributed,
      timeout=args.connect_timeout,
      peer_timeout=args.peer_timeout,
    )
    last = train_and_evaluate(config, devices)
  except (rundir.RunDirError, ConfigError) as error:
    parser.error(str(error))
  except (DatasetError, NonFiniteLossError, CheckpointError, ConnectionError) as error:
    if isinstance(error, CheckpointError) and jax.process_count() > 1:
      _exit_if_a_peer_is_gone(error, args.peer_timeout)  # a save's collective fails when a peer dies
    sys.exit(f"error: {error}")
  except Preempted as stopped:
    print(
      f"stopped at step {stopped.step} on {stopped.signal_name}: its checkpoint is in {config.out}/checkpoints; "
      f"continue with: {resume_command}",
      file=sys.stderr,
    )
    sys.exit(0)
  except Exception as error:
    if jax.process_count() == 1:
      raise
    # Several processes: most often a collective failed because another process died.
    _exit_if_a_peer_is_gone(error, args.peer_timeout)
    distributed.peer_lost(
      f"error: process {jax.process_index()}: a collective failed, another process died? "
      f"({cli.first_line(error, 160)}); exiting."
    )
  print(
    f"step {last['step']}: test accuracy {last['test_accuracy']:.4f}, "
    f"test loss {last['test_loss']:.4f} (wall time {last['wall_time']:.1f} s)"
  )


def _exit_if_a_peer_is_gone(error: Exception, peer_timeout: int) -> None:
  """Exit in one line naming the lost process, the last checkpoint and how to resume, when the
  peer watch (trainer.distributed.PeerWatch) sees within seconds that a process is gone."""
  from trainer import distributed

  gone = distributed.lost_peers(wait=min(peer_timeout, 15))
  if gone:
    import jax

    distributed.peer_lost(
      f"error: process {jax.process_index()}: process {', '.join(gone)} is gone "
      f"({cli.first_line(error, 160)}); exiting."
    )


if __name__ == "__main__":
  main()
