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
  return _Runs(specs, train_flags, sweep, jobs, env).run()


class _Runs:
  """The train.py runs of one sweep, `jobs` at a time: progress lines, the estimate of the time
  left, and SIGTERM/SIGINT passed on to every running child (each saves its step)."""

  def __init__(self, specs: list[RunSpec], train_flags: dict, sweep: SweepDir, jobs: int, env: dict):
    from tqdm import tqdm

    self.specs, self.train_flags, self.sweep, self.jobs, self.env = specs, train_flags, sweep, jobs, env
    self.failed: list[str] = []
    self.times: list[float] = []  # wall times of the runs finished so far
    self.ended: list[str] = []
    self.lock = threading.Lock()
    self.children: set[subprocess.Popen] = set()
    self.stopping = threading.Event()
    self.tqdm = tqdm
    self.bar = tqdm(total=len(specs), unit="run", desc="runs", file=sys.stderr, disable=None, dynamic_ncols=True)

  def say(self, line: str) -> None:
    with self.lock:
      self.tqdm.write(line, file=sys.stdout)
      sys.stdout.flush()

  def stop(self, signum, frame):  # every running train.py saves its step; no new run starts
    self.stopping.set()
    with self.lock:
      for child in self.children:
        child.send_signal(signal.SIGTERM)

  def train(self, spec: RunSpec, argv: list[str]) -> int:
    """train.py for `spec` (resuming it), its output in its train.log; its exit status."""
    (self.sweep.runs / spec.name).mkdir(parents=True, exist_ok=True)
    with open(self.sweep.runs / spec.name / "train.log", "a") as log:
      child = subprocess.Popen(
        [sys.executable, str(TRAIN), *argv[1:], "--resume", "--no-progress"],
        stdout=log,
        stderr=log,
        env=self.env,
        start_new_session=True,  # signals reach it through compare.py, once
      )
      with self.lock:
        self.children.add(child)
      child.wait()
      with self.lock:
        self.children.discard(child)
    return child.returncode

  def ended_one(self, name: str, seconds: float, ok: bool) -> str:
    """Counts a finished run; "(K/N runs; about M min left)"."""
    with self.lock:
      self.bar.update()
      self.ended.append(name)
      if ok:
        self.times.append(seconds)
      left = len(self.specs) - len(self.ended)
      eta = (
        f"; about {left * (sum(self.times) / len(self.times)) / self.jobs / 60:.1f} min left"
        if self.times and left
        else ""
      )
      return f"({len(self.ended)}/{len(self.specs)} runs{eta})"

  def one(self, spec: RunSpec) -> None:
    if self.stopping.is_set():
      return
    argv = command(self.train_flags, spec, self.sweep)
    self.say(f"start  {spec.name}: python {' '.join(argv)}")
    commit, start = provenance.commit(), time.time()
    returncode = self.train(spec, argv)
    seconds = time.time() - start
    if returncode == 0 and not self.sweep.finished(spec.name):  # stopped by a signal: it saved its step
      self.say(f"stopped {spec.name} after {seconds / 60:.1f} min; it resumes when the command runs again")
      return
    progress = self.ended_one(spec.name, seconds, returncode == 0)
    if returncode != 0:
      last = _last_line(self.sweep.runs / spec.name / "train.log")
      self.failed.append(spec.name)
      self.say(f"FAILED {spec.name} after {seconds:.0f} s (exit {returncode}): {last}")
      return
    # a resumed run's own wall time continues across its sittings (up to its last training step); `seconds` is
    # this sitting's, start-up and final evaluation included
    wall_time = max(seconds, self.sweep.last_metrics(spec.name).get("wall_time") or 0.0)
    record = {"command": "python " + " ".join(argv), "wall_time_s": round(wall_time, 1), "commit": commit}
    self.sweep.record(spec.name, {**record, "size": spec.size, "mode": spec.mode, "seed": spec.seed})
    self.say(f"done   {spec.name} in {seconds / 60:.1f} min {progress}")

  def run(self) -> list[str]:
    previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
        futures = [pool.submit(self.one, spec) for spec in self.specs]
        while not all(f.done() for f in futures):  # the main thread stays free to take signals
          time.sleep(0.2)
        for future in futures:
          future.result()
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
      self.bar.close()
    if self.stopping.is_set():
      raise Stopped
    return self.failed


class Stopped(Exception):
  """SIGTERM/SIGINT: the running train.py runs saved their step and stopped."""


def _last_line(path: Path) -> str:
  lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
  return lines[-1][:300] if lines else "(no output)"
