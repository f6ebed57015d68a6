"""The training harness behind train.py: it imports the BN library, which never imports it.

  config    Config: everything a run depends on
  data      datasets by name through TFDS
  models    the models, with the normalization injected
  state     the model, the optimizer and the portable TrainState
  steps     the training and evaluation steps, written once for every style
  parallel  the one place that spans them over devices (jit, shard_map, pmap)
  rundir    the run directory: never overwritten or mixed
  loop      the host loop: data placement, metrics, checkpoints

Importing the package imports neither the data stack (tensorflow-datasets) nor
the host loop (orbax), so a benchmark of the steps runs with jax, flax and
optax alone.
"""

from trainer.config import BN_MODES, PARALLEL_STYLES, Config
from trainer.mesh import AXIS
from trainer.parallel import STYLES, Parallel, make_parallel
from trainer.state import TrainState, create_train_state, make_model, make_optimizer
from trainer.steps import eval_step, train_batch, train_step

__all__ = [
  "AXIS",
  "BN_MODES",
  "PARALLEL_STYLES",
  "STYLES",
  "Config",
  "Parallel",
  "TrainState",
  "create_train_state",
  "eval_step",
  "make_model",
  "make_optimizer",
  "make_parallel",
  "train_batch",
  "train_step",
]
