/* transport.c: the C fast path of the asyncio loop's socket transports
 * (src/fastiocp/loop/_transports.py), issue 16.
 *
 * _ReadLoop(transport, port) is the context of a transport's receive: the
 * loop's select() calls it with the receive's Completion. In the common
 * case (the transport's own receive, finished with data, the transport
 * neither closing nor paused, a plain Protocol) it does in C what the
 * transport's Python read loop (_ReadsDirect._loop_reading) does: copies
 * the data into bytes, starts the same receive again (resubmit), then calls
 * protocol.data_received(data). For a BufferedProtocol whose buffer the
 * receive filled it calls buffer_updated(n), then transport._start_receive()
 * (get_buffer and the next receive, in Python). Every other case goes to
 * transport._loop_reading(completion), which owns the rules; this file only
 * takes the path those rules give for the common cases, in the same order.
 *
 * A plain Protocol's transport may instead receive into the loop's buffer
 * pool (issue 18): in the common case the receive starts again, the data
 * is copied into bytes and its buffer given back to the pool, then
 * protocol.data_received() gets it; every other case goes to
 * transport._pooled_reading(completion).
 *
 * _SocketWrite() is the write() method of the POSIX socket transports: when
 * nothing is queued it sends bytes, a bytearray or a contiguous memoryview
 * at once with one non-blocking send(), as _WritesAtOnce.write() does; anything else (other
 * types, something queued, a short or failed send) goes to the Python
 * methods, _write_python(data) or, for the rest of a short send,
 * _write_queued(rest).
 *
 * The loop is one per thread: no state here is shared between threads. */
#include "loop.h"

#include <limits.h>
#ifndef _WIN32
#include <errno.h>
#include <sys/socket.h>
#endif

static PyObject *str_read_fut, *str_closing, *str_paused, *str_data, *str_protocol,
    *str_loop_reading, *str_data_received, *str_resubmit, *str_buffer, *str_conn_lost,
    *str_eof_written, *str_empty_waiter, *str_write_fut, *str_sock, *str_write_python,
    *str_write_queued, *str_buffer_owner, *str_buffer_updated, *str_start_receive,
    *str_held_chunks, *str_pooled_reading;

typedef struct {
  PyObject_HEAD
  PyObject* transport;
  PyObject* port;
  PyObject* buffered_protocol; /* asyncio.BufferedProtocol (no global: 3.13t) */
} ReadLoopObject;

static int ReadLoop_init(ReadLoopObject* self, PyObject* args, PyObject* kwds) {
  PyObject *transport, *port, *protocols, *buffered;
  static char* kwlist[] = {"transport", "port", NULL};
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!:_ReadLoop", kwlist, &transport,
                                   &fb_CompletionPortType, &port))
    return -1;
  /* Looked up here, not at import: fastiocp alone does not import asyncio. */
  protocols = PyImport_ImportModule("asyncio.protocols");
  if (protocols == NULL) return -1;
  buffered = PyObject_GetAttrString(protocols, "BufferedProtocol");
  Py_DECREF(protocols);
  if (buffered == NULL) return -1;
  Py_INCREF(transport);
  Py_INCREF(port);
  Py_XSETREF(self->transport, transport);
  Py_XSETREF(self->port, port);
  Py_XSETREF(self->buffered_protocol, buffered);
  return 0;
}

static int ReadLoop_traverse(ReadLoopObject* self, visitproc visit, void* arg) {
  Py_VISIT(self->transport);
  Py_VISIT(self->port);
  Py_VISIT(self->buffered_protocol);
  return 0;
}

static int ReadLoop_clear(ReadLoopObject* self) {
  Py_CLEAR(self->transport);
  Py_CLEAR(self->port);
  Py_CLEAR(self->buffered_protocol);
  return 0;
}

static void ReadLoop_dealloc(ReadLoopObject* self) {
  PyObject_GC_UnTrack(self);
  (void)ReadLoop_clear(self);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

/* 1 if getattr(obj, name) is obj2 / true, 0 if not, -1 on error. */
static int attr_is(PyObject* obj, PyObject* name, PyObject* expected) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (v == NULL) return -1;
  Py_DECREF(v); /* only its identity is used */
  return v == expected;
}

