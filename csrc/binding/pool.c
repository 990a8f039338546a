/* pool.c: buffer pools (fastiocp.BufferPool) and the buffers that pooled
 * receives hand out (fastiocp.PooledBuffer).
 *
 * A pool is count buffers of size bytes in one mapping (fiocp_pool_t,
 * common.c). A pooled receive pins no memory while it waits: the backend
 * takes a buffer only when data is there, and the result carries it as a
 * PooledBuffer. The buffer goes back to the pool when the user releases
 * it (PooledBuffer.release(), Completion.release()) or when the
 * PooledBuffer is collected, never while a memoryview of it is alive: the
 * kernel cannot write into a buffer that Python still reads.
 *
 * Lifetimes. A PooledBuffer holds its pool; an in-flight pooled
 * Completion holds its pool (Completion.pool_obj), so the memory outlives
 * every record that names it. A pool registered with a port holds only a
 * borrowed pointer to it (no cycle through the port's pending
 * Completions): the port unregisters its pools when it is destroyed
 * (fb_pools_detach), and a pool collected first unregisters itself. */
#include "binding.h"

#include <stddef.h>

/* ======================================================================
 * BufferPool
 * ====================================================================== */

#define POOL_OF(p) ((BufferPoolObject*)((char*)(p)-offsetof(BufferPoolObject, pool)))

BufferPoolObject* fb_pool_from_c(fiocp_pool_t* p) { return POOL_OF(p); }

static PyObject* BufferPool_new(PyTypeObject* type, PyObject* args,
                                PyObject* kwds) {
  static char* kwlist[] = {"size", "count", NULL};
  Py_ssize_t size, count;
  BufferPoolObject* self;
  int rc;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn:BufferPool", kwlist, &size,
                                   &count))
    return NULL;
  if (size < 1 || size > (Py_ssize_t)FB_MAX_TRANSFER) {
    PyErr_Format(PyExc_ValueError,
                 "BufferPool size must be between 1 and %u bytes",
                 (unsigned)FB_MAX_TRANSFER);
    return NULL;
  }
  if (count < 1 || count > FIOCP_POOL_MAX) {
    PyErr_Format(PyExc_ValueError,
                 "BufferPool count must be between 1 and %d", FIOCP_POOL_MAX);
    return NULL;
  }
  if ((size_t)size * (size_t)count > ((size_t)1 << 40)) {
    PyErr_SetString(PyExc_ValueError, "BufferPool size * count is over 1 TiB");
    return NULL;
  }
  self = (BufferPoolObject*)type->tp_alloc(type, 0);
  if (self == NULL) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = fiocp__pool_init(&self->pool, (uint32_t)size, (uint32_t)count);
  Py_END_ALLOW_THREADS
  if (rc < 0) {
    Py_DECREF(self);
    PyErr_NoMemory();
    return NULL;
  }
  return (PyObject*)self;
}

/* Unregisters self from its port, if it still has one. GIL. */
static void pool_detach_from_port(BufferPoolObject* self) {
  CompletionPortObject* port;
#ifdef Py_GIL_DISABLED
  PyMutex_Lock(&fb_detach_mu);
#endif
  port = self->port;
  if (port != NULL) {
    FB_LOCK(port);
    fb_port_forget_pool(port, self);
    FB_UNLOCK(port);
  }
#ifdef Py_GIL_DISABLED
  PyMutex_Unlock(&fb_detach_mu);
#endif
}

