/* filehandle.c: OS handles. The _FileHandle type (the base of
 * fastiocp.File), the conversion of what a submit method is given (an int,
 * a socket, a File, anything with fileno()) to an OS handle, and on Windows
 * the file helpers behind fastiocp.open().
 */
#include "binding.h"

#include <limits.h>

/* ======================================================================
 * Handles
 * ====================================================================== */

/* The base of fastiocp.File (src/fastiocp/_files.py): the OS handle in a C
 * field, so that submitting on a File reads it directly. -1: closed. */
struct FileHandleObject {
  PyObject_HEAD
  int64_t handle;
};

/* The handle, read and closed atomically on free-threaded builds: a File
 * closed by one thread while another submits on it. */
static inline int64_t handle_load(struct FileHandleObject* f) {
#ifdef Py_GIL_DISABLED
  return _Py_atomic_load_int64(&f->handle);
#else
  return f->handle;
#endif
}

static inline int64_t handle_detach(struct FileHandleObject* f) {
#ifdef Py_GIL_DISABLED
  return _Py_atomic_exchange_int64(&f->handle, -1);
#else
  int64_t h = f->handle;
  f->handle = -1;
  return h;
#endif
}

/* The OS handle a Python int names, range-checked where it enters C: a
 * descriptor on POSIX (0 to INT_MAX, the kernel's int), a HANDLE or SOCKET
 * on Windows (pointer-sized). Never truncated: 2**32 + 1 must not become
 * descriptor 1. Returns 0, or -1 with ValueError/TypeError. */
static int handle_from_int(PyObject* num, fiocp_handle_t* out) {
  if (!PyLong_Check(num)) {
    PyErr_Format(PyExc_TypeError, "a handle must be an int, not %.100s",
                 Py_TYPE(num)->tp_name);
    return -1;
  }
#ifdef _WIN32
  {
    unsigned long long v = PyLong_AsUnsignedLongLong(num);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) ||
        v > (unsigned long long)UINTPTR_MAX) {
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError, "invalid handle %R", num);
      return -1;
    }
    *out = (fiocp_handle_t)v;
  }
#else
  {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(num, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow != 0 || v < 0 || v > INT_MAX) {
      if (overflow < 0 || v < 0)
        PyErr_Format(PyExc_ValueError,
                     "file descriptor cannot be a negative integer (%R): is "
                     "the file or socket closed?",
                     num);
      else
        PyErr_Format(PyExc_ValueError,
                     "file descriptor %R is out of range (0 to %d)", num,
                     INT_MAX);
      return -1;
    }
    *out = (fiocp_handle_t)v;
  }
#endif
  return 0;
}

/* A File whose __init__ fails must not name descriptor 0 (its __del__
 * would close stdin): it starts closed. */
static PyObject* FileHandle_new(PyTypeObject* type, PyObject* args,
                                PyObject* kwds) {
  PyObject* self = PyType_GenericNew(type, args, kwds);
  if (self != NULL) ((struct FileHandleObject*)self)->handle = -1;
  return self;
}

static int FileHandle_init(struct FileHandleObject* self, PyObject* args,
                           PyObject* kwds) {
  static char* kwlist[] = {"handle", NULL};
  PyObject* num;
  fiocp_handle_t h;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:_FileHandle", kwlist, &num) ||
      handle_from_int(num, &h) < 0)
    return -1;
  self->handle = (int64_t)h;
  return 0;
}

static PyObject* FileHandle_fileno(struct FileHandleObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  int64_t h = handle_load(self);
  if (h < 0) {
    PyErr_SetString(PyExc_ValueError, "I/O operation on closed file");
    return NULL;
  }
  return PyLong_FromLongLong((long long)h);
}

static PyObject* FileHandle_detach(struct FileHandleObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  return PyLong_FromLongLong((long long)handle_detach(self));
}

static PyObject* FileHandle_get_closed(struct FileHandleObject* self,
                                       void* c) {
  (void)c;
  return PyBool_FromLong(handle_load(self) < 0);
}

static PyMethodDef FileHandle_methods[] = {
    {"fileno", (PyCFunction)FileHandle_fileno, METH_NOARGS,
     "fileno($self)\n--\n\nThe OS handle (a file descriptor on Linux, a HANDLE "
     "on Windows)."},
    {"_detach", (PyCFunction)FileHandle_detach, METH_NOARGS,
     "Forget the handle (mark closed) and return it, or -1 if closed."},
    {NULL}};

