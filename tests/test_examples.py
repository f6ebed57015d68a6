"""The runnable examples run, and show what they claim."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nnx_data_parallel_example():
  result = subprocess.run([sys.executable, str(ROOT / "examples" / "nnx_data_parallel.py"), "--steps", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {m.group(1): m for m in re.finditer(
      r"(per-device|synced) BN: final training loss ([\d.]+), test accuracy ([\d.]+), running mean shape \(([\d, ]+)\)",
      result.stdout)}
  assert set(lines) == {"per-device", "synced"}, result.stdout
  assert lines["per-device"].group(4) == "8, 64"  # one row of running statistics per device
  assert lines["synced"].group(4) == "64,"
  for m in lines.values():  # both learn the task (chance: 0.25)
    assert float(m.group(3)) > 0.9, result.stdout
