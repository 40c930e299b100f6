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
decoded in build processes are not seen there, see the README).
"""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np

from .errors import ConfigError, KernelError, SampleError
from .fields import Layout
from .sources import MapSource

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_BATCH = 64
EXTRA = "pip install 'pipeline[images]'"


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
                 bad_samples: str = "fail"):
        if not os.path.isdir(root):
            raise ConfigError(f"--input {root}: not a directory of images")
        self.root, self.size = root, int(image_size)
        self.resize = int(resize) or round(self.size * 256 / 224)
        if self.resize < self.size:
            raise ConfigError(f"source.resize = {self.resize}: must be >= source.image_size ({self.size}): "
                              f"the shorter side is resized to it, then the centre is cropped")
        self.layout, self.skip = layout, bad_samples == "skip"
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
                "layout": self.layout, "labels": self.classes is not None, "bad_samples": "skip" if self.skip else "fail"}

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
                raise SampleError(f"file {rel}: {why}") from e
            with self._lock:
                self.bad[i] = why
            return self._sample(i, np.zeros((self.size, self.size, 3), np.uint8), False)
        return self._sample(i, image, True)


def load(path: str, size: int, resize: int) -> np.ndarray:
    """One file as uint8 (size, size, 3): decoded (reduced-scale for a large JPEG), EXIF orientation
    applied, 8-bit RGB, shorter side resized to ``resize`` (bilinear, antialiased), centre cropped."""
    Image, ImageOps = pil()
    with Image.open(path) as im:
        if im.format == "JPEG" and min(im.size) >= 2 * resize:
            im.draft("RGB", (resize, resize))  # DCT scaling: both sides stay >= resize
        im.load()
        im = _rgb(ImageOps.exif_transpose(im), Image)
    w, h = im.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)))


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
    classes and bad files for the summary."""

    def _first_sample(self):
        return self.dataset.template()  # the layout needs no decode: a bad first file fails its batch

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
    folder = ImageFolder(cfg.path, cfg.image_size, cfg.resize, cfg.layout, cfg.bad_samples)
    return ImageSource(folder, cfg.batch_size or DEFAULT_BATCH, cfg.drop_last)


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
