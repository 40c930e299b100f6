"""The image bench: its own JPEG set, the image modes (pipeline.device, spdl.io, Ray Data's recipe), goals."""
import json
import os

import pytest

import pipeline.bench.images as bi
from pipeline.cli import main

TINY = ["--config", "configs/bench-images.toml", "--batches", "2", "--batch-size", "4", "--image-size", "32",
        "--workers-list", "2", "--threads-per-worker", "1"]


def test_image_set_is_deterministic(tmp_path):
    """The maker gives the same bytes for the same seed, ImageNet-like sizes, and keeps what is there."""
    a, b = bi.make_jpegs(str(tmp_path / "a"), 2), bi.make_jpegs(str(tmp_path / "b"), 2)
    from pathlib import Path
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
    from PIL import Image
    for p in a:
        with Image.open(p) as im:
            assert 400 <= im.size[0] < 640 and 300 <= im.size[1] < 480 and im.format == "JPEG"
    mtime = os.stat(a[0]).st_mtime_ns
    bi.make_jpegs(str(tmp_path / "a"), 2)
    assert os.stat(a[0]).st_mtime_ns == mtime


@pytest.mark.timeout(300)
def test_image_bench_modes_agree_and_report_goals(tmp_path, monkeypatch, capsys):
    """bench-images.toml without --input makes its set in the cache dir; serial, pipeline (both decodes, and
    all through Pillow), DataLoader, torchvision's recipe and spdl agree; the report has the decode
    agreement, the decoder alone and each row's share of it, and the issue's ratios."""
    monkeypatch.setattr(bi, "CACHE", str(tmp_path / "cache"))
    modes = "serial,pipeline,pipeline.pillow,pipeline.device,DataLoader,torchvision" + (",spdl" if bi_has_spdl() else "")
    path = tmp_path / "r.json"
    assert main(["bench", *TINY, "--modes", modes, "--json", str(path)]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert os.path.isdir(tmp_path / "cache" / "jpeg-8") and "jpeg-8" in err
    r = json.loads(path.read_text())
    rows = {x["mode"]: x for x in r["results"]}
    assert set(rows) == set(modes.split(",")) and all(x["agrees"] for x in rows.values())
    assert rows["pipeline"]["max_rel_diff_vs_serial"] == 0 and rows["pipeline.device"]["tolerance"] == bi.DECODE_TOLERANCE
    assert rows["serial"]["samples_per_s"] > 0 and r["config"]["source"]["kind"] == "images"
    im = r["images"]
    assert im["decode_agreement_cpu"]["max_abs"] <= 2 and im["decode_agreement_cpu"]["images"] == 8
    assert {"vs_serial", "vs_DataLoader", "build_scaling", "vs_pipeline.pillow", "vs_torchvision",
            "vs_decode_alone"} <= set(im["goals"])
    assert "1" in r["calibration"]["build_s_by_threads"] and "goal vs_serial" in out
    assert rows["pipeline.pillow"]["tolerance"] == bi.DECODE_TOLERANCE  # (another resampler than serial's)
    alone = im["decode_alone"]
    assert alone["images_per_s"] > 0 and alone["threads"] >= 1 and alone["decoder"] in ("simplejpeg", "Pillow")
    assert all(0 < x["share_of_decode_alone"] for x in rows.values()) and "decoder alone" in out
    assert rows["torchvision"]["torchvision"].startswith("ImageFolder")


def bi_has_spdl():
    from pipeline.bench.peers import has_spdl as _has_spdl
    return _has_spdl()


@pytest.mark.ray_daemons
@pytest.mark.timeout(300)
def test_ray_data_image_recipe_agrees_with_serial(tmp_path, monkeypatch, capsys):
    """On an image folder ray.data is read_images + map (the same transform) + map_batches: same results."""
    pytest.importorskip("ray.data")
    monkeypatch.setattr(bi, "CACHE", str(tmp_path / "cache"))
    path = tmp_path / "r.json"
    tiny = [*TINY, "--image-size", "224"]  # (the last wins: no reduced-scale decode, read_images has none)
    assert main(["bench", *tiny, "--modes", "serial,ray.data", "--json", str(path)]) == 0, capsys.readouterr().err
    r = json.loads(path.read_text())
    rows = {x["mode"]: x for x in r["results"]}
    assert rows["ray.data"]["max_rel_diff_vs_serial"] == 0 and rows["ray.data"]["batches"] == 2
    assert "vs_ray.data" not in r["images"]["goals"]  # (no pipeline row to compare with)


@pytest.mark.timeout(300)
def test_daft_image_recipe_agrees_with_serial(tmp_path, monkeypatch, capsys):
    """daft: download + decode_image + the transform + the kernel as a Daft class: serial's results (within
    the decode tolerance: Daft's own decoder), its start-up apart, and its ratio among the goals."""
    pytest.importorskip("daft")
    monkeypatch.setattr(bi, "CACHE", str(tmp_path / "cache"))
    path = tmp_path / "r.json"
    assert main(["bench", *TINY, "--modes", "serial,pipeline,daft", "--json", str(path)]) == 0, capsys.readouterr().err
    r = json.loads(path.read_text())
    rows = {x["mode"]: x for x in r["results"]}
    assert rows["daft"]["agrees"] and rows["daft"]["tolerance"] == bi.DECODE_TOLERANCE
    assert rows["daft"]["batches"] == 2 and rows["daft"]["startup_s"] > 0 and rows["daft"]["seconds"] > 0
    assert "vs_daft" in r["images"]["goals"]


def test_daft_mode_without_daft_names_the_extra(tmp_path, monkeypatch, capsys):
    """--modes daft without Daft: exit 2, one line naming [daft], before any image is made."""
    import pipeline.bench as b
    monkeypatch.setattr(bi, "CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(b, "has_daft", lambda: False)
    assert main(["bench", *TINY, "--modes", "serial,daft"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[daft]'" in err and err.strip().count("\n") == 0
    assert not os.path.exists(tmp_path / "cache")


def test_image_modes_need_an_image_folder_and_spdl_io_its_libraries(monkeypatch, capsys):
    """pipeline.device on synthetic batches, or spdl.io where it can't decode: exit 2, one line each."""
    assert main(["bench", "--quick", "--modes", "serial,pipeline.device"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "for a folder of images" in err
    monkeypatch.setattr(bi, "has_spdl_io", lambda: "RuntimeError: Failed to import libspdl")
    assert main(["bench", *TINY, "--modes", "serial,spdl.io"]) == 2
    err = capsys.readouterr().err
    assert "spdl.io" in err and "SPDL's decoder" in err and err.strip().count("\n") <= 1


def test_image_bench_without_pillow_names_the_extra(tmp_path, monkeypatch, capsys):
    """bench-images.toml without Pillow: exit 2, one line naming [images], before any image is made."""
    import sys
    monkeypatch.setattr(bi, "CACHE", str(tmp_path / "cache"))
    for m in ("PIL", "PIL.Image", "PIL.ImageOps"):
        monkeypatch.setitem(sys.modules, m, None)
    assert main(["bench", *TINY, "--modes", "serial"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[images]'" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "cache" / "jpeg-8")
