/* _fastiocp.c: the CPython binding. The only file that includes Python.h.
 *
 * Object model. Every submission creates one Completion object. The port
 * holds a strong reference to it (through the operation record's user
 * token) from submission until the completion is dequeued, so the buffer it
 * pins (a Py_buffer export) stays valid however many Python references the
 * user drops. get() hands that very object back, filled in: the object you
 * submitted is the completion you receive, as an OVERLAPPED is on Windows.
 *
 * GIL. Each Py_BEGIN_ALLOW_THREADS block holds one backend call and stores
 * its result; argument parsing, buffer exports and reference counting
 * happen before, result building after.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "fiocp.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#ifdef _WIN32
# include <ws2tcpip.h>
#else
# include <arpa/inet.h>
# include <netdb.h>
# include <netinet/in.h>
# include <pthread.h>
# include <sys/un.h>
# include <unistd.h>
#endif

/* Longest single transfer: what Linux does in one read()/write() call.
 * Larger buffers complete short, which callers must handle anyway. */
#define MAX_TRANSFER 0x7ffff000u

/* How long close() waits for cancelled operations to come back. */
#define CLOSE_TIMEOUT_MS 10000

/* ======================================================================
 * Module state
 * ====================================================================== */

static PyObject* FastIOCPError;
static PyObject* BackendUnavailableError;
static PyObject* PortClosedError;
static PyObject* InvalidStateError;
static PyObject* socket_type;     /* socket.socket */
static PyObject* str_fileno;      /* "fileno", interned */
static PyObject* kind_names[FIOCP_OP__COUNT];

static PyTypeObject CompletionType;
static PyTypeObject CompletionPortType;
static PyTypeObject FileHandleType;

/* Bumped in the child after fork(). A port belongs to the process that
 * created it: its ring, epoll set and threads are the parent's, and a child
 * that used them (or closed them on exit) would cancel and steal the
 * parent's completions. */
static volatile unsigned long fork_generation;

#ifndef _WIN32
static void on_fork_child(void) { fork_generation++; }
#endif

/* ======================================================================
 * Errors
 * ====================================================================== */

static void set_closed_error(void) {
  PyErr_SetString(PortClosedError, "I/O operation on closed CompletionPort");
}

/* Raises the exception for a negative fiocp code. Returns NULL. */
static PyObject* set_code_error(int64_t code) {
  if (code == FIOCP_ECLOSED) {
    set_closed_error();
  } else if (code == FIOCP_ENOMEM) {
    PyErr_NoMemory();
  } else if (code == FIOCP_EUNSUPPORTED) {
    PyErr_SetString(PyExc_NotImplementedError,
                    "operation not supported by this backend");
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

/* The exception object (not raised) for a failed operation: OSError picks
 * the subclass (ConnectionResetError, ...) from errno/winerror. */
static PyObject* make_code_error(int64_t code) {
  PyObject *type, *value, *tb;
  set_code_error(code);
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb != NULL) {
    PyException_SetTraceback(value, tb);
    Py_DECREF(tb);
  }
  Py_XDECREF(type);
  return value;
}

static int is_cancel_code(int64_t code) {
#ifdef _WIN32
  return code == -(int64_t)ERROR_OPERATION_ABORTED;
#else
  return code == -ECANCELED;
#endif
}

/* ======================================================================
 * Socket addresses
 * ====================================================================== */

/* Raises the error of the last failed socket call. */
static PyObject* set_socket_error(void) {
#ifdef _WIN32
  return PyErr_SetExcFromWindowsErr(PyExc_OSError, WSAGetLastError());
#else
  return PyErr_SetFromErrno(PyExc_OSError);
#endif
}

/* Python address from a sockaddr, in the socket module's shapes. */
static PyObject* make_sockaddr(const struct sockaddr_storage* ss,
                               fiocp_socklen_t len) {
  char host[INET6_ADDRSTRLEN];
  if (len <= 0) Py_RETURN_NONE;
  switch (ss->ss_family) {
    case AF_INET: {
      const struct sockaddr_in* a = (const struct sockaddr_in*)ss;
      if (inet_ntop(AF_INET, (void*)&a->sin_addr, host, sizeof(host)) == NULL)
        return set_socket_error();
      return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    case AF_INET6: {
      const struct sockaddr_in6* a = (const struct sockaddr_in6*)ss;
      if (inet_ntop(AF_INET6, (void*)&a->sin6_addr, host, sizeof(host)) == NULL)
        return set_socket_error();
      return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port),
                           (unsigned)ntohl(a->sin6_flowinfo),
                           (unsigned)a->sin6_scope_id);
    }
#ifndef _WIN32
    case AF_UNIX: {
      const struct sockaddr_un* a = (const struct sockaddr_un*)ss;
      size_t plen = (size_t)len - offsetof(struct sockaddr_un, sun_path);
      if ((size_t)len <= offsetof(struct sockaddr_un, sun_path))
        return PyUnicode_FromString("");
      if (a->sun_path[0] == 0) /* Linux abstract namespace: bytes */
        return PyBytes_FromStringAndSize(a->sun_path, (Py_ssize_t)plen);
      plen = strnlen(a->sun_path, plen);
      return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, (Py_ssize_t)plen);
    }
#endif
    default:
      return Py_BuildValue("(iy#)", (int)ss->ss_family, (const char*)ss,
                           (Py_ssize_t)len);
  }
}

/* PyArg "O&" converter of a host name, as the socket module takes one: a
 * str (ASCII as is, other text IDNA-encoded), bytes or bytearray, without
 * NUL characters. Stores a new bytes object. */
static int host_converter(PyObject* obj, void* out) {
  PyObject* b;
  if (PyUnicode_Check(obj)) {
    b = PyUnicode_IS_ASCII(obj) ? PyUnicode_AsUTF8String(obj)
                                : PyUnicode_AsEncodedString(obj, "idna", NULL);
  } else if (PyBytes_Check(obj) || PyByteArray_Check(obj)) {
    b = PyBytes_FromObject(obj);
  } else {
    PyErr_Format(PyExc_TypeError, "str, bytes or bytearray expected, not %s",
                 Py_TYPE(obj)->tp_name);
    return 0;
  }
  if (b == NULL) return 0;
  if (strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
    PyErr_SetString(PyExc_TypeError, "host name must not contain null character");
    Py_DECREF(b);
    return 0;
  }
  *(PyObject**)out = b;
  return 1;
}

/* Resolves host for family into out as the socket module does: "" is the
 * wildcard address, "<broadcast>" (IPv4) the broadcast address, numeric
 * addresses are parsed, other names go to the resolver (with the GIL
 * released: it may block on DNS). */
static int resolve_host(const char* host, int family, void* out) {
  struct addrinfo hints, *res = NULL;
  int rc;
  if (host[0] == 0) {
    if (family == AF_INET) memset(out, 0, sizeof(struct in_addr));
    else memset(out, 0, sizeof(struct in6_addr));
    return 0;
  }
  if (strcmp(host, "<broadcast>") == 0) {
    if (family != AF_INET) {
      PyErr_SetString(PyExc_OSError, "address family mismatched");
      return -1;
    }
    ((struct in_addr*)out)->s_addr = htonl(INADDR_BROADCAST);
    return 0;
  }
  if (inet_pton(family, host, out) == 1) return 0;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = family;
  Py_BEGIN_ALLOW_THREADS
  rc = getaddrinfo(host, NULL, &hints, &res);
  Py_END_ALLOW_THREADS
  if (rc != 0 || res == NULL) {
    PyErr_Format(PyExc_OSError, "cannot resolve host '%s': %s", host,
                 gai_strerror(rc));
    if (res) freeaddrinfo(res);
    return -1;
  }
  if (family == AF_INET)
    memcpy(out, &((struct sockaddr_in*)res->ai_addr)->sin_addr,
           sizeof(struct in_addr));
  else
    memcpy(out, &((struct sockaddr_in6*)res->ai_addr)->sin6_addr,
           sizeof(struct in6_addr));
  freeaddrinfo(res);
  return 0;
}

/* Parses a Python address for family into a sockaddr, accepting and
 * refusing exactly what the socket module's caller() (sendto, connect)
 * would, with the same exception types. */
static int parse_sockaddr(const char* caller, PyObject* addr, int family,
                          struct sockaddr_storage* ss, fiocp_socklen_t* len) {
  memset(ss, 0, sizeof(*ss));
  switch (family) {
    case AF_INET:
    case AF_INET6: {
      PyObject* host = NULL;
      int port, rc;
      unsigned int flowinfo = 0, scope_id = 0;
      if (!PyTuple_Check(addr)) {
        PyErr_Format(PyExc_TypeError, "%s(): %s address must be tuple, not %.500s",
                     caller, family == AF_INET ? "AF_INET" : "AF_INET6",
                     Py_TYPE(addr)->tp_name);
        return -1;
      }
      /* flowinfo and scope_id as the socket module reads them ('I': a
       * C unsigned int taken modulo 2**32), then range-checked. */
      rc = family == AF_INET
               ? PyArg_ParseTuple(addr, "O&i;AF_INET address must be a pair (host, port)",
                                  host_converter, &host, &port)
               : PyArg_ParseTuple(addr,
                                  "O&i|II;AF_INET6 address must be a tuple (host, "
                                  "port[, flowinfo[, scopeid]])",
                                  host_converter, &host, &port, &flowinfo,
                                  &scope_id);
      if (!rc) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError))
          PyErr_Format(PyExc_OverflowError, "%s(): port must be 0-65535.", caller);
        return -1;
      }
      if (port < 0 || port > 0xffff) {
        PyErr_Format(PyExc_OverflowError, "%s(): port must be 0-65535.", caller);
        Py_DECREF(host);
        return -1;
      }
      if (flowinfo > 0xfffff) {
        PyErr_Format(PyExc_OverflowError, "%s(): flowinfo must be 0-1048575.",
                     caller);
        Py_DECREF(host);
        return -1;
      }
      if (family == AF_INET) {
        struct sockaddr_in* a = (struct sockaddr_in*)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((unsigned short)port);
        rc = resolve_host(PyBytes_AS_STRING(host), AF_INET, &a->sin_addr);
        *len = (fiocp_socklen_t)sizeof(*a);
      } else {
        struct sockaddr_in6* a = (struct sockaddr_in6*)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((unsigned short)port);
        a->sin6_flowinfo = htonl(flowinfo);
        a->sin6_scope_id = scope_id;
        rc = resolve_host(PyBytes_AS_STRING(host), AF_INET6, &a->sin6_addr);
        *len = (fiocp_socklen_t)sizeof(*a);
      }
      Py_DECREF(host);
      return rc;
    }
#ifndef _WIN32
    case AF_UNIX: {
      struct sockaddr_un* a = (struct sockaddr_un*)ss;
      PyObject* path = NULL;
      char* p;
      Py_ssize_t plen;
      if (PyUnicode_Check(addr)) {
        path = PyUnicode_EncodeFSDefault(addr);
      } else if (PyBytes_Check(addr) || PyByteArray_Check(addr)) {
        path = PyBytes_FromObject(addr);
      } else {
        PyObject* fs = PyOS_FSPath(addr);
        if (fs == NULL) {
          if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s(): AF_UNIX address must be str, bytes or a "
                         "path, not %.100s",
                         caller, Py_TYPE(addr)->tp_name);
          }
          return -1;
        }
        if (PyUnicode_Check(fs)) {
          path = PyUnicode_EncodeFSDefault(fs);
          Py_DECREF(fs);
        } else {
          path = fs;
        }
      }
      if (path == NULL) return -1;
      p = PyBytes_AS_STRING(path);
      plen = PyBytes_GET_SIZE(path);
      if ((size_t)plen >= sizeof(a->sun_path)) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_OSError, "AF_UNIX path too long");
        return -1;
      }
      a->sun_family = AF_UNIX;
      memcpy(a->sun_path, p, (size_t)plen);
      *len = (fiocp_socklen_t)(offsetof(struct sockaddr_un, sun_path) +
                               (size_t)plen + (plen > 0 && p[0] != 0 ? 1 : 0));
      Py_DECREF(path);
      return 0;
    }
