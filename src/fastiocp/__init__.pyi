"""Type stubs for fastiocp."""
import os
from typing import Any, Union

from ._fastiocp import (
    BackendUnavailableError as BackendUnavailableError,
    Completion as Completion,
    FastIOCPError as FastIOCPError,
    InvalidStateError as InvalidStateError,
    PortClosedError as PortClosedError,
    __version__ as __version__,
    backend_status as backend_status,
)
from ._fastiocp import CompletionPort as _CCompletionPort
from ._files import File as File, open as open
from ._workers import EXIT as EXIT, WorkerPool as WorkerPool

__all__: list[str]

class _Batch:
    def __enter__(self) -> "CompletionPort": ...
    def __exit__(self, *exc: object) -> None: ...

class CompletionPort(_CCompletionPort):
    def batch(self) -> _Batch: ...

def available_backends() -> list[str]: ...
