"""Kernels defined in a real Jupyter notebook run on spawn workers (sent by value)."""
import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
pytest.importorskip("ipykernel", reason="ipykernel is not installed")

CELLS = [
    "import numpy as np\nimport pipeline",
    "factor = 3.0\n"
    "def scaled_sum(x):\n"
    "    return x.sum(1) * factor\n",
    "kw = dict(batches=4, rows=8, cols=4, progress=False, threads_per_worker=1)\n"
    "ref = pipeline.run(kernel='sum', workers=0, **kw).results\n"
    "r = pipeline.run(kernel=scaled_sum, workers=2, **kw)\n"
    "lam = pipeline.run(kernel=lambda x: x.sum(1) - 1, workers=2, **kw)\n"
    "assert all(np.allclose(a, b * 3) for a, b in zip(r.results, ref))\n"
    "assert all(np.allclose(a, b - 1) for a, b in zip(lam.results, ref))\n"
    "print('NOTEBOOK-OK', r.summary['kernel'])",
]


@pytest.mark.timeout(240)
def test_notebook_defined_kernels_run_on_workers():
    """A function with a closure and a lambda, defined in notebook cells, give the right results with 2 workers."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nbclient.NotebookClient(nb, timeout=200, kernel_name="python3").execute()
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "NOTEBOOK-OK scaled_sum" in out