#endif
    default:
      PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
      return -1;
  }
}

/* ======================================================================
 * Handles
 * ====================================================================== */

/* The base of fastiocp.File (src/fastiocp/_files.py): the OS handle in a C
 * field, so that submitting on a File reads it directly. -1: closed. */
struct FileHandleObject {
  PyObject_HEAD
  long long handle;
};

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
  self->handle = (long long)h;
  return 0;
}

static PyObject* FileHandle_fileno(struct FileHandleObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  if (self->handle < 0) {
    PyErr_SetString(PyExc_ValueError, "I/O operation on closed file");
    return NULL;
  }
  return PyLong_FromLongLong(self->handle);
}

static PyObject* FileHandle_detach(struct FileHandleObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  long long h = self->handle;
  self->handle = -1;
  return PyLong_FromLongLong(h);
}

static PyObject* FileHandle_get_closed(struct FileHandleObject* self,
                                       void* c) {
  (void)c;
  return PyBool_FromLong(self->handle < 0);
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

static PyTypeObject FileHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._FileHandle",
    .tp_basicsize = sizeof(struct FileHandleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Base of fastiocp.File: an OS handle kept in C.",
    .tp_init = (initproc)FileHandle_init,
    .tp_new = FileHandle_new,
    .tp_methods = FileHandle_methods,
    .tp_getset = FileHandle_getset,
};

/* The OS handle of an int, a socket or any object with fileno(). */
static int get_handle(PyObject* obj, fiocp_handle_t* out) {
  PyObject* num;
  int rc;
  if (PyObject_TypeCheck(obj, &FileHandleType)) {
    /* fastiocp.File: no Python-level fileno() call per operation. Its
     * handle was range-checked when it was set. */
    long long v = ((struct FileHandleObject*)obj)->handle;
    if (v < 0) {
      PyErr_SetString(PyExc_ValueError, "I/O operation on closed file");
      return -1;
    }
    *out = (fiocp_handle_t)v;
    return 0;
  }
  if (PyLong_Check(obj)) return handle_from_int(obj, out);
  num = PyObject_CallMethodNoArgs(obj, str_fileno);
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

/* The address family of a socket object (its `family`) or, for a bare
 * handle, of the socket it names. Returns it, or -1 with an exception. */
static int get_family(PyObject* sockobj, fiocp_handle_t h) {
  PyObject* fam = PyObject_GetAttrString(sockobj, "family");
  if (fam != NULL) {
    long v = PyLong_AsLong(fam);
    Py_DECREF(fam);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > 0xffff) { /* sa_family_t is 16 bits */
      PyErr_Format(PyExc_ValueError, "invalid address family %ld", v);
      return -1;
    }
    return (int)v;
  }
  if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
  PyErr_Clear();
  {
#ifdef _WIN32
    WSAPROTOCOL_INFOW info;
    int ilen = (int)sizeof(info);
    if (getsockopt((SOCKET)h, SOL_SOCKET, SO_PROTOCOL_INFOW, (char*)&info,
                   &ilen) == 0)
      return info.iAddressFamily;
    PyErr_SetExcFromWindowsErr(PyExc_OSError, WSAGetLastError());
    return -1;
#else
    struct sockaddr_storage ss;
    socklen_t len = (socklen_t)sizeof(ss);
    memset(&ss, 0, sizeof(ss));
    if (getsockname((int)h, (struct sockaddr*)&ss, &len) < 0) {
      PyErr_SetFromErrno(PyExc_OSError);
      return -1;
    }
    return ss.ss_family;
#endif
  }
}

/* ======================================================================
 * Completion
 * ====================================================================== */

struct CompletionPortObject;

typedef struct {
  PyObject_HEAD
  struct CompletionPortObject* port; /* borrowed, set only while in flight */
  fiocp_op_t* rec;                   /* set only while in flight */
  /* The attributes read in every completion loop are object slots that
   * are never NULL (T_OBJECT_EX members): CPython 3.11+ specializes their
   * reads to one load, 4-6x cheaper than a getter or a T_PYSSIZET member. */
  PyObject* key;
  PyObject* context;
  PyObject* buffer;   /* the object whose memory the operation uses, or None */
  PyObject* error;    /* None or the OSError */
  PyObject* op;       /* kind_names[kind] */
  PyObject* nbytes_obj; /* nbytes as an int */
  PyObject* extra;    /* recvfrom: address; accept: (socket, address) */
  Py_ssize_t nbytes;
  fiocp_handle_t handle; /* the handle of its last submission (resubmit) */
  Py_buffer view;     /* exported while in flight */
  uint8_t kind;
  uint8_t pinned;
  uint8_t done;
  uint8_t cancelled;
} CompletionObject;

typedef struct CompletionPortObject {
  PyObject_HEAD
  fiocp_port_t* port;       /* malloc'd: may outlive us if leaked at close */
  const fiocp_backend_t* backend;
  PyObject* handles;        /* {handle int: key} */
  Py_ssize_t pending;       /* submitted and not yet dequeued */
  unsigned concurrency;
  /* The threads inside `with port.batch():`, each with its nesting depth:
   * a batch belongs to the thread that opened it (another thread's
   * submissions must reach the kernel at once). Few at a time. */
  struct batch_thread_s {
    unsigned long ident;
    int depth;
  }* batches;
  int nbatches, batches_cap;
  int inside;               /* threads inside a GIL-free backend call */
  uint8_t initialized;
  uint8_t closed;
  uint8_t destroy_pending;  /* destroy when the last thread leaves */
  uint8_t leaked;
  uint8_t emulate_slots;    /* concurrency > 0 on a backend with release() */
  unsigned long fork_gen;   /* fork_generation when created */
  PyObject* weakreflist;
} CompletionPortObject;

static int Completion_traverse(CompletionObject* self, visitproc visit,
                               void* arg) {
  Py_VISIT(self->key);
  Py_VISIT(self->context);
  Py_VISIT(self->buffer);
  Py_VISIT(self->error);
  Py_VISIT(self->extra);
  return 0;
}

static int Completion_clear(CompletionObject* self) {
  /* Never called while in flight: the port's own reference keeps an
   * in-flight completion reachable. */
  Py_CLEAR(self->key);
  Py_CLEAR(self->context);
  Py_CLEAR(self->error);
  Py_CLEAR(self->extra);
  Py_CLEAR(self->op);
  Py_CLEAR(self->nbytes_obj);
  if (!self->pinned) Py_CLEAR(self->buffer);
  return 0;
}

/* Finished completions are kept for reuse, as CPython keeps tuples: a
 * server creates and drops one per operation. Recycling them spares the
 * allocator and, when a queue builds up and drains (a producer thread ahead
 * of its consumer for a GIL switch interval: ~25,000 posts), the page faults
 * of pymalloc arenas unmapped and mapped again: the two-thread hand-off went
 * from 0.46x to 0.62x the speed of queue.SimpleQueue. At most 32,768 are
 * kept (about 6 MiB). Guarded by the GIL. */
#define COMPLETION_FREELIST_MAX 32768
static CompletionObject* completion_freelist;
static int completion_freelist_len;

static void Completion_dealloc(CompletionObject* self) {
  PyObject_GC_UnTrack(self);
  /* A Completion can be the context of the next, and so on: freeing such a
   * chain recursed once per link until the C stack overflowed (2,000,000
   * deep). The trashcan defers deep deallocations, as for tuples. */
  Py_TRASHCAN_BEGIN(self, Completion_dealloc)
  if (self->pinned) {
    /* Unreachable while in flight (the port holds a reference); this only
     * runs for a completion that failed before submission. */
    PyBuffer_Release(&self->view);
    self->pinned = 0;
  }
  Completion_clear(self);
  Py_CLEAR(self->buffer);
  if (completion_freelist_len < COMPLETION_FREELIST_MAX) {
    /* The key field links the free list: it is cleared above. */
    self->key = (PyObject*)completion_freelist;
    completion_freelist = self;
    completion_freelist_len++;
  } else {
    Py_TYPE(self)->tp_free((PyObject*)self);
  }
  Py_TRASHCAN_END
}

/* A completion is tracked by the cyclic GC only once it refers to an object
 * that could refer back to it. Most completions carry ints, strings, None
 * and bytearrays: leaving them untracked keeps collections cheap when many
 * are queued (a hand-off of 100,000 posts spent a quarter of its time in the
 * GC before this). */
static void track_if_needed(CompletionObject* c, PyObject* ref) {
  if (ref != NULL && PyObject_IS_GC(ref) && !PyObject_GC_IsTracked((PyObject*)c))
    PyObject_GC_Track(c);
}

static CompletionObject* Completion_create(uint8_t kind, PyObject* key,
                                           PyObject* context) {
  CompletionObject* c = completion_freelist;
  if (c != NULL) {
    completion_freelist = (CompletionObject*)c->key;
    completion_freelist_len--;
    _Py_NewReference((PyObject*)c);
  } else {
    c = PyObject_GC_New(CompletionObject, &CompletionType);
    if (c == NULL) return NULL;
  }
  c->port = NULL;
  c->rec = NULL;
  Py_INCREF(key);
  c->key = key;
  Py_INCREF(context);
  c->context = context;
  Py_INCREF(Py_None);
  c->buffer = Py_None;
  Py_INCREF(Py_None);
  c->error = Py_None;
  Py_INCREF(kind_names[kind]);
  c->op = kind_names[kind];
  c->nbytes_obj = PyLong_FromLong(0); /* a cached small int: cannot fail */
  c->extra = NULL;
  c->nbytes = 0;
  memset(&c->view, 0, sizeof(c->view));
  c->kind = kind;
  c->pinned = 0;
  c->done = 0;
  c->cancelled = 0;
  track_if_needed(c, key);
  track_if_needed(c, context);
  return c;
}

static PyObject* Completion_result(CompletionObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  if (!self->done) {
    PyErr_SetString(InvalidStateError,
                    "the operation has not completed yet: its completion "
                    "has not been dequeued with get()");
    return NULL;
  }
  if (self->error != Py_None) {
    PyErr_SetObject((PyObject*)Py_TYPE(self->error), self->error);
    return NULL;
  }
  switch (self->kind) {
    case FIOCP_OP_RECVFROM:
      return Py_BuildValue("(nO)", self->nbytes,
                           self->extra ? self->extra : Py_None);
    case FIOCP_OP_ACCEPT:
      if (self->extra == NULL) Py_RETURN_NONE;
      Py_INCREF(self->extra);
      return self->extra;
    case FIOCP_OP_CONNECT:
      Py_RETURN_NONE;
    default:
      return PyLong_FromSsize_t(self->nbytes);
  }
}

static PyObject* port_cancel_completion(CompletionPortObject* port,
                                        CompletionObject* c);

static PyObject* Completion_cancel(CompletionObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  if (self->done || self->port == NULL) Py_RETURN_FALSE;
  return port_cancel_completion(self->port, self);
}

static PyObject* Completion_get_done(CompletionObject* self, void* c) {
  (void)c;
  return PyBool_FromLong(self->done);
}

static PyObject* Completion_get_cancelled(CompletionObject* self, void* c) {
  (void)c;
  return PyBool_FromLong(self->cancelled);
}

static PyObject* Completion_get_address(CompletionObject* self, void* c) {
  (void)c;
  if (self->kind == FIOCP_OP_RECVFROM && self->extra != NULL) {
    Py_INCREF(self->extra);
    return self->extra;
  }
  if (self->kind == FIOCP_OP_ACCEPT && self->extra != NULL &&
      PyTuple_Check(self->extra) && PyTuple_GET_SIZE(self->extra) == 2) {
    PyObject* a = PyTuple_GET_ITEM(self->extra, 1);
    Py_INCREF(a);
    return a;
  }
  Py_RETURN_NONE;
}

static PyObject* Completion_repr(CompletionObject* self) {
  const char* state = self->done ? "done" : "pending";
  if (self->done && self->error != Py_None)
    return PyUnicode_FromFormat("<fastiocp.Completion op=%R %s error=%R key=%R>",
                                kind_names[self->kind], state, self->error,
                                self->key);
  return PyUnicode_FromFormat("<fastiocp.Completion op=%R %s nbytes=%zd key=%R>",
                              kind_names[self->kind], state, self->nbytes,
                              self->key);
}

static PyMemberDef Completion_members[] = {
    {"key", T_OBJECT_EX, offsetof(CompletionObject, key), READONLY,
     "The key given to register() for the handle (or to post())."},
    {"context", T_OBJECT_EX, offsetof(CompletionObject, context), READONLY,
     "The context object given when the operation was submitted."},
    {"nbytes", T_OBJECT_EX, offsetof(CompletionObject, nbytes_obj), READONLY,
     "Bytes transferred (0 at end of file, and while pending); for post(), "
     "the nbytes posted."},
    {"error", T_OBJECT_EX, offsetof(CompletionObject, error), READONLY,
     "None, or the OSError the operation failed with (errno/winerror set)."},
    {"op", T_OBJECT_EX, offsetof(CompletionObject, op), READONLY,
     "The kind of operation: 'read', 'write', 'recv', 'send', 'recvfrom', "
     "'sendto', 'accept', 'connect' or 'post'."},
    {"buffer", T_OBJECT_EX, offsetof(CompletionObject, buffer), READONLY,
     "The buffer object the operation read into or wrote from (None for "
     "accept, connect and post)."},
    {NULL}};

static PyGetSetDef Completion_getset[] = {
    {"done", (getter)Completion_get_done, NULL,
     "True once the completion has been dequeued (or drained by close()).",
     NULL},
    {"cancelled", (getter)Completion_get_cancelled, NULL,
     "True if the operation ended because it was cancelled.", NULL},
    {"address", (getter)Completion_get_address, NULL,
     "recvfrom: the sender's address; accept: the peer's address; else "
     "None.",
     NULL},
    {NULL}};

static PyMethodDef Completion_methods[] = {
    {"result", (PyCFunction)Completion_result, METH_NOARGS,
     "result($self)\n--\n\nThe operation's result, or raise its error.\n\n"
     "read/write/recv/send/sendto: nbytes; recvfrom: (nbytes, address); "
     "accept: (socket, address); connect: None; post: nbytes. Raises "
     "InvalidStateError while the operation is still in flight."},
    {"cancel", (PyCFunction)Completion_cancel, METH_NOARGS,
     "cancel($self)\n--\n\nAsk the OS to cancel the operation. Returns True if a "
     "cancellation was requested, False if it had already completed. The "
     "completion is still delivered by get(), cancelled or with its real "
     "result if it raced."},
    {NULL}};

static PyTypeObject CompletionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp.Completion",
    .tp_basicsize = sizeof(CompletionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The record of one operation or posted packet.\n\n"
              "Returned by every submit method (pending) and, once "
              "finished, by get()/get_many() (the same object, filled in).",
    .tp_traverse = (traverseproc)Completion_traverse,
    .tp_clear = (inquiry)Completion_clear,
    .tp_dealloc = (destructor)Completion_dealloc,
    .tp_repr = (reprfunc)Completion_repr,
    .tp_members = Completion_members,
    .tp_getset = Completion_getset,
    .tp_methods = Completion_methods,
};

/* ======================================================================
 * CompletionPort: lifetime
 * ====================================================================== */

static int port_check_open(CompletionPortObject* self) {
  if (!self->initialized) {
    PyErr_SetString(PyExc_ValueError, "CompletionPort.__init__ was not called");
    return -1;
  }
  if (self->closed) {
    set_closed_error();
    return -1;
  }
  if (self->fork_gen != fork_generation) {
    PyErr_SetString(FastIOCPError,
                    "this CompletionPort was created by the parent process: "
                    "it cannot be used after fork(); create a new one");
    return -1;
  }
  return 0;
}

/* Whether this process may call into the port's backend: it is open and
 * was created by this process, not inherited through fork(). */
static int port_owns_backend(CompletionPortObject* p) {
  return p->initialized && !p->closed && p->port != NULL &&
         p->fork_gen == fork_generation;
}

static void close_handle(fiocp_handle_t h) {
#ifdef _WIN32
  closesocket((SOCKET)h);
#else
  close((int)h);
#endif
}

/* (socket, address) for an accepted connection whose handle is res. */
static PyObject* make_accepted(fiocp_op_t* rec, int64_t res) {
  PyObject *kwargs, *empty, *sock, *addr;
  kwargs = Py_BuildValue("{sL}", "fileno", (long long)res);
  empty = PyTuple_New(0);
  sock = (kwargs && empty) ? PyObject_Call(socket_type, empty, kwargs) : NULL;
  Py_XDECREF(kwargs);
  Py_XDECREF(empty);
  if (sock == NULL) {
    close_handle((fiocp_handle_t)res);
    return NULL;
  }
  addr = make_sockaddr(&rec->addr->ss, rec->addr->sslen);
  if (addr == NULL) {
    Py_DECREF(sock); /* closes the handle */
    return NULL;
  }
  return Py_BuildValue("(NN)", sock, addr);
}

/* c->nbytes as an int object. Consecutive completions mostly carry the same
 * count (a block, a message size), so the last int made is reused: no
 * allocation for counts above the small-int cache. Guarded by the GIL. */
static PyObject* last_nbytes_obj;
static Py_ssize_t last_nbytes;

static void set_nbytes_obj(CompletionObject* c) {
  PyObject* o;
  if (last_nbytes_obj != NULL && last_nbytes == c->nbytes) {
    Py_INCREF(last_nbytes_obj);
    o = last_nbytes_obj;
  } else {
    o = PyLong_FromSsize_t(c->nbytes);
    if (o == NULL) {
      /* Out of memory: reading nbytes then raises AttributeError rather
       * than giving a wrong count; result() still has it. */
      PyErr_Clear();
      Py_CLEAR(c->nbytes_obj);
      return;
    }
    Py_INCREF(o);
    Py_XSETREF(last_nbytes_obj, o);
    last_nbytes = c->nbytes;
  }
  Py_XSETREF(c->nbytes_obj, o);
}

/* Fills c from its record, releases the buffer, frees the record. Returns
 * the completion (the port's reference, now the caller's). GIL. */
static CompletionObject* finish_op(CompletionPortObject* self,
                                   fiocp_op_t* rec) {
  CompletionObject* c = (CompletionObject*)rec->user;
  int64_t res = rec->res;
  if (res < 0) {
    Py_SETREF(c->error, make_code_error(res));
    if (c->error == NULL) {
      /* Building the exception failed (memory): keep a plain one. */
      PyErr_Clear();
      Py_INCREF(PyExc_OSError);
      c->error = PyExc_OSError;
    }
    c->cancelled = (uint8_t)is_cancel_code(res);
    c->nbytes = 0;
  } else {
    switch (c->kind) {
      case FIOCP_OP_RECVFROM:
        c->nbytes = (Py_ssize_t)res;
        c->extra = make_sockaddr(&rec->addr->ss, rec->addr->sslen);
        if (c->extra == NULL) {
          c->extra = Py_None;
          Py_INCREF(Py_None);
          PyErr_Clear();
        }
        break;
      case FIOCP_OP_ACCEPT:
        c->extra = make_accepted(rec, res);
        if (c->extra == NULL) {
          /* The new connection could not be wrapped: the completion
           * carries that error; the handle was closed. */
          PyObject *type, *value, *tb;
          PyErr_Fetch(&type, &value, &tb);
          PyErr_NormalizeException(&type, &value, &tb);
          Py_XDECREF(type);
          Py_XDECREF(tb);
          Py_SETREF(c->error, value);
        }
        break;
      case FIOCP_OP_CONNECT:
        c->nbytes = 0;
        break;
      default:
        c->nbytes = (Py_ssize_t)res;
    }
  }
  if (c->nbytes != 0) set_nbytes_obj(c);
  if (c->pinned) {
    PyBuffer_Release(&c->view);
    c->pinned = 0;
  }
  track_if_needed(c, c->error);
  track_if_needed(c, c->extra);
  c->rec = NULL;
  c->port = NULL;
  c->done = 1;
  rec->state = FIOCP_ST_FREE;
  fiocp__op_free(self->port, rec);
  self->pending--;
  return c;
}

/* Runs backend->destroy once no thread is inside a GIL-free call. GIL. */
static void port_maybe_destroy(CompletionPortObject* self) {
  if (!self->destroy_pending || self->inside > 0) return;
  self->destroy_pending = 0;
  self->backend->destroy(self->port);
  fiocp__allocator_destroy(self->port);
  PyMem_RawFree(self->port);
  self->port = NULL;
}

static void slot_release(CompletionPortObject* self);

/* For a port left behind with operations still owed (close() timed out, or
 * a forked child's copy): their Completions stay alive, held by the leaked
 * records, but no longer point to the port, which may be freed before
 * them; cancel() then has nothing to follow and says False. */
static void detach_completion(fiocp_port_t* port, fiocp_op_t* rec, void* arg) {
  CompletionObject* c = (CompletionObject*)rec->user;
  (void)port;
  (void)arg;
  if (c != NULL) c->port = NULL;
}

/* close(): cancels what is pending, waits (bounded) for it, releases every
 * buffer and reference, wakes every waiting thread. Idempotent. GIL. */
static int port_close_impl(CompletionPortObject* self) {
  int64_t owed;
  fiocp_op_t* batch[64];
  int n, i;
  if (!self->initialized || self->closed) return 0;
  self->closed = 1;
  if (self->emulate_slots) slot_release(self); /* forget this thread's */
  if (self->fork_gen != fork_generation) {
    /* A forked child: the kernel objects and threads are the parent's.
     * Touch nothing; the child's copies of the records and buffers are
     * simply left behind, and its completions no longer name the port. */
    self->leaked = 1;
    fiocp__foreach_owned(self->port, detach_completion, NULL);
    Py_CLEAR(self->handles);
    return 0;
  }
  owed = self->backend->shutdown(self->port, 0);
  if (owed > 0) {
    self->inside++;
    Py_BEGIN_ALLOW_THREADS
    owed = self->backend->shutdown(self->port, CLOSE_TIMEOUT_MS);
    Py_END_ALLOW_THREADS
    self->inside--;
  }
  while ((n = self->backend->drain(self->port, batch, 64)) > 0) {
    for (i = 0; i < n; i++) {
      CompletionObject* c = finish_op(self, batch[i]);
      Py_DECREF(c);
    }
  }
  Py_CLEAR(self->handles);
  if (owed > 0) {
    /* The kernel still owns buffers of these operations: keep them, their
     * records and the backend alive forever rather than risk it writing
     * into freed memory. */
    self->leaked = 1;
    fiocp__foreach_owned(self->port, detach_completion, NULL);
    PyErr_WarnFormat(PyExc_ResourceWarning, 1,
                     "CompletionPort.close(): %lld operations did not come "
                     "back within %d ms of being cancelled; their buffers "
                     "are kept alive",
                     (long long)owed, CLOSE_TIMEOUT_MS);
    return 0;
  }
  self->destroy_pending = 1;
  port_maybe_destroy(self);
  return 0;
}

static void CompletionPort_dealloc(CompletionPortObject* self) {
  PyObject *type, *value, *tb;
  PyObject_GC_UnTrack(self);
  PyErr_Fetch(&type, &value, &tb);
  if (self->weakreflist != NULL) PyObject_ClearWeakRefs((PyObject*)self);
  if (self->initialized && !self->closed) {
    if (port_close_impl(self) < 0) PyErr_WriteUnraisable((PyObject*)self);
  }
  PyErr_Restore(type, value, tb);
  Py_CLEAR(self->handles);
  PyMem_Free(self->batches);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

static int CompletionPort_traverse(CompletionPortObject* self, visitproc visit,
                                   void* arg) {
  Py_VISIT(self->handles);
  return 0;
}

static int CompletionPort_clear(CompletionPortObject* self) {
  Py_CLEAR(self->handles);
  return 0;
}

static const fiocp_backend_t* backend_from_env(void) {
  const char* env = getenv("FASTIOCP_BACKEND");
  if (env == NULL || env[0] == 0 || strcmp(env, "auto") == 0) return NULL;
  return fiocp__backend_by_name(env);
}

/* The error for a backend name this build lacks: BackendUnavailableError
 * for a backend of another platform, ValueError for a name that is no
 * backend at all; both list the backends compiled in. */
static void set_unknown_backend_error(const char* how, const char* name) {
  static const char* const all[] = {"iocp", "io_uring", "epoll"};
  char have[64];
  size_t used = 0;
  int i, known = 0;
  have[0] = 0;
  for (i = 0; i < fiocp__nbackends; i++)
    used += (size_t)PyOS_snprintf(have + used, sizeof(have) - used, "%s%s",
                                  i ? ", " : "", fiocp__backends[i]->name);
  for (i = 0; i < (int)(sizeof(all) / sizeof(all[0])); i++)
    if (strcmp(all[i], name) == 0) known = 1;
  if (known)
    PyErr_Format(BackendUnavailableError,
                 "%s'%s': that backend is not built for this platform; this "
                 "build has: %s ('auto' picks the best that works)",
                 how, name, have);
  else
    PyErr_Format(PyExc_ValueError,
                 "%s'%s' names no backend; this build has: %s, or 'auto'",
                 how, name, have);
}

static int CompletionPort_init(CompletionPortObject* self, PyObject* args,
                               PyObject* kwds) {
  static char* kwlist[] = {"concurrency", "backend", "entries", NULL};
  int concurrency = 0;
  const char* name = "auto";
  int entries = 0;
  char why[256];
  int rc = -1, i;
  PyObject* reasons = NULL;
  if (self->initialized) {
    PyErr_SetString(PyExc_RuntimeError, "CompletionPort is already initialized");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "|isi:CompletionPort", kwlist,
                                   &concurrency, &name, &entries))
    return -1;
  if (concurrency < 0) {
    PyErr_SetString(PyExc_ValueError, "concurrency must be >= 0");
    return -1;
  }
  if (entries < 0 || entries > 32768) {
    PyErr_SetString(PyExc_ValueError, "entries must be between 0 and 32768");
    return -1;
  }
  self->port = (fiocp_port_t*)PyMem_RawCalloc(1, sizeof(fiocp_port_t));
  if (self->port == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  why[0] = 0;
  if (strcmp(name, "auto") == 0) {
    const fiocp_backend_t* forced = backend_from_env();
    const char* env = getenv("FASTIOCP_BACKEND");
    if (forced == NULL && env != NULL && env[0] && strcmp(env, "auto") != 0) {
      set_unknown_backend_error("FASTIOCP_BACKEND=", env);
      goto fail;
    }
    if (forced != NULL) {
      self->port->backend = forced;
      rc = forced->init(self->port, (unsigned)entries, (unsigned)concurrency,
                        why, sizeof(why));
    } else {
      reasons = PyList_New(0);
      if (reasons == NULL) goto fail;
      for (i = 0; i < fiocp__nbackends; i++) {
        self->port->backend = fiocp__backends[i];
        why[0] = 0;
        rc = fiocp__backends[i]->init(self->port, (unsigned)entries,
                                      (unsigned)concurrency, why, sizeof(why));
        if (rc == 0) break;
        {
          PyObject* r = PyUnicode_FromFormat("%s: %s", fiocp__backends[i]->name, why);
          if (r == NULL || PyList_Append(reasons, r) < 0) {
            Py_XDECREF(r);
            goto fail;
          }
          Py_DECREF(r);
        }
      }
    }
  } else {
    const fiocp_backend_t* b = fiocp__backend_by_name(name);
    if (b == NULL) {
      set_unknown_backend_error("backend=", name);
      goto fail;
    }
    self->port->backend = b;
    rc = b->init(self->port, (unsigned)entries, (unsigned)concurrency, why,
                 sizeof(why));
  }
  if (rc < 0) {
    if (reasons != NULL) {
      PyObject* sep = PyUnicode_FromString("; ");
      PyObject* joined = sep ? PyUnicode_Join(sep, reasons) : NULL;
      Py_XDECREF(sep);
      if (joined == NULL) goto fail;
      PyErr_Format(BackendUnavailableError, "no backend works here: %U", joined);
      Py_DECREF(joined);
    } else {
      PyErr_Format(BackendUnavailableError, "backend %s is unavailable: %s",
                   self->port->backend->name, why);
    }
    goto fail;
  }
  Py_XDECREF(reasons);
  self->backend = self->port->backend;
  self->handles = PyDict_New();
  if (self->handles == NULL) {
    int64_t owed = self->backend->shutdown(self->port, 0);
    if (owed == 0) self->backend->destroy(self->port);
    PyMem_RawFree(self->port);
    self->port = NULL;
    return -1;
  }
  self->concurrency = (unsigned)concurrency;
  self->emulate_slots = concurrency > 0 && self->backend->release != NULL;
  self->fork_gen = fork_generation;
  self->initialized = 1;
  return 0;
fail:
  Py_XDECREF(reasons);
  PyMem_RawFree(self->port);
  self->port = NULL;
  return -1;
}

/* ======================================================================
 * CompletionPort: registration
 * ====================================================================== */

static PyObject* CompletionPort_register(CompletionPortObject* self,
                                         PyObject* args, PyObject* kwds) {
  static char* kwlist[] = {"fileobj", "key", NULL};
  PyObject *fileobj, *key = Py_None, *hkey;
  fiocp_handle_t h;
  int rc;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:register", kwlist,
                                   &fileobj, &key))
    return NULL;
  /* fileno() may run Python code that closes the port: check after it. */
  if (get_handle(fileobj, &h) < 0 || port_check_open(self) < 0) return NULL;
  hkey = PyLong_FromLongLong((long long)h);
  if (hkey == NULL) return NULL;
  rc = PyDict_Contains(self->handles, hkey);
  if (rc != 0) {
    if (rc > 0)
      PyErr_Format(PyExc_ValueError,
                   "handle %R is already registered with this port",
                   hkey);
    Py_DECREF(hkey);
    return NULL;
  }
  rc = self->backend->associate(self->port, h);
  if (rc < 0) {
    Py_DECREF(hkey);
    return set_code_error(rc);
  }
  if (PyDict_SetItem(self->handles, hkey, key) < 0) {
    Py_DECREF(hkey);
    return NULL;
  }
  Py_DECREF(hkey);
  Py_RETURN_NONE;
}

