"""Synced BN over the devices: collectives per layer (from HLO) and time.

    python benchmarks/synced.py [--rounds 30]

pmapped forward+backward (VJP with cotangent w) of one BN layer per device:
jaxbn and flax.linen.BatchNorm, synced (axis_name) and per-device. On a CPU
machine: 8 host devices sharing its cores; on an accelerator machine: every
device it has (on one device the collective is trivial, and the numbers show
the cost of the synced code path alone).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax

CPU_DEVICES = 8  # host devices on a CPU; an accelerator machine uses the devices it has
jax.config.update("jax_num_cpu_devices", CPU_DEVICES)

import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxbn  # noqa: E402
from benchmarks import common  # noqa: E402
from trainer import cli  # noqa: E402

SHAPES = [(512, 256), (16, 16, 16, 64)]  # per device
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute")


def collectives(hlo: str) -> str:
  counts = {op: len(re.findall(rf"\b{op}\b", hlo)) for op in COLLECTIVES}
  return ", ".join(f"{n} {op}" for op, n in counts.items() if n) or "none"


def main(argv=None):
  parser = cli.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args(argv)
  devices = jax.device_count()
  assert jax.devices()[0].platform != "cpu" or devices == CPU_DEVICES, jax.devices()
  rows = []
  for shape in SHAPES:
    x = jax.random.normal(jax.random.key(0), (devices, *shape)) * 2 + 1
    w = jax.random.normal(jax.random.key(1), x.shape)
    fns, fargs = {}, {}
    for lib, cls in (("jaxbn", jaxbn.BatchNorm), ("flax", nn.BatchNorm)):
      for mode, axis_name in (("synced", "d"), ("per-device", None)):
        layer = cls(use_running_average=False, axis_name=axis_name)
        variables = layer.init(jax.random.key(0), x[0])
        variables = jax.tree.map(lambda a, devices=devices: jnp.broadcast_to(a, (devices, *a.shape)), variables)

        def step(variables, x, w, layer=layer):
          f = lambda x: layer.apply(variables, x, mutable=["batch_stats"])
          y, vjp, updates = jax.vjp(f, x, has_aux=True)
          return y, vjp(w)[0], updates

        name = f"{lib} {mode}"
        fns[name] = jax.pmap(step, axis_name="d")
        fargs[name] = (variables, x, w)
        forward = jax.pmap(lambda v, x, layer=layer: layer.apply(v, x, mutable=["batch_stats"]), axis_name="d")
        rows.append(
          {
            "shape (per device)": "x".join(map(str, shape)),
            "devices": devices,
            "impl": name,
            "collectives fwd": collectives(forward.lower(variables, x).as_text()),
            "collectives fwd+bwd": collectives(fns[name].lower(*fargs[name]).as_text()),
          }
        )
    times = common.time_interleaved(fns, fargs, rounds=args.rounds)
    for row in rows[-len(fns) :]:
      row["ms"] = times[row["impl"]] * 1e3
      row["vs flax synced"] = times[row["impl"]] / times["flax synced"]
      row["vs own per-device"] = times[row["impl"]] / times[row["impl"].split()[0] + " per-device"]
    print(f"{shape}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), flush=True)
  path = common.save("synced", rows, "python benchmarks/synced.py " + " ".join(argv or sys.argv[1:]))
  print()
  print(
    common.table(
      rows,
      [
        "shape (per device)",
        "impl",
        "collectives fwd",
        "collectives fwd+bwd",
        "ms",
        "vs flax synced",
        "vs own per-device",
      ],
    )
  )
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
