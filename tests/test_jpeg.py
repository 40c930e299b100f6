"""The JPEG path (NOTE [ JPEG path ] in pipeline/images/jpeg.py): simplejpeg's decode gives Pillow's pixels,
torch's resize torchvision's transform within one grey level; everything it does not take goes to Pillow
unchanged."""
import io

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.cli import main
from pipeline.images import jpeg
from pipeline.images.pillow import decode_file, load

pytest.importorskip("simplejpeg")  # (in the [images] extra: CI has it)


def photo(h: int, w: int) -> np.ndarray:
    """Smooth gradients and rings plus a little noise: compresses like a photograph (the same for a size)."""
    rng = np.random.default_rng(h * 1000 + w)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 60 * np.sin(x / (9 + c)) * np.cos(y / (13 + c)) + 40 * (x + c * y) / (w + h)
                    for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def save(arr: np.ndarray, path=None, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", **kw)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def reference(path, size, resize):
    """torchvision's evaluation transform on Pillow's RGB image (what its ImageFolder's loader gives)."""
    from torchvision import transforms
    t = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size)])
    with Image.open(path) as im:
        return np.asarray(t(im.convert("RGB")))


@pytest.mark.parametrize("kind, mode, kw", [
    ("photo", "RGB", {"quality": 90}),                   # 4:2:0, the usual
    ("photo", "RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
    ("photo", "L", {}),                                   # grayscale: RGB by replication, as Pillow's convert
    ("noise", "RGB", {"quality": 75, "subsampling": 1}),  # 4:2:2, noise
])
@pytest.mark.parametrize("hw, resize", [((75, 101), 40), ((90, 61), 52), ((200, 260), 48), ((300, 401), 36)])
def test_jpeg_path_gives_pillows_pixels_and_torchvisions_transform(tmp_path, kind, mode, kw, hw, resize):
    """The decode is Pillow's pixel for pixel (also at a reduced DCT scale: the last two sizes); the whole
    transform is the Pillow path's, and torchvision's Resize + CenterCrop's, within one level."""
    arr = photo(*hw) if kind == "photo" else np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    data = save(arr, tmp_path / "a.jpg", mode, **kw)
    got = jpeg.decode(data, resize)
    want = np.asarray(decode_file(tmp_path / "a.jpg", resize))
    assert got is not None and got.shape == want.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    assert (got.shape[0] < hw[0]) == (min(hw) >= 2 * resize)  # drafted exactly when Pillow drafts
    size = resize - 4
    fast, plain = load(str(tmp_path / "a.jpg"), size, resize), load(str(tmp_path / "a.jpg"), size, resize, "pillow")
    assert fast.shape == (size, size, 3) and fast.dtype == np.uint8 and fast.flags.writeable
    # torchvision's transform of the same decoded image (at the reduced scale too: Pillow's draft is ours)
    from torchvision import transforms
    want = np.asarray(transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size)])(
        decode_file(tmp_path / "a.jpg", resize)))
    np.testing.assert_allclose(fast, want, rtol=0, atol=1)
    assert (fast == want).mean() > 0.95  # (measured: 96.9% or more here; on the bench photos 99.8%)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=2)  # (each within one level of torchvision's)


@pytest.mark.parametrize("hw, size, resize", [((12, 9), 16, 20), ((40, 28), 24, 28), ((61, 45), 32, 32),
                                              ((30, 50), 24, 16)])
def test_upscaled_uncropped_and_padded_jpegs(tmp_path, hw, size, resize):
    """Upscaled, already R (a crop alone), R = S, and a crop larger than the image (Pillow's fit pads it
    with zeros): torchvision's transform within one level, or exactly the Pillow path's."""
    save(photo(*hw), tmp_path / "a.jpg", quality=95)
    fast, plain = load(str(tmp_path / "a.jpg"), size, resize), load(str(tmp_path / "a.jpg"), size, resize, "pillow")
    assert fast.shape == plain.shape == (size, size, 3)
    if resize < size:
        np.testing.assert_array_equal(fast, plain)
    else:
        np.testing.assert_allclose(fast, reference(tmp_path / "a.jpg", size, resize), rtol=0, atol=1)


def test_the_resize_runs_on_one_thread_in_a_build_thread():
    """A build thread's resize sets its own torch threads to 1 (two threads with two OpenMP teams each
    contend for the cores); the main thread's stay as they were."""
    import threading

    import torch
    before = torch.get_num_threads()
    seen = []
    t = threading.Thread(target=lambda: (jpeg.resample(photo(20, 30), 15, 10), seen.append(torch.get_num_threads())))
    t.start()
    t.join()
    jpeg.resample(photo(20, 30), 15, 10)
    assert seen == [1] and torch.get_num_threads() == before