static void BufferPool_dealloc(BufferPoolObject* self) {
  if (self->weakreflist != NULL) PyObject_ClearWeakRefs((PyObject*)self);
  pool_detach_from_port(self);
  /* A port leaked at close (its kernel may still write into buffers it
   * handed out) leaks its pools' memory with it. */
  if (!self->leaked) fiocp__pool_fini(&self->pool);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

/* Gives buffer id back to the pool: to its port's backend while it is
 * registered (io_uring puts it back in its ring), else on the free stack.
 * GIL. */
void fb_pool_give(BufferPoolObject* self, uint32_t id) {
  CompletionPortObject* port;
#ifdef Py_GIL_DISABLED
  PyMutex_Lock(&fb_detach_mu);
#endif
  port = self->port;
  if (port != NULL) {
    FB_LOCK(port);
    if (self->port == port && port->port != NULL &&
        port->backend->pool_put != NULL)
      port->backend->pool_put(port->port, &self->pool, id);
    else
      fiocp__pool_give(&self->pool, id);
    FB_UNLOCK(port);
  } else {
    fiocp__pool_give(&self->pool, id);
  }
#ifdef Py_GIL_DISABLED
  PyMutex_Unlock(&fb_detach_mu);
  _Py_atomic_add_ssize(&self->in_use, -1);
#else
  self->in_use--;
#endif
}

static PyObject* BufferPool_repr(BufferPoolObject* self) {
  return PyUnicode_FromFormat("<fastiocp.BufferPool size=%u count=%u in_use=%zd>",
                              self->pool.size, self->pool.count,
                              self->in_use);
}

static PyObject* BufferPool_get_size(BufferPoolObject* self, void* c) {
  (void)c;
  return PyLong_FromUnsignedLong(self->pool.size);
}

static PyObject* BufferPool_get_count(BufferPoolObject* self, void* c) {
  (void)c;
  return PyLong_FromUnsignedLong(self->pool.count);
}

static PyObject* BufferPool_get_in_use(BufferPoolObject* self, void* c) {
  (void)c;
#ifdef Py_GIL_DISABLED
  return PyLong_FromSsize_t(_Py_atomic_load_ssize(&self->in_use));
#else
  return PyLong_FromSsize_t(self->in_use);
#endif
}

static PyGetSetDef BufferPool_getset[] = {
    {"size", (getter)BufferPool_get_size, NULL,
     "Bytes per buffer: the most one pooled receive returns.", NULL},
    {"count", (getter)BufferPool_get_count, NULL, "Buffers in the pool.",
     NULL},
    {"in_use", (getter)BufferPool_get_in_use, NULL,
     "Buffers handed out in completions and not yet given back "
     "(PooledBuffer.release(), Completion.release(), or collected).",
     NULL},
    {NULL}};

PyDoc_STRVAR(BufferPool_doc,
"BufferPool(size, count)\n"
"--\n\n"
"count buffers of size bytes for pooled receives: port.recv(sock, pool)\n"
"and port.recv(sock, pool, multishot=True). A pooled receive holds no\n"
"buffer while it waits; the kernel (io_uring's provided buffers) or the\n"
"port takes one only when data is there, and the completion carries it\n"
"as a PooledBuffer, which goes back to the pool on release() or when it\n"
"is collected. When no buffer is free as data arrives, the receive\n"
"completes with OSError(ENOBUFS) and reads nothing: the data stays in\n"
"the socket for the next receive. A pool is registered with the port of\n"
"its first receive and serves only that port until the port is closed.");

PyTypeObject fb_BufferPoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp.BufferPool",
    .tp_basicsize = sizeof(BufferPoolObject),
    .tp_dealloc = (destructor)BufferPool_dealloc,
    .tp_repr = (reprfunc)BufferPool_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = BufferPool_doc,
    .tp_weaklistoffset = offsetof(BufferPoolObject, weakreflist),
    .tp_getset = BufferPool_getset,
    .tp_new = BufferPool_new,
};

/* ======================================================================
 * PooledBuffer
 * ====================================================================== */

typedef struct {
  PyObject_HEAD
  BufferPoolObject* pool; /* NULL once given back */
  uint32_t id;
  Py_ssize_t len;
  Py_ssize_t exports;
} PooledBufferObject;

/* One is made and dropped per pooled receive: kept for reuse, as
 * Completions are (completion.c), under the GIL (off on free-threaded
 * builds). */
#ifdef Py_GIL_DISABLED
# define POOLED_FREELIST_MAX 0
#else
# define POOLED_FREELIST_MAX 1024
#endif
static PooledBufferObject* pooled_freelist;
static int pooled_freelist_len;

PyObject* fb_PooledBuffer_new(BufferPoolObject* pool, uint32_t id,
                              Py_ssize_t len) {
  PooledBufferObject* b = POOLED_FREELIST_MAX ? pooled_freelist : NULL;
  if (b != NULL) {
    pooled_freelist = (PooledBufferObject*)b->pool;
    pooled_freelist_len--;
    _Py_NewReference((PyObject*)b);
  } else {
    b = PyObject_New(PooledBufferObject, &fb_PooledBufferType);
    if (b == NULL) return NULL;
  }
  Py_INCREF(pool);
  b->pool = pool;
  b->id = id;
  b->len = len;
  b->exports = 0;
#ifdef Py_GIL_DISABLED
  _Py_atomic_add_ssize(&pool->in_use, 1);
#else
  pool->in_use++;
#endif
  return (PyObject*)b;
}

/* Gives the buffer back (once). */
static void pooled_give_back(PooledBufferObject* self) {
  BufferPoolObject* pool = self->pool;
  if (pool == NULL) return;
  self->pool = NULL;
  fb_pool_give(pool, self->id);
  Py_DECREF(pool);
}

static void PooledBuffer_dealloc(PooledBufferObject* self) {
  pooled_give_back(self);
  if (pooled_freelist_len < POOLED_FREELIST_MAX) {
    /* The pool field links the free list: it is NULL after give back. */
    self->pool = (BufferPoolObject*)pooled_freelist;
    pooled_freelist = self;
    pooled_freelist_len++;
  } else {
    PyObject_Free(self);
  }
}

