"""Timing, tables and result files shared by the benchmarks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from trainer import provenance

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
  return {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "devices": jax.device_count(),
    "cpu": provenance.cpu(),
    "cores": os.cpu_count(),
    "jax": jax.__version__,
  }


def commit() -> str:
  """The commit measured (trainer.provenance.commit, without the +changes mark)."""
  return provenance.commit(dirty=False)


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
