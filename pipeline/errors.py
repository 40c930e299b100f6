"""Errors: one base class; each subclass also derives from the builtin a caller would catch.

Messages are one line that names the key, file, value or batch, and says what to do.
"""
import enum
import pickle
import traceback
from typing import NamedTuple


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


class SampleError(PipelineError, RuntimeError):
    """A dataset's sample that could not be fetched (its exception is the ``__cause__``), or that does not
    fit its batch (another shape or dtype than sample 0): names the sample, the batch and the field."""


class PackedError(NamedTuple):
    """NOTE [ Wire errors ]
    An exception on its way from a child (a worker, a build process, a Ray actor) to the main, both halves
    in one class, as CPython's ``_ExceptionWithTraceback``: ``pack`` in the child (the exception itself
    when it pickles, else None; its one line "Type: message"; the formatted traceback), ``exception`` in
    the main (the child's exception as its own type, ``where`` in its message, the child's traceback as
    ``__cause__``). It travels as a plain tuple: ``packed.text`` is all a summary needs."""
    exc: BaseException | None
    text: str
    tb: str

    @classmethod
    def pack(cls, e: BaseException) -> "PackedError":
        """In the child, inside the ``except`` that caught ``e``."""
        tb = traceback.format_exc()
        if isinstance(e, (SystemExit, KeyboardInterrupt)):
            e = WorkerError(f"kernel raised {type(e).__name__}({e})")
        text = f"{type(e).__name__}: {e}"
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - unpicklable exceptions travel as text
            e = None
        return cls(e, text, tb)

    def exception(self, where: str) -> BaseException:
        """In the main: the child's exception as its own type, ``where`` in its message, the remote
        traceback as cause."""
        exc, text, tb = self
        if exc is None:
            exc = WorkerError(text)
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{where}: {exc.args[0]}",) + tuple(exc.args[1:])
        else:
            exc.args = (f"{where}: {text}",) + tuple(exc.args)
        exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
        exc.batch_where = where
        return exc