def exif_jpeg(orientation: int, order: str = "<") -> bytes:
    """A JPEG whose APP1 holds an EXIF block with ``orientation`` (written by hand, in either byte order)."""
    import struct
    body = save(photo(20, 30))
    ifd = struct.pack(order + "H", 2) + struct.pack(order + "HHIHH", 0x010F, 2, 1, 0, 0) \
        + struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(order + "I", 0)
    tiff = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8) + ifd
    app1 = b"Exif\x00\x00" + tiff
    return body[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + body[2:]


@pytest.mark.parametrize("order", ["<", ">"])
def test_exif_orientation_is_read_and_a_rotated_jpeg_goes_to_pillow(tmp_path, order):
    """Orientation 1 stays on the JPEG path; any other goes to Pillow, which rotates it as before."""
    assert jpeg.orientation(exif_jpeg(1, order)) == 1 and jpeg.orientation(save(photo(8, 8))) == 1
    assert jpeg.orientation(exif_jpeg(6, order)) == 6
    assert jpeg.decode(exif_jpeg(1, order), 16) is not None
    assert jpeg.decode(exif_jpeg(6, order), 16) is None
    (tmp_path / "r.jpg").write_bytes(exif_jpeg(6, order))
    out = load(str(tmp_path / "r.jpg"), 16, 16)
    np.testing.assert_array_equal(out, load(str(tmp_path / "r.jpg"), 16, 16, "pillow"))
    with Image.open(tmp_path / "r.jpg") as im:
        assert im.size == (30, 20) and out.shape == (16, 16, 3)  # (rotated: 20 wide, 30 high, then cropped)


def test_unreadable_headers_and_other_colour_spaces_go_to_pillow(tmp_path):
    """A header this module can't walk, a CMYK JPEG and a non-JPEG: None here, Pillow's result in ``load``."""
    good = save(photo(16, 16))
    assert jpeg.orientation(good[:2] + b"\x00\x00" + good[2:]) == 0
    assert jpeg.orientation(good[:2] + b"\xff\xe1\x00\x10Exif\x00\x00XX\x00\x00" + good[2:]) == 0
    cmyk = save(photo(24, 32), tmp_path / "c.jpg", "CMYK")
    assert jpeg.decode(cmyk, 16) is None
    np.testing.assert_array_equal(load(str(tmp_path / "c.jpg"), 16, 20), load(str(tmp_path / "c.jpg"), 16, 20, "pillow"))
    Image.fromarray(photo(24, 32)).save(tmp_path / "p.png")
    assert jpeg.read(str(tmp_path / "p.png")) is None
    (tmp_path / "png-named.jpg").write_bytes((tmp_path / "p.png").read_bytes())  # a PNG named .jpg
    assert jpeg.read(str(tmp_path / "png-named.jpg")) is None
    np.testing.assert_array_equal(load(str(tmp_path / "png-named.jpg"), 16, 20),
                                  load(str(tmp_path / "p.png"), 16, 20))


def test_a_truncated_jpeg_fails_with_pillows_message(tmp_path):
    """simplejpeg refuses it; Pillow then fails it with the message it always gave, named in one line."""
    data = save(photo(64, 64))
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    msgs = []
    for decoder in ("auto", "pillow"):
        with pytest.raises(Exception) as e:
            load(str(tmp_path / "t.jpg"), 16, 20, decoder)
        msgs.append(f"{type(e.value).__name__}: {e.value}")
    assert msgs[0] == msgs[1] and "truncated" in msgs[0].lower()


def test_without_simplejpeg_pillow_decodes_and_the_notes_say_so(tmp_path, monkeypatch, capsys):
    """simplejpeg missing: the same pixels through Pillow, and one note naming the extra; source.decoder =
    "pillow" (a choice) gives no note; a wrong value exits 2 naming the key."""
    root = tmp_path / "a"
    root.mkdir()
    for i in range(3):
        save(photo(30, 40), root / f"im{i}.jpg")
    kw = {"workers": 0, "kernel": "sum", "progress": False, "image_size": 16, "batch_size": 2}
    fast = pipeline.run(input=str(root), **kw)
    assert not any("simplejpeg" in n for n in fast.summary["notes"])
    monkeypatch.setattr(jpeg, "module", lambda: None)
    slow = pipeline.run(input=str(root), **kw)
    assert slow.summary["checksum"] != fast.summary["checksum"]  # (another resampler: within one level)
    for a, b in zip(slow.results, fast.results):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-2)
    assert [n for n in slow.summary["notes"] if "simplejpeg" in n] == [
        "images: JPEGs decoded by Pillow: simplejpeg (libjpeg-turbo, faster) is not installed: "
        "pip install -e '.[images]'"]
    chosen = pipeline.run(input=str(root), decoder="pillow", **kw)
    assert chosen.summary["checksum"] == slow.summary["checksum"]
    assert not any("simplejpeg" in n for n in chosen.summary["notes"])
    assert main(["run", "--input", str(root), "--set", "source.decoder=turbo", "--no-progress"]) == 2
    assert "source.decoder" in capsys.readouterr().err


EXIT_SCRIPT = r"""
import sys, threading, time
import numpy as np
from pipeline.images import jpeg
from pipeline.local.builders import Builders
from pipeline.local.ring import SlotRing
from pipeline.sources.datasets import MapSource

big = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
started = threading.Event()

class Resizing:
    def __len__(self):
        return 64
    def __getitem__(self, i):
        started.set()
        jpeg.resample(big, 1000, 750)  # (about 30 ms in torch's C++, the GIL released)
        return {"x": np.float32(i)}

src = MapSource(Resizing(), batch_size=64)
ring = SlotRing(2, src.max_nbytes)
b = Builders(iter(src), None, ring, 2, lambda e: None)
b.submit(0)
started.wait(10)
time.sleep(0.1)
print("exiting with the build threads inside torch", flush=True)
"""


@pytest.mark.timeout(120)
def test_exit_with_build_threads_inside_torch_does_not_abort(tmp_path):
    """A run left unclosed (a Ctrl-C at the wrong moment) while its daemon build threads resize in torch:
    the interpreter exits cleanly, not "terminate called without an active exception" (builders.py stops
    them at exit)."""
    import subprocess
    import sys
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=90)
        assert "exiting" in p.stdout, p.stderr
        assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-2000:]
