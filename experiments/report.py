"""Tables and plots of the experiments, from their committed metrics files.

    python experiments/report.py --size {default,full} [--reports reports] [--out DIR]

Reads REPORTS/SIZE/data/ (written by experiments/run.py) and writes
{e1,e2,e3}.md with PNG figures, headline.json and README.md to REPORTS/SIZE
(or --out). Hand-written discussion in experiments/notes/EXPERIMENT.md is
included for the full size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.reporting import e1, e2, e3, e4, e5
from experiments.reporting.results import ROOT, Results, fixed
from trainer import cli

SECTIONS = (
  (
    "e1",
    e1,
    "E1 — paper Figure 1 over a grid of settings (MLP, with/without BN; learning-rate sweep)",
    ("e1", "e1_sweep"),
  ),
  ("e2", e2, "E2 — paper Figure 3 at small scale (Inception-style net)", ("e2",)),
  ("e3", e3, "E3 — per-device vs synced BN on 8 devices, every parallel style", ("e3",)),
  ("e4", e4, "E4 — per-device vs synced BN on a convnet: the normalization batch swept", ("e4",)),
  ("e4-long", None, "E4-long — E4 at four times its length (written with E4)", ("e4_long",)),
  ("e5", e5, "E5 — averaged weights (weight EMA) with averaged or recomputed BN statistics", ("e5",)),
)


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=["default", "full"], default="default")
  parser.add_argument("--reports", default="reports")
  parser.add_argument("--out", help="where to write (default: REPORTS/SIZE, next to its data)")
  args = parser.parse_args(argv)
  root = ROOT / args.reports / args.size
  out = Path(args.out) if args.out else root
  out.mkdir(parents=True, exist_ok=True)
  try:
    results = Results(root)
  except FileNotFoundError as error:
    sys.exit(f"report.py: {error}")
  headline, index = {}, [f"# Experiments ({args.size})\n"]
  for name, section, title, experiments in SECTIONS:
    if section is not None:
      headline[name] = section.report(results, out, args.size)
    if any(results.runs(e) for e in experiments):
      d = results.describe(*experiments)
      index.append(f"- [{title}]({name}.md): {d['runs']} runs, {fixed(d['wall_time_min'], 1)} min ({d['machine']})")
  (out / "headline.json").write_text(json.dumps(headline, indent=1) + "\n")
  (out / "README.md").write_text("\n".join(index) + "\n")
  print(f"written to {out}")


if __name__ == "__main__":
  main()
