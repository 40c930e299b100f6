"""Images: a folder of JPEG/PNG/WebP/BMP files as a map-style dataset, and the ``torchvision:NAME`` kernel.

``--input DIR`` where DIR holds images (``.jpg .jpeg .png .webp .bmp``, any depth, not hidden) and no
``.npy`` file is read as images (``source.kind = "images"``). The files are sorted by path (component by
component, so a class folder's files stay together, as torchvision's ``ImageFolder`` orders them); sample i
is file i, decoded with Pillow on a build thread (Pillow releases the GIL while it decodes and resizes) and
written straight into its row of the slot (NOTE [ Samples ] in sources.py)::

    {"image": uint8 (S, S, 3) (or (3, S, S) with layout "nchw"), "index": int64,
     "label": int64 (only for a folder of class folders), "valid": bool (only with bad_samples = "skip")}

The transform is torchvision's evaluation one: the shorter side resized to R (``source.resize``; 0 =
round(S * 256 / 224)), bilinear with antialiasing (PIL's), then the centre S x S (``source.image_size``)
cropped. A JPEG at least twice as large as R on its shorter side is decoded at a reduced DCT scale first
(``Image.draft``), keeping the shorter side >= R. Every mode becomes 8-bit RGB: EXIF orientation applied
(``ImageOps.exif_transpose``), 16-bit and 32-bit integer grayscale scaled down (>> 8), alpha dropped (as
torchvision's ``ImageFolder`` loader does: ``convert("RGB")``), L/P/CMYK/YCbCr converted by Pillow.

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

from . import decoding
from .errors import ConfigError, KernelError, SampleError
from .fields import Layout
from .sources import Batch, MapSource

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_BATCH = 64
EXTRA = "pip install -e '.[images]'"  # (from a checkout: the package index's `pipeline` is another project)


# what a failed batch's one line says to do about the file it names
BAD_FILE_HINT = " (fix or remove the file, or pass --bad-samples skip to compute the rest without it)"


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


def pil():
    """Pillow's Image and ImageOps modules, or ConfigError naming the extra."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ConfigError(f"reading a folder of images needs Pillow: {EXTRA}") from None
    return Image, ImageOps


class ImageFolder:
    """The images under ``root`` as a map-style dataset: ``len``, ``[i]`` -> the sample dict (see the
    module docstring), ``identity()`` for resume, ``classes`` (None without class folders)."""

    def __init__(self, root: str, image_size: int = 224, resize: int = 0, layout: str = "nhwc",
                 bad_samples: str = "fail", decode: str = "main"):
        if not os.path.isdir(root):
            raise ConfigError(f"--input {root}: not a directory of images")
        self.root, self.size = root, int(image_size)
        self.resize = int(resize) or round(self.size * 256 / 224)
        if self.resize < self.size:
            raise ConfigError(f"source.resize = {self.resize}: must be >= source.image_size ({self.size}): "
                              f"the shorter side is resized to it, then the centre is cropped")
        self.layout, self.skip, self.decode = layout, bad_samples == "skip", decode
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
            image = load(os.path.join(self.root, rel), self.size, self.resize)
        except Exception as e:  # noqa: BLE001 - the decoder's error: named, or the file skipped
            why = f"{type(e).__name__}: {e}"
            if not self.skip:
                raise SampleError(f"file {rel}: {why}{BAD_FILE_HINT}") from e
            with self._lock:
                self.bad[i] = why
            return self._sample(i, np.zeros((self.size, self.size, 3), np.uint8), False)
        return self._sample(i, image, True)

    # -- decode = "device": the files' bytes, decoded by the workers (NOTE [ Encoded batches ]) -----------
    def entries(self) -> np.ndarray:
        """Bytes each sample takes in an encoded batch (its path, a NUL, its file), from the files'
        sizes now: int64 (samples,). A file that has changed size when it is read is a bad file."""
        names = [len(f.encode()) + 1 for f in self.files]
        try:
            sizes = [os.stat(os.path.join(self.root, f)).st_size for f in self.files]
        except OSError as e:
            raise ConfigError(f"--input {self.root}: {e.filename}: {e.strerror or e}") from None
        self.sizes = np.asarray(sizes, np.int64)
        return np.asarray(names, np.int64) + self.sizes

    def read_into(self, views: dict, base: int, lo: int, hi: int) -> None:
        """Samples ``base + lo .. base + hi`` (rows lo..hi of an encoded batch whose ``offsets`` are already
        known) into ``views``: each one's path, a NUL and its file's bytes; ``index``, ``label``, ``valid``."""
        data, offs = views[decoding.ENCODED], views[decoding.OFFSETS]
        for row in range(lo, hi):
            i = base + row
            rel, at, end = self.files[i], int(offs[row]), int(offs[row + 1])
            name = rel.encode() + b"\0"
            data[at:at + len(name)] = np.frombuffer(name, np.uint8)
            why = _read_exactly(os.path.join(self.root, rel), data[at + len(name):end], int(self.sizes[i]))
            if why is not None and not self.skip:
                raise SampleError(f"file {rel}: {why}{BAD_FILE_HINT}")
            if why is not None:
                with self._lock:
                    self.bad[i] = why
                data[at + len(name):end] = 0
            views["index"][row] = i
            if self.labels is not None:
                views["label"][row] = self.labels[i]
            if self.skip:
                views["valid"][row] = why is None


