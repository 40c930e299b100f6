"""TOML -> frozen dataclasses, with CLI overrides and validation.

Every setting has a dotted key (``source.rows``). A config is built from the built-in defaults (the same
values as ``configs/default.toml``), then a TOML file, then overrides; each value remembers where it came
from, so that a bad one is reported as ``source.rows = -1 (from --rows): must be >= 1``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import devices
from .errors import ConfigError

DTYPES = ("float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8")
START_METHODS = ("spawn", "forkserver")
FORK_REFUSED = (
    "workers.start_method = 'fork' is refused: CUDA cannot be re-initialised in a forked child "
    "(\"Cannot re-initialize CUDA in forked subprocess\") and a stdlib pool then hangs; "
    "use 'spawn' (default) or 'forkserver'"
)
# Where the slot ring lives: shared memory, or the temp dir on systems without /dev/shm (macOS).
RING_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class SourceConfig:
    kind: str = "synthetic"  # synthetic | npy (a .npy/.npz file or a directory of .npy files) | parquet | dataset | images | text
    batches: int = 64
    rows: int = 4096
    cols: int = 1024
    dtype: str = "float32"
    seed: int = 0
    path: str = ""
    key: str = ""
    object: str = ""  # "package.module:name": a map-style dataset, or a callable returning one (given params)
    params: dict = field(default_factory=dict)  # keyword arguments for that callable
    batch_size: int = 0  # 0: each item of a dataset is a batch (Parquet: 1024 rows); B: batch k holds samples kB .. kB+B-1
    drop_last: bool = False  # drop a last batch shorter than batch_size
    columns: list = field(default_factory=list)  # Parquet / a pyarrow.Table: the columns of a batch ([]: every numeric one)
    keep_columns: list = field(default_factory=list)  # Parquet input: columns carried to Parquet output, not computed
    image_size: int = 224  # images: the S x S centre crop
    resize: int = 0  # images: the shorter side resized to this first; 0 = round(image_size * 256 / 224)
    layout: str = "nhwc"  # images: nhwc (B, S, S, 3) or nchw (B, 3, S, S)
    bad_samples: str = "fail"  # images: a file that can't be decoded fails its batch, or "skip" (valid False)
    decode: str = "main"  # images: decoded on the main's build threads, or "device": bytes in, decoded by each worker
    decoder: str = "auto"  # images: JPEGs through simplejpeg when installed (NOTE [ JPEG path ]), or "pillow"
    # samples of their own length (docs/data.md, NOTE [ Ragged fields ], NOTE [ Batch plans ])
    ragged: list = field(default_factory=list)  # the ragged fields ([]: found by comparing a few samples)
    max_length: int = 0  # a bound on a sample's length (0: none); longer ones cut or failed (on_long)
    max_tokens: int = 0  # a token budget: rows x padded length <= max_tokens per batch (0: none)
    order: str = "auto"  # input | length: samples grouped by length (auto: length for text, else input)
    pad_multiple: int = 8  # a batch's padded length is rounded up to a multiple of this
    pad_values: dict = field(default_factory=dict)  # field -> the value its padding takes (default 0)
    on_long: str = "truncate"  # a sample over max_length: truncate (counted in the summary) | fail its batch
    text_column: str = ""  # text: the column of documents (JSON Lines, CSV, Parquet); "" = "text"
    tokenizer: str = ""  # text: a tokenizer.json or a directory with one ("": the text kernel's model directory)


@dataclass(frozen=True)
class KernelConfig:
    name: str = "matmul"
    params: dict = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 2
    device: str = "auto"
    start_method: str = "spawn"
    threads: int = 0  # 0: max(1, usable CPUs // count) (devices.usable_cpus: affinity, cgroup quota)
    build_threads: int = 0  # 0: auto (Config.build_threads)
    build_processes: int = 0  # spawn processes that build a dataset's batches into the slots (GIL-bound Python)


@dataclass(frozen=True)
class HandoffConfig:
    in_flight: int = 0  # 0: build threads + 2 x workers
    slot_mb: float = 0.0  # 0: the largest batch
    pinned: bool = True
    dir: str = RING_DIR  # the slot ring's directory (a tmpfs); see docs/containers.md


@dataclass(frozen=True)
class FaultsConfig:
    max_attempts: int = 3
    batch_timeout_s: float = 0.0  # 0: off
    on_error: str = "fail"  # fail | skip


@dataclass(frozen=True)
class RunConfig:
    progress: bool = True
    output: str = ""
    overwrite: bool = False
    backend: str = "local"  # local | ray
    ray_address: str = ""  # "": start a local Ray; "auto": join this machine's cluster; or host:port
    ray_build: str = "auto"  # who builds a Ray run's batches: auto (the actors when they can) | actors | driver
    output_format: str = "npy"  # npy (batch-N.npy / .npz) | parquet (part-N.parquet)
    trace: str = ""  # a Chrome trace-event JSON of the run, written here at its end (NOTE [ Trace ])


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    handoff: HandoffConfig = field(default_factory=HandoffConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys replaced (``cfg.replace(**{"workers.count": 0})``), validated."""
        values = {k: (v, "replace()") for k, v in dotted.items()}
        return _build(_flatten(self.to_dict()), values)

    def threads_per_worker(self) -> int:
        if self.workers.threads:
            return self.workers.threads
        return max(1, devices.usable_cpus() // max(1, self.workers.count))

    def build_threads(self, cuda: bool) -> int:
        """Threads that build batches in the main. Auto: on CUDA every usable CPU but one per worker (a
        GPU worker keeps about one core busy feeding its GPU); on the CPU every usable CPU: a build thread
        runs only while a slot is free, so when the workers' compute is the bottleneck the slots are full
        and the builders sleep, and when the build is, the workers wait and the cores build. Never more
        than the slots (``handoff.in_flight``)."""
        if self.workers.build_threads:
            n = self.workers.build_threads
        elif cuda:
            n = max(1, devices.usable_cpus() - self.workers.count)
        else:
            n = devices.usable_cpus()
        return min(n, self.handoff.in_flight) if self.handoff.in_flight else n

    def in_flight(self, cuda: bool = False) -> int:
        """Slots: one per build thread, and two per worker (one computing, one queued)."""
        return self.handoff.in_flight or self.build_threads(cuda) + 2 * max(1, self.workers.count)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "source": SourceConfig, "kernel": KernelConfig, "workers": WorkersConfig,
    "handoff": HandoffConfig, "faults": FaultsConfig, "run": RunConfig,
}
KEYS = {
    f"{s}.{f.name}": f for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)
}
MINIMUM = {
    "source.batches": 1, "source.rows": 1, "source.cols": 1, "source.seed": 0,
    "workers.count": 0, "workers.threads": 0, "workers.build_threads": 0, "workers.build_processes": 0,
    "handoff.in_flight": 0, "handoff.slot_mb": 0, "source.batch_size": 0, "source.image_size": 1,
    "source.resize": 0, "source.max_length": 0, "source.max_tokens": 0, "source.pad_multiple": 1,
    "faults.max_attempts": 1, "faults.batch_timeout_s": 0,
}
CHOICES = {
    "source.kind": ("synthetic", "npy", "parquet", "dataset", "images", "text"),
    "source.layout": ("nhwc", "nchw"),
    "source.bad_samples": ("fail", "skip"),
    "source.decode": ("main", "device"),
    "source.decoder": ("auto", "pillow"),
    "source.order": ("auto", "input", "length"),
    "source.on_long": ("truncate", "fail"),
    "source.dtype": DTYPES,
    "workers.start_method": START_METHODS,
    "faults.on_error": ("fail", "skip"),
    "kernel.precision": ("fp32", "tf32", "bf16", "fp16"),
    "run.backend": ("local", "ray"),
    "run.ray_build": ("auto", "actors", "driver"),
    "run.output_format": ("npy", "parquet"),
}
PARAMS = ("kernel", "source")  # sections with a free-form ``params`` table (keyword arguments)

