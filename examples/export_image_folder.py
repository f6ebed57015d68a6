"""Writes part of a dataset train.py knows as a folder of PNG files in the ImageFolder layout.

    python examples/export_image_folder.py --dataset fashion_mnist --train 5000 --test 1000 --out DIR
    python train.py --model resnet20 --image-folder DIR --dtype bfloat16 --schedule cosine ...
    python examples/export_image_folder.py --classes 5,6,7,8,9 --train 500 --test 1000 --out DIR2

DIR/train/CLASS/NNNNN.png and DIR/test/CLASS/NNNNN.png, class folders named by
the dataset's class names: real images to try `--image-folder` on, and the
layout your own images need.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import (
  cli,
  data,
)
from trainer.augment import read


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--data-dir", default="data")
  parser.add_argument("--train", type=int, default=5000, help="training images to write (evenly over the split)")
  parser.add_argument("--test", type=int, default=1000, help="test images to write")
  parser.add_argument("--classes", help="only these class indices, e.g. 0,1,2,3,4 (default: every class)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  out = Path(args.out)
  if out.exists() and any(out.iterdir()):
    parser.error(f"--out: {out} is not empty; give a new directory")
  try:
    ds = data.open_dataset(args.dataset, data_dir=args.data_dir)
  except data.DatasetError as error:
    sys.exit(f"error: {error}")
  names = ds.class_names
  classes = _classes(parser, args.classes, len(names))
  for split, source, count in (("train", ds.train, args.train), ("test", ds.test, args.test)):
    candidates = np.arange(len(source))
    if classes is not None:
      candidates = candidates[np.isin(data.read_split(source)[1], classes)]
    picks = candidates[np.linspace(0, len(candidates) - 1, min(count, len(candidates))).astype(int)]
    for index, record in zip(picks, read(source, picks.tolist()), strict=True):
      directory = out / split / _safe(names[record["label"]])
      directory.mkdir(parents=True, exist_ok=True)
      image = record["image"]
      Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        directory / f"{index:05d}.png"
      )
  shown = len(names) if classes is None else len(classes)
  print(f"wrote {args.train} + {args.test} images of {shown} classes under {out}")


def _classes(parser, text: str | None, count: int) -> list[int] | None:
  if text is None:
    return None
  try:
    classes = sorted({int(c) for c in text.split(",")})
  except ValueError:
    classes = []
  if not classes or not all(0 <= c < count for c in classes):
    parser.error(f"--classes: expected class indices from 0 to {count - 1}, comma-separated, got {text!r}")
  return classes


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


if __name__ == "__main__":
  main()
