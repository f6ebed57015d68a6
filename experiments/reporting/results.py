"""The committed metrics of one report size, and the small helpers every section uses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from trainer.compare.format import fixed, half_range, known_mean, mean_spread, percent, save_figure, table

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["Results", "Run", "fixed", "half_range", "known_mean", "mean_spread", "percent", "save_figure", "table"]


class Run:
  """One train.py run: its labels (from the plan), metrics records, command and wall time."""

  def __init__(self, name: str, info: dict, metrics: list[dict], config: dict):
    self.name, self.info, self.metrics, self.config = name, info, metrics, config
    self.labels = info["labels"]

  @property
  def steps(self) -> np.ndarray:
    return np.array([m["step"] for m in self.metrics])

  def series(self, key: str) -> np.ndarray:
    return np.array([m[key] if m.get(key) is not None else np.nan for m in self.metrics], float)

  @property
  def accuracy(self) -> np.ndarray:
    return self.series("test_accuracy")

  @property
  def final(self) -> float:
    return self.metrics[-1]["test_accuracy"]

  def first_step_reaching(self, target: float):
    """The first evaluated step with test accuracy >= target, or None."""
    return next((m["step"] for m in self.metrics if m["test_accuracy"] >= target), None)


class Results:
  """REPORTS/SIZE/data/EXPERIMENT/{runs.json, NAME.jsonl, NAME.json}, as written by experiments/run.py."""

  def __init__(self, root: Path):
    self.root = root
    if not (root / "data").is_dir():
      raise FileNotFoundError(
        f"{root / 'data'}: no metrics; run experiments/run.py first (`make train` or `make reproduce`)"
      )

  def _meta(self, experiment: str) -> dict:
    """runs.json of experiments/run.py, or compare.json of a compare.py sweep (E4, E4-long)."""
    path = self.root / "data" / experiment / "runs.json"
    sweep = self.root / "data" / experiment / "compare.json"
    if sweep.exists():
      state = json.loads(sweep.read_text())
      runs = {n: {**i, "labels": {k: i[k] for k in ("size", "mode", "seed")}} for n, i in state["runs"].items()}
      return {"runs": runs, "machine": state.get("machine", "?"), "size": self.root.name}
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}

  def _metrics_path(self, experiment: str, name: str) -> Path:
    flat = self.root / "data" / experiment / f"{name}.jsonl"
    return flat if flat.exists() else self.root / "data" / experiment / "runs" / name / "metrics.jsonl"

  def runs(self, experiment: str) -> list[Run]:
    """The experiment's finished runs, in the order they ran (the plan's)."""
    out = []
    for name, info in self._meta(experiment)["runs"].items():
      path = self._metrics_path(experiment, name)
      if path.exists():
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line]
        config = json.loads(
          (
            path.with_suffix(".json")
            if path.suffix == ".jsonl" and path.name != "metrics.jsonl"
            else path.with_name("config.json")
          ).read_text()
        )
        out.append(Run(name, info, metrics, config))
    return out

  def wall_time(self, *experiments) -> float:
    return math.fsum(r.info.get("wall_time_s", 0.0) for e in experiments for r in self.runs(e))

  def describe(self, *experiments) -> dict:
    runs = [r for e in experiments for r in self.runs(e)]
    metas = [self._meta(e) for e in experiments]
    return {
      "size": next((m["size"] for m in metas if "size" in m), "?"),
      "machine": next((m["machine"] for m in metas if "machine" in m), "?"),
      "commits": sorted({r.info.get("commit", "?") for r in runs}),
      "runs": len(runs),
      "wall_time_min": self.wall_time(*experiments) / 60,
    }

  def header(self, title: str, *experiments) -> str:
    d = self.describe(*experiments)
    return (
      f"# {title}\n\n"
      f"- size: `{d['size']}` (`make {'reproduce' if d['size'] == 'full' else 'train'}`)\n"
      f"- commit(s) the runs ran at: {', '.join(f'`{c}`' for c in d['commits'])}; "
      f"machine: {d['machine']}\n"
      f"- wall time: {fixed(d['wall_time_min'], 1)} min for {d['runs']} runs "
      f"(each run's command at the end; run by `experiments/run.py`)\n\n"
    )


def notes(size: str, experiment: str) -> str:
  """Hand-written discussion of the committed (full) results."""
  path = ROOT / "experiments" / "notes" / f"{experiment}.md"
  return path.read_text() + "\n" if size == "full" and path.exists() else ""


def commands(runs: list[Run]) -> str:
  return "## Commands\n\n```\n" + "\n".join(r.info["command"] for r in runs) + "\n```\n"


def value_range(values, digits: int = 1, suffix: str = "") -> str:
  """'lo–hi' of the values (None: 'never')."""
  if any(v is None for v in values):
    known = [v for v in values if v is not None]
    return "never" if not known else f"{value_range(known, digits, suffix)}, never ×{len(values) - len(known)}"
  lo, hi = min(values), max(values)
  lo, hi = fixed(lo, digits), fixed(hi, digits)
  return f"{lo}{suffix}" if lo == hi else f"{lo}–{hi}{suffix}"


def verdict(flags) -> str:
  """'yes' when a claim holds for every seed, 'no' when for none, else 'mixed'."""
  flags = list(flags)
  return "yes" if all(flags) else "no" if not any(flags) else f"mixed ({sum(flags)}/{len(flags)} seeds)"
