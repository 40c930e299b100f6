"""The fast path for JPEG files: libjpeg-turbo through ``simplejpeg`` (in the ``[images]`` extra).

NOTE [ JPEG path ]
A JPEG whose pixels need nothing but a decode (YCbCr, RGB or grayscale; no EXIF orientation other than 1)
is decoded by ``simplejpeg`` into a numpy array, then resized by torch's uint8 bilinear with antialiasing
(``resample``) and centre-cropped. Both were measured against Pillow on the build threads of a 2-core VM
(docs/benchmarks.md, "Images at the decoder's limit"): simplejpeg holds no GIL for the whole decode, from
the bytes in memory (Pillow's decoder is fed 64 KB at a time from Python, taking the GIL between feeds),
and decoded an ImageNet-sized JPEG in 0.8x Pillow's time; torch's resize took half the time of Pillow's
(even of Pillow's resize of the crop's window alone) and scales over threads once each build thread runs
it on one thread (its own OpenMP team per calling thread, else two teams contend for two cores).

The decoded pixels are Pillow's: the same libjpeg-turbo with the same settings (the accurate integer IDCT,
fancy upsampling), and for a JPEG at least 2R on its shorter side the same reduced DCT scale that Pillow's
``draft`` picks (1/2, 1/4 or 1/8). Tests hold the decode to Pillow's pixels exactly, and the transform to
torchvision's ``Resize`` + ``CenterCrop`` (Pillow's resampler) within one grey level, on photographs and
on noise, as the Pillow path is held.

Everything else takes Pillow's path unchanged (``pillow.decode_file``): other formats, CMYK and YCCK JPEGs,
an EXIF rotation, a header this module can't read, a file simplejpeg rejects (Pillow then decodes it, or
fails it with the same message as before). Without simplejpeg every file takes Pillow's path, and the
run's notes say so, naming the extra (``ImageSource.notes``).
"""
from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch

JPEG = b"\xff\xd8\xff"
SUFFIXES = (".jpg", ".jpeg")
COLOURS = ("YCbCr", "RGB", "Gray")  # simplejpeg's names of the colour spaces this path decodes


@functools.lru_cache(maxsize=None)
def module():
    """``simplejpeg``, or None when it is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def read(path) -> bytes | None:
    """The bytes of a JPEG file for ``decode`` (a path with a JPEG suffix, or a BytesIO), or None: not a
    JPEG, or simplejpeg missing (Pillow reads the file itself)."""
    if module() is None:
        return None
    if isinstance(path, (str, os.PathLike)):
        if not os.fspath(path).lower().endswith(SUFFIXES):
            return None
        with open(path, "rb") as f:
            data = f.read()
    elif hasattr(path, "getbuffer"):  # (a BytesIO: its buffer, the position left for Pillow)
        data = path.getbuffer()
    else:  # (another file object goes to Pillow whole)
        return None
    return data if bytes(data[:3]) == JPEG else None


def decode(data, resize: int) -> np.ndarray | None:
    """A plain JPEG's bytes as uint8 (h, w, 3) RGB, at Pillow's ``draft`` scale for ``resize``; None when the
    file takes Pillow's path (not a JPEG, not plain, simplejpeg missing: NOTE [ JPEG path ])."""
    sj = module()
    if sj is None or bytes(data[:3]) != JPEG:
        return None
    try:
        h, w, colour, _ = sj.decode_jpeg_header(data)
    except ValueError:
        return None  # (Pillow decodes it, or names what is wrong)
    if colour not in COLOURS or orientation(data) != 1:
        return None
    scale = 1
    if min(w, h) >= 2 * resize:  # as pillow.decode_file's draft: both sides stay >= resize
        k = min(w // resize, h // resize)
        scale = 8 if k >= 8 else 4 if k >= 4 else 2
    want = (-(-h // scale), -(-w // scale))
    try:
        out = sj.decode_jpeg(data, colorspace="RGB", min_height=want[0], min_width=want[1])
    except ValueError:
        return None
    return out if out.shape[:2] == want else None  # (a scale other than draft's: Pillow's path)


_threads = threading.local()


def resample(pixels: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 (h, w, 3) -> uint8 (height, width, 3): torch's bilinear with antialiasing, on one thread when
    called from any thread but the main one (NOTE [ JPEG path ])."""
    if not getattr(_threads, "one", False) and threading.current_thread() is not threading.main_thread():
        # (this thread's OpenMP team; torch also takes 1 as the default of threads that start later, while
        # those already running, the main's and a Ray actor's kernel thread, keep theirs)
        torch.set_num_threads(1)
        _threads.one = True
    # (a view, channels last with the batch's stride whole: torch then takes its uint8 fast path and gives
    # channels last back, so the crop of the result is rows of contiguous pixels; a (3, h, w) view made a
    # batch of one afterwards has a batch stride torch reads as another layout: 1.6x the time)
    x = torch.from_numpy(pixels)[None].permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                        align_corners=False)
    return y[0].permute(1, 2, 0)


def orientation(data) -> int:
    """The EXIF orientation in a JPEG's APP1 segment: 1 without one; 0 when the header can't be read."""
    b = memoryview(data)
    i, n = 2, len(b)
    try:
        while i + 4 <= n:
            if b[i] != 0xFF:
                return 0
            marker = b[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            if marker in (0xDA, 0xD9):  # the image data: no EXIF came before it
                return 1
            length = int.from_bytes(b[i + 2:i + 4], "big")
            if marker == 0xE1 and bytes(b[i + 4:i + 10]) == b"Exif\x00\x00":
                return _tiff_orientation(b[i + 10:i + 2 + length])
            i += 2 + length
    except (IndexError, ValueError):
        return 0
    return 1


def _tiff_orientation(t) -> int:
    """Tag 0x0112 of the first IFD of a TIFF block (EXIF): 1 when absent, 0 when unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(t[:2]))
    if order is None or len(t) < 8:
        return 0

    def num(at: int, size: int) -> int:
        if at + size > len(t):
            raise ValueError("past the segment")
        return int.from_bytes(t[at:at + size], order)
    ifd = num(4, 4)
    for k in range(num(ifd, 2)):
        e = ifd + 2 + 12 * k
        if num(e, 2) == 0x0112:
            return num(e + 8, 2) if num(e + 2, 2) == 3 else 0  # (a SHORT, as the standard has it)
    return 1
