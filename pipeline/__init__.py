"""pipeline: batch compute on GPUs or CPUs across spawn worker processes.

    import pipeline
    r = pipeline.run(workers=2, batches=8, kernel="matmul")
    r.summary["checksum"], r.results[0]
"""
from .config import Config, load_config
from .errors import (ConfigError, ExitCode, HandoffError, KernelError, OutputError, PipelineError,
                     WorkerError)

__all__ = ["run", "RunResult", "Config", "load_config", "PipelineError", "ConfigError", "HandoffError",
           "KernelError", "WorkerError", "OutputError", "ExitCode"]
__version__ = "0.1.0"


def __getattr__(name):
    """``run`` and ``RunResult`` import torch: loaded on first use, so ``--help`` and Ctrl-C stay quick."""
    if name in ("run", "RunResult"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
