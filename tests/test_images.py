"""Images: a folder of JPEG/PNG/... as input, its transform, modes, labels, bad files, outputs, the kernel."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.cli import main
from pipeline.images import ImageFolder
from pipeline.images import jpeg
from pipeline.images.pillow import load
from pipeline.runner import resolve
from pipeline.sources.factory import open_source as make_source

RNG = np.random.default_rng(0)


def rgb(h=24, w=32):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def folder(root, n=5, classes=None, ext="png"):
    """``n`` tiny images under ``root`` (one per class folder in turn when ``classes`` is given)."""
    root.mkdir(exist_ok=True)
    for i in range(n):
        d = root / classes[i % len(classes)] if classes else root
        d.mkdir(exist_ok=True)
        Image.fromarray(rgb()).save(d / f"im{i:02d}.{ext}")
    return root


def reference(path, size, resize):
    """torchvision's evaluation transform on Pillow's RGB image (what ImageFolder's loader gives)."""
    from torchvision import transforms
    t = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size)])
    with Image.open(path) as im:
        return np.asarray(t(im.convert("RGB")))


def run(root, **kw):
    kw = {"workers": 0, "kernel": "sum", "progress": False, "image_size": 16, "batch_size": 2, **kw}
    return pipeline.run(input=str(root), **kw)


def test_folder_of_images_is_detected_as_images_kind(tmp_path):
    """A folder of images (and no .npy) is source.kind images; one with a .npy stays npy."""
    folder(tmp_path / "a", 2)
    assert resolve(None, {"input": str(tmp_path / "a")}).source.kind == "images"
    np.save(tmp_path / "a" / "x.npy", np.zeros(3))
    assert resolve(None, {"input": str(tmp_path / "a")}).source.kind == "npy"


def test_sizes_crop_and_layout_nchw_match_torchvision(tmp_path):
    """Shorter side to R, centre S x S, as torchvision's Resize + CenterCrop to within one level (the crop's
    window alone is resampled: Pillow takes its offset as float32); nchw is its transpose."""
    root = folder(tmp_path / "a", 3)
    files = sorted(root.iterdir())
    src = make_source(resolve(None, {"input": str(root), "image_size": 16, "resize": 20}).source)
    b = src.get(0)
    assert b["image"].shape == (3, 16, 16, 3) and b["image"].dtype == np.uint8 and src.batch_size == 64
    assert b["index"].tolist() == [0, 1, 2] and b["index"].dtype == np.int64 and set(b) == {"image", "index"}
    want = np.stack([reference(f, 16, 20) for f in files])
    np.testing.assert_allclose(b["image"], want, rtol=0, atol=1)
    assert (b["image"] == want).mean() > 0.85  # noise images: 8% off by one; photographs: about 0.1%
    n = make_source(resolve(None, {"input": str(root), "image_size": 16, "resize": 20, "layout": "nchw"}).source)
    np.testing.assert_array_equal(n.get(0)["image"], b["image"].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("wh, size, resize", [
    ((61, 45), 32, 37),    # downscaled: the window alone is resampled
    ((12, 9), 16, 20),     # upscaled
    ((40, 28), 24, 28),    # the shorter side already R: a crop only
    ((30, 50), 24, 16),    # R < S: the crop is larger than the image, zeros around it
    ((45, 61), 32, 32),    # R = S: the window spans the whole width (its right edge clamped to the image)
    ((331, 17), 16, 16),   # the same on the other side, a long image
])
def test_fit_is_resize_then_centre_crop(wh, size, resize):
    """``fit`` (the crop's window resampled) gives Resize(R) + CenterCrop(S)'s pixels to within one level,
    its size always S x S, and where nothing needs resampling exactly Pillow's resize and crop."""
    from pipeline.images.pillow import crop_at, fit, resized
    rng = np.random.default_rng(sum(wh))
    y, x = np.mgrid[0:wh[1], 0:wh[0]]
    smooth = (128 + 100 * np.sin(x / 5.0)[..., None] * np.cos(y / 7.0)[..., None] + rng.normal(0, 8, (wh[1], wh[0], 3)))
    im = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8))
    nw, nh = resized(im.size, resize)
    left, top = crop_at((nw, nh), size)
    whole = np.asarray(im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size)))
    got = np.asarray(fit(im, size, resize))
    assert got.shape == (size, size, 3)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1)
    assert (got == whole).mean() > 0.6  # noise in a tiny image: up to a quarter one level off
    if (nw, nh) == im.size or left < 0 or top < 0:
        np.testing.assert_array_equal(got, whole)


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_rules(tmp_path, monkeypatch):
    """A JPEG >= 2R on its shorter side is drafted (DCT-scaled) and still gives S x S, close to a full decode."""
    y, x = np.mgrid[0:240, 0:320]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(tmp_path / "big.jpg")
    drafted = []
    from PIL import JpegImagePlugin
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafted.append(size) or real(self, mode, size))
    out = load(str(tmp_path / "big.jpg"), 48, 56, decoder="pillow")
    assert drafted == [(56, 56)] and out.shape == (48, 48, 3)
    full = reference(tmp_path / "big.jpg", 48, 56)
    assert np.abs(out.astype(int) - full).mean() < 12
    # the JPEG path (NOTE [ JPEG path ]) decodes at the same DCT scale, without Pillow's draft (then resizes
    # with torch: within one level)
    np.testing.assert_allclose(load(str(tmp_path / "big.jpg"), 48, 56), out, rtol=0, atol=1)
    assert len(drafted) == (1 if jpeg.module() else 2)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_odd_modes_become_8bit_rgb(tmp_path, mode):
    """L, P, RGBA (alpha dropped), CMYK and 16-bit grayscale (>> 8) all become uint8 RGB."""
    base = Image.fromarray(rgb())
    if mode == "I;16":
        g = (RNG.integers(0, 65536, (24, 32))).astype(np.uint16)
        im, want = Image.fromarray(g), np.repeat((g >> 8).astype(np.uint8)[..., None], 3, -1)
    else:
        im = base.convert(mode)
        want = np.asarray(im.convert("RGB"))
    ext = "jpg" if mode == "CMYK" else "png"
    im.save(tmp_path / f"x.{ext}")
    with Image.open(tmp_path / f"x.{ext}") as back:
        if mode == "CMYK":
            want = np.asarray(back.convert("RGB"))
    out = load(str(tmp_path / f"x.{ext}"), 24, 24)  # resize 24: the shorter side as it is
    assert out.dtype == np.uint8 and out.shape == (24, 24, 3)
    np.testing.assert_array_equal(out, want[:, 4:28])


