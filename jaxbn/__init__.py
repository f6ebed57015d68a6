"""jaxbn: Batch Normalization for JAX and Flax, exact across devices.

    y, new_stats = jaxbn.batch_norm(x, params, stats, training=True, axis_name="batch")

`jaxbn.BatchNorm` (Linen) and `jaxbn.nnx.BatchNorm` are drop-in replacements
for flax's modules; `jaxbn.sync_batch_stats` and `jaxbn.population_stats`
handle running statistics.
"""

from jaxbn.functional import Moments, batch_norm, moments
from jaxbn.linen import BatchNorm
from jaxbn.statistics import population_stats, sync_batch_stats
from jaxbn import nnx

__all__ = ["Moments", "batch_norm", "moments", "BatchNorm", "nnx",
           "population_stats", "sync_batch_stats"]
__version__ = "0.1.0"