static PyGetSetDef FileHandle_getset[] = {
    {"closed", (getter)FileHandle_get_closed, NULL,
     "True once the handle has been closed.", NULL},
    {NULL}};

PyTypeObject fb_FileHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._FileHandle",
    .tp_basicsize = sizeof(struct FileHandleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Base of fastiocp.File: an OS handle kept in C.",
    .tp_init = (initproc)FileHandle_init,
    .tp_new = FileHandle_new,
    .tp_methods = FileHandle_methods,
    .tp_getset = FileHandle_getset,
};

/* Sockets: the descriptor read from the socket object, with no Python
 * fileno() call per operation (a quarter of what submitting a send cost).
 * CPython's socket object begins with its descriptor (PySocketSockObject in
 * Modules/socketmodule.h: sock_fd right after the object header, on every
 * version this builds for). That is trusted only once the first open socket
 * seen agreed with its own fileno(), and only for objects whose fileno() is
 * _socket.socket's own and that have no __dict__ to shadow it. */
typedef struct {
  PyObject_HEAD
#ifdef _WIN32
  SOCKET fd;
#else
  int fd;
#endif
} socket_head_t;

static PyTypeObject* csocket_type; /* _socket.socket */
static PyObject* csocket_fileno;   /* its fileno method descriptor */
static int csocket_layout;         /* 0: unchecked, 1: agrees, -1: unused */

#ifdef Py_GIL_DISABLED
# define LAYOUT_LOAD() _Py_atomic_load_int_relaxed(&csocket_layout)
# define LAYOUT_STORE(v) _Py_atomic_store_int_relaxed(&csocket_layout, (v))
#else
# define LAYOUT_LOAD() csocket_layout
# define LAYOUT_STORE(v) (csocket_layout = (v))
#endif

int fb_handles_init(void) {
  PyObject *mod, *type;
  if (csocket_type != NULL || LAYOUT_LOAD() < 0) return 0; /* done before */
  mod = PyImport_ImportModule("_socket");
  if (mod == NULL) return -1;
  type = PyObject_GetAttrString(mod, "socket");
  Py_DECREF(mod);
  if (type == NULL) return -1;
  if (PyType_Check(type) &&
      ((PyTypeObject*)type)->tp_basicsize >= (Py_ssize_t)sizeof(socket_head_t))
    csocket_fileno = _PyType_Lookup((PyTypeObject*)type, fb_str_fileno);
  if (csocket_fileno == NULL) {
    Py_DECREF(type); /* not the object expected: fileno() every time */
    LAYOUT_STORE(-1);
    return 0;
  }
  Py_INCREF(csocket_fileno);
  csocket_type = (PyTypeObject*)type;
  return 0;
}

/* The descriptor a socket object holds, as its fileno() returns it.
 * Returns 1 with *fd set, or 0 when obj is not a socket read this way (or
 * is closed: fileno() then raises the usual error). */
static int socket_fd_of(PyObject* obj, long long* fd) {
  PyTypeObject* type = Py_TYPE(obj);
  int layout = LAYOUT_LOAD();
  long long v;
  if (layout < 0 || csocket_type == NULL || !PyType_IsSubtype(type, csocket_type) ||
      type->tp_dictoffset != 0 || _PyType_Lookup(type, fb_str_fileno) != csocket_fileno)
    return 0;
#ifdef _WIN32
  {
    SOCKET s;
# ifdef Py_GIL_DISABLED
    s = (SOCKET)_Py_atomic_load_uint64_relaxed((uint64_t*)&((socket_head_t*)obj)->fd);
# else
    s = ((socket_head_t*)obj)->fd;
# endif
    if (s == INVALID_SOCKET) return 0;
    v = (long long)s;
  }
#else
# ifdef Py_GIL_DISABLED
  v = _Py_atomic_load_int_relaxed(&((socket_head_t*)obj)->fd);
# else
  v = ((socket_head_t*)obj)->fd;
# endif
  if (v < 0) return 0;
#endif
  if (layout == 0) {
    /* The first open socket: its fileno() must say the same. */
    PyObject* num = PyObject_CallMethodNoArgs(obj, fb_str_fileno);
    long long said = -1;
    if (num != NULL && PyLong_Check(num)) said = PyLong_AsLongLong(num);
    Py_XDECREF(num);
    if (PyErr_Occurred()) PyErr_Clear(); /* the caller's fileno() reports it */
    LAYOUT_STORE(said == v ? 1 : -1);
    if (said != v) return 0;
  }
  *fd = v;
  return 1;
}

int fb_socket_fd(PyObject* obj, long long* fd) { return socket_fd_of(obj, fd); }

