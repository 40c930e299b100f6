"""The datasets of ``scripts/bench_datasets.py``, in a module of their own: spawn workers, DataLoader's workers
and build processes import them by name (``bench_data:Jpegs``), and it imports only numpy and Pillow, so a
process that loads one does not pay for torch.

  Jpegs      JPEG files decoded with Pillow, RGB, resized to 224x224: {"image": uint8 (224, 224, 3), "label"}
  Spin       pure Python in __getitem__ (holds the GIL), then a small array
  Small      10^6 tiny samples (16 float32 each): the cost per sample of the machinery itself
  pixel_sums the JPEG benchmark's kernel (a cheap one: the loading decides)
"""
from __future__ import annotations

import os

import numpy as np


def make_jpegs(root: str, n: int = 256, seed: int = 0, quality: int = 90) -> list[str]:
    """``n`` JPEGs of ImageNet-like sizes in ``root``, made once: ``pipeline.bench.images.make_jpegs`` (the
    image bench's maker), imported here only when called (this module stays free of torch)."""
    from pipeline.bench.images import make_jpegs as make
    return make(root, n, seed, quality)


class Jpegs:
    """The JPEGs in ``root``: sample i opened with Pillow, converted to RGB and resized to ``size`` x ``size``;
    ``{"image": uint8 (size, size, 3), "label": int}``."""

    def __init__(self, root: str, size: int = 224):
        self.root, self.size = root, size
        self.paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".jpg"))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return {"image": np.array(img), "label": i % 1000}  # a writable copy, as torch wants


def pixel_sums(batch):
    """The JPEG benchmark's kernel, cheap so that the loading decides: per image, the sum of its pixels
    (a contiguous reduction; the built-in ``sum`` reduces along the image's rows, a strided walk that
    costs about half as much as the decode)."""
    img = batch["image"]
    return {"sum": img.reshape(img.shape[0], -1).sum(1), "label": batch["label"]}


class Spin:
    """``n`` samples whose ``__getitem__`` is pure Python (``ops`` arithmetic steps: it holds the GIL), then
    a float32 (16,) array."""

    def __init__(self, n: int = 2048, ops: int = 3000):
        self.n, self.ops = n, ops

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = i
        for k in range(self.ops):
            x = (x * 31 + k) % 1000003
        return np.full(16, x % 1000, np.float32)


class Small:
    """``n`` samples of 16 float32 (one row of an array made from ``seed``): ``__getitem__`` is
    ``self.data[i]``. Pickled as its parameters (the data is made again where it is unpickled)."""

    def __init__(self, n: int = 1_000_000, seed: int = 0):
        self.n, self.seed = n, seed
        self.data = np.random.default_rng(seed).random((n, 16), dtype=np.float32)

    def __reduce__(self):
        return Small, (self.n, self.seed)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.data[i]
