"""What a report shows must be in git: the ignore rules must not swallow its metrics."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ignored(path: str) -> bool:
  result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
  return result.returncode == 0


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_report_metrics_and_benchmark_results_are_not_ignored():
  for path in (
    "reports/full/data/e1/runs.json",
    "reports/full/data/e1/run.jsonl",
    "reports/full/e1.png",
    "benchmarks/results/bn_layer.json",
    "benchmarks/results/bn_layer.tuned-malloc.json",
    "examples/nnx_data_parallel.py",
  ):
    assert not _ignored(path), path
  for path in ("data/fashion_mnist/1.0.0/x", "runs/x/metrics.jsonl", ".venv/bin/python", "reports/default/e1.md"):
    assert _ignored(path), path


def test_every_changelog_entry_names_its_issue():
  """CHANGELOG.md says each entry names the issue that brought it: hold it to that."""
  entries, current = [], None
  for line in (ROOT / "CHANGELOG.md").read_text().splitlines():
    if line.startswith("- "):
      current = [line]
      entries.append(current)
    elif line.startswith("  ") and current is not None:
      current.append(line)
    else:
      current = None
  assert len(entries) > 20
  unnamed = [" ".join(e)[:80] for e in entries if not re.search(r"\bissues? \d+", " ".join(e))]
  assert not unnamed, unnamed
