"""Running in containers: usable CPUs (affinity, cgroup quota), and a slot ring that fits a small /dev/shm.

The end-to-end cases run the CLI under ``unshare -m`` with small tmpfs mounts of their own (a private mount
namespace: the host's /dev/shm is untouched); they are skipped where that is not permitted.
"""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import ConfigError, devices
from pipeline.local import ring as handoff
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


# -- usable CPUs ------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_usable_cpus_follows_affinity_mask():
    """Under `taskset -c 0`, usable_cpus is 1, the thread cap follows it and `devices` prints both counts."""
    code = ("import sys, json\n"
            "from pipeline import devices\n"
            "from pipeline.config import Config\n"
            "torch_loaded = 'torch' in sys.modules\n"
            "print(json.dumps([devices.usable_cpus(), devices.host_cpus(), torch_loaded,\n"
            "                  Config().replace(**{'workers.count': 1}).threads_per_worker()]))\n")
    p = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [1, os.cpu_count(), False, 1]
    p = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "pipeline", "devices", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=100)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert (info["cpus"], info["usable_cpus"]) == (os.cpu_count(), 1)


def fake_cgroups(tmp_path, monkeypatch, proc_cgroup: str, mounts: list[tuple[str, str, str, str]],
                 files: dict[str, str]) -> None:
    """/proc/self/cgroup, /proc/self/mountinfo and cgroup files under tmp_path, read by devices."""
    (tmp_path / "cgroup").write_text(proc_cgroup)
    lines = [f"{30 + i} 1 0:{40 + i} {root} {tmp_path / point} rw,relatime - {fs} {fs} rw,{opts}"
             for i, (root, point, fs, opts) in enumerate(mounts)]
    (tmp_path / "mountinfo").write_text("\n".join(lines) + "\n")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text + "\n")
    monkeypatch.setattr(devices, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(devices, "PROC_MOUNTINFO", str(tmp_path / "mountinfo"))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(48)))


V2 = [("/", "v2", "cgroup2", "nsdelegate")]
HYBRID = [("/", "v1/cpu", "cgroup", "cpu,cpuacct"), ("/", "v1/memory", "cgroup", "memory"),
          ("/", "unified", "cgroup2", "nsdelegate")]


@pytest.mark.parametrize("proc_cgroup, mounts, files, cpus, memory", [
    # cgroup v2, quota of 4 CPUs on the process's own cgroup
    ("0::/job\n", V2, {"v2/job/cpu.max": "400000 100000", "v2/job/memory.max": "268435456"}, 4, 256 * MIB),
    # v2, no limits: the affinity mask (48 of 64) decides
    ("0::/job\n", V2, {"v2/job/cpu.max": "max 100000", "v2/job/memory.max": "max"}, 48, None),
    # v2, the parent's tighter quota (2.5 CPUs, rounded down) and memory limit bind the child
    ("0::/pod/job\n", V2, {"v2/pod/job/cpu.max": "800000 100000", "v2/pod/cpu.max": "250000 100000",
                           "v2/pod/job/memory.max": "max", "v2/pod/memory.max": "1073741824"}, 2, 1 << 30),
    # v2, a quota under one CPU still leaves one
    ("0::/job\n", V2, {"v2/job/cpu.max": "20000 100000"}, 1, None),
    # v1 (hybrid host): cfs quota 3 CPUs and memory limit in the v1 hierarchies, not the unified one
    ("4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n0::/\n", HYBRID,
     {"v1/cpu/docker/c1/cpu.cfs_quota_us": "300000", "v1/cpu/docker/c1/cpu.cfs_period_us": "100000",
      "v1/memory/docker/c1/memory.limit_in_bytes": "536870912", "unified/cpu.max": "100000 100000"},
     3, 512 * MIB),
    # v1, no quota (-1) and no memory limit (LONG_MAX rounded to a page)
    ("4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n0::/\n", HYBRID,
     {"v1/cpu/docker/c1/cpu.cfs_quota_us": "-1", "v1/cpu/docker/c1/cpu.cfs_period_us": "100000",
      "v1/memory/docker/c1/memory.limit_in_bytes": "9223372036854771712"}, 48, None),
    # v1 inside a container without a cgroup namespace: the path names the host's hierarchy, the
    # container sees its own cgroup at the mount's root
    ("4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n", HYBRID,
     {"v1/cpu/cpu.cfs_quota_us": "150000", "v1/cpu/cpu.cfs_period_us": "100000"}, 1, None),
])
def test_cgroup_cpu_quota_and_memory_limit(tmp_path, monkeypatch, proc_cgroup, mounts, files, cpus, memory):
    """usable_cpus takes the cgroup CPU quota (v1 or v2, tightest ancestor); memory_limit reads the limit."""
    fake_cgroups(tmp_path, monkeypatch, proc_cgroup, mounts, files)
    assert devices.usable_cpus() == cpus
    assert devices.memory_limit() == memory
    assert devices.host_cpus() == 64