static PyObject* CompletionPort_unregister(CompletionPortObject* self,
                                           PyObject* fileobj) {
  fiocp_handle_t h;
  PyObject* hkey;
  int rc;
  if (get_handle(fileobj, &h) < 0 || port_check_open(self) < 0) return NULL;
  hkey = PyLong_FromLongLong((long long)h);
  if (hkey == NULL) return NULL;
  rc = PyDict_DelItem(self->handles, hkey);
  if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
    PyErr_Clear();
    PyErr_Format(PyExc_KeyError, "handle %R is not registered with this port",
                 hkey);
  }
  Py_DECREF(hkey);
  if (rc < 0) return NULL;
  Py_RETURN_NONE;
}

/* The key registered for h (borrowed), or NULL with ValueError. */
static PyObject* lookup_key(CompletionPortObject* self, fiocp_handle_t h) {
  PyObject* hkey = PyLong_FromLongLong((long long)h);
  PyObject* key;
  if (hkey == NULL) return NULL;
  key = PyDict_GetItemWithError(self->handles, hkey);
  if (key == NULL && !PyErr_Occurred())
    PyErr_Format(PyExc_ValueError,
                 "handle %R is not registered with this port: call "
                 "register() first",
                 hkey);
  Py_DECREF(hkey);
  return key;
}

