"""The BN-layer table of benchmarks/README.md from the committed results.

    python benchmarks/summary.py [--platform cpu|gpu|tpu]

Headline: the default environment (results/bn_layer[.PLATFORM].json); the
malloc-tuned run (…tuned-malloc.json), where present, is the second column.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common
from trainer import cli


def load(path: Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platform", default="cpu")
  args = parser.parse_args(argv)
  default = load(common.result_path("bn_layer", args.platform, tuned=False))
  if default is None:
    parser.error(f"--platform: no results for {args.platform!r}; run benchmarks/bn_layer.py there first")
  tuned = load(common.result_path("bn_layer", args.platform, tuned=True))
  key = lambda r: (r["shape"], r["dtype"], r["mode"], r["impl"])
  tuned_rows = {key(r): r for r in tuned["rows"]} if tuned else {}
  rows = []
  for r in default["rows"]:
    if r["impl"] not in ("jaxbn.batch_norm", "jaxbn.BatchNorm"):
      continue
    flax = next(f for f in default["rows"] if key(f)[:3] == key(r)[:3] and f["impl"] == "flax")
    t = tuned_rows.get(key(r))
    rows.append(
      {
        "mode": r["mode"],
        "shape": r["shape"],
        "dtype": r["dtype"],
        "impl": r["impl"],
        "ms": r["ms"],
        "flax ms": flax["ms"],
        "vs flax": r["vs flax"],
        "vs floor": r["vs floor"],
        "vs flax (tuned malloc)": t["vs flax"] if t else "",
        "vs floor (tuned malloc)": t["vs floor"] if t else "",
      }
    )
  rows.sort(key=lambda r: (["statistics", "forward", "fwd+bwd"].index(r["mode"]) * -1,))
  print(
    f"{default['machine']['device_kind']} ({default['machine']['cpu']}, {default['machine']['cores']} cores), "
    f"jax {default['machine']['jax']}, commit {default['commit']}, {default['date']}"
  )
  print(
    f"headline: `{default['command']}`" + (f"; tuned: `{tuned['command']}` (commit {tuned['commit']})" if tuned else "")
  )
  print()
  print(common.table(rows, list(rows[0])))


if __name__ == "__main__":
  main()
