"""A folder of JPEG/PNG/WebP/BMP files as a map-style dataset (decoded on the build threads), or, with
``--decode device``, as batches of the files' bytes (encoded.py).

``--input DIR`` where DIR holds images (``.jpg .jpeg .png .webp .bmp``, any depth, not hidden) and no
``.npy`` file is read as images (``source.kind = "images"``). The files are sorted by path (component by
component, so a class folder's files stay together, as torchvision's ``ImageFolder`` orders them); sample i
is file i, decoded on a build thread (a plain JPEG by simplejpeg, resized by torch: NOTE [ JPEG path ] in
jpeg.py; any other file by Pillow; all of them release the GIL while they decode and resize) and written
straight into its row of the slot (NOTE [ Samples ] in sources/datasets.py)::

    {"image": uint8 (S, S, 3) (or (3, S, S) with layout "nchw"), "index": int64,
     "label": int64 (only for a folder of class folders), "valid": bool (only with bad_samples = "skip")}

The transform is torchvision's evaluation one (pillow.py): the shorter side resized to R
(``source.resize``; 0 = round(S * 256 / 224)), then the centre S x S (``source.image_size``) cropped.

A file that cannot be decoded raises ``SampleError`` naming its path relative to DIR and Pillow's message:
its batch fails, under ``faults.on_error``. With ``bad_samples = "skip"`` it is a zero image with
``valid = False`` instead, and the summary's ``bad_samples`` lists it (collected in the main: samples
decoded in build processes are not seen there, see docs/data.md).
"""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np

from ..errors import ConfigError, SampleError
from ..fields import Layout
from ..sources.base import Batch
from ..sources.datasets import MapSource
from . import encoded, jpeg
from .pillow import BAD_FILE_HINT, EXTRA, load, pil

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_BATCH = 64


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def kind_of(path: str) -> str | None:
    """``"npy"`` for a directory with a ``.npy`` file in it, ``"images"`` for one with images (at any
    depth, found by a walk that stops at the first), None for neither (or not a directory)."""
    try:
        names = os.listdir(path)
    except OSError:
        return None
    if any(n.endswith(".npy") and not n.startswith(".") for n in names):
        return "npy"
    for _root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(_is_image(f) for f in files):
            return "images"
    return None


def list_images(root: str) -> list[str]:
    """Every image under ``root`` (hidden files and folders skipped), relative paths with ``/``, sorted
    component by component."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for f in files:
            if _is_image(f):
                found.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(found, key=lambda p: p.split("/"))


class ImageFolder:
    """The images under ``root`` as a map-style dataset: ``len``, ``[i]`` -> the sample dict (see the
    module docstring), ``identity()`` for resume, ``classes`` (None without class folders)."""

    def __init__(self, root: str, image_size: int = 224, resize: int = 0, layout: str = "nhwc",
                 bad_samples: str = "fail", decode: str = "main", decoder: str = "auto"):
        if not os.path.isdir(root):
            raise ConfigError(f"--input {root}: not a directory of images")
        self.root, self.size = root, int(image_size)
        self.resize = int(resize) or round(self.size * 256 / 224)
        if self.resize < self.size:
            raise ConfigError(f"source.resize = {self.resize}: must be >= source.image_size ({self.size}): "
                              f"the shorter side is resized to it, then the centre is cropped")
        self.layout, self.skip, self.decode, self.decoder = layout, bad_samples == "skip", decode, decoder
        try:
            self.files = list_images(root)
        except OSError as e:
            raise ConfigError(f"--input {root}: {e.strerror or e}") from None
        if not self.files:
            raise ConfigError(f"--input {root}: the directory has no .npy files and no images "
                              f"({', '.join(EXTENSIONS)})")
        pil()
        tops = {f.split("/")[0] for f in self.files}
        labelled = all(f.count("/") == 1 for f in self.files)
        self.classes = sorted(tops) if labelled else None
        self.labels = ([self.classes.index(f.split("/")[0]) for f in self.files] if labelled else None)
        self.bad: dict[int, str] = {}  # sample -> why (bad_samples = "skip"), collected where decoded
        self._lock = threading.Lock()

    def __getstate__(self):  # to a build process: the lock stays
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> dict:
        """The files (relative paths, sizes, mtimes: digested) and the transform."""
        digest = hashlib.sha256()
        for f in self.files:
            st = os.stat(os.path.join(self.root, f))
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return {"kind": "images", "path": os.path.abspath(self.root), "files": len(self.files),
                "stat_sha256": digest.hexdigest(), "image_size": self.size, "resize": self.resize,
                "layout": self.layout, "labels": self.classes is not None, "bad_samples": "skip" if self.skip else "fail",
                "decode": self.decode}

    def template(self) -> dict:
        """A sample's fields with their shapes and dtypes (zeros), without decoding anything."""
        return self._sample(0, np.zeros((self.size, self.size, 3), np.uint8), False)

    def _sample(self, i: int, image: np.ndarray, valid: bool) -> dict:
        s = {"image": image.transpose(2, 0, 1) if self.layout == "nchw" else image, "index": np.int64(i)}
        if self.labels is not None:
            s["label"] = np.int64(self.labels[i])
        if self.skip:
            s["valid"] = np.bool_(valid)
        return s

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.files):
            raise IndexError(f"image {i} of {len(self.files)}")
        rel = self.files[i]
        try:
            image = load(os.path.join(self.root, rel), self.size, self.resize, self.decoder)
        except Exception as e:  # noqa: BLE001 - the decoder's error: named, or the file skipped
            why = f"{type(e).__name__}: {e}"
            if not self.skip:
                raise SampleError(f"file {rel}: {why}{BAD_FILE_HINT}") from e
            self.found_bad({i: why})
            return self._sample(i, np.zeros((self.size, self.size, 3), np.uint8), False)
        return self._sample(i, image, True)

    def found_bad(self, bad: dict) -> None:
        """{sample: why}: files that could not be read or decoded (wherever that was found out)."""
        with self._lock:
            self.bad.update({int(i): why for i, why in bad.items()})


