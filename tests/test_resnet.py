"""The ResNets: flax's example variable tree, the published sizes, zero-init residuals, BN injected, bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import jaxbn
from trainer.models.resnet import ResNet18, ResNet20, ResNet32, ResNet34, ResNet50, ResNet56


def _shapes(model, size, channels=3):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False))
  return {
    "/".join(path): leaf.shape
    for path, leaf in traverse_util.flatten_dict(jax.tree.map(lambda a: a, variables)).items()
  }


def _flax_example_resnet50_tree(num_classes=1000):
  """flax's examples/imagenet ResNet50, written out from its definition: conv_init 7x7/64,
  bn_init, 16 BottleneckResNetBlocks in stages of 3, 4, 6, 3 (filters 64..512, output 4x),
  each Conv_0..2 / BatchNorm_0..2 and, where the shape changes, conv_proj / norm_proj; Dense_0."""
  tree = {"params/conv_init/kernel": (7, 7, 3, 64)}

  def bn(name, f):
    tree.update({f"params/{name}/scale": (f,), f"params/{name}/bias": (f,)})
    tree.update({f"batch_stats/{name}/mean": (f,), f"batch_stats/{name}/var": (f,)})

  bn("bn_init", 64)
  block, inputs = 0, 64
  for filters, count in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
    for j in range(count):
      name = f"BottleneckResNetBlock_{block}"
      tree[f"params/{name}/Conv_0/kernel"] = (1, 1, inputs, filters)
      tree[f"params/{name}/Conv_1/kernel"] = (3, 3, filters, filters)
      tree[f"params/{name}/Conv_2/kernel"] = (1, 1, filters, 4 * filters)
      for k, f in enumerate((filters, filters, 4 * filters)):
        bn(f"{name}/BatchNorm_{k}", f)
      if j == 0:
        tree[f"params/{name}/conv_proj/kernel"] = (1, 1, inputs, 4 * filters)
        bn(f"{name}/norm_proj", 4 * filters)
      block, inputs = block + 1, 4 * filters
  tree["params/Dense_0/kernel"] = (2048, num_classes)
  tree["params/Dense_0/bias"] = (num_classes,)
  return tree


@pytest.mark.parametrize("norm", [jaxbn.BatchNorm, nn.BatchNorm, jaxbn.BatchRenorm])
def test_resnet50_variables_are_flax_examples(norm):
  """Names and shapes of flax's examples/imagenet ResNet50, whatever BN kind is injected,
  so its checkpoints load (and a checkpoint of any BN kind loads into another)."""
  shapes = _shapes(ResNet50(norm=functools.partial(norm, momentum=0.9), num_classes=1000), 224)
  assert shapes == _flax_example_resnet50_tree()


def _parameters(model, size):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
  "cls,expected",
  # torchvision's published parameter counts of the same architectures (BN scale and bias included).
  [(ResNet18, 11_689_512), (ResNet34, 21_797_672), (ResNet50, 25_557_032)],
)
def test_imagenet_resnets_have_the_published_size(cls, expected):
  assert _parameters(cls(norm=jaxbn.BatchNorm, num_classes=1000), 224) == expected


@pytest.mark.parametrize("cls,millions", [(ResNet20, 0.27), (ResNet32, 0.46), (ResNet56, 0.85)])
def test_cifar_resnets_have_the_papers_size(cls, millions):
  """He et al. 2016, Table 6 (option A shortcuts: no projection parameters)."""
  assert _parameters(cls(norm=jaxbn.BatchNorm, num_classes=10), 32) / 1e6 == pytest.approx(millions, abs=0.005)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [True, False])
def test_the_last_bn_of_each_block_starts_at_zero(zero):
  model = ResNet20(norm=jaxbn.BatchNorm, zero_init_residual=zero)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  blocks = [v for k, v in variables["params"].items() if k.startswith("CifarBlock")]
  assert len(blocks) == 9
  for block in blocks:
    np.testing.assert_array_equal(block["BatchNorm_1"]["scale"], 0.0 if zero else 1.0)
    np.testing.assert_array_equal(block["BatchNorm_0"]["scale"], 1.0)


def test_a_zero_initialized_block_is_the_identity():
  from trainer.models.resnet import CifarBlock, ResNetBlock

  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))
  for block in (ResNetBlock(16, nn.Conv, jaxbn.BatchNorm), CifarBlock(16, nn.Conv, jaxbn.BatchNorm)):
    bound = functools.partial(block.norm, use_running_average=True)
    block = block.clone(norm=bound)
    variables = block.init(jax.random.key(1), x)
    np.testing.assert_allclose(block.apply(variables, x), x, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
  model = ResNet20(norm=jaxbn.BatchNorm, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
  assert "bf16[4,32,32,16]" in jaxpr  # the convolutions' activations


def test_without_bn_the_convolutions_have_biases():
  shapes = _shapes(ResNet20(norm=None), 32)
  assert "params/CifarBlock_0/Conv_0/bias" in shapes and not any(k.startswith("batch_stats") for k in shapes)
