"""How fast train.py stops on preemption, and how fast a process notices a dead peer.

    python benchmarks/preemption.py [--model resnet20] [--peer-timeouts 5,15]

ResNet-20 on Fashion-MNIST (global batch 128, `--input stream`), as a user runs it:
- one process: SIGTERM once training runs; seconds until it has saved its step and exited;
- two processes on 127.0.0.1 (one CPU device each, synced BN): SIGTERM to one of them;
  seconds until both have exited, and whether they saved the same step;
- two processes, `kill -9` on one: seconds until the other exits, for each `--peer-timeout`.
Each trial starts when the run has evaluated and saved its step 10 (compilation done), at the
first of every 10 steps (a checkpoint needs an evaluation).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common
from trainer import cli

ROOT = Path(__file__).resolve().parents[1]
STARTED = 10  # the checkpoint step that says training runs


def _command(args, out: Path, *extra: str) -> list[str]:
  return [
    sys.executable,
    str(ROOT / "train.py"),
    "--model",
    args.model,
    "--dataset",
    "fashion_mnist",
    "--data-dir",
    args.data_dir,
    "--input",
    "stream",
    "--steps",
    "100000",
    "--eval-every",
    str(STARTED),
    "--checkpoint-every",
    str(STARTED),
    "--bn",
    "sync",
    "--no-progress",
    "--out",
    str(out),
    *extra,
  ]


def _start(args, out: Path, processes: int, *extra: str) -> list[subprocess.Popen]:
  if processes == 1:
    commands = [_command(args, out, "--devices", "1", *extra)]
  else:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    cluster = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--input-workers", "0")
    commands = [
      _command(args, out, "--devices", "1", *cluster, "--process-id", str(i), *extra) for i in range(processes)
    ]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  procs = [
    subprocess.Popen(c, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for c in commands
  ]
  deadline = time.time() + 600
  while not (out / "checkpoints" / str(STARTED)).is_dir():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise SystemExit(f"error: {out.name}: training did not start: {procs[0].communicate()[1][-2000:]}")
    time.sleep(0.02)
  return procs


def _stopped_step(stderr: str) -> int | None:
  last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
  return int(last.split()[3].rstrip(":")) if last.startswith("stopped at step ") else None


def _finish(procs: list[subprocess.Popen], since: float) -> list[dict]:
  """Each process's exit code, seconds from `since` to its exit, step saved and last line."""
  out = []
  for p in procs:
    _, stderr = p.communicate(timeout=300)
    out.append(
      {
        "returncode": p.returncode,
        "seconds": round(time.time() - since, 2),
        "stopped_at": _stopped_step(stderr),
        "last_line": stderr.strip().splitlines()[-1] if stderr.strip() else "",
      }
    )
  return out


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--peer-timeouts", default="5,15", help="comma-separated --peer-timeout values to try")
  parser.add_argument("--data-dir", default="data")
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for processes in (1, 2):
      out = Path(tmp) / f"sigterm-{processes}"
      procs = _start(args, out, processes)
      time.sleep(1.0)  # mid-step, somewhere after the checkpoint
      procs[-1].send_signal(signal.SIGTERM)
      exits = _finish(procs, time.time())
      steps = {e["stopped_at"] for e in exits}
      rows.append(
        {
          "trial": f"SIGTERM, {processes} process{'es' if processes > 1 else ''}",
          "seconds to exit": max(e["seconds"] for e in exits),
          "exit codes": [e["returncode"] for e in exits],
          "saved step": steps.pop() if len(steps) == 1 else sorted(steps, key=str),
          "checkpoint there": all((out / "checkpoints" / str(e["stopped_at"])).is_dir() for e in exits),
          "last line": exits[0]["last_line"],
        }
      )
      print(rows[-1], flush=True)
    for timeout in map(int, args.peer_timeouts.split(",")):
      procs = _start(args, Path(tmp) / f"peer-{timeout}", 2, "--peer-timeout", str(timeout))
      procs[1].send_signal(signal.SIGKILL)
      (survivor,) = _finish(procs[:1], time.time())
      procs[1].wait()
      rows.append(
        {
          "trial": f"kill -9 of the peer, --peer-timeout {timeout}",
          "seconds to exit": survivor["seconds"],
          "exit codes": [survivor["returncode"]],
          "last line": survivor["last_line"],
        }
      )
      print(rows[-1], flush=True)
  print(common.table(rows, ["trial", "seconds to exit", "exit codes", "saved step", "checkpoint there"]))
  path = common.save("preemption", rows, "python benchmarks/preemption.py " + " ".join(argv or sys.argv[1:]))
  print(f"written to {path}")


if __name__ == "__main__":
  main()
