"""E1: the paper's Figure 1 (MLP with and without BN) over a grid of training settings."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments.reporting.results import (
  Results,
  Run,
  commands,
  fixed,
  mean_spread,
  notes,
  percent,
  save_figure,
  table,
  value_range,
  verdict,
)

ARMS = ((False, "tab:blue", "without BN"), (True, "tab:red", "with BN"))
PERCENTILES = (
  ("p15", "15th", "tab:blue", "--"),
  ("p50", "50th (median)", "black", "-"),
  ("p85", "85th", "tab:orange", "-."),
)
STABLE_FROM = 1000  # the sigmoid-input median's spread is measured from this step on


def median_spread(run: Run) -> float:
  """max - min of the sigmoid input's median over the evaluations from step 1,000."""
  p50 = run.series("p50")[run.steps >= STABLE_FROM]
  return float(np.nanmax(p50) - np.nanmin(p50))


def compare(base: Run, bn: Run) -> dict:
  """One seed's pair. Speed-up: the steps the net without BN needs to first reach its own
  final accuracy, over the steps the BN net needs to reach it (None: it never does)."""
  target = base.final
  reach_base, reach_bn = base.first_step_reaching(target), bn.first_step_reaching(target)
  assert list(base.steps) == list(bn.steps), (base.name, bn.name)
  ahead = np.mean((bn.accuracy > base.accuracy) + 0.5 * (bn.accuracy == base.accuracy))
  return {
    "final": (base.final, bn.final),
    "best": (float(base.accuracy.max()), float(bn.accuracy.max())),
    "final_gain": bn.final - base.final,
    "reach": (reach_base, reach_bn),
    "speedup": reach_base / reach_bn if reach_bn else None,
    "share_ahead": float(ahead),
    "median_spread": (median_spread(base), median_spread(bn)),
  }


def claims(pairs: list[dict]) -> dict:
  """The paper's three claims for one setting, judged seed by seed."""
  return {
    "faster": verdict((p["speedup"] or 0) > 1 for p in pairs),
    "higher at the end": verdict(p["final_gain"] > 0 for p in pairs),
    "stable sigmoid inputs": verdict(p["median_spread"][1] < p["median_spread"][0] for p in pairs),
  }


def _by_setting(runs: list[Run]) -> dict:
  """{setting: (title, [(base, bn) per seed])} in plan order."""
  out = {}
  for run in runs:
    if not run.labels["bn"]:
      partner = next(
        r
        for r in runs
        if r.labels["bn"] and r.labels["setting"] == run.labels["setting"] and r.labels["seed"] == run.labels["seed"]
      )
      out.setdefault(run.labels["setting"], (run.labels["title"], []))[1].append((run, partner))
  return out


def _figure(title: str, pairs, path: Path) -> None:
  """Figure 1(a-c) for one setting, plus BN's lead at every evaluation."""
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  (acc, lead), (no_bn, with_bn) = axes
  steps = pairs[0][0].steps
  for index, (_bn, color, label) in enumerate(ARMS):
    curves = np.stack([pair[index].accuracy for pair in pairs])
    acc.plot(steps, curves.mean(0), color=color, label=f"{label} (mean of {len(pairs)} seeds)")
    acc.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
  acc.set(
    title="(a) test accuracy; band: min–max over seeds",
    xlabel="training steps",
    ylabel="test accuracy",
    xlim=(0, steps[-1]),
  )
  acc.legend(loc="lower right", framealpha=0.9)
  differences = np.stack([bn.accuracy - base.accuracy for base, bn in pairs])
  lead.axhline(0, color="gray", lw=0.8)
  lead.plot(steps, differences.mean(0), color="tab:purple", label="mean")
  lead.fill_between(
    steps, differences.min(0), differences.max(0), color="tab:purple", alpha=0.2, lw=0, label="min–max over seeds"
  )
  lead.set(
    title="(a′) BN's lead: accuracy with BN − without",
    xlabel="training steps",
    ylabel="accuracy difference",
    xlim=(0, steps[-1]),
  )
  lead.legend(loc="upper right", framealpha=0.9)
  for ax, index, name in ((no_bn, 0, "(b) without BN"), (with_bn, 1, "(c) with BN")):
    run = pairs[0][index]
    for key, label, color, style in PERCENTILES:
      ax.plot(run.steps, run.series(key), color=color, ls=style, label=f"{label} percentile")
    ax.set(
      title=f"{name}: input to one last-layer sigmoid (seed 0)",
      xlabel="training steps",
      ylabel="sigmoid input (pre-activation)",
      xlim=(0, steps[-1]),
    )
  low = min(np.nanmin(pair[i].series("p15")) for pair in pairs[:1] for i in (0, 1))
  high = max(np.nanmax(pair[i].series("p85")) for pair in pairs[:1] for i in (0, 1))
  for ax in (no_bn, with_bn):
    ax.set_ylim(low - 0.3, high + 0.3)  # the same scale in (b) and (c)
  handles, labels = no_bn.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
  fig.suptitle(f"E1, {title}")
  save_figure(fig, path, rect=(0, 0.04, 1, 1))


