"""Timing, tables and result files shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def time_interleaved(fns: dict, args: dict, rounds: int = 30, inner: int = 3, jit: bool = True) -> dict:
  """Median seconds per call of each fn (jitted here unless `jit=False`),
  compilation excluded.

  The candidates run in turn within each round, so drifts of the machine
  (frequency, other load) touch all of them alike, and each round starts
  with the next candidate, so none always runs right after the same one
  (on a CPU, freeing and page-faulting a neighbour's buffers is a cost).
  """
  compiled = {}
  for name, fn in fns.items():
    compiled[name] = jax.jit(fn) if jit else fn
    jax.block_until_ready(compiled[name](*args[name]))  # compile and warm up
  samples = {name: [] for name in fns}
  names = list(compiled)
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      fn = compiled[name]
      start = time.perf_counter()
      for _ in range(inner):
        out = fn(*args[name])
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / inner)
  return {name: float(np.median(s)) for name, s in samples.items()}


def machine() -> dict:
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "devices": jax.device_count(),
    "cpu": cpu,
    "cores": os.cpu_count(),
    "jax": jax.__version__,
  }


def commit() -> str:
  """The commit measured: JAXBN_COMMIT where the copy has no (or a stale) git history."""
  if os.environ.get("JAXBN_COMMIT"):
    return os.environ["JAXBN_COMMIT"]
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def table(rows: list[dict], columns: list[str]) -> str:
  """A markdown table of `rows` restricted to `columns`."""

  def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def malloc_tuning() -> dict:
  """glibc malloc variables set for this process (none in the environment users have)."""
  return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def result_path(name: str, platform: str | None = None, tuned: bool | None = None) -> Path:
  """results/NAME[.PLATFORM][.tuned-malloc].json: CPU runs in the default
  environment keep the plain name; other devices and tuned runs never
  overwrite them."""
  platform = jax.devices()[0].platform if platform is None else platform
  tuned = bool(malloc_tuning()) if tuned is None else tuned
  parts = [name] + ([platform] if platform != "cpu" else []) + (["tuned-malloc"] if tuned else [])
  return RESULTS / (".".join(parts) + ".json")


def save(name: str, rows: list[dict], command: str) -> Path:
  RESULTS.mkdir(exist_ok=True)
  path = result_path(name)
  env = " ".join(f"{k}={v}" for k, v in malloc_tuning().items())
  path.write_text(
    json.dumps(
      {
        "command": f"{env} {command}".strip(),
        "commit": commit(),
        "machine": machine(),
        "malloc_tuning": malloc_tuning(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": rows,
      },
      indent=2,
    )
    + "\n"
  )
  return path
