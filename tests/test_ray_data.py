"""bench's ray.data mode (Ray Data as a peer): agrees with serial, on the bench's own local Ray instance."""
import json

import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[ray]')")

import ray  # noqa: E402

from pipeline.cli import main  # noqa: E402


pytestmark = pytest.mark.ray_daemons  # Ray's daemons may take a moment to go after the bench


@pytest.mark.timeout(240)
def test_quick_ray_data_agrees_with_serial(tmp_path, capsys):
    """bench --quick --modes serial,ray.data exits 0 with results equal to serial's, then Ray is down."""
    path = tmp_path / "b.json"
    rc = main(["bench", "--quick", "--modes", "serial,ray.data", "--workers-list", "2", "--kernel", "mlp",
               "--threads-per-worker", "1", "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = {r["mode"]: r for r in json.loads(path.read_text())["results"]}
    assert set(rows) == {"serial", "ray.data"}
    rd = rows["ray.data"]
    assert rd["checksum"] == rows["serial"]["checksum"] and rd["max_rel_diff_vs_serial"] == 0.0
    assert rd["workers"] == 2 and rd["startup_s"] >= rd["ray_init_s"] > 0
    assert "ray.data" in out
    assert not ray.is_initialized()
