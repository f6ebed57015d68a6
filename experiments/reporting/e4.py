"""E4 and E4-long: per-device vs synced BN on a convnet, the normalization batch swept.

Both are compare.py sweeps (experiments/plan.py COMPARISONS); their committed data is the sweep
directory without checkpoints (REPORTS/SIZE/data/e4, .../e4_long), and their pages are
compare.py's report (trainer.compare.report) plus the written discussion.
"""

from __future__ import annotations

from pathlib import Path

from experiments.reporting.results import Results, fixed, notes
from trainer.compare import report as comparison
from trainer.compare.sweep import SweepDir

INTRO = (
  "ResNet-20 (`--model resnet20`: its CIFAR recipe, lr 0.1 divided by 10 at 50% and 75% of the steps, momentum "
  "0.9, weight decay 0.0001, crop-flip) on Fashion-MNIST, global batch 128, {steps:,} steps, seeds {seeds}. The "
  "normalization batch (the examples one BN statistic is computed over) is swept: up to the per-device batch of "
  "16 as per-device BN on 8 host devices (below 16 as groups of each device's batch, `--bn-group-size`), larger "
  "sizes as groups of the global batch on one device, sync as synced BN over the 8 devices (the styles and "
  "placements are equivalent: `tests/test_parallel_styles.py`, `tests/test_bn_tools.py`). Every run is "
  "evaluated four ways at the end: with the running averages (EMA, momentum 0.9); with PreciseBN "
  "(`jaxbn.population_stats` over about 10,000 training samples in the run's own normalization batches) with "
  "the pooled and with the paper's estimator; and with each test batch's own statistics at the training "
  "normalization batch (`--eval-batch-stats`). {repairs}\n\n"
)


def _sweep(results: Results, name: str):
  """(records, run records, compare.json) of a committed sweep; ([], [], {}) when it has none."""
  sweep = SweepDir(results.root / "data" / name)
  if not (sweep.out / "compare.json").exists():
    return [], [], {}
  records, infos = sweep.records()
  return records, infos, sweep.state()


def _header(title: str, infos: list[dict], state: dict, size: str) -> str:
  commits = ", ".join(f"`{c}`" for c in sorted({i.get("commit", "?") for i in infos}))
  minutes = sum(i.get("wall_time_s", 0.0) for i in infos) / 60
  return (
    f"# {title}\n\n"
    f"- size: `{size}` (`make {'reproduce' if size == 'full' else 'train'}`)\n"
    f"- commit(s) the runs ran at: {commits}; machine: {state.get('machine', '?')}\n"
    f"- wall time: {fixed(minutes, 1)} min for {len(infos)} runs (each run's command at the end; run by "
    "`compare.py`)\n\n"
  )


def _commands(infos: list[dict]) -> str:
  return "## Commands\n\n```\n" + "\n".join(i["command"] for i in infos) + "\n```\n"


def _page(results: Results, out: Path, size: str, name: str, title: str, repairs: str) -> list[dict]:
  records, infos, state = _sweep(results, name)
  if not records:
    return []
  steps = state["train_flags"]["steps"]
  seeds = sorted({r["seed"] for r in records})
  page = name.replace("_", "-")
  comparison.figure(records, out / f"{page}.png", "ResNet-20 on Fashion-MNIST", 128)
  text = _header(title, infos, state, size) + INTRO.format(steps=steps, seeds=seeds, repairs=repairs)
  text += comparison.body(records, f"{page}.png")
  if name == "e4_long":
    e4, _, _ = _sweep(results, "e4")
    if e4:
      text += "## The verdicts at both lengths\n\n" + comparison.side_by_side(
        {"E4 (600 steps)": e4, f"E4-long ({steps:,} steps)": records}
      )
      text += "\n"
  text += notes(size, name) + _commands(infos)
  (out / f"{page}.md").write_text(text)
  return records


def report(results: Results, out: Path, size: str) -> dict:
  records = _page(
    results,
    out,
    size,
    "e4",
    "E4 — per-device vs synced BN on a convnet: the normalization batch swept",
    "At the two smallest sizes Batch Renorm (`--bn renorm`) and a FrozenBN final phase (`--frozen-bn-steps`: the "
    "last fifth of the steps with the pooled running statistics fixed) are tried.",
  )
  long = _page(
    results,
    out,
    size,
    "e4_long",
    "E4-long — E4 at four times its length",
    "At 2 a FrozenBN final phase (the last fifth of the steps) is tried.",
  )
  headline = {}
  for key, rows in (("e4", records), ("e4_long", long)):
    if rows:
      headline[key] = {f"{r['mode']}, {r['normalization_batch']}, seed {r['seed']}": r["test_accuracy"] for r in rows}
  return headline