# The run settings, once: ``run(**overrides)`` keywords and ``python -m pipeline run`` flags (``--name-with-
# dashes``, or FLAGS'), and the config keys they set. cli.py adds a flag for each (tests/test_cli.py checks
# that every flag is here, and every name here a flag, but for SET_ONLY: those are set with --set KEY=V).
OVERRIDES = {
    "workers": "workers.count", "batches": "source.batches", "rows": "source.rows",
    "cols": "source.cols", "dtype": "source.dtype", "seed": "source.seed", "kernel": "kernel.name",
    "device": "workers.device", "start_method": "workers.start_method",
    "threads_per_worker": "workers.threads", "build_threads": "workers.build_threads", "progress": "run.progress",
    "in_flight": "handoff.in_flight", "slot_mb": "handoff.slot_mb", "pinned": "handoff.pinned",
    "max_attempts": "faults.max_attempts", "batch_timeout_s": "faults.batch_timeout_s",
    "on_error": "faults.on_error", "precision": "kernel.precision", "input": "source.path",
    "input_key": "source.key", "output": "run.output", "overwrite": "run.overwrite", "backend": "run.backend",
    "ray_address": "run.ray_address", "ray_build": "run.ray_build", "source_object": "source.object",
    "batch_size": "source.batch_size", "drop_last": "source.drop_last",
    "build_processes": "workers.build_processes", "columns": "source.columns",
    "keep_columns": "source.keep_columns", "output_format": "run.output_format",
    "image_size": "source.image_size", "resize": "source.resize", "layout": "source.layout",
    "bad_samples": "source.bad_samples", "decode": "source.decode", "decoder": "source.decoder",
    "ragged": "source.ragged", "max_length": "source.max_length", "max_tokens": "source.max_tokens",
    "order": "source.order", "pad_multiple": "source.pad_multiple", "pad_values": "source.pad_values",
    "on_long": "source.on_long", "text_column": "source.text_column", "tokenizer": "source.tokenizer",
    "trace": "run.trace",
}
FLAGS = {"source_object": "--source", "batch_timeout_s": "--batch-timeout", "progress": "--no-progress"}
SET_ONLY = ("slot_mb", "pinned", "ray_build", "pad_values", "decoder")  # no flag of their own
# What the workers were started with: a call on a running Pipeline can't change it.
FIXED = ("kernel.", "workers.count", "workers.device", "workers.start_method", "workers.threads",
         "handoff.pinned", "run.backend", "run.ray_address")


