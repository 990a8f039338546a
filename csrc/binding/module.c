/* module.c: the module _fastiocp: its state (exceptions, interned
 * strings, the fork generation), the mapping of fiocp codes to exceptions,
 * backend_status() and PyInit__fastiocp(). The types live in their own
 * files (binding.h lists them).
 */
#include "binding.h"
#include "../loop/loop.h"

#include <errno.h>
#include <string.h>

#ifndef _WIN32
# include <pthread.h>
#endif

/* ======================================================================
 * Module state
 * ====================================================================== */

PyObject* fb_FastIOCPError;
PyObject* fb_BackendUnavailableError;
PyObject* fb_PortClosedError;
PyObject* fb_InvalidStateError;
PyObject* fb_socket_type;     /* socket.socket */
PyObject* fb_str_fileno;      /* "fileno", interned */
PyObject* fb_kind_names[FIOCP_OP__COUNT];

/* Bumped in the child after fork() (binding.h). */
volatile unsigned long fb_fork_generation;
#ifdef Py_GIL_DISABLED
PyMutex fb_detach_mu;
#endif

#ifndef _WIN32
static void on_fork_child(void) { fb_fork_generation++; }
#endif

/* ======================================================================
 * Errors
 * ====================================================================== */

void fb_set_closed_error(void) {
  PyErr_SetString(fb_PortClosedError, "I/O operation on closed CompletionPort");
}

#define TIMEOUT_MESSAGE \
  "the operation timed out (its timeout expired and the port cancelled it)"

#define ENOBUFS_MESSAGE                                                     \
  "the buffer pool had no free buffer when data arrived: nothing was read; " \
  "release buffers, then receive again"

/* Raises type(err, message): one of fastiocp's own codes as the errno
 * Python spells it on each platform (WSAE* on Windows). */
static void set_errno_error(PyObject* type, int err, const char* message) {
  PyObject* args = Py_BuildValue("(is)", err, message);
  if (args != NULL) {
    PyErr_SetObject(type, args);
    Py_DECREF(args);
  }
}

/* Raises the exception for a negative fiocp code. Returns NULL. */
PyObject* fb_set_code_error(int64_t code) {
  if (code == FIOCP_ECLOSED) {
    fb_set_closed_error();
  } else if (code == FIOCP_ENOMEM) {
    PyErr_NoMemory();
  } else if (code == FIOCP_EUNSUPPORTED) {
    PyErr_SetString(PyExc_NotImplementedError,
                    "operation not supported by this backend");
  } else if (code == FIOCP_ETIMEDOUT) {
#ifdef _WIN32
    set_errno_error(PyExc_TimeoutError, WSAETIMEDOUT, TIMEOUT_MESSAGE);
#else
    set_errno_error(PyExc_TimeoutError, ETIMEDOUT, TIMEOUT_MESSAGE);
#endif
  } else if (code == FIOCP_ENOBUFS) {
#ifdef _WIN32
    set_errno_error(PyExc_OSError, WSAENOBUFS, ENOBUFS_MESSAGE);
#else
    set_errno_error(PyExc_OSError, ENOBUFS, ENOBUFS_MESSAGE);
#endif
  } else if (code == FIOCP_EOWNHANDLE) {
    PyErr_SetString(PyExc_ValueError,
                    "that handle belongs to this CompletionPort itself (its "
                    "kernel queue or wake-up descriptor): it cannot be "
                    "registered");
  } else {
#ifdef _WIN32
    PyErr_SetExcFromWindowsErr(PyExc_OSError, (int)-code);
#else
    errno = (int)-code;
    PyErr_SetFromErrno(PyExc_OSError);
#endif
  }
  return NULL;
}

PyObject* fb_take_exception(void) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (value != NULL && tb != NULL) (void)PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  return value;
}

/* The exception object (not raised) for a failed operation: OSError picks
 * the subclass (ConnectionResetError, ...) from errno/winerror. */
PyObject* fb_make_code_error(int64_t code) {
  fb_set_code_error(code);
  return fb_take_exception();
}

int fb_is_cancel_code(int64_t code) {
#ifdef _WIN32
  return code == -(int64_t)ERROR_OPERATION_ABORTED;
#else
  return code == -ECANCELED;
#endif
}

/* ======================================================================
 * Module
 * ====================================================================== */

