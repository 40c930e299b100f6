"""The tutorial lessons in scripts/lessons/ run, and each shows what it states."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "scripts" / "lessons").glob("*.py"))
NEEDS_PIPELINE = {"08_interactive.py", "09_gpu_data.py"}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson(lesson):
    """The lesson script exits 0 and reports OK."""
    if lesson.name in NEEDS_PIPELINE:
        pytest.importorskip("pipeline", reason=f"{lesson.name} needs the pipeline package")
    proc = subprocess.run([sys.executable, str(lesson)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "OK" in proc.stdout, output