static int attr_true(PyObject* obj, PyObject* name) {
  int r;
  PyObject* v = PyObject_GetAttr(obj, name);
  if (v == NULL) return -1;
  r = PyObject_IsTrue(v);
  Py_DECREF(v);
  return r;
}

/* Returns 1 and sets *data to the received bytes when the common case
 * applies; 0 when the Python read loop must decide; -1 on error. */
static int common_case(ReadLoopObject* self, CompletionObject* c, PyObject* protocol,
                       PyObject** data) {
  PyObject* t = self->transport;
  Py_buffer view;
  Py_ssize_t n;
  int r;
  if (!c->done || c->cancelled || c->error != Py_None) return 0;
  n = PyLong_AsSsize_t(c->nbytes_obj);
  if (n == -1 && PyErr_Occurred()) return -1;
  if (n <= 0) return 0; /* end of file: the Python loop delivers it */
  if ((r = attr_is(t, str_read_fut, (PyObject*)c)) != 1) return r;
  if ((r = attr_is(t, str_data, c->buffer)) != 1) return r;
  if ((r = attr_true(t, str_closing)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_true(t, str_paused)) != 0) return r < 0 ? -1 : 0;
  if ((r = PyObject_IsInstance(protocol, self->buffered_protocol)) != 0) return r < 0 ? -1 : 0;
  if (PyObject_GetBuffer(c->buffer, &view, PyBUF_SIMPLE) < 0) return -1;
  if (n > view.len) { /* cannot be: the kernel filled at most the buffer */
    PyBuffer_Release(&view);
    return 0;
  }
  *data = PyBytes_FromStringAndSize((const char*)view.buf, n);
  PyBuffer_Release(&view);
  return *data == NULL ? -1 : 1;
}

/* The exception being raised, taken (a new reference, traceback attached). */
static PyObject* take_exception(void) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (value != NULL && tb != NULL) (void)PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  return value;
}

/* A BufferedProtocol's own receive finished with data, the transport
 * neither closing nor paused: what _loop_reading does then (buffer_updated,
 * then _start_receive). Returns 1 with *result set (NULL: an exception),
 * 0 when the Python read loop must decide, -1 on error. */
static int buffered_case(ReadLoopObject* self, CompletionObject* c, PyObject* protocol,
                         PyObject** result) {
  PyObject *t = self->transport, *r;
  Py_ssize_t n;
  int k;
  *result = NULL;
  if (!c->done || c->cancelled || c->error != Py_None) return 0;
  n = PyLong_AsSsize_t(c->nbytes_obj);
  if (n == -1 && PyErr_Occurred()) return -1;
  if (n <= 0) return 0;
  if ((k = attr_is(t, str_read_fut, (PyObject*)c)) != 1) return k;
  if ((k = attr_is(t, str_buffer_owner, protocol)) != 1) return k;
  if ((k = attr_is(t, str_data, c->buffer)) != 0) return k < 0 ? -1 : 0;
  if ((k = attr_true(t, str_closing)) != 0) return k < 0 ? -1 : 0;
  if ((k = attr_true(t, str_paused)) != 0) return k < 0 ? -1 : 0;
  if (PyObject_SetAttr(t, str_read_fut, Py_None) < 0 ||
      PyObject_SetAttr(t, str_buffer_owner, Py_None) < 0)
    return -1;
  r = PyObject_CallMethodOneArg(protocol, str_buffer_updated, c->nbytes_obj);
  if (r == NULL) {
    PyObject* exc;
    if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
      return 1;
    exc = take_exception();
    if (exc == NULL) return 1;
    r = PyObject_CallMethod(t, "_fatal_error", "Os", exc,
                            "Fatal error: protocol.buffer_updated() call failed.");
    Py_DECREF(exc);
    if (r == NULL) return 1;
  }
  Py_DECREF(r);
  r = PyObject_CallMethodOneArg(t, str_start_receive, (PyObject*)c);
  if (r == NULL && PyErr_ExceptionMatches(PyExc_OSError)) {
    /* the receive could not start: the transport's rules */
    PyObject* exc = take_exception();
    if (exc == NULL) return 1;
    r = PyObject_CallMethod(t, "_read_failed", "O", exc);
    Py_DECREF(exc);
  }
  *result = r;
  return 1;
}

