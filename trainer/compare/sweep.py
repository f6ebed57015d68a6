"""Running a comparison: every run an ordinary train.py run under DIR/runs/NAME.

DIR/compare.json holds the sweep's training flags (a later command must give the same ones) and
a record per finished run (its command, wall time, commit); it is read and written under a lock
on DIR/.lock, so several compare.py processes (`--shard K/N`, on one host or many sharing DIR)
work on one sweep. A finished run is skipped; an interrupted one resumes from its checkpoint
(train.py --resume).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from trainer import cli, provenance
from trainer.compare.plan import MODES, PlanError, RunSpec, order_key

STATE = "compare.json"
WHERE = ("data_dir", "input_workers")  # where the data is read from and how: may differ between commands
TRAIN = Path(__file__).resolve().parents[2] / "train.py"


class SweepDir:
  def __init__(self, out: Path):
    self.out = Path(out)
    self.runs = self.out / "runs"

  @contextlib.contextmanager
  def locked(self):
    self.out.mkdir(parents=True, exist_ok=True)
    with open(self.out / ".lock", "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)

  def state(self) -> dict:
    path = self.out / STATE
    return json.loads(path.read_text()) if path.exists() else {"train_flags": None, "runs": {}}

  def _write(self, state: dict) -> None:
    tmp = self.out / f".{STATE}.{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(self.out / STATE)

  def claim(self, train_flags: dict) -> None:
    """Adopts the sweep's training flags, or refuses flags that differ from DIR's (one line naming the flag)."""
    with self.locked():
      state = self.state()
      saved = state["train_flags"]
      if saved is None:
        state["train_flags"] = train_flags
        self._write(state)
        return
      for name in sorted(set(saved) | set(train_flags)):
        if name not in WHERE and saved.get(name) != train_flags.get(name):
          theirs = f"no {cli.flag(name)}" if name not in saved else f"{cli.flag(name)} {saved[name]}"
          mine = f"no {cli.flag(name)}" if name not in train_flags else f"{cli.flag(name)} {train_flags[name]}"
          raise PlanError(
            f"{cli.flag(name)}: the sweep in {self.out} was trained with {theirs}, this command has {mine}; "
            "use another --out for other training settings"
          )

  def finished(self, name: str) -> bool:
    try:
      config = json.loads((self.runs / name / "config.json").read_text())
      lines = (self.runs / name / "metrics.jsonl").read_text().splitlines()
      return bool(lines) and json.loads(lines[-1])["step"] == config["steps"]
    except (OSError, ValueError, KeyError):
      return False

  def last_metrics(self, name: str) -> dict:
    return json.loads((self.runs / name / "metrics.jsonl").read_text().splitlines()[-1])

  def records(self) -> tuple[list[dict], list[dict]]:
    """The summary record and the run record (command, wall time, commit) of every finished run in DIR,
    by size, mode and seed."""
    from trainer.compare.report import record

    runs = [(name, info) for name, info in self.state()["runs"].items() if self.finished(name)]
    modes = list(MODES)
    runs.sort(key=lambda r: (order_key(r[1]["size"]), modes.index(r[1]["mode"]), r[1]["seed"]))
    summary = [record(i["size"], i["mode"], i["seed"], self.last_metrics(name)) for name, i in runs]
    return summary, [info for _, info in runs]

  def record(self, name: str, info: dict) -> None:
    with self.locked():
      state = self.state()
      state["runs"][name] = info
      state["machine"] = provenance.machine()
      self._write(state)


def as_argv(flags: dict) -> list[str]:
  """train.py's command-line flags for Config fields (True: --flag; False: --no-flag)."""
  argv = []
  for name, value in flags.items():
    if value is True:
      argv.append(cli.flag(name))
    elif value is False:
      argv.append("--no-" + cli.flag(name)[2:])
    else:
      argv += [cli.flag(name), str(value)]
  return argv


def command(train_flags: dict, spec: RunSpec, sweep: SweepDir) -> list[str]:
  return ["train.py", *as_argv({**train_flags, **spec.flags}), "--out", str(sweep.runs / spec.name)]


