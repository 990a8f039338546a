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
 * receive filled it calls buffer_updated(n), then starts the next receive
 * into the buffer get_buffer(-1) gives (buffered_again; the Python
 * _start_receive() when the protocol is no longer a BufferedProtocol).
 * Every other case goes to
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
 * at once with one non-blocking send(), as _WritesAtOnce.write() does, or,
 * inside a batch of completions on io_uring, queues it on the ring
 * (_RingWrite, below); a write behind a ring send in flight joins _buffer.
 * Anything else (other types, something queued, a short or failed send)
 * goes to the Python methods, _write_python(data) or, for the rest of a
 * short send, _write_queued(rest).
 *
 * The loop is one per thread: no state here is shared between threads. */
#include "loop.h"

#include <limits.h>
#ifndef _WIN32
#include <errno.h>
#include <sys/socket.h>
#endif

static PyObject *str_read_fut, *str_closing, *str_paused, *str_data, *str_protocol,
    *str_loop_reading, *str_data_received, *str_buffer, *str_conn_lost,
    *str_eof_written, *str_empty_waiter, *str_write_fut, *str_sock, *str_write_python,
    *str_write_queued, *str_buffer_owner, *str_buffer_updated, *str_start_receive,
    *str_held_chunks, *str_pooled_reading, *str_ring_writer, *str_high_water,
    *str_pending_write, *str_protocol_paused, *str_recv, *str_loop_writing, *str_reader;

/* The transport's attributes that the fast path reads and writes. */
enum {
  A_READ_FUT, A_CLOSING, A_PAUSED, A_DATA, A_PROTOCOL, A_BUFFER_OWNER, A_HELD_CHUNKS,
  A_BUFFER, A_CONN_LOST, A_EOF_WRITTEN, A_EMPTY_WAITER, A_WRITE_FUT, A_SOCK, A_RING_WRITER,
  A_PENDING_WRITE, A_READER, A_HIGH_WATER, A_PROTOCOL_PAUSED, A_COUNT
};
static PyObject** const attr_names[A_COUNT] = {
    &str_read_fut,      &str_closing,    &str_paused,         &str_data,
    &str_protocol,      &str_buffer_owner, &str_held_chunks,  &str_buffer,
    &str_conn_lost,     &str_eof_written, &str_empty_waiter,  &str_write_fut,
    &str_sock,          &str_ring_writer, &str_pending_write, &str_reader,
    &str_high_water,    &str_protocol_paused,
};

/* Where a type keeps those attributes. The loop's SocketTransport declares
 * them as __slots__ (and _FlowControlMixin has the last two): each is then
 * read and written at its offset in the object, where a getattr() looks
 * the name up along the MRO (16 classes) and a __dict__ lookup cost about
 * 140 instructions, a dozen times per message. A name that is no slot is
 * read from the instance's __dict__ (else its class's default). fit is 0
 * when the type does not keep the generic getattr and setattr, or gives a
 * name another data descriptor: then every name goes through getattr()
 * and setattr(). */
typedef struct {
  unsigned char fit;
  unsigned char needs_dict;      /* some name is no slot */
  unsigned short slot[A_COUNT];  /* the offset of the name's object slot, or 0: none */
} layout_t;

typedef struct {
  PyObject* obj;
  PyObject* dict; /* obj's __dict__ when fit and some name is no slot, else NULL */
  layout_t lay;
} attrs_t;

/* The layout of type, as above. */
static void layout_find(PyTypeObject* type, layout_t* lay) {
  PyObject* mro = type->tp_mro;
  Py_ssize_t i;
  int j, found[A_COUNT] = {0};
  memset(lay, 0, sizeof(*lay));
  if (type->tp_getattro != PyObject_GenericGetAttr ||
      type->tp_setattro != PyObject_GenericSetAttr || mro == NULL || !PyTuple_Check(mro))
    return;
  /* Each name's first definition along the MRO decides. */
  for (i = 0; i < PyTuple_GET_SIZE(mro); i++) {
    PyTypeObject* cls = (PyTypeObject*)PyTuple_GET_ITEM(mro, i);
#if PY_VERSION_HEX >= 0x030C0000
    PyObject* cd = PyType_GetDict(cls);
#else
    PyObject* cd = Py_XNewRef(cls->tp_dict);
#endif
    if (cd == NULL) continue;
    for (j = 0; j < A_COUNT; j++) {
      PyObject* v;
      int got;
      if (found[j]) continue;
      got = fb_dict_get_ref(cd, *attr_names[j], &v);
      if (got < 0) {
        PyErr_Clear();
        Py_DECREF(cd);
        return;
      }
      if (!got) continue;
      found[j] = 1;
      {
        PyMemberDef* m = fb_object_slot(v);
        int other = m == NULL ? Py_TYPE(v)->tp_descr_set != NULL
                              : m->offset <= 0 || m->offset > USHRT_MAX;
        Py_DECREF(v);
        if (other) { /* a property or such: getattr() for all */
          Py_DECREF(cd);
          return;
        }
        if (m != NULL) lay->slot[j] = (unsigned short)m->offset;
      }
    }
    Py_DECREF(cd);
  }
  for (j = 0; j < A_COUNT; j++)
    if (lay->slot[j] == 0) lay->needs_dict = 1;
  lay->fit = 1;
}

/* layout_find()'s last result, for a type and its version tag: the tag
 * changes when the type or one of its bases is modified, and a new one is
 * never 0 or reused. Finding it walks 16 classes for 18 names (2 µs), and
 * every transport of a loop has the same type. */
static PyTypeObject* fit_type;
static unsigned int fit_version;
static layout_t fit_layout;
#ifdef Py_GIL_DISABLED
static PyMutex fit_mu;
#endif

