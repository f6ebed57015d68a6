"""train.py as a subprocess, on IDX files a test wrote: the command, the run, its metrics."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_command(idx_dir, out, *extra, data_dir=None) -> list[str]:
  """train.py on the MNIST-format files in `idx_dir` (prepared beside `out` unless `data_dir`)."""
  return [
    sys.executable,
    str(ROOT / "train.py"),
    "--dataset",
    "mnist",
    "--idx-dir",
    str(idx_dir),
    "--data-dir",
    str(data_dir or Path(out).parent / "tfds"),
    "--out",
    str(out),
    "--no-progress",
    "--init-std",
    "0.3",
    *extra,
  ]


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def metrics(out) -> list[dict]:
  return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def kill_at_checkpoint(cmd, out, step) -> None:
  """Start train.py and SIGKILL it as soon as its checkpoint of `step` exists."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (Path(out) / "checkpoints" / str(step)).exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.kill()
  proc.wait()
