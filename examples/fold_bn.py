"""Fold the BN layers of a trained train.py MLP into its Dense layers.

    python train.py --bn sync --steps 2000 --out runs/fold-demo
    python examples/fold_bn.py runs/fold-demo

Each hidden layer Dense(no bias) -> BN (inference) becomes one Dense with a
bias (jaxbn.fold_batch_norm); the folded net is the same MLP without BN.
Prints the largest difference of the logits over the test set and the
inference time of both nets (jitted, whole test set, median of repeats).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxbn
import trainer
from trainer import (
  cli,
  data,
)


def fold_mlp(params: dict, batch_stats: dict, epsilon: float) -> dict:
  """MLP parameters with every Dense_i -> BatchNorm_i pair folded into Dense_i."""
  folded = {}
  for name, layer in params.items():
    if not name.startswith("Dense_"):
      continue
    bn = name.replace("Dense_", "BatchNorm_")
    if bn in params:
      kernel, bias = jaxbn.fold_batch_norm(
        layer["kernel"], layer.get("bias"), params[bn], batch_stats[bn], epsilon=epsilon
      )
      folded[name] = {"kernel": kernel, "bias": bias}
    else:
      folded[name] = layer
  return folded


def median_seconds(fn, *args, repeats=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="a train.py run directory of --model mlp with --bn per-device or sync")
  args = parser.parse_args(argv)
  run = Path(args.run)
  config = trainer.Config(**json.loads((run / "config.json").read_text()))
  if config.model != "mlp" or config.bn == "none":
    parser.error(f"run: expected an MLP trained with BN, got --model {config.model} --bn {config.bn}")
  model, plain = (
    trainer.make_model(config),
    trainer.make_model(trainer.Config(**{**json.loads((run / "config.json").read_text()), "bn": "none"})),
  )
  manager = ocp.CheckpointManager(run.absolute() / "checkpoints")
  state = manager.restore(
    manager.latest_step(), args=ocp.args.StandardRestore(trainer.create_train_state(config, (28, 28)))
  )
  folded = fold_mlp(state.params, state.batch_stats, epsilon=1e-5)

  images = data.load(config.dataset, data_dir=config.data_dir, idx_dir=config.idx_dir).test_images
  x = jnp.asarray(images, jnp.float32) / 255.0
  with_bn = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  without = jax.jit(lambda v, x: plain.apply(v, x, train=False)[0])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits, folded_logits = with_bn(variables, x), without({"params": folded}, x)
  difference = float(jnp.max(jnp.abs(logits - folded_logits)))
  agree = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(folded_logits, -1)))
  t_bn, t_folded = median_seconds(with_bn, variables, x), median_seconds(without, {"params": folded}, x)
  print(
    f"{x.shape[0]} test images: largest logit difference {difference:.2e}, same prediction for "
    f"{agree:.2%}; inference {t_bn * 1e3:.2f} ms with BN, {t_folded * 1e3:.2f} ms folded "
    f"({t_bn / t_folded:.2f}x faster)"
  )
  return difference, agree


if __name__ == "__main__":
  main()
