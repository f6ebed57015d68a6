"""ResNets with the normalization layer injected, as flax's examples/imagenet does.

CIFAR-style (He et al. 2016, §4.2): a 3x3 convolution with 16 channels, then three
stages of `n` basic blocks with 16, 32 and 64 channels (stride 2 at the start of the
second and third), global average pooling and the classifier: 6n+2 layers
(ResNet-20: n=3, 0.27M parameters). Shortcuts are identities; where a stage halves
the resolution and doubles the channels, the shortcut subsamples and pads the new
channels with zeros (the paper's option A, so no parameters).

ImageNet-style (v1.5, as flax's example): a 7x7/2 convolution with 64 channels, 3x3/2
max pooling, four stages of basic (ResNet-18/34) or bottleneck (ResNet-50) blocks with
the stride on the 3x3 convolution, projection shortcuts (1x1 convolution and BN) where
the shape changes. Variable names follow flax's example, so its checkpoints load
(`conv_init`, `bn_init`, `ResNetBlock_i`/`BottleneckResNetBlock_i` with `Conv_j`,
`BatchNorm_j`, `conv_proj`, `norm_proj`, and `Dense_0`) whatever BN kind is injected.

With `zero_init_residual` the last BN of each block starts with scale 0, so every
block starts as the identity (Goyal et al. 2017).

With `torch_padding` the ImageNet ResNets pad as torchvision and timm do: every
convolution by kernel // 2 on each side and the stem's max pooling by 1 (flax's
'SAME' pads a stride-2 layer on an even input by 0 before and 1 after, which
shifts the sampling grid by one pixel). A model loaded from PyTorch weights must
compute with it; `torch_module_names` maps its variables to PyTorch's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any


class _Block(nn.Module):
  """What every residual block gets: its width, stride, layers and activation."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  zero_init_residual: bool = True

  def last_norm(self, index: int):
    """The block's last BN: scale 0 at the start with `zero_init_residual`."""
    init = {"scale_init": nn.initializers.zeros_init()} if self.zero_init_residual else {}
    return self.norm(name=f"BatchNorm_{index}", **init)

  @nn.nowrap
  def shortcut(self, x, y):
    """x itself, or a 1x1 convolution and BN to y's shape (called in the compact __call__)."""
    if x.shape == y.shape:
      return x
    x = self.conv(y.shape[-1], (1, 1), (self.strides, self.strides), name="conv_proj")(x)
    return self.norm(name="norm_proj")(x)


class ResNetBlock(_Block):
  """Two 3x3 convolutions (the basic block); a projection where the shape changes."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="Conv_0")(x)
    y = self.act(self.norm(name="BatchNorm_0")(y))
    y = self.conv(self.filters, (3, 3), name="Conv_1")(y)
    y = self.last_norm(1)(y)
    return self.act(self.shortcut(x, y) + y)


class BottleneckResNetBlock(_Block):
  """1x1 (reduce), 3x3 (with the stride: v1.5), 1x1 (expand 4x); a projection where the shape changes."""

  @nn.compact
  def __call__(self, x):
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (1, 1), name="Conv_0")(x)
    y = self.act(self.norm(name="BatchNorm_0")(y))
    y = self.conv(self.filters, (3, 3), s, name="Conv_1")(y)
    y = self.act(self.norm(name="BatchNorm_1")(y))
    y = self.conv(self.filters * 4, (1, 1), name="Conv_2")(y)
    y = self.last_norm(2)(y)
    return self.act(self.shortcut(x, y) + y)


class CifarBlock(ResNetBlock):
  """The basic block with the paper's option-A shortcut (subsample, zero-pad channels): no parameters."""

  @nn.nowrap
  def shortcut(self, x, y):
    if x.shape == y.shape:
      return x
    x = x[:, :: self.strides, :: self.strides]
    pad = y.shape[-1] - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))


class _Net(nn.Module):
  """Fields every ResNet takes; `norm` makes a BN layer (None: no normalization)."""

  num_classes: int = 10
  norm: ModuleDef | None = None
  dtype: Any = jnp.float32
  zero_init_residual: bool = True

  torch_padding: bool = False

  def layers(self, train: bool):
    """conv and norm factories for this call (a plain conv bias replaces BN's beta without BN)."""
    conv = functools.partial(nn.Conv, use_bias=self.norm is None, dtype=self.dtype, padding="SAME")
    if self.torch_padding:
      conv = functools.partial(_symmetric_padding, conv)
    if self.norm is None:
      return conv, lambda name, **_: _Identity(name=name)
    return conv, functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)

  def head(self, x):
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="Dense_0")(x).astype(jnp.float32), {}


def _symmetric_padding(conv, features, kernel_size, *args, **kwargs):
  """A convolution padded by kernel // 2 on each side, as PyTorch's ResNets are."""
  kwargs.setdefault("padding", [(k // 2, k // 2) for k in kernel_size])
  return conv(features, kernel_size, *args, **kwargs)


class _Identity(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x


class CifarResNet(_Net):
  """He et al. 2016 §4.2: 6n+2 layers on 32x32 (or any small) images. Returns `(logits, {})`."""

  blocks_per_stage: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = self.layers(train)
    x = x.astype(self.dtype)
    x = nn.relu(norm(name="bn_init")(conv(16, (3, 3), name="conv_init")(x)))
    for stage, filters in enumerate((16, 32, 64)):
      for j in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and j == 0 else 1
        x = CifarBlock(filters, conv, norm, strides=strides, zero_init_residual=self.zero_init_residual)(x)
    return self.head(x)


class ResNet(_Net):
  """ResNet v1.5 for ImageNet-size images, as flax's examples/imagenet. Returns `(logits, {})`."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = ResNetBlock
  num_filters: int = 64

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = self.layers(train)
    x = x.astype(self.dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)) if self.torch_padding else "SAME")
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        block = self.block_cls(
          self.num_filters * 2**i, conv, norm, strides=strides, zero_init_residual=self.zero_init_residual
        )
        x = block(x)
    return self.head(x)


ResNet20 = functools.partial(CifarResNet, blocks_per_stage=3)
ResNet32 = functools.partial(CifarResNet, blocks_per_stage=5)
ResNet56 = functools.partial(CifarResNet, blocks_per_stage=9)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)


# PyTorch's module names (torchvision's and timm's ResNets share them) of the
# variables in one residual block.
_TORCH_BLOCK_NAMES = {
  "Conv_0": "conv1",
  "BatchNorm_0": "bn1",
  "Conv_1": "conv2",
  "BatchNorm_1": "bn2",
  "Conv_2": "conv3",
  "BatchNorm_2": "bn3",
  "conv_proj": "downsample.0",
  "norm_proj": "downsample.1",
}


def torch_module_names(model: ResNet) -> dict[tuple[str, ...], str]:
  """The ImageNet ResNet's modules (flax paths) -> torchvision's / timm's module names:
  conv_init -> conv1, bn_init -> bn1, the j-th block of stage i -> layer{i+1}.{j}
  (its Conv_0 -> conv1, ..., conv_proj/norm_proj -> downsample.0/1), Dense_0 -> fc."""
  names = {("conv_init",): "conv1", ("bn_init",): "bn1", ("Dense_0",): "fc"}
  block = 0
  for stage, size in enumerate(model.stage_sizes):
    for j in range(size):
      for inner, torch_name in _TORCH_BLOCK_NAMES.items():
        names[(f"{model.block_cls.__name__}_{block}", inner)] = f"layer{stage + 1}.{j}.{torch_name}"
      block += 1
  return names
