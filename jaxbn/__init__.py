"""jaxbn: Batch Normalization for JAX and Flax, exact across devices.

    y, new_stats = jaxbn.batch_norm(x, params, stats, training=True, axis_name="batch")

`jaxbn.BatchNorm` (Linen) and `jaxbn.nnx.BatchNorm` are drop-in replacements
for flax's modules; `jaxbn.sync_batch_stats` and `jaxbn.population_stats`
handle running statistics; `jaxbn.batch_renorm` / `BatchRenorm` are Batch
Renormalization, `jaxbn.FrozenBatchNorm` never updates its statistics,
`jaxbn.swap_batch_norm` switches the BN of a model one did not write, and
`jaxbn.fold_batch_norm` folds inference BN into a layer. Every layer calls the
functional core through `jaxbn.functional.normalize(x, params, stats, BNOptions(...))`.
"""

from jaxbn import nnx, pytorch
from jaxbn.functional import BNOptions, Moments, Renorm, batch_norm, moments, normalize, pool_stats
from jaxbn.linen import BatchNorm, BatchRenorm, FrozenBatchNorm
from jaxbn.renorm import batch_renorm, fold_batch_norm, renorm_schedule
from jaxbn.statistics import accumulate_batch_stats, population_stats, sync_batch_stats
from jaxbn.swap import swap_batch_norm

__all__ = [
  "BNOptions",
  "BatchNorm",
  "BatchRenorm",
  "FrozenBatchNorm",
  "Moments",
  "Renorm",
  "accumulate_batch_stats",
  "batch_norm",
  "batch_renorm",
  "fold_batch_norm",
  "moments",
  "nnx",
  "normalize",
  "pool_stats",
  "population_stats",
  "pytorch",
  "renorm_schedule",
  "swap_batch_norm",
  "sync_batch_stats",
]
__version__ = "0.3.0"  # the one place; pyproject.toml reads it