int fb_PooledBuffer_release(PyObject* obj) {
  PooledBufferObject* self = (PooledBufferObject*)obj;
  int rc = 0;
  Py_BEGIN_CRITICAL_SECTION(obj);
  if (self->exports > 0) {
    PyErr_Format(PyExc_BufferError,
                 "cannot release a pooled buffer while %zd memoryview(s) of "
                 "it are alive: release them first",
                 self->exports);
    rc = -1;
  } else {
    pooled_give_back(self);
  }
  Py_END_CRITICAL_SECTION();
  return rc;
}

static PyObject* PooledBuffer_release(PooledBufferObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  if (fb_PooledBuffer_release((PyObject*)self) < 0) return NULL;
  Py_RETURN_NONE;
}

static int PooledBuffer_getbuffer(PooledBufferObject* self, Py_buffer* view,
                                  int flags) {
  int rc;
  Py_BEGIN_CRITICAL_SECTION(self);
  if (self->pool == NULL) {
    PyErr_SetString(PyExc_ValueError,
                    "the pooled buffer was released: its memory went back "
                    "to the pool");
    rc = -1;
  } else {
    rc = PyBuffer_FillInfo(view, (PyObject*)self,
                           self->pool->pool.base +
                               (size_t)self->id * self->pool->pool.size,
                           self->len, 0, flags);
    if (rc == 0) self->exports++;
  }
  Py_END_CRITICAL_SECTION();
  return rc;
}

static void PooledBuffer_releasebuffer(PooledBufferObject* self,
                                       Py_buffer* view) {
  (void)view;
  Py_BEGIN_CRITICAL_SECTION(self);
  self->exports--;
  Py_END_CRITICAL_SECTION();
}

static Py_ssize_t PooledBuffer_len(PooledBufferObject* self) {
  return self->pool == NULL ? 0 : self->len;
}

/* b[i] and b[i:j]: memoryview's, over the buffer (a slice keeps it). */
static PyObject* PooledBuffer_subscript(PooledBufferObject* self,
                                        PyObject* key) {
  PyObject *view = PyMemoryView_FromObject((PyObject*)self), *r;
  if (view == NULL) return NULL;
  r = PyObject_GetItem(view, key);
  Py_DECREF(view);
  return r;
}

static PyObject* PooledBuffer_repr(PooledBufferObject* self) {
  if (self->pool == NULL)
    return PyUnicode_FromString("<fastiocp.PooledBuffer released>");
  return PyUnicode_FromFormat("<fastiocp.PooledBuffer id=%u len=%zd>",
                              self->id, self->len);
}

static PyObject* PooledBuffer_get_released(PooledBufferObject* self, void* c) {
  (void)c;
  return PyBool_FromLong(self->pool == NULL);
}

static PyBufferProcs PooledBuffer_as_buffer = {
    (getbufferproc)PooledBuffer_getbuffer,
    (releasebufferproc)PooledBuffer_releasebuffer,
};

static PySequenceMethods PooledBuffer_as_sequence = {
    .sq_length = (lenfunc)PooledBuffer_len,
};

static PyMappingMethods PooledBuffer_as_mapping = {
    .mp_length = (lenfunc)PooledBuffer_len,
    .mp_subscript = (binaryfunc)PooledBuffer_subscript,
};

static PyMethodDef PooledBuffer_methods[] = {
    {"release", (PyCFunction)PooledBuffer_release, METH_NOARGS,
     "Gives the buffer back to its pool now. Raises BufferError while a\n"
     "memoryview of it is alive. Idempotent."},
    {NULL}};

static PyGetSetDef PooledBuffer_getset[] = {
    {"released", (getter)PooledBuffer_get_released, NULL,
     "Whether the buffer went back to its pool.", NULL},
    {NULL}};

PyDoc_STRVAR(PooledBuffer_doc,
"The data of a pooled receive, in a buffer of a BufferPool.\n\n"
"It supports the buffer protocol (memoryview(b), bytes(b), b'' + b),\n"
"len() (the bytes received) and b[i], b[i:j] (memoryview slices, which\n"
"keep the buffer while they live). The buffer goes back to the pool on\n"
"release() or when the object is collected; a memoryview of it keeps it.");

PyTypeObject fb_PooledBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp.PooledBuffer",
    .tp_basicsize = sizeof(PooledBufferObject),
    .tp_dealloc = (destructor)PooledBuffer_dealloc,
    .tp_repr = (reprfunc)PooledBuffer_repr,
    .tp_as_sequence = &PooledBuffer_as_sequence,
    .tp_as_mapping = &PooledBuffer_as_mapping,
    .tp_as_buffer = &PooledBuffer_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PooledBuffer_doc,
    .tp_methods = PooledBuffer_methods,
    .tp_getset = PooledBuffer_getset,
};
