"""A comparison's results: summary records, the figure, the table and a verdict per claim.

A record is one run's final test accuracy, evaluated four ways, as summary.json holds it:

  {"normalization_batch": 2 | "sync", "mode": "BN" | "Batch Renorm" | "FrozenBN final phase",
   "seed": 0, "test_accuracy": {"ema": ..., "precise_pooled": ..., "precise_paper": ..., "batch_stats": ...}}

`ema` is the run's own final test_accuracy (its running averages). Everything is computed from
records, so the E4 page (experiments/reporting/e4.py) and compare.py's report are the same code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

from trainer.compare.format import fixed, half_range, known_mean, mean_spread, save_figure, table
from trainer.compare.plan import SYNC, order_key

# (record key, label, metrics.jsonl key, colour, line style)
EVALUATIONS = (
  ("ema", "running averages (EMA)", "test_accuracy", "tab:blue", "-"),
  ("precise_pooled", "PreciseBN, pooled", "test_accuracy_population_pooled", "tab:green", "--"),
  ("precise_paper", "PreciseBN, paper", "test_accuracy_population", "tab:olive", ":"),
  ("batch_stats", "test-batch statistics", "test_accuracy_batch_stats", "tab:red", "-."),
)
REPAIR_MARKERS = {"Batch Renorm": ("s", "tab:purple"), "FrozenBN final phase": ("D", "tab:brown")}
MIN_GAP = 0.005  # accuracy differences below this, or below the seed noise, are called equal


def record(size, mode: str, seed: int, last: dict) -> dict:
  """The summary record of a run whose last metrics line is `last`."""
  return {
    "normalization_batch": size,
    "mode": mode,
    "seed": seed,
    "test_accuracy": {key: last.get(metric) for key, _, metric, _, _ in EVALUATIONS},
  }


class Table:
  """Records indexed by (mode, size): each evaluation's values over the seeds."""

  def __init__(self, records: list[dict]):
    self.records = records
    self.sizes = sorted({r["normalization_batch"] for r in records if r["mode"] == "BN"}, key=order_key)
    self.seeds = sorted({r["seed"] for r in records})

  def values(self, mode: str, size, key: str = "ema") -> list:
    return [r["test_accuracy"][key] for r in self.records if r["mode"] == mode and r["normalization_batch"] == size]

  def mean(self, mode: str, size, key: str = "ema") -> float:
    return known_mean(self.values(mode, size, key))

  def sizes_of(self, mode: str) -> list:
    return [n for n in self.sizes if self.values(mode, n)]

  def noise(self) -> float:
    """Twice the median seed spread (half range) of the EMA accuracy, at least MIN_GAP."""
    spreads = [half_range(self.values("BN", n)) for n in self.sizes]
    return max(MIN_GAP, 2 * statistics.median(spreads)) if spreads else MIN_GAP


def _status(diff: float, noise: float, holds: str = "holds", fails: str = "does not hold") -> str:
  return holds if diff > noise else (fails if diff < -noise else "within the seed noise")


def _at(values: dict) -> str:
  return ", ".join(f"{fixed(v, 4)} at {n}" for n, v in values.items())


def verdicts(records: list[dict]) -> list[str]:
  """A verdict per claim of the literature, computed from the numbers (EMA unless said)."""
  return [f"**{claim}** — {status}: {detail}" for claim, status, detail in claims(records)]


Claim = tuple[str, str, str]  # (claim, holds / does not hold / within the seed noise [at sizes], the numbers)


@dataclasses.dataclass(frozen=True)
class _Means:
  """What every claim reads: the table, the seed noise, BN's mean accuracy per size, the reference size."""

  t: Table
  noise: float
  mean: dict
  reference: Any
  ref_name: str


def claims(records: list[dict]) -> list[Claim]:
  """(claim, holds / does not hold / within the seed noise [at sizes], the numbers) per claim."""
  t = Table(records)
  if not t.sizes:
    return []
  reference = t.sizes[-1]  # synced BN when it ran, else the largest size
  m = _Means(
    t=t,
    noise=t.noise(),
    mean={n: t.mean("BN", n) for n in t.sizes},
    reference=reference,
    ref_name="synced BN" if reference == SYNC else f"the largest size run ({reference})",
  )
  return [
    *_small_batches_hurt(m),
    *_mid_size_matches_sync(m),
    *_precise_bn_beats_ema(m),
    *_train_test_inconsistency(m),
    *_repairs(m),
  ]


