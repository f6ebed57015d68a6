"""E3: per-device vs synced BN on 8 devices, in every parallel style of train.py."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments.reporting.results import Results, Run, commands, fixed, mean_spread, notes, save_figure, table

# (label, mode in the plan, metric, colour, line style)
CURVES = (
  ("per-device BN, running averages", "per-device BN", "test_accuracy", "tab:blue", "-"),
  ("per-device BN, population statistics", "per-device BN", "test_accuracy_population", "tab:blue", "--"),
  ("Batch Renorm (per-device)", "Batch Renorm (per-device)", "test_accuracy", "tab:green", "-"),
  ("synced BN, running averages", "synced BN", "test_accuracy", "tab:red", "-"),
  ("synced BN, population statistics", "synced BN", "test_accuracy_population", "tab:red", "--"),
  ("one device, global batch", "one device, global batch", "test_accuracy", "tab:purple", ":"),
  ("no BN", "no BN", "test_accuracy", "gray", "-"),
)
STYLED_MODES = ("per-device BN", "synced BN", "Batch Renorm (per-device)", "no BN")
STYLES = ("jit", "shard_map", "pmap")


def step_ms(run: Run) -> float:
  """Median milliseconds per training step over the evaluations after the first
  (which includes compilation); the training chunk only, not the evaluation."""
  rates = run.series("steps_per_sec")[1:]
  return float(np.median(1e3 / rates)) if len(rates) else math.nan


def report(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e3")
  if not runs:
    return {}
  batches = sorted({r.labels["per_device_batch"] for r in runs})
  seeds = sorted({r.labels["seed"] for r in runs})
  styles = [s for s in STYLES if any(r.labels["style"] == s for r in runs)]
  index = {(r.labels["mode"], r.labels["style"], r.labels["per_device_batch"], r.labels["seed"]): r for r in runs}

  def finals(mode, metric, batch, style="jit"):
    return [index[mode, style, batch, s].metrics[-1].get(metric) for s in seeds if (mode, style, batch, s) in index]

  fig, (acc, time_ax) = plt.subplots(1, 2, figsize=(14, 5.2))
  headline = {}
  for label, mode, metric, color, style in CURVES:
    values = [[v for v in finals(mode, metric, b) if v is not None] for b in batches]
    if not any(values):
      continue
    mean = [np.mean(v) if v else math.nan for v in values]
    err = [(max(v) - min(v)) / 2 if v else 0 for v in values]
    acc.errorbar(batches, mean, yerr=err, color=color, ls=style, marker="o", capsize=3, label=label)
    headline[label] = {str(b): v for b, v in zip(batches, values, strict=True)}
  acc.set_xscale("log", base=2)
  acc.minorticks_off()
  acc.set(
    xticks=batches,
    xticklabels=batches,
    xlabel="per-device batch (8 devices; global = 8×)",
    ylabel="final test accuracy",
    title=f"Final accuracy, jit style; mean of seeds {seeds}, bars min–max",
  )
  acc.legend(loc="lower right", fontsize=8, framealpha=0.9)
  markers = dict(zip(STYLES, ("o", "s", "^"), strict=True))
  for mode, color in (("per-device BN", "tab:blue"), ("synced BN", "tab:red")):
    for style in styles:
      times = [
        step_ms(index[mode, style, b, seeds[0]]) if (mode, style, b, seeds[0]) in index else math.nan for b in batches
      ]
      time_ax.plot(
        batches, times, color=color, marker=markers[style], ls="-" if style == "jit" else ":", label=f"{mode}, {style}"
      )
  time_ax.set_xscale("log", base=2)
  time_ax.minorticks_off()
  time_ax.set(
    xticks=batches,
    xticklabels=batches,
    xlabel="per-device batch (8 devices)",
    ylim=(0, None),
    ylabel="ms per training step",
    title="Training-chunk time per step (8 host devices, 2 CPU cores)",
  )
  time_ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
  save_figure(fig, out / "e3.png")

  text = results.header("E3 — per-device vs synced BN on 8 devices, every parallel style", "e3")
  first = runs[0]
  text += (
    f"The E1 MLP with BN (sigmoid, plain SGD, lr {first.config['lr']}), {first.steps[-1]:,} steps, "
    f"8 CPU host devices, seeds {seeds}. Per-device BN normalizes each device's batch alone and pools "
    "the running statistics over devices (`jaxbn.sync_batch_stats`) before each evaluation; synced "
    "BN normalizes with the whole global batch; 'one device, global batch' is the synced run's "
    "single-device oracle. Batch Renorm (`--bn renorm`) normalizes per device and corrects toward the "
    "pooled running statistics (r_max 1→3, d_max 0→5 from 10% to 60% of the steps). 'Population "
    "statistics': the same weights evaluated with Algorithm 2's statistics (`jaxbn.population_stats`, "
    f"`--population-batches {first.config.get('population_batches') or 0}`: that many training batches "
    "of the size BN normalized over in training: one device's batch for per-device BN, the global "
    "batch for synced BN) instead of the running averages.\n\n"
  )
  text += "![E3](e3.png)\n\n## Final test accuracy, jit style (mean ± half the range over seeds)\n\n"
  shown = [c for c in CURVES if c[0] in headline]
  text += table(
    ["per-device batch", "global batch", *[c[0] for c in shown]],
    [[b, 8 * b, *[mean_spread(finals(mode, metric, b)) for _, mode, metric, _, _ in shown]] for b in batches],
  )
  if len(styles) > 1:
    text += f"\n## The parallel styles (seed {seeds[0]}): final test accuracy in jit / shard_map / pmap\n\n"
    rows, worst = [], 0.0
    for mode in STYLED_MODES:
      for b in batches:
        values = [index[mode, s, b, seeds[0]].final for s in styles if (mode, s, b, seeds[0]) in index]
        if len(values) < 2:
          continue
        worst = max(worst, max(values) - min(values))
        rows.append([mode, b, " / ".join(fixed(v, 4) for v in values), fixed(max(values) - min(values), 4)])
    by_seed = [finals(mode, "test_accuracy", b) for mode in STYLED_MODES for b in batches]
    seed_gap = [max(v) - min(v) for v in by_seed if len(v) > 1]  # two seeds: their difference
    text += table(["mode", "per-device batch", " / ".join(styles), "max − min"], rows)
    text += (
      f"\nLargest difference between styles: {fixed(worst, 4)}; between two seeds of the same run (jit): "
      f"median {fixed(np.median(seed_gap), 4)}, largest {fixed(max(seed_gap), 4)}.\n"
      if seed_gap
      else ""
    )
    headline["styles_max_difference"] = worst
    text += "\n## Step time (ms per training step; training chunk only, median over evaluations after the first)\n\n"
    text += (
      "The 8 devices are host devices sharing 2 CPU cores: these times measure dispatch and "
      "collective overhead on a CPU, not what a GPU or TPU pod would show.\n\n"
    )
    time_rows = []
    for mode in STYLED_MODES:
      for style in styles:
        time_rows.append(
          [
            mode,
            style,
            *[
              fixed(step_ms(index[mode, style, b, seeds[0]]), 2) if (mode, style, b, seeds[0]) in index else ""
              for b in batches
            ],
          ]
        )
    text += table(["mode", "style", *[f"batch {b}" for b in batches]], time_rows)
  text += "\n" + notes(size, "e3") + commands(runs)
  (out / "e3.md").write_text(text)
  return headline