/* a: the attributes of obj. attrs_done() ends it. */
static void attrs_init(attrs_t* a, PyObject* obj) {
  PyTypeObject* type = Py_TYPE(obj);
  unsigned int version = type->tp_version_tag;
  int known = 0;
  a->obj = obj;
  a->dict = NULL;
#ifdef Py_GIL_DISABLED
  PyMutex_Lock(&fit_mu);
#endif
  if (version != 0 && type == fit_type && version == fit_version) {
    a->lay = fit_layout;
    known = 1;
  }
#ifdef Py_GIL_DISABLED
  PyMutex_Unlock(&fit_mu);
#endif
  if (!known) {
    layout_find(type, &a->lay);
    if (version != 0 && version == type->tp_version_tag) {
      PyTypeObject* old;
#ifdef Py_GIL_DISABLED
      PyMutex_Lock(&fit_mu);
#endif
      old = fit_type;
      fit_type = (PyTypeObject*)Py_NewRef(type);
      fit_version = version;
      fit_layout = a->lay;
#ifdef Py_GIL_DISABLED
      PyMutex_Unlock(&fit_mu);
#endif
      Py_XDECREF(old); /* outside the lock: a type's deallocation runs code */
    }
  }
  if (a->lay.fit && a->lay.needs_dict) {
    PyObject* dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL || !PyDict_Check(dict)) {
      /* no __dict__: what is no slot goes through getattr() */
      PyErr_Clear();
      Py_XDECREF(dict);
      a->lay.fit = 0;
    } else {
      a->dict = dict;
    }
  }
}

static void attrs_done(attrs_t* a) { Py_CLEAR(a->dict); }

/* done(owner, a, c), a the attributes of transport, which is held
 * meanwhile: the protocol's callbacks may drop the owner's reference. */
static PyObject* with_attrs(PyObject* (*done)(PyObject*, const attrs_t*, PyObject*),
                            PyObject* owner, PyObject* transport, PyObject* c) {
  attrs_t a;
  PyObject* r;
  Py_INCREF(transport);
  attrs_init(&a, transport);
  r = done(owner, &a, c);
  attrs_done(&a);
  Py_DECREF(transport);
  return r;
}

/* The object in obj's slot at offset off, for name, as the member
 * descriptor's __get__ gives it (AttributeError when empty): directly
 * with the GIL, through PyMember_GetOne() without (its atomic reads). */
static PyObject* slot_get(PyObject* obj, Py_ssize_t off, int name) {
#ifdef Py_GIL_DISABLED
  PyMemberDef m = {PyUnicode_AsUTF8(*attr_names[name]), T_OBJECT_EX, off, 0, NULL};
  return m.name == NULL ? NULL : PyMember_GetOne((const char*)obj, &m);
#else
  PyObject* v = *(PyObject**)((char*)obj + off);
  if (v == NULL)
    PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'", Py_TYPE(obj)->tp_name,
                 *attr_names[name]);
  return Py_XNewRef(v);
#endif
}

/* obj's slot at offset off, for name, set to value (not NULL). 0, or -1. */
static int slot_set(PyObject* obj, Py_ssize_t off, int name, PyObject* value) {
#ifdef Py_GIL_DISABLED
  PyMemberDef m = {PyUnicode_AsUTF8(*attr_names[name]), T_OBJECT_EX, off, 0, NULL};
  return m.name == NULL ? -1 : PyMember_SetOne((char*)obj, &m, value);
#else
  PyObject** p = (PyObject**)((char*)obj + off);
  PyObject* old = *p;
  (void)name;
  *p = Py_NewRef(value);
  Py_XDECREF(old); /* last: its deallocation may run code */
  return 0;
#endif
}

/* getattr(a->obj, name), a new reference. */
static PyObject* attr_get(const attrs_t* a, int name) {
  if (a->lay.fit) {
    if (a->lay.slot[name] != 0) return slot_get(a->obj, a->lay.slot[name], name);
    if (a->dict != NULL) {
      PyObject* v;
      int found = fb_dict_get_ref(a->dict, *attr_names[name], &v);
      if (found) return found < 0 ? NULL : v;
      /* not set on the object: its class's default */
    }
  }
  return PyObject_GetAttr(a->obj, *attr_names[name]);
}

static int attr_set(const attrs_t* a, int name, PyObject* value) {
  if (a->lay.fit) {
    if (a->lay.slot[name] != 0) return slot_set(a->obj, a->lay.slot[name], name, value);
    if (a->dict != NULL) return PyDict_SetItem(a->dict, *attr_names[name], value);
  }
  return PyObject_SetAttr(a->obj, *attr_names[name], value);
}

/* 1 if getattr(obj, name) is expected / true, 0 if not, -1 on error. */
static int attr_is(const attrs_t* a, int name, PyObject* expected) {
  PyObject* v = attr_get(a, name);
  if (v == NULL) return -1;
  Py_DECREF(v); /* only its identity is used */
  return v == expected;
}

static int attr_true(const attrs_t* a, int name) {
  int r;
  PyObject* v = attr_get(a, name);
  if (v == NULL) return -1;
  r = PyObject_IsTrue(v);
  Py_DECREF(v);
  return r;
}

/* The callables here take vectorcall arguments (no tuple per call):
 * exactly n positional arguments, no keywords. 0, or -1 with TypeError. */
static int exact_args(const char* name, size_t nargsf, PyObject* kwnames, Py_ssize_t n) {
  if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
    PyErr_Format(PyExc_TypeError, "%s takes no keyword arguments", name);
    return -1;
  }
  if (PyVectorcall_NARGS(nargsf) != n) {
    PyErr_Format(PyExc_TypeError, "%s expected %zd arguments, got %zd", name, n,
                 PyVectorcall_NARGS(nargsf));
    return -1;
  }
  return 0;
}

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* transport;
  PyObject* port;
  PyObject* buffered_protocol; /* asyncio.BufferedProtocol (no global: 3.13t) */
  PyObject* checked_protocol;  /* the protocol that is_buffered() asked last */
  int protocol_buffered;       /* its verdict */
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
  Py_CLEAR(self->checked_protocol);
  return 0;
}

static int ReadLoop_traverse(ReadLoopObject* self, visitproc visit, void* arg) {
  Py_VISIT(self->transport);
  Py_VISIT(self->port);
  Py_VISIT(self->buffered_protocol);
  Py_VISIT(self->checked_protocol);
  return 0;
}

static int ReadLoop_clear(ReadLoopObject* self) {
  Py_CLEAR(self->transport);
  Py_CLEAR(self->port);
  Py_CLEAR(self->buffered_protocol);
  Py_CLEAR(self->checked_protocol);
  return 0;
}

