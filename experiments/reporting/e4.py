"""E4: per-device vs synced BN on a convnet: the normalization batch swept, four evaluations."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments.reporting.results import (
  Results,
  commands,
  fixed,
  half_range,
  known_mean,
  mean_spread,
  notes,
  save_figure,
  table,
)

# The four evaluations of every run: (label, metric, colour, line style)
EVALUATIONS = (
  ("running averages (EMA)", "test_accuracy", "tab:blue", "-"),
  ("PreciseBN, pooled", "test_accuracy_population_pooled", "tab:green", "--"),
  ("PreciseBN, paper", "test_accuracy_population", "tab:olive", ":"),
  ("test-batch statistics", "test_accuracy_batch_stats", "tab:red", "-."),
)
REPAIRS = (("Batch Renorm", "s", "tab:purple"), ("FrozenBN final phase", "D", "tab:brown"))
MIN_GAP = 0.005  # accuracy differences below this, or below the seed spread, are called equal


def _values(index, mode, size, metric, seeds):
  return [index[mode, size, s].metrics[-1].get(metric) for s in seeds if (mode, size, s) in index]


def _sizes(sizes) -> str:
  return ", ".join(map(str, sizes)) if sizes else "none"


def verdicts(index, sizes, seeds) -> list[str]:
  """Each literature claim, checked against the EMA evaluation (and the others where they are the point)."""
  ema = {n: _values(index, "BN", n, "test_accuracy", seeds) for n in sizes}
  mean = {n: known_mean(v) for n, v in ema.items()}
  noise = max(MIN_GAP, float(np.median([half_range(v) for v in ema.values()])) * 2)
  best = max(mean, key=mean.get)
  # the smallest size from which every size up to the best is within the noise of the best
  recovered = min(n for n in sizes if n <= best and all(mean[m] >= mean[best] - noise for m in sizes if n <= m <= best))
  answer = f"yes, below {recovered}" if recovered > min(sizes) else "no"
  out = [
    f"**Small normalization batches hurt** — {answer}: with running averages the accuracy is "
    + ", ".join(f"{fixed(mean[n], 4)} at {n}" for n in sizes)
    + f"; from {recovered} up to {best} every size is within {fixed(noise, 4)} (twice the median seed spread, "
    f"at least {MIN_GAP}) of the best ({fixed(mean[best], 4)} at {best})."
  ]
  synced = max(sizes)
  whole = synced == next(iter(index.values())).config["global_batch_size"]
  reference = f"synced BN over all {synced}" if whole else f"the largest size run, {synced}"
  mid = [n for n in sizes if 16 <= n < synced]
  if mid:
    top = max(mid, key=mean.get)
    diff = mean[top] - mean[synced]
    word = "beats" if diff > noise else ("matches" if diff > -noise else "is below")
    out.append(
      f"**A mid-size normalization batch matches or beats synced BN** (Page, Composer) — the best of "
      f"{', '.join(map(str, mid))} ({fixed(mean[top], 4)} at {top}) {word} {reference} "
      f"({fixed(mean[synced], 4)}; difference {fixed(diff, 4)})."
    )

  precise = {n: _values(index, "BN", n, "test_accuracy_population_pooled", seeds) for n in sizes}
  pooled = {n: known_mean(v) for n, v in precise.items()}
  paper = {n: known_mean(_values(index, "BN", n, "test_accuracy_population", seeds)) for n in sizes}
  gains = {n: pooled[n] - mean[n] for n in sizes}
  ahead = [n for n in sizes if gains[n] > noise]
  behind = [n for n in sizes if gains[n] < -noise]
  large = [n for n in sizes if n >= 32 and len([v for v in ema[n] if v is not None]) > 1]  # with a seed spread
  ema_spread = known_mean([half_range(ema[n]) for n in large])
  precise_spread = known_mean([half_range(precise[n]) for n in large])
  out.append(
    "**PreciseBN beats the running average** (Wu & Johnson) — pooled PreciseBN minus EMA: "
    + ", ".join(f"{fixed(gains[n], 4)} at {n}" for n in sizes)
    + f"; ahead by more than {fixed(noise, 4)} at {_sizes(ahead)}, behind by more at {_sizes(behind)}. "
    "Pooled minus paper's estimator: "
    + ", ".join(f"{fixed(pooled[n] - paper[n], 4)} at {n}" for n in sizes)
    + "."
    + (
      f" EMA noisy at large normalization batches: half the seed range at {_sizes(large)} averages "
      f"{fixed(ema_spread, 4)} with EMA, {fixed(precise_spread, 4)} with pooled PreciseBN."
      if large
      else ""
    )
  )
  batch = {n: known_mean(_values(index, "BN", n, "test_accuracy_batch_stats", seeds)) for n in sizes}
  out.append(
    "**The train–test inconsistency** — evaluating with each test batch's own statistics at the training "
    "normalization batch, minus EMA: " + ", ".join(f"{fixed(batch[n] - mean[n], 4)} at {n}" for n in sizes) + "."
  )
  for mode, _, _ in REPAIRS:
    there = [n for n in sizes if (mode, n, seeds[0]) in index]
    if there:
      repaired = {n: known_mean(_values(index, mode, n, "test_accuracy", seeds)) for n in there}
      out.append(
        f"**{mode} at small batches** (EMA evaluation) — "
        + ", ".join(
          f"at {n}: {fixed(repaired[n], 4)} vs BN's {fixed(mean[n], 4)} ({fixed(repaired[n] - mean[n], 4)})"
          for n in there
        )
        + f"; {reference}: {fixed(mean[synced], 4)}."
      )
  return out


def report(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e4")
  if not runs:
    return {}
  sizes = sorted({r.labels["size"] for r in runs if r.labels["mode"] == "BN"})
  seeds = sorted({r.labels["seed"] for r in runs})
  index = {(r.labels["mode"], r.labels["size"], r.labels["seed"]): r for r in runs}
  first = next(r for r in runs if r.labels["mode"] == "BN")
  config = first.config

  fig, ax = plt.subplots(figsize=(9, 5.5))
  headline: dict = {}
  for label, metric, color, style in EVALUATIONS:
    values = [_values(index, "BN", n, metric, seeds) for n in sizes]
    if not any(v and v[0] is not None for v in values):
      continue
    ax.errorbar(
      sizes,
      [known_mean(v) for v in values],
      yerr=[half_range(v) for v in values],
      color=color,
      ls=style,
      marker="o",
      capsize=3,
      label=f"BN, {label}",
    )
    headline[label] = {str(n): v for n, v in zip(sizes, values, strict=True)}
  for mode, marker, color in REPAIRS:
    there = [n for n in sizes if (mode, n, seeds[0]) in index]
    if there:
      values = [_values(index, mode, n, "test_accuracy", seeds) for n in there]
      ax.errorbar(
        there,
        [known_mean(v) for v in values],
        yerr=[half_range(v) for v in values],
        color=color,
        ls="none",
        marker=marker,
        markersize=8,
        capsize=3,
        label=f"{mode}, EMA",
      )
      headline[mode] = {str(n): v for n, v in zip(there, values, strict=True)}
  ax.set_xscale("log", base=2)
  ax.minorticks_off()
  ax.set(
    xticks=sizes,
    xticklabels=[f"{n}" + (" (synced)" if n == config["global_batch_size"] else "") for n in sizes],
    xlabel=f"normalization batch (examples per BN statistic; global batch {config['global_batch_size']})",
    ylabel="final test accuracy",
    title=f"ResNet-20 on Fashion-MNIST; mean of seeds {seeds}, bars min–max",
  )
  ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
  save_figure(fig, out / "e4.png")

  text = results.header("E4 — per-device vs synced BN on a convnet: the normalization batch swept", "e4")
  text += (
    f"ResNet-20 (`--model resnet20`: its CIFAR recipe, lr {config['lr']} divided by 10 at 50% and 75% of the "
    f"steps, momentum 0.9, weight decay {config['weight_decay']}, crop-flip) on Fashion-MNIST, global batch "
    f"{config['global_batch_size']}, {first.steps[-1]:,} steps, seeds {seeds}. The normalization batch (the "
    "examples one BN statistic is computed over) is swept: up to the per-device batch of 16 as per-device BN "
    "on 8 host devices (below 16 as groups of each device's batch, `--bn-group-size`), 32 and 64 as groups "
    "of the global batch on one device, 128 as synced BN over the 8 devices (the styles and placements "
    "are equivalent: `tests/test_parallel_styles.py`, `tests/test_bn_tools.py`). Every run is evaluated "
    "four ways at the end: with the running averages (EMA, momentum 0.9); with PreciseBN "
    "(`jaxbn.population_stats` over about 10,000 training samples in the run's own normalization "
    "batches) with the pooled and with the paper's estimator; and with each test batch's own statistics "
    "at the training normalization batch (`--eval-batch-stats`). At the two smallest sizes Batch Renorm "
    "(`--bn renorm`) and a FrozenBN final phase (`--frozen-bn-steps`: the last fifth of the steps with "
    "the pooled running statistics fixed) are tried.\n\n"
  )
  text += "![E4](e4.png)\n\n## Final test accuracy (mean ± half the range over seeds)\n\n"
  shown = [e for e in EVALUATIONS if e[0] in headline]
  rows = [
    [f"BN, {n}", *[mean_spread(_values(index, "BN", n, metric, seeds)) for _, metric, _, _ in shown]] for n in sizes
  ]
  for mode, _, _ in REPAIRS:
    for n in sizes:
      if (mode, n, seeds[0]) in index:
        rows.append([f"{mode}, {n}", *[mean_spread(_values(index, mode, n, m, seeds)) for _, m, _, _ in shown]])
  text += table(["normalization batch", *[e[0] for e in shown]], rows)
  text += "\n## Verdicts\n\n" + "".join(f"- {v}\n" for v in verdicts(index, sizes, seeds)) + "\n"
  text += notes(size, "e4")
  text += commands(runs)
  (out / "e4.md").write_text(text)
  return headline
