"""--decode device: image batches as the files' bytes, decoded in the worker; agreement, bad files, oversize."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from pipeline.images import encoded as decoding
from pipeline.cli import main
from pipeline.errors import ConfigError, SampleError
from pipeline.outputs import max_rel_diff
from pipeline.runner import resolve
from pipeline.sources.factory import open_source as make_source

TOLERANCE = 2  # grey levels, any pixel: Pillow's resampler (main) vs torch's interpolate (worker), measured 1


def photo(h, w, seed=0):
    """A smooth image with a little noise: compresses and resamples like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / w * 6 + c) * np.cos(y / h * 4 - c) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def folder(root, n=5, classes=None):
    """``n`` tiny images of several sizes, JPEG and PNG in turn (one class folder each in turn)."""
    root.mkdir(exist_ok=True)
    for i in range(n):
        d = root / classes[i % len(classes)] if classes else root
        d.mkdir(exist_ok=True)
        im = Image.fromarray(photo(30 + 7 * i, 52 - 5 * i, i))
        im.save(d / f"im{i:02d}.jpg", quality=90) if i % 2 == 0 else im.save(d / f"im{i:02d}.png")
    return root


def source(root, **kw):
    return make_source(resolve(None, {"input": str(root), "image_size": 16, "batch_size": 4, **kw}).source)


def run(root, **kw):
    kw = {"workers": 0, "kernel": "sum", "progress": False, "image_size": 16, "batch_size": 4, **kw}
    return pipeline.run(input=str(root), **kw)


def test_encoded_batch_holds_each_files_path_and_bytes(tmp_path):
    """The slot holds path, NUL, the file's bytes per sample, the offsets, the transform, index and label."""
    root = folder(tmp_path / "a", 5, classes=["cat", "dog"])
    src = source(root, decode="device", layout="nchw")
    b = src.get(0)
    assert list(b) == [decoding.ENCODED, decoding.OFFSETS, decoding.TRANSFORM, "index", "label"]
    assert b[decoding.TRANSFORM].tolist() == [16, 18, 1, 1] and b["index"].tolist() == [0, 1, 2, 3]
    offs, data = b[decoding.OFFSETS], b[decoding.ENCODED]
    assert offs[0] == 0 and offs[-1] == data.size and len(offs) == 5
    for i, rel in enumerate(src.dataset.files[:4]):
        entry = data[offs[i]:offs[i + 1]].tobytes()
        assert entry == rel.encode() + b"\0" + (root / rel).read_bytes()
    assert b["label"].tolist() == src.dataset.labels[:4]
    assert src.get(1)[decoding.OFFSETS].shape == (2,)  # the short last batch


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_worker_side_decode_agrees_with_main_decode(tmp_path, layout):
    """Decoded in the worker (Pillow + torch's resize on the CPU), the kernel gets the same fields, the
    same shapes, and pixels within the stated tolerance of --decode main; odd modes and EXIF too."""
    root = folder(tmp_path / "a", 4)
    for mode in ("L", "P", "RGBA", "CMYK"):
        Image.fromarray(photo(40, 33, 7)).convert(mode).save(root / f"m-{mode}.{'jpg' if mode in 'LCMYK' else 'png'}")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoded image is 33 x 40
    Image.fromarray(photo(33, 40, 8)).save(root / "rot.jpg", exif=exif)
    main_, dev = source(root, layout=layout), source(root, layout=layout, decode="device")
    for k in range(len(main_)):
        want = main_.get(k)
        got, bad = decoding.decode_batch(dev.get(k), torch.device("cpu"), k)
        assert bad == {} and list(got) == list(want)
        assert got["image"].shape == want["image"].shape and got["image"].dtype == torch.uint8
        diff = np.abs(got["image"].numpy().astype(int) - want["image"])
        assert diff.max() <= TOLERANCE and diff.mean() < 0.5
        np.testing.assert_array_equal(got["index"], want["index"])


