"""The paper's models, with the normalization layer injected.

`norm` is a callable that makes a BN layer, e.g.
`functools.partial(jaxbn.BatchNorm, momentum=0.9, axis_name="batch")`, or None
for no normalization. Models take `train` and return `(logits, extras)`.
"""

from trainer.models.inception import InceptionNet
from trainer.models.mlp import MLP

__all__ = ["MLP", "InceptionNet"]
