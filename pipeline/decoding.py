"""``--decode device``: image batches that travel as the files' bytes and are decoded by the worker.

NOTE [ Encoded batches ]
With ``source.decode = "device"`` the main's build threads only read each image file into the slot; a
batch is then (fields.py, NOTE [ Layout ]: fixed shapes per batch)::

    {"encoded_images": uint8 (N,)      per sample: its path relative to DIR (UTF-8), a NUL, the file's bytes
     "encoded_offsets": int64 (B+1,)   sample i is encoded_images[offsets[i]:offsets[i+1]]
     "encoded_transform": int64 (3,)   image size S, resize R, 1 for the nchw layout
     "index": int64 (B,), "label": int64 (B,) (class folders), "valid": bool (B,) (bad_samples = "skip")}

N is this batch's own total, from the files' sizes when the folder was listed (a file that has changed
size by the time it is read is a bad file), so the slots need no fixed capacity per image. They hold the
largest batch, or twice the median batch when a few huge files make that larger; such a batch travels
pickled (the summary's handoff line counts it, and a note says to raise ``handoff.slot_mb``).

Every place that computes a batch calls ``Computer`` (worker.py), which calls ``decode`` here first: the
kernel sees the same fields as with ``decode = "main"`` (``image`` uint8 (B, S, S, 3) or (B, 3, S, S) on
the worker's device, then ``index``, ``label``, ``valid``). On CUDA, JPEGs that are plain RGB or grayscale
with no EXIF rotation are decoded together with nvJPEG (``torchvision.io.decode_jpeg(list, device=...)``);
every other file, and every file on a CPU worker, is decoded with Pillow by the same rules as the main's
(``images.decode``: EXIF orientation, 8-bit RGB, reduced-scale decode of a large JPEG). Then, on the
device, the shorter side is resized to R (``interpolate``, bilinear, antialiased) and the centre S x S
cropped: the same sizes and offsets as Pillow's resize and crop in the main, but a different resampler,
so the pixels differ by a grey level or so (README: the tolerance). A file that can't be decoded fails
the batch naming it (a ``SampleError``), or with ``valid`` in the batch becomes a zero image with
``valid = False``, reported in the result's timings as ``bad_samples`` (the main lists them).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from .errors import SampleError

ENCODED, OFFSETS, TRANSFORM = "encoded_images", "encoded_offsets", "encoded_transform"
JPEG = b"\xff\xd8\xff"


def is_encoded(batch) -> bool:
    return isinstance(batch, dict) and ENCODED in batch


def decode(batch: dict, device: torch.device, index: int = -1) -> tuple[dict, dict]:
    """An encoded batch as the batch the kernel sees (``image`` a tensor on ``device``, the other fields
    as they are), and ``{sample: why}`` for the files that could not be decoded (``valid`` False)."""
    data, offs = batch[ENCODED], batch[OFFSETS]
    size, resize, nchw = (int(v) for v in batch[TRANSFORM])
    valid = batch.get("valid")
    names, blobs = [], []
    for i in range(len(offs) - 1):
        entry = data[int(offs[i]):int(offs[i + 1])]
        cut = int(np.argmax(entry == 0))  # the NUL after the path (a path never holds one)
        names.append(entry[:cut].tobytes().decode())
        blobs.append(entry[cut + 1:])
    todo = [i for i in range(len(blobs)) if valid is None or valid[i]]
    images: dict[int, torch.Tensor] = {}
    failed: dict[int, str] = {}
    if device.type == "cuda":
        images.update(_nvjpeg([i for i in todo if _plain_jpeg(blobs[i])], blobs, device))
    for i in todo:
        if i not in images:
            try:
                images[i] = _pillow(blobs[i], resize, names[i]).to(device)
            except Exception as e:  # noqa: BLE001 - the decoder's error: named, or the file skipped
                failed[i] = f"{type(e).__name__}: {e}"
    if failed and valid is None:
        i = min(failed)
        from .images import BAD_FILE_HINT
        raise SampleError(f"sample {int(batch['index'][i])} (batch {index}): file {names[i]}: {failed[i]}"
                          f"{BAD_FILE_HINT}")
    out = torch.zeros((len(blobs), 3, size, size), dtype=torch.uint8, device=device)
    for i, x in images.items():
        out[i] = transform(x, size, resize)
    decoded = {"image": out if nchw else out.permute(0, 2, 3, 1).contiguous(), "index": batch["index"]}
    if "label" in batch:
        decoded["label"] = batch["label"]
    bad = {}
    if valid is not None:
        ok = valid.copy()
        for i, why in failed.items():
            ok[i] = False
            bad[int(batch["index"][i])] = why
        decoded["valid"] = ok
    return decoded, bad


def transform(x: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """uint8 (3, h, w) -> (3, size, size): shorter side to ``resize`` (bilinear, antialiased, as Pillow's
    resize in the main: the same output size), then the centre crop (the same offsets)."""
    from .images import crop_at, resized
    h, w = x.shape[1:]
    nw, nh = resized((w, h), resize)
    if (nw, nh) != (w, h):
        y = torch.nn.functional.interpolate(x[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                                            align_corners=False)[0]
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    left, top = crop_at((nw, nh), size)
    return x[:, top:top + size, left:left + size]


class _File(io.BytesIO):
    """A file's bytes, named as the file in Pillow's messages ("cannot identify image file 'a/b.png'")."""

    def __init__(self, data, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def _pillow(blob: np.ndarray, resize: int, name: str) -> torch.Tensor:
    """One file decoded with Pillow by the main's rules (``images.decode``): uint8 (3, h, w) on the CPU."""
    from .images import decode as pil_decode
    im = pil_decode(_File(memoryview(blob), name), resize)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _plain_jpeg(blob: np.ndarray) -> bool:
    """A JPEG nvJPEG decodes as the main would: RGB or grayscale, no EXIF rotation (its header only)."""
    if blob[:3].tobytes() != JPEG:
        return False
    from .images import pil
    Image, _ = pil()
    try:
        with Image.open(io.BytesIO(memoryview(blob))) as im:
            return im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - Pillow decodes it (and names what is wrong) below
        return False


def _nvjpeg(which: list[int], blobs: list, device: torch.device) -> dict[int, torch.Tensor]:
    """Samples ``which`` decoded on ``device`` with nvJPEG, in one batched call; when that call fails (a
    corrupt file fails it whole), one by one, and those that still fail are left to Pillow."""
    if not which:
        return {}
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return {}  # Pillow decodes them all
    tensors = [torch.from_numpy(blobs[i] if blobs[i].flags.writeable else blobs[i].copy()) for i in which]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            got = dict(zip(which, decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)))
        except Exception:  # noqa: BLE001 - one corrupt file fails the batched call: find it
            got = {}
            for i, t in zip(which, tensors):
                try:
                    got[i] = decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
                except Exception:  # noqa: BLE001 - left to Pillow, which names what is wrong
                    pass
    torch.cuda.current_stream(device).synchronize()  # nothing reads the slot's bytes after this
    return got