/* ======================================================================
 * CompletionPort: submission
 * ====================================================================== */

/* The calling thread's entry in self->batches, or -1. */
static int batch_index(CompletionPortObject* self, unsigned long ident) {
  int i;
  for (i = 0; i < self->nbatches; i++)
    if (self->batches[i].ident == ident) return i;
  return -1;
}

/* Whether the calling thread is inside one of its own port.batch() blocks:
 * then its submissions wait for the block's end (io_uring). */
static int in_batch(CompletionPortObject* self) {
  return self->nbatches > 0 &&
         batch_index(self, PyThread_get_thread_ident()) >= 0;
}

enum { BUF_NONE, BUF_READ, BUF_WRITE };

/* Undoes the hand-over of c and its record to the port after the backend
 * refused it at once (no completion will come), dropping the port's
 * reference to c (for post(), the only one). GIL. */
static void take_back(CompletionPortObject* self, CompletionObject* c,
                      fiocp_op_t* rec) {
  self->pending--;
  c->rec = NULL;
  c->port = NULL;
  rec->state = FIOCP_ST_FREE;
  fiocp__op_free(self->port, rec);
  Py_DECREF(c); /* the port's reference */
}

/* Takes a record for c (buffer pinned, key set, port open) and submits it
 * on h. Returns 0: c is in flight and the port holds a reference to it.
 * Returns -1 with an exception: nothing was submitted, c's buffer is still
 * pinned (the caller releases it). Runs no Python code. GIL. */