/* The OS handle of an int, a socket or any object with fileno(). */
int fb_get_handle(PyObject* obj, fiocp_handle_t* out) {
  PyObject* num;
  int rc;
  long long fd;
  if (PyObject_TypeCheck(obj, &fb_FileHandleType)) {
    /* fastiocp.File: no Python-level fileno() call per operation. Its
     * handle was range-checked when it was set. */
    int64_t v = handle_load((struct FileHandleObject*)obj);
    if (v < 0) {
      PyErr_SetString(PyExc_ValueError, "I/O operation on closed file");
      return -1;
    }
    *out = (fiocp_handle_t)v;
    return 0;
  }
  if (PyLong_Check(obj)) return handle_from_int(obj, out);
  if (socket_fd_of(obj, &fd)) {
    *out = (fiocp_handle_t)fd;
    return 0;
  }
  num = PyObject_CallMethodNoArgs(obj, fb_str_fileno);
  if (num == NULL) {
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError,
                   "expected a file descriptor, a socket or an object "
                   "with fileno(), not %.100s",
                   Py_TYPE(obj)->tp_name);
    }
    return -1;
  }
  if (!PyLong_Check(num)) {
    PyErr_SetString(PyExc_TypeError, "fileno() must return an int");
    Py_DECREF(num);
    return -1;
  }
  rc = handle_from_int(num, out);
  Py_DECREF(num);
  return rc;
}


#ifdef _WIN32
/* ======================================================================
 * Windows file helpers
 *
 * Thin wrappers of fiocp__win_*() (win/iocp.c) for src/fastiocp/_files.py:
 * fastiocp.open() needs a HANDLE opened with FILE_FLAG_OVERLAPPED, which
 * neither open() nor os.open() gives. Handles travel as Python ints.
 * ====================================================================== */

/* PyArg "O&" converter of a handle argument (handle_from_int). */
static int handle_converter(PyObject* obj, void* out) {
  return handle_from_int(obj, (fiocp_handle_t*)out) < 0 ? 0 : 1;
}

PyObject* fb_mod_win_open(PyObject* m, PyObject* args) {
  PyObject* path;
  int readable, writable, kind, direct, rc;
  wchar_t* wpath;
  fiocp_handle_t h = 0;
  (void)m;
  if (!PyArg_ParseTuple(args, "UppCp:_win_open", &path, &readable, &writable,
                        &kind, &direct))
    return NULL;
  wpath = PyUnicode_AsWideCharString(path, NULL);
  if (wpath == NULL) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = fiocp__win_open(wpath, readable, writable, kind, direct, &h);
  Py_END_ALLOW_THREADS
  PyMem_Free(wpath);
  if (rc < 0)
    return PyErr_SetExcFromWindowsErrWithFilenameObject(PyExc_OSError, -rc,
                                                        path);
  return PyLong_FromUnsignedLongLong((unsigned long long)h);
}

PyObject* fb_mod_win_close_handle(PyObject* m, PyObject* args) {
  fiocp_handle_t h;
  int rc;
  (void)m;
  if (!PyArg_ParseTuple(args, "O&:_win_close_handle", handle_converter, &h)) return NULL;
  rc = fiocp__win_close_handle((fiocp_handle_t)h);
  if (rc < 0) return fb_set_code_error(rc);
  Py_RETURN_NONE;
}

PyObject* fb_mod_win_file_size(PyObject* m, PyObject* args) {
  fiocp_handle_t h;
  int64_t size = 0;
  int rc;
  (void)m;
  if (!PyArg_ParseTuple(args, "O&:_win_file_size", handle_converter, &h)) return NULL;
  rc = fiocp__win_file_size((fiocp_handle_t)h, &size);
  if (rc < 0) return fb_set_code_error(rc);
  return PyLong_FromLongLong((long long)size);
}

PyObject* fb_mod_win_truncate(PyObject* m, PyObject* args) {
  fiocp_handle_t h;
  long long size;
  int rc;
  (void)m;
  if (!PyArg_ParseTuple(args, "O&L:_win_truncate", handle_converter, &h, &size))
    return NULL;
  if (size < 0) {
    PyErr_SetString(PyExc_ValueError, "size must be >= 0");
    return NULL;
  }
  Py_BEGIN_ALLOW_THREADS
  rc = fiocp__win_truncate((fiocp_handle_t)h, (int64_t)size);
  Py_END_ALLOW_THREADS
  if (rc < 0) return fb_set_code_error(rc);
  Py_RETURN_NONE;
}
#endif /* _WIN32: Windows file helpers */