def _small_batches_hurt(m: _Means) -> list[Claim]:
  t, mean, noise = m.t, m.mean, m.noise
  smallest = t.sizes[0]
  best = max(t.sizes, key=lambda n: mean[n])
  # the smallest size from which every size up to the best is within the noise of the best
  top = t.sizes.index(best)
  recovered = next(
    n for i, n in enumerate(t.sizes[: top + 1]) if all(mean[k] >= mean[best] - noise for k in t.sizes[i : top + 1])
  )
  within = f"{fixed(noise, 4)} (twice the median seed spread, at least {MIN_GAP})"
  if recovered == best and top > 0:
    below = t.sizes[top - 1]
    where = f"the next smaller size ({fixed(mean[below], 4)} at {below}) is more than {within} below the best"
  else:
    where = f"from {recovered} up to {best} every size is within {within} of the best"
  return [
    (
      "Small normalization batches hurt",
      _status(mean[m.reference] - mean[smallest], noise),
      f"{_at(mean)}; {where} ({fixed(mean[best], 4)} at {best}).",
    )
  ]


def _mid_size_matches_sync(m: _Means) -> list[Claim]:
  mean, noise, reference = m.mean, m.noise, m.reference
  mid = [n for n in m.t.sizes if n != SYNC and n >= 16 and n != reference]
  if not mid:
    return []
  top = max(mid, key=lambda n: mean[n])
  diff = mean[top] - mean[reference]
  word = "beats" if diff > noise else ("matches" if diff >= -noise else "is below")
  return [
    (
      "A mid-size normalization batch matches or beats synced BN (Page, Composer)",
      "holds" if diff >= -noise else "does not hold",
      f"the best of {', '.join(map(str, mid))} ({fixed(mean[top], 4)} at {top}) {word} {m.ref_name} "
      f"({fixed(mean[reference], 4)}; difference {fixed(diff, 4)}).",
    )
  ]


def _precise_bn_beats_ema(m: _Means) -> list[Claim]:
  t, mean, noise = m.t, m.mean, m.noise
  pooled = {n: t.mean("BN", n, "precise_pooled") for n in t.sizes}
  paper = {n: t.mean("BN", n, "precise_paper") for n in t.sizes}
  gains = {n: pooled[n] - mean[n] for n in t.sizes if not math.isnan(pooled[n])}
  if not gains:
    return []
  ahead = [n for n, g in gains.items() if g > noise]
  behind = [n for n, g in gains.items() if g < -noise]
  quiet = "does not hold" if behind else "within the seed noise"
  status = "holds at " + ", ".join(map(str, ahead)) if ahead else quiet
  large = [n for n in gains if (n == SYNC or n >= 32) and len([v for v in t.values("BN", n) if v is not None]) > 1]
  spread = (
    f" EMA noisy at large normalization batches: half the seed range at {', '.join(map(str, large))} averages "
    f"{fixed(known_mean([half_range(t.values('BN', n)) for n in large]), 4)} with EMA, "
    f"{fixed(known_mean([half_range(t.values('BN', n, 'precise_pooled')) for n in large]), 4)} with pooled "
    "PreciseBN."
    if large
    else ""
  )
  return [
    (
      "PreciseBN beats the running averages (Wu & Johnson)",
      status,
      f"pooled PreciseBN minus EMA {_at(gains)}. Pooled minus the paper's estimator: "
      f"{_at({n: pooled[n] - paper[n] for n in gains})}.{spread}",
    )
  ]


def _train_test_inconsistency(m: _Means) -> list[Claim]:
  batch = {n: m.t.mean("BN", n, "batch_stats") - m.mean[n] for n in m.t.sizes}
  batch = {n: d for n, d in batch.items() if not math.isnan(d)}
  if not batch:
    return []
  smallest = m.t.sizes[0]
  return [
    (
      "Train–test inconsistency at small batches (Wu & Johnson: at a small normalization batch, the test "
      "batch's own statistics beat the running averages)",
      f"{_status(batch[smallest], m.noise)} at {smallest}",
      f"test-batch statistics minus EMA {_at(batch)}.",
    )
  ]


def _repairs(m: _Means) -> list[Claim]:
  out = []
  for mode in REPAIR_MARKERS:
    there = m.t.sizes_of(mode)
    if not there:
      continue
    diffs = {n: m.t.mean(mode, n) - m.mean[n] for n in there}
    statuses = {n: _status(d, m.noise, "helps", "hurts") for n, d in diffs.items()}
    numbers = "; ".join(
      f"at {n}: {fixed(m.t.mean(mode, n), 4)} vs BN's {fixed(m.mean[n], 4)} ({fixed(diffs[n], 4)})" for n in there
    )
    statuses_text = ", ".join(f"{statuses[n]} at {n}" for n in there)
    out.append(
      (f"{mode} repairs small batches", statuses_text, f"{numbers}; {m.ref_name}: {fixed(m.mean[m.reference], 4)}.")
    )
  return out