static int start_op(CompletionPortObject* self, CompletionObject* c,
                    fiocp_handle_t h, int64_t offset, int needs_addr,
                    const struct sockaddr_storage* ss, fiocp_socklen_t sslen,
                    int defer) {
  fiocp_op_t* rec = fiocp__op_alloc(self->port);
  int rc;
  if (rec == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  if (needs_addr) {
    rec->addr = fiocp__addr_alloc(self->port);
    if (rec->addr == NULL) {
      fiocp__op_free(self->port, rec);
      PyErr_NoMemory();
      return -1;
    }
    if (ss != NULL) {
      memcpy(&rec->addr->ss, ss, sizeof(*ss));
      rec->addr->sslen = sslen;
    } else {
      rec->addr->sslen = (fiocp_socklen_t)sizeof(rec->addr->ss);
    }
  }
  rec->kind = c->kind;
  rec->handle = h;
  if (c->pinned) {
    rec->buf = (char*)c->view.buf;
    rec->len = c->view.len > (Py_ssize_t)MAX_TRANSFER ? MAX_TRANSFER
                                                      : (uint32_t)c->view.len;
  }
  rec->offset = offset;
  rec->user = (uintptr_t)c;
  rec->state = FIOCP_ST_INFLIGHT;
  c->rec = rec;
  c->port = self;
  c->handle = h;
  Py_INCREF(c); /* the port's reference, given back by get() */
  self->pending++;
  rc = self->backend->submit(self->port, rec, defer);
  if (rc < 0) {
    /* Failed at once: no completion will come. */
    take_back(self, c, rec);
    set_code_error(rc);
    return -1;
  }
  return 0;
}

/* Validates, pins the buffer, fills a record and submits it. Everything
 * that can fail because of the arguments fails before anything is
 * submitted. GIL. */
static PyObject* submit_op(CompletionPortObject* self, uint8_t kind,
                           PyObject* fileobj, PyObject* bufarg, int bufmode,
                           int64_t offset, PyObject* address,
                           PyObject* context) {
  fiocp_handle_t h;
  PyObject* key;
  CompletionObject* c;
  struct sockaddr_storage ss;
  fiocp_socklen_t sslen = 0;
  int needs_addr;
  /* Python code may run in the steps that prepare the call (fileno(), a
   * socket's family, __fspath__, a buffer exporter, a finalizer run by the
   * GC when the Completion is allocated, other threads while the resolver
   * runs without the GIL), and that code may close the port or unregister
   * the handle. So the port is checked and the key looked up only once all
   * of them are done; nothing after that runs Python code. */
  if (port_check_open(self) < 0 || get_handle(fileobj, &h) < 0) return NULL;
  needs_addr = kind == FIOCP_OP_RECVFROM || kind == FIOCP_OP_SENDTO ||
               kind == FIOCP_OP_ACCEPT || kind == FIOCP_OP_CONNECT;
  if (address != NULL) {
    int family = get_family(fileobj, h);
    if (family < 0) return NULL;
    if (parse_sockaddr(PyUnicode_AsUTF8(kind_names[kind]), address, family,
                       &ss, &sslen) < 0)
      return NULL;
  }
  c = Completion_create(kind, Py_None, context);
  if (c == NULL) return NULL;
  if (bufmode != BUF_NONE) {
    PyObject* obj = bufarg;
    if (bufmode == BUF_READ && PyLong_Check(bufarg)) {
      /* A size: allocate the buffer for the caller. */
      Py_ssize_t size = PyLong_AsSsize_t(bufarg);
      if (size == -1 && PyErr_Occurred()) goto error;
      if (size < 0 || (size_t)size > MAX_TRANSFER) {
        /* Refused before allocating: one operation moves at most
         * MAX_TRANSFER bytes, and CPython's own failure path for absurd
         * bytearray sizes is fragile (<= 3.13). */
        PyErr_Format(PyExc_ValueError,
                     "buffer size must be between 0 and %u", MAX_TRANSFER);
        goto error;
      }
      obj = PyByteArray_FromStringAndSize(NULL, size);
      if (obj == NULL) goto error;
    } else {
      Py_INCREF(obj);
    }
    Py_SETREF(c->buffer, obj);
    track_if_needed(c, obj);
    if (PyObject_GetBuffer(obj, &c->view,
                           bufmode == BUF_READ ? PyBUF_WRITABLE : PyBUF_SIMPLE) <
        0) {
      if (bufmode == BUF_READ && PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s needs a writable, contiguous buffer (bytearray, "
                     "memoryview, array, mmap), not %.100s",
                     PyUnicode_AsUTF8(kind_names[kind]), Py_TYPE(obj)->tp_name);
      }
      goto error;
    }
    c->pinned = 1;
  }
  if (port_check_open(self) < 0) goto error;
  key = lookup_key(self, h);
  if (key == NULL) goto error;
  Py_INCREF(key);
  Py_SETREF(c->key, key);
  track_if_needed(c, key);
  if (start_op(self, c, h, offset, needs_addr, address != NULL ? &ss : NULL,
               sslen, in_batch(self)) < 0)
    goto error;
  return (PyObject*)c;
error:
  if (c->pinned) {
    PyBuffer_Release(&c->view);
    c->pinned = 0;
  }
  Py_DECREF(c);
  return NULL;
}

/* Parses an offset: an int >= 0, or None for the current position. */
static int parse_offset(PyObject* obj, int64_t* out) {
  long long v;
  if (obj == NULL) {
    *out = 0;
    return 0;
  }
  if (obj == Py_None) {
    *out = -1;
    return 0;
  }
  if (!PyLong_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "offset must be an int or None, not %.100s",
                 Py_TYPE(obj)->tp_name);
    return -1;
  }
  v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) return -1;
  if (v < 0) {
    PyErr_SetString(PyExc_ValueError,
                    "offset must be >= 0 (None: the current position)");
    return -1;
  }
  *out = (int64_t)v;
  return 0;
}

/* The submit methods take vectorcall arguments: PyArg_ParseTupleAndKeywords
 * costs more than the rest of a submission. */
#define FASTARGS PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames

/* Matches positional and keyword arguments against names. out[i] becomes a
 * borrowed reference, or stays NULL when the argument is absent. The first
 * `required` arguments must be present. Returns 0, or -1 with TypeError. */
static int parse_args(const char* fname, PyObject* const* args,
                      Py_ssize_t nargs, PyObject* kwnames,
                      const char* const* names, PyObject** interned,
                      int nnames, int required, PyObject** out) {
  Py_ssize_t i, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  int j;
  if (nkw > 0 && interned[0] == NULL) {
    /* Keyword names in calls are interned: compare pointers first. */
    for (j = 0; j < nnames; j++) {
      interned[j] = PyUnicode_InternFromString(names[j]);
      if (interned[j] == NULL) return -1;
    }
  }
  for (j = 0; j < nnames; j++) out[j] = NULL;
  if (nargs > nnames) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)",
                 fname, nnames, nargs + nkw);
    return -1;
  }
  for (i = 0; i < nargs; i++) out[i] = args[i];
  for (i = 0; i < nkw; i++) {
    PyObject* kw = PyTuple_GET_ITEM(kwnames, i);
    for (j = 0; j < nnames; j++)
      if (kw == interned[j]) break;
    if (j == nnames)
      for (j = 0; j < nnames; j++)
        if (PyUnicode_CompareWithASCIIString(kw, names[j]) == 0) break;
    if (j == nnames) {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R",
                   fname, kw);
      return -1;
    }
    if (out[j] != NULL) {
      PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                   fname, names[j]);
      return -1;
    }
    out[j] = args[nargs + i];
  }
  for (j = 0; j < required; j++) {
    if (out[j] == NULL) {
      PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'",
                   fname, names[j]);
      return -1;
    }
  }
  return 0;
}

#define OR_NONE(o) ((o) != NULL ? (o) : Py_None)

static PyObject* CompletionPort_read(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"file", "buffer", "offset", "context"};
  static PyObject* interned[4];
  PyObject* a[4];
  int64_t offset;
  if (parse_args("read", args, nargs, kwnames, names, interned, 4, 2, a) < 0 ||
      parse_offset(a[2], &offset) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_READ, a[0], a[1], BUF_READ, offset, NULL,
                   OR_NONE(a[3]));
}

static PyObject* CompletionPort_write(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"file", "data", "offset", "context"};
  static PyObject* interned[4];
  PyObject* a[4];
  int64_t offset;
  if (parse_args("write", args, nargs, kwnames, names, interned, 4, 2, a) < 0 ||
      parse_offset(a[2], &offset) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_WRITE, a[0], a[1], BUF_WRITE, offset, NULL,
                   OR_NONE(a[3]));
}

static PyObject* CompletionPort_recv(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "buffer", "context"};
  static PyObject* interned[3];
  PyObject* a[3];
  if (parse_args("recv", args, nargs, kwnames, names, interned, 3, 2, a) < 0) return NULL;
  return submit_op(self, FIOCP_OP_RECV, a[0], a[1], BUF_READ, 0, NULL,
                   OR_NONE(a[2]));
}

static PyObject* CompletionPort_send(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "data", "context"};
  static PyObject* interned[3];
  PyObject* a[3];
  if (parse_args("send", args, nargs, kwnames, names, interned, 3, 2, a) < 0) return NULL;
  return submit_op(self, FIOCP_OP_SEND, a[0], a[1], BUF_WRITE, 0, NULL,
                   OR_NONE(a[2]));
}

static PyObject* CompletionPort_recvfrom(CompletionPortObject* self,
                                         FASTARGS) {
  static const char* const names[] = {"sock", "buffer", "context"};
  static PyObject* interned[3];
  PyObject* a[3];
  if (parse_args("recvfrom", args, nargs, kwnames, names, interned, 3, 2, a) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_RECVFROM, a[0], a[1], BUF_READ, 0, NULL,
                   OR_NONE(a[2]));
}

static PyObject* CompletionPort_sendto(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "data", "address", "context"};
  static PyObject* interned[4];
  PyObject* a[4];
  if (parse_args("sendto", args, nargs, kwnames, names, interned, 4, 3, a) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_SENDTO, a[0], a[1], BUF_WRITE, 0, a[2],
                   OR_NONE(a[3]));
}

static PyObject* CompletionPort_accept(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "context"};
  static PyObject* interned[2];
  PyObject* a[2];
  if (parse_args("accept", args, nargs, kwnames, names, interned, 2, 1, a) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_ACCEPT, a[0], NULL, BUF_NONE, 0, NULL,
                   OR_NONE(a[1]));
}

static PyObject* CompletionPort_connect(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "address", "context"};
  static PyObject* interned[3];
  PyObject* a[3];
  if (parse_args("connect", args, nargs, kwnames, names, interned, 3, 2, a) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_CONNECT, a[0], NULL, BUF_NONE, 0, a[1],
                   OR_NONE(a[2]));
}

static PyObject* CompletionPort_flush(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored));

/* done == RESUBMITTING marks a completion taken by a resubmit() call that is
 * still checking its arguments: a second appearance in the same call is
 * refused, and done stays true for anyone reading it. */
#define RESUBMITTING 2

/* Undoes resubmit()'s marks and pins on items [from, to). */
static void resubmit_undo(PyObject** items, Py_ssize_t from, Py_ssize_t to) {
  Py_ssize_t i;
  for (i = from; i < to; i++) {
    CompletionObject* c = (CompletionObject*)items[i];
    if (c->pinned) {
      PyBuffer_Release(&c->view);
      c->pinned = 0;
    }
    c->done = 1;
  }
}