/* isinstance(protocol, BufferedProtocol), asked once per protocol object
 * (an isinstance() that fails walks __class__ too: per message, it showed
 * in the profiles). The stdlib's selector transports decide it once as
 * well, in set_protocol(). */
static int is_buffered(ReadLoopObject* self, PyObject* protocol) {
  int k;
  if (protocol == self->checked_protocol) return self->protocol_buffered;
  k = PyObject_IsInstance(protocol, self->buffered_protocol);
  if (k < 0) return -1;
  self->protocol_buffered = k;
  Py_XSETREF(self->checked_protocol, Py_NewRef(protocol));
  return k;
}

static void ReadLoop_dealloc(ReadLoopObject* self) {
  PyObject_GC_UnTrack(self);
  (void)ReadLoop_clear(self);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

/* Returns 1 and sets *data to the received bytes when the common case
 * applies; 0 when the Python read loop must decide; -1 on error. */
static int common_case(ReadLoopObject* self, const attrs_t* a, CompletionObject* c,
                       PyObject* protocol, PyObject** data) {
  Py_buffer view;
  Py_ssize_t n;
  int r;
  if (!c->done || c->cancelled || c->error != Py_None) return 0;
  n = PyLong_AsSsize_t(c->nbytes_obj);
  if (n == -1 && PyErr_Occurred()) return -1;
  if (n <= 0) return 0; /* end of file: the Python loop delivers it */
  if ((r = attr_is(a, A_READ_FUT, (PyObject*)c)) != 1) return r;
  if ((r = attr_is(a, A_DATA, c->buffer)) != 1) return r;
  if ((r = attr_true(a, A_CLOSING)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_true(a, A_PAUSED)) != 0) return r < 0 ? -1 : 0;
  if ((r = is_buffered(self, protocol)) != 0) return r < 0 ? -1 : 0;
  if (PyObject_GetBuffer(c->buffer, &view, PyBUF_SIMPLE) < 0) return -1;
  if (n > view.len) { /* cannot be: the kernel filled at most the buffer */
    PyBuffer_Release(&view);
    return 0;
  }
  *data = PyBytes_FromStringAndSize((const char*)view.buf, n);
  PyBuffer_Release(&view);
  return *data == NULL ? -1 : 1;
}

/* A protocol callback raised: SystemExit and KeyboardInterrupt stay
 * raised (NULL); anything else goes to transport._fatal_error(exc,
 * message), as the stdlib's transports do, whose result this returns. */
static PyObject* protocol_failed(PyObject* t, const char* message) {
  PyObject *exc, *r;
  if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
    return NULL;
  exc = fb_take_exception();
  if (exc == NULL) return NULL;
  r = PyObject_CallMethod(t, "_fatal_error", "Os", exc, message);
  Py_DECREF(exc);
  return r;
}

/* transport._start_receive(c) after buffer_updated(), in C when the
 * transport's protocol is still a BufferedProtocol: unless the transport
 * is closing or paused or a receive is pending, the protocol's
 * get_buffer(-1) is received into next, by starting c again when it is
 * the buffer c filled. Returns 1 with *result set (NULL: an exception,
 * an OSError when the receive could not start), 0 when _start_receive(c)
 * must run (nothing was done). */
static int buffered_again(ReadLoopObject* self, const attrs_t* a, CompletionObject* c,
                          PyObject** result) {
  PyObject *proto, *buf, *op;
  int k;
  *result = NULL;
  if ((k = attr_true(a, A_CLOSING)) != 0 || (k = attr_true(a, A_PAUSED)) != 0 ||
      (k = attr_is(a, A_READ_FUT, Py_None)) != 1) {
    if (k < 0) return 1;
    *result = Py_NewRef(Py_None); /* as _start_receive: nothing to start */
    return 1;
  }
  proto = attr_get(a, A_PROTOCOL);
  if (proto == NULL) return 1;
  if ((k = is_buffered(self, proto)) != 1) {
    Py_DECREF(proto);
    return k < 0;
  }
  buf = PyObject_CallMethod(proto, "get_buffer", "i", -1);
  if (buf != NULL && PyObject_Length(buf) <= 0) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
    Py_CLEAR(buf);
  }
  if (buf == NULL) {
    Py_DECREF(proto);
    *result = protocol_failed(a->obj, "Fatal error: protocol.get_buffer() call failed.");
    return 1;
  }
  if (buf == c->buffer) {
    PyObject* one = (PyObject*)c;
    op = fb_port_resubmit((CompletionPortObject*)self->port, &one, 1, NULL);
    Py_XSETREF(op, op ? Py_NewRef(one) : NULL);
  } else {
    PyObject* sock = attr_get(a, A_SOCK);
    PyObject* call[4] = {self->port, sock, buf, (PyObject*)self};
    op = sock ? PyObject_VectorcallMethod(str_recv, call, 4, NULL) : NULL;
    Py_XDECREF(sock);
  }
  Py_DECREF(buf);
  if (op == NULL || attr_set(a, A_READ_FUT, op) < 0 ||
      attr_set(a, A_BUFFER_OWNER, proto) < 0) {
    Py_XDECREF(op);
    Py_DECREF(proto);
    return 1;
  }
  Py_DECREF(op);
  Py_DECREF(proto);
  *result = Py_NewRef(Py_None);
  return 1;
}

/* A BufferedProtocol's own receive finished with data, the transport
 * neither closing nor paused: what _loop_reading does then (buffer_updated,
 * then _start_receive). Returns 1 with *result set (NULL: an exception),
 * 0 when the Python read loop must decide, -1 on error. */
