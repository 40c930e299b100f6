"""The tutorial lessons in scripts/lessons/ run, and each shows what it states."""

import json
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


FACT_KEYS = {"pickle_cuda_tensor", "spawn_pool_apply_cuda_tensor", "child_returns_cuda_tensor",
             "fork_after_cuda_init", "fork_pool_cuda_arg", "nonleaf_requires_grad",
             "parent_exits_while_child_holds", "h2d_pageable_vs_pinned_gbps", "pickled_pool_vs_serial"}
CUDA_FACT_KEYS = FACT_KEYS - {"nonleaf_requires_grad", "pickled_pool_vs_serial"}


@pytest.mark.timeout(150)
def test_gpu_facts_json_without_cuda(tmp_path):
    """`09_gpu_data.py --json/--markdown` writes every fact of the docs/handoff.md table; without CUDA the CUDA
    rows are skipped with the reason and the CPU rows run."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this test covers the machine without CUDA (scripts/gpu_check.sh runs the CUDA rows)")
    out, md = tmp_path / "facts.json", tmp_path / "facts.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lessons" / "09_gpu_data.py"),
                           "--json", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    machine, facts = report["machine"], report["facts"]
    assert machine["cuda"] is False and machine["gpu"] is None
    for key in ("torch", "python", "cpus", "date"):
        assert machine[key], key
    assert set(facts) == FACT_KEYS
    for key, row in facts.items():
        assert {"what", "status", "result", "seconds"} <= set(row), key
        if key in CUDA_FACT_KEYS:
            assert (row["status"], row["result"]) == ("skipped", "skipped: no CUDA"), key
        else:
            assert row["status"] != "skipped", key
    assert facts["nonleaf_requires_grad"]["status"] == "error"
    assert "Cowardly refusing to serialize non-leaf tensor" in facts["nonleaf_requires_grad"]["result"]
    pool = facts["pickled_pool_vs_serial"]
    assert pool["status"] == "ok", pool
    assert pool["value"]["serial_batches_per_s"] > 0 and pool["value"]["pool_batches_per_s"]
    table = md.read_text()
    assert "| what | result |" in table
    assert table.count("skipped: no CUDA") == len(CUDA_FACT_KEYS)