static PyObject* CompletionPort_resubmit(CompletionPortObject* self,
                                         FASTARGS) {
  static const char* const names[] = {"completions", "offsets"};
  static PyObject* interned[2];
  PyObject* a[2];
  PyObject *seq = NULL, *offseq = NULL, *result = NULL;
  PyObject **items, **keys = NULL, **olds = NULL;
  int64_t* offsets = NULL;
  Py_ssize_t n, i, checked = 0, nolds = 0;
  if (parse_args("resubmit", args, nargs, kwnames, names, interned, 2, 1, a) <
      0)
    return NULL;
  /* Iterating the arguments may run Python code: it is done first, into a
   * tuple that nothing else can change. */
  seq = PySequence_Tuple(a[0]);
  if (seq == NULL) return NULL;
  n = PyTuple_GET_SIZE(seq);
  items = &PyTuple_GET_ITEM(seq, 0);
  if (a[1] != NULL && a[1] != Py_None) {
    offseq = PySequence_Tuple(a[1]);
    if (offseq == NULL) goto done;
    if (PyTuple_GET_SIZE(offseq) != n) {
      PyErr_Format(PyExc_ValueError,
                   "offsets has %zd items for %zd completions",
                   PyTuple_GET_SIZE(offseq), n);
      goto done;
    }
  }
  if (port_check_open(self) < 0) goto done;
  offsets = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(*offsets));
  keys = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(*keys));
  olds = PyMem_Malloc((size_t)(n > 0 ? n : 1) * 3 * sizeof(*olds));
  if (offsets == NULL || keys == NULL || olds == NULL) {
    PyErr_NoMemory();
    goto done;
  }
  /* 1. Check every completion and offset. No Python code runs here but a
   * repr() for an error message, after which the call only unwinds. */
  for (checked = 0; checked < n; checked++) {
    CompletionObject* c = (CompletionObject*)items[checked];
    uint8_t k;
    if (!Py_IS_TYPE(items[checked], &CompletionType)) {
      PyErr_Format(PyExc_TypeError,
                   "completions must hold Completion objects, not %.100s",
                   Py_TYPE(items[checked])->tp_name);
      goto undo_checked;
    }
    if (c->done != 1) {
      if (c->done == RESUBMITTING)
        PyErr_SetString(PyExc_ValueError,
                        "the same Completion appears twice in completions (or "
                        "another resubmit() call is starting it)");
      else
        PyErr_Format(InvalidStateError,
                     "%R is still in flight: only a dequeued completion "
                     "can be resubmitted",
                     items[checked]);
      goto undo_checked;
    }
    k = c->kind;
    /* Not sendto and connect: their address is gone with their record. */
    if (k != FIOCP_OP_READ && k != FIOCP_OP_WRITE && k != FIOCP_OP_RECV &&
        k != FIOCP_OP_SEND && k != FIOCP_OP_RECVFROM && k != FIOCP_OP_ACCEPT) {
      PyErr_Format(PyExc_ValueError,
                   "resubmit() takes read, write, recv, send, recvfrom and "
                   "accept completions, not %R",
                   kind_names[k]);
      goto undo_checked;
    }
    if (k != FIOCP_OP_ACCEPT && (c->buffer == NULL || c->buffer == Py_None)) {
      PyErr_SetString(PyExc_ValueError, "the completion has no buffer left");
      goto undo_checked;
    }
    offsets[checked] = 0;
    if (k == FIOCP_OP_READ || k == FIOCP_OP_WRITE) {
      if (offseq == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "offsets is required to resubmit reads and writes");
        goto undo_checked;
      }
      if (parse_offset(PyTuple_GET_ITEM(offseq, checked), &offsets[checked]) <
          0)
        goto undo_checked;
    } else if (offseq != NULL && PyTuple_GET_ITEM(offseq, checked) != Py_None) {
      PyErr_Format(PyExc_TypeError,
                   "offsets[%zd] must be None for a %U completion", checked,
                   kind_names[k]);
      goto undo_checked;
    }
    c->done = RESUBMITTING;
  }
  /* 2. Pin the buffers: an exporter may run Python code. */
  for (i = 0; i < n; i++) {
    CompletionObject* c = (CompletionObject*)items[i];
    int mode = c->kind == FIOCP_OP_WRITE || c->kind == FIOCP_OP_SEND
                   ? PyBUF_SIMPLE
                   : PyBUF_WRITABLE;
    if (c->kind == FIOCP_OP_ACCEPT) continue;
    if (PyObject_GetBuffer(c->buffer, &c->view, mode) < 0) goto undo_all;
    c->pinned = 1;
  }
  /* 3. The port and the registrations as they are now; from here on no
   * Python code runs until every operation is submitted. */
  if (port_check_open(self) < 0) goto undo_all;
  for (i = 0; i < n; i++) {
    fiocp_handle_t h = ((CompletionObject*)items[i])->handle;
    /* A batch of reads is mostly on one handle: one lookup for a run. */
    if (i > 0 && h == ((CompletionObject*)items[i - 1])->handle) {
      keys[i] = keys[i - 1];
      continue;
    }
    keys[i] = lookup_key(self, h);
    if (keys[i] == NULL) goto undo_all;
  }
  /* 4. Submit. The references the completions drop are released at the
   * end: a finalizer must not run in the middle. */
  for (i = 0; i < n; i++) {
    CompletionObject* c = (CompletionObject*)items[i];
    int needs_addr = c->kind == FIOCP_OP_RECVFROM || c->kind == FIOCP_OP_ACCEPT;
    if (start_op(self, c, c->handle, offsets[i], needs_addr, NULL, 0, 1) < 0) {
      PyObject *type, *value, *tb;
      resubmit_undo(items, i, n);
      PyErr_Fetch(&type, &value, &tb);
      /* The ones already queued go to the kernel all the same. */
      if (!in_batch(self)) (void)self->backend->flush(self->port);
      PyErr_Restore(type, value, tb);
      goto done;
    }
    Py_INCREF(keys[i]);
    olds[nolds++] = c->key;
    c->key = keys[i];
    track_if_needed(c, c->key);
    olds[nolds++] = c->error;
    Py_INCREF(Py_None);
    c->error = Py_None;
    olds[nolds++] = c->extra; /* recvfrom's address, accept's socket */
    c->extra = NULL;
    c->nbytes = 0;
    Py_XSETREF(c->nbytes_obj, PyLong_FromLong(0)); /* small int: no failure */
    c->cancelled = 0;
    c->done = 0;
  }
  if (!in_batch(self))
    result = CompletionPort_flush(self, NULL);
  else {
    Py_INCREF(Py_None);
    result = Py_None;
  }
  goto done;
undo_all:
  resubmit_undo(items, 0, n);
  goto done;
undo_checked:
  resubmit_undo(items, 0, checked);
done:
  for (i = 0; i < nolds; i++) Py_XDECREF(olds[i]);
  PyMem_Free(olds);
  PyMem_Free(keys);
  PyMem_Free(offsets);
  Py_XDECREF(offseq);
  Py_XDECREF(seq);
  return result;
}

static PyObject* CompletionPort_post(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"key", "context", "nbytes"};
  static PyObject* interned[3];
  PyObject* a[3];
  PyObject *key, *ctx;
  Py_ssize_t nbytes = 0;
  CompletionObject* c;
  fiocp_op_t* rec;
  int rc;
  if (parse_args("post", args, nargs, kwnames, names, interned, 3, 0, a) < 0) return NULL;
  key = OR_NONE(a[0]);
  ctx = OR_NONE(a[1]);
  if (a[2] != NULL) {
    if (!PyLong_Check(a[2])) {
      PyErr_Format(PyExc_TypeError, "nbytes must be an int, not %.100s",
                   Py_TYPE(a[2])->tp_name);
      return NULL;
    }
    nbytes = PyLong_AsSsize_t(a[2]);
    if (nbytes == -1 && PyErr_Occurred()) return NULL;
  }
  if (port_check_open(self) < 0) return NULL;
  if (nbytes < 0 || (uint64_t)nbytes > 0xffffffffu) {
    PyErr_SetString(PyExc_ValueError, "nbytes must be between 0 and 2**32-1");
    return NULL;
  }
  c = Completion_create(FIOCP_OP_POST, key, ctx);
  if (c == NULL) return NULL;
  /* Allocating the Completion may run a finalizer that closes the port. */
  if (port_check_open(self) < 0) {
    Py_DECREF(c);
    return NULL;
  }
  rec = fiocp__op_alloc(self->port);
  if (rec == NULL) {
    Py_DECREF(c);
    return PyErr_NoMemory();
  }
  rec->kind = FIOCP_OP_POST;
  rec->res = (int64_t)nbytes;
  rec->user = (uintptr_t)c;
  rec->state = FIOCP_ST_INFLIGHT;
  c->rec = rec;
  c->port = self;
  /* The port's reference; the caller gets none: posts are fire and forget
   * (get() returns the object). */
  self->pending++;
  rc = self->backend->post(self->port, rec);
  if (rc < 0) {
    take_back(self, c, rec);
    return set_code_error(rc);
  }
  Py_RETURN_NONE;
}

static PyObject* port_cancel_completion(CompletionPortObject* self,
                                        CompletionObject* c) {
  int rc;
  if (c->done || c->rec == NULL || c->port != self) Py_RETURN_FALSE;
  if (port_check_open(self) < 0) return NULL;
  if (c->kind == FIOCP_OP_POST) Py_RETURN_FALSE;
  rc = self->backend->cancel(self->port, c->rec);
  if (rc < 0) return set_code_error(rc);
  return PyBool_FromLong(rc);
}

static PyObject* CompletionPort_cancel(CompletionPortObject* self,
                                       PyObject* op) {
  if (!PyObject_TypeCheck(op, &CompletionType)) {
    PyErr_Format(PyExc_TypeError, "cancel() takes a Completion, not %.100s",
                 Py_TYPE(op)->tp_name);
    return NULL;
  }
  if (((CompletionObject*)op)->port != NULL &&
      ((CompletionObject*)op)->port != self) {
    PyErr_SetString(PyExc_ValueError,
                    "that operation was submitted to another port");
    return NULL;
  }
  return port_cancel_completion(self, (CompletionObject*)op);
}

static PyObject* CompletionPort_flush(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  int rc;
  if (port_check_open(self) < 0) return NULL;
  self->inside++;
  Py_BEGIN_ALLOW_THREADS
  rc = self->backend->flush(self->port);
  Py_END_ALLOW_THREADS
  self->inside--;
  port_maybe_destroy(self);
  if (rc < 0) return set_code_error(rc);
  Py_RETURN_NONE;
}

static PyObject* CompletionPort_batch_enter(CompletionPortObject* self,
                                            PyObject* Py_UNUSED(ignored)) {
  unsigned long me = PyThread_get_thread_ident();
  int i = batch_index(self, me);
  if (port_check_open(self) < 0) return NULL;
  if (i < 0) {
    if (self->nbatches == self->batches_cap) {
      int cap = self->batches_cap ? self->batches_cap * 2 : 4;
      struct batch_thread_s* grown =
          PyMem_Realloc(self->batches, (size_t)cap * sizeof(*grown));
      if (grown == NULL) return PyErr_NoMemory();
      self->batches = grown;
      self->batches_cap = cap;
    }
    i = self->nbatches++;
    self->batches[i].ident = me;
    self->batches[i].depth = 0;
  }
  self->batches[i].depth++;
  Py_RETURN_NONE;
}

static PyObject* CompletionPort_batch_exit(CompletionPortObject* self,
                                           PyObject* Py_UNUSED(ignored)) {
  int i = batch_index(self, PyThread_get_thread_ident());
  if (i >= 0 && --self->batches[i].depth == 0)
    self->batches[i] = self->batches[--self->nbatches];
  if (!in_batch(self) && self->initialized && !self->closed)
    return CompletionPort_flush(self, NULL);
  Py_RETURN_NONE;
}

/* The context manager of CompletionPort.batch(), in C because a round trip
 * of Python-level __enter__/__exit__ costs more than the system call that
 * batching saves. */
typedef struct {
  PyObject_HEAD
  CompletionPortObject* port;
} BatchObject;

static void Batch_dealloc(BatchObject* self) {
  Py_XDECREF(self->port);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

static PyObject* Batch_enter(BatchObject* self, PyObject* Py_UNUSED(ignored)) {
  PyObject* r = CompletionPort_batch_enter(self->port, NULL);
  if (r == NULL) return NULL;
  Py_DECREF(r);
  Py_INCREF(self->port);
  return (PyObject*)self->port;
}

static PyObject* Batch_exit(BatchObject* self, PyObject* args) {
  PyObject* r = CompletionPort_batch_exit(self->port, NULL);
  (void)args;
  if (r == NULL) return NULL;
  Py_DECREF(r);
  Py_RETURN_FALSE;
}

static PyMethodDef Batch_methods[] = {
    {"__enter__", (PyCFunction)Batch_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Batch_exit, METH_VARARGS, NULL},
    {NULL}};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Context manager returned by CompletionPort.batch().",
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
};

static PyObject* CompletionPort_batch(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  BatchObject* b;
  if (port_check_open(self) < 0) return NULL;
  b = PyObject_New(BatchObject, &BatchType);
  if (b == NULL) return NULL;
  Py_INCREF(self);
  b->port = self;
  return (PyObject*)b;
}

/* ======================================================================
 * CompletionPort: dequeue
 * ====================================================================== */

/* Converts a timeout in seconds (None: forever) to milliseconds (-1). */
static int parse_timeout(PyObject* obj, int64_t* ms) {
  double t;
  if (obj == NULL || obj == Py_None) {
    *ms = -1;
    return 0;
  }
  t = PyFloat_AsDouble(obj);
  if (t == -1.0 && PyErr_Occurred()) return -1;
  if (isnan(t) || t < 0) {
    PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
    return -1;
  }
  if (t > 9.0e12) {
    *ms = -1;
    return 0;
  }
  *ms = (int64_t)ceil(t * 1000.0);
  return 0;
}

