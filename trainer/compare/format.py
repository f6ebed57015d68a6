"""Numbers and tables as the reports show them: the same text on every Python and NumPy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def table(header, rows) -> str:
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def fixed(value: float, digits: int) -> str:
  """`value` with `digits` decimals, the same text on every Python and NumPy.

  Sums and means can differ in their last bits between versions (Python 3.12's
  `sum` of floats is compensated, NumPy's pairwise sums vary with SIMD), which
  flips a value sitting on a rounding boundary (30.35 -> 30.3 or 30.4). So the
  value is first cut to 12 significant digits, a float all versions agree on.
  """
  return f"{float(f'{value:.12g}'):.{digits}f}"


def percent(share: float) -> str:
  return fixed(100 * share, 0) + "%"


def known_mean(values) -> float:
  """The mean of the values that are not None (none: NaN)."""
  known = [v for v in values if v is not None]
  return float(np.mean(known)) if known else math.nan


def half_range(values) -> float:
  """Half the range of the values that are not None: the seed spread (fewer than two: 0)."""
  known = [v for v in values if v is not None]
  return (max(known) - min(known)) / 2 if len(known) > 1 else 0.0


def mean_spread(values, digits: int = 4) -> str:
  """'mean ± half the range' over seeds (one value: itself)."""
  known = [v for v in values if v is not None]
  if not known:
    return "–"
  if len(known) == 1:
    return fixed(known[0], digits)
  return f"{fixed(known_mean(known), digits)} ± {fixed(half_range(known), digits)}"


def save_figure(fig, path: Path, **layout) -> None:
  """Lay out, write at the report's resolution, and free the figure."""
  import matplotlib.pyplot as plt

  fig.tight_layout(**layout)
  fig.savefig(path, dpi=100)
  plt.close(fig)