static PyObject* mod_backend_status(PyObject* m, PyObject* Py_UNUSED(ignored)) {
  PyObject* list = PyList_New(0);
  int i;
  (void)m;
  if (list == NULL) return NULL;
  for (i = 0; i < fiocp__nbackends; i++) {
    char why[256];
    int rc;
    PyObject* item;
    why[0] = 0;
    rc = fiocp__backends[i]->probe(why, sizeof(why));
    item = Py_BuildValue("(sOs)", fiocp__backends[i]->name,
                         rc == 0 ? Py_True : Py_False, rc == 0 ? "" : why);
    if (item == NULL || PyList_Append(list, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(list);
      return NULL;
    }
    Py_DECREF(item);
  }
  return list;
}

/* backend_operations(name): how that backend does each operation. */
static PyObject* mod_backend_operations(PyObject* m, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
  const fiocp_backend_t* b;
  PyObject* d;
  int k;
  static const char* const how[] = {"unsupported", "native", "emulated"};
  (void)m;
  if (name == NULL) {
    if (!PyErr_Occurred())
      PyErr_Format(PyExc_TypeError, "backend name must be a str, not %.100s",
                   Py_TYPE(arg)->tp_name);
    return NULL;
  }
  b = fiocp__backend_by_name(name);
  if (b == NULL) {
    PyErr_Format(PyExc_ValueError, "no backend %R in this build", arg);
    return NULL;
  }
  d = PyDict_New();
  if (d == NULL) return NULL;
  for (k = 0; k < FIOCP_OP__COUNT; k++) {
    /* A backend without a table does the seed's operations natively. */
    int v = b->support != NULL ? b->support[k]
                               : (k >= FIOCP_OP_READ && k <= FIOCP_OP_POST);
    PyObject* key = k == FIOCP_SUPPORT_TIMEOUT ? PyUnicode_FromString("timeout")
                                               : Py_NewRef(fb_kind_names[k]);
    PyObject* val = PyUnicode_FromString(how[v <= 2 ? v : 0]);
    int rc = key && val ? PyDict_SetItem(d, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    if (rc < 0) {
      Py_DECREF(d);
      return NULL;
    }
  }
  return d;
}

static PyMethodDef module_methods[] = {
    {"backend_operations", (PyCFunction)mod_backend_operations, METH_O,
     "backend_operations($module, name, /)\n--\n\nHow backend `name` does "
     "each operation: {op: 'native' | 'emulated' | 'unsupported'}, plus "
     "'timeout' for per-operation timeouts."},
    {"backend_status", (PyCFunction)mod_backend_status, METH_NOARGS,
     "backend_status($module)\n--\n\nFor each backend compiled in, best first: "
     "(name, works_here, reason_if_not)."},
#ifdef _WIN32
    {"_win_open", (PyCFunction)fb_mod_win_open, METH_VARARGS,
     "_win_open($module, path, readable, writable, kind, direct)\n--\n\nOpen a file "
     "for overlapped I/O (kind: 'r', 'w', 'a' or 'x'); returns the HANDLE."},
    {"_win_close_handle", (PyCFunction)fb_mod_win_close_handle, METH_VARARGS,
     "_win_close_handle($module, handle)\n--\n\nCloseHandle()."},
    {"_win_file_size", (PyCFunction)fb_mod_win_file_size, METH_VARARGS,
     "_win_file_size($module, handle)\n--\n\nThe file's size in bytes."},
    {"_win_truncate", (PyCFunction)fb_mod_win_truncate, METH_VARARGS,
     "_win_truncate($module, handle, size)\n--\n\nSet the file's size."},
#endif
    {NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fastiocp._fastiocp",
    "I/O completion ports: the C core of fastiocp.", -1, module_methods,
};

static PyObject* new_exception(PyObject* m, const char* name, PyObject* bases,
                               const char* doc) {
  PyObject* e = PyErr_NewExceptionWithDoc(name, doc, bases, NULL);
  if (e == NULL) return NULL;
  if (PyModule_AddObject(m, strrchr(name, '.') + 1, e) < 0) {
    Py_DECREF(e);
    return NULL;
  }
  Py_INCREF(e); /* one for the module, one for the static */
  return e;
}

PyMODINIT_FUNC PyInit__fastiocp(void) {
  static const char* names[FIOCP_OP__COUNT] = {
      "", "read", "write", "recv", "send", "recvfrom", "sendto",
      "accept", "connect", "post", "poll", "sendmsg", "recvmsg",
      "sendfile", "wait_process", "timer", "fsync", "connect_pipe"};
  PyObject *m, *sockmod, *bases;
  int i;
#ifdef _WIN32
  {
    WSADATA wsa;
    int rc = WSAStartup(MAKEWORD(2, 2), &wsa);
    if (rc != 0) return PyErr_SetExcFromWindowsErr(PyExc_OSError, rc);
  }
#endif
#ifndef _WIN32
  {
    static int atfork_done;
    if (!atfork_done) {
      int rc = pthread_atfork(NULL, NULL, on_fork_child);
      if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
      }
      atfork_done = 1;
    }
  }
#endif
  if (fiocp__nbackends == 0) {
    PyErr_SetString(PyExc_ImportError,
                    "fastiocp has no backend for this platform (it supports "
                    "Windows IOCP and Linux io_uring/epoll)");
    return NULL;
  }
  if (PyType_Ready(&fb_CompletionType) < 0 || PyType_Ready(&fb_BatchType) < 0 ||
      PyType_Ready(&fb_ThreadSlotsType) < 0 || PyType_Ready(&fb_FileHandleType) < 0 ||
      PyType_Ready(&fb_CompletionPortType) < 0 ||
      PyType_Ready(&fb_BufferPoolType) < 0 ||
      PyType_Ready(&fb_PooledBufferType) < 0)
    return NULL;
  for (i = 0; i < FIOCP_OP__COUNT; i++) {
    if (fb_kind_names[i] == NULL) {
      fb_kind_names[i] = PyUnicode_InternFromString(names[i]);
      if (fb_kind_names[i] == NULL) return NULL;
    }
  }
  if (fb_str_fileno == NULL) {
    fb_str_fileno = PyUnicode_InternFromString("fileno");
    if (fb_str_fileno == NULL) return NULL;
  }
  if (fb_str_thread_slots == NULL) {
    fb_str_thread_slots = PyUnicode_InternFromString("fastiocp.thread_slots");
    if (fb_str_thread_slots == NULL) return NULL;
  }
  sockmod = PyImport_ImportModule("socket");
  if (sockmod == NULL) return NULL;
  fb_socket_type = PyObject_GetAttrString(sockmod, "socket");
  Py_DECREF(sockmod);
  if (fb_socket_type == NULL || fb_handles_init() < 0) return NULL;

  m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
#ifdef Py_GIL_DISABLED
  /* Safe without the GIL: see binding.h's head comment. */
  if (PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0) goto fail;
#endif
  fb_FastIOCPError = new_exception(m, "fastiocp.FastIOCPError", NULL,
                                   "Base class of fastiocp's own exceptions.");
  if (fb_FastIOCPError == NULL) goto fail;
  bases = PyTuple_Pack(2, fb_FastIOCPError, PyExc_OSError);
  fb_BackendUnavailableError =
      bases ? new_exception(m, "fastiocp.BackendUnavailableError", bases,
                            "No usable backend, or the one asked for cannot "
                            "work on this machine (the message says why).")
            : NULL;
  Py_XDECREF(bases);
  if (fb_BackendUnavailableError == NULL) goto fail;
  bases = PyTuple_Pack(2, fb_FastIOCPError, PyExc_ValueError);
  fb_PortClosedError = bases ? new_exception(m, "fastiocp.PortClosedError", bases,
                                             "The CompletionPort is closed.")
                             : NULL;
  Py_XDECREF(bases);
  if (fb_PortClosedError == NULL) goto fail;
  bases = PyTuple_Pack(2, fb_FastIOCPError, PyExc_RuntimeError);
  fb_InvalidStateError =
      bases ? new_exception(m, "fastiocp.InvalidStateError", bases,
                            "result() was called before the operation "
                            "completed.")
            : NULL;
  Py_XDECREF(bases);
  if (fb_InvalidStateError == NULL) goto fail;

  if (PyModule_AddIntConstant(m, "POLLIN", FIOCP_POLLIN) < 0 ||
      PyModule_AddIntConstant(m, "POLLPRI", FIOCP_POLLPRI) < 0 ||
      PyModule_AddIntConstant(m, "POLLOUT", FIOCP_POLLOUT) < 0 ||
      PyModule_AddIntConstant(m, "POLLERR", FIOCP_POLLERR) < 0 ||
      PyModule_AddIntConstant(m, "POLLHUP", FIOCP_POLLHUP) < 0)
    goto fail;
  Py_INCREF(&fb_CompletionType);
  if (PyModule_AddObject(m, "Completion", (PyObject*)&fb_CompletionType) < 0) {
    Py_DECREF(&fb_CompletionType);
    goto fail;
  }
  Py_INCREF(&fb_CompletionPortType);
  if (PyModule_AddObject(m, "CompletionPort", (PyObject*)&fb_CompletionPortType) <
      0) {
    Py_DECREF(&fb_CompletionPortType);
    goto fail;
  }
  Py_INCREF(&fb_FileHandleType);
  if (PyModule_AddObject(m, "_FileHandle", (PyObject*)&fb_FileHandleType) < 0) {
    Py_DECREF(&fb_FileHandleType);
    goto fail;
  }
  Py_INCREF(&fb_BufferPoolType);
  if (PyModule_AddObject(m, "BufferPool", (PyObject*)&fb_BufferPoolType) < 0) {
    Py_DECREF(&fb_BufferPoolType);
    goto fail;
  }
  Py_INCREF(&fb_PooledBufferType);
  if (PyModule_AddObject(m, "PooledBuffer", (PyObject*)&fb_PooledBufferType) <
      0) {
    Py_DECREF(&fb_PooledBufferType);
    goto fail;
  }
  if (PyModule_AddIntConstant(m, "POOL_MAX", FIOCP_POOL_MAX) < 0) goto fail;
  if (fb_loop_init(m) < 0) goto fail;
  return m;
fail:
  Py_DECREF(m);
  return NULL;
}