/* The concurrency slots a thread holds (the Linux emulation of IOCP's
 * concurrency value, see fiocp.h release()). A thread holds a slot on a port
 * from the get() that gave it packets until its next get() on that port or
 * its exit. The ports are listed in a ThreadSlots object in the thread's
 * state dict, which CPython clears when the thread exits: its deallocation
 * then gives back every slot still held.
 *
 * The list holds weak references: a slot must not keep its port alive (a
 * closed port, or one dropped without close(), must be freed and its
 * descriptors closed), and a port that is gone has no slot to give back.
 * Entries of ports that are gone are pruned whenever the list is touched.
 * A forked child's list names its parent's ports: giving a slot back there
 * would kick the parent's ring, so port_owns_backend() refuses. GIL. */
typedef struct {
  PyObject_HEAD
  Py_ssize_t n, cap;
  PyObject** ports; /* weak references to CompletionPortObjects */
} ThreadSlotsObject;

/* The key of the ThreadSlots object in a thread's state dict. */
static PyObject* str_thread_slots;

/* The port a weak reference names (a new reference), or NULL once it is
 * gone. */
static CompletionPortObject* slot_port(PyObject* ref) {
  PyObject* p;
#if PY_VERSION_HEX >= 0x030D0000
  if (PyWeakref_GetRef(ref, &p) <= 0) {
    PyErr_Clear();
    return NULL;
  }
#else
  p = PyWeakref_GetObject(ref); /* borrowed; Py_None once gone */
  if (p == NULL || p == Py_None) {
    PyErr_Clear();
    return NULL;
  }
  Py_INCREF(p);
#endif
  return (CompletionPortObject*)p;
}

/* Removes entry i, giving its slot back if give_back. */
static void thread_slots_remove(ThreadSlotsObject* ts, Py_ssize_t i,
                                int give_back) {
  PyObject* ref = ts->ports[i];
  CompletionPortObject* p = give_back ? slot_port(ref) : NULL;
  ts->ports[i] = ts->ports[--ts->n];
  if (p != NULL) {
    if (port_owns_backend(p)) p->backend->release(p->port);
    Py_DECREF(p); /* the last reference only if the port is being dropped
                     anyway: its dealloc runs no code of this list */
  }
  Py_DECREF(ref);
}

static void ThreadSlots_dealloc(ThreadSlotsObject* self) {
  while (self->n > 0) thread_slots_remove(self, self->n - 1, 1);
  PyMem_Free(self->ports);
  PyObject_Free(self);
}

static PyTypeObject ThreadSlotsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._ThreadSlots",
    .tp_basicsize = sizeof(ThreadSlotsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The concurrency slots the thread holds (internal).",
    .tp_dealloc = (destructor)ThreadSlots_dealloc,
};

/* The calling thread's slot list (borrowed), created if create; NULL when
 * there is none (no exception set). */
static ThreadSlotsObject* thread_slots(int create) {
  PyObject* dict = PyThreadState_GetDict();
  PyObject* ts;
  if (dict == NULL) return NULL;
  ts = PyDict_GetItemWithError(dict, str_thread_slots);
  if (ts != NULL || !create) {
    PyErr_Clear();
    return (ThreadSlotsObject*)ts;
  }
  PyErr_Clear();
  ts = (PyObject*)PyObject_New(ThreadSlotsObject, &ThreadSlotsType);
  if (ts == NULL) {
    PyErr_Clear();
    return NULL;
  }
  ((ThreadSlotsObject*)ts)->n = ((ThreadSlotsObject*)ts)->cap = 0;
  ((ThreadSlotsObject*)ts)->ports = NULL;
  if (PyDict_SetItem(dict, str_thread_slots, ts) < 0) PyErr_Clear();
  Py_DECREF(ts); /* the dict's reference, if it took one */
  return (ThreadSlotsObject*)PyDict_GetItemWithError(dict, str_thread_slots);
}

/* Gives back the calling thread's slot on self, if it holds one, and
 * prunes the entries of ports that are gone. */
static void slot_release(CompletionPortObject* self) {
  ThreadSlotsObject* ts = thread_slots(0);
  Py_ssize_t i;
  if (ts == NULL) return;
  for (i = ts->n; i-- > 0;) {
    CompletionPortObject* p;
    if (i >= ts->n) continue; /* a port's dealloc below pruned the list */
    p = slot_port(ts->ports[i]);
    if (p == self) thread_slots_remove(ts, i, 1);
    else if (p == NULL) thread_slots_remove(ts, i, 0);
    Py_XDECREF(p); /* self, or a port another reference keeps alive */
  }
}

/* Records that the calling thread took a slot on self in the backend. If
 * that cannot be recorded (memory), the slot is given back at once. */
static void slot_hold(CompletionPortObject* self) {
  ThreadSlotsObject* ts = thread_slots(1);
  PyObject* ref;
  if (ts != NULL && ts->n == ts->cap) {
    Py_ssize_t cap = ts->cap ? ts->cap * 2 : 4;
    PyObject** grown = PyMem_Realloc(ts->ports, (size_t)cap * sizeof(PyObject*));
    if (grown == NULL) ts = NULL;
    else {
      ts->ports = grown;
      ts->cap = cap;
    }
  }
  ref = ts != NULL ? PyWeakref_NewRef((PyObject*)self, NULL) : NULL;
  if (ref == NULL) {
    PyErr_Clear();
    self->backend->release(self->port);
    return;
  }
  ts->ports[ts->n++] = ref;
}

/* Dequeues up to max completions into out. Returns the count (0 on
 * timeout), or -1 with an exception. The GIL is released only if there is
 * nothing ready. On return, successful or not, the caller counts as inside
 * the port until it calls port_leave() after finishing the records: close()
 * on another thread must not free the slabs those records live in. */
static int port_dequeue(CompletionPortObject* self, fiocp_op_t** out, int max,
                        int64_t timeout_ms) {
  int64_t deadline;
  int n;
  self->inside++;
  if (port_check_open(self) < 0) return -1;
  if (self->emulate_slots) slot_release(self);
  n = self->backend->try_get(self->port, out, max);
  if (n != 0 || timeout_ms == 0) goto done;
  deadline = timeout_ms < 0 ? -1 : fiocp__now_ms() + timeout_ms;
  for (;;) {
    int64_t left = fiocp__remaining_ms(deadline);
    Py_BEGIN_ALLOW_THREADS
    n = self->backend->wait(self->port, out, max, left);
    Py_END_ALLOW_THREADS
    if (n != FIOCP_EINTR) break;
    if (PyErr_CheckSignals() < 0) return -1;
    if (self->closed) {
      set_closed_error();
      return -1;
    }
    if (deadline >= 0 && fiocp__remaining_ms(deadline) == 0) return 0;
  }
done:
  if (n < 0) {
    set_code_error(n);
    return -1;
  }
  if (n > 0 && self->emulate_slots) slot_hold(self);
  return n;
}

static void port_leave(CompletionPortObject* self) {
  self->inside--;
  port_maybe_destroy(self);
}

static PyObject* CompletionPort_get(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"timeout"};
  static PyObject* interned[1];
  PyObject* a[1];
  int64_t ms;
  fiocp_op_t* rec;
  int n;
  if (parse_args("get", args, nargs, kwnames, names, interned, 1, 0, a) < 0 ||
      parse_timeout(a[0], &ms) < 0)
    return NULL;
  CompletionObject* c = NULL;
  n = port_dequeue(self, &rec, 1, ms);
  if (n > 0) c = finish_op(self, rec);
  port_leave(self);
  if (n < 0) return NULL;
  if (n == 0) Py_RETURN_NONE;
  return (PyObject*)c;
}

#define GET_MANY_STACK 256

static PyObject* CompletionPort_get_many(CompletionPortObject* self,
                                         FASTARGS) {
  static const char* const names[] = {"max", "timeout"};
  static PyObject* interned[2];
  PyObject* a[2];
  Py_ssize_t max = 64;
  int64_t ms;
  fiocp_op_t* stack[GET_MANY_STACK];
  fiocp_op_t** out = stack;
  PyObject* list;
  int n, i;
  if (parse_args("get_many", args, nargs, kwnames, names, interned, 2, 0, a) < 0 ||
      parse_timeout(a[1], &ms) < 0)
    return NULL;
  if (a[0] != NULL) {
    max = PyLong_AsSsize_t(a[0]);
    if (max == -1 && PyErr_Occurred()) return NULL;
  }
  if (max < 1) {
    PyErr_SetString(PyExc_ValueError, "max must be >= 1");
    return NULL;
  }
  if (max > 65536) max = 65536;
  if (max > GET_MANY_STACK) {
    out = (fiocp_op_t**)PyMem_Malloc(sizeof(fiocp_op_t*) * (size_t)max);
    if (out == NULL) return PyErr_NoMemory();
  }
  n = port_dequeue(self, out, (int)max, ms);
  if (n < 0) {
    port_leave(self);
    if (out != stack) PyMem_Free(out);
    return NULL;
  }
  list = PyList_New(n);
  for (i = 0; i < n; i++) {
    CompletionObject* c = finish_op(self, out[i]);
    /* The records are already dequeued: finish them all even if the list
     * could not be made, so nothing is lost or leaked. */
    if (list != NULL) PyList_SET_ITEM(list, i, (PyObject*)c);
    else Py_DECREF(c);
  }
  port_leave(self);
  if (out != stack) PyMem_Free(out);
  return list;
}

static PyObject* CompletionPort_iternext(CompletionPortObject* self) {
  fiocp_op_t* rec;
  int n;
  CompletionObject* c = NULL;
  if (self->closed) return NULL; /* StopIteration */
  n = port_dequeue(self, &rec, 1, -1);
  if (n > 0) c = finish_op(self, rec);
  port_leave(self);
  if (n < 0) {
    if (PyErr_ExceptionMatches(PortClosedError)) PyErr_Clear();
    return NULL;
  }
  return (PyObject*)c; /* NULL (StopIteration) only if n == 0 */
}

static PyObject* CompletionPort_close(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  if (port_close_impl(self) < 0) return NULL;
  Py_RETURN_NONE;
}

static PyObject* CompletionPort_enter(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  if (port_check_open(self) < 0) return NULL;
  Py_INCREF(self);
  return (PyObject*)self;
}

static PyObject* CompletionPort_exit(CompletionPortObject* self,
                                     PyObject* args) {
  (void)args;
  if (port_close_impl(self) < 0) return NULL;
  Py_RETURN_FALSE;
}

static PyObject* CompletionPort_get_backend(CompletionPortObject* self,
                                            void* c) {
  (void)c;
  if (self->backend == NULL) Py_RETURN_NONE;
  return PyUnicode_FromString(self->backend->name);
}

static PyObject* CompletionPort_get_closed(CompletionPortObject* self,
                                           void* c) {
  (void)c;
  return PyBool_FromLong(self->closed || !self->initialized);
}

static PyObject* CompletionPort_get_pending(CompletionPortObject* self,
                                            void* c) {
  (void)c;
  return PyLong_FromSsize_t(self->pending);
}

static PyObject* CompletionPort_get_concurrency(CompletionPortObject* self,
                                                void* c) {
  (void)c;
  return PyLong_FromUnsignedLong(self->concurrency);
}

static PyGetSetDef CompletionPort_getset[] = {
    {"backend", (getter)CompletionPort_get_backend, NULL,
     "The backend in use: 'iocp', 'io_uring' or 'epoll'.", NULL},
    {"closed", (getter)CompletionPort_get_closed, NULL,
     "True once close() has been called.", NULL},
    {"pending", (getter)CompletionPort_get_pending, NULL,
     "Operations and posts whose completion has not been dequeued yet.",
     NULL},
    {"concurrency", (getter)CompletionPort_get_concurrency, NULL,
     "The concurrency value the port was created with (0: number of CPUs).",
     NULL},
    {NULL}};

