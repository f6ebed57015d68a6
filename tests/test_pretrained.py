"""PyTorch weights in and out (trainer.pretrained), checked against torchvision itself.

The oracle is torchvision: `tests/fixtures/torchvision/make.py` filled its ResNet-18
and ResNet-50 with weights NumPy remakes here (tests/torch_weights.py) and recorded
their logits (eval and train mode, and timm's with the same weights) and the running
statistics after one training-mode update. No test needs torch.
"""

import functools
import re
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import jaxbn
import trainer
from tests.test_datasets import write_folder
from tests.torch_weights import fixture_images, random_state_dict, read_fixture
from tests.train_runs import run
from trainer import pretrained
from trainer.config import ConfigError
from trainer.models.resnet import ResNet18, ResNet50, torch_module_names

ARCHS = {"resnet18": ResNet18, "resnet50": ResNet50}
IMAGES = fixture_images().transpose(0, 2, 3, 1)  # NHWC


def _close(actual, expected, rtol):
  """Largest difference within rtol of the largest expected magnitude."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert np.abs(actual - expected).max() <= rtol * np.abs(expected).max(), np.abs(actual - expected).max()


@functools.cache
def _loaded(arch: str, torch_padding: bool = True):
  """The trainer's model as PyTorch's layer computes (momentum and variance conventions
  from jaxbn.pytorch) with the fixture's weights converted: (model, variables, outputs)."""
  shapes, outputs = read_fixture(arch)
  _, fields = jaxbn.pytorch.from_torch_bn(np.zeros(1), np.ones(1), np.zeros(1), np.ones(1), momentum=0.1, eps=1e-5)
  norm = functools.partial(jaxbn.BatchNorm, **fields)
  model = ARCHS[arch](norm=norm, num_classes=1000, torch_padding=torch_padding)
  fresh = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), IMAGES)
  variables, notes = pretrained.from_torch(random_state_dict(shapes), fresh, torch_module_names(model))
  assert notes == []
  return model, variables, outputs


def _apply(model, variables, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, IMAGES)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_converted_weights_give_torchvisions_and_timms_logits(arch):
  model, variables, outputs = _loaded(arch)
  logits, _ = _apply(model, variables, train=False)
  _close(logits, outputs["logits_eval"], 1e-4)
  _close(logits, outputs["timm_logits_eval"], 1e-4)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_a_training_step_normalizes_and_updates_as_pytorch_does(arch):
  model, variables, outputs = _loaded(arch)
  (logits, _), updates = _apply(model, variables, train=True, mutable=["batch_stats"])
  _close(logits, outputs["logits_train"], 1e-4)
  state_dict = pretrained.to_torch({**variables, **updates}, torch_module_names(model))
  running = [k for k in state_dict if k.endswith(("running_mean", "running_var"))]
  assert len(running) == sum(k.startswith("after_train/") for k in outputs)
  for key in running:
    _close(state_dict[key], outputs[f"after_train/{key}"], 1e-4)


def test_flaxs_same_padding_computes_something_else():
  """Why --torch-padding exists: with flax's SAME the same weights give other logits."""
  model, variables, outputs = _loaded("resnet18")
  flax_padded = ResNet18(norm=model.norm, num_classes=1000, torch_padding=False)
  logits, _ = _apply(flax_padded, variables, train=False)
  assert np.abs(logits - outputs["logits_eval"]).max() > 0.05 * np.abs(outputs["logits_eval"]).max()


def test_export_is_the_inverse_of_import():
  model, variables, _ = _loaded("resnet18")
  state_dict = random_state_dict(read_fixture("resnet18")[0])
  back = pretrained.to_torch(variables, torch_module_names(model), updates=7)
  counters = {k: v for k, v in back.items() if k.endswith("num_batches_tracked")}
  assert len(counters) == 20 and all(v.dtype == np.int64 and v == 7 for v in counters.values())
  assert set(back) - set(counters) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_files_read_without_pickle_and_a_data_parallel_prefix_goes(tmp_path):
  state_dict = random_state_dict(read_fixture("resnet18")[0])
  path = tmp_path / "w.safetensors"
  save_file(
    {"module." + k: v for k, v in state_dict.items()} | {"module.bn1.num_batches_tracked": np.asarray(3, np.int64)},
    path,
  )
  read = pretrained.read_state_dict(path)
  assert set(read) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(read[key], value)


def _fresh18(num_classes=1000):
  model = ResNet18(norm=jaxbn.BatchNorm, num_classes=num_classes, torch_padding=True)
  return model, jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), IMAGES)