static int buffered_case(ReadLoopObject* self, const attrs_t* a, CompletionObject* c,
                         PyObject* protocol, PyObject** result) {
  PyObject *t = a->obj, *r;
  Py_ssize_t n;
  int k;
  *result = NULL;
  if (!c->done || c->cancelled || c->error != Py_None) return 0;
  n = PyLong_AsSsize_t(c->nbytes_obj);
  if (n == -1 && PyErr_Occurred()) return -1;
  if (n <= 0) return 0;
  if ((k = attr_is(a, A_READ_FUT, (PyObject*)c)) != 1) return k;
  if ((k = attr_is(a, A_BUFFER_OWNER, protocol)) != 1) return k;
  if ((k = attr_is(a, A_DATA, c->buffer)) != 0) return k < 0 ? -1 : 0;
  if ((k = attr_true(a, A_CLOSING)) != 0) return k < 0 ? -1 : 0;
  if ((k = attr_true(a, A_PAUSED)) != 0) return k < 0 ? -1 : 0;
  if (attr_set(a, A_READ_FUT, Py_None) < 0 || attr_set(a, A_BUFFER_OWNER, Py_None) < 0)
    return -1;
  r = PyObject_CallMethodOneArg(protocol, str_buffer_updated, c->nbytes_obj);
  if (r == NULL) {
    r = protocol_failed(t, "Fatal error: protocol.buffer_updated() call failed.");
    if (r == NULL) return 1;
  }
  Py_DECREF(r);
  if (!buffered_again(self, a, c, &r))
    r = PyObject_CallMethodOneArg(t, str_start_receive, (PyObject*)c);
  if (r == NULL && PyErr_ExceptionMatches(PyExc_OSError)) {
    /* the receive could not start: the transport's rules */
    PyObject* exc = fb_take_exception();
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
static PyObject* pooled_case(ReadLoopObject* self, const attrs_t* a, CompletionObject* c) {
  PyObject *t = a->obj, *protocol, *data, *buf, *r;
  Py_buffer view;
  int k;
  if (c->more || !c->done || c->error != Py_None || c->nbytes <= 0 ||
      !Py_IS_TYPE(c->buffer, &fb_PooledBufferType))
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  if ((k = attr_is(a, A_READ_FUT, (PyObject*)c)) != 1 ||
      (k = attr_true(a, A_CLOSING)) != 0 || (k = attr_true(a, A_PAUSED)) != 0 ||
      (k = attr_is(a, A_HELD_CHUNKS, Py_None)) != 1) {
    if (k < 0) return NULL;
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  }
  protocol = attr_get(a, A_PROTOCOL);
  if (protocol == NULL) return NULL;
  if ((k = is_buffered(self, protocol)) != 0) {
    Py_DECREF(protocol);
    if (k < 0) return NULL;
    return PyObject_CallMethodOneArg(t, str_pooled_reading, (PyObject*)c);
  }
  /* The buffer is ours to read after resubmit() gives c the pool again. */
  buf = Py_NewRef(c->buffer);
  {
    PyObject* one = (PyObject*)c;
    r = fb_port_resubmit((CompletionPortObject*)self->port, &one, 1, NULL);
  }
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

/* ReadLoop_call() with a Completion, a's transport held. */
static PyObject* read_done(PyObject* owner, const attrs_t* a, PyObject* c) {
  ReadLoopObject* self = (ReadLoopObject*)owner;
  PyObject *protocol, *data = NULL, *r;
  int common;
  if (((CompletionObject*)c)->flags & FIOCP_OPF_POOLED)
    return pooled_case(self, a, (CompletionObject*)c);
  protocol = attr_get(a, A_PROTOCOL);
  if (protocol == NULL) return NULL;
  common = common_case(self, a, (CompletionObject*)c, protocol, &data);
  if (common < 0) {
    Py_DECREF(protocol);
    return NULL;
  }
  if (common == 1) {
    /* As the Python loop: the receive starts again before the protocol
     * sees the data. If resubmit() refuses, the Python loop does it all
     * over and handles the error its way. */
    r = fb_port_resubmit((CompletionPortObject*)self->port, &c, 1, NULL);
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
    int buffered = buffered_case(self, a, (CompletionObject*)c, protocol, &result);
    Py_DECREF(protocol);
    if (buffered < 0) return NULL;
    if (buffered) return result;
    return PyObject_CallMethodOneArg(a->obj, str_loop_reading, c);
  }
  r = PyObject_CallMethodOneArg(protocol, str_data_received, data);
  Py_DECREF(data);
  Py_DECREF(protocol);
  return r;
}

static PyObject* ReadLoop_call(PyObject* callable, PyObject* const* args, size_t nargsf,
                               PyObject* kwnames) {
  ReadLoopObject* self = (ReadLoopObject*)callable;
  PyObject* c;
  if (exact_args("_ReadLoop", nargsf, kwnames, 1) < 0) return NULL;
  c = args[0];
  if (self->transport == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "_ReadLoop is not initialized");
    return NULL;
  }
  if (!PyObject_TypeCheck(c, &fb_CompletionType))
    return PyObject_CallMethodOneArg(self->transport, str_loop_reading, c);
  return with_attrs(read_done, callable, self->transport, c);
}

static PyObject* ReadLoop_new(PyTypeObject* type, PyObject* args, PyObject* kwds) {
  PyObject* self = PyType_GenericNew(type, args, kwds);
  if (self != NULL) ((ReadLoopObject*)self)->vectorcall = ReadLoop_call;
  return self;
}

PyTypeObject fb_ReadLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._fastiocp._ReadLoop",
    .tp_basicsize = sizeof(ReadLoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(ReadLoopObject, vectorcall),
    .tp_doc = "_ReadLoop(transport, port)\n--\n\n"
              "The receive callback of the asyncio loop's socket transports: called\n"
              "with a receive's Completion, it hands the data to the protocol and\n"
              "starts the receive again, or leaves the case to\n"
              "transport._loop_reading(completion).",
    .tp_new = ReadLoop_new,
    .tp_init = (initproc)ReadLoop_init,
    .tp_dealloc = (destructor)ReadLoop_dealloc,
    .tp_traverse = (traverseproc)ReadLoop_traverse,
    .tp_clear = (inquiry)ReadLoop_clear,
    .tp_call = PyVectorcall_Call,
};

/* ---- _RingWrite ------------------------------------------------------------ */

/* A transport's writes through the io_uring submission queue. Inside a
 * batch of completions (the callbacks the loop's select() runs), write()
 * on an idle transport queues a SEND instead of making a send() system
 * call: every send the batch's callbacks make then reaches the kernel in
 * the one io_uring_enter that ends the batch, before the loop runs
 * anything else. While that send is in flight this object is the
 * transport's _write_fut, with the Future methods the stdlib's write path
 * calls on one (done, cancel, result): later writes queue in _buffer as
 * they do behind a proactor send, and close(), write_eof(), abort() and
 * get_write_buffer_size() see a write pending. Its completion calls this
 * object: the common case (all sent, nothing queued, nothing waiting) is
 * done here; the rest of a short send goes in front of _buffer, and every
 * other case goes to the stdlib's transport._loop_writing(self). */
typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* transport;
  CompletionPortObject* port;
  PyObject* op;       /* the send in flight (a Completion), or NULL */
  PyObject* finished; /* the send _loop_writing() is finishing, or NULL */
} RingWriteObject;

static int RingWrite_init(RingWriteObject* self, PyObject* args, PyObject* kwds) {
  PyObject *transport, *port;
  static char* kwlist[] = {"transport", "port", NULL};
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!:_RingWrite", kwlist, &transport,
                                   &fb_CompletionPortType, &port))
    return -1;
  Py_XSETREF(self->transport, Py_NewRef(transport));
  Py_XSETREF(self->port, (CompletionPortObject*)Py_NewRef(port));
  return 0;
}