def flag(name: str) -> str:
    """The command-line flag of run setting ``name``."""
    return FLAGS.get(name, f"--{name.replace('_', '-')}")


def override_key(name: str) -> tuple[str, str]:
    """(the config key, where a value came from) for a ``run()`` keyword or a dotted key; ConfigError naming
    the closest setting for an unknown one."""
    if name in OVERRIDES:
        return OVERRIDES[name], flag(name)
    if "." in name:
        return name, f"--set {name}"
    close = difflib.get_close_matches(name, OVERRIDES, n=1, cutoff=0.7)
    raise ConfigError(f"unknown setting '{name}' (did you mean {close[0]}?)" if close else
                      f"unknown setting '{name}' (known: {', '.join(OVERRIDES)}, or a dotted key such as "
                      f"source.rows)")


def _is_param(key: str) -> bool:
    section, _, rest = key.partition(".")
    return section in PARAMS and (rest == "params" or rest.startswith("params."))


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, arrays, quoted strings), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                origins: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (dotted keys; ``kernel.params.X``)."""
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        where = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {where}") from None
        except IsADirectoryError:
            raise ConfigError(f"config path is a directory, not a TOML file: {where}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from None
        for key, value in _flatten(data, strict_where=where).items():
            values[key] = (value, where)
    for key, value in (overrides or {}).items():
        values[key] = (value, (origins or {}).get(key, f"override {key}"))
    return _build(_flatten(Config().to_dict()), values)


def _flatten(data: Mapping, strict_where: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{strict_where}: unknown section [{section}] "
                              f"(known: {', '.join(SECTIONS)})")
        if not isinstance(body, Mapping):
            raise ConfigError(f"{strict_where}: [{section}] must be a table, got {body!r}")
        for key, value in body.items():
            if section in PARAMS and key == "params":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{strict_where}: {section}.params must be a table, got {value!r}")
                for p, v in value.items():
                    out[f"{section}.params.{p}"] = v
            else:
                out[f"{section}.{key}"] = value
    return out


def _build(base: dict[str, Any], values: Mapping[str, tuple[Any, str]]) -> Config:
    flat = {k: (v, "defaults") for k, v in base.items() if not _is_param(k)}
    params = {s: {k.split(".", 2)[2]: v for k, v in base.items() if k.startswith(f"{s}.params.")} for s in PARAMS}
    for key, (value, where) in values.items():
        section = key.split(".", 1)[0]
        if _is_param(key) and key.count(".") >= 2:
            params[section][key.split(".", 2)[2]] = value
        elif _is_param(key):
            params[section].update(value)
        elif key in KEYS:
            flat[key] = (value, where)
        else:
            close = ([k for k in KEYS if k.split(".")[1] == key.split(".")[-1]]  # the wrong section
                     or difflib.get_close_matches(key, KEYS, n=1, cutoff=0.8))  # a typo
            same = [k for k in KEYS if k.startswith(f"{section}.")]
            hint = (f" (did you mean {close[0]}?)" if close else
                    f" (known in [{section}]: {', '.join(same)})" if same else
                    f" (the sections are {', '.join(sorted({k.split('.')[0] for k in KEYS}))})")
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    sections: dict[str, dict] = {s: {} for s in _SECTION_CLASSES}
    for key, (value, where) in flat.items():
        section, name = key.split(".")
        sections[section][name] = _check(key, value, where)
    for section in PARAMS:
        sections[section]["params"] = params[section]
    return Config(**{s: _SECTION_CLASSES[s](**body) for s, body in sections.items()})


def _check(key: str, value: Any, where: str) -> Any:
    default = KEYS[key].default if KEYS[key].default is not dataclasses.MISSING else None
    kind = list if KEYS[key].default_factory is list else type(default)
    bad = f"{key} = {value!r} (from {where})"
    if kind is list:  # names: a list of strings, or one string "a,b" (the command line's form)
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{bad}: expected a list of names, e.g. [\"a\", \"b\"] or \"a,b\"")
        value = [n.strip() for n in names if n.strip()]
        if len(set(value)) != len(value):
            raise ConfigError(f"{bad}: a name is given twice")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{bad}: expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{bad}: expected an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{bad}: expected a number")
        value = float(value)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{bad}: expected a string")
    elif KEYS[key].default_factory is dict:  # (source.pad_values: field -> number)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                     and not isinstance(v, bool) for k, v in value.items()):
            raise ConfigError(f"{bad}: expected a table of field = number, e.g. {{input_ids = 0}}")
        value = dict(value)
    if key in MINIMUM and value < MINIMUM[key]:
        raise ConfigError(f"{bad}: must be >= {MINIMUM[key]}")
    if key == "workers.start_method" and value == "fork":
        raise ConfigError(f"{FORK_REFUSED} (from {where})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{bad}: must be one of {', '.join(CHOICES[key])}")
    if key == "workers.device" and not _DEVICE.match(value):
        raise ConfigError(f"{bad}: must be auto, cpu, cuda or cuda:N")
    if key == "handoff.dir" and not os.path.isdir(value):
        what = "is not a directory" if os.path.exists(value) else "does not exist"
        raise ConfigError(f"{bad}: {what}; give an existing directory, ideally a tmpfs such as /dev/shm")
    return value