/* A pooled receive finished: the common case here (the transport's own
 * receive with data, not closing, not paused, nothing held, a plain
 * Protocol): the receive starts again (resubmit: the pool again), the
 * data is copied into bytes and its buffer given back, then the protocol
 * gets it. Every other case: transport._pooled_reading(c). */
static PyObject* pooled_case(ReadLoopObject* self, CompletionObject* c) {
  PyObject *t = self->transport, *protocol, *data, *buf, *again, *r;
  Py_buffer view;
  int k;
  if (c->more || !c->done || c->error != Py_None || c->nbytes <= 0 ||
      !Py_IS_TYPE(c->buffer, &fb_PooledBufferType))
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  if ((k = attr_is(t, str_read_fut, (PyObject*)c)) != 1 ||
      (k = attr_true(t, str_closing)) != 0 || (k = attr_true(t, str_paused)) != 0 ||
      (k = attr_is(t, str_held_chunks, Py_None)) != 1) {
    if (k < 0) return NULL;
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  }
  protocol = PyObject_GetAttr(t, str_protocol);
  if (protocol == NULL) return NULL;
  if ((k = PyObject_IsInstance(protocol, self->buffered_protocol)) != 0) {
    Py_DECREF(protocol);
    if (k < 0) return NULL;
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  }
  /* The buffer is ours to read after resubmit() gives c the pool again. */
  buf = Py_NewRef(c->buffer);
  again = PyTuple_Pack(1, (PyObject*)c);
  r = again ? PyObject_CallMethodOneArg(self->port, str_resubmit, again) : NULL;
  Py_XDECREF(again);
  if (r == NULL) {
    Py_DECREF(buf);
    Py_DECREF(protocol);
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyErr_Clear(); /* the Python loop does it all over, its way */
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  }
  Py_DECREF(r);
  if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) {
    Py_DECREF(buf);
    Py_DECREF(protocol);
    return NULL;
  }
  data = PyBytes_FromStringAndSize((const char*)view.buf, view.len);
  PyBuffer_Release(&view);
  k = fb_PooledBuffer_release(buf);
  Py_DECREF(buf);
  if (data == NULL || k < 0) {
    Py_XDECREF(data);
    Py_DECREF(protocol);
    return NULL;
  }
  r = PyObject_CallMethodOneArg(protocol, str_data_received, data);
  Py_DECREF(data);
  Py_DECREF(protocol);
  return r;
}

static PyObject* ReadLoop_call(ReadLoopObject* self, PyObject* args, PyObject* kwds) {
  PyObject *c, *protocol, *data = NULL, *again, *r;
  int common;
  if (!PyArg_UnpackTuple(args, "_ReadLoop", 1, 1, &c)) return NULL;
  if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
    PyErr_SetString(PyExc_TypeError, "_ReadLoop takes no keyword arguments");
    return NULL;
  }
  if (self->transport == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "_ReadLoop is not initialized");
    return NULL;
  }
  if (!PyObject_TypeCheck(c, &fb_CompletionType))
    return PyObject_CallMethodOneArg(self->transport, str_loop_reading, c);
  if (((CompletionObject*)c)->flags & FIOCP_OPF_POOLED)
    return pooled_case(self, (CompletionObject*)c);
  protocol = PyObject_GetAttr(self->transport, str_protocol);
  if (protocol == NULL) return NULL;
  common = common_case(self, (CompletionObject*)c, protocol, &data);
  if (common < 0) {
    Py_DECREF(protocol);
    return NULL;
  }
  if (common == 1) {
    /* As the Python loop: the receive starts again before the protocol
     * sees the data. If resubmit() refuses, the Python loop does it all
     * over and handles the error its way. */
    again = PyTuple_Pack(1, c);
    r = again ? PyObject_CallMethodOneArg(self->port, str_resubmit, again) : NULL;
    Py_XDECREF(again);
    if (r == NULL) {
      if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* MemoryError etc. propagate */
        Py_DECREF(data);
        Py_DECREF(protocol);
        return NULL;
      }
      PyErr_Clear();
      Py_CLEAR(data);
      common = 0;
    } else {
      Py_DECREF(r);
    }
  }
  if (common == 0) {
    PyObject* result;
    int buffered = buffered_case(self, (CompletionObject*)c, protocol, &result);
    Py_DECREF(protocol);
    if (buffered < 0) return NULL;
    if (buffered) return result;
    return PyObject_CallMethodOneArg(self->transport, str_loop_reading, c);
  }
  r = PyObject_CallMethodOneArg(protocol, str_data_received, data);
  Py_DECREF(data);
  Py_DECREF(protocol);
  return r;
}