#define KW (METH_VARARGS | METH_KEYWORDS)
#define FASTKW (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef CompletionPort_methods[] = {
    {"register", (PyCFunction)(void (*)(void))CompletionPort_register, KW,
     "register($self, fileobj, key=None)\n--\n\nAssociate a file, socket or fd with "
     "the port. key (any object) comes back on every completion of "
     "operations on it."},
    {"unregister", (PyCFunction)CompletionPort_unregister, METH_O,
     "unregister($self, fileobj)\n--\n\nForget a registration (call before closing "
     "and reusing a descriptor)."},
    {"resubmit", (PyCFunction)(void (*)(void))CompletionPort_resubmit, FASTKW,
     "resubmit($self, completions, offsets=None)\n--\n\nStart dequeued read, write, "
     "recv, send, recvfrom and accept completions again, in one call: each "
     "on its handle, with its buffer and context (and, for a read or write, "
     "the offset at the same place in offsets; None there for a socket). "
     "The Completion objects are reused: each is pending again, and get() "
     "returns it when its new operation ends. Nothing is submitted if an "
     "argument is wrong. The way to keep a queue of reads full, or to "
     "re-arm a batch of receives or accepts, without a Python call per "
     "operation."},
    {"read", (PyCFunction)(void (*)(void))CompletionPort_read, FASTKW,
     "read($self, file, buffer, offset=0, context=None)\n--\n\nRead into buffer (a "
     "writable buffer, or an int size to allocate a bytearray) at offset "
     "(None: the current position, for pipes). Returns the pending "
     "Completion."},
    {"write", (PyCFunction)(void (*)(void))CompletionPort_write, FASTKW,
     "write($self, file, data, offset=0, context=None)\n--\n\nWrite data at offset "
     "(None: the current position). Returns the pending Completion."},
    {"recv", (PyCFunction)(void (*)(void))CompletionPort_recv, FASTKW,
     "recv($self, sock, buffer, context=None)\n--\n\nReceive into buffer (or an int "
     "size). nbytes == 0 means the peer closed."},
    {"send", (PyCFunction)(void (*)(void))CompletionPort_send, FASTKW,
     "send($self, sock, data, context=None)\n--\n\nSend data; nbytes may be short."},
    {"recvfrom", (PyCFunction)(void (*)(void))CompletionPort_recvfrom, FASTKW,
     "recvfrom($self, sock, buffer, context=None)\n--\n\nReceive a datagram; "
     "result() is (nbytes, address)."},
    {"sendto", (PyCFunction)(void (*)(void))CompletionPort_sendto, FASTKW,
     "sendto($self, sock, data, address, context=None)\n--\n\nSend a datagram to "
     "address."},
    {"accept", (PyCFunction)(void (*)(void))CompletionPort_accept, FASTKW,
     "accept($self, sock, context=None)\n--\n\nAccept a connection on a listening "
     "socket; result() is (socket.socket, address)."},
    {"connect", (PyCFunction)(void (*)(void))CompletionPort_connect, FASTKW,
     "connect($self, sock, address, context=None)\n--\n\nConnect a stream socket "
     "(TCP v4/v6, Unix)."},
    {"post", (PyCFunction)(void (*)(void))CompletionPort_post, FASTKW,
     "post($self, key=None, context=None, nbytes=0)\n--\n\nQueue a packet of your "
     "own; get() returns it as a Completion with op 'post'."},
    {"get", (PyCFunction)(void (*)(void))CompletionPort_get, FASTKW,
     "get($self, timeout=None)\n--\n\nDequeue one Completion, waiting up to timeout "
     "seconds (None: forever) with the GIL released. Returns None on "
     "timeout; raises PortClosedError once the port is closed."},
    {"get_many", (PyCFunction)(void (*)(void))CompletionPort_get_many, FASTKW,
     "get_many($self, max=64, timeout=None)\n--\n\nDequeue up to max completions in "
     "one wait. Returns a list, empty on timeout."},
    {"cancel", (PyCFunction)CompletionPort_cancel, METH_O,
     "cancel($self, op)\n--\n\nAsk the OS to cancel op; see Completion.cancel()."},
    {"flush", (PyCFunction)CompletionPort_flush, METH_NOARGS,
     "flush($self)\n--\n\nSubmit operations deferred by batch() now."},
    {"batch", (PyCFunction)CompletionPort_batch, METH_NOARGS,
     "batch($self)\n--\n\nDefer the submissions made inside `with port.batch():` "
     "and submit them together when the block ends (io_uring: one system "
     "call; other backends submit at once and the block is harmless). A "
     "thread waiting in get() also submits what is deferred. A batch "
     "belongs to the thread that opened it: other threads' submissions are "
     "not deferred."},
    {"close", (PyCFunction)CompletionPort_close, METH_NOARGS,
     "close($self)\n--\n\nCancel pending operations, wait for them (bounded), "
     "release their buffers and wake every waiting thread. Idempotent."},
    {"__enter__", (PyCFunction)CompletionPort_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)CompletionPort_exit, METH_VARARGS, NULL},
    {NULL}};

static PyTypeObject CompletionPortType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp.CompletionPort",
    .tp_basicsize = sizeof(CompletionPortObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "CompletionPort(concurrency=0, backend='auto', entries=0)\n--\n\n"
              "An I/O completion port: submit operations, dequeue their "
              "completions from any number of threads.\n\n"
              "concurrency: on Windows the IOCP concurrency value (0: number "
              "of CPUs); elsewhere recorded, see the README.\n"
              "backend: 'auto' (FASTIOCP_BACKEND, else the best that works "
              "here), 'iocp', 'io_uring' or 'epoll'.\n"
              "entries: io_uring queue size hint (0: 1024).",
    .tp_traverse = (traverseproc)CompletionPort_traverse,
    .tp_clear = (inquiry)CompletionPort_clear,
    .tp_dealloc = (destructor)CompletionPort_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)CompletionPort_iternext,
    .tp_methods = CompletionPort_methods,
    .tp_getset = CompletionPort_getset,
    .tp_init = (initproc)CompletionPort_init,
    .tp_new = PyType_GenericNew,
    .tp_weaklistoffset = offsetof(CompletionPortObject, weakreflist),
};

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

static PyObject* mod_win_open(PyObject* m, PyObject* args) {
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

static PyObject* mod_win_close_handle(PyObject* m, PyObject* args) {
  fiocp_handle_t h;
  int rc;
  (void)m;
  if (!PyArg_ParseTuple(args, "O&:_win_close_handle", handle_converter, &h)) return NULL;
  rc = fiocp__win_close_handle((fiocp_handle_t)h);
  if (rc < 0) return set_code_error(rc);
  Py_RETURN_NONE;
}

static PyObject* mod_win_file_size(PyObject* m, PyObject* args) {
  fiocp_handle_t h;
  int64_t size = 0;
  int rc;
  (void)m;
  if (!PyArg_ParseTuple(args, "O&:_win_file_size", handle_converter, &h)) return NULL;
  rc = fiocp__win_file_size((fiocp_handle_t)h, &size);
  if (rc < 0) return set_code_error(rc);
  return PyLong_FromLongLong((long long)size);
}

static PyObject* mod_win_truncate(PyObject* m, PyObject* args) {
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
  if (rc < 0) return set_code_error(rc);
  Py_RETURN_NONE;
}
#endif /* _WIN32: Windows file helpers */

static PyMethodDef module_methods[] = {
    {"backend_status", (PyCFunction)mod_backend_status, METH_NOARGS,
     "backend_status($module)\n--\n\nFor each backend compiled in, best first: "
     "(name, works_here, reason_if_not)."},
#ifdef _WIN32
    {"_win_open", (PyCFunction)mod_win_open, METH_VARARGS,
     "_win_open($module, path, readable, writable, kind, direct)\n--\n\nOpen a file "
     "for overlapped I/O (kind: 'r', 'w', 'a' or 'x'); returns the HANDLE."},
    {"_win_close_handle", (PyCFunction)mod_win_close_handle, METH_VARARGS,
     "_win_close_handle($module, handle)\n--\n\nCloseHandle()."},
    {"_win_file_size", (PyCFunction)mod_win_file_size, METH_VARARGS,
     "_win_file_size($module, handle)\n--\n\nThe file's size in bytes."},
    {"_win_truncate", (PyCFunction)mod_win_truncate, METH_VARARGS,
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
      "accept", "connect", "post"};
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
  if (PyType_Ready(&CompletionType) < 0 || PyType_Ready(&BatchType) < 0 ||
      PyType_Ready(&ThreadSlotsType) < 0 || PyType_Ready(&FileHandleType) < 0 ||
      PyType_Ready(&CompletionPortType) < 0)
    return NULL;
  for (i = 0; i < FIOCP_OP__COUNT; i++) {
    if (kind_names[i] == NULL) {
      kind_names[i] = PyUnicode_InternFromString(names[i]);
      if (kind_names[i] == NULL) return NULL;
    }
  }
  if (str_fileno == NULL) {
    str_fileno = PyUnicode_InternFromString("fileno");
    if (str_fileno == NULL) return NULL;
  }
  if (str_thread_slots == NULL) {
    str_thread_slots = PyUnicode_InternFromString("fastiocp.thread_slots");
    if (str_thread_slots == NULL) return NULL;
  }
  sockmod = PyImport_ImportModule("socket");
  if (sockmod == NULL) return NULL;
  socket_type = PyObject_GetAttrString(sockmod, "socket");
  Py_DECREF(sockmod);
  if (socket_type == NULL) return NULL;

  m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
  FastIOCPError = new_exception(m, "fastiocp.FastIOCPError", NULL,
                                "Base class of fastiocp's own exceptions.");
  if (FastIOCPError == NULL) goto fail;
  bases = PyTuple_Pack(2, FastIOCPError, PyExc_OSError);
  BackendUnavailableError =
      bases ? new_exception(m, "fastiocp.BackendUnavailableError", bases,
                            "No usable backend, or the one asked for cannot "
                            "work on this machine (the message says why).")
            : NULL;
  Py_XDECREF(bases);
  if (BackendUnavailableError == NULL) goto fail;
  bases = PyTuple_Pack(2, FastIOCPError, PyExc_ValueError);
  PortClosedError = bases ? new_exception(m, "fastiocp.PortClosedError", bases,
                                          "The CompletionPort is closed.")
                          : NULL;
  Py_XDECREF(bases);
  if (PortClosedError == NULL) goto fail;
  bases = PyTuple_Pack(2, FastIOCPError, PyExc_RuntimeError);
  InvalidStateError =
      bases ? new_exception(m, "fastiocp.InvalidStateError", bases,
                            "result() was called before the operation "
                            "completed.")
            : NULL;
  Py_XDECREF(bases);
  if (InvalidStateError == NULL) goto fail;

  Py_INCREF(&CompletionType);
  if (PyModule_AddObject(m, "Completion", (PyObject*)&CompletionType) < 0) {
    Py_DECREF(&CompletionType);
    goto fail;
  }
  Py_INCREF(&CompletionPortType);
  if (PyModule_AddObject(m, "CompletionPort", (PyObject*)&CompletionPortType) <
      0) {
    Py_DECREF(&CompletionPortType);
    goto fail;
  }
  Py_INCREF(&FileHandleType);
  if (PyModule_AddObject(m, "_FileHandle", (PyObject*)&FileHandleType) < 0) {
    Py_DECREF(&FileHandleType);
    goto fail;
  }
  return m;
fail:
  Py_DECREF(m);
  return NULL;
}
