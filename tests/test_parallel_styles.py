"""train.py's three parallel styles (jit, shard_map, pmap) give the same run.

For each BN mode (Batch Renorm included), 200 steps on 8 host devices from the same seed;
the metrics of the styles agree to 1e-5, and per-device BN differs from
synced BN. The run uses a small learning rate on purpose: at large ones this
training is chaotic (float rounding of 1e-7, which the styles' different
reduction orders produce, grows tenfold every ~20 steps at lr 0.1), and the
test would then measure chaos, not the styles.
"""

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxbn import training
from tests.idx_files import make_dataset, write_dataset

KEYS = ("train_loss", "test_loss", "test_accuracy", "p15", "p50", "p85")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  assert jax.device_count() == 8
  root = tmp_path_factory.mktemp("styles")
  idx = write_dataset(root / "idx", make_dataset(n_train=2000, n_test=100))
  base = training.Config(dataset="mnist", idx_dir=str(idx), data_dir=str(root / "tfds"), model="mlp",
                         batch_size=8, steps=200, eval_every=100, checkpoint_every=200, lr=0.01,
                         init_std=0.1, progress=False)
  results = {}
  for bn in training.BN_MODES:
    for style in training.PARALLEL_STYLES:
      out = root / f"{bn}-{style}"
      config = dataclasses.replace(base, bn=bn, parallel=style, out=str(out))
      training.train_and_evaluate(config, devices=jax.devices())
      metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
      abstract = training.create_train_state(config, (28, 28))
      checkpoint = ocp.CheckpointManager((out / "checkpoints").absolute()).restore(
          200, args=ocp.args.StandardRestore(abstract))
      results[bn, style] = metrics, checkpoint
  return results


@pytest.mark.parametrize("bn", training.BN_MODES)
@pytest.mark.parametrize("style", ["shard_map", "pmap"])
def test_style_gives_the_same_run_as_jit(runs, bn, style):
  (reference, saved), (other, other_saved) = runs[bn, "jit"], runs[bn, style]
  assert [r["step"] for r in other] == [100, 200]
  for a, b in zip(reference, other):
    for key in KEYS:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (bn, style, a["step"], key)
  # The checkpoints are the same portable state: parameters and one pooled set of statistics.
  assert jax.tree.structure(saved) == jax.tree.structure(other_saved)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), saved, other_saved)


def test_per_device_synced_and_renorm_runs_differ(runs):
  for style in training.PARALLEL_STYLES:
    per_device, synced, renorm = (runs[bn, style][0][-1] for bn in ("per-device", "sync", "renorm"))
    assert abs(per_device["test_loss"] - synced["test_loss"]) > 1e-3, style
    assert abs(per_device["p50"] - synced["p50"]) > 1e-3, style
    assert abs(per_device["test_loss"] - renorm["test_loss"]) > 1e-3, style
