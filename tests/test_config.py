"""Config: TOML -> frozen dataclasses, overrides, validation errors that name key, value and file."""
from pathlib import Path

import pytest

from pipeline import Config, ConfigError, load_config
from pipeline.config import parse_value

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.spawn  # (the default itself)
def test_defaults_match_default_toml():
    """configs/default.toml holds exactly the built-in defaults."""
    assert load_config(ROOT / "configs" / "default.toml") == Config()


@pytest.mark.parametrize("name", ["default", "cpu-ci", "gpu"])
def test_shipped_configs_load(name):
    """Every shipped config is valid."""
    load_config(ROOT / "configs" / f"{name}.toml")


def test_file_then_overrides(tmp_path):
    """Overrides beat the file, the file beats defaults; kernel params merge."""
    p = tmp_path / "c.toml"
    p.write_text('[source]\nrows = 10\ncols = 3\n[kernel]\nname = "sum"\n[kernel.params]\na = 1\n')
    cfg = load_config(p, {"source.rows": 7, "kernel.params.b": [1, 2]})
    assert (cfg.source.rows, cfg.source.cols, cfg.kernel.name) == (7, 3, "sum")
    assert cfg.kernel.params == {"a": 1, "b": [1, 2]}


@pytest.mark.parametrize("text, fragment", [
    ("[source]\nrowz = 1\n", "unknown key 'source.rowz' (did you mean source.rows?)"),
    ("[workers]\nrows = 1\n", "unknown key 'workers.rows' (did you mean source.rows?)"),
    ("[source]\nfoo = 1\n", "unknown key 'source.foo' (known in [source]: source.kind,"),
    ("[sauce]\nrows = 1\n", "unknown section [sauce]"),
    ("[source]\nrows = 'ten'\n", "source.rows = 'ten'"),
    ("[source]\nrows = 0\n", "must be >= 1"),
    ("[source]\nbatches = 0\n", "source.batches = 0"),
    ("[workers]\ncount = -1\n", "workers.count = -1"),
    ("[workers]\ndevice = 'tpu'\n", "auto, cpu, cuda or cuda:N"),
    ("[workers]\nstart_method = 'fork'\n", "Cannot re-initialize CUDA in forked subprocess"),
    ("[source]\ndtype = 'complex64'\n", "must be one of"),
    ("[faults]\non_error = 'ignore'\n", "fail, skip"),
    ("[run]\nprogress = 1\n", "expected true or false"),
    ("source = 3\n", "must be a table"),
    ("[source\n", "not valid TOML"),
])
def test_bad_file_names_key_value_and_file(tmp_path, text, fragment):
    """Each bad config raises ConfigError with one line naming what is wrong and the file."""
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg
    assert "bad.toml" in msg


def test_missing_file():
    """A missing config file is a ConfigError naming the path."""
    with pytest.raises(ConfigError, match="not found: nope.toml"):
        load_config("nope.toml")


def test_config_error_is_value_error():
    """ConfigError is also a ValueError."""
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text, value", [("3", 3), ("2.5", 2.5), ("true", True), ("[1, 2]", [1, 2]),
                                         ("abc", "abc"), ('"x y"', "x y"), ("cuda:1", "cuda:1")])
def test_parse_value_as_toml(text, value):
    """--set/--param values parse as TOML, else as plain strings."""
    assert parse_value(text) == value


def test_threads_default_caps_cores(monkeypatch):
    """Threads per worker default to max(1, usable CPUs // workers)."""
    monkeypatch.setattr("pipeline.devices.usable_cpus", lambda: 16)
    assert Config().replace(**{"workers.count": 4}).threads_per_worker() == 4
    assert Config().replace(**{"workers.count": 32}).threads_per_worker() == 1
    assert Config().replace(**{"workers.threads": 3}).threads_per_worker() == 3