def test_no_cgroup_info_means_no_limit(tmp_path, monkeypatch):
    """Without readable cgroup files, usable_cpus is the affinity mask and there is no memory limit."""
    fake_cgroups(tmp_path, monkeypatch, "", [], {})
    assert (devices.usable_cpus(), devices.cpu_quota(), devices.memory_limit()) == (48, None, None)


# -- open_ring, in this process -----------------------------------------------------------------------

@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A ring dir and a temp dir of our own (tempfile.gettempdir() points at the second)."""
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield shm, tmp
    assert not [p for d in (shm, tmp) for p in d.iterdir()], "ring file left behind"


def fallocate_limit(monkeypatch, limits: dict) -> None:
    """posix_fallocate fails with ENOSPC past limits[directory] bytes (a full tmpfs, a full disk)."""
    real = os.posix_fallocate

    def fake(fd, offset, length):
        where = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        if where in limits and offset + length > limits[where]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", fake)


def test_ring_fits_as_asked(dirs):
    """With room, the ring has every slot, lives in the given directory and brings no note."""
    shm, _ = dirs
    ring, notes = handoff.open_ring(4, 5000, str(shm))
    try:
        assert (ring.count, ring.slot_bytes, ring.directory, notes) == (4, 8192, str(shm), [])
        assert os.path.getsize(ring.path) == 4 * 8192 and ring.path.startswith(f"{shm}/pipeline-{os.getpid()}-")
    finally:
        ring.close()


def test_ring_shrinks_when_space_is_short(dirs, monkeypatch):
    """ENOSPC past 3 of 8 slots: a ring of 3 slots in the same directory, and a note that says so."""
    shm, _ = dirs
    fallocate_limit(monkeypatch, {str(shm): 3 * MIB})
    ring, notes = handoff.open_ring(8, MIB, str(shm))
    try:
        assert (ring.count, ring.requested, ring.directory) == (3, 8, str(shm))
        assert len(notes) == 1 and "room for 3 of 8 slots of 1.0 MiB" in notes[0] and "--shm-size=" in notes[0]
    finally:
        ring.close()


def test_ring_falls_back_to_the_temp_dir(dirs, monkeypatch):
    """Not even two slots fit in the ring dir: the ring is a file in the temp dir, with a note."""
    shm, tmp = dirs
    fallocate_limit(monkeypatch, {str(shm): MIB + 1})
    ring, notes = handoff.open_ring(4, MIB, str(shm))
    try:
        assert (ring.count, ring.directory) == (4, str(tmp))
        assert len(notes) == 1 and f"a file in {tmp} instead" in notes[0] and str(shm) in notes[0]
    finally:
        ring.close()


def test_no_room_anywhere_is_one_line_config_error(dirs, monkeypatch):
    """Not two slots anywhere: ConfigError naming the sizes, both places and the fixes; no file left."""
    shm, tmp = dirs
    fallocate_limit(monkeypatch, {str(shm): MIB, str(tmp): MIB})
    with pytest.raises(ConfigError) as e:
        handoff.open_ring(4, 16 * MIB, str(shm))
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in ("4 x 16.0 MiB = 64.0 MiB", "2 x 16.0 MiB = 32.0 MiB", f"{shm} has", f"{tmp} has",
                     "docker run --shm-size=128m", "handoff.slot_mb", "--in-flight", "handoff.dir"):
        assert fragment in msg, (fragment, msg)


def test_unwritable_ring_dir_falls_back(dirs, monkeypatch):
    """A ring dir that refuses the file (EACCES) sends the ring to the temp dir, naming the reason."""
    shm, tmp = dirs
    real = os.open

    def refuse(path, *a, **kw):
        if os.path.dirname(str(path)) == str(shm):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "open", refuse)
    ring, notes = handoff.open_ring(2, 100, str(shm))
    try:
        assert ring.directory == str(tmp) and "Permission denied" in notes[0]
    finally:
        ring.close()


@pytest.mark.parametrize("avail, slot_mb, slots, fragment", [
    (100 * MIB, 16, 3, "more than half of the 100.0 MiB this process may use (cgroup memory limit): 3 slots"),
    (40 * MIB, 16, None, "2 x 16.0 MiB = 32.0 MiB would take more than half of the 40.0 MiB"),
    (2 << 30, 16, 8, None),
])
def test_ring_memory_check(dirs, monkeypatch, avail, slot_mb, slots, fragment):
    """A ring over half the memory this process may use gets fewer slots (>= 2) or is refused in one line."""
    shm, _ = dirs
    monkeypatch.setattr(devices, "memory_available", lambda: (avail, "cgroup memory limit"))
    if slots is None:
        with pytest.raises(ConfigError, match="docker run --memory") as e:
            handoff.open_ring(8, slot_mb * MIB, str(shm))
        assert fragment in str(e.value) and "\n" not in str(e.value)
        return
    ring, notes = handoff.open_ring(8, slot_mb * MIB, str(shm))
    try:
        assert ring.count == slots
        assert (fragment in notes[0]) if fragment else notes == []
    finally:
        ring.close()


@pytest.mark.parametrize("value, fragment", [("/no/such/dir", "does not exist"), (__file__, "not a directory")])
def test_handoff_dir_is_validated(value, fragment):
    """handoff.dir must be an existing directory; the error names the key and the value."""
    with pytest.raises(ConfigError, match=fragment) as e:
        load_config(None, {"handoff.dir": value})
    assert f"handoff.dir = '{value}'" in str(e.value)


def test_handoff_dir_default_is_shared_memory():
    """handoff.dir defaults to /dev/shm where it exists."""
    assert load_config().handoff.dir == ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


# -- the CLI on a small /dev/shm, in a private mount namespace ---------------------------------------------

def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        p = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_works(),
                                   reason="needs `unshare -m` and tmpfs mounts (root, or user namespaces)")


def in_namespace(tmp_path, mounts: dict[str, str], args: list[str], env: dict | None = None,
                 serial: bool = False) -> dict:
    """Mount tmpfs ``mounts`` {path: size} in a private mount namespace, run the CLI there (and with
    --workers 0 when ``serial``); returns rc, stdout, stderr, the summary and the run's ring files
    (``pipeline-<main pid>-*``) left in the mounts and the temp dir."""
    out = tmp_path / "out"
    out.mkdir()
    tmpdir = (env or {}).get("TMPDIR", tempfile.gettempdir())
    run = [sys.executable, "-m", "pipeline", "run", *args, "--json", "--no-progress"]
    q = " ".join(f"'{a}'" for a in run)
    look = " ".join(f"'{d}'" for d in {*mounts, tmpdir})
    script = "set -e\n" + "".join(f"mount -t tmpfs -o size={size} tmpfs '{path}'\n"
                                   for path, size in mounts.items())
    script += f"set +e\n{q} >'{out}/stdout' 2>'{out}/stderr'; echo $? >'{out}/rc'\n"
    if serial:
        script += f"{q} --workers 0 >'{out}/serial' 2>/dev/null\n"
    script += f"find {look} -maxdepth 1 -name 'pipeline-*' >'{out}/left' 2>/dev/null; true\n"
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=170, env={**os.environ, **(env or {})})
    assert p.returncode == 0 and (out / "rc").exists(), p.stderr
    res = {k: (out / k).read_text() for k in ("rc", "stdout", "stderr", "left")}
    res["rc"] = int(res["rc"])
    res["summary"] = json.loads(res["stdout"]) if res["stdout"].strip() else None
    mine = f"pipeline-{res['summary']['main_pid']}-" if res["summary"] else "pipeline-"
    res["left"] = [p for p in res["left"].split() if os.path.basename(p).startswith(mine)]
    if serial:
        res["serial"] = json.loads((out / "serial").read_text())["checksum"]
    return res


@needs_unshare
@pytest.mark.timeout(180)
def test_64mb_shm_runs_with_fewer_slots(tmp_path):
    """Docker's 64 MB /dev/shm, 8 slots of 16 MiB asked for (4 workers' default; was: Bus error, exit 135):
    fewer slots, a note, the serial checksum, nothing left."""
    r = in_namespace(tmp_path, {"/dev/shm": "64m"}, ["--workers", "2", "--in-flight", "8", "--batches", "16"],
                     serial=True)
    assert r["rc"] == 0, r["stderr"]
    s = r["summary"]
    assert s["completed"] == 16 and 2 <= s["handoff"]["slots"] < 8 and s["handoff"]["pickled_fallbacks"] == 0
    notes = [n for n in s["notes"] if n.startswith("handoff:")]
    assert len(notes) == 1 and re.search(rf"room for {s['handoff']['slots']} of \d+ slots of 16.0 MiB", notes[0])
    assert r["stderr"].count(notes[0]) == 1  # printed once
    assert s["checksum"] == r["serial"]
    assert r["left"] == []


@needs_unshare
@pytest.mark.timeout(180)
def test_tiny_shm_falls_back_to_a_ring_on_disk(tmp_path):
    """Not two 4 MiB slots in an 8 MB /dev/shm: the ring is a file in TMPDIR, same checksum, nothing left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = in_namespace(tmp_path, {"/dev/shm": "8m"},
                     ["--workers", "2", "--batches", "6", "--rows", "1024", "--kernel", "fft", "--in-flight", "5"],
                     env={"TMPDIR": str(disk)}, serial=True)
    assert r["rc"] == 0, r["stderr"]
    s = r["summary"]
    assert s["completed"] == 6 and s["handoff"]["slots"] == 5 and s["handoff"]["pickled_fallbacks"] == 0
    notes = [n for n in s["notes"] if n.startswith("handoff:")]
    assert len(notes) == 1 and "/dev/shm has" in notes[0] and f"a file in {disk} instead" in notes[0]
    assert s["checksum"] == r["serial"]
    assert r["left"] == [] and not list(disk.glob("pipeline-*"))