static int RingWrite_traverse(RingWriteObject* self, visitproc visit, void* arg) {
  Py_VISIT(self->transport);
  Py_VISIT(self->port);
  Py_VISIT(self->op);
  Py_VISIT(self->finished);
  return 0;
}

static int RingWrite_clear(RingWriteObject* self) {
  Py_CLEAR(self->transport);
  Py_CLEAR(self->port);
  Py_CLEAR(self->op);
  Py_CLEAR(self->finished);
  return 0;
}

static void RingWrite_dealloc(RingWriteObject* self) {
  PyObject_GC_UnTrack(self);
  (void)RingWrite_clear(self);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

/* No write in flight any more: _write_fut None, _pending_write 0. */
static int set_idle(const attrs_t* a) {
  PyObject* zero = PyLong_FromLong(0);
  int rc = zero == NULL || attr_set(a, A_WRITE_FUT, Py_None) < 0 ||
                   attr_set(a, A_PENDING_WRITE, zero) < 0
               ? -1
               : 0;
  Py_XDECREF(zero);
  return rc;
}

static int is_uring(CompletionPortObject* port) {
#ifdef __linux__
  return port->backend == &fiocp__uring_backend;
#else
  (void)port;
  return 0;
#endif
}

/* Whether sends on port may go on its ring now: an io_uring port, and
 * this thread in one of its batches (so a send waits for the batch's one
 * system call). */
static int ring_open(CompletionPortObject* port) {
  int in_batch;
  if (port == NULL || !is_uring(port)) return 0;
  FB_LOCK(port);
  in_batch = fb_in_batch(port);
  FB_UNLOCK(port);
  return in_batch;
}

/* Whether rw's next send may go on the ring now: none in flight, and
 * ring_open(). */
static int ring_ready(RingWriteObject* rw) {
  return rw->op == NULL && ring_open(rw->port);
}

/* Queues a SEND of bytes (which nobody can change while the kernel reads
 * it) and makes rw the transport's write in flight. 1 done, 0 refused by
 * the port (nothing changed, no exception), -1 on error. */
static int ring_submit(const attrs_t* a, RingWriteObject* rw, PyObject* bytes) {
  PyObject *sock, *op, *n;
  sock = attr_get(a, A_SOCK);
  if (sock == NULL) return -1;
  op = fb_port_send(rw->port, sock, bytes, (PyObject*)rw);
  Py_DECREF(sock);
  if (op == NULL) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyErr_Clear(); /* the caller's other way reports it */
    return 0;
  }
  rw->op = op;
  n = PyLong_FromSsize_t(PyBytes_GET_SIZE(bytes));
  if (n == NULL || attr_set(a, A_WRITE_FUT, (PyObject*)rw) < 0 ||
      attr_set(a, A_PENDING_WRITE, n) < 0) {
    Py_XDECREF(n);
    return -1;
  }
  Py_DECREF(n);
  return 1;
}

/* What was queued behind the send just finished (queued, the transport's
 * _buffer) goes on the ring in turn, as _loop_writing() would send it with
 * a proactor send; the caller checked that nothing else stands in the way.
 * 1 done, 0 when _loop_writing() must send it, -1 on error. */
static int ring_send_queued(const attrs_t* a, RingWriteObject* rw, PyObject* queued) {
  PyObject* bytes;
  int k;
  if (!PyByteArray_CheckExact(queued) || !ring_ready(rw)) return 0;
  bytes = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(queued), PyByteArray_GET_SIZE(queued));
  if (bytes == NULL) return -1;
  k = ring_submit(a, rw, bytes);
  Py_DECREF(bytes);
  if (k == 1 && attr_set(a, A_BUFFER, Py_None) < 0) return -1;
  return k;
}

