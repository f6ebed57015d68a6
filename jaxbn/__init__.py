"""jaxbn: Batch Normalization for JAX and Flax, exact across devices.

    y, new_stats = jaxbn.batch_norm(x, params, stats, training=True, axis_name="batch")

`jaxbn.BatchNorm` (Linen) and `jaxbn.nnx.BatchNorm` are drop-in replacements
for flax's modules; `jaxbn.sync_batch_stats` and `jaxbn.population_stats`
handle running statistics; `jaxbn.batch_renorm` / `BatchRenorm` are Batch
Renormalization, and `jaxbn.fold_batch_norm` folds inference BN into a layer.
"""

from jaxbn import nnx
from jaxbn.functional import Moments, batch_norm, moments
from jaxbn.linen import BatchNorm, BatchRenorm
from jaxbn.renorm import batch_renorm, fold_batch_norm, renorm_schedule
from jaxbn.statistics import population_stats, sync_batch_stats

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "Moments",
  "batch_norm",
  "batch_renorm",
  "fold_batch_norm",
  "moments",
  "nnx",
  "population_stats",
  "renorm_schedule",
  "sync_batch_stats",
]
__version__ = "0.2.0"  # the one place; pyproject.toml reads it
