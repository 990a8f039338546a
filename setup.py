"""Build the fastiocp C extension.

Metadata lives in pyproject.toml; this file only declares the extension.
Sources are picked by platform (SOURCES below, also read by tools/wine/).

Switches (environment variables):
  FASTIOCP_DEBUG=1     -O0 -g, assertions on
  FASTIOCP_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (Linux)
"""
import os
import sys

# The CPython binding (csrc/binding/, one file per concern) and the backend
# table every platform shares.
BINDING = [
    "csrc/binding/module.c",
    "csrc/binding/port.c",
    "csrc/binding/thread_state.c",
    "csrc/binding/completion.c",
    "csrc/binding/message.c",
    "csrc/binding/pool.c",
    "csrc/binding/sockaddr.c",
    "csrc/binding/filehandle.c",
]
# The asyncio loop's C fast path (csrc/loop/), built into the same extension.
LOOP = ["csrc/loop/transport.c", "csrc/loop/core.c"]
COMMON = ["csrc/common.c"] + BINDING + LOOP
SOURCES = {
    "linux": COMMON
    + ["csrc/unix/hub.c", "csrc/unix/timerheap.c", "csrc/unix/nonblock.c", "csrc/unix/io_uring.c",
       "csrc/unix/epoll.c"],
    "win32": COMMON + ["csrc/win/iocp.c"],
}
INCLUDE_DIRS = {"linux": ["csrc"], "win32": ["csrc"]}
DEFINE_MACROS = {
    "linux": [],
    "win32": [("WIN32_LEAN_AND_MEAN", "1"), ("_WIN32_WINNT", "0x0601")],
}
LIBRARIES = {"linux": ["pthread"], "win32": ["ws2_32", "mswsock", "kernel32"]}


def platform_key():
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "win32":
        return "win32"
    return None


def extension():
    from setuptools import Extension

    key = platform_key()
    if key is None:
        raise SystemExit(
            "fastiocp supports Windows (IOCP) and Linux (io_uring, epoll); "
            f"there is no backend for {sys.platform} yet"
        )
    extra_compile, extra_link = [], []
    macros = list(DEFINE_MACROS[key])
    if key == "linux":
        # -fvisibility=hidden: only PyInit__fastiocp is exported, so calls
        # between the binding, common.c and the backends (fiocp__op_alloc
        # and op_free per operation) are direct, not through the PLT.
        extra_compile += ["-std=gnu99", "-Wall", "-Wextra", "-Wno-unused-parameter",
                          "-Wno-missing-field-initializers", "-fno-strict-aliasing",
                          "-fvisibility=hidden"]
        if os.environ.get("FASTIOCP_DEBUG"):
            extra_compile += ["-O0", "-g3", "-UNDEBUG"]
        if os.environ.get("FASTIOCP_SANITIZE"):
            flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                     "-fno-sanitize-recover=undefined", "-g"]
            extra_compile += flags
            extra_link += flags
    return Extension(
        "fastiocp._fastiocp",
        sources=SOURCES[key],
        include_dirs=INCLUDE_DIRS[key],
        libraries=LIBRARIES[key],
        define_macros=macros,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
    )


if __name__ == "__main__":
    from setuptools import setup

    setup(ext_modules=[extension()])
