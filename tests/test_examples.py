"""The runnable examples run, and show what they claim."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_nnx_data_parallel_example():
  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "nnx_data_parallel.py"), "--steps", "100"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {
    m.group(1): m
    for m in re.finditer(
      r"(per-device|synced) BN: final training loss ([\d.]+), test accuracy ([\d.]+), running mean shape \(([\d, ]+)\)",
      result.stdout,
    )
  }
  assert set(lines) == {"per-device", "synced"}, result.stdout
  assert lines["per-device"].group(4) == "8, 64"  # one row of running statistics per device
  assert lines["synced"].group(4) == "64,"
  for m in lines.values():  # both learn the task (chance: 0.25)
    assert float(m.group(3)) > 0.9, result.stdout


@pytest.mark.slow
def test_fold_bn_example_on_a_train_py_run(tmp_path):
  from tests.idx_files import make_dataset, write_dataset

  idx = write_dataset(tmp_path / "idx", make_dataset(n_train=240, n_test=40))
  run = tmp_path / "run"
  trained = subprocess.run(
    [
      sys.executable,
      str(ROOT / "train.py"),
      "--dataset",
      "mnist",
      "--idx-dir",
      str(idx),
      "--data-dir",
      str(tmp_path / "tfds"),
      "--bn",
      "sync",
      "--devices",
      "2",
      "--batch-size",
      "6",
      "--steps",
      "20",
      "--eval-every",
      "20",
      "--out",
      str(run),
      "--no-progress",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "fold_bn.py"), str(run)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  m = re.search(r"40 test images: largest logit difference ([\d.e+-]+), same prediction for ([\d.]+)%", result.stdout)
  assert m, result.stdout
  assert float(m.group(1)) < 1e-4 and float(m.group(2)) == 100.0