def accuracy_table(records: list[dict]) -> str:
  """Mean ± half the range over seeds, per size and evaluation (repairs below BN)."""
  t = Table(records)
  shown = [e for e in EVALUATIONS if any(t.values("BN", n, e[0])[:1] != [None] for n in t.sizes)]
  rows = [[f"BN, {n}", *[mean_spread(t.values("BN", n, key)) for key, *_ in shown]] for n in t.sizes]
  for mode in REPAIR_MARKERS:
    rows += [[f"{mode}, {n}", *[mean_spread(t.values(mode, n, key)) for key, *_ in shown]] for n in t.sizes_of(mode)]
  return table(["normalization batch", *[e[1] for e in shown]], rows)


def figure(records: list[dict], path: Path, title: str, global_batch: int) -> None:
  """Test accuracy vs log2 normalization batch: a line per evaluation, min–max bars over seeds."""
  import matplotlib.pyplot as plt

  t = Table(records)
  x = {n: global_batch if n == SYNC else n for n in t.sizes}
  fig, ax = plt.subplots(figsize=(9, 5.5))
  for key, label, _, color, style in EVALUATIONS:
    values = [t.values("BN", n, key) for n in t.sizes]
    if not any(v and v[0] is not None for v in values):
      continue
    ax.errorbar(
      [x[n] for n in t.sizes],
      [known_mean(v) for v in values],
      yerr=[half_range(v) for v in values],
      color=color,
      ls=style,
      marker="o",
      capsize=3,
      label=f"BN, {label}",
    )
  for mode, (marker, color) in REPAIR_MARKERS.items():
    there = t.sizes_of(mode)
    if there:
      values = [t.values(mode, n) for n in there]
      ax.errorbar(
        [x[n] for n in there],
        [known_mean(v) for v in values],
        yerr=[half_range(v) for v in values],
        color=color,
        ls="none",
        marker=marker,
        markersize=8,
        capsize=3,
        label=f"{mode}, EMA",
      )
  ax.set_xscale("log", base=2)
  ax.minorticks_off()
  ticks = sorted(set(x.values()))
  labels = {v: str(v) for v in ticks} | ({global_batch: f"{global_batch} (synced)"} if SYNC in x else {})
  ax.set(
    xticks=ticks,
    xticklabels=[labels[v] for v in ticks],
    xlabel=f"normalization batch (examples per BN statistic; global batch {global_batch})",
    ylabel="final test accuracy",
    title=f"{title}; mean of seeds {t.seeds}, bars min–max",
  )
  ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
  save_figure(fig, path)


def body(records: list[dict], figure_name: str) -> str:
  """The figure, the table and the verdicts, as markdown."""
  text = f"![accuracy vs normalization batch]({figure_name})\n\n"
  text += "## Final test accuracy (mean ± half the range over seeds)\n\n" + accuracy_table(records)
  text += "\n## Verdicts\n\n" + "".join(f"- {v}\n" for v in verdicts(records)) + "\n"
  return text


def write(out: Path, records: list[dict], flags: dict, about: dict) -> None:
  """DIR/summary.json, DIR/accuracy.png and DIR/report.md of a comparison.

  `about`: title, command, commits, machine, wall_time_min, runs, placements (size -> where it ran),
  global_batch, steps.
  """
  (out / "summary.json").write_text(json.dumps({"flags": flags, "results": records}, indent=1) + "\n")
  if not records:
    return
  figure(records, out / "accuracy.png", about["title"], about["global_batch"])
  text = f"# Per-device vs synced BN: {about['title']}\n\n"
  text += f"- command: `{about['command']}`\n"
  text += f"- commit(s) the runs ran at: {', '.join(f'`{c}`' for c in about['commits'])}; machine: {about['machine']}\n"
  text += (
    f"- wall time: {fixed(about['wall_time_min'], 1)} min for {about['runs']} runs; {about['steps']:,} steps each\n"
  )
  text += "- where each normalization batch ran:\n" + "".join(
    f"  - {n}: {where}\n" for n, where in about["placements"].items()
  )
  text += (
    "\nEach run is evaluated four ways at the end: with its running averages (EMA), with PreciseBN's population "
    "statistics (`jaxbn.population_stats` over training samples at the run's normalization batch; the pooled and "
    "the paper's estimator), and with each test batch's own statistics at the training normalization batch.\n\n"
  )
  (out / "report.md").write_text(text + body(records, "accuracy.png"))


def side_by_side(columns: dict[str, list[dict]]) -> str:
  """A table of each claim's verdict in several comparisons (e.g. two training lengths)."""
  verdict = {label: {claim: status for claim, status, _ in claims(records)} for label, records in columns.items()}
  names = list(dict.fromkeys(claim for v in verdict.values() for claim in v))
  return table(["claim", *columns], [[name, *[v.get(name, "–") for v in verdict.values()]] for name in names])
