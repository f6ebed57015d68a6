"""E5: averaged weights (--weight-ema) on E4's synced-BN ResNet-20, with averaged or recomputed BN statistics."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments.reporting.results import Results, commands, mean_spread, notes, save_figure, table

# metric -> (weights, BN statistics) it scores
SCORES = {
  "test_accuracy": ("live", "running averages"),
  "test_accuracy_population": ("live", "PreciseBN (recomputed)"),
  "test_accuracy_weight_ema": ("averaged", "averaged alongside (timm's way)"),
  "test_accuracy_weight_ema_recomputed": ("averaged", "PreciseBN of the averaged weights"),
}


def report(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e5")
  if not runs:
    return {}
  decays = sorted({r.labels["decay"] for r in runs})
  fig, axes = plt.subplots(1, len(decays), figsize=(5.5 * len(decays), 4.2), squeeze=False, sharey=True)
  rows, headline = [], {}
  for ax, decay in zip(axes[0], decays, strict=True):
    mine = [r for r in runs if r.labels["decay"] == decay]
    seeds = [r.labels["seed"] for r in mine]
    for metric, (weights, stats) in SCORES.items():
      curves = np.stack([r.series(metric) for r in mine])
      (line,) = ax.plot(mine[0].steps, curves.mean(0), marker="o", label=f"{weights} weights, {stats}")
      ax.fill_between(mine[0].steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15, lw=0)
      finals = [float(c[-1]) for c in curves]
      rows.append([f"{decay:g}", weights, stats, mean_spread(finals), ", ".join(f"{v:.4f}" for v in finals)])
      headline[f"{decay:g}/{metric}"] = finals
    ax.set(xlabel="training steps", title=f"decay {decay:g}, seeds {seeds}")
  axes[0][0].set_ylabel("test accuracy")
  axes[0][-1].legend(loc="lower right", fontsize=8, frameon=False)
  save_figure(fig, out / "e5.png")
  config = runs[0].config
  text = results.header("E5 — averaged weights and the BN statistics that go with them", "e5")
  text += (
    f"ResNet-20 on Fashion-MNIST as E4 trains it (global batch {config['global_batch_size']} over "
    f"{config['devices']} devices, synced BN, {config['steps']} steps), with `--weight-ema D "
    f"--weight-ema-bn both`: every evaluation scores the live weights with their running averages and "
    f"with PreciseBN ({config['population_batches']} training batches), and the averaged weights with "
    "the running statistics averaged alongside them and with PreciseBN of the averaged weights. The "
    "decay is a choice: a time constant of 100 steps (0.99) and of 500 (0.998, most of the run). "
    "Band: min–max over seeds.\n\n![E5](e5.png)\n\n"
  )
  text += f"Final step ({runs[0].steps[-1]}), mean ± half range over seeds:\n\n"
  text += table(["decay", "weights", "BN statistics", "test accuracy", "per seed"], rows)
  text += "\n" + notes(size, "e5") + commands(runs)
  (out / "e5.md").write_text(text)
  return headline