def _overview(settings: dict, analysis: dict, path: Path) -> None:
  """Speed-up and final gain of every setting, one dot per seed."""
  fig, (speed, gain) = plt.subplots(1, 2, figsize=(12, 0.6 * len(settings) + 2.2))
  names = list(settings)
  for row, name in enumerate(names):
    pairs = analysis[name]["pairs"]
    speeds = [p["speedup"] for p in pairs]
    speed.plot([s if s else math.nan for s in speeds], [row] * len(speeds), "o", color="tab:red")
    for s in speeds:
      if s is None:
        speed.annotate("never reaches", (1, row), xytext=(4, 4), textcoords="offset points", fontsize=8)
    gain.plot([p["final_gain"] for p in pairs], [row] * len(pairs), "o", color="tab:purple")
  for ax in (speed, gain):
    ax.set_yticks(range(len(names)), [settings[n][0] for n in names])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
  speed.axvline(1, color="gray", lw=0.8)
  speed.set(
    xscale="log", xlabel="speed-up (× fewer steps to the no-BN net's final accuracy)", title="faster? (right of 1: yes)"
  )
  ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32) if speed.get_xlim()[0] <= t <= speed.get_xlim()[1]]
  speed.set_xticks(ticks, [f"{t:g}×" for t in ticks])
  speed.minorticks_off()
  gain.axvline(0, color="gray", lw=0.8)
  gain.set(xlabel="final accuracy with BN − without", title="higher at the end? (right of 0: yes)")
  gain.set_yticklabels([])
  fig.suptitle("E1 grid: one dot per seed")
  save_figure(fig, path)


def _sweep(sweep: list[Run], out: Path) -> tuple[str, dict]:
  if not sweep:
    return "", {}
  lrs = sorted({r.labels["lr"] for r in sweep})
  final = {(r.labels["bn"], r.labels["lr"]): r.final for r in sweep}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for bn, color, label in ARMS:
    ax.plot(lrs, [final.get((bn, lr), math.nan) for lr in lrs], "o-", color=color, label=label)
  ax.axhline(0.1, color="gray", lw=0.8, ls="--", label="chance (the net stopped training)")
  ax.set(
    xscale="log",
    xlabel="learning rate (plain SGD, init std 0.1)",
    ylabel="final test accuracy",
    ylim=(0, 1),
    title=f"Learning-rate sweep, {sweep[0].steps[-1]:,} steps, seed 0",
  )
  ax.legend(loc="center left")
  save_figure(fig, out / "e1_sweep.png")
  text = "\n## Learning-rate sweep (plain SGD, init std 0.1, seed 0)\n\n![sweep](e1_sweep.png)\n\n"
  text += table(
    ["learning rate", *[f"{lr:g}" for lr in lrs]],
    [[label, *[fixed(final.get((bn, lr), math.nan), 4) for lr in lrs]] for bn, _, label in ARMS],
  )
  return text, {f"{'bn' if bn else 'no_bn'} lr{lr:g}": v for (bn, lr), v in final.items()}