/* The send's completion c, for RingWrite_call(), a's transport held. */
static PyObject* ring_write_done(PyObject* owner, const attrs_t* a, PyObject* c) {
  RingWriteObject* self = (RingWriteObject*)owner;
  PyObject *t = a->obj, *r;
  CompletionObject* cc;
  int k;
  /* _force_close() cancelled it and let go: nothing to do. */
  if ((k = attr_is(a, A_WRITE_FUT, (PyObject*)self)) != 1) {
    if (k < 0) return NULL;
    Py_RETURN_NONE;
  }
  cc = (CompletionObject*)c;
  if (!cc->cancelled && cc->error == Py_None && PyBytes_CheckExact(cc->buffer)) {
    Py_ssize_t total = PyBytes_GET_SIZE(cc->buffer);
    if (cc->nbytes < total) {
      /* A short send: the rest goes first, with what was queued behind. */
      PyObject *rest, *queued;
      Py_ssize_t n = cc->nbytes < 0 ? 0 : cc->nbytes;
      rest = PyByteArray_FromStringAndSize(PyBytes_AS_STRING(cc->buffer) + n, total - n);
      if (rest == NULL) return NULL;
      queued = attr_get(a, A_BUFFER);
      if (queued != NULL && queued != Py_None) {
        PyObject* joined = PySequence_InPlaceConcat(rest, queued);
        Py_XDECREF(joined); /* rest itself, extended */
        if (joined == NULL) Py_CLEAR(queued);
      }
      if (queued == NULL || attr_set(a, A_BUFFER, rest) < 0) {
        Py_XDECREF(queued);
        Py_DECREF(rest);
        return NULL;
      }
      Py_DECREF(queued);
      Py_DECREF(rest);
    }
    /* Not closing, no EOF to write, no sendfile waiting for the buffer to
     * drain, the protocol not paused: then the transport is idle if
     * nothing was queued, else what was goes on the ring. */
    if ((k = attr_true(a, A_CLOSING)) == 0 && (k = attr_true(a, A_EOF_WRITTEN)) == 0 &&
        (k = attr_is(a, A_EMPTY_WAITER, Py_None)) == 1 &&
        (k = attr_true(a, A_PROTOCOL_PAUSED)) == 0) {
      PyObject* queued = attr_get(a, A_BUFFER);
      if (queued == NULL) return NULL;
      k = PyObject_IsTrue(queued);
      if (k == 0) {
        Py_DECREF(queued);
        if (set_idle(a) < 0) return NULL;
        Py_RETURN_NONE;
      }
      if (k > 0) k = ring_send_queued(a, self, queued);
      Py_DECREF(queued);
      if (k > 0) Py_RETURN_NONE;
    }
    if (k < 0) return NULL;
  }
  /* The stdlib's rules: result() gives _loop_writing the outcome. */
  Py_XSETREF(self->finished, Py_NewRef(c));
  r = PyObject_CallMethodOneArg(t, str_loop_writing, (PyObject*)self);
  Py_CLEAR(self->finished);
  return r;
}

/* The send's completion. */
static PyObject* RingWrite_call(PyObject* callable, PyObject* const* args, size_t nargsf,
                                PyObject* kwnames) {
  RingWriteObject* self = (RingWriteObject*)callable;
  PyObject* c;
  if (exact_args("_RingWrite", nargsf, kwnames, 1) < 0) return NULL;
  c = args[0];
  if (self->transport == NULL || c != self->op) Py_RETURN_NONE; /* not ours */
  Py_CLEAR(self->op); /* c stays alive: the caller holds it */
  return with_attrs(ring_write_done, callable, self->transport, c);
}

static PyObject* RingWrite_done(RingWriteObject* self, PyObject* Py_UNUSED(ignored)) {
  return PyBool_FromLong(self->op == NULL);
}

static PyObject* RingWrite_cancelled(RingWriteObject* self, PyObject* Py_UNUSED(ignored)) {
  (void)self;
  Py_RETURN_FALSE;
}

/* Cancels the send in flight (its completion still comes, and finds the
 * transport's _write_fut no longer this object). */
static PyObject* RingWrite_cancel(RingWriteObject* self, PyObject* args, PyObject* kwds) {
  static char* kwlist[] = {"msg", NULL};
  PyObject* msg = NULL;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:cancel", kwlist, &msg)) return NULL;
  if (self->op != NULL) {
    PyObject* r = PyObject_CallMethod(self->op, "cancel", NULL);
    if (r == NULL) {
      if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
      PyErr_Clear(); /* finished already, or the port is closed */
    }
    Py_XDECREF(r);
  }
  Py_RETURN_TRUE;
}

/* The outcome of the send being finished: the bytes sent, or its error
 * raised. */
static PyObject* RingWrite_result(RingWriteObject* self, PyObject* Py_UNUSED(ignored)) {
  CompletionObject* c = (CompletionObject*)self->finished;
  if (c == NULL) {
    if (self->op != NULL) {
      PyErr_SetString(fb_InvalidStateError, "the send is in flight");
      return NULL;
    }
    Py_RETURN_NONE;
  }
  if (c->error != Py_None) {
    PyErr_SetObject((PyObject*)Py_TYPE(c->error), c->error);
    return NULL;
  }
  return PyLong_FromSsize_t(c->nbytes);
}

static PyMethodDef RingWrite_methods[] = {
    {"done", (PyCFunction)RingWrite_done, METH_NOARGS,
     "done($self, /)\n--\n\nWhether no send is in flight."},
    {"cancelled", (PyCFunction)RingWrite_cancelled, METH_NOARGS,
     "cancelled($self, /)\n--\n\nFalse: cancel() cancels the send, not this object."},
    {"cancel", (PyCFunction)(void (*)(void))RingWrite_cancel, METH_VARARGS | METH_KEYWORDS,
     "cancel($self, /, msg=None)\n--\n\nCancels the send in flight."},
    {"result", (PyCFunction)RingWrite_result, METH_NOARGS,
     "result($self, /)\n--\n\nThe bytes the send being finished sent, or its error raised."},
    {NULL, NULL, 0, NULL},
};

static PyObject* RingWrite_new(PyTypeObject* type, PyObject* args, PyObject* kwds) {
  PyObject* self = PyType_GenericNew(type, args, kwds);
  if (self != NULL) ((RingWriteObject*)self)->vectorcall = RingWrite_call;
  return self;
}

PyTypeObject fb_RingWriteType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._fastiocp._RingWrite",
    .tp_basicsize = sizeof(RingWriteObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(RingWriteObject, vectorcall),
    .tp_doc = "_RingWrite(transport, port)\n--\n\n"
              "A socket transport's writes through the io_uring submission queue:\n"
              "inside a batch of completions, write() on an idle transport queues a\n"
              "send, which this object stands for as the transport's _write_fut; its\n"
              "completion calls this object.",
    .tp_new = RingWrite_new,
    .tp_init = (initproc)RingWrite_init,
    .tp_dealloc = (destructor)RingWrite_dealloc,
    .tp_traverse = (traverseproc)RingWrite_traverse,
    .tp_clear = (inquiry)RingWrite_clear,
    .tp_call = PyVectorcall_Call,
    .tp_methods = RingWrite_methods,
};

