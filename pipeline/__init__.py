"""pipeline: batch compute on GPUs or CPUs across spawn worker processes.

    import pipeline
    r = pipeline.run(workers=2, batches=8, kernel="matmul")
    r.summary["checksum"], r.results[0]
    for i, result in pipeline.imap(workers=2, batches=1000, kernel="fft"):   # streamed, bounded memory
        ...
    with pipeline.Pipeline(kernel="matmul", workers=4) as p:                 # workers kept warm
        p.run(batches=8); p.run(batches=16)
"""
import sys as _sys

import signal as _signal

# `python -m pipeline`, still importing: a Ctrl-C now is held, and main() reports it (one line, exit 130)
if _sys.argv[:1] == ["-m"] and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    EARLY_SIGINT: list = []
    _signal.signal(_signal.SIGINT, lambda signum, frame: EARLY_SIGINT.append(signum))

from .config import Config, load_config  # noqa: E402
from .errors import (ConfigError, ExitCode, HandoffError, KernelError, OutputError, PipelineError,
                     SampleError, WorkerError)

__all__ = ["run", "imap", "Pipeline", "Stream", "RunResult", "read_output", "Config", "load_config", "PipelineError", "ConfigError", "HandoffError",
           "KernelError", "WorkerError", "OutputError", "SampleError", "ExitCode"]
__version__ = "0.1.0"


def __getattr__(name):
    """``run``, ``imap``, ``Pipeline`` import torch: loaded on first use, so ``--help`` and Ctrl-C stay quick."""
    if name in ("run", "imap", "Pipeline", "Stream", "RunResult"):
        from . import runner
        return getattr(runner, name)
    if name == "read_output":
        from .sinks import read_output
        return read_output
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
