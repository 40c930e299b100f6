"""``--decode device``: image batches that travel as the files' bytes and are decoded by the worker.

NOTE [ Encoded batches ]
With ``source.decode = "device"`` the main's build threads only read each image file into the slot; a
batch is then (fields.py, NOTE [ Layout ]: fixed shapes per batch)::

    {"encoded_images": uint8 (N,)      per sample: its path relative to DIR (UTF-8), a NUL, the file's bytes
     "encoded_offsets": int64 (B+1,)   sample i is encoded_images[offsets[i]:offsets[i+1]]
     "encoded_transform": int64 (4,)   image size S, resize R, 1 for the nchw layout, 1 for source.decoder "auto"
     "index": int64 (B,), "label": int64 (B,) (class folders), "valid": bool (B,) (bad_samples = "skip")}

N is this batch's own total, from the files' sizes when the folder was listed (a file that has changed
size by the time it is read is a bad file), so the slots need no fixed capacity per image. They hold the
largest batch, or twice the median batch when a few huge files make that larger; such a batch travels
pickled (the summary's handoff line counts it, and a note says to raise ``handoff.slot_mb``).

Every place that computes a batch calls ``Computer`` (compute.py), which calls ``decode_batch`` here first: the
kernel sees the same fields as with ``decode = "main"`` (``image`` uint8 (B, S, S, 3) or (B, 3, S, S) on
the worker's device, then ``index``, ``label``, ``valid``). On CUDA, JPEGs that are plain RGB or grayscale
with no EXIF rotation are decoded together with nvJPEG (``torchvision.io.decode_jpeg(list, device=...)``);
every other file, and every file on a CPU worker, is decoded with Pillow by the same rules as the main's
(``pillow.decode_file``: EXIF orientation, 8-bit RGB, reduced-scale decode of a large JPEG). Then, on the
device, the shorter side is resized to R (``interpolate``, bilinear, antialiased) and the centre S x S
cropped: the same sizes and offsets as Pillow's resize and crop in the main, but a different resampler,
so the pixels differ by a grey level or so (README: the tolerance). A file that can't be decoded fails
the batch naming it (a ``SampleError``), or with ``valid`` in the batch becomes a zero image with
``valid = False``, reported in the result's timings as ``bad_samples`` (the main lists them).
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch

from ..errors import ConfigError, SampleError
from ..fields import Layout
from . import jpeg
from .pillow import BAD_FILE_HINT, crop_at, decode_file, pil, resized

ENCODED, OFFSETS, TRANSFORM = "encoded_images", "encoded_offsets", "encoded_transform"


# -- the writer: the main's build threads read each file into its row ---------------------------------------
def entries(folder) -> np.ndarray:
    """Bytes each sample of ``folder`` (an ImageFolder) takes in an encoded batch (its path, a NUL, its
    file), from the files' sizes now: int64 (samples,). Keeps the sizes in ``folder.sizes``: a file that has
    changed size when it is read is a bad file."""
    names = [len(f.encode()) + 1 for f in folder.files]
    try:
        sizes = [os.stat(os.path.join(folder.root, f)).st_size for f in folder.files]
    except OSError as e:
        raise ConfigError(f"--input {folder.root}: {e.filename}: {e.strerror or e}") from None
    folder.sizes = np.asarray(sizes, np.int64)
    return np.asarray(names, np.int64) + folder.sizes


def layout(rows: int, nbytes: int, labels: bool, valid: bool) -> Layout:
    """An encoded batch of ``rows`` samples and ``nbytes`` of entries: its fields and their shapes."""
    fields = {ENCODED: (np.uint8, (nbytes,)), OFFSETS: (np.int64, (rows + 1,)), TRANSFORM: (np.int64, (4,)),
              "index": (np.int64, (rows,))}
    if labels:
        fields["label"] = (np.int64, (rows,))
    if valid:
        fields["valid"] = (np.bool_, (rows,))
    return Layout.make("dict", tuple(fields), [s for _, s in fields.values()], [d for d, _ in fields.values()])


def fill_rows(folder, starts: np.ndarray, views: dict, base: int, lo: int, hi: int) -> None:
    """Rows ``lo .. hi`` of the encoded batch whose first sample is ``base`` into ``views``: offsets (from
    ``starts``, each sample's first byte in the whole listing), the transform, and per sample its path, a
    NUL and its file's bytes; ``index``, ``label``, ``valid``."""
    views[OFFSETS][lo:hi + 1] = starts[base + lo:base + hi + 1] - starts[base]
    if lo == 0:
        views[TRANSFORM][:] = (folder.size, folder.resize, folder.layout == "nchw", folder.decoder == "auto")
    data, offs = views[ENCODED], views[OFFSETS]
    for row in range(lo, hi):
        i = base + row
        rel, at, end = folder.files[i], int(offs[row]), int(offs[row + 1])
        name = rel.encode() + b"\0"
        data[at:at + len(name)] = np.frombuffer(name, np.uint8)
        why = _read_exactly(os.path.join(folder.root, rel), data[at + len(name):end], int(folder.sizes[i]))
        if why is not None and not folder.skip:
            raise SampleError(f"file {rel}: {why}{BAD_FILE_HINT}")
        if why is not None:
            folder.found_bad({i: why})
            data[at + len(name):end] = 0
        views["index"][row] = i
        if folder.labels is not None:
            views["label"][row] = folder.labels[i]
        if folder.skip:
            views["valid"][row] = why is None


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



# -- the reader: the worker decodes before the kernel ------------------------------------------------------
def is_encoded(batch) -> bool:
    return isinstance(batch, dict) and ENCODED in batch


def decode_batch(batch: dict, device: torch.device, index: int = -1) -> tuple[dict, dict]:
    """An encoded batch as the batch the kernel sees (``image`` a tensor on ``device``, the other fields
    as they are), and ``{sample: why}`` for the files that could not be decoded (``valid`` False)."""
    data, offs = batch[ENCODED], batch[OFFSETS]
    size, resize, nchw, fast = (int(v) for v in batch[TRANSFORM])
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
                images[i] = _cpu(blobs[i], resize, names[i], fast).to(device)
            except Exception as e:  # noqa: BLE001 - the decoder's error: named, or the file skipped
                failed[i] = f"{type(e).__name__}: {e}"
    if failed and valid is None:
        i = min(failed)
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


def _cpu(blob: np.ndarray, resize: int, name: str, fast: bool) -> torch.Tensor:
    """One file decoded on the CPU by the main's rules: a plain JPEG by simplejpeg when ``fast``
    (NOTE [ JPEG path ] in jpeg.py), else Pillow (``pillow.decode_file``): uint8 (3, h, w)."""
    pixels = jpeg.decode(blob, resize) if fast else None
    if pixels is None:
        pixels = np.array(decode_file(_File(memoryview(blob), name), resize))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _plain_jpeg(blob: np.ndarray) -> bool:
    """A JPEG nvJPEG decodes as the main would: RGB or grayscale, no EXIF rotation (its header only)."""
    if blob[:3].tobytes() != jpeg.JPEG:
        return False
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