def load(path, size: int, resize: int) -> np.ndarray:
    """One file (a path or a binary file object) as uint8 (size, size, 3): ``decode``, then ``fit``."""
    # asarray, then a copy: writable (DataLoader's collate wants it); np.array(im) reads the pixels twice
    return np.asarray(fit(decode(path, resize), size, resize)).copy()


def fit(im, size: int, resize: int):
    """A Pillow image with its shorter side resized to ``resize`` (bilinear, antialiased), centre cropped to
    ``size`` x ``size``: torchvision's ``Resize(resize)`` then ``CenterCrop(size)``. The resize computes the
    crop's window alone (Pillow's ``box``: about a quarter less work, and no crop to copy); the filter's
    weights are then computed from the window's offset, so about 0.1% of the values differ by one level
    from resizing the whole image (floating-point rounding; docs/data.md)."""
    Image, _ = pil()
    (w, h), (nw, nh) = im.size, resized(im.size, resize)
    left, top = crop_at((nw, nh), size)
    if (nw, nh) == (w, h) or left < 0 or top < 0:  # no resize; or a crop larger than the image: zeros
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        return im.crop((left, top, left + size, top + size))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
    return im.resize((size, size), Image.BILINEAR, box=box)


def decode(path, resize: int):
    """One file as an 8-bit RGB Pillow image, EXIF orientation applied; a JPEG at least ``2 * resize`` on
    its shorter side decoded at a reduced DCT scale (its shorter side stays >= ``resize``)."""
    Image, ImageOps = pil()
    with Image.open(path) as im:
        if im.format == "JPEG" and min(im.size) >= 2 * resize:
            im.draft("RGB", (resize, resize))  # DCT scaling: both sides stay >= resize
        im.load()
        # (in place: without an orientation to apply, as in most files, a copy of the whole decoded image
        # otherwise, under the GIL; the image stays usable once the with closes its file)
        ImageOps.exif_transpose(im, in_place=True)
        return _rgb(im, Image)


def resized(wh: tuple, resize: int) -> tuple[int, int]:
    """(width, height) after the shorter side is resized to ``resize`` (torchvision's ``Resize(int)``)."""
    w, h = wh
    return (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)


def crop_at(wh: tuple, size: int) -> tuple[int, int]:
    """(left, top) of the centre ``size`` x ``size`` crop of a (width, height) image (``CenterCrop``)."""
    return int(round((wh[0] - size) / 2.0)), int(round((wh[1] - size) / 2.0))


def _read_exactly(path: str, out: np.ndarray, size: int) -> str | None:
    """The file's ``size`` bytes into ``out``; None, or why not (unreadable, or it changed size)."""
    try:
        with open(path, "rb", buffering=0) as f:
            view, got = memoryview(out), 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            more = f.read(1)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    if got != size or more:
        return (f"OSError: the file changed size since the folder was listed ({size} bytes then, "
                f"{'more' if more else got} now): run again")
    return None


