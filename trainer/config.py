"""The configuration of a training run (written to OUT/config.json), and train.py's flags.

Every field is a flag (`--name-with-dashes`); its help and choices are the
field's metadata, and the choices of --model, --bn, --parallel come from their
registries. A field left None takes the model's recipe (`trainer.models.MODELS`),
then the general default below, so `Config(model="resnet20")` from Python gets
ResNet-20's recipe exactly as `train.py --model resnet20` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from trainer import cli, pretrained
from trainer.bn_modes import BN_MODES
from trainer.errors import ConfigError
from trainer.models import MODELS, ModelOptions
from trainer.parallel import STYLES

PARALLEL_STYLES = tuple(STYLES)
OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "bfloat16")
INPUTS = ("auto", "device", "stream")
AUGMENTATIONS = ("auto", "none", "crop-flip", "random-resized-crop")
NORMALIZATIONS = ("unit", "standardize", "imagenet")
POPULATION_ESTIMATORS = ("paper", "pooled", "both")
WEIGHT_EMA_BN = ("ema", "recompute", "both")
CHECKPOINT_STEPS = 10_000  # checkpoint_every's default, rounded up to a multiple of eval_every
STEP_DECAY_AT = (0.5, 0.75)  # --schedule step: lr / 10 at these shares of --steps (He et al.: 32k, 48k of 64k)

# Flags that may differ when a run is resumed: where and how to show it, and
# (only upwards) how long it trains.
RESUMABLE = ("out", "resume", "progress", "steps", "data_dir", "input_workers")

# General defaults of the fields a recipe may set (None: decided elsewhere, see each field).
DEFAULTS: dict[str, Any] = dict(
  batch_size=None,
  global_batch_size=None,
  steps=10_000,
  optimizer="sgd",
  nesterov=False,
  lr=0.1,
  schedule="constant",
  warmup_steps=0,
  weight_decay=0.0,
  label_smoothing=0.0,
  bn="sync",
  bn_momentum=0.99,
  eval_every=1000,
  normalize="unit",
  image_size=None,
)


@dataclasses.dataclass
class Config(ModelOptions):
  """Everything a run depends on; written to OUT/config.json."""

  # ---- data
  dataset: str = cli.option(
    "a TFDS image-classification dataset by name (mnist and fashion_mnist read IDX files)", "fashion_mnist"
  )
  image_folder: str | None = cli.option(
    "train on your own images: DIR/train/CLASS/* and DIR/test/CLASS/* (instead of --dataset)"
  )
  idx_dir: str | None = cli.option(
    "mnist/fashion_mnist: the four IDX files (train-images-idx3-ubyte[.gz], ...); "
    "prepared data from other files is rebuilt"
  )
  data_dir: str | None = cli.option("TFDS data dir: prepared datasets are read and written here", "data")
  input: str = cli.option(
    "where the training data lives: on every device (small datasets of one image shape), streamed "
    "per host through grain, or auto (device when it fits)",
    "auto",
    INPUTS,
  )
  input_workers: int | None = cli.option(
    "stream: grain worker processes for decoding and augmentation (0: in this process; default: cores - 1, at most 8)"
  )
  image_size: int | None = cli.option(
    "the side of the square images the model sees (default: the model's recipe, 224 for the ImageNet ResNets, "
    "else the images' own size)"
  )
  augment: str | None = cli.option(
    "training augmentation (default: none for mlp/inception; crop-flip for images up to 64 px, "
    "random-resized-crop above)",
    None,
    AUGMENTATIONS,
  )
  normalize: str | None = cli.option(
    "pixels to x/255 (unit), by the training split's per-channel mean and std (standardize), or by ImageNet's "
    "(imagenet: what torchvision's and timm's pretrained models expect)",
    None,
    NORMALIZATIONS,
  )
  # ---- model and BN
  model: str = cli.option("the model", "mlp", MODELS)
  bn: str | None = cli.option("the BN mode (none: the paper's baseline without BN)", None, BN_MODES)
  bn_momentum: float | None = cli.option("running-average decay of BN statistics (flax meaning)")
  bn_group_size: int | None = cli.option(
    "per-device/renorm: examples per normalization group (ghost BN; default: each device's batch); "
    "a divisor of the per-device batch"
  )
  frozen_bn_steps: int = cli.option(
    "train the last N steps with BN frozen (jaxbn.FrozenBatchNorm: the running statistics, pooled over the "
    "devices, fixed; scale and bias still trained); 0: off",
    0,
  )
  accumulate_steps: int = cli.option(
    "gradient accumulation: each step runs the global batch as N micro-batches, one after the other (the "
    "activations of one held at a time); BN normalizes each micro-batch as --bn says, and the running "
    "statistics take one update per step from the micro-batches' pooled moments. N divides the per-device batch",
    1,
  )
  init_from: str | None = cli.option(
    "start from PyTorch weights: a torchvision or timm ResNet state dict (.safetensors; a .pth/.pt file needs "
    "torch) for --model resnet18/34/50; a classifier for another class count is replaced by a fresh one"
  )
  torch_padding: bool | None = cli.option(
    "ImageNet ResNets: pad as torchvision and timm do (each convolution by kernel // 2, the stem's max pooling by "
    "1) instead of flax's SAME; default: on with --init-from, else off"
  )
  freeze_stages: int | None = cli.option(
    "fine-tuning, resnet18/34/50: no gradient to the stem and the first N stages (0: the stem only; detectron2's "
    "FREEZE_AT is N + 1); default: nothing frozen"
  )
  lr_backbone_scale: float = cli.option(
    "fine-tuning, resnet18/34/50: everything but the classifier learns at the learning rate x S", 1.0
  )
  freeze_bn_affine: bool = cli.option("--bn frozen: BN's scale and bias are fixed too (no gradient)", False)
  dtype: str = cli.option(
    "computation dtype (parameters, optimizer state and BN statistics stay float32)", "float32", DTYPES
  )
  # the flags of particular models: ModelOptions (trainer.models), inherited
  # ---- devices
  parallel: str = cli.option(
    "how the step spans the devices: jax.jit over sharded arrays, jax.jit(jax.shard_map(...)) or jax.pmap",
    "jit",
    STYLES,
  )
  devices: int | None = cli.option("devices to use (on CPU: host devices to create; default: every device)")
  batch_size: int | None = cli.option("examples per device per step (global batch = this x devices)")
  global_batch_size: int | None = cli.option("examples per step over all devices (instead of --batch-size)")
  # ---- optimization
  steps: int | None = cli.option("training steps (raise it with --resume to train longer)")
  optimizer: str | None = cli.option("optax optimizer (momentum: 0.9)", None, OPTIMIZERS)
  nesterov: bool | None = cli.option("Nesterov momentum (with --optimizer momentum)")
  lr: float | None = cli.option("peak learning rate")
  schedule: str | None = cli.option(
    "learning rate over the run: constant, step (/10 at 50%% and 75%% of --steps) or cosine (to 0 at --steps)",
    None,
    SCHEDULES,
  )
  warmup_steps: int | None = cli.option("linear warm-up from 0 over the first N steps")
  lr_decay_steps: int = cli.option(
    "--schedule constant: multiply the rate by --lr-decay-rate every N steps (0: off)", 0
  )
  lr_decay_rate: float = cli.option("staircase decay factor", 1.0)
  weight_decay: float | None = cli.option("weight decay (L2) on kernels; never on BN's scale and bias or on biases")
  label_smoothing: float | None = cli.option("label smoothing of the cross-entropy")
  weight_ema: float = cli.option(
    "keep an exponential moving average of the weights with this decay (Polyak averaging, timm's model EMA; "
    "e.g. 0.999), updated every optimizer step; each evaluation also scores the averaged weights; 0: off",
    0.0,
  )
  weight_ema_bn: str = cli.option(
    "--weight-ema: the BN statistics the averaged weights are scored with: the running statistics averaged "
    "alongside them (ema, timm's way), PreciseBN of the averaged weights over --population-batches training "
    "batches (recompute), or both",
    "ema",
    WEIGHT_EMA_BN,
  )
  # ---- evaluation, checkpoints
  eval_every: int | None = cli.option("evaluate on the whole test split every N steps")
  population_batches: int = cli.option(
    "also evaluate with population statistics (paper Algorithm 2) over N training batches of the size BN "
    "normalizes over in training (one device's for per-device BN); 0: off",
    0,
  )
  population_estimator: str = cli.option(
    "--population-batches: the paper's Algorithm 2 (mean of per-batch unbiased variances), fvcore's pooled "
    "estimator (mean and biased variance of every element), or both",
    "paper",
    POPULATION_ESTIMATORS,
  )
  eval_batch_stats: bool = cli.option(
    "also evaluate with each test batch's own statistics, at the normalization batch of training "
    "(the train-test inconsistency of Wu & Johnson 2021)",
    False,
  )
  checkpoint_every: int | None = cli.option(
    "checkpoint every N steps, a multiple of --eval-every (default: 10,000 rounded up to one), and at the end"
  )
  seed: int = cli.option("random seed (initialization, data order, augmentation, dropout)", 0)
  out: str = cli.option("run directory", "runs/default")
  resume: bool = False
  progress: bool | None = None  # None: only on a terminal

  def __post_init__(self):
    self._choose("model", MODELS)
    recipe = MODELS[self.model].recipe
    given_batch = self.batch_size is not None or self.global_batch_size is not None
    for name, default in DEFAULTS.items():
      if getattr(self, name) is None:
        value = recipe.get(name, default)
        if name in ("batch_size", "global_batch_size") and given_batch:
          value = None  # one batch flag given: the recipe's other one does not apply
        setattr(self, name, value)
    self._check()

  def _choose(self, name, allowed):
    if getattr(self, name) not in allowed:
      _fail(name, f"expected one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")

  def _check(self):
    for field in dataclasses.fields(self):
      choices = field.metadata.get("choices")
      if choices and getattr(self, field.name) is not None:
        self._choose(field.name, choices)
    for name in ("steps", "eval_every", "width", "accumulate_steps"):
      _positive_int(name, getattr(self, name))
    for name in ("batch_size", "global_batch_size", "devices", "image_size", "input_workers"):
      if getattr(self, name) is not None:
        _positive_int(name, getattr(self, name), zero=name == "input_workers")
    if self.batch_size is not None and self.global_batch_size is not None:
      _fail("global_batch_size", "give --batch-size (per device) or --global-batch-size, not both")
    if self.batch_size is None and self.global_batch_size is None:
      self.batch_size = 60
    if self.image_folder is not None and self.idx_dir is not None:
      _fail("idx_dir", "is for mnist/fashion_mnist, not --image-folder")
    _positive_int("warmup_steps", self.warmup_steps, zero=True)
    _positive_int("lr_decay_steps", self.lr_decay_steps, zero=True)
    _positive_int("population_batches", self.population_batches, zero=True)
    _positive_int("frozen_bn_steps", self.frozen_bn_steps, zero=True)
    self._check_fine_tuning()
    self._check_bn()
    self._check_optimization()
    self._check_model_options()
    if self.checkpoint_every is None:
      self.checkpoint_every = -(-CHECKPOINT_STEPS // self.eval_every) * self.eval_every
    if self.checkpoint_every < 1 or self.checkpoint_every % self.eval_every:
      _fail(
        "checkpoint_every",
        f"expected a positive multiple of --eval-every ({self.eval_every}), got {self.checkpoint_every}",
      )

  def _check_bn(self):
    if self.bn_group_size is not None:
      _positive_int("bn_group_size", self.bn_group_size)
      if not BN_MODES[self.bn].per_device:
        _fail("bn_group_size", f"needs --bn per-device or renorm (normalization per group), got --bn {self.bn}")
    batch_bn = BN_MODES[self.bn].batch_statistics
    if self.frozen_bn_steps and (not batch_bn or self.frozen_bn_steps >= self.steps):
      _fail(
        "frozen_bn_steps",
        f"needs BN with batch statistics (--bn {self.bn}) and fewer steps than --steps ({self.steps})",
      )
    if self.eval_batch_stats and not batch_bn:
      _fail("eval_batch_stats", f"needs BN that normalizes with batch statistics, got --bn {self.bn}")
    if self.population_batches and not BN_MODES[self.bn].has_population_statistics:
      _fail("population_batches", f"needs --bn per-device or sync (BN's training statistics), got --bn {self.bn}")
    if not 0 <= self.weight_ema < 1:
      _fail("weight_ema", f"expected a decay in [0, 1) (0: off), got {self.weight_ema}")
    if self.weight_ema_bn != "ema" and not self.weight_ema:
      _fail("weight_ema_bn", "needs --weight-ema (the averaged weights to score)")
    if self.weight_ema and self.weight_ema_bn != "ema" and not self.population_batches:
      _fail("weight_ema_bn", f"{self.weight_ema_bn} recomputes statistics over --population-batches; give it (>0)")
    if not 0 <= self.bn_momentum <= 1:
      _fail("bn_momentum", f"expected a value in [0, 1], got {self.bn_momentum}")

  def _check_optimization(self):
    if self.lr_decay_steps and self.schedule != "constant":
      _fail("lr_decay_steps", f"is the staircase decay of --schedule constant, not --schedule {self.schedule}")
    if self.warmup_steps >= self.steps and self.warmup_steps:
      _fail("warmup_steps", f"expected fewer than --steps ({self.steps}), got {self.warmup_steps}")
    if self.nesterov and self.optimizer != "momentum":
      _fail("nesterov", f"needs --optimizer momentum, got {self.optimizer}")
    for name in ("lr", "init_std", "lr_decay_rate"):
      value = getattr(self, name)
      if not math.isfinite(value) or value <= 0:
        _fail(name, f"expected a finite positive number, got {value}")
    if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
      _fail("weight_decay", f"expected a finite number >= 0, got {self.weight_decay}")
    if not 0 <= self.label_smoothing < 1:
      _fail("label_smoothing", f"expected a value in [0, 1), got {self.label_smoothing}")
    if not 0 <= self.dropout < 1:
      _fail("dropout", f"expected a rate in [0, 1), got {self.dropout}")

  def _check_model_options(self):
    """Another model's own flag (`ModelSpec.options`) given to this one is refused, not ignored."""
    for name, owners in _model_options().items():
      if self.model not in owners and getattr(self, name) != self.__dataclass_fields__[name].default:
        _fail(name, f"is an option of --model {'/'.join(owners)}, not of --model {self.model}")

  def _check_fine_tuning(self):
    spec = MODELS[self.model]
    for name in ("init_from", "torch_padding", "freeze_stages"):
      if getattr(self, name) and spec.torch_names is None:
        _fail(name, f"needs a model with a torchvision twin (resnet18, resnet34, resnet50), got --model {self.model}")
    if self.init_from and BN_MODES[self.bn].layer is None:
      _fail("init_from", "PyTorch's ResNets have BN: give a BN mode (--bn frozen, sync, per-device), not --bn none")
    if self.torch_padding is None:
      self.torch_padding = bool(self.init_from)
    if self.freeze_stages is not None:
      _positive_int("freeze_stages", self.freeze_stages, zero=True)
      stages = pretrained.stage_count(spec.torch_names_of(self))
      if self.freeze_stages > stages:
        _fail("freeze_stages", f"{self.model} has {stages} stages, got {self.freeze_stages}")
    if not math.isfinite(self.lr_backbone_scale) or self.lr_backbone_scale < 0:
      _fail("lr_backbone_scale", f"expected a finite number >= 0, got {self.lr_backbone_scale}")
    if self.lr_backbone_scale != 1 and spec.torch_names is None:
      _fail("lr_backbone_scale", f"needs a model whose classifier is known (resnet18/34/50), got --model {self.model}")
    if self.freeze_bn_affine and (BN_MODES[self.bn].layer is None or BN_MODES[self.bn].batch_statistics):
      _fail("freeze_bn_affine", f"needs --bn frozen, got --bn {self.bn}")

  def global_batch(self, num_devices: int) -> int:
    """Examples per step over all devices; ConfigError if they do not split evenly."""
    if self.global_batch_size is None:
      return self.batch_size * num_devices
    if self.global_batch_size % num_devices:
      _fail("global_batch_size", f"{self.global_batch_size} does not split evenly over {num_devices} devices")
    return self.global_batch_size

  def micro_batch(self, num_devices: int) -> int:
    """Examples per micro-batch over all devices (--accumulate-steps); ConfigError unless
    the micro-batches split every device's batch evenly."""
    global_batch = self.global_batch(num_devices)
    per_device = global_batch // num_devices
    if per_device % self.accumulate_steps:
      _fail(
        "accumulate_steps",
        f"{self.accumulate_steps} micro-batches must split the per-device batch of {per_device} evenly "
        f"(global batch {global_batch} over {num_devices} devices)",
      )
    return global_batch // self.accumulate_steps

  def normalization_groups(self, num_devices: int) -> int | None:
    """The BN mode's normalization groups of one (micro-)batch over `num_devices`
    (`BNMode.groups`); None for modes that normalize over the whole of it."""
    what = "micro-batch" if self.accumulate_steps > 1 else "global batch"
    return BN_MODES[self.bn].groups(self.bn_group_size, self.micro_batch(num_devices), num_devices, what)

  def differences(self, other: Config) -> list[str]:
    """The flags (as --name value) of `self` that differ from `other`'s, but
    those a resumed run may change."""
    diffs = []
    for field in dataclasses.fields(self):
      if field.name in RESUMABLE:
        continue
      mine, theirs = getattr(self, field.name), getattr(other, field.name)
      if mine != theirs:
        diffs.append(f"{cli.flag(field.name)} {mine} (the run has {theirs})")
    return diffs


def _fail(name: str, message: str):
  raise ConfigError(f"{cli.flag(name)}: {message}")


def _model_options() -> dict[str, list[str]]:
  """Each model option -> the models that read it (from the live registry)."""
  owners: dict[str, list[str]] = {}
  for model, spec in MODELS.items():
    for name in spec.options:
      owners.setdefault(name, []).append(model)
  return owners


def _positive_int(name: str, value, zero: bool = False):
  if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
    _fail(name, f"expected {'0 or ' if zero else ''}a positive integer, got {value}")
