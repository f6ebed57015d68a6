"""Runs the experiments' train.py commands and comparisons, and collects their metrics.

    python experiments/run.py --size {default,full} [--only e1,e3] [--match seed1] [--shard 0/2] [--runs runs]

A comparison (E4, E4-long) is compare.py with its settings (experiments/plan.py COMPARISONS) and
--out RUNS/SIZE/EXPERIMENT; its compare.json, summary.json and each run's metrics and config are
copied to REPORTS/SIZE/data/EXPERIMENT/ (`--shard` is compare.py's; `--match` does not apply).

Each run's output goes to RUNS/SIZE/EXPERIMENT/NAME; a finished run is skipped
and an interrupted one resumes from its checkpoint, so the whole set can be
restarted. Metrics and configs are copied to REPORTS/SIZE/data/EXPERIMENT/,
with each run's exact command, wall time, commit and machine in that
directory's runs.json (one file per experiment, so that runs of different
experiments can go on in parallel: `--only e1` and `--only e2,e3`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.plan import COMPARISONS, runs
from trainer import cli, provenance

ROOT = Path(__file__).resolve().parents[1]


def _finished(out: Path) -> bool:
  try:
    config = json.loads((out / "config.json").read_text())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return bool(lines) and json.loads(lines[-1])["step"] == config["steps"]
  except (OSError, ValueError, KeyError):
    return False


def select(plan, only=None, match=None, shard=None) -> list:
  """The runs of `plan` in experiments `only`, whose names contain `match`, and of
  shard "K/N" (every N-th run from the K-th, 0-based: N streams side by side)."""
  plan = [r for r in plan if (only is None or r.experiment in only) and (match is None or match in r.name)]
  try:
    k, n = cli.shard(shard)
  except ValueError as error:
    raise SystemExit(f"error: {error}") from None
  return plan[k::n]


def compare(name: str, flags: tuple[str, ...], args) -> None:
  """One comparison through compare.py, then its metrics (not its checkpoints) into the report's data."""
  out = Path(args.runs) / args.size / name
  command = [sys.executable, "compare.py", *flags, "--data-dir", args.data_dir, "--out", str(out)]
  print(f"{name}: python {' '.join(command[1:])}", flush=True)
  result = subprocess.run(command + (["--shard", args.shard] if args.shard else []), cwd=ROOT)
  if result.returncode != 0:
    sys.exit(f"{name} failed with exit code {result.returncode}")
  publish(ROOT / out, ROOT / args.reports / args.size / "data" / name)


def publish(sweep: Path, target: Path) -> None:
  """compare.json, summary.json and runs/NAME/{metrics.jsonl, config.json} of a sweep directory's
  finished runs (not their checkpoints)."""
  from trainer.compare.sweep import SweepDir

  finished = [d for d in sorted((sweep / "runs").glob("*")) if SweepDir(sweep).finished(d.name)]
  files = [sweep / "compare.json", sweep / "summary.json"]
  files += [d / name for d in finished for name in ("metrics.jsonl", "config.json")]
  for file in files:
    if file.exists():
      copy = target / file.relative_to(sweep)
      copy.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(file, copy)


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=list(COMPARISONS), default="default")
  parser.add_argument("--only", help="comma-separated experiments (e1,e1_sweep,e2,e3,e4,e4_long,e5)")
  parser.add_argument("--match", help="only the runs whose name contains this (e.g. seed1)")
  parser.add_argument("--shard", help="K/N: every N-th run from the K-th (0-based), for N run.py side by side")
  parser.add_argument("--runs", default="runs")
  parser.add_argument("--reports", default="reports")
  parser.add_argument("--data-dir", default="data")
  args = parser.parse_args(argv)
  only = set(args.only.split(",")) if args.only else None
  data_root = ROOT / args.reports / args.size / "data"

  for name, flags in COMPARISONS[args.size].items():
    if only is None or name in only:
      compare(name, flags, args)
  plan = select(runs(args.size), only, args.match, args.shard)
  for i, run in enumerate(plan, 1):
    commit = provenance.commit()  # per run: the tree may move on while a long set runs
    out = ROOT / args.runs / args.size / run.experiment / run.name
    command = [
      "python",
      "train.py",
      *run.args,
      "--data-dir",
      args.data_dir,
      "--out",
      str(Path(args.runs) / args.size / run.experiment / run.name),
    ]
    key, record = run.name, None
    if _finished(out):
      print(f"[{i}/{len(plan)}] {run.experiment}/{key}: done already", flush=True)
    else:
      print(f"[{i}/{len(plan)}] {run.experiment}/{key}: {' '.join(command)}", flush=True)
      start = time.time()
      result = subprocess.run([sys.executable, *command[1:], "--resume", "--no-progress"], cwd=ROOT)
      if result.returncode != 0:
        sys.exit(f"{run.experiment}/{key} failed with exit code {result.returncode}")
      record = {
        "command": " ".join(command),
        "wall_time_s": round(time.time() - start, 1),
        "commit": commit,
        "labels": run.labels,
      }
    target = data_root / run.experiment
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "metrics.jsonl", target / f"{run.name}.jsonl")
    shutil.copy(out / "config.json", target / f"{run.name}.json")
    # read, update and write under a lock on the directory: another run.py may be
    # running other runs of this experiment
    lock = os.open(target, os.O_RDONLY)
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
      meta_path = target / "runs.json"
      meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"runs": {}}
      meta.update(size=args.size, machine=provenance.machine())
      if record:
        meta["runs"][key] = record
      meta["runs"].setdefault(key, {"command": " ".join(command), "commit": commit, "labels": run.labels})
      meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    finally:
      os.close(lock)


if __name__ == "__main__":
  main()
