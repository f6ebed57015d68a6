"""The training library behind train.py.

  config    Config: everything a run depends on
  state     the model, the optimizer and the portable TrainState
  steps     the training and evaluation steps, written once for every style
  parallel  the one place that spans them over devices (jit, shard_map, pmap)
  loop      the host loop: data placement, metrics, checkpoints

The dataset lives on every device; each step draws its batch there from a
fresh per-epoch permutation, and many steps run per dispatch (`lax.scan`), so
the host does no per-step work.
"""

from jaxbn.training.config import BN_MODES, PARALLEL_STYLES, Config
from jaxbn.training.loop import setup_devices, train_and_evaluate
from jaxbn.training.parallel import Parallel
from jaxbn.training.state import AXIS, TrainState, create_train_state, make_model, make_optimizer
from jaxbn.training.steps import eval_step, train_chunk, train_step

__all__ = [
  "AXIS",
  "BN_MODES",
  "PARALLEL_STYLES",
  "Config",
  "Parallel",
  "TrainState",
  "create_train_state",
  "eval_step",
  "make_model",
  "make_optimizer",
  "setup_devices",
  "train_and_evaluate",
  "train_chunk",
  "train_step",
]
