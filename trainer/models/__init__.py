"""The models train.py trains, one registry entry each, with the recipe it was published with.

A model is built from the run's configuration and a `norm`: a callable that
makes a BN layer (a `functools.partial` of `jaxbn.BatchNorm` with the run's BN
mode, as flax's examples/imagenet injects its norm), or None for no
normalization. Every model takes `(x, train)` with x of shape (N, H, W, C) and
returns `(logits, extras)`, logits in float32 whatever the computation dtype.

Adding a model is one entry in MODELS: how to build it and its recipe (the
defaults of the training flags it is known to train with).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import linen as nn

from trainer import cli
from trainer.models.inception import InceptionNet
from trainer.models.mlp import MLP
from trainer.models.resnet import ResNet18, ResNet20, ResNet32, ResNet34, ResNet50, ResNet56, torch_module_names

__all__ = ["ACTIVATIONS", "MLP", "MODELS", "InceptionNet", "ModelOptions", "ModelSpec"]

ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu}


@dataclasses.dataclass
class ModelOptions:
  """The flags of particular models: `trainer.Config` inherits them (train.py lists them last).
  Each model names the ones its `build` reads in `ModelSpec.options`; another model refuses them."""

  zero_init_residual: bool = cli.option(
    "ResNets: start the last BN of each residual block with scale 0 (Goyal et al. 2017)", True
  )
  activation: str | None = cli.option(
    "mlp/inception: hidden activation (default: sigmoid for mlp, relu for inception)", None, (None, *ACTIVATIONS)
  )
  dropout: float = cli.option("inception: dropout rate before the classifier", 0.0)
  init_std: float = cli.option("mlp: weights ~ N(0, init_std^2)", 0.1)
  width: int = cli.option("inception: channel multiplier", 4)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """build(config, norm, num_classes, dtype) -> the Linen module; recipe: flag defaults;
  augment: the --augment it trains with unless told (None: chosen by image size);
  metrics: tracked values of the test examples (the model's `extras`) -> extra metrics;
  torch_names: the built model -> {flax module path: PyTorch module name} for a model
  with a torchvision/timm twin (--init-from, --freeze-stages, --lr-backbone-scale:
  PyTorch's `layerN` names its stages, `fc` its head); None: no such twin;
  options: the model's own flags (fields of `ModelOptions`) that `build` reads; another
  model's option given to this one is refused in one line."""

  build: Callable[[Any, Any, int, Any], nn.Module]
  recipe: dict[str, Any]
  summary: str
  augment: str | None = None
  metrics: Callable[[np.ndarray], dict[str, float]] | None = None
  torch_names: Callable[[nn.Module], dict[tuple[str, ...], str]] | None = None
  options: tuple[str, ...] = ()

  def torch_names_of(self, config) -> dict[tuple[str, ...], str]:
    """`torch_names` of the model `config` builds (the module names depend on the
    architecture only, not on the BN mode or the class count)."""
    assert self.torch_names is not None, "a model with a PyTorch twin"
    return self.torch_names(self.build(config, None, 1, np.float32))


PERCENTILES = (15, 50, 85)  # of the tracked input to one sigmoid of the MLP's last hidden layer


def sigmoid_input_percentiles(tracked: np.ndarray) -> dict[str, float]:
  """The paper's Figure 1(b, c): percentiles of one last-layer sigmoid's input over the test set."""
  return {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(tracked, PERCENTILES), strict=True)}


# The paper's Figure 1 run (§4.1): batch 60, 50,000 steps; optimizer and rate are E1's first setting.
PAPER_MLP = dict(batch_size=60, steps=50_000, optimizer="sgd", lr=0.5, eval_every=1000, bn_momentum=0.99)
# He et al. 2016, §4.2 (CIFAR-10): batch 128, SGD momentum 0.9, lr 0.1 divided by 10 at
# 32k and 48k of 64k iterations, weight decay 1e-4, pad-and-crop + flip.
CIFAR_RESNET = dict(
  global_batch_size=128,
  steps=64_000,
  optimizer="momentum",
  lr=0.1,
  schedule="step",
  weight_decay=1e-4,
  eval_every=2000,
  bn_momentum=0.9,
  normalize="standardize",
)
# flax's examples/imagenet (after Goyal et al. 2017): batch 256 with lr 0.1 (scale with the
# batch), Nesterov momentum 0.9, 5 warm-up epochs then cosine to 0 over 100 epochs
# (ImageNet: 5,004 steps per epoch at 256), weight decay 1e-4, 224 px.
IMAGENET_RESNET = dict(
  global_batch_size=256,
  steps=500_400,
  optimizer="momentum",
  nesterov=True,
  lr=0.1,
  schedule="cosine",
  warmup_steps=25_020,
  weight_decay=1e-4,
  eval_every=5004,
  bn_momentum=0.9,
  normalize="standardize",
  image_size=224,
)


def _mlp(c, norm, num_classes, dtype):
  return MLP(
    norm=norm,
    init_std=c.init_std,
    activation=ACTIVATIONS[c.activation or "sigmoid"],
    num_classes=num_classes,
    dtype=dtype,
  )


def _inception(c, norm, num_classes, dtype):
  return InceptionNet(
    norm=norm,
    dropout=c.dropout,
    width=c.width,
    activation=ACTIVATIONS[c.activation or "relu"],
    num_classes=num_classes,
    dtype=dtype,
  )


RESNET_OPTIONS = ("zero_init_residual",)  # --torch-padding: the ImageNet ResNets', checked with --init-from


def _resnet(cls):
  def build(c, norm, num_classes, dtype):
    return cls(norm=norm, num_classes=num_classes, dtype=dtype, zero_init_residual=c.zero_init_residual)

  return build


def _imagenet_resnet(cls):
  def build(c, norm, num_classes, dtype):
    return cls(
      norm=norm,
      num_classes=num_classes,
      dtype=dtype,
      zero_init_residual=c.zero_init_residual,
      torch_padding=c.torch_padding,
    )

  return build


MODELS: dict[str, ModelSpec] = {
  "mlp": ModelSpec(
    _mlp,
    PAPER_MLP,
    "the paper's MLP 784-100-100-100-10 (sigmoid; §4.1)",
    augment="none",
    metrics=sigmoid_input_percentiles,
    options=("init_std", "activation"),
  ),
  "inception": ModelSpec(
    _inception,
    dict(batch_size=32, steps=10_000, optimizer="momentum", lr=0.01, eval_every=500, bn_momentum=0.99),
    "a small Inception-style convnet (paper §4.2, scaled down)",
    augment="none",
    options=("width", "dropout", "activation"),
  ),
  "resnet20": ModelSpec(
    _resnet(ResNet20), CIFAR_RESNET, "CIFAR ResNet-20 (He et al. 2016 §4.2; 0.27M parameters)", options=RESNET_OPTIONS
  ),
  "resnet32": ModelSpec(_resnet(ResNet32), CIFAR_RESNET, "CIFAR ResNet-32 (0.46M parameters)", options=RESNET_OPTIONS),
  "resnet56": ModelSpec(_resnet(ResNet56), CIFAR_RESNET, "CIFAR ResNet-56 (0.85M parameters)", options=RESNET_OPTIONS),
  "resnet18": ModelSpec(
    _imagenet_resnet(ResNet18),
    IMAGENET_RESNET,
    "ResNet-18 v1.5 (ImageNet; flax's examples/imagenet; torchvision/timm weights load)",
    torch_names=torch_module_names,
    options=RESNET_OPTIONS,
  ),
  "resnet34": ModelSpec(
    _imagenet_resnet(ResNet34),
    IMAGENET_RESNET,
    "ResNet-34 v1.5",
    torch_names=torch_module_names,
    options=RESNET_OPTIONS,
  ),
  "resnet50": ModelSpec(
    _imagenet_resnet(ResNet50),
    IMAGENET_RESNET,
    "ResNet-50 v1.5 (flax's examples/imagenet variables)",
    torch_names=torch_module_names,
    options=RESNET_OPTIONS,
  ),
}
