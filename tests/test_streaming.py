"""Streamed input, preemption and dead peers: train.py at the scale of a GPU node or TPU pod.

End to end through train.py in subprocesses, on IDX files the tests write and
on several processes on 127.0.0.1. Oracles: the same run through the other
input path, the other layout of devices over processes, or uninterrupted.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.idx_files import make_dataset, write_dataset
from tests.train_runs import ROOT, free_port, kill_at_checkpoint, metrics, run, train_command

DETERMINISTIC = ("step", "train_loss", "test_loss", "test_accuracy", "p15", "p50", "p85")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("idx"), make_dataset(n_train=240, n_test=37))


def _same(a, b, keys=DETERMINISTIC, rel=0.0):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b, strict=True):
    for key in keys:
      if rel:
        assert y[key] == pytest.approx(x[key], rel=rel, abs=rel), key
      else:
        assert x[key] == y[key], (x["step"], key)


@pytest.mark.slow
def test_stream_and_device_input_see_the_same_examples_in_the_same_order(tmp_path, idx_dir):
  """The same run through both input paths: the host reads and augments the batch
  (grain, a worker process), or the device gathers it from its copy of the split."""
  args = ("--devices", "2", "--batch-size", "6", "--steps", "60", "--eval-every", "20", "--bn", "per-device")
  device = run(train_command(idx_dir, tmp_path / "device", *args, "--input", "device"))
  stream = run(train_command(idx_dir, tmp_path / "stream", *args, "--input", "stream", "--input-workers", "1"))
  assert device.returncode == 0 and stream.returncode == 0, device.stderr[-2000:] + stream.stderr[-2000:]
  _same(metrics(tmp_path / "device"), metrics(tmp_path / "stream"), rel=1e-6)


def _processes(idx_dir, out, args, count=2):
  port = free_port()
  return [
    subprocess.Popen(
      train_command(
        idx_dir, out, *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count), "--process-id", str(i)
      ),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    for i in range(count)
  ]


@pytest.mark.slow
def test_one_process_with_two_devices_equals_two_processes_with_one_streamed(tmp_path, idx_dir):
  """Each process reads only its own rows of the global batch; the run does not
  depend on the split of the devices over processes (gloo's reduction order aside)."""
  args = ("--bn", "sync", "--steps", "20", "--eval-every", "10", "--batch-size", "6", "--input", "stream")
  single = run(train_command(idx_dir, tmp_path / "single", "--devices", "2", *args, "--input-workers", "0"))
  assert single.returncode == 0, single.stderr[-3000:]
  procs = _processes(idx_dir, tmp_path / "multi", ("--devices", "1", *args, "--input-workers", "0"))
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  _same(metrics(tmp_path / "single"), metrics(tmp_path / "multi"), keys=DETERMINISTIC[1:], rel=1e-4)


def _wait_for_step(out: Path, proc, step: int, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    if lines and json.loads(lines[-1])["step"] >= step:
      return
    time.sleep(0.05)
  raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("input_path", ["device", "stream"])
def test_sigterm_saves_the_step_and_resume_is_exact(tmp_path, idx_dir, input_path):
  args = ("--devices", "2", "--batch-size", "6", "--steps", "800", "--eval-every", "100", "--bn", "per-device")
  args += ("--input", input_path, "--input-workers", "1")
  reference = run(train_command(idx_dir, tmp_path / "full", *args))
  assert reference.returncode == 0, reference.stderr[-3000:]
  out = tmp_path / "stopped"
  proc = subprocess.Popen(
    train_command(idx_dir, out, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  _wait_for_step(out, proc, 300)
  time.sleep(0.3)  # somewhere in the next evaluation period
  proc.send_signal(signal.SIGTERM)
  start = time.time()
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert time.time() - start < 30  # well inside a cloud VM's notice
  line = stderr.strip().splitlines()[-1]
  assert line.startswith("stopped at step ") and "on SIGTERM" in line and line.endswith("--resume"), line
  stopped_at = int(line.split()[3].rstrip(":"))
  assert 300 <= stopped_at < 800 and (out / "checkpoints" / str(stopped_at)).is_dir()
  resumed = run(train_command(idx_dir, out, *args, "--resume"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _same(metrics(tmp_path / "full"), metrics(out))


@pytest.mark.slow
def test_streamed_resume_after_sigkill_mid_epoch_is_exact(tmp_path, idx_dir):
  """240 examples, a global batch of 12: 20 steps an epoch; killed past a checkpoint
  in the middle of an epoch, resumed from it."""
  args = ("--devices", "2", "--batch-size", "6", "--steps", "400", "--eval-every", "10", "--checkpoint-every", "30")
  args += ("--input", "stream", "--input-workers", "1", "--bn", "sync")
  reference = run(train_command(idx_dir, tmp_path / "full", *args))
  assert reference.returncode == 0, reference.stderr[-3000:]
  out = tmp_path / "killed"
  kill_at_checkpoint(train_command(idx_dir, out, *args), out, 90)
  assert metrics(out)[-1]["step"] < 400, "the run finished before it could be killed"
  resumed = run(train_command(idx_dir, out, *args, "--resume"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _same(metrics(tmp_path / "full"), metrics(out))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path, idx_dir):
  args = ("--devices", "1", "--batch-size", "6", "--steps", "3000", "--eval-every", "100", "--bn", "sync")
  procs = _processes(idx_dir, tmp_path / "multi", (*args, "--input-workers", "0"))
  _wait_for_step(tmp_path / "multi", procs[0], 200)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  steps = {int(err.strip().splitlines()[-1].split()[3].rstrip(":")) for _, err in outputs}
  assert len(steps) == 1, outputs  # the same step everywhere
  assert (tmp_path / "multi" / "checkpoints" / str(steps.pop())).is_dir()


@pytest.mark.slow
def test_a_process_whose_peer_died_exits_in_one_line_within_the_bound(tmp_path, idx_dir):
  args = ("--devices", "1", "--batch-size", "6", "--steps", "100000", "--eval-every", "100", "--bn", "sync")
  extra = ("--input-workers", "0", "--peer-timeout", "5", "--checkpoint-every", "100")
  procs = _processes(idx_dir, tmp_path / "multi", (*args, *extra))
  _wait_for_step(tmp_path / "multi", procs[0], 100)
  time.sleep(0.5)  # past the checkpoint of step 100
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  _, stderr = procs[0].communicate(timeout=60)
  elapsed = time.time() - killed
  assert procs[0].returncode == 1 and elapsed < 5 + 15, (elapsed, stderr[-2000:])
  lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "process 0:" in lines[0] and "exiting" in lines[0], stderr[-2000:]
  # which process is gone, the last checkpoint, and how to resume
  assert "process 1 " in lines[0].split("process 0:", 1)[1], lines[0]
  saved = max(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit())
  assert f"the last checkpoint is step {saved};" in lines[0] and lines[0].endswith("--resume"), lines[0]
  assert stderr.strip().splitlines()[-1] == lines[0]  # nothing after it: no JAX abort, no stack trace