#ifndef _WIN32
/* The transport's high-water mark, or -1 with an exception. */
static Py_ssize_t high_water(const attrs_t* a) {
  PyObject* hw = attr_get(a, A_HIGH_WATER);
  Py_ssize_t high = hw == NULL ? -1 : PyLong_AsSsize_t(hw);
  Py_XDECREF(hw);
  if (high < 0 && !PyErr_Occurred())
    PyErr_SetString(PyExc_ValueError, "transport._high_water is negative");
  return high;
}

/* Queues view's bytes as a SEND when ring_ready() and the data does not
 * go past the high-water mark (where the stdlib pauses the protocol).
 * Returns 1 with *result set (NULL: an exception), 0 when the write is
 * not for the ring. may_send_now() said yes already. */
static int ring_send(const attrs_t* a, RingWriteObject* rw, PyObject* data,
                     const Py_buffer* view, PyObject** result) {
  PyObject* bytes;
  Py_ssize_t high;
  int k;
  *result = NULL;
  if (!ring_ready(rw)) return 0;
  if ((high = high_water(a)) < 0) return 1;
  if (view->len > high) return 0;
  bytes = PyBytes_CheckExact(data) ? Py_NewRef(data)
                                   : PyBytes_FromStringAndSize((const char*)view->buf, view->len);
  if (bytes == NULL) return 1;
  k = ring_submit(a, rw, bytes);
  Py_DECREF(bytes);
  if (k == 1) *result = Py_NewRef(Py_None);
  return k != 0; /* refused: send() now, and its error there */
}

/* A write while rw's send is in flight: what the stdlib's write() does
 * then (the data joins _buffer, the protocol paused past the high-water
 * mark), in C. Returns 1 with *result set (NULL: an exception), 0 when
 * Python's write() must take it (the connection lost, EOF written, a
 * sendfile waiting). */
static int queue_behind(const attrs_t* a, const Py_buffer* view, PyObject** result) {
  PyObject *queued, *n;
  Py_ssize_t high, size, pending;
  int k;
  *result = NULL;
  if ((k = attr_true(a, A_CONN_LOST)) != 0 || (k = attr_true(a, A_EOF_WRITTEN)) != 0 ||
      (k = attr_is(a, A_EMPTY_WAITER, Py_None)) != 1)
    return k < 0;
  queued = attr_get(a, A_BUFFER);
  if (queued == NULL) return 1;
  if (PyByteArray_CheckExact(queued)) {
    Py_ssize_t old = PyByteArray_GET_SIZE(queued);
    if (view->len > PY_SSIZE_T_MAX - old || PyByteArray_Resize(queued, old + view->len) < 0) {
      if (!PyErr_Occurred()) PyErr_NoMemory();
      Py_DECREF(queued);
      return 1;
    }
    memcpy(PyByteArray_AS_STRING(queued) + old, view->buf, (size_t)view->len);
  } else if (queued == Py_None) {
    Py_DECREF(queued);
    queued = PyByteArray_FromStringAndSize((const char*)view->buf, view->len);
    if (queued == NULL || attr_set(a, A_BUFFER, queued) < 0) {
      Py_XDECREF(queued);
      return 1;
    }
  } else {
    Py_DECREF(queued); /* not the stdlib's bytearray: its write() decides */
    return 0;
  }
  size = PyByteArray_GET_SIZE(queued);
  Py_DECREF(queued);
  n = attr_get(a, A_PENDING_WRITE);
  pending = n == NULL ? -1 : PyLong_AsSsize_t(n);
  Py_XDECREF(n);
  if ((pending == -1 && PyErr_Occurred()) || (high = high_water(a)) < 0) return 1;
  if (pending + size > high) {
    /* The stdlib's own rules, which call pause_writing() once. */
    *result = PyObject_CallMethod(a->obj, "_maybe_pause_protocol", NULL);
    if (*result == NULL) return 1;
    Py_SETREF(*result, Py_NewRef(Py_None));
    return 1;
  }
  *result = Py_NewRef(Py_None);
  return 1;
}

/* attr_get(), or NULL with no exception when the transport has no such
 * attribute (a transport not made by this loop). */
static PyObject* attr_get_optional(const attrs_t* a, int name) {
  PyObject* v = attr_get(a, name);
  if (v == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) PyErr_Clear();
  return v;
}

/* The transport's _RingWrite (a new reference), or NULL (none yet; an
 * exception only on an error). */
static RingWriteObject* writer_of(const attrs_t* a) {
  PyObject* w = attr_get_optional(a, A_RING_WRITER);
  if (w == NULL) return NULL;
  if (Py_IS_TYPE(w, &fb_RingWriteType) && ((RingWriteObject*)w)->transport == a->obj)
    return (RingWriteObject*)w;
  Py_DECREF(w);
  return NULL;
}

/* The transport's first write through the ring makes its _RingWrite, for
 * its receive's port (the transport's _ReadLoop): an idle connection that
 * never writes inside a batch holds none. Returns it (a new reference), or
 * NULL when the ring is not for this write now (an exception only on an
 * error). */
static RingWriteObject* writer_new(const attrs_t* a) {
  PyObject* reader = attr_get_optional(a, A_READER);
  CompletionPortObject* port;
  RingWriteObject* rw = NULL;
  if (reader == NULL) return NULL;
  if (!Py_IS_TYPE(reader, &fb_ReadLoopType) || ((ReadLoopObject*)reader)->transport != a->obj)
    goto done;
  port = (CompletionPortObject*)((ReadLoopObject*)reader)->port;
  if (!ring_open(port)) goto done;
  rw = (RingWriteObject*)RingWrite_new(&fb_RingWriteType, NULL, NULL);
  if (rw == NULL) goto done;
  rw->transport = Py_NewRef(a->obj);
  rw->port = (CompletionPortObject*)Py_NewRef(port);
  if (attr_set(a, A_RING_WRITER, (PyObject*)rw) < 0) Py_CLEAR(rw);
done:
  Py_DECREF(reader);
  return rw;
}
#endif

/* ---- _SocketWrite ---------------------------------------------------------- */

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
} SocketWriteObject;

#ifndef _WIN32
/* 1 when write(data) may send at once (what _WritesAtOnce.write checks;
 * send_now() checked _write_fut), 0 if not, -1 on error. */
