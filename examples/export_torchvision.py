"""Writes a train.py ResNet-18/34/50 run as a torchvision (and timm) state dict in safetensors.

    python examples/export_torchvision.py runs/pretrain --out pretrained.safetensors
    python train.py --model resnet18 --init-from pretrained.safetensors --image-folder DIR ...

    # in PyTorch:
    model = torchvision.models.resnet18(num_classes=N)
    model.load_state_dict(safetensors.torch.load_file("pretrained.safetensors"))

The inverse of --init-from (`trainer.pretrained.to_torch`): kernels to PyTorch's
layout, BN's scale/bias/mean/var to weight/bias/running_mean/running_var. Train
with --torch-padding (on with --init-from) for torchvision to compute what the
run computed: flax's SAME padding samples stride-2 layers one pixel off.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import cli, pretrained
from trainer.checkpoints import load_run
from trainer.models import MODELS
from trainer.state import make_model


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="a train.py run directory of --model resnet18, resnet34 or resnet50")
  parser.add_argument("--out", required=True, help="the .safetensors file to write (never overwritten)")
  parser.add_argument("--step", type=int, help="the checkpoint to export (default: the last)")
  args = parser.parse_args(argv)
  out = Path(args.out)
  if out.suffix != ".safetensors":
    parser.error(f"--out: expected a .safetensors file name, got {out.name}")
  if out.exists():
    parser.error(f"--out: {out} exists; give a new file name")
  try:
    config, state, step = load_run(args.run, args.step)
  except ValueError as error:
    parser.error(f"run: {error}")
  spec = MODELS[config.model]
  if spec.torch_names is None:
    parser.error(f"run: expected a run of resnet18, resnet34 or resnet50, got --model {config.model}")
  names = spec.torch_names(make_model(config))
  tensors = pretrained.to_torch({"params": state.params, "batch_stats": state.batch_stats}, names, updates=step)
  metadata = {"format": "pt", "model": config.model, "run": str(Path(args.run).resolve()), "step": str(step)}
  pretrained.write_safetensors(out, tensors, metadata)
  padding = "torchvision's padding" if config.torch_padding else "flax's SAME padding: torchvision computes differently"
  print(f"{out}: {len(tensors)} tensors of {config.model} at step {step} ({padding})")


if __name__ == "__main__":
  main()
