/*
 * pyconfig.h for building fastiocp extension modules with mingw-w64
 * (x86_64-w64-mingw32-gcc) against the official 64-bit Windows CPython
 * (python3XY.dll from the embeddable distribution), 3.11 and newer.
 *
 * Written for this project: only what the platform-neutral CPython headers
 * consult when compiling an *extension* (not the interpreter itself).
 * tools/wine/test.sh copies it next to the other CPython headers, replacing
 * the host's (Linux) pyconfig.h.
 */
#ifndef FASTIOCP_WIN_PYCONFIG_H
#define FASTIOCP_WIN_PYCONFIG_H

#if !defined(_WIN64) || !defined(__x86_64__)
#  error "this pyconfig.h is for x86_64 Windows targets (x86_64-w64-mingw32-gcc) only"
#endif

#ifdef Py_BUILD_CORE
#  error "this pyconfig.h cannot build the interpreter, only extension modules"
#endif

/* Windows API level: Windows 8 unless the includer asked for another.
 * mingw-w64 otherwise defaults to 0x0A00 (Windows 10). */
#ifndef _WIN32_WINNT
#  define _WIN32_WINNT 0x0602
#endif
#define Py_WINVER _WIN32_WINNT

/* ---- platform identity ---- */
#define MS_WINDOWS 1
#define MS_WIN32 1     /* historical: any Windows, 32 or 64 bit */
#define MS_WIN64 1
#define NT_THREADS 1   /* Win32 threads; Py_tss_t's native key is a DWORD */

/* The interpreter lives in python3XY.dll: the headers then declare the C API
 * __declspec(dllimport) and PyMODINIT_FUNC __declspec(dllexport). */
#define Py_ENABLE_SHARED 1
#define HAVE_DECLSPEC_DLL 1
#define HAVE_DYNAMIC_LOADING 1

/* ---- LLP64 data model (must match the MSVC-built python3XY.dll) ---- */
#define SIZEOF_SHORT 2
#define SIZEOF_INT 4
#define SIZEOF_LONG 4
#define SIZEOF_LONG_LONG 8
#define SIZEOF_VOID_P 8
#define SIZEOF_SIZE_T 8
#define SIZEOF_UINTPTR_T 8
#define SIZEOF_TIME_T 8
#define SIZEOF_FLOAT 4
#define SIZEOF_DOUBLE 8
#define SIZEOF_FPOS_T 8
#define SIZEOF_OFF_T 4
#define SIZEOF_WCHAR_T 2
#define SIZEOF__BOOL 1
#define ALIGNOF_SIZE_T 8
#define ALIGNOF_LONG 4
/* SIZEOF_PID_T stays undefined, as in the official build: the headers then
 * treat pid_t values as C int (PyLong_FromPid == PyLong_FromLong). */
/* Py_ssize_t: the headers derive it from intptr_t (64-bit), which is the
 * official build's __int64. */

/* x86_64 is little-endian: WORDS_BIGENDIAN stays undefined. */

/* wchar_t is 16-bit UTF-16 on Windows. */
#define HAVE_WCHAR_H 1
#define HAVE_STDDEF_H 1
#define HAVE_LARGEFILE_SUPPORT 1

/* Features of the official build that a few headers check. */
#define WITH_DOC_STRINGS 1
#define WITH_PYMALLOC 1
#define HAVE_LONG_LONG 1

/* Not defined on purpose (all differ from the official release DLLs):
 *   Py_DEBUG, Py_TRACE_REFS, Py_REF_DEBUG  (debug build: python3XY_d.dll)
 *   Py_GIL_DISABLED                        (free-threaded build: python3XYt.dll)
 *   HAVE_PTHREAD_H, _POSIX_THREADS, HAVE_UNISTD_H
 */

#endif /* FASTIOCP_WIN_PYCONFIG_H */
