"""Errors: one base class; each subclass also derives from the builtin a caller would catch.

Messages are one line that names the key, file, value or batch, and says what to do.
"""
import enum
import pickle


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A bad setting: the message names the key, the value and where it came from."""


class HandoffError(PipelineError, pickle.PicklingError):
    """Something that must not cross the process boundary (device or autograd tensor)."""


class KernelError(PipelineError, TypeError):
    """A kernel that cannot be loaded, set up or sent to the workers."""


class WorkerError(PipelineError, RuntimeError):
    """A worker failed in a way that has no exception of its own (crash, kernel SystemExit)."""


class OutputError(PipelineError, OSError):
    """The output directory cannot be written (not a directory, permissions, a full disk): names the path.

    ``errno`` is the underlying OSError's; no half-written file is left under a final name.
    """


class Interrupted(BaseException):
    """SIGTERM turned into an exception, so that `finally` blocks clean up (exit 143)."""


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    QUARANTINED = 3
    INTERRUPTED = 130
    TERMINATED = 143


class RemoteTraceback(Exception):
    """The worker's formatted traceback, attached as ``__cause__`` of a re-raised error."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb
