"""Where a result was made: the commit and the machine (for reports, runs.json, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
  name = platform.processor() or platform.machine()
  with contextlib.suppress(OSError, StopIteration):
    name = next(
      line.split(":", 1)[1].strip()
      for line in Path("/proc/cpuinfo").read_text().splitlines()
      if line.startswith("model name")
    )
  return name


def machine() -> str:
  """The CPU, its cores and the OS (runs on CPU host devices)."""
  return f"{cpu()}, {os.cpu_count()} cores, {platform.system()} (CPU host devices)"


def commit(dirty: bool = True) -> str:
  """HEAD's short hash ("+changes" when tracked files differ from it); JAXBN_COMMIT where the
  copy has no (or a stale) git history; "unknown" without git."""
  if os.environ.get("JAXBN_COMMIT"):
    return os.environ["JAXBN_COMMIT"]
  git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  try:
    head = git("rev-parse", "--short", "HEAD").strip()
    changed = dirty and git("status", "--porcelain", "--untracked-files=no").strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+changes" if changed else "")