PyTypeObject fb_ReadLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._fastiocp._ReadLoop",
    .tp_basicsize = sizeof(ReadLoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "_ReadLoop(transport, port)\n--\n\n"
              "The receive callback of the asyncio loop's socket transports: called\n"
              "with a receive's Completion, it hands the data to the protocol and\n"
              "starts the receive again, or leaves the case to\n"
              "transport._loop_reading(completion).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ReadLoop_init,
    .tp_dealloc = (destructor)ReadLoop_dealloc,
    .tp_traverse = (traverseproc)ReadLoop_traverse,
    .tp_clear = (inquiry)ReadLoop_clear,
    .tp_call = (ternaryfunc)ReadLoop_call,
};

/* ---- _SocketWrite ---------------------------------------------------------- */

typedef struct {
  PyObject_HEAD
} SocketWriteObject;

#ifndef _WIN32
/* 1 when write(data) may send at once (what _WritesAtOnce.write checks,
 * with a pending write future always sent to Python), 0 if not, -1 on
 * error. */
static int may_send_now(PyObject* t) {
  int r;
  if ((r = attr_true(t, str_buffer)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_true(t, str_conn_lost)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_true(t, str_eof_written)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_is(t, str_empty_waiter, Py_None)) != 1) return r;
  if ((r = attr_is(t, str_write_fut, Py_None)) != 1) return r;
  return 1;
}

/* The transport's socket descriptor, or -1 (no socket; an exception set
 * only if fileno() raised something other than a closed socket's -1). */
static int socket_fd(PyObject* t) {
  long fd;
  PyObject *sock, *no;
  sock = PyObject_GetAttr(t, str_sock);
  if (sock == NULL) return -1;
  if (sock == Py_None) {
    Py_DECREF(sock);
    return -1;
  }
  no = PyObject_CallMethodNoArgs(sock, fb_str_fileno);
  Py_DECREF(sock);
  if (no == NULL) return -1;
  fd = PyLong_AsLong(no);
  Py_DECREF(no);
  if (fd == -1 && PyErr_Occurred()) return -1;
  return fd < 0 || fd > INT_MAX ? -1 : (int)fd;
}
#endif

#ifndef _WIN32
/* Sends what the kernel takes of view at once. Returns 1 with *result set
 * (write()'s result, or NULL with an exception), or 0 when nothing was sent
 * and Python's write() must take it. */
static int send_now(PyObject* t, PyObject* data, const Py_buffer* view, PyObject** result) {
  int ok, fd;
  ssize_t n;
  *result = NULL;
  if ((ok = may_send_now(t)) <= 0) return ok < 0;
  fd = socket_fd(t);
  if (fd < 0) return PyErr_Occurred() != NULL;
  /* Non-blocking, no SIGPIPE: a failed send leaves the error to the
   * proactor's send, as the Python version does. */
  do
    n = send(fd, view->buf, (size_t)view->len, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n <= 0) return 0; /* the Python path queues it all (and tries again) */
  if (n == view->len) {
    *result = Py_NewRef(Py_None);
  } else {
    PyObject *whole, *octets = NULL, *rest;
    /* memoryview(data).cast("B")[n:]: n counts bytes, not items */
    whole = PyMemoryView_FromObject(data);
    if (whole != NULL) octets = PyObject_CallMethod(whole, "cast", "s", "B");
    rest = octets ? PySequence_GetSlice(octets, n, view->len) : NULL;
    Py_XDECREF(octets);
    Py_XDECREF(whole);
    if (rest != NULL) {
      *result = PyObject_CallMethodOneArg(t, str_write_queued, rest);
      Py_DECREF(rest);
    }
  }
  return 1;
}
#endif

