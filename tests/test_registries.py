"""A model and a BN mode registered from outside the harness train through train.py's loop.

Each is one registry entry (CONTRIBUTING, "Adding things"). The oracle: a toy BN mode that
is synced BN under another name trains to synced BN's metrics digit for digit, and a toy
model's extra metrics (its registry entry's `metrics`) reach metrics.jsonl.
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import trainer
from tests.idx_files import make_dataset, write_dataset
from trainer.bn_modes import BN_MODES, BNMode
from trainer.loop import train_and_evaluate
from trainer.models import MODELS, ModelOptions, ModelSpec


class TinyConvNet(nn.Module):
  """One 3x3 convolution, the injected BN, ReLU, global average pooling, a classifier."""

  norm: object = None
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), use_bias=self.norm is None)(x.astype(jnp.float32))
    if self.norm is not None:
      x = self.norm(use_running_average=not train)(x)
    features = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(features), {"last_preactivation": features}


def _feature_mean(tracked: np.ndarray) -> dict[str, float]:
  return {"tracked_mean": float(np.mean(tracked))}


@pytest.fixture
def registered(monkeypatch):
  spec = ModelSpec(
    build=lambda config, norm, num_classes, dtype: TinyConvNet(norm=norm, num_classes=num_classes),
    recipe=dict(batch_size=4, lr=0.05, eval_every=5),
    summary="a toy convnet",
    augment="none",
    metrics=_feature_mean,
  )
  monkeypatch.setitem(MODELS, "tiny", spec)
  monkeypatch.setitem(BN_MODES, "toy-sync", dataclasses.replace(BN_MODES["sync"], summary="synced BN, renamed"))
  monkeypatch.setitem(BN_MODES, "toy-none", BNMode(None, False, "none, renamed"))


@pytest.mark.slow
def test_a_toy_model_and_bn_mode_registered_from_outside_train(tmp_path, registered):
  assert jax.device_count() == 8
  idx = write_dataset(tmp_path / "idx", make_dataset(n_train=64, n_test=16))
  base = trainer.Config(
    dataset="mnist", idx_dir=str(idx), data_dir=str(tmp_path / "tfds"), model="tiny", steps=10, progress=False
  )
  results = {}
  for bn in ("sync", "toy-sync", "toy-none"):
    out = tmp_path / bn
    train_and_evaluate(dataclasses.replace(base, bn=bn, out=str(out)), devices=jax.devices()[:2])
    results[bn] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  timings = ("wall_time", "steps_per_sec")
  strip = lambda records: [{k: v for k, v in r.items() if k not in timings} for r in records]
  assert [r["step"] for r in results["sync"]] == [5, 10]  # the toy recipe's eval_every
  assert strip(results["toy-sync"]) == strip(results["sync"])  # the same mode under another name
  assert strip(results["toy-none"]) != strip(results["sync"])
  assert all("tracked_mean" in r for r in results["sync"])


# A value other than each model option's default, to see whether a model's build reads it.
OTHER_VALUES = {
  "zero_init_residual": [False],
  "activation": ["sigmoid", "relu"],
  "dropout": [0.5],
  "init_std": [0.3],
  "width": [2],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_declares_exactly_the_options_its_build_reads(name):
  """ModelSpec.options against the oracle of the built module: changing a declared option changes
  the module `build` returns, changing any other model option does not (so refusing it loses nothing)."""
  fields = {f.name for f in dataclasses.fields(ModelOptions)}
  assert set(OTHER_VALUES) == fields, "a value for every model option"
  spec = MODELS[name]
  assert set(spec.options) <= fields
  base = dataclasses.asdict(trainer.Config(model=name))

  def built(**change):
    return repr(spec.build(types.SimpleNamespace(**{**base, **change}), None, 10, jnp.float32))

  for option in sorted(fields):
    changed = any(built(**{option: value}) != built() for value in OTHER_VALUES[option])
    assert changed == (option in spec.options), option