@needs_unshare
@pytest.mark.timeout(180)
def test_no_room_anywhere_exits_2_with_one_line(tmp_path):
    """handoff.dir and TMPDIR on 4 MB tmpfs, 4 MiB batches: exit 2, one line with sizes and fix, nothing left."""
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    tmp.mkdir()
    r = in_namespace(tmp_path, {str(shm): "4m", str(tmp): "4m"},
                     ["--workers", "2", "--batches", "4", "--rows", "1024", "--kernel", "sum", "--in-flight", "4",
                      "--set", f"handoff.dir={shm}"], env={"TMPDIR": str(tmp)})
    assert r["rc"] == 2, r["stderr"]
    assert r["summary"]["error"].startswith("ConfigError: handoff: no room")
    errors = [line for line in r["stderr"].splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1, r["stderr"]
    for fragment in ("ConfigError: handoff: no room for the slot ring", "4 x 4.0 MiB = 16.0 MiB",
                     f"{shm} has", f"{tmp} has", "docker run --shm-size=", "handoff.slot_mb"):
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in r["stderr"]
    assert r["left"] == []


@needs_unshare
@pytest.mark.timeout(150)
def test_ray_backend_on_a_64mb_shm(tmp_path):
    """--backend ray with a 64 MB /dev/shm: Ray moves its object store to /tmp, the run gives the serial
    checksum."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    # A Ray temp dir of its own: ray.init() would join a cluster that another `ray start` on this machine
    # left in /tmp/ray/ray_current_cluster (short: Ray's socket paths must fit in 107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="pray", dir="/tmp")
    try:
        r = in_namespace(tmp_path, {"/dev/shm": "64m"},
                         ["--backend", "ray", "--workers", "2", "--batches", "4", "--rows", "64", "--cols", "8",
                          "--set", "run.ray_build=driver"],  # (the batches go through the object store)
                         env={"RAY_TMPDIR": ray_tmp}, serial=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r["rc"] == 0, r["stderr"]
    s = r["summary"]
    assert s["completed"] == 4 and s["handoff"]["transport"] == "ray object store"
    assert s["checksum"] == r["serial"]