def _rgb(im, Image):
    """``im`` as 8-bit RGB: 16/32-bit integer grayscale scaled >> 8 (Pillow would clip it), alpha dropped."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip(a >> 8, 0, 255).astype(np.uint8), "L")
    elif im.mode not in ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La"):
        raise ValueError(f"unsupported image mode {im.mode!r}")
    return im.convert("RGB")


class ImageSource(MapSource):
    """An ImageFolder batched (``MapSource``), with each batch's files for its manifest line and the
    classes and bad files for the summary; with ``decode = "device"`` its batches are the files' bytes
    (NOTE [ Encoded batches ] in decoding.py), decoded by the workers."""

    def __init__(self, dataset: ImageFolder, batch_size: int = DEFAULT_BATCH, drop_last: bool = False):
        super().__init__(dataset, batch_size, drop_last)
        if dataset.decode == "device":
            self.starts = np.concatenate([[0], np.cumsum(dataset.entries())])  # sample i's bytes: starts[i]..
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
        fields = {decoding.ENCODED: (np.uint8, (nbytes,)), decoding.OFFSETS: (np.int64, (rows + 1,)),
                  decoding.TRANSFORM: (np.int64, (3,)), "index": (np.int64, (rows,))}
        if self.dataset.labels is not None:
            fields["label"] = (np.int64, (rows,))
        if self.dataset.skip:
            fields["valid"] = (np.bool_, (rows,))
        return Layout.make("dict", tuple(fields), [s for _, s in fields.values()], [d for d, _ in fields.values()])

    def batch(self, index: int) -> Batch:
        if self.dataset.decode != "device":
            return super().batch(index)
        layout, rows, base = self.encoded_layout(index), self.rows_of(index), index * self.batch_size
        ds = self.dataset

        def fill_rows(views, lo, hi):
            views[decoding.OFFSETS][lo:hi + 1] = self.starts[base + lo:base + hi + 1] - self.starts[base]
            if lo == 0:
                views[decoding.TRANSFORM][:] = (ds.size, ds.resize, ds.layout == "nchw")
            ds.read_into(views, base, lo, hi)
        return Batch(index, layout, lambda out: fill_rows(out, 0, rows), layout.nbytes, rows, fill_rows)

    def record_bad(self, bad: dict) -> None:
        """Bad files found where the batch was decoded (a worker, with decode = "device"): {sample: why}."""
        with self.dataset._lock:
            self.dataset.bad.update({int(i): why for i, why in bad.items()})

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
        with self.dataset._lock:
            self.dataset.bad.update(found)

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
    folder = ImageFolder(cfg.path, cfg.image_size, cfg.resize, cfg.layout, cfg.bad_samples, cfg.decode)
    return ImageSource(folder, cfg.batch_size or DEFAULT_BATCH, cfg.drop_last)


def pixel_means(batch):
    """A cheap kernel for image batches (``configs/bench-images.toml``: the loading decides): each image's
    mean pixel value (float32), and the batch's 1-D fields (``index``, ``label``, ``valid``) passed through."""
    img = batch["image"]
    out = {"mean": img.reshape(img.shape[0], -1).float().mean(1)}
    out.update({k: v for k, v in batch.items() if k != "image" and v.ndim == 1})
    return out


# -- the torchvision:NAME kernel -------------------------------------------------------------------------
PREFIX = "torchvision:"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_models(name: str):
    """``torchvision.models`` after checking that it has ``name``: KernelError naming the extra or the
    known models."""
    try:
        import torchvision.models as models
    except ImportError:
        raise KernelError(f"kernel '{PREFIX}{name}' needs torchvision: {EXTRA}") from None
    known = models.list_models()
    if name not in known:
        raise KernelError(f"kernel '{PREFIX}{name}': torchvision.models has no model {name!r} "
                          f"(e.g. {', '.join(k for k in ('resnet18', 'resnet50', 'vit_b_16') if k in known)})")
    return models


class TorchVision:
    """A ``torchvision.models`` model on the worker's device, in eval mode: random weights seeded by
    ``seed`` (nothing downloaded), or ``weights = PATH`` (a local state dict). A batch's uint8 ``image``
    field (NHWC or NCHW) is normalised with the ImageNet mean and std on the device; the result is
    ``{"logits", "top5"}`` plus the batch's 1-D fields (``index``, ``label``, ``valid``) passed through."""

    def setup(self, device, model: str = "", seed: int = 0, weights: str = "", top: int = 5, **kwargs):
        import torch
        models = torchvision_models(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = models.get_model(model, weights=None, **kwargs)
        if weights:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
            except Exception as e:  # noqa: BLE001 - the user's file: one line naming it
                raise KernelError(f"kernel '{PREFIX}{model}': weights = {weights!r}: "
                                  f"{type(e).__name__}: {e}") from e
        self.net = net.to(device).eval()
        self.top = int(top)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch):
        import torch
        x = batch["image"] if isinstance(batch, dict) else batch
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
            raise KernelError(f"kernel '{PREFIX}...': expects uint8 images (B, S, S, 3) or (B, 3, S, S), "
                              f"got {tuple(x.shape)}")
        with torch.inference_mode():
            if x.shape[1] != 3:
                x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels_last memory)
            x = (x.float() - self.mean) / self.std
            logits = self.net(x).float()
            out = {"logits": logits, "top5": logits.topk(min(self.top, logits.shape[1]), dim=1).indices}
        if isinstance(batch, dict):
            out.update({k: v for k, v in batch.items() if k != "image" and v.ndim == 1})
        return out
