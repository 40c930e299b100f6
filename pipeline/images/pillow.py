"""Pillow's decode and torchvision's evaluation transform, for one image file (on a build thread: Pillow
releases the GIL while it decodes and resizes).

The transform: the shorter side resized to R (bilinear with antialiasing, PIL's), then the centre S x S
cropped (``fit``). A JPEG at least twice as large as R on its shorter side is decoded at a reduced DCT
scale first (``Image.draft``), keeping the shorter side >= R. Every mode becomes 8-bit RGB: EXIF
orientation applied (``ImageOps.exif_transpose``), 16-bit and 32-bit integer grayscale scaled down
(>> 8), alpha dropped (as torchvision's ``ImageFolder`` loader does: ``convert("RGB")``), L/P/CMYK/YCbCr
converted by Pillow.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from . import jpeg

EXTRA = "pip install -e '.[images]'"  # (from a checkout: the package index's `pipeline` is another project)
# what a failed batch's one line says to do about the file it names
BAD_FILE_HINT = " (fix or remove the file, or pass --bad-samples skip to compute the rest without it)"


def pil():
    """Pillow's Image and ImageOps modules, or ConfigError naming the extra."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ConfigError(f"reading a folder of images needs Pillow: {EXTRA}") from None
    return Image, ImageOps


def load(path, size: int, resize: int, decoder: str = "auto") -> np.ndarray:
    """One file (a path or a binary file object) as uint8 (size, size, 3): a plain JPEG decoded by
    simplejpeg and resized by torch (NOTE [ JPEG path ] in jpeg.py) unless ``decoder`` is "pillow"; any
    other file ``decode_file`` then ``fit``."""
    data = jpeg.read(path) if decoder == "auto" else None
    pixels = jpeg.decode(data, resize) if data is not None else None
    if pixels is not None:
        return fit_pixels(pixels, size, resize)
    # asarray, then a copy: writable (DataLoader's collate wants it); np.array(im) reads the pixels twice
    return np.asarray(fit(decode_file(path, resize), size, resize)).copy()


def fit_pixels(pixels: np.ndarray, size: int, resize: int) -> np.ndarray:
    """``fit`` for decoded uint8 (h, w, 3) pixels: resized by torch (``jpeg.resample``), centre cropped; a
    writable view (its row of the batch is the copy). A crop larger than the image goes to ``fit``, which
    pads it with zeros."""
    (w, h) = (pixels.shape[1], pixels.shape[0])
    nw, nh = resized((w, h), resize)
    left, top = crop_at((nw, nh), size)
    if left < 0 or top < 0:
        Image, _ = pil()
        return np.asarray(fit(Image.fromarray(pixels), size, resize)).copy()
    x = jpeg.resample(pixels, nw, nh).numpy() if (nw, nh) != (w, h) else pixels
    return x[top:top + size, left:left + size]


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


def decode_file(path, resize: int):
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
