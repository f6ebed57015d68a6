"""The report: its definitions on hand-made curves, and a re-draw from the committed metrics."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.reporting import e1
from experiments.reporting.results import Run

ROOT = Path(__file__).resolve().parents[1]


def _run(accuracies, p50=None, bn=False):
  metrics = [
    {"step": 500 * (i + 1), "test_accuracy": a, "p50": (p50 or [0.0] * len(accuracies))[i]}
    for i, a in enumerate(accuracies)
  ]
  return Run("x", {"labels": {"bn": bn}}, metrics, {})


def test_speedup_is_steps_to_the_no_bn_final_accuracy_over_bn_steps():
  # no BN first reaches its final 0.80 at its 4th evaluation (step 2000), BN at its 2nd (1000)
  base = _run([0.5, 0.7, 0.79, 0.80, 0.78, 0.80])
  bn = _run([0.6, 0.81, 0.82, 0.79, 0.83, 0.84], bn=True)
  pair = e1.compare(base, bn)
  assert pair["reach"] == (2000, 1000) and pair["speedup"] == 2.0
  assert pair["final_gain"] == pytest.approx(0.04)
  assert pair["share_ahead"] == pytest.approx(5 / 6)  # ahead at every evaluation but the 4th (0.79 < 0.80)


def test_speedup_is_none_when_bn_never_reaches_and_ties_count_half():
  base = _run([0.5, 0.9, 0.9])
  bn = _run([0.5, 0.8, 0.85], bn=True)
  pair = e1.compare(base, bn)
  assert pair["speedup"] is None and pair["share_ahead"] == pytest.approx(0.5 / 3)
  assert e1.claims([pair]) == {"faster": "no", "higher at the end": "no", "stable sigmoid inputs": "no"}


def test_median_spread_starts_at_step_1000():
  run = _run([0.1] * 5, p50=[-9.0, 0.0, 1.0, -0.5, 0.5])  # steps 500..2500; step 500 is left out
  assert e1.median_spread(run) == 1.5


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "reports" / "full" / "data").is_dir(), reason="no committed report metrics")
def test_the_committed_report_redraws_from_its_metrics(tmp_path):
  result = subprocess.run(
    [sys.executable, "experiments/report.py", "--size", "full", "--out", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  pages = ["e1.md", "e2.md", "e3.md", "e4.md"] + (["e4-long.md"] if (tmp_path / "e4-long.md").exists() else [])
  for page in pages:
    text = (tmp_path / page).read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
      assert (tmp_path / image).is_file(), (page, image)
      assert (ROOT / "reports" / "full" / image).is_file(), f"reports/full/{image} is not committed"
  # the committed pages are what the metrics give now (figures aside: PNG bytes vary)
  for page in [*pages, "headline.json", "README.md"]:
    assert (tmp_path / page).read_text() == (ROOT / "reports" / "full" / page).read_text(), page
  headline = json.loads((tmp_path / "headline.json").read_text())
  assert len(headline["e1"]["settings"]) >= 4


@pytest.mark.skipif(not (ROOT / "reports" / "full" / "data" / "finetune").is_dir(), reason="no fine-tuning metrics")
def test_the_fine_tuning_report_is_its_metrics():
  """reports/full/finetune.md is what experiments/finetune.py writes from the committed metrics, and
  each accuracy in it is a committed run's."""
  from experiments import finetune

  text = finetune.report()
  assert text == (ROOT / "reports" / "full" / "finetune.md").read_text()
  for name, choice in (("frozen-seed0", "BN frozen"), ("sync-seed1", "synced BN (normalization batch 32)")):
    last = [json.loads(line) for line in (finetune.DATA / name / "metrics.jsonl").read_text().splitlines()][-1]
    row = next(line for line in text.splitlines() if choice in line)
    assert f"{last['test_accuracy']:.4f}" in row.split("|")[-2]
