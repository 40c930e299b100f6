"""The package can be published: an sdist and a wheel build offline, the wheel holds every module, and
installed on its own it runs from outside the checkout."""
import email
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import pipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = "shm-batch-pipeline"
BUILD = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"


def build(what: str, src: pathlib.Path, dist: pathlib.Path) -> pathlib.Path:
    """``build_sdist`` or ``build_wheel`` of setuptools' PEP 517 backend, in ``src``, without isolation
    (what ``python -m build --no-isolation`` calls; no network)."""
    proc = subprocess.run([sys.executable, "-c", BUILD, what, str(dist)], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dist / proc.stdout.strip().splitlines()[-1]


def test_metadata_names_the_distribution():
    """pyproject: the free distribution name, a license file, classifiers, the extras, the console script,
    and the version the package reports."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == NAME and project["version"] == pipeline.__version__
    assert project["license"] == "MIT" and (ROOT / "LICENSE").is_file()
    assert project["classifiers"] and project["keywords"]
    assert set(project["optional-dependencies"]) == {"test", "plot", "ray", "spdl", "parquet", "images", "text", "daft"}
    assert project["scripts"] == {"pipeline": "pipeline.cli:main"}


@pytest.mark.timeout(240)
def test_wheel_from_sdist_runs_outside_the_checkout(tmp_path):
    """sdist -> wheel (as `python -m build` does), every file of pipeline/ in the wheel, then
    `pip install --no-deps --target` and `python -m pipeline run --workers 2 --batches 4` from elsewhere,
    importing the installed copy (not the checkout, not an editable install)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    dist.mkdir()
    sdist = build("build_sdist", src, dist)
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(tmp_path / "unpacked", **safe)
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    wheel = build("build_wheel", unpacked, dist)

    # every file of the package, not only modules: a data file added under pipeline/ must reach the wheel
    # too (list it in [tool.setuptools.package-data])
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(info))
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert modules - names == set(), "files of pipeline/ missing from the wheel"
    assert meta["Name"] == NAME and meta["Version"] == pipeline.__version__
    assert meta["License-Expression"] == "MIT" and any(n.endswith("licenses/LICENSE") for n in names)
    assert "pipeline = pipeline.cli:main" in entry_points

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                          "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert pathlib.Path(where.stdout.strip()).is_relative_to(site), where.stdout
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--workers", "2", "--batches", "4",
                          "--no-progress"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "batches      4/4" in run.stdout and "checksum" in run.stdout
