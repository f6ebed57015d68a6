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

  def _scores(self, name: str, portable) -> dict:
    """test_loss_NAME and test_accuracy_NAME of a portable state."""
    sums, _ = self.evaluate(self.parallel.put_state(portable))
    return {f"test_loss_{name}": sums["loss"] / sums["count"], f"test_accuracy_{name}": sums["correct"] / sums["count"]}

  def _averaged_weights(self, portable) -> dict:
    """--weight-ema: the averaged weights scored with the statistics averaged alongside
    them (ema) and/or PreciseBN's of the averaged weights (recompute); never with the
    live running statistics, which belong to other weights."""
    averaged = portable.replace(params=portable.ema_params, batch_stats=portable.ema_batch_stats)
    choice, result = self.config.weight_ema_bn, {}
    if choice in ("ema", "both"):
      result.update(self._scores("weight_ema", averaged))
    if choice in ("recompute", "both"):
      estimator = self.estimators[-1]  # "pooled" when both are asked for
      recomputed = with_population_statistics(averaged, self.model, self.population, estimator)
      result.update(self._scores("weight_ema" if choice == "recompute" else "weight_ema_recomputed", recomputed))
    return result

  def record(self, step: int, state, losses: list[float], period_seconds: float) -> dict:
    """Train loss of the period (an exact sum of every step's loss, the same whatever was
    resumed where), the test split with the running statistics, and PreciseBN and
    test-batch statistics where asked; `wall_time` is the caller's."""
    result = {"step": step, "train_loss": math.fsum(losses) / len(losses)}
    sums, tracked = self.evaluate(state)
    result.update(test_loss=sums["loss"] / sums["count"], test_accuracy=sums["correct"] / sums["count"])
    result.update(wall_time=None, steps_per_sec=len(losses) / period_seconds)  # training only
    portable = None
    if self.population is not None or self.config.weight_ema:
      portable = self.parallel.portable_state(state)
    for estimator in self.estimators if self.population is not None else ():
      precise = with_population_statistics(portable, self.model, self.population, estimator)
      result.update(self._scores(f"population{ESTIMATOR_SUFFIX[estimator]}", precise))
    if self.config.weight_ema:
      result.update(self._averaged_weights(portable))
    if self.config.eval_batch_stats:
      batch_sums, _ = self.evaluate(state, batch_stats=True)
      result["test_loss_batch_stats"] = batch_sums["loss"] / batch_sums["count"]
      result["test_accuracy_batch_stats"] = batch_sums["correct"] / batch_sums["count"]
    extra_metrics = MODELS[self.config.model].metrics
    if extra_metrics is not None:
      result.update(extra_metrics(tracked))
    return result
