"""Runs written by an earlier release resume and evaluate with this one.

`fixtures/run-0.3.0` is a run that jaxbn 0.3.0 (commit 4e9700b) wrote: the MLP with
per-device BN on 4 devices, on `idx_files.make_dataset()`, trained 4 steps with a
checkpoint at step 2, made with (in a directory holding those IDX files as `idx/`)

  python train.py --dataset mnist --idx-dir idx --data-dir tfds --out run --no-progress \
    --init-std 0.3 --model mlp --bn per-device --devices 4 --global-batch-size 16 \
    --steps 4 --eval-every 2 --checkpoint-every 2

and then its checkpoint of step 4 deleted. Its metrics.jsonl keeps 0.3.0's record of
step 4: the oracle the resumed run must reproduce.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests import idx_files
from tests.train_runs import ROOT

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.3.0"
FLAGS = [
  "--dataset",
  "mnist",
  "--idx-dir",
  "idx",
  "--data-dir",
  "tfds",
  "--out",
  "run",
  "--no-progress",
  "--init-std",
  "0.3",
  "--model",
  "mlp",
  "--bn",
  "per-device",
  "--devices",
  "4",
  "--global-batch-size",
  "16",
  "--steps",
  "4",
  "--eval-every",
  "2",
  "--checkpoint-every",
  "2",
]
TRAINING_ONLY = ("wall_time", "steps_per_sec")  # timings of this machine
FIXTURE_JAX = "0.10.2"  # the jax that wrote the fixture


def _records(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_run_of_0_3_0_resumes_to_the_same_metrics(tmp_path):
  expected = _records(FIXTURE / "metrics.jsonl")
  shutil.copytree(FIXTURE, tmp_path / "run")
  idx_files.write_dataset(tmp_path / "idx", idx_files.make_dataset())
  env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  done = subprocess.run(
    [sys.executable, str(ROOT / "train.py"), *FLAGS, "--resume"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  resumed = _records(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in resumed] == [2, 4]
  assert resumed[0] == expected[0]  # the record before the checkpoint is kept as 0.3.0 wrote it
  for name, value in expected[1].items():
    if name in TRAINING_ONLY:
      continue
    if jax.__version__ == FIXTURE_JAX:  # the same arithmetic: the same digits
      assert resumed[1][name] == value, name
    else:  # another XLA rounds differently in the last bits
      assert resumed[1][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
