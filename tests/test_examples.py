"""The scripts in scripts/examples/ run as `python scripts/examples/NAME.py`, on data they make, and check
what they show."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "scripts" / "examples").glob("*.py"))
NEEDS = {"image_folder.py": ("PIL", "torchvision"), "parquet_roundtrip.py": ("pyarrow",),
         "ray_cluster.py": ("ray",), "embed_text.py": ("pyarrow", "tokenizers", "transformers")}


def test_every_tour_job_has_an_example():
    """The README's tour has its scripts: own dataset, image folder, Parquet, warm Pipeline, Ray."""
    assert {p.name for p in EXAMPLES} >= {"own_dataset.py", "image_folder.py", "parquet_roundtrip.py",
                                         "warm_pipeline.py", "ray_cluster.py"}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    """The example exits 0 and prints OK, run from another directory as a user would."""
    for module in NEEDS.get(script.name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{script.name} needs {module}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "OK" in proc.stdout, output
