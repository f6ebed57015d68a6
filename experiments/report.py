"""Tables and plots of the experiments, from their committed metrics files.

    python experiments/report.py --size {default,full} [--reports reports]

Reads REPORTS/SIZE/data/ (written by experiments/run.py) and writes
REPORTS/SIZE/{e1,e2,e3}.md with PNG figures. Hand-written discussion in
experiments/notes/EXPERIMENT.md is included for the full size.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = ("p15", "p50", "p85")


class Results:
  def __init__(self, root: Path):
    self.root = root
    self.meta = json.loads((root / "data" / "meta.json").read_text())

  def runs(self, experiment):
    """[(labels, metrics list, meta)] of an experiment, in plan order."""
    out = []
    for key, info in self.meta["runs"].items():
      exp, name = key.split("/", 1)
      path = self.root / "data" / exp / f"{name}.jsonl"
      if exp == experiment and path.exists():
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line]
        out.append((info["labels"], metrics, info))
    return out

  def wall_time(self, *experiments) -> float:
    return sum(i.get("wall_time_s", 0.0) for k, i in self.meta["runs"].items()
               if k.split("/", 1)[0] in experiments)

  def header(self, title, *experiments) -> str:
    runs = [r for e in experiments for r in self.runs(e)]
    commands = "\n".join(info["command"] for _, _, info in runs)
    return (f"# {title}\n\n"
            f"- size: `{self.meta['size']}` (`make {'reproduce' if self.meta['size'] == 'full' else 'train'}`)\n"
            f"- commit: `{self.meta['commit']}`; machine: {self.meta['machine']}\n"
            f"- wall time: {self.wall_time(*experiments) / 60:.1f} min for {len(runs)} runs "
            f"(each run's own command below; run by `experiments/run.py`)\n\n")


def _steps(metrics):
  return np.array([m["step"] for m in metrics])


def _acc(metrics):
  return np.array([m["test_accuracy"] for m in metrics])


def _notes(size, experiment) -> str:
  path = ROOT / "experiments" / "notes" / f"{experiment}.md"
  return path.read_text() + "\n" if size == "full" and path.exists() else ""


def _commands(runs) -> str:
  return "## Commands\n\n```\n" + "\n".join(info["command"] for _, _, info in runs) + "\n```\n"


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def _pm(values, digits=4) -> str:
  values = np.asarray(values, float)
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{values.mean():.{digits}f} ± {(values.max() - values.min()) / 2:.{digits}f}"


def _first_step_reaching(metrics, target):
  for m in metrics:
    if m["test_accuracy"] >= target:
      return m["step"]
  return None


# ---- E1 ---------------------------------------------------------------------


def e1(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e1")
  arms = {False: [r for r in runs if not r[0]["bn"]], True: [r for r in runs if r[0]["bn"]]}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for bn, color, label in ((False, "tab:blue", "Without BN"), (True, "tab:red", "With BN")):
    curves = np.stack([_acc(m) for _, m, _ in arms[bn]])
    steps = _steps(arms[bn][0][1])
    axes[0].plot(steps, curves.mean(0), color=color, label=label)
    axes[0].fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
  axes[0].set(title="(a) test accuracy", xlabel="training steps", ylabel="test accuracy")
  # from the accuracy after ~1k steps: earlier points would flatten the rest
  low = min(float(np.interp(1000, _steps(m), _acc(m))) for _, m, _ in runs)
  axes[0].set_ylim(max(0.0, low - 0.02), None)
  axes[0].legend()
  for ax, bn, title in ((axes[1], False, "(b) without BN"), (axes[2], True, "(c) with BN")):
    metrics = arms[bn][0][1]
    steps = _steps(metrics)
    for p, style in zip(PERCENTILES, (":", "-", ":")):
      ax.plot(steps, [m[p] for m in metrics], "k" + style, label=f"{p[1:]}th percentile")
    ax.set(title=f"{title}: input to one last-layer sigmoid", xlabel="training steps")
    ax.legend()
  fig.tight_layout()
  fig.savefig(out / "e1.png", dpi=110)
  plt.close(fig)

  checkpoints = [s for s in (1000, 5000, 10000, 20000, 50000) if s <= _steps(runs[0][1])[-1]]
  rows = []
  for bn in (False, True):
    acc_at = lambda m, s: next(x["test_accuracy"] for x in m if x["step"] == s)
    rows.append(["BN" if bn else "no BN"] + [_pm([acc_at(m, s) for _, m, _ in arms[bn]]) for s in checkpoints])
  speedups, reach_steps = [], []
  for (_, base, _), (_, norm, _) in zip(arms[False], arms[True]):
    final = base[-1]["test_accuracy"]
    reach = _first_step_reaching(norm, final)
    reach_steps.append(reach)
    if reach:
      speedups.append(base[-1]["step"] / reach)
  headline = {"final_no_bn": [m[-1]["test_accuracy"] for _, m, _ in arms[False]],
              "final_bn": [m[-1]["test_accuracy"] for _, m, _ in arms[True]],
              "bn_reaches_no_bn_final_at": reach_steps, "speedup": speedups}

  sweep = results.runs("e1_sweep")
  lrs = sorted({r[0]["lr"] for r in sweep})
  final = {(r[0]["bn"], r[0]["lr"]): r[1][-1]["test_accuracy"] for r in sweep}
  if sweep:
    fig, ax = plt.subplots(figsize=(6, 4))
    for bn, color, label in ((False, "tab:blue", "Without BN"), (True, "tab:red", "With BN")):
      ax.plot(lrs, [final.get((bn, lr), math.nan) for lr in lrs], "o-", color=color, label=label)
    ax.set(xscale="log", xlabel="learning rate (plain SGD)", ylabel="final test accuracy",
           title=f"Learning-rate sweep, {sweep[0][1][-1]['step']} steps")
    ax.axhline(0.1, color="gray", lw=0.8, ls="--")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e1_sweep.png", dpi=110)
    plt.close(fig)

  seeds = sorted({r[0]["seed"] for r in runs})
  text = results.header("E1 — paper Figure 1: MNIST-style MLP with and without BN", "e1", "e1_sweep")
  text += ("Fashion-MNIST (this machine has no network; MNIST works with `--dataset mnist`), "
           "MLP 784-100-100-100-10 with sigmoid units, weights N(0, 0.1²), batch 60, plain SGD "
           f"at learning rate {runs[0][2]['command'].split('--lr ')[1].split()[0]} for both arms, "
           f"seeds {seeds}. With BN, BN sits before each sigmoid and the Dense layers have no bias.\n\n")
  text += "![E1](e1.png)\n\n(a) mean over seeds, band = min..max; (b, c) seed 0, percentiles over the 10,000 test images.\n\n"
  text += "## Test accuracy (mean ± half the spread over seeds)\n\n"
  text += _table(["", *[f"{s // 1000}k steps" for s in checkpoints]], rows)
  reached = [s for s in reach_steps if s]
  text += (f"\nThe net without BN ends at {_pm(headline['final_no_bn'])}; with BN at {_pm(headline['final_bn'])}. "
           + (f"BN first reaches the no-BN net's final accuracy at step {', '.join(map(str, reach_steps))} "
              f"(per seed): a speed-up of {_pm(speedups, 1)}×.\n" if reached else
              "BN never reaches the no-BN net's final accuracy in this run.\n"))
  if sweep:
    text += "\n## Learning-rate sweep (seed 0)\n\n![sweep](e1_sweep.png)\n\n"
    text += _table(["learning rate", *[f"{lr:g}" for lr in lrs]],
                   [["no BN", *[f"{final.get((False, lr), math.nan):.4f}" for lr in lrs]],
                    ["BN", *[f"{final.get((True, lr), math.nan):.4f}" for lr in lrs]]])
    text += "\n(0.1 is chance: the network stopped training.)\n"
  text += "\n" + _notes(size, "e1") + _commands(runs + sweep)
  (out / "e1.md").write_text(text)
  return headline


# ---- E2 ---------------------------------------------------------------------


def e2(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e2")
  if not runs:
    return {}
  baseline = next(m for labels, m, _ in runs if labels["row"] == "Baseline")
  target = max(_acc(baseline))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  rows, headline = [], {}
  for labels, metrics, _ in runs:
    ax.plot(_steps(metrics), _acc(metrics), label=labels["row"])
    reach = _first_step_reaching(metrics, target)
    best = float(max(_acc(metrics)))
    rows.append([labels["row"], reach if reach else "never", f"{best:.4f}"])
    headline[labels["row"]] = {"steps_to_baseline_best": reach, "best": best}
  ax.axhline(target, color="gray", lw=0.8, ls="--")
  ax.set(xlabel="training steps", ylabel="test accuracy", title="Inception-style net, Fashion-MNIST")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "e2.png", dpi=110)
  plt.close(fig)
  config = json.loads((results.root / "data" / "e2" / f"{Path(runs[0][2]['command'].split('--out ')[1]).name}.json").read_text())
  text = results.header("E2 — paper Figure 3 at small scale: Inception-style convnet", "e2")
  text += (f"A small Inception-style net (conv-BN-activation stem, four inception modules with 1×1, 3×3, "
           f"double-3×3 and pooling branches, global average pool; channel width {config['width']}), batch 32, "
           f"SGD with momentum 0.9, {config['steps']} steps, seed 0, Fashion-MNIST. Scaled down from the paper "
           "(ImageNet, 31 GPUs-worth of steps) to fit a 2-core CPU. BN-x5 / BN-x30 multiply the learning rate "
           "by 5 / 30, remove dropout, decay the learning rate 6× faster and divide the L2 weight decay by 5 "
           "(paper §4.2.1).\n\n")
  text += f"![E2](e2.png)\n\nDashed: the baseline's best accuracy ({target:.4f}).\n\n"
  text += _table(["model", f"steps to reach {target:.4f}", "best accuracy"], rows)
  text += "\n" + _notes(size, "e2") + _commands(runs)
  (out / "e2.md").write_text(text)
  return headline


# ---- E3 ---------------------------------------------------------------------

E3_MODES = ("per-device BN", "synced BN", "one device, global batch", "no BN")


def e3(results: Results, out: Path, size: str) -> dict:
  runs = results.runs("e3")
  if not runs:
    return {}
  batches = sorted({r[0]["per_device_batch"] for r in runs})
  by = {}
  for labels, metrics, _ in runs:
    by.setdefault((labels["mode"], labels["per_device_batch"]), []).append(metrics)
  step_ms = lambda ms: float(np.median([1e3 / m["steps_per_sec"] for m in ms[1:]] or [math.nan]))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for mode in E3_MODES:
    finals = [[m[-1]["test_accuracy"] for m in by.get((mode, b), [])] for b in batches]
    mean = [np.mean(f) if f else math.nan for f in finals]
    err = [(max(f) - min(f)) / 2 if f else 0 for f in finals]
    axes[0].errorbar(batches, mean, yerr=err, marker="o", capsize=3, label=mode)
    for metrics in by.get((mode, batches[0]), [])[:1]:
      axes[1].plot(_steps(metrics), _acc(metrics), label=mode)
  axes[0].set_xscale("log", base=2)
  axes[0].minorticks_off()
  axes[0].set(xticks=batches, xticklabels=batches, xlabel="per-device batch (8 devices)",
              ylabel="final test accuracy", title="Final accuracy vs per-device batch")
  axes[1].set(xlabel="training steps", ylabel="test accuracy",
              title=f"Per-device batch {batches[0]} (global {8 * batches[0]}), seed 0")
  axes[0].legend()
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(out / "e3.png", dpi=110)
  plt.close(fig)
  rows, headline = [], {}
  for b in batches:
    row = [b, 8 * b]
    for mode in E3_MODES:
      ms = by.get((mode, b), [])
      row.append(_pm([m[-1]["test_accuracy"] for m in ms]) if ms else "")
      headline[f"{mode} b{b}"] = [m[-1]["test_accuracy"] for m in ms]
    rows.append(row)
  time_rows = [[b] + [f"{np.mean([step_ms(m) for m in by.get((mode, b), [])]):.2f}" for mode in E3_MODES]
               for b in batches]
  seeds = sorted({r[0]["seed"] for r in runs})
  steps = runs[0][1][-1]["step"]
  text = results.header("E3 — per-device vs synced BN on 8 devices", "e3")
  text += (f"The E1 MLP with BN (sigmoid, plain SGD), {steps} steps, 8 CPU host devices, seeds {seeds}. "
           "Per-device BN normalizes each device's batch alone and combines the running statistics with "
           "`jaxbn.sync_batch_stats` before each evaluation; synced BN normalizes with the statistics of the "
           "whole global batch; the third column is one device with the whole global batch.\n\n")
  text += ("![E3](e3.png)\n\nSynced BN and one device with the global batch give the same curves, so one "
           "line hides the other.\n\n## Final test accuracy (mean ± half the spread over seeds)\n\n")
  text += _table(["per-device batch", "global batch", *E3_MODES], rows)
  text += ("\n## Step time (ms, median over evaluations after the first)\n\n"
           "The 8 devices are host devices sharing 2 CPU cores, so these times measure dispatch and "
           "collective overhead on a CPU, not what a GPU or TPU pod would show.\n\n")
  text += _table(["per-device batch", *E3_MODES], time_rows)
  text += "\n" + _notes(size, "e3") + _commands(runs)
  (out / "e3.md").write_text(text)
  return headline


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", choices=["default", "full"], default="default")
  parser.add_argument("--reports", default="reports")
  args = parser.parse_args(argv)
  out = ROOT / args.reports / args.size
  results = Results(out)
  headline = {"e1": e1(results, out, args.size), "e2": e2(results, out, args.size),
              "e3": e3(results, out, args.size)}
  (out / "headline.json").write_text(json.dumps(headline, indent=1) + "\n")
  index = [f"# Experiments ({args.size})\n", f"commit `{results.meta['commit']}`, {results.meta['machine']}\n"]
  for name, title, experiments in (
      ("e1", "E1 — paper Figure 1 (MLP, with/without BN, learning-rate sweep)", ("e1", "e1_sweep")),
      ("e2", "E2 — paper Figure 3 at small scale (Inception-style net)", ("e2",)),
      ("e3", "E3 — per-device vs synced BN on 8 devices", ("e3",))):
    if (out / f"{name}.md").exists():
      index.append(f"- [{title}]({name}.md): {results.wall_time(*experiments) / 60:.1f} min")
  (out / "README.md").write_text("\n".join(index) + "\n")
  print(f"written to {out}")


if __name__ == "__main__":
  main()
