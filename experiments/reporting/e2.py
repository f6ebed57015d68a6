"""E2: the paper's Figure 3 / §4.2.1 variants at small scale (Inception-style convnet)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments.reporting.results import Results, commands, fixed, mean_spread, notes, save_figure, table


def report(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e2")
  if not runs:
    return {}
  rows = list(dict.fromkeys(r.labels["row"] for r in runs))
  seeds = sorted({r.labels["seed"] for r in runs})
  by = {(r.labels["row"], r.labels["seed"]): r for r in runs}
  # per seed: the baseline's best accuracy is the target every row must reach
  target = {s: float(by["Baseline", s].accuracy.max()) for s in seeds if ("Baseline", s) in by}
  fig, ax = plt.subplots(figsize=(9, 5))
  table_rows, headline = [], {}
  for row in rows:
    mine = [by[row, s] for s in seeds if (row, s) in by]
    curves = np.stack([r.accuracy for r in mine])
    (line,) = ax.plot(mine[0].steps, curves.mean(0), label=row)
    ax.fill_between(mine[0].steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15, lw=0)
    reach = [r.first_step_reaching(target[r.labels["seed"]]) for r in mine]
    best = [float(r.accuracy.max()) for r in mine]
    table_rows.append(
      [row, ", ".join(str(x) if x else "never" for x in reach), mean_spread(best), mean_spread([r.final for r in mine])]
    )
    headline[row] = {"steps_to_baseline_best": reach, "best": best, "final": [r.final for r in mine]}
  for t in target.values():
    ax.axhline(t, color="gray", lw=0.8, ls="--")
  config = runs[0].config
  ax.set(
    xlabel="training steps",
    ylabel="test accuracy",
    xlim=(0, runs[0].steps[-1]),
    title=f"Inception-style net, Fashion-MNIST; mean of seeds {seeds}, band min–max",
  )
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  save_figure(fig, out / "e2.png")
  text = results.header("E2 — paper Figure 3 at small scale: Inception-style convnet", "e2")
  text += (
    f"A small Inception-style net (conv-BN-activation stem, four inception modules with 1×1, 3×3, "
    f"double-3×3 and pooling branches, global average pool; channel width {config['width']}), batch "
    f"{config['batch_size']}, SGD with momentum 0.9, {config['steps']:,} steps, seeds {seeds}, "
    "Fashion-MNIST. Scaled down from the paper (ImageNet, 31 GPUs-worth of steps) to fit a 2-core CPU. "
    "BN-x5 / BN-x30 multiply the learning rate by 5 / 30, remove dropout, decay the learning rate 6× "
    "faster and divide the L2 weight decay by 5 (paper §4.2.1).\n\n"
  )
  text += (
    "![E2](e2.png)\n\nDashed: the baseline's best accuracy, one line per seed "
    f"({', '.join(fixed(t, 4) for t in target.values())}).\n\n"
  )
  text += table(
    ["model", "steps to reach the baseline's best (per seed)", "best accuracy", "final accuracy"], table_rows
  )
  text += "\n" + notes(size, "e2") + commands(runs)
  (out / "e2.md").write_text(text)
  return headline
