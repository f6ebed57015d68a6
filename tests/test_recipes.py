"""The training recipes: per-model defaults, learning-rate schedules, weight decay, label smoothing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trainer
from trainer.config import Config, ConfigError
from trainer.models import MODELS
from trainer.state import learning_rate
from trainer.steps import cross_entropy


def test_a_config_built_in_python_gets_its_models_recipe():
  inception = Config(model="inception")
  assert (inception.batch_size, inception.steps, inception.optimizer, inception.lr) == (32, 10_000, "momentum", 0.01)
  resnet = Config(model="resnet20")
  assert resnet.global_batch_size == 128 and resnet.batch_size is None
  assert (resnet.schedule, resnet.weight_decay, resnet.steps, resnet.bn_momentum) == ("step", 1e-4, 64_000, 0.9)
  imagenet = Config(model="resnet50")
  assert (imagenet.nesterov, imagenet.schedule, imagenet.warmup_steps, imagenet.image_size) == (
    True,
    "cosine",
    25_020,
    224,
  )
  mlp = Config()
  assert (mlp.batch_size, mlp.steps, mlp.lr, mlp.optimizer, mlp.schedule) == (60, 50_000, 0.5, "sgd", "constant")


def test_given_flags_override_the_recipe():
  config = Config(model="resnet20", lr=0.05, batch_size=16, schedule="cosine")
  assert (config.lr, config.batch_size, config.global_batch_size, config.schedule) == (0.05, 16, None, "cosine")
  assert config.global_batch(8) == 128
  assert Config(model="resnet20").global_batch(8) == 128  # the recipe's global batch, 16 per device
  with pytest.raises(ConfigError, match="--global-batch-size: 128 does not split evenly over 3 devices"):
    Config(model="resnet20").global_batch(3)


def test_every_recipe_is_a_valid_configuration():
  for name, spec in MODELS.items():
    config = Config(model=name)
    for key, value in spec.recipe.items():
      assert getattr(config, key) == value, (name, key)


def _sgd_schedule(config):
  return [float(learning_rate(config)(t)) for t in range(config.steps + 1)]


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
  lr = _sgd_schedule(Config(model="resnet20", steps=400))
  assert lr[0] == lr[199] == pytest.approx(0.1)
  assert lr[200] == lr[299] == pytest.approx(0.01)
  assert lr[300] == lr[400] == pytest.approx(0.001)


def test_warmup_then_cosine_is_the_formula():
  config = Config(model="resnet50", steps=1000, warmup_steps=100, lr=0.4)
  lr = _sgd_schedule(config)
  for t in (0, 50, 99):
    assert lr[t] == pytest.approx(0.4 * t / 100, abs=1e-7)
  for t in (100, 400, 999, 1000):
    assert lr[t] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * (t - 100) / 900)), abs=1e-6)


def test_warmup_then_steps():
  lr = _sgd_schedule(Config(model="resnet20", steps=400, warmup_steps=40))
  assert lr[20] == pytest.approx(0.05) and lr[40] == lr[199] == pytest.approx(0.1) and lr[200] == pytest.approx(0.01)


@pytest.mark.slow
def test_weight_decay_skips_bn_scale_and_bias_and_biases():
  config = Config(model="resnet20", weight_decay=0.5, lr=1.0, optimizer="sgd", schedule="constant", steps=10)
  state = trainer.create_train_state(config, (32, 32, 3), num_classes=10)
  optimizer = trainer.make_optimizer(config)
  zero = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = optimizer.update(zero, state.opt_state, state.params)
  flat = {"/".join(str(k.key) for k in path): (p, u) for path, (p, u) in _leaves(state.params, updates)}
  decayed = [name for name, (p, u) in flat.items() if np.any(u != 0)]
  assert decayed and all(name.endswith("kernel") and flat[name][0].ndim > 1 for name in decayed)
  for name, (p, u) in flat.items():
    if name.endswith("kernel"):
      np.testing.assert_allclose(u, -0.5 * p, rtol=1e-6)  # -lr * wd * w
    else:  # BN scale and bias, the classifier's bias
      assert not np.any(u), name


def _leaves(params, updates):
  return zip(
    [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]],
    zip(jax.tree.leaves(params), jax.tree.leaves(updates), strict=True),
    strict=True,
  )


def test_nesterov_momentum_is_sutskevers_update():
  """Nesterov momentum as Sutskever et al. (2013) write it for SGD (and PyTorch's SGD computes):
  v <- mu v + g, update = -lr (g + mu v), in NumPy float64 over changing gradients."""
  config = Config(model="resnet50", steps=10, warmup_steps=0, schedule="constant", weight_decay=0.0, lr=0.1)
  optimizer = trainer.make_optimizer(config)
  params = {"w": jnp.ones(3)}
  state = optimizer.init(params)
  velocity = np.zeros(3)
  for g in ([1.0, -2.0, 3.0], [0.5, 0.5, -1.0], [-2.0, 1.0, 0.0]):
    update, state = optimizer.update({"w": jnp.asarray(g)}, state, params)
    velocity = 0.9 * velocity + np.asarray(g)
    np.testing.assert_allclose(update["w"], -0.1 * (np.asarray(g) + 0.9 * velocity), rtol=1e-6)


def test_label_smoothing_is_the_cross_entropy_with_smoothed_targets():
  logits = jax.random.normal(jax.random.key(0), (5, 4))
  labels = jnp.asarray([0, 1, 2, 3, 1])
  log_p = np.asarray(jax.nn.log_softmax(logits), np.float64)
  targets = np.full((5, 4), 0.1 / 4) + 0.9 * np.eye(4)[np.asarray(labels)]
  assert float(cross_entropy(logits, labels, 0.1)) == pytest.approx(-(targets * log_p).sum(1).mean(), rel=1e-6)
  assert float(cross_entropy(logits, labels)) == pytest.approx(
    -log_p[np.arange(5), np.asarray(labels)].mean(), rel=1e-6
  )
