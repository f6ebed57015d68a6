"""Per-device vs synced BN in an NNX model, data-parallel under jax.jit.

    python examples/nnx_data_parallel.py [--devices 8] [--steps 300]

The batch is sharded over a mesh axis "data" (jax.make_mesh: Explicit axes).
Under jit a plain reduction over that axis is global, so BN with no further
argument is synced BN. `batch_groups=<devices>` makes it per-device: each
device's shard is normalized with its own statistics, with no collective, and
the running statistics keep one row per device until evaluation pools them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import cli


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8, help="host devices to create (CPU)")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--per-device-batch", type=int, default=4)
  args = parser.parse_args(argv)
  jax.config.update("jax_num_cpu_devices", args.devices)

  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxbn

  class MLP(nnx.Module):
    def __init__(self, batch_groups, rngs):
      self.hidden = nnx.Linear(16, 64, rngs=rngs)
      self.bn = jaxbn.nnx.BatchNorm(64, momentum=0.9, batch_groups=batch_groups, rngs=rngs)
      self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.bn(self.hidden(x))))

  # A task whose inputs have a large common offset and scale: BN must learn it.
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 3

  def batch(n):
    labels = rng.integers(0, 4, n)
    return (centers[labels] + rng.normal(size=(n, 16))) * 5 + 20, labels

  test_x, test_y = batch(2000)

  devices = len(jax.devices())
  mesh = jax.make_mesh((devices,), ("data",))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  results = {}
  for name, groups in (("per-device", devices), ("synced", None)):
    model = MLP(groups, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    data_rng = np.random.default_rng(1)
    with jax.set_mesh(mesh):
      for _ in range(args.steps):
        labels = data_rng.integers(0, 4, devices * args.per_device_batch)
        x = (centers[labels] + data_rng.normal(size=(labels.size, 16))) * 5 + 20
        loss = train_step(model, optimizer, shard(x.astype(np.float32)), shard(labels))
      model.eval()  # running statistics; per-device rows are pooled (law of total variance)
      accuracy = float(jnp.mean(jnp.argmax(model(test_x.astype(np.float32)), -1) == test_y))
    results[name] = (float(loss), accuracy, tuple(model.bn.mean.shape))
    print(
      f"{name:>10} BN: final training loss {float(loss):.4f}, test accuracy {accuracy:.4f}, "
      f"running mean shape {model.bn.mean.shape}"
    )
  return results


if __name__ == "__main__":
  main()
