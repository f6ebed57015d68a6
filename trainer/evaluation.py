"""Evaluation of a run: the test split with the running statistics, PreciseBN, or test-batch statistics."""

from __future__ import annotations

import math

import numpy as np

import jaxbn
from trainer.config import Config
from trainer.input import Batches, Pixels, eval_batches, eval_chunk
from trainer.models import MODELS

# --population-estimator -> the estimators evaluated, and their metrics' suffix
ESTIMATOR_SUFFIX = {"paper": "", "pooled": "_pooled"}


def population_batches(config: Config, batches: Batches, source, pixels: Pixels, size: int) -> np.ndarray:
  """PreciseBN's training batches: the normalization batches (groups of `size`)
  of the run's first global batches, `config.population_batches` of them (the
  same ones at every evaluation), preprocessed as training preprocesses them."""
  per_step = batches.global_batch // size
  steps = min(-(-config.population_batches // per_step), batches.steps_per_epoch)
  images = np.concatenate([batches.host_batch(source, step, range(batches.global_batch))[0] for step in range(steps)])
  groups = images.reshape(-1, size, *images.shape[1:])[: config.population_batches]
  return np.stack([pixels(group) for group in groups])


def with_population_statistics(state, model, batches, estimator: str):
  """The (portable) state with its running averages replaced by the population
  statistics of its current weights (PreciseBN, `jaxbn.population_stats`)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return state.replace(batch_stats=jaxbn.population_stats(model, variables, batches, estimator=estimator, train=False))


class Evaluator:
  """The evaluation record of a run's step, as `OUT/metrics.jsonl` holds it."""

  def __init__(
    self,
    config: Config,
    parallel,
    model,
    batches: Batches,
    train_source,
    test_source,
    pixels: Pixels,
    statistics_batch: int,
    local_devices: range,
  ):
    self.config, self.parallel, self.model, self.batches = config, parallel, model, batches
    self.test_source, self.pixels, self.statistics_batch = test_source, pixels, statistics_batch
    self.local_devices = local_devices
    self.population = None
    if config.population_batches:
      self.population = population_batches(config, batches, train_source, pixels, statistics_batch)
    both = config.population_estimator == "both"
    self.estimators = ("paper", "pooled") if both else (config.population_estimator,)

  def evaluate(self, state, batch_stats: bool = False):
    """Sums over the test split and the tracked values (`Parallel.evaluate`); `batch_stats`:
    every test batch normalized by its own statistics at the training normalization batch."""
    chunk = eval_chunk(self.batches.image_shape)
    if batch_stats:  # whole normalization groups per device
      chunk = max(self.statistics_batch, chunk // self.statistics_batch * self.statistics_batch)
    num_devices = self.parallel.num_devices
    test = eval_batches(self.test_source, self.batches, num_devices, self.local_devices, chunk)
    groups = chunk // self.statistics_batch if batch_stats else None
    return self.parallel.evaluate(state, test, model=self.model, pixels=self.pixels, batch_stats_groups=groups)

  def record(self, step: int, state, losses: list[float], period_seconds: float) -> dict:
    """Train loss of the period (an exact sum of every step's loss, the same whatever was
    resumed where), the test split with the running statistics, and PreciseBN and
    test-batch statistics where asked; `wall_time` is the caller's."""
    result = {"step": step, "train_loss": math.fsum(losses) / len(losses)}
    sums, tracked = self.evaluate(state)
    result.update(test_loss=sums["loss"] / sums["count"], test_accuracy=sums["correct"] / sums["count"])
    result.update(wall_time=None, steps_per_sec=len(losses) / period_seconds)  # training only
    for estimator in self.estimators if self.population is not None else ():
      portable = self.parallel.portable_state(state)
      precise = with_population_statistics(portable, self.model, self.population, estimator)
      pop_sums, _ = self.evaluate(self.parallel.put_state(precise))
      suffix = ESTIMATOR_SUFFIX[estimator]
      result[f"test_loss_population{suffix}"] = pop_sums["loss"] / pop_sums["count"]
      result[f"test_accuracy_population{suffix}"] = pop_sums["correct"] / pop_sums["count"]
    if self.config.eval_batch_stats:
      batch_sums, _ = self.evaluate(state, batch_stats=True)
      result["test_loss_batch_stats"] = batch_sums["loss"] / batch_sums["count"]
      result["test_accuracy_batch_stats"] = batch_sums["correct"] / batch_sums["count"]
    extra_metrics = MODELS[self.config.model].metrics
    if extra_metrics is not None:
      result.update(extra_metrics(tracked))
    return result
