"""The BN layer in training mode: jaxbn vs flax.linen.BatchNorm vs the floor.

    python benchmarks/bn_layer.py [--rounds 30]

On a CPU the shapes below; on an accelerator (ACCELERATOR_SHAPES) layers of
ResNet-50 at batch 256, large enough to time BN rather than the dispatch.
For each shape and dtype, the batch statistics alone (jaxbn.moments against
flax's one-pass E[x²]-E[x]² and a one-read floor), forward and forward+backward: y and dL/dx for
L = sum(BN(x)·w), i.e. the VJP with cotangent w (what a training step runs;
the scalar loss itself is not BN's work), jitted, median of interleaved repeats:

- jaxbn.batch_norm and jaxbn.BatchNorm;
- flax.linen.BatchNorm, default (one-pass E[x²]-E[x]²) and use_fast_variance=False;
- the memory-traffic floor: fused XLA ops that read and write the bytes BN
  must touch, with the cheapest arithmetic (see benchmarks/README.md):
    forward:  s = Σx (1 read); y = x·s (1 read, 1 write)
    fwd+bwd:  the forward, then t = Σw·x (2 reads); dx = w·s + x·t (2 reads, 1 write)
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxbn
from benchmarks import common
from trainer import cli

SHAPES = [
  ((4096, 1024), jnp.float32),
  ((128, 32, 32, 64), jnp.float32),
  ((32, 28, 28, 256), jnp.float32),
  ((128, 32, 32, 64), jnp.bfloat16),
  ((32, 28, 28, 256), jnp.bfloat16),
]
# On an accelerator those take microseconds and time the dispatch, not BN: layers of a
# ResNet-50 at batch 256 (224 px) instead, a few hundred MB each.
ACCELERATOR_SHAPES = [
  ((32768, 4096), jnp.float32),
  ((256, 56, 56, 256), jnp.float32),
  ((256, 28, 28, 512), jnp.float32),
  ((256, 56, 56, 256), jnp.bfloat16),
  ((256, 28, 28, 512), jnp.bfloat16),
]


def candidates(shape, dtype):
  features = shape[-1]
  raxes = tuple(range(len(shape) - 1))
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype) * 2 + 1
  w = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
  params = {"scale": jnp.ones(features), "bias": jnp.zeros(features)}
  stats = {"mean": jnp.zeros(features), "var": jnp.ones(features)}

  def function(x, params, stats):
    return jaxbn.batch_norm(x, params, stats, training=True)

  def module(cls, **kw):
    # dtype=: how mixed-precision models run BN (otherwise flax outputs float32)
    layer = cls(use_running_average=False, dtype=dtype, **kw)
    variables = layer.init(jax.random.key(0), x)

    def apply(x, variables):
      y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      return y, updates

    return apply, variables

  impls = {"jaxbn.batch_norm": (function, (params, stats))}
  for name, (cls, kw) in {
    "jaxbn.BatchNorm": (jaxbn.BatchNorm, {}),
    "flax": (nn.BatchNorm, {}),
    "flax (use_fast_variance=False)": (nn.BatchNorm, {"use_fast_variance": False}),
  }.items():
    apply, variables = module(cls, **kw)
    impls[name] = (apply, (variables,))

  def floor_forward(x):
    s = jnp.sum(x.astype(jnp.float32), raxes)
    return (x * s.astype(x.dtype)).astype(x.dtype)

  def floor_backward(x, w):
    s = jnp.sum(x.astype(jnp.float32), raxes)
    y = (x * s.astype(x.dtype)).astype(x.dtype)
    t = jnp.sum(w.astype(jnp.float32) * x.astype(jnp.float32), raxes)
    dx = w * s.astype(dtype) + x * t.astype(dtype)
    return y, dx

  forward = {name: f for name, (f, _) in impls.items()}
  forward_args = {name: (x, *a) for name, (_, a) in impls.items()}
  forward["floor"], forward_args["floor"] = floor_forward, (x,)

  def grad_of(f):
    def forward_backward(x, *a):
      y, vjp = jax.vjp(lambda x: f(x, *a)[0], x)
      return y, vjp(w)[0]

    return forward_backward

  backward = {name: grad_of(f) for name, (f, _) in impls.items()}
  backward_args = dict(forward_args)
  backward["floor"], backward_args["floor"] = floor_backward, (x, w)
  from flax.linen.normalization import _compute_stats

  statistics = {
    "jaxbn.moments": lambda x: jaxbn.moments(x),
    "flax": lambda x: _compute_stats(x, raxes, None),
    "flax (use_fast_variance=False)": lambda x: _compute_stats(x, raxes, None, use_fast_variance=False),
    "floor": lambda x: jnp.sum(x.astype(jnp.float32), raxes),
  }
  statistics_args = dict.fromkeys(statistics, (x,))
  return statistics, statistics_args, forward, forward_args, backward, backward_args


def main(argv=None):
  parser = cli.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args(argv)
  rows = []
  accelerator = jax.devices()[0].platform != "cpu"
  for shape, dtype in ACCELERATOR_SHAPES if accelerator else SHAPES:
    statistics, statistics_args, forward, forward_args, backward, backward_args = candidates(shape, dtype)
    for mode, fns, fargs in (
      ("statistics", statistics, statistics_args),
      ("forward", forward, forward_args),
      ("fwd+bwd", backward, backward_args),
    ):
      times = common.time_interleaved(fns, fargs, rounds=args.rounds, inner=10 if accelerator else 3)
      for name, seconds in times.items():
        rows.append(
          {
            "shape": "x".join(map(str, shape)),
            "dtype": jnp.dtype(dtype).name,
            "mode": mode,
            "impl": name,
            "ms": seconds * 1e3,
            "vs flax": seconds / times["flax"],
            "vs floor": seconds / times["floor"],
          }
        )
      print(
        f"{shape} {jnp.dtype(dtype).name} {mode}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()),
        flush=True,
      )
  path = common.save("bn_layer", rows, "python benchmarks/bn_layer.py " + " ".join(argv or sys.argv[1:]))
  print()
  print(common.table(rows, ["shape", "dtype", "mode", "impl", "ms", "vs flax", "vs floor"]))
  print(f"\nwritten to {path}")


if __name__ == "__main__":
  main()