def report(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e1")
  if not runs:
    return {}
  settings = _by_setting(runs)
  analysis = {}
  for name, (title, pairs) in settings.items():
    analysis[name] = {"title": title, "pairs": [compare(base, bn) for base, bn in pairs]}
    analysis[name]["claims"] = claims(analysis[name]["pairs"])
    _figure(title, pairs, out / f"e1_{name}.png")
  _overview(settings, analysis, out / "e1_grid.png")

  first = runs[0]
  steps, seeds = first.steps[-1], sorted({r.labels["seed"] for r in runs})
  text = results.header("E1 — paper Figure 1 over a grid of settings: MLP with and without BN", "e1", "e1_sweep")
  text += (
    f"Fashion-MNIST (this machine has no network; MNIST works with `--dataset mnist`), "
    f"MLP 784-100-100-100-10 with sigmoid units, batch {first.config['batch_size']}, {steps:,} steps, "
    f"seeds {seeds}, evaluated on the 10,000 test images every {first.config['eval_every']} steps. "
    "With BN, BN sits before each sigmoid and the Dense layers have no bias. The paper states neither "
    "its optimizer nor its initialization, so each setting below (optimizer × learning rate × "
    "weights ~ N(0, std²)) trains both arms the same way.\n\n"
    "- **speed-up**: the steps the net without BN needs to first reach its own final accuracy ÷ "
    "the steps the BN net needs to reach that accuracy (range over seeds);\n"
    "- **BN ahead**: the share of evaluations at which the BN net's test accuracy is higher;\n"
    f"- **median spread**: max − min of the last hidden layer's sigmoid-input median (unit 0, "
    f"over the test set) from step {STABLE_FROM:,} on: the drift the paper's Figure 1(b, c) shows.\n\n"
  )
  text += "![E1 grid](e1_grid.png)\n\n## Per setting (mean ± half the range over seeds)\n\n"
  rows = []
  for a in analysis.values():
    p = a["pairs"]
    rows.append(
      [
        a["title"],
        mean_spread([x["final"][0] for x in p]),
        mean_spread([x["final"][1] for x in p]),
        mean_spread([x["final_gain"] for x in p], 3),
        mean_spread([x["best"][0] for x in p]),
        mean_spread([x["best"][1] for x in p]),
        value_range([x["speedup"] for x in p], 1, "×"),
        percent(np.mean([x["share_ahead"] for x in p])),
        f"{mean_spread([x['median_spread'][0] for x in p], 2)} / {mean_spread([x['median_spread'][1] for x in p], 2)}",
      ]
    )
  text += table(
    [
      "setting",
      "final, no BN",
      "final, BN",
      "BN − no BN",
      "best, no BN",
      "best, BN",
      "speed-up",
      "BN ahead",
      "median spread, no BN / BN",
    ],
    rows,
  )
  text += "\n## The paper's claims, per setting\n\n"
  text += table(
    ["setting", "faster", "higher at the end", "stable sigmoid inputs"],
    [[a["title"], *a["claims"].values()] for a in analysis.values()],
  )
  text += (
    "\n'yes': holds for every seed; 'no': for none. Faster: speed-up > 1; higher: BN's final accuracy "
    "above the no-BN net's; stable: BN's median spread below the no-BN net's.\n"
  )
  for name, a in analysis.items():
    text += f"\n### {a['title']}\n\n![{name}](e1_{name}.png)\n\n"
    text += table(
      [
        "seed",
        "final no BN / BN",
        "no-BN reaches its final at",
        "BN reaches it at",
        "speed-up",
        "BN ahead",
        "median spread no BN / BN",
      ],
      [
        [
          s,
          f"{fixed(x['final'][0], 4)} / {fixed(x['final'][1], 4)}",
          x["reach"][0],
          x["reach"][1] or "never",
          fixed(x["speedup"], 1) + "×" if x["speedup"] else "–",
          percent(x["share_ahead"]),
          f"{fixed(x['median_spread'][0], 2)} / {fixed(x['median_spread'][1], 2)}",
        ]
        for s, x in zip(seeds, a["pairs"], strict=True)
      ],
    )
  sweep_text, sweep_headline = _sweep(results.runs("e1_sweep"), out)
  text += sweep_text
  text += "\n" + notes(size, "e1") + commands(runs + results.runs("e1_sweep"))
  (out / "e1.md").write_text(text)
  return {
    "settings": {
      name: {
        "title": a["title"],
        "claims": a["claims"],
        "final_gain": [x["final_gain"] for x in a["pairs"]],
        "speedup": [x["speedup"] for x in a["pairs"]],
        "share_ahead": [x["share_ahead"] for x in a["pairs"]],
        "median_spread": [x["median_spread"] for x in a["pairs"]],
        "final": [x["final"] for x in a["pairs"]],
      }
      for name, a in analysis.items()
    },
    "sweep": sweep_headline,
  }
