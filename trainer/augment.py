"""Training augmentation and evaluation preprocessing of uint8 images.

  none                 the image as it is (its own size)
  crop-flip            small images (CIFAR's recipe, He et al. 2016): pad 4 pixels with
                       zeros, take a random crop of the original size, mirror half of them
  random-resized-crop  large images (the ImageNet recipe): a random crop of 8-100% of the
                       area with aspect ratio 3/4-4/3, resized to the image size, mirrored
                       half of the time; evaluation resizes the shorter side to
                       size/0.875 and takes the centre crop

crop-flip is written for NumPy (host) and jax.numpy (device) with the same integer
draws from `order.hash_key(seed, step, position)`, so both input paths produce the
same pixels. The large-image path runs on the host only (Pillow).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from trainer import order

PAD = 4
EVAL_CROP = 0.875  # the centre crop's share of the resized shorter side


def as_hwc(image: np.ndarray) -> np.ndarray:
  """A grey (H, W) image as (H, W, 1)."""
  return image[..., None] if image.ndim == 2 else image


def read(source, indices) -> list:
  """Records `indices` of a TFDS data source (or any sequence), read as one batch where it can."""
  indices = list(indices)
  try:
    return source.__getitems__(indices)
  except (AttributeError, TypeError):  # no batched read (TFDS's mock_data's is broken): one by one
    return [source[i] for i in indices]


def crop_flip_draws(seed: int, step, positions, hflip: bool, xp: Any = np):
  """(dy, dx, flip) per position: offsets in [0, 2*PAD], flip in {0, 1}."""
  bits = order.hash_key(seed, order.AUGMENT_STREAM, step, positions, xp=xp)
  side = 2 * PAD + 1
  dy = (bits % side).astype(xp.int32)
  dx = ((bits // side) % side).astype(xp.int32)
  flip = ((bits >> 16) & 1).astype(xp.int32) if hflip else xp.zeros_like(dy)
  return dy, dx, flip


def crop_flip_numpy(images: np.ndarray, draws) -> np.ndarray:
  """(B, H, W, C) uint8 -> the same shape, cropped from the zero-padded image and mirrored."""
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  out = np.empty_like(images)
  for i, (dy, dx, flip) in enumerate(zip(*draws, strict=True)):
    crop = padded[i, dy : dy + h, dx : dx + w]
    out[i] = crop[:, ::-1] if flip else crop
  return out


def crop_flip_jax(images, draws):
  """The jax.numpy twin of `crop_flip_numpy` (inside a jitted step)."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))

  def one(image, dy, dx, flip):
    crop = lax.dynamic_slice(image, (dy, dx, 0), (h, w, c))
    return jnp.where(flip == 1, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, *draws)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
  """The ImageNet training crop of one (H, W, C) uint8 image, as (size, size, C)."""
  h, w = image.shape[:2]
  area = h * w
  box = (0, 0, w, h)
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      box = (x0, y0, x0 + cw, y0 + ch)
      break
  else:  # no valid box in 10 tries: the whole image's central square-ish crop
    side = min(h, w)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
  out = _resize(image, size, size, box)
  return out[:, ::-1] if hflip and rng.integers(0, 2) else out


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation: shorter side resized to size/0.875, then the central size x size."""
  h, w = image.shape[:2]
  scale = size / EVAL_CROP / min(h, w)
  rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (rh - size) // 2, (rw - size) // 2
  resized = _resize(image, rw, rh, (0, 0, w, h))
  return resized[top : top + size, left : left + size]


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """The whole image at size x size (small images of mixed sizes)."""
  h, w = image.shape[:2]
  return image if (h, w) == (size, size) else _resize(image, size, size, (0, 0, w, h))


def _resize(image: np.ndarray, width: int, height: int, box) -> np.ndarray:
  grey = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if grey else image)
  out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR, box=box))
  return out[..., None] if grey else out


def host_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """The generator of one example's large-image draws."""
  return np.random.default_rng(int(order.hash_key(seed, order.AUGMENT_STREAM, step, position)))
