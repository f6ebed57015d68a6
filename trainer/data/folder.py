"""A folder of one's own images (`DIR/train/CLASS/*`, `DIR/test/CLASS/*`) as a TFDS builder.

Prepared once into array_record under the data dir, like any TFDS dataset, and
read through TFDS's data source from then on. Classes are the sub-folders of
`train`, sorted by name; `test` must have the same ones. Every file is opened
with Pillow while preparing, so a file that is not an image is named then, not
in the middle of training. RGB files are stored as they are (a JPEG stays a
JPEG); grey, palette and RGBA images are converted to RGB and stored as PNG.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from trainer.data.errors import DatasetError, DatasetNotFoundError

SPLITS = ("train", "test")
_SKIPPED = {".DS_Store", "Thumbs.db", "desktop.ini"}  # files that image folders often carry


def _files(directory: Path) -> list[Path]:
  return sorted(p for p in directory.iterdir() if p.is_file() and p.name not in _SKIPPED and not p.name.startswith("."))


def scan(root: Path) -> dict[str, dict[str, list[Path]]]:
  """{split: {class: files}}, or a DatasetError naming what is wrong with the layout."""
  if not root.is_dir():
    raise DatasetNotFoundError(f"--image-folder: {root} is not a directory.")
  layout = {}
  for split in SPLITS:
    directory = root / split
    if not directory.is_dir():
      raise DatasetError(f"--image-folder: {root} has no {split}/ folder (expected {root}/{split}/CLASS/IMAGE files).")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
      raise DatasetError(f"--image-folder: {directory} has no class folders (expected {directory}/CLASS/IMAGE files).")
    layout[split] = {name: _files(directory / name) for name in classes}
    for name, files in layout[split].items():
      if not files:
        raise DatasetError(f"--image-folder: the class folder {directory / name} is empty.")
  train, test = sorted(layout["train"]), sorted(layout["test"])
  if train != test:
    only = lambda a, b: ", ".join(sorted(set(a) - set(b))) or "none"
    raise DatasetError(
      f"--image-folder: the classes of train/ and test/ differ (only in train/: {only(train, test)}; "
      f"only in test/: {only(test, train)})."
    )
  return layout


def fingerprint(layout) -> str:
  """Changes when a file is added, removed, renamed or modified."""
  digest = hashlib.sha256()
  for split, classes in layout.items():
    for name, files in classes.items():
      for path in files:
        stat = path.stat()
        digest.update(f"{split}/{name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


def common_size(layout) -> tuple[int, int] | None:
  """(height, width) when every image of the folder has it, else None (read from the
  files' headers: Pillow opens lazily)."""
  sizes = set()
  for classes in layout.values():
    for files in classes.values():
      for path in files:
        try:
          with Image.open(path) as image:
            sizes.add(image.size[::-1])
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
          raise DatasetError(
            f"--image-folder: {path} is not a readable image ({type(error).__name__}: {error})."
          ) from None
        if len(sizes) > 1:
          return None
  return sizes.pop()


def _image(path: Path):
  """The file's bytes when it is an RGB image, else the image converted to RGB."""
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
        return path.read_bytes()
      return image.convert("RGB")
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
    raise DatasetError(f"--image-folder: {path} is not a readable image ({type(error).__name__}: {error}).") from None


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The images of a folder in the ImageFolder layout, classes sorted by name."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, root: str, size: tuple[int, int] | str | None = "scan", **kwargs):
    self._root = Path(root).absolute()
    self._layout = scan(self._root)
    # Images of one size are declared with it, so the data can live on the devices
    # and needs no --image-size; mixed sizes are declared (None, None).
    self._size = common_size(self._layout) if size == "scan" else size
    # One prepared copy per folder and content: another folder, or this one
    # changed, is prepared anew instead of being shadowed.
    self.name = f"image_folder_{_safe(self._root.name)}_{fingerprint(self._layout)}"
    super().__init__(**kwargs)
    # a pickled copy (grain's workers) is rebuilt with these, without reading every header again
    self._original_state.update(root=str(self._root), size=self._size)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"The images of {self._root}.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(*(self._size or (None, None)), 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=sorted(self._layout["train"])),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are here
    return {split: self._generate_examples(self._layout[split]) for split in SPLITS}

  def _generate_examples(self, classes):
    for label, name in enumerate(sorted(classes)):
      for path in classes[name]:
        yield f"{name}/{path.name}", {"image": _image(path), "label": label}


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name.lower()) or "root"