@pytest.mark.timeout(120)
def test_workers_decode_same_results_as_serial_and_close_to_main(tmp_path):
    """2 workers decoding the bytes (read by build threads or a build process) give serial's checksum
    exactly, and agree with --decode main."""
    root = folder(tmp_path / "a", 7, classes=["a", "b"])
    serial = run(root, decode="device")
    workers = run(root, decode="device", workers=2)
    assert workers.summary["checksum"] == serial.summary["checksum"]
    assert workers.summary["breakdown_ms_per_batch"]["decode_ms"] > 0
    assert workers.summary["config"]["source"]["decode"] == "device"
    procs = run(root, decode="device", workers=1, build_processes=1)  # the bytes read in a build process
    assert procs.summary["checksum"] == serial.summary["checksum"]
    main_ = run(root)
    assert [set(r) for r in main_.results] == [set(r) for r in workers.results]
    assert max_rel_diff(workers.results, main_.results) < 0.05  # row sums of 16 pixels, 1-grey-level differences
    np.testing.assert_array_equal(workers.results[0]["label"], main_.results[0]["label"])


@pytest.mark.timeout(120)
def test_bad_files_under_device_decode_fail_naming_the_file(tmp_path, capsys):
    """A file the worker can't decode fails its batch with a SampleError naming it (CLI: exit 1)."""
    root = folder(tmp_path / "a", 3)
    (root / "zz-bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(SampleError, match=r"sample 3 \(batch 0\): file zz-bad.jpg: .*runcated"):
        run(root, decode="device", workers=2)
    assert main(["run", "--input", str(root), "--decode", "device", "--workers", "1", "--kernel", "sum",
                 "--image-size", "16", "--no-progress"]) == 1
    assert "zz-bad.jpg" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_bad_files_under_device_decode_skip_listed_and_in_manifest(tmp_path):
    """With --bad-samples skip the worker zeroes the file, valid is False, and the main lists it (summary,
    manifest) as --decode main does."""
    root = folder(tmp_path / "a", 3)
    (root / "zz-bad.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    r = run(root, decode="device", workers=2, bad_samples="skip", output=str(out))
    want = run(root, bad_samples="skip")
    assert r.summary["completed"] == 1 and r.results[0]["valid"].tolist() == [True, True, True, False]
    assert [(b["sample"], b["file"]) for b in r.summary["bad_samples"]] == [(3, "zz-bad.png")]
    cause = r.summary["bad_samples"][0]["cause"]
    assert cause == "UnidentifiedImageError: cannot identify image file 'zz-bad.png'"
    assert want.summary["bad_samples"][0]["cause"].startswith(cause[:-len("'zz-bad.png'")])  # main: the full path
    assert r.results[0]["image"][3].max() == 0  # (the sum kernel: per field)
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert line["bad_samples"] == {"zz-bad.png": cause}


@pytest.mark.parametrize("skip", [False, True])
def test_a_file_that_changed_size_since_the_listing_is_a_bad_file(tmp_path, skip):
    """The main reads exactly the listed size; a file that grew or shrank is named (or skipped)."""
    root = folder(tmp_path / "a", 3)
    src = source(root, decode="device", bad_samples="skip" if skip else "fail")
    with open(root / "im01.png", "ab") as f:
        f.write(b"more")
    if not skip:
        with pytest.raises(SampleError, match=r"file im01.png: .*changed size.*run again"):
            src.get(0)
        return
    b = src.get(0)
    assert b["valid"].tolist() == [True, False, True] and "changed size" in src.dataset.bad[1]
    got, bad = decoding.decode_batch(b, torch.device("cpu"))
    assert bad == {} and got["valid"].tolist() == [True, False, True] and got["image"][1].max() == 0


@pytest.mark.timeout(120)
def test_batches_larger_than_a_slot_travel_pickled_with_a_note(tmp_path):
    """Slots hold at most twice the median batch; a bigger one (a huge file) travels pickled, same results,
    and a note says which slot size keeps it in shared memory."""
    root = folder(tmp_path / "a", 8)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(root / "zz.png")
    src = source(root, decode="device")
    sizes = [b.nbytes for b in src]
    assert src.max_nbytes < max(sizes) and src.max_nbytes >= min(sizes)
    r = run(root, decode="device", workers=1)
    h = r.summary["handoff"]
    assert h["pickled_fallbacks"] == 1 and r.summary["completed"] == 3
    assert any("travelled pickled" in n and "handoff.slot_mb=1" in n for n in r.summary["notes"])
    assert r.summary["checksum"] == run(root, decode="device").summary["checksum"]


def test_decode_setting_is_checked(tmp_path, capsys):
    """source.decode is main or device, device only for a folder of images: one line, exit 2."""
    with pytest.raises(ConfigError, match="source.decode = 'gpu'.*must be one of main, device"):
        resolve(None, {"decode": "gpu"})
    with pytest.raises(ConfigError, match="is for a folder of images.*synthetic"):
        pipeline.run(decode="device", batches=1, rows=2, cols=2, workers=0, progress=False)
    assert main(["run", "--decode", "device", "--batches", "1", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--decode device" in err and len(err.strip().splitlines()) == 1


def test_nvjpeg_takes_only_plain_jpegs(tmp_path):
    """On CUDA, nvJPEG gets RGB or grayscale JPEGs without EXIF rotation; the rest go to Pillow."""
    def blob(path):
        return np.frombuffer(path.read_bytes(), np.uint8)
    img = Image.fromarray(photo(20, 24))
    img.save(tmp_path / "rgb.jpg")
    img.convert("L").save(tmp_path / "l.jpg")
    img.convert("CMYK").save(tmp_path / "cmyk.jpg")
    img.save(tmp_path / "x.png")
    exif = Image.Exif()
    exif[0x0112] = 3
    img.save(tmp_path / "rot.jpg", exif=exif)
    plain = {p.name: decoding._plain_jpeg(blob(p)) for p in sorted(tmp_path.iterdir())}
    assert plain == {"cmyk.jpg": False, "l.jpg": True, "rgb.jpg": True, "rot.jpg": False, "x.png": False}


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_device_decode_nvjpeg_agrees_and_names_bad_files(tmp_path):
    """On CUDA: nvJPEG (batched) + the resize on the GPU agree with --decode main; a corrupt JPEG with a
    valid header is found after the batched call fails, and skipped or named."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = folder(tmp_path / "a", 6)
    main_ = source(root)
    dev = source(root, decode="device")
    got, bad = decoding.decode_batch(dev.get(0), torch.device("cuda:0"), 0)
    assert got["image"].device.type == "cuda" and bad == {}
    diff = np.abs(got["image"].cpu().numpy().astype(int) - main_.get(0)["image"])
    assert diff.max() <= 12 and diff.mean() < 1.5  # nvJPEG's IDCT and upsampling differ from libjpeg's too
    good = (root / "im00.jpg").read_bytes()
    (root / "im00.jpg").write_bytes(good[: len(good) // 2])  # truncated: Pillow reads its header, so nvJPEG gets it
    src = source(root, decode="device", bad_samples="skip")
    got, bad = decoding.decode_batch(src.get(0), torch.device("cuda:0"), 0)
    assert got["valid"][1:].all() and list(bad) in ([], [0])  # nvJPEG may decode what it can of it
    ok = np.abs(got["image"][1:].cpu().numpy().astype(int) - main_.get(0)["image"][1:])
    assert ok.max() <= 12  # the batched call failed or not: the other files are decoded all the same
    (root / "im00.jpg").write_bytes(good[:200] + bytes(range(256)) * 4)  # its header, then garbage
    try:
        decoding.decode_batch(source(root, decode="device").get(0), torch.device("cuda:0"), 0)
    except SampleError as e:
        assert "file im00.jpg" in str(e)
    r = run(root, decode="device", workers=2, device="cuda", bad_samples="skip")
    assert r.summary["completed"] == 2 and all(b["file"] == "im00.jpg" for b in r.summary["bad_samples"])
