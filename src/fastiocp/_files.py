"""Files opened for overlapped (asynchronous) I/O on every OS."""
from __future__ import annotations

import os
import sys
from typing import Any

from ._fastiocp import _FileHandle

__all__ = ["File", "open"]

_builtin_open = open


def _parse_mode(mode: str) -> tuple[bool, bool, str]:
    """(readable, writable, creation) for a mode such as 'rb', 'w+', 'a'."""
    chars = set(mode)
    if not chars <= set("rwaxb+t") or len(chars) != len(mode):
        raise ValueError(f"invalid mode: {mode!r}")
    if "t" in chars:
        raise ValueError("fastiocp files are binary: mode 't' is not supported")
    kinds = chars & set("rwax")
    if len(kinds) != 1:
        raise ValueError(f"mode must have exactly one of r, w, a, x: {mode!r}")
    kind = kinds.pop()
    plus = "+" in chars
    readable = kind == "r" or plus
    writable = kind != "r" or plus
    return readable, writable, kind


class File(_FileHandle):
    """A file opened for asynchronous I/O through a CompletionPort.

    On Windows the handle is opened with FILE_FLAG_OVERLAPPED; on Linux it is
    an ordinary descriptor. Pass it to CompletionPort.register(), read() and
    write() like a socket. fileno() returns the OS handle.
    """

    __slots__ = ("name", "mode", "__weakref__")

    def __init__(self, handle: int, name: Any, mode: str) -> None:
        super().__init__(handle)  # fileno() and closed come from the C base
        self.name = name
        self.mode = mode

    def size(self) -> int:
        """The file's current size in bytes."""
        if sys.platform == "win32":
            from . import _fastiocp

            return _fastiocp._win_file_size(self.fileno())
        return os.fstat(self.fileno()).st_size

    def truncate(self, size: int) -> None:
        """Set the file's size."""
        if sys.platform == "win32":
            from . import _fastiocp

            _fastiocp._win_truncate(self.fileno(), size)
        else:
            os.ftruncate(self.fileno(), size)

    def close(self) -> None:
        """Close the handle. Idempotent."""
        handle = self._detach()
        if handle >= 0:
            if sys.platform == "win32":
                from . import _fastiocp

                _fastiocp._win_close_handle(handle)
            else:
                os.close(handle)

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self.closed:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"handle={self.fileno()}"
        return f"<fastiocp.File name={self.name!r} mode={self.mode!r} {state}>"


def open(path: str | bytes | os.PathLike[Any], mode: str = "rb", *, direct: bool = False) -> File:
    """Open a file for asynchronous I/O.

    mode is 'r', 'w', 'a' or 'x', optionally with '+' and 'b' (binary is the
    only kind). direct=True bypasses the page cache (O_DIRECT on Linux,
    FILE_FLAG_NO_BUFFERING on Windows): buffers, offsets and lengths must
    then be aligned to the device's block size.
    """
    readable, writable, kind = _parse_mode(mode)
    if sys.platform == "win32":
        from . import _fastiocp

        handle = _fastiocp._win_open(os.fsdecode(os.fspath(path)), readable, writable, kind, direct)
        return File(handle, path, mode)
    flags = os.O_CLOEXEC
    if readable and writable:
        flags |= os.O_RDWR
    elif writable:
        flags |= os.O_WRONLY
    else:
        flags |= os.O_RDONLY
    if kind == "w":
        flags |= os.O_CREAT | os.O_TRUNC
    elif kind == "a":
        flags |= os.O_CREAT | os.O_APPEND
    elif kind == "x":
        flags |= os.O_CREAT | os.O_EXCL
    if direct:
        flags |= getattr(os, "O_DIRECT", 0)
    fd = os.open(path, flags, 0o666)
    return File(fd, path, mode)