static PyObject* SocketWrite_call(SocketWriteObject* self, PyObject* args, PyObject* kwds) {
  PyObject *t, *data;
  (void)self;
  if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
    PyErr_SetString(PyExc_TypeError, "write() takes no keyword arguments");
    return NULL;
  }
  if (!PyArg_UnpackTuple(args, "write", 2, 2, &t, &data)) return NULL;
#ifndef _WIN32
  /* What _WritesAtOnce.write() sends at once: bytes, bytearray, memoryview
   * (here only a C-contiguous one of bytes, the common case). */
  if (PyBytes_CheckExact(data) || PyByteArray_CheckExact(data) || PyMemoryView_Check(data)) {
    Py_buffer view;
    PyObject* result;
    int sent = 0;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
      PyErr_Clear(); /* not contiguous bytes: Python's write() decides */
    } else {
      if (view.len > 0) sent = send_now(t, data, &view, &result);
      PyBuffer_Release(&view);
      if (sent) return result;
    }
  }
#endif
  return PyObject_CallMethodOneArg(t, str_write_python, data);
}

static PyObject* SocketWrite_get(PyObject* self, PyObject* obj, PyObject* type) {
  (void)type;
  if (obj == NULL || obj == Py_None) return Py_NewRef(self);
  return PyMethod_New(self, obj);
}

PyTypeObject fb_SocketWriteType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._fastiocp._SocketWrite",
    .tp_basicsize = sizeof(SocketWriteObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "_SocketWrite()\n--\n\n"
              "The write() method of the asyncio loop's socket transports, in C:\n"
              "sends at once when nothing is queued, else calls\n"
              "transport._write_python(data).",
    .tp_new = PyType_GenericNew,
    .tp_call = (ternaryfunc)SocketWrite_call,
    .tp_descr_get = SocketWrite_get,
};

int fb_loop_init(PyObject* module) {
  struct {
    PyObject** slot;
    const char* text;
  } names[] = {
      {&str_read_fut, "_read_fut"},       {&str_closing, "_closing"},
      {&str_paused, "_paused"},           {&str_data, "_data"},
      {&str_protocol, "_protocol"},       {&str_loop_reading, "_loop_reading"},
      {&str_data_received, "data_received"}, {&str_resubmit, "resubmit"},
      {&str_buffer, "_buffer"},           {&str_conn_lost, "_conn_lost"},
      {&str_eof_written, "_eof_written"}, {&str_empty_waiter, "_empty_waiter"},
      {&str_write_fut, "_write_fut"},     {&str_sock, "_sock"},
      {&str_write_python, "_write_python"}, {&str_write_queued, "_write_queued"},
      {&str_buffer_owner, "_buffer_owner"}, {&str_buffer_updated, "buffer_updated"},
      {&str_start_receive, "_start_receive"}, {&str_held_chunks, "_held_chunks"},
      {&str_pooled_reading, "_pooled_reading"},
  };
  size_t i;
  for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    if (*names[i].slot == NULL) {
      *names[i].slot = PyUnicode_InternFromString(names[i].text);
      if (*names[i].slot == NULL) return -1;
    }
  }
  if (PyType_Ready(&fb_ReadLoopType) < 0 || PyType_Ready(&fb_SocketWriteType) < 0) return -1;
  if (PyModule_AddObjectRef(module, "_ReadLoop", (PyObject*)&fb_ReadLoopType) < 0) return -1;
  if (PyModule_AddObjectRef(module, "_SocketWrite", (PyObject*)&fb_SocketWriteType) < 0) return -1;
  return fb_loop_core_init(module);
}