def test_exif_orientation_is_applied(tmp_path):
    """An image tagged orientation 6 (rotate 90 clockwise) is read upright (transposed)."""
    a = rgb(24, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    out = load(str(tmp_path / "r.png"), 24, 24)
    upright = np.rot90(a, -1)  # (32, 24, 3)
    np.testing.assert_array_equal(out, upright[4:28])


def test_class_folders_give_labels_and_classes(tmp_path):
    """One level of class folders: label = the class's index (sorted by name), classes in the summary."""
    root = folder(tmp_path / "a", 6, classes=["zebra", "ant", "cat"])
    ds = ImageFolder(str(root), 16)
    assert ds.classes == ["ant", "cat", "zebra"]
    assert [f.split("/")[0] for f in ds.files] == ["ant"] * 2 + ["cat"] * 2 + ["zebra"] * 2
    r = run(root, batch_size=4)
    assert r.summary["classes"] == ["ant", "cat", "zebra"]
    assert np.concatenate([b["label"] for b in r.results]).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.timeout(120)
def test_same_results_for_build_threads_and_workers(tmp_path):
    """build_threads 1 or 2, workers 0 or 2: the same checksum."""
    root = folder(tmp_path / "a", 7, classes=["a", "b"])
    sums = {run(root, build_threads=t, workers=w, keep_results=False).summary["checksum"]
            for t, w in ((1, 0), (2, 0), (1, 2), (2, 2))}
    assert len(sums) == 1


def bad_folder(tmp_path):
    root = folder(tmp_path / "a", 4)
    good = (root / "im00.png").read_bytes()
    (root / "im01.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "im03.png").write_bytes(b"this is not an image")
    return root


@pytest.mark.timeout(60)
def test_bad_files_fail_their_batch_naming_the_file(tmp_path):
    """fail: the batch's error names the file relative to DIR and the decoder's message."""
    root = bad_folder(tmp_path)
    with pytest.raises(pipeline.errors.SampleError, match=r"sample 1 \(batch 0\).*file im01.png: OSError"):
        run(root)
    r = run(root, on_error="skip", workers=2)
    causes = {f["batch"]: f["cause"] for f in r.summary["failed"]}
    assert sorted(causes) == [0, 1] and "file im01.png" in causes[0] and "file im03.png" in causes[1]
    assert "UnidentifiedImageError" in causes[1]


@pytest.mark.timeout(60)
def test_bad_samples_skip_zero_image_valid_false_listed(tmp_path):
    """skip: a zero image with valid False, the rest computed, bad_samples listing each file and why."""
    root = bad_folder(tmp_path)
    r = run(root, bad_samples="skip", batch_size=4)
    assert r.summary["failed"] == []
    (b,) = r.results
    assert b["valid"].tolist() == [True, False, True, False]
    assert b["image"][1].sum() == 0 and b["image"][0].sum() > 0
    bad = r.summary["bad_samples"]
    assert [(x["sample"], x["file"]) for x in bad] == [(1, "im01.png"), (3, "im03.png")]
    assert "UnidentifiedImageError" in bad[1]["cause"]


def test_empty_folder_and_no_images_exit_2(tmp_path, capsys):
    """An empty folder, or one with no images, exits 2 with one line."""
    (tmp_path / "e").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("x")
    for d in ("e", "t"):
        assert main(["run", "--input", str(tmp_path / d), "--workers", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "no images" in err


@pytest.mark.parametrize("kernel", ["matmul", "mlp"])
def test_a_kernel_for_rows_on_images_exits_2_saying_what_to_pass(tmp_path, capsys, kernel):
    """The default kernel (matmul, weights sized by a row's width) on an image folder: exit 2, one line that
    names the field, its dtype and shape, and the image kernels (not torch's 'mat1 and mat2 shapes')."""
    root = folder(tmp_path / "a", 2)
    args = ["run", "--input", str(root), "--image-size", "16", "--workers", "0", "--no-progress"]
    assert main(args + (["--kernel", kernel] if kernel != "matmul" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"kernel '{kernel}' computes on (rows, cols) batches" in err
    assert "field 'image' is uint8 (2, 16, 16, 3)" in err and "--kernel torchvision:resnet50" in err


@pytest.mark.timeout(60)
def test_manifest_lists_files_and_resume(tmp_path):
    """--output: each manifest line lists its batch's files; a second run resumes (all skipped, same checksum)."""
    root = folder(tmp_path / "a", 5, classes=["x", "y"])
    out = tmp_path / "out"
    first = run(root, output=str(out), keep_results=False).summary
    lines = [json.loads(s) for s in (out / "manifest.jsonl").read_text().splitlines()]
    assert [ln["files"] for ln in lines] == [["x/im00.png", "x/im02.png"], ["x/im04.png", "y/im01.png"],
                                             ["y/im03.png"]]
    again = run(root, output=str(out), keep_results=False).summary
    assert again["skipped"] == 3 and again["checksum"] == first["checksum"]
    with pytest.raises(pipeline.errors.ConfigError, match="image_size"):
        run(root, output=str(out), image_size=8)


@pytest.mark.timeout(120)
def test_torchvision_kernel_resnet18(tmp_path):
    """torchvision:resnet18 at size 32: logits and top5 per image, index passed through; same for nchw."""
    root = folder(tmp_path / "a", 3)
    r = run(root, kernel="torchvision:resnet18", image_size=32, batch_size=4)
    (b,) = r.results
    assert b["logits"].shape == (3, 1000) and b["top5"].shape == (3, 5) and b["index"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(b["top5"], np.argsort(-b["logits"], 1)[:, :5])
    n = run(root, kernel="torchvision:resnet18", image_size=32, batch_size=4, layout="nchw").results[0]
    np.testing.assert_allclose(n["logits"], b["logits"], rtol=1e-4, atol=1e-4)
    import torch
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for p in net.parameters():
        p.data.mul_(0.5)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    w = run(root, kernel="torchvision:resnet18", image_size=32, batch_size=4,
            **{"kernel.params.weights": str(tmp_path / "w.pt")}).results[0]
    assert not np.allclose(w["logits"], b["logits"])


def test_missing_pillow_and_torchvision_name_the_extra(tmp_path, monkeypatch, capsys):
    """Without Pillow an image folder exits 2 naming [images]; so does torchvision:NAME without torchvision."""
    root = folder(tmp_path / "a", 2)
    for m in ("PIL", "PIL.Image", "PIL.ImageOps"):
        monkeypatch.setitem(sys.modules, m, None)
    assert main(["run", "--input", str(root), "--workers", "0", "--no-progress"]) == 2
    assert "pip install -e '.[images]'" in capsys.readouterr().err
    monkeypatch.undo()
    for m in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, m, None)
    assert main(["run", "--kernel", "torchvision:resnet18", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "torchvision" in err and "pip install -e '.[images]'" in err
    monkeypatch.undo()
    assert main(["run", "--kernel", "torchvision:nope", "--workers", "0", "--no-progress"]) == 2
    assert "no model 'nope'" in capsys.readouterr().err

