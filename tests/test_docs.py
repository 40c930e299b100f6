"""The docs stay true: runnable blocks run, flags and config keys match the code, links resolve, and the
README stays a front door. The conventions are in docs/architecture.md ("How the docs stay true")."""
import contextlib
import dataclasses
import io
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from pipeline import config
from pipeline.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]
MARKER = "<!-- runnable -->"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Flags the docs mention that belong to other programs: flag -> who owns it. A script of ours is checked to
# define it; docker, ray and pip can't be asked here.
FOREIGN = {
    "--shm-size": "docker run", "--gpus": "docker run", "--cpus": "docker run", "--cpuset-cpus": "docker run",
    "--memory": "docker run", "--rm": "docker run",
    "--head": "ray start", "--port": "ray start", "--address": "ray start", "--num-cpus": "ray start",
    "--include-dashboard": "ray start", "--generate": "ray get-auth-token",
    "--no-deps": "pip", "--no-build-isolation": "pip", "--target": "pip", "--no-isolation": "python -m build",
    "--big": "scripts/bench_parquet.py", "--markdown": "scripts/lessons/09_gpu_data.py",
}
# Defaults that depend on the machine: what the docs say instead.
MACHINE_DEFAULTS = {"handoff.dir": "/dev/shm"}  # the temp dir where there is no /dev/shm


def runnable_blocks():
    """(path, line, code) of every ```python block whose previous line is the marker."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == MARKER:
                assert lines[i + 1].strip() == "```python", f"{path.name}:{i + 1}: {MARKER} must precede ```python"
                end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
                out.append((path, i + 2, "\n".join(lines[i + 2:end]) + "\n"))
    return out


BLOCKS = runnable_blocks()


def test_there_are_runnable_blocks():
    """The README's tour has a runnable block, and the docs some more: the marker is in use."""
    assert any(p == README for p, _, _ in BLOCKS)
    assert len(BLOCKS) >= 3, [f"{p.name}:{n}" for p, n, _ in BLOCKS]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("path, line, code", BLOCKS, ids=[f"{p.name}:{n}" for p, n, _ in BLOCKS])
def test_runnable_block(path, line, code, tmp_path):
    """The block runs as a script from the repository root and exits 0."""
    script = tmp_path / f"{path.stem}_{line}.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{path.name}:{line}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def help_flags():
    """Every flag of `pipeline run`, `bench` and `devices`, from their --help (parsed in-process)."""
    flags = set()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "10000"  # argparse wraps help at hyphens ("--source-" / "param") otherwise
    try:
        for command in ("run", "bench", "devices"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main([command, "--help"]) == 0
            flags |= set(FLAG.findall(out.getvalue()))
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    assert {"--workers", "--modes", "--json", "--traceback"} <= flags
    return flags


def test_every_flag_in_the_docs_exists(help_flags):
    """A --flag in README.md or docs/*.md is pipeline's (run, bench, devices) or a listed other tool's."""
    unknown = {}
    for path in DOCS:
        for flag in set(FLAG.findall(path.read_text())) - help_flags - set(FOREIGN):
            unknown.setdefault(flag, []).append(path.name)
    assert not unknown, f"flags in the docs that no --help has: {unknown}"


def test_foreign_flags_of_our_scripts_exist():
    """A flag listed as one of our scripts' is defined there."""
    for flag, owner in FOREIGN.items():
        if owner.startswith("scripts/"):
            assert f'"{flag}"' in (ROOT / owner).read_text(), (flag, owner)


def test_every_help_flag_is_documented_in_cli_md(help_flags):
    """docs/cli.md mentions every flag that `pipeline run/bench/devices --help` shows."""
    documented = set(FLAG.findall((ROOT / "docs" / "cli.md").read_text()))
    assert help_flags - {"--help"} - documented == set()


def configuration_rows() -> dict[str, str]:
    """docs/configuration.md's table: key -> the default cell."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        m = re.match(r"\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_config_key_is_documented_with_its_default():
    """Each key of config.py has a row in configuration.md whose default is the dataclass's, and every row's
    key exists in config.py."""
    rows = configuration_rows()
    assert set(config.KEYS) - set(rows) == set(), "keys missing from docs/configuration.md"
    assert set(rows) - set(config.KEYS) == set(), "docs/configuration.md documents keys config.py lacks"
    for key, field in config.KEYS.items():
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        default = MACHINE_DEFAULTS.get(key, default)
        documented = tomllib.loads(f"v = {rows[key]}")["v"]
        same_type = type(documented) is type(default) or (type(default) is float and type(documented) is int)
        assert documented == default and same_type, (key, rows[key], default)


def test_every_dotted_key_in_the_docs_exists():
    """A `section.key` in backticks anywhere in the docs names a real config key (or a params entry)."""
    sections = "|".join(config.SECTIONS)
    pattern = re.compile(rf"`(?:\[?)((?:{sections})\.[a-z_]+)")
    bad = {}
    for path in DOCS:
        for key in set(pattern.findall(path.read_text())):
            if key.rsplit(".", 1)[1] in ("py", "json", "toml"):  # a file name: handoff.py, run.json
                continue
            if key not in config.KEYS and not re.match(r"(kernel|source)\.params", key):
                bad.setdefault(key, []).append(path.name)
    assert not bad, bad


def test_every_note_block_is_summarised():
    """Each NOTE [ Name ] in the code has a row in docs/architecture.md."""
    names = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        names |= set(re.findall(r"NOTE \[ ([^\]]+?) \]", path.read_text()))
    table = (ROOT / "docs" / "architecture.md").read_text()
    assert len(names) >= 15
    assert {n for n in names if f"| {n} |" not in table} == set()


def anchors(path: pathlib.Path) -> set[str]:
    """The #anchors of a Markdown page's headings, as GitHub makes them."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_relative_links_resolve():
    """Every relative link and image in README.md and docs/*.md points at a file or folder that exists, and
    an #anchor at a heading of that page."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for path in DOCS:
        for target in link.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            where = path.parent / file if file else path
            if not where.exists() or (anchor and where.suffix == ".md" and anchor not in anchors(where)):
                broken.append(f"{path.name}: {target}")
    assert not broken


def test_readme_is_a_front_door():
    """README.md stays short, and its two set-up commands are the ones CI runs (.ci/run)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m pipeline run --workers 4" in text
    assert ".venv/bin/pip install -e '.[test,ray,plot,spdl,parquet,images,text,daft]' && .venv/bin/python -m pytest" in text
    assert "python3 -m venv .venv" in ci and "pip install -q -e '.[test,ray,plot,spdl,parquet,images,text,daft]'" in ci
    assert ".venv/bin/python -m pytest" in ci