class ImageSource(MapSource):
    """An ImageFolder batched (``MapSource``), with each batch's files for its manifest line and the
    classes and bad files for the summary; with ``decode = "device"`` its batches are the files' bytes
    (NOTE [ Encoded batches ] in images/encoded.py), decoded by the workers."""

    probe = False  # every image is cropped to one size: nothing ragged to look for

    def __init__(self, dataset: ImageFolder, batch_size: int = DEFAULT_BATCH, drop_last: bool = False):
        super().__init__(dataset, batch_size, drop_last)
        if dataset.decode == "device":
            self.starts = np.concatenate([[0], np.cumsum(encoded.entries(dataset))])  # sample i's bytes: starts[i]..
            sizes = [self.encoded_layout(k).nbytes for k in range(self.n)]
            full = sorted(sizes[: self.samples // self.batch_size] or sizes)
            # slots hold the largest batch, or twice the median one when a few huge files make it larger:
            # those batches travel pickled (counted in the summary's handoff line), the ring stays small
            self.max_nbytes = min(max(sizes), 2 * full[len(full) // 2])

    def _first_sample(self):
        return self.dataset.template()  # the layout needs no decode: a bad first file fails its batch

    def encoded_layout(self, index: int) -> Layout:
        """Batch ``index`` as the files' bytes (NOTE [ Encoded batches ]): its fields and their shapes."""
        lo, rows = index * self.batch_size, self.rows_of(index)
        nbytes = int(self.starts[lo + rows] - self.starts[lo])
        return encoded.layout(rows, nbytes, self.dataset.labels is not None, self.dataset.skip)

    def batch(self, index: int) -> Batch:
        if self.dataset.decode != "device":
            return super().batch(index)
        layout, rows, base = self.encoded_layout(index), self.rows_of(index), index * self.batch_size

        def fill_rows(views, lo, hi):
            encoded.fill_rows(self.dataset, self.starts, views, base, lo, hi)
        return Batch(index, layout, lambda out: fill_rows(out, 0, rows), layout.nbytes, rows, fill_rows)

    def record_bad(self, bad: dict) -> None:
        """Bad files found where the batch was decoded (a worker, with decode = "device"): {sample: why}."""
        self.dataset.found_bad(bad)

    def manifest(self, index: int) -> dict:
        """Extra fields of batch ``index``'s manifest line: its files, relative to DIR (and bad ones)."""
        lo = index * self.batch_size
        hi = lo + self.rows_of(index)
        bad = {self.dataset.files[i]: why for i, why in sorted(self.dataset.bad.items()) if lo <= i < hi}
        return {"files": self.dataset.files[lo:hi], **({"bad_samples": bad} if bad else {})}

    def learned(self, index: int) -> dict:
        """What building batch ``index`` here found out (its bad files, sample -> why), for the copy of the
        source where the summary and manifest are made (``learn``: a Ray actor built it)."""
        lo = index * self.batch_size
        hi = lo + self.rows_of(index)
        with self.dataset._lock:
            return {i: why for i, why in self.dataset.bad.items() if lo <= i < hi}

    def learn(self, found: dict) -> None:
        self.dataset.found_bad(found)

    @property
    def notes(self) -> list[str]:
        """The run's notes: JPEGs decoded by Pillow for want of simplejpeg (NOTE [ JPEG path ])."""
        ds = self.dataset
        if ds.decoder != "auto" or jpeg.module() is not None or not any(
                f.lower().endswith(jpeg.SUFFIXES) for f in ds.files):
            return []
        return [f"images: JPEGs decoded by Pillow: simplejpeg (libjpeg-turbo, faster) is not installed: {EXTRA}"]

    def report(self) -> dict:
        """Extra summary entries: ``classes`` (with class folders), ``bad_samples`` (with skip)."""
        ds = self.dataset
        out = {"classes": ds.classes} if ds.classes is not None else {}
        if ds.skip:
            with ds._lock:
                out["bad_samples"] = [{"sample": i, "file": ds.files[i], "cause": why}
                                      for i, why in sorted(ds.bad.items())]
        return out


def open_images(cfg) -> ImageSource:
    """The ImageSource of ``cfg`` (a SourceConfig): ``path``, ``batch_size`` (0: 64), ``image_size``,
    ``resize``, ``layout``, ``bad_samples``, ``drop_last``."""
    folder = ImageFolder(cfg.path, cfg.image_size, cfg.resize, cfg.layout, cfg.bad_samples, cfg.decode, cfg.decoder)
    return ImageSource(folder, cfg.batch_size or DEFAULT_BATCH, cfg.drop_last)
