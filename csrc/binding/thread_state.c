/* thread_state.c: what each thread is doing on a port. The batch() blocks
 * a thread has open (a batch belongs to the thread that opened it), and the
 * concurrency slots a thread holds (the Linux emulation of IOCP's
 * concurrency value).
 */
#include "binding.h"

/* ======================================================================
 * CompletionPort: batches
 * ====================================================================== */

/* The calling thread's entry in self->batches, or -1. */
static int batch_index(CompletionPortObject* self, unsigned long ident) {
  int i;
  for (i = 0; i < self->nbatches; i++)
    if (self->batches[i].ident == ident) return i;
  return -1;
}

/* Whether the calling thread is inside one of its own port.batch() blocks:
 * then its submissions wait for the block's end (io_uring). Port lock
 * held. */
int fb_in_batch(CompletionPortObject* self) {
  return self->nbatches > 0 &&
         batch_index(self, PyThread_get_thread_ident()) >= 0;
}

PyObject* fb_batch_enter(CompletionPortObject* self, PyObject* Py_UNUSED(ignored)) {
  unsigned long me = PyThread_get_thread_ident();
  int i;
  FB_LOCK(self);
  if (fb_port_check_open(self) < 0) goto fail;
  i = batch_index(self, me);
  if (i < 0) {
    if (self->nbatches == self->batches_cap) {
      int cap = self->batches_cap ? self->batches_cap * 2 : 4;
      /* PyMem_Raw: no GIL-dependent allocator under the port lock */
      struct batch_thread_s* grown =
          PyMem_RawRealloc(self->batches, (size_t)cap * sizeof(*grown));
      if (grown == NULL) {
        PyErr_NoMemory();
        goto fail;
      }
      self->batches = grown;
      self->batches_cap = cap;
    }
    i = self->nbatches++;
    self->batches[i].ident = me;
    self->batches[i].depth = 0;
  }
  self->batches[i].depth++;
  FB_UNLOCK(self);
  Py_RETURN_NONE;
fail:
  FB_UNLOCK(self);
  return NULL;
}

PyObject* fb_batch_exit(CompletionPortObject* self, PyObject* Py_UNUSED(ignored)) {
  int i, flush;
  FB_LOCK(self);
  i = batch_index(self, PyThread_get_thread_ident());
  if (i >= 0 && --self->batches[i].depth == 0)
    self->batches[i] = self->batches[--self->nbatches];
  flush = !fb_in_batch(self) && self->initialized && !self->closed;
  FB_UNLOCK(self);
  if (flush) return fb_CompletionPort_flush(self, NULL);
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
  PyObject* r = fb_batch_enter(self->port, NULL);
  if (r == NULL) return NULL;
  Py_DECREF(r);
  Py_INCREF(self->port);
  return (PyObject*)self->port;
}

static PyObject* Batch_exit(BatchObject* self, PyObject* args) {
  PyObject* r = fb_batch_exit(self->port, NULL);
  (void)args;
  if (r == NULL) return NULL;
  Py_DECREF(r);
  Py_RETURN_FALSE;
}

static PyMethodDef Batch_methods[] = {
    {"__enter__", (PyCFunction)Batch_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Batch_exit, METH_VARARGS, NULL},
    {NULL}};

PyTypeObject fb_BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Context manager returned by CompletionPort.batch().",
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
};

PyObject* fb_CompletionPort_batch(CompletionPortObject* self,
                                  PyObject* Py_UNUSED(ignored)) {
  BatchObject* b;
  if (fb_port_check_open(self) < 0) return NULL;
  b = PyObject_New(BatchObject, &fb_BatchType);
  if (b == NULL) return NULL;
  Py_INCREF(self);
  b->port = self;
  return (PyObject*)b;
}

/* ======================================================================
 * CompletionPort: concurrency slots
 * ====================================================================== */

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
 * would kick the parent's ring, so fb_port_owns_backend() refuses. GIL. */
typedef struct {
  PyObject_HEAD
  Py_ssize_t n, cap;
  PyObject** ports; /* weak references to CompletionPortObjects */
} ThreadSlotsObject;

/* The key of the ThreadSlots object in a thread's state dict. */
PyObject* fb_str_thread_slots;

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
    FB_LOCK(p); /* a close() on another thread must not destroy it meanwhile */
    if (fb_port_owns_backend(p)) p->backend->release(p->port);
    FB_UNLOCK(p);
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

PyTypeObject fb_ThreadSlotsType = {
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
  ts = PyDict_GetItemWithError(dict, fb_str_thread_slots);
  if (ts != NULL || !create) {
    PyErr_Clear();
    return (ThreadSlotsObject*)ts;
  }
  PyErr_Clear();
  ts = (PyObject*)PyObject_New(ThreadSlotsObject, &fb_ThreadSlotsType);
  if (ts == NULL) {
    PyErr_Clear();
    return NULL;
  }
  ((ThreadSlotsObject*)ts)->n = ((ThreadSlotsObject*)ts)->cap = 0;
  ((ThreadSlotsObject*)ts)->ports = NULL;
  if (PyDict_SetItem(dict, fb_str_thread_slots, ts) < 0) PyErr_Clear();
  Py_DECREF(ts); /* the dict's reference, if it took one */
  return (ThreadSlotsObject*)PyDict_GetItemWithError(dict, fb_str_thread_slots);
}

/* Gives back the calling thread's slot on self, if it holds one, and
 * prunes the entries of ports that are gone. */
void fb_slot_release(CompletionPortObject* self) {
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
void fb_slot_hold(CompletionPortObject* self) {
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
