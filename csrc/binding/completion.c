/* completion.c: the Completion type (the record of one operation or
 * posted packet), its free list, and finishing a dequeued operation into
 * its Completion.
 */
#include "binding.h"

#include <structmember.h>

#include <string.h>

#ifndef _WIN32
# include <errno.h>
# include <sys/wait.h>
# include <unistd.h>
#endif

/* ======================================================================
 * Completion
 * ====================================================================== */

static int Completion_traverse(CompletionObject* self, visitproc visit,
                               void* arg) {
  Py_VISIT(self->key);
  Py_VISIT(self->context);
  Py_VISIT(self->buffer);
  Py_VISIT(self->error);
  Py_VISIT(self->extra);
  Py_VISIT(self->pool);
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
 * kept (about 6 MiB). Guarded by the GIL: off on free-threaded builds,
 * where mimalloc's per-thread pages serve the same purpose. */
#ifdef Py_GIL_DISABLED
# define COMPLETION_FREELIST_MAX 0
#else
# define COMPLETION_FREELIST_MAX 32768
#endif
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
  fb_msgbufs_free(self->msg);
  self->msg = NULL;
  Completion_clear(self);
  Py_CLEAR(self->buffer);
  Py_CLEAR(self->pool);
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
void fb_track_if_needed(CompletionObject* c, PyObject* ref) {
  if (ref != NULL && PyObject_IS_GC(ref) && !PyObject_GC_IsTracked((PyObject*)c))
    PyObject_GC_Track(c);
}

CompletionObject* fb_Completion_create(uint8_t kind, PyObject* key,
                                       PyObject* context) {
  CompletionObject* c = COMPLETION_FREELIST_MAX ? completion_freelist : NULL;
  if (c != NULL) {
    completion_freelist = (CompletionObject*)c->key;
    completion_freelist_len--;
    _Py_NewReference((PyObject*)c);
  } else {
    c = PyObject_GC_New(CompletionObject, &fb_CompletionType);
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
  Py_INCREF(fb_kind_names[kind]);
  c->op = fb_kind_names[kind];
  c->nbytes_obj = PyLong_FromLong(0); /* a cached small int: cannot fail */
  c->extra = NULL;
  c->nbytes = 0;
  memset(&c->view, 0, sizeof(c->view));
  c->msg = NULL;
  c->pool = NULL;
  c->kind = kind;
  c->pinned = 0;
  c->done = 0;
  c->cancelled = 0;
  c->flags = 0;
  c->more = 0;
  c->accept_info = 0;
  fb_track_if_needed(c, key);
  fb_track_if_needed(c, context);
  return c;
}

static PyObject* Completion_result(CompletionObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  if (!fb_done_load(self)) {
    PyErr_SetString(fb_InvalidStateError,
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
    case FIOCP_OP_RECVMSG:
      if (self->extra == NULL) return Py_BuildValue("(n[]iO)", self->nbytes, 0, Py_None);
      return Py_BuildValue("(nOOO)", self->nbytes,
                           PyTuple_GET_ITEM(self->extra, 0),
                           PyTuple_GET_ITEM(self->extra, 1),
                           PyTuple_GET_ITEM(self->extra, 2));
    case FIOCP_OP_WAIT_PROCESS:
      if (self->extra == NULL) Py_RETURN_NONE;
      return Py_NewRef(self->extra);
    case FIOCP_OP_CONNECT:
    case FIOCP_OP_TIMER:
    case FIOCP_OP_FSYNC:
    case FIOCP_OP_CONNECT_PIPE:
      Py_RETURN_NONE;
    default:
      return PyLong_FromSsize_t(self->nbytes);
  }
}

static PyObject* Completion_cancel(CompletionObject* self,
                                   PyObject* Py_UNUSED(ignored)) {
  PyObject* r;
#ifdef Py_GIL_DISABLED
  /* self->port is borrowed: follow it only where the port's deallocation
   * cannot free it meanwhile (binding.h). */
  PyMutex_Lock(&fb_detach_mu);
  r = self->port == NULL ? Py_NewRef(Py_False)
                         : fb_port_cancel_completion(self->port, self);
  PyMutex_Unlock(&fb_detach_mu);
#else
  if (self->done || self->port == NULL) Py_RETURN_FALSE;
  r = fb_port_cancel_completion(self->port, self);
#endif
  return r;
}

static PyObject* Completion_get_done(CompletionObject* self, void* c) {
  (void)c;
  return PyBool_FromLong(fb_done_load(self));
}

static PyObject* Completion_get_cancelled(CompletionObject* self, void* c) {
  (void)c;
  return PyBool_FromLong(self->cancelled);
}

static PyObject* Completion_get_more(CompletionObject* self, void* c) {
  (void)c;
  return PyBool_FromLong(self->more);
}

static PyObject* Completion_release(CompletionObject* self,
                                    PyObject* Py_UNUSED(ignored)) {
  PyObject* buf;
  if (!fb_done_load(self)) {
    PyErr_SetString(fb_InvalidStateError,
                    "the operation has not completed yet: nothing to release");
    return NULL;
  }
  buf = self->buffer;
  if (Py_IS_TYPE(buf, &fb_PooledBufferType) && fb_PooledBuffer_release(buf) < 0)
    return NULL;
  Py_RETURN_NONE;
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
                                fb_kind_names[self->kind], state, self->error,
                                self->key);
  return PyUnicode_FromFormat("<fastiocp.Completion op=%R %s nbytes=%zd key=%R>",
                              fb_kind_names[self->kind], state, self->nbytes,
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
    {"more", (getter)Completion_get_more, NULL,
     "True for a result of a multishot operation (recv or accept with "
     "multishot=True) that is not its last: more results will come. The "
     "last (more False) is the Completion the submit call returned; it "
     "ends the operation (end of stream, an error, a cancel).",
     NULL},
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
    {"release", (PyCFunction)Completion_release, METH_NOARGS,
     "release($self)\n--\n\nGive a pooled receive's buffer back to its "
     "BufferPool now (buffer.release()); nothing for other completions. "
     "Raises BufferError while a memoryview of the buffer is alive. The "
     "buffer also goes back when it is collected."},
    {"cancel", (PyCFunction)Completion_cancel, METH_NOARGS,
     "cancel($self)\n--\n\nAsk the OS to cancel the operation. Returns True if a "
     "cancellation was requested, False if it had already completed. The "
     "completion is still delivered by get(), cancelled or with its real "
     "result if it raced."},
    {NULL}};

PyTypeObject fb_CompletionType = {
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
 * Completion: finishing an operation
 * ====================================================================== */

static void close_handle(fiocp_handle_t h) {
#ifdef _WIN32
  closesocket((SOCKET)h);
#else
  close((int)h);
#endif
}

/* (socket, address) for an accepted connection whose handle is res. A
 * multishot accept's result may come without the peer's address (io_uring
 * writes none per connection): it is asked for then. */
static PyObject* make_accepted(fiocp_op_t* rec, int64_t res, uint32_t info) {
  PyObject *sock, *addr;
  if (info != 0) {
    /* The listener's family, type and proto, as socket.accept() passes
     * them: no system calls to ask for them. */
    sock = PyObject_CallFunction(fb_socket_type, "iiiL", (int)(info & 0xffff),
                                 (int)((info >> 16) & 0xff), (int)(info >> 24),
                                 (long long)res);
  } else {
    PyObject* kwargs = Py_BuildValue("{sL}", "fileno", (long long)res);
    PyObject* empty = PyTuple_New(0);
    sock = (kwargs && empty) ? PyObject_Call(fb_socket_type, empty, kwargs) : NULL;
    Py_XDECREF(kwargs);
    Py_XDECREF(empty);
  }
  if (sock == NULL) {
    close_handle((fiocp_handle_t)res);
    return NULL;
  }
  if (rec->addr != NULL && rec->addr->sslen > 0) {
    addr = fb_make_sockaddr(&rec->addr->ss, rec->addr->sslen);
  } else {
    addr = PyObject_CallMethod(sock, "getpeername", NULL);
    if (addr == NULL && PyErr_ExceptionMatches(PyExc_OSError)) {
      /* Already reset by the peer: the socket is still the result. */
      PyErr_Clear();
      addr = Py_NewRef(Py_None);
    }
  }
  if (addr == NULL) {
    Py_DECREF(sock); /* closes the handle */
    return NULL;
  }
  return Py_BuildValue("(NN)", sock, addr);
}

/* (ancdata, msg_flags, address) of a finished recvmsg. */
static PyObject* make_recvmsg_extra(fiocp_op_t* rec) {
  fiocp_addr_t* a = rec->addr;
  PyObject* anc = fb_parse_ancdata(a->control, a->controllen);
  PyObject* addr;
  if (anc == NULL) return NULL;
  if (a->sslen > 0) {
    addr = fb_make_sockaddr(&a->ss, a->sslen);
    if (addr == NULL) {
      PyErr_Clear();
      addr = Py_NewRef(Py_None);
    }
  } else {
    addr = Py_NewRef(Py_None);
  }
#ifdef MSG_CMSG_CLOEXEC
  /* The backends receive descriptors close-on-exec; Linux echoes that
   * request flag in msg_flags, where socket.recvmsg() shows none. */
  return Py_BuildValue("(NiN)", anc, a->msgflags & ~MSG_CMSG_CLOEXEC, addr);
#else
  return Py_BuildValue("(NiN)", anc, a->msgflags, addr);
#endif
}

/* Popen.returncode for wait_process's result: on POSIX res is a wait
 * status (exit code, or minus the signal that ended the child); on Windows
 * the exit code. */
static PyObject* make_returncode(int64_t res) {
#ifndef _WIN32
  int st = (int)res;
  if (WIFEXITED(st)) return PyLong_FromLong(WEXITSTATUS(st));
  if (WIFSIGNALED(st)) return PyLong_FromLong(-WTERMSIG(st));
  return PyLong_FromLongLong((long long)res);
#else
  return PyLong_FromUnsignedLong((unsigned long)res);
#endif
}

/* c->nbytes as an int object. Consecutive completions mostly carry the same
 * count (a block, a message size), so the last int made is reused: no
 * allocation for counts above the small-int cache. Guarded by the GIL (off
 * on free-threaded builds). */
#ifndef Py_GIL_DISABLED
static PyObject* last_nbytes_obj;
static Py_ssize_t last_nbytes;
#endif

static void set_nbytes_obj(CompletionObject* c) {
  PyObject* o;
#ifndef Py_GIL_DISABLED
  if (last_nbytes_obj != NULL && last_nbytes == c->nbytes) {
    Py_INCREF(last_nbytes_obj);
    Py_XSETREF(c->nbytes_obj, last_nbytes_obj);
    return;
  }
#endif
  o = PyLong_FromSsize_t(c->nbytes);
  if (o == NULL) {
    /* Out of memory: reading nbytes then raises AttributeError rather
     * than giving a wrong count; result() still has it. */
    PyErr_Clear();
    Py_CLEAR(c->nbytes_obj);
    return;
  }
#ifndef Py_GIL_DISABLED
  Py_INCREF(o);
  Py_XSETREF(last_nbytes_obj, o);
  last_nbytes = c->nbytes;
#endif
  Py_XSETREF(c->nbytes_obj, o);
}

/* The exception being raised becomes c's error (building its result
 * failed: a socket object for accept, recvmsg's ancillary data). */
static void take_raised_error(CompletionObject* c) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  Py_SETREF(c->error, value);
}

/* A pooled receive's result with data: its buffer becomes c.buffer (a
 * PooledBuffer), or goes straight back to the pool if that cannot be
 * made. */
static void fill_pooled(fiocp_op_t* rec, CompletionObject* c, int64_t res) {
  BufferPoolObject* pool = fb_pool_from_c(rec->pool);
  PyObject* buf;
  if (rec->offset < 0 || rec->offset >= (int64_t)rec->pool->count ||
      res > (int64_t)rec->pool->size) {
    /* A backend's bug, not the user's: say so rather than read outside
     * the pool. */
    PyErr_Format(PyExc_SystemError,
                 "pooled receive completed with buffer id %lld and %lld bytes "
                 "(pool of %u x %u)",
                 (long long)rec->offset, (long long)res, rec->pool->count,
                 rec->pool->size);
    take_raised_error(c);
    c->nbytes = 0;
    return;
  }
  buf = fb_PooledBuffer_new(pool, (uint32_t)rec->offset, (Py_ssize_t)res);
  if (buf == NULL) {
    /* No memory for the object: the data is lost with its buffer, and the
     * completion says why. */
    fb_pool_give(pool, (uint32_t)rec->offset);
    take_raised_error(c);
    c->nbytes = 0;
    return;
  }
  Py_SETREF(c->buffer, buf);
}

/* Fills c from its record rec (result, error, address, accepted socket,
 * pooled buffer) and releases its buffer; the record itself is given back
 * by fb_finish_ops(). c is rec's Completion, or the new one of a
 * multishot's child. */
static void finish_fill(fiocp_op_t* rec, CompletionObject* c) {
  int64_t res = rec->res;
  if (res < 0) {
    Py_SETREF(c->error, fb_make_code_error(res));
    if (c->error == NULL) {
      /* Building the exception failed (memory): keep a plain one. */
      PyErr_Clear();
      Py_INCREF(PyExc_OSError);
      c->error = PyExc_OSError;
    }
    c->cancelled = (uint8_t)fb_is_cancel_code(res);
    c->nbytes = 0;
#ifndef _WIN32
    if (c->kind == FIOCP_OP_WAIT_PROCESS && (res == -ECHILD || res == -ESRCH) &&
        c->buffer != Py_None) {
      /* Reaped by its Popen (poll(), wait(), the module's cleanup) before
       * the port looked (ECHILD), or even before it was submitted (ESRCH
       * from pidfd_open): its returncode is the answer. */
      PyObject* rc = PyObject_GetAttrString(c->buffer, "returncode");
      if (rc != NULL && rc != Py_None) {
        Py_SETREF(c->error, Py_NewRef(Py_None));
        c->extra = rc;
        rc = NULL;
      }
      Py_XDECREF(rc);
      PyErr_Clear();
    }
#endif
  } else {
    switch (c->kind) {
      case FIOCP_OP_RECVFROM:
        c->nbytes = (Py_ssize_t)res;
        c->extra = fb_make_sockaddr(&rec->addr->ss, rec->addr->sslen);
        if (c->extra == NULL) {
          c->extra = Py_None;
          Py_INCREF(Py_None);
          PyErr_Clear();
        }
        break;
      case FIOCP_OP_ACCEPT:
        c->extra = make_accepted(rec, res, c->accept_info);
        if (c->extra == NULL) {
          /* The new connection could not be wrapped: the completion
           * carries that error; the handle was closed. */
          take_raised_error(c);
        }
        break;
      case FIOCP_OP_CONNECT:
      case FIOCP_OP_TIMER:
      case FIOCP_OP_FSYNC:
      case FIOCP_OP_CONNECT_PIPE:
        c->nbytes = 0;
        break;
      case FIOCP_OP_RECVMSG:
        c->nbytes = (Py_ssize_t)res;
        c->extra = make_recvmsg_extra(rec);
        if (c->extra == NULL) {
          take_raised_error(c);
        }
        break;
      case FIOCP_OP_WAIT_PROCESS:
        c->nbytes = (Py_ssize_t)res; /* the raw status / exit code */
        c->extra = make_returncode(res);
        if (c->extra == NULL) {
          PyErr_Clear();
          c->extra = Py_NewRef(Py_None);
        }
        break;
      default:
        c->nbytes = (Py_ssize_t)res;
        if (res > 0 && (rec->flags & FIOCP_OPF_POOLED))
          fill_pooled(rec, c, res);
    }
  }
  if ((rec->flags & FIOCP_OPF_POOLED) && c->buffer == c->pool)
    /* No data: the pool was only the operation's while it waited. */
    Py_SETREF(c->buffer, Py_NewRef(Py_None));
  fb_msgbufs_free(c->msg);
  c->msg = NULL;
  if (c->nbytes != 0) set_nbytes_obj(c);
  if (c->pinned) {
    PyBuffer_Release(&c->view);
    c->pinned = 0;
  }
  fb_track_if_needed(c, c->error);
  fb_track_if_needed(c, c->extra);
}

/* A multishot's child: a new Completion for it, from its parent's key,
 * context and pool, marked "more". NULL (nothing to report) only when
 * memory ran out: its resources are given back. The record is freed by
 * finish_release(). */
static CompletionObject* finish_child_fill(fiocp_op_t* rec) {
  CompletionObject* parent = (CompletionObject*)rec->user;
  CompletionObject* c =
      fb_Completion_create(rec->kind, parent->key, parent->context);
  if (c == NULL) {
    PyErr_Clear();
    if (rec->res > 0 && (rec->flags & FIOCP_OPF_POOLED) && rec->offset >= 0)
      fb_pool_give(fb_pool_from_c(rec->pool), (uint32_t)rec->offset);
    else if (rec->res >= 0 && rec->kind == FIOCP_OP_ACCEPT)
      close_handle((fiocp_handle_t)rec->res);
    return NULL;
  }
  c->handle = parent->handle;
  c->flags = parent->flags;
  c->accept_info = parent->accept_info;
  c->more = 1;
  if (parent->pool != NULL) {
    c->pool = Py_NewRef(parent->pool);
    Py_SETREF(c->buffer, Py_NewRef(parent->pool));
  }
  finish_fill(rec, c);
  return c;
}

/* Gives rec back to the port's allocator and marks its Completion no longer
 * in flight. A child is freed instead, and a multishot record given back
 * only with its last reference: then *unref is the Completion whose
 * children's reference the caller drops (after the lock). Returns the
 * Completion to hand out (NULL for a child that could not be reported).
 * Port lock held. */
static CompletionObject* finish_release(CompletionPortObject* self,
                                        fiocp_op_t* rec,
                                        CompletionObject* child,
                                        CompletionObject** unref) {
  CompletionObject* c = (CompletionObject*)rec->user;
  fiocp_op_t* parent = rec;
  *unref = NULL;
  if (rec->flags & FIOCP_OPF_CHILD) {
    parent = rec->parent;
    if (fiocp__child_free(rec) != 0) return child;
    /* The parent's last result was finished before this child. */
    *unref = c;
    parent->state = FIOCP_ST_FREE;
    fiocp__op_free(self->port, parent);
    return child;
  }
  c->rec = NULL;
  c->port = NULL;
  if ((rec->flags & FIOCP_OPF_MULTISHOT) && fiocp__op_unref(rec) != 0) {
    /* Children still on their way: they read c, which stays alive. */
    rec->state = FIOCP_ST_LINGER;
    return c;
  }
  if (rec->flags & FIOCP_OPF_MULTISHOT) *unref = c;
  rec->state = FIOCP_ST_FREE;
  fiocp__op_free(self->port, rec);
  return c;
}

/* The multishot Completions whose children's reference a batch drops
 * once its records are back: rare (one per multishot operation), so a
 * small array on the stack, grown only if needed. */
typedef struct {
  CompletionObject** items;
  int n, cap;
  CompletionObject* small[8];
} unref_list_t;
#define unref_list_init NULL, 0, 8

static void unref_push(unref_list_t* l, CompletionObject* c) {
  if (l->items == NULL) l->items = l->small;
  if (l->n == l->cap) {
    CompletionObject** more = (CompletionObject**)PyMem_Malloc(
        (size_t)l->cap * 2 * sizeof(*more));
    if (more == NULL) {
      /* Out of memory: drop it now rather than leak it. */
      Py_DECREF(c);
      return;
    }
    memcpy(more, l->items, (size_t)l->n * sizeof(*more));
    if (l->items != l->small) PyMem_Free(l->items);
    l->items = more;
    l->cap *= 2;
  }
  l->items[l->n++] = c;
}

static void unref_drop_all(unref_list_t* l) {
  int i;
  for (i = 0; i < l->n; i++) Py_DECREF(l->items[i]);
  if (l->items != l->small && l->items != NULL) PyMem_Free(l->items);
}

/* The Completions a batch hands out: children are new objects and do
 * not count as pending; a child that could not be reported (no memory)
 * leaves no entry. Returns how many went to out[]. */
int fb_finish_ops(CompletionPortObject* self, fiocp_op_t** recs, int n,
                  PyObject** out) {
  int i, nout = 0, nparents = 0;
  unref_list_t unref = {unref_list_init};
#ifdef Py_GIL_DISABLED
  /* Until the lock the records are this thread's alone (dequeued): the
   * results are built without it (they may run Python code: accept makes
   * a socket object). Giving the records back, and the Completions'
   * in-flight fields, are the port's bookkeeping: one lock for the
   * batch. */
  for (i = 0; i < n; i++) {
    if (recs[i]->flags & FIOCP_OPF_CHILD) {
      out[i] = (PyObject*)finish_child_fill(recs[i]);
    } else {
      finish_fill(recs[i], (CompletionObject*)recs[i]->user);
      out[i] = NULL;
      nparents++;
    }
  }
  FB_LOCK(self);
  for (i = 0; i < n; i++) {
    CompletionObject* u;
    CompletionObject* c =
        finish_release(self, recs[i], (CompletionObject*)out[i], &u);
    if (u != NULL) unref_push(&unref, u);
    if (c != NULL) out[nout++] = (PyObject*)c;
  }
  self->pending -= nparents;
  FB_UNLOCK(self);
  for (i = 0; i < nout; i++) fb_done_store((CompletionObject*)out[i], 1);
#else
  /* The GIL covers both steps: one pass over the records. */
  for (i = 0; i < n; i++) {
    fiocp_op_t* rec = recs[i];
    CompletionObject *c, *u = NULL;
    if (rec->flags & (FIOCP_OPF_CHILD | FIOCP_OPF_MULTISHOT)) {
      CompletionObject* child = NULL;
      int is_child = (rec->flags & FIOCP_OPF_CHILD) != 0;
      if (is_child)
        child = finish_child_fill(rec);
      else
        finish_fill(rec, (CompletionObject*)rec->user);
      c = finish_release(self, rec, child, &u); /* frees a child's rec */
      if (u != NULL) unref_push(&unref, u);
      if (!is_child) nparents++;
      if (c == NULL) continue;
    } else {
      c = (CompletionObject*)rec->user;
      finish_fill(rec, c);
      c->rec = NULL;
      c->port = NULL;
      rec->state = FIOCP_ST_FREE;
      fiocp__op_free(self->port, rec);
      nparents++;
    }
    c->done = 1;
    out[nout++] = (PyObject*)c;
  }
  self->pending -= nparents;
#endif
  /* Finalizers may run now that the records are back. */
  unref_drop_all(&unref);
  return nout;
}

CompletionObject* fb_finish_op(CompletionPortObject* self, fiocp_op_t* rec) {
  PyObject* c;
  if (fb_finish_ops(self, &rec, 1, &c) == 0) return NULL;
  return (CompletionObject*)c;
}