static int may_send_now(const attrs_t* a) {
  int r;
  if ((r = attr_true(a, A_BUFFER)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_true(a, A_CONN_LOST)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_true(a, A_EOF_WRITTEN)) != 0) return r < 0 ? -1 : 0;
  if ((r = attr_is(a, A_EMPTY_WAITER, Py_None)) != 1) return r;
  return 1;
}

/* The transport's socket descriptor, or -1 (no socket; an exception set
 * only if fileno() raised something other than a closed socket's -1). */
static int socket_fd(const attrs_t* a) {
  long fd;
  long long direct;
  PyObject *sock, *no;
  sock = attr_get(a, A_SOCK);
  if (sock == NULL) return -1;
  if (sock == Py_None) {
    Py_DECREF(sock);
    return -1;
  }
  if (fb_socket_fd(sock, &direct)) {
    Py_DECREF(sock);
    return direct > INT_MAX ? -1 : (int)direct;
  }
  no = PyObject_CallMethodNoArgs(sock, fb_str_fileno);
  Py_DECREF(sock);
  if (no == NULL) return -1;
  fd = PyLong_AsLong(no);
  Py_DECREF(no);
  if (fd == -1 && PyErr_Occurred()) return -1;
  return fd < 0 || fd > INT_MAX ? -1 : (int)fd;
}

/* Hands view to the kernel at once: queued on the ring inside a batch
 * (ring_send), else what one non-blocking send() takes. Returns 1 with
 * *result set (write()'s result, or NULL with an exception), or 0 when
 * nothing was sent and Python's write() must take it. */
static int send_now(const attrs_t* a, RingWriteObject** rw, PyObject* data, const Py_buffer* view,
                    PyObject** result) {
  int ok, fd;
  ssize_t n;
  *result = NULL;
  {
    PyObject* fut = attr_get(a, A_WRITE_FUT);
    if (fut == NULL) return 1;
    Py_DECREF(fut); /* only its identity is used */
    if (fut != Py_None) return *rw != NULL && fut == (PyObject*)*rw ? queue_behind(a, view, result) : 0;
  }
  if ((ok = may_send_now(a)) <= 0) return ok < 0;
  if (*rw == NULL && (*rw = writer_new(a)) == NULL && PyErr_Occurred()) return 1;
  if (*rw != NULL && (ok = ring_send(a, *rw, data, view, result)) != 0) return ok;
  fd = socket_fd(a);
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
      *result = PyObject_CallMethodOneArg(a->obj, str_write_queued, rest);
      Py_DECREF(rest);
    }
  }
  return 1;
}
#endif

static PyObject* SocketWrite_call(PyObject* callable, PyObject* const* args, size_t nargsf,
                                  PyObject* kwnames) {
  PyObject *t, *data;
  (void)callable;
  if (exact_args("write", nargsf, kwnames, 2) < 0) return NULL;
  t = args[0];
  data = args[1];
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
      attrs_t a;
      RingWriteObject* rw;
      attrs_init(&a, t);
      rw = writer_of(&a);
      if (rw == NULL && PyErr_Occurred()) {
        attrs_done(&a);
        PyBuffer_Release(&view);
        return NULL;
      }
      if (view.len > 0) sent = send_now(&a, &rw, data, &view, &result);
      Py_XDECREF(rw);
      attrs_done(&a);
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

static PyObject* SocketWrite_new(PyTypeObject* type, PyObject* args, PyObject* kwds) {
  PyObject* self = PyType_GenericNew(type, args, kwds);
  if (self != NULL) ((SocketWriteObject*)self)->vectorcall = SocketWrite_call;
  return self;
}

PyTypeObject fb_SocketWriteType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._fastiocp._SocketWrite",
    .tp_basicsize = sizeof(SocketWriteObject),
    /* A method descriptor: t.write(data) calls it with (t, data), with no
     * bound method made per call. */
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_METHOD_DESCRIPTOR | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(SocketWriteObject, vectorcall),
    .tp_doc = "_SocketWrite()\n--\n\n"
              "The write() method of the asyncio loop's socket transports, in C:\n"
              "sends at once when nothing is queued, else calls\n"
              "transport._write_python(data).",
    .tp_new = SocketWrite_new,
    .tp_call = PyVectorcall_Call,
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
      {&str_data_received, "data_received"},
      {&str_buffer, "_buffer"},           {&str_conn_lost, "_conn_lost"},
      {&str_eof_written, "_eof_written"}, {&str_empty_waiter, "_empty_waiter"},
      {&str_write_fut, "_write_fut"},     {&str_sock, "_sock"},
      {&str_write_python, "_write_python"}, {&str_write_queued, "_write_queued"},
      {&str_buffer_owner, "_buffer_owner"}, {&str_buffer_updated, "buffer_updated"},
      {&str_start_receive, "_start_receive"}, {&str_held_chunks, "_held_chunks"},
      {&str_pooled_reading, "_pooled_reading"}, {&str_ring_writer, "_ring_writer"},
      {&str_high_water, "_high_water"},   {&str_pending_write, "_pending_write"},
      {&str_protocol_paused, "_protocol_paused"}, {&str_recv, "recv"},
      {&str_loop_writing, "_loop_writing"}, {&str_reader, "_reader"},
  };
  size_t i;
  for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    if (*names[i].slot == NULL) {
      *names[i].slot = PyUnicode_InternFromString(names[i].text);
      if (*names[i].slot == NULL) return -1;
    }
  }
  if (PyType_Ready(&fb_ReadLoopType) < 0 || PyType_Ready(&fb_SocketWriteType) < 0 ||
      PyType_Ready(&fb_RingWriteType) < 0)
    return -1;
  if (PyModule_AddObjectRef(module, "_RingWrite", (PyObject*)&fb_RingWriteType) < 0) return -1;
  if (PyModule_AddObjectRef(module, "_ReadLoop", (PyObject*)&fb_ReadLoopType) < 0) return -1;
  if (PyModule_AddObjectRef(module, "_SocketWrite", (PyObject*)&fb_SocketWriteType) < 0) return -1;
  return fb_loop_core_init(module);
}
