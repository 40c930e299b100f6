"""Built-in kernels, loading ``package.module:name``, and sending callables to spawn workers.

A kernel is a callable ``f(tensor) -> tensor``, or a class with ``setup(self, device, **params)`` and
``__call__(self, tensor)``. ``make`` builds it once per worker, on the worker's device; the worker then
calls it once per batch. ``KernelSpec`` is what travels to the workers: a name (built-in or import path),
or, for a callable spawn cannot import by name (defined in a notebook, ``python -``, a lambda, a closure),
the callable itself serialised by value with cloudpickle, once per worker.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import fields
from .errors import ConfigError, KernelError
from .images import torchvision as tv
from .text import models as text_models
from .sources.datasets import load_object

# The batch a worker is computing, for kernels that care (``faulty``). Set by ``compute.Computer``.
current = {"index": -1, "attempt": 1}


def _floating(x: torch.Tensor) -> torch.Tensor:
    """Integers, and float16 on the CPU (slow or unsupported there), compute in float32."""
    if not x.is_floating_point() or (x.dtype == torch.float16 and x.device.type == "cpu"):
        return x.float()
    return x


class Sum:
    """Per-row sum: a (rows, cols) batch gives a (rows,) result (a (rows,) field is its own sum)."""
    max_ndim: int | None = None  # the most dimensions a field may have (None: any; see _PerField)

    def setup(self, device, **params):
        if params:
            raise KernelError(f"kernel 'sum' takes no params, got {sorted(params)}")

    def __call__(self, x):
        return x.sum(1) if x.ndim > 1 else x


class _Lazy:
    """Weights depend on the batch's width, known at the first batch: built once, cached per (cols, dtype)."""

    def setup(self, device, seed=0, hidden=1024, **params):
        self.device, self.seed, self.hidden = device, int(seed), int(hidden)
        self.extra = params
        self._cache: dict = {}

    def _weights(self, cols, dtype):
        key = (cols, dtype)
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # built on the CPU: the same weights on every device
                self._cache[key] = self.build(cols, dtype)
        return self._cache[key]


class Matmul(_Lazy):
    """``relu(x @ W).sum(1)`` with W (cols x hidden) seeded by the ``seed`` param."""
    max_ndim = 2

    def build(self, cols, dtype):
        return (torch.randn(cols, self.hidden) / math.sqrt(cols)).to(self.device, dtype)

    def __call__(self, x):
        x = _floating(x)
        return torch.relu(x @ self._weights(x.shape[1], x.dtype)).sum(1)


class FFT:
    """Magnitude of the real FFT along each row: (rows, cols) -> (rows, cols // 2 + 1)."""
    max_ndim: int | None = None

    def setup(self, device, **params):
        pass

    def __call__(self, x):
        return torch.fft.rfft(_floating(x), dim=-1).abs()


class MLP(_Lazy):
    """A small seeded torch.nn model (cols -> hidden -> hidden -> out), eval mode, inference_mode."""
    max_ndim = 2

    def build(self, cols, dtype):
        out = int(self.extra.get("out", 16))
        model = torch.nn.Sequential(
            torch.nn.Linear(cols, self.hidden), torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, self.hidden), torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, out),
        )
        return model.to(self.device, dtype).eval()

    def __call__(self, x):
        x = _floating(x)
        with torch.inference_mode():
            return self._weights(x.shape[1], x.dtype)(x)


class Faulty(Sum):
    """Computes exactly like ``sum``, except at the batch indices its params name (fault injection).

    ``crash_on`` (killed by ``signal``, default 9), ``exit_on`` (``os._exit(0)``), ``raise_on``
    (RuntimeError), ``system_exit_on`` (SystemExit), ``hang_on`` (sleeps forever), ``oom_on`` (runs out
    of device memory: on CUDA for real, on the CPU a ``torch.OutOfMemoryError``), ``sticky_on`` (a CUDA
    error that leaves the context unusable: a device-side assert on CUDA, its message on the CPU),
    ``sleep`` (seconds per batch); faults strike only a batch's first attempt unless
    ``only_first_attempt = false``.
    """

    FAULTS = ("crash_on", "exit_on", "raise_on", "system_exit_on", "hang_on", "oom_on", "sticky_on")

    def setup(self, device, signal=9, sleep=0.0, only_first_attempt=True, **faults):
        unknown = set(faults) - set(self.FAULTS)
        if unknown:
            raise KernelError(f"kernel 'faulty': unknown params {sorted(unknown)}; "
                              f"known: {', '.join(self.FAULTS)}, signal, sleep, only_first_attempt")
        self.signal, self.sleep, self.first_only = int(signal), float(sleep), bool(only_first_attempt)
        self.faults = {k: {int(i) for i in _as_list(v)} for k, v in faults.items()}

    def __call__(self, x):
        i, attempt = current["index"], current["attempt"]
        if self.sleep:
            time.sleep(self.sleep)
        if not (self.first_only and attempt > 1):
            hit = {k for k, idx in self.faults.items() if i in idx}
            if "crash_on" in hit:
                os.kill(os.getpid(), self.signal)
                time.sleep(10)  # a signal that does not kill (ignored or handled) must not pass silently
                os._exit(70)
            if "exit_on" in hit:
                os._exit(0)
            if "raise_on" in hit:
                raise RuntimeError(f"faulty kernel: raise_on batch {i}")
            if "system_exit_on" in hit:
                raise SystemExit(f"faulty kernel: system_exit_on batch {i}")
            if "hang_on" in hit:
                while True:
                    time.sleep(3600)
            if "oom_on" in hit:
                if x.device.type == "cuda":
                    total = torch.cuda.get_device_properties(x.device).total_memory
                    torch.empty(2 * total, dtype=torch.uint8, device=x.device)  # more than the GPU has
                raise torch.OutOfMemoryError(f"faulty kernel: oom_on batch {i} (simulated on {x.device})")
            if "sticky_on" in hit:
                if x.device.type == "cuda":
                    bad = torch.tensor([x.shape[0] + 10], device=x.device)
                    x[bad].sum().item()  # out of bounds on the GPU: a device-side assert, sticky
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered (faulty kernel: "
                                   f"sticky_on batch {i}, simulated on {x.device})")
        return super().__call__(x)