def adopted(spec: RunSpec, train_flags: dict, sweep: SweepDir) -> dict:
  """The record of a run that finished outside this sweep's bookkeeping (its wall time from its metrics)."""
  return {
    "command": "python " + " ".join(command(train_flags, spec, sweep)),
    "wall_time_s": round(sweep.last_metrics(spec.name).get("wall_time", 0.0), 1),
    "commit": "?",
    "size": spec.size,
    "mode": spec.mode,
    "seed": spec.seed,
  }


def run_all(specs: list[RunSpec], train_flags: dict, sweep: SweepDir, jobs: int, env: dict) -> list[str]:
  """Trains `specs` (jobs at a time), a line per run started and finished and an estimate of the
  time left; returns the names of the runs that failed (their log: DIR/runs/NAME/train.log)."""
  from tqdm import tqdm

  failed: list[str] = []
  times: list[float] = []  # wall times of the runs finished so far
  ended: list[str] = []
  lock = threading.Lock()
  bar = tqdm(total=len(specs), unit="run", desc="runs", file=sys.stderr, disable=None, dynamic_ncols=True)

  def say(line: str) -> None:
    with lock:
      tqdm.write(line, file=sys.stdout)
      sys.stdout.flush()

  children: set[subprocess.Popen] = set()
  stopping = threading.Event()

  def stop(signum, frame):  # SIGTERM/SIGINT: every running train.py saves its step; no new run starts
    stopping.set()
    with lock:
      for child in children:
        child.send_signal(signal.SIGTERM)

  def one(spec: RunSpec) -> None:
    if stopping.is_set():
      return
    argv = command(train_flags, spec, sweep)
    (sweep.runs / spec.name).mkdir(parents=True, exist_ok=True)
    say(f"start  {spec.name}: python {' '.join(argv)}")
    commit, start = provenance.commit(), time.time()
    with open(sweep.runs / spec.name / "train.log", "a") as log:
      child = subprocess.Popen(
        [sys.executable, str(TRAIN), *argv[1:], "--resume", "--no-progress"],
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,  # signals reach it through compare.py, once
      )
      with lock:
        children.add(child)
      child.wait()
      with lock:
        children.discard(child)
    result = child
    seconds = time.time() - start
    if result.returncode == 0 and not sweep.finished(spec.name):  # stopped by a signal: it saved its step
      say(f"stopped {spec.name} after {seconds / 60:.1f} min; it resumes when the command runs again")
      return
    with lock:
      bar.update()
      ended.append(spec.name)
      if result.returncode == 0:
        times.append(seconds)
      left = len(specs) - len(ended)
      eta = f"; about {left * (sum(times) / len(times)) / jobs / 60:.1f} min left" if times and left else ""
      count = f"{len(ended)}/{len(specs)}"
    if result.returncode != 0:
      last = _last_line(sweep.runs / spec.name / "train.log")
      failed.append(spec.name)
      say(f"FAILED {spec.name} after {seconds:.0f} s (exit {result.returncode}): {last}")
      return
    sweep.record(
      spec.name,
      {
        "command": "python " + " ".join(argv),
        "wall_time_s": round(seconds, 1),
        "commit": commit,
        "size": spec.size,
        "mode": spec.mode,
        "seed": spec.seed,
      },
    )
    say(f"done   {spec.name} in {seconds / 60:.1f} min ({count} runs{eta})")

  previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
      futures = [pool.submit(one, spec) for spec in specs]
      while not all(f.done() for f in futures):  # the main thread stays free to take signals
        time.sleep(0.2)
      for future in futures:
        future.result()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    bar.close()
  if stopping.is_set():
    raise Stopped
  return failed


class Stopped(Exception):
  """SIGTERM/SIGINT: the running train.py runs saved their step and stopped."""


def _last_line(path: Path) -> str:
  lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
  return lines[-1][:300] if lines else "(no output)"