def test_a_head_for_other_classes_is_replaced_and_said():
  state_dict = random_state_dict(read_fixture("resnet18")[0])
  model, fresh = _fresh18(num_classes=5)
  variables, notes = pretrained.from_torch(state_dict, fresh, torch_module_names(model), "w.safetensors")
  assert notes == [
    "--init-from w.safetensors: the file's classifier has 1000 classes, the data 5: fc.weight and fc.bias "
    "replaced by a freshly initialised head"
  ]
  assert variables["params"]["Dense_0"]["kernel"] is fresh["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(
    variables["params"]["conv_init"]["kernel"], state_dict["conv1.weight"].transpose(2, 3, 1, 0)
  )
  headless = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
  _, notes = pretrained.from_torch(headless, fresh, torch_module_names(model), "w.safetensors")
  assert notes == ["--init-from w.safetensors: the file has no classifier (fc.*): the head is freshly initialised"]


def _with(state_dict, drop=(), add=None, reshape=None):
  changed = {k: v for k, v in state_dict.items() if k not in drop}
  if add:
    changed.update(add)
  if reshape:
    changed[reshape] = changed[reshape][:-1]
  return changed


@pytest.mark.parametrize(
  "change, message",
  [
    (
      dict(drop=("layer3.1.conv2.weight",)),
      "missing layer3.1.conv2.weight (and 0 more tensors of the model); "
      "the file holds a ResNet with basic blocks (2, 2, 2, 2) per stage",
    ),
    (
      dict(add={"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}),
      "unexpected tensor layer5.0.conv1.weight",
    ),
    (dict(reshape="layer2.0.bn1.running_var"), "layer2.0.bn1.running_var has shape (127,), the model expects (128,)"),
  ],
)
def test_a_wrong_tensor_is_one_line_naming_it(change, message):
  model, fresh = _fresh18()
  state_dict = _with(random_state_dict(read_fixture("resnet18")[0]), **change)
  with pytest.raises(ConfigError, match="^--init-from w.safetensors: " + re.escape(message)):
    pretrained.from_torch(state_dict, fresh, torch_module_names(model), "w.safetensors")


def test_resnet50_weights_for_resnet18_name_what_the_file_holds():
  model, fresh = _fresh18()
  expected = (
    r"^--init-from w: unexpected tensor layer1\.0\.bn3\.bias \(and 164 more\) .*bottleneck blocks \(3, 4, 6, 3\)"
  )
  with pytest.raises(ConfigError, match=expected):
    pretrained.from_torch(random_state_dict(read_fixture("resnet50")[0]), fresh, torch_module_names(model), "w")


@pytest.mark.parametrize(
  "name, content, message",
  [
    ("absent.safetensors", None, "no such file"),
    ("w.npz", b"x", "expected a .safetensors file (or a PyTorch .pth/.pt/.bin file), got '.npz'"),
    ("w.safetensors", b"not safetensors at all", "not a readable safetensors file"),
    ("w.pth", b"\x80\x02}q\x00.", "a PyTorch pickle, which train.py reads only with torch's weights_only loader"),
  ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, monkeypatch, name, content, message):
  monkeypatch.setitem(sys.modules, "torch", None)  # as where torch is not installed
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ConfigError) as error:
    pretrained.read_state_dict(path)
  assert str(error.value).startswith(f"--init-from {path}: {message}") and "\n" not in str(error.value)


def test_fine_tuning_parts_get_their_updates():
  """--freeze-stages 1 --lr-backbone-scale 0.5 with SGD and weight decay: the stem and stage 1 get no
  update (nor decay), the rest of the backbone half the head's rate: -lr * S * (g + wd * p)."""
  config = trainer.Config(
    model="resnet18", optimizer="sgd", nesterov=False, lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.01,
    freeze_stages=1, lr_backbone_scale=0.5,
  )  # fmt: skip
  model, shapes = _fresh18(num_classes=10)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["params"])
  grads = jax.tree.map(lambda p: np.full(p.shape, 0.3, np.float32), params)
  optimizer = trainer.make_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  names = torch_module_names(model)
  flat_params = traverse_util.flatten_dict(params)
  for path, update in traverse_util.flatten_dict(updates).items():
    p = flat_params[path]
    decay = 0.01 * np.asarray(p) if p.ndim > 1 else 0.0
    stage = pretrained.stage_of(names[path[:-1]])
    rate = 0.0 if stage is not None and stage <= 1 else 0.1 if stage is None else 0.05
    np.testing.assert_allclose(update, -rate * (0.3 + decay), rtol=1e-6, atol=1e-9, err_msg=str(path))


@pytest.mark.parametrize(
  "flags, message",
  [
    (dict(model="resnet20", init_from="w.safetensors"), "--init-from: needs a model with a torchvision twin"),
    (dict(model="resnet18", init_from="w.safetensors", bn="none"), "--init-from: PyTorch's ResNets have BN"),
    (dict(model="resnet18", freeze_stages=5), "--freeze-stages: resnet18 has 4 stages, got 5"),
    (dict(model="resnet18", lr_backbone_scale=-1.0), "--lr-backbone-scale: expected a finite number >= 0"),
    (dict(model="mlp", lr_backbone_scale=0.1), "--lr-backbone-scale: needs a model whose classifier is known"),
    (dict(model="resnet18", freeze_bn_affine=True), "--freeze-bn-affine: needs --bn frozen, got --bn sync"),
    (dict(model="resnet18", bn="frozen", eval_batch_stats=True), "--eval-batch-stats: needs BN that normalizes"),
    (dict(model="resnet18", bn="frozen", frozen_bn_steps=10), "--frozen-bn-steps: needs BN with batch statistics"),
    (dict(model="resnet18", bn="frozen", population_batches=10), "--population-batches: needs --bn per-device"),
  ],
)
def test_a_bad_fine_tuning_flag_is_one_line(flags, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    trainer.Config(**flags)


@pytest.mark.slow
def test_fine_tune_from_exported_weights_end_to_end(tmp_path):
  """A torchvision-layout file (1,000 classes) into train.py on a folder of three classes, BN
  frozen, the stem and stage 1 frozen; exported back, the frozen parts are the file's to the bit."""
  folder = write_folder(tmp_path / "images", per_class=(8, 4), size=(32, 32))
  state_dict = random_state_dict(read_fixture("resnet18")[0])
  weights = tmp_path / "in.safetensors"
  save_file(state_dict, weights)
  out = tmp_path / "run"
  command = [
    sys.executable, "train.py", "--model", "resnet18", "--image-folder", str(folder), "--data-dir",
    str(tmp_path / "tfds"), "--devices", "2", "--global-batch-size", "8", "--steps", "2", "--eval-every", "2",
    "--warmup-steps", "0", "--lr", "0.01", "--image-size", "32", "--init-from", str(weights), "--bn", "frozen",
    "--freeze-stages", "1", "--no-progress", "--out", str(out),
  ]  # fmt: skip
  done = run(command)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "the file's classifier has 1000 classes, the data 3: fc.weight and fc.bias replaced" in done.stderr
  exported = tmp_path / "out.safetensors"
  done = run([sys.executable, "examples/export_torchvision.py", str(out), "--out", str(exported)])
  assert done.returncode == 0, done.stderr[-2000:]
  back = load_file(exported)
  assert back["fc.weight"].shape == (3, 512)
  for key, value in state_dict.items():
    if key.startswith("fc."):
      continue
    frozen = key.startswith(("conv1.", "bn1.", "layer1.")) or key.endswith(("running_mean", "running_var"))
    assert np.array_equal(back[key], value) == frozen, key
  weights.unlink()  # a resumed run starts from its checkpoint, not the file
  command[command.index("--steps") + 1] = "4"
  resumed = run([*command, "--resume"])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "replaced" not in resumed.stderr


def test_weights_for_colour_images_given_grey_ones_say_so():
  model = ResNet18(norm=jaxbn.BatchNorm, num_classes=1000, torch_padding=True)
  grey = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), IMAGES[..., :1])
  with pytest.raises(ConfigError) as error:
    pretrained.from_torch(random_state_dict(read_fixture("resnet18")[0]), grey, torch_module_names(model), "w")
  assert str(error.value) == (
    "--init-from w: conv1.weight has shape (64, 3, 7, 7), the model expects (64, 1, 7, 7) "
    "(it takes images of 3 channels, the data has 1)"
  )


@pytest.mark.parametrize("channels", [3, 1])
def test_imagenet_normalization_is_torchvisions(channels):
  """--normalize imagenet: torchvision's transforms.Normalize(mean, std) after ToTensor (x / 255);
  images of one channel take the colours' mean."""
  from trainer.loop import _pixels

  data = type("Data", (), {"channels": channels})()
  pixels = np.arange(0, 256, 51, dtype=np.uint8).reshape(1, 2, 3, 1).repeat(channels, -1)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  if channels == 1:
    mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
  np.testing.assert_allclose(_pixels("imagenet", data)(pixels), (pixels / 255.0 - mean) / std, rtol=1e-5)