def _as_list(v):
    return v if isinstance(v, (list, tuple, set)) else [v]


BUILTINS: dict[str, type] = {"sum": Sum, "matmul": Matmul, "fft": FFT, "mlp": MLP, "faulty": Faulty}


@dataclass(frozen=True)
class KernelSpec:
    """What the workers get: a name, or a by-value payload; plus the params (already host-only)."""
    name: str
    params: dict = field(default_factory=dict)
    payload: bytes | None = None
    precision: str = "fp32"  # every call runs under it (devices.precision)


def spec_for(kernel: str | Callable, params: dict, precision: str = "fp32") -> KernelSpec:
    """Check a kernel in the main process, so a bad one fails before any worker starts."""
    spec = _spec_for(kernel, params)
    return KernelSpec(spec.name, spec.params, spec.payload, precision)


def _spec_for(kernel: str | Callable, params: dict) -> KernelSpec:
    if isinstance(kernel, str):
        if kernel.startswith(tv.KERNEL_PREFIX):  # torchvision:NAME, a built-in (images/torchvision.py)
            tv.torchvision_models(kernel[len(tv.KERNEL_PREFIX):])
        elif kernel.startswith(text_models.PREFIXES):  # transformers:DIR, sentence-transformers:DIR
            text_models.check(kernel)
        elif kernel not in BUILTINS:
            _import(kernel)
        return KernelSpec(kernel, params)
    if not callable(kernel):
        raise KernelError(f"kernel must be a built-in name ({', '.join(BUILTINS)}), "
                          f"'package.module:name' or a callable, got {type(kernel).__name__}")
    ref = _reference(kernel)
    if ref is not None:
        return KernelSpec(ref, params)
    import cloudpickle
    label = getattr(kernel, "__qualname__", repr(kernel))
    try:
        payload = cloudpickle.dumps(kernel)
    except Exception as e:  # noqa: BLE001 - anything cloudpickle cannot handle
        raise KernelError(
            f"kernel {label!r} cannot be sent to spawn workers: {type(e).__name__}: {e}. "
            f"Move what it captures (open files, locks, sockets, CUDA tensors) into a class kernel's "
            f"setup(), or define it in an importable module"
        ) from e
    return KernelSpec(label, params, payload)


def _reference(obj) -> str | None:
    """``module:qualname`` when a spawn child can import ``obj`` by name, else None."""
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or mod in ("__main__", "__mp_main__") or "<" in qual:
        return None
    try:
        if _import(f"{mod}:{qual}") is obj:
            return f"{mod}:{qual}"
    except ConfigError:
        pass
    return None


def _import(path: str):
    if ":" not in path:
        raise ConfigError(f"kernel.name = '{path}': unknown kernel; built-ins are "
                          f"{', '.join(BUILTINS)}, or give 'package.module:name'")
    return load_object(path, "kernel.name")


class _PerField:
    """A built-in kernel on a batch of several fields (a tuple or dict): applied to each field of two or
    more dimensions, the others (labels, ids: one value per row) passed through; the results in the same
    structure. A kernel of your own gets the structure itself. A kernel whose weights are sized by the
    batch's width (``max_ndim = 2``) names a field of more dimensions (an image) and what to pass instead."""

    def __init__(self, kernel, name: str):
        self.kernel, self.name = kernel, name

    def _field(self, x):
        return self.kernel(x) if x.ndim >= 2 else x

    def _check(self, x) -> None:
        limit = self.kernel.max_ndim
        if limit is None:
            return
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, tuple) else [(None, x)]
        for key, v in items:
            if v.ndim > limit:
                what = "the batch" if key is None else f"field {key!r}"
                raise KernelError(f"kernel {self.name!r} computes on (rows, cols) batches, and {what} is "
                                  f"{str(v.dtype).replace('torch.', '')} {tuple(v.shape)}: pass a kernel for "
                                  f"this data (images: --kernel torchvision:resnet50, or pipeline.images:"
                                  f"pixel_means; any data: your own, docs/kernels.md), or reshape it in your "
                                  f"source")

    def __call__(self, x):
        self._check(x)
        return fields.map_fields(self._field, x) if isinstance(x, (tuple, dict)) else self.kernel(x)


def make(spec: KernelSpec, device: torch.device) -> Callable[[torch.Tensor], Any]:
    """Build the kernel on ``device``: runs once per worker (or once for the serial baseline)."""
    if spec.payload is not None:
        import cloudpickle
        obj = cloudpickle.loads(spec.payload)
    elif spec.name in BUILTINS:
        obj = BUILTINS[spec.name]
    elif spec.name.startswith(text_models.PREFIXES):
        return text_models.make(spec.name, device, spec.params)
    elif spec.name.startswith(tv.KERNEL_PREFIX):
        obj = tv.TorchVision()
        obj.setup(device, model=spec.name[len(tv.KERNEL_PREFIX):], **spec.params)
        return obj
    else:
        obj = _import(spec.name)
    if inspect.isclass(obj):
        obj = obj()
    if hasattr(obj, "setup"):
        obj.setup(device, **spec.params)
        return _PerField(obj, spec.name) if spec.name in BUILTINS and spec.payload is None else obj
    return functools.partial(obj, **spec.params) if spec.params else obj
