"""jaxbn for Flax NNX: the layers, and the tools for models one did not write.

BatchNorm, BatchRenorm, FrozenBatchNorm   drop-in for / beside `flax.nnx.BatchNorm`
swap_batch_norm(model, kind=..., **fields)   switch every BN of a model, in place
population_stats(model, batches, estimator=...)   PreciseBN, in place
"""

from jaxbn.nnx.layers import BatchNorm, BatchRenorm, FrozenBatchNorm
from jaxbn.nnx.tools import KINDS, population_stats, swap_batch_norm

__all__ = ["KINDS", "BatchNorm", "BatchRenorm", "FrozenBatchNorm", "population_stats", "swap_batch_norm"]
