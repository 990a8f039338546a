/* port.c: the CompletionPort type: lifetime (init, close, dealloc),
 * registration, submission (the submit methods, resubmit, post), cancel,
 * flush and dequeue (get, get_many, iteration). Which thread is inside a
 * batch and which holds a concurrency slot is in thread_state.c.
 */
#include "binding.h"

#include <limits.h>
#include <math.h>
#include <string.h>

/* Longest single transfer: what Linux does in one read()/write() call.
 * Larger buffers complete short, which callers must handle anyway. */
#define MAX_TRANSFER FB_MAX_TRANSFER

/* How long close() waits for cancelled operations to come back. */
#define CLOSE_TIMEOUT_MS 10000

/* ======================================================================
 * CompletionPort: lifetime
 * ====================================================================== */

int fb_port_check_open(CompletionPortObject* self) {
  if (!self->initialized) {
    PyErr_SetString(PyExc_ValueError, "CompletionPort.__init__ was not called");
    return -1;
  }
  if (self->closed) {
    fb_set_closed_error();
    return -1;
  }
  if (self->fork_gen != fb_fork_generation) {
    PyErr_SetString(fb_FastIOCPError,
                    "this CompletionPort was created by the parent process: "
                    "it cannot be used after fork(); create a new one");
    return -1;
  }
  return 0;
}

/* Whether this process may call into the port's backend: it is open and
 * was created by this process, not inherited through fork(). */
int fb_port_owns_backend(CompletionPortObject* p) {
  return p->initialized && !p->closed && p->port != NULL &&
         p->fork_gen == fb_fork_generation;
}

/* ======================================================================
 * CompletionPort: buffer pools
 * ====================================================================== */

int fb_port_use_pool(CompletionPortObject* self, BufferPoolObject* pool) {
  int rc;
  if (pool->port == self) return 0;
  if (pool->port != NULL) {
    PyErr_SetString(PyExc_ValueError,
                    "this BufferPool is registered with another "
                    "CompletionPort: a pool serves one port until that port "
                    "is closed");
    return -1;
  }
  if (self->npools == self->pools_cap) {
    int cap = self->pools_cap ? 2 * self->pools_cap : 4;
    BufferPoolObject** p = (BufferPoolObject**)PyMem_RawRealloc(
        self->pools, (size_t)cap * sizeof(*p));
    if (p == NULL) {
      PyErr_NoMemory();
      return -1;
    }
    self->pools = p;
    self->pools_cap = cap;
  }
  if (self->backend->pool_add != NULL) {
    rc = self->backend->pool_add(self->port, &pool->pool);
    if (rc < 0) {
      fb_set_code_error(rc);
      return -1;
    }
  }
  pool->pool.port = self->port;
  pool->port = self;
  self->pools[self->npools++] = pool;
  return 0;
}

void fb_port_forget_pool(CompletionPortObject* self, BufferPoolObject* pool) {
  int i;
  for (i = 0; i < self->npools; i++) {
    if (self->pools[i] != pool) continue;
    self->pools[i] = self->pools[--self->npools];
    if (self->port != NULL && !self->leaked &&
        self->backend->pool_remove != NULL)
      self->backend->pool_remove(self->port, &pool->pool);
    break;
  }
  pool->pool.port = NULL;
  pool->port = NULL;
}

/* h's place in the port's key cache. Windows handles are multiples of 4. */
static struct key_cache_s* key_place(CompletionPortObject* self, fiocp_handle_t h) {
#ifdef _WIN32
  return &self->key_cache[((uintptr_t)h >> 2) % FB_KEY_CACHE];
#else
  return &self->key_cache[(unsigned)h % FB_KEY_CACHE];
#endif
}

/* Empties the key cache: the dict of handles is going. Port lock held. */
static void forget_keys(CompletionPortObject* self) {
  memset(self->key_cache, 0, sizeof(self->key_cache));
}

/* Forgets every registered pool: before the backend is destroyed, or
 * (leaked) so that the pools' memory is never freed under a kernel that
 * may still write into it. Port lock held. */
static void port_forget_pools(CompletionPortObject* self, int leaked) {
  while (self->npools > 0) {
    BufferPoolObject* pool = self->pools[self->npools - 1];
    if (leaked) pool->leaked = 1;
    fb_port_forget_pool(self, pool);
  }
}

/* Runs backend->destroy once no thread is inside a GIL-free call. Port
 * lock held. */
static void port_maybe_destroy(CompletionPortObject* self) {
  if (!self->destroy_pending || self->inside > 0) return;
  self->destroy_pending = 0;
  port_forget_pools(self, 0);
  self->backend->destroy(self->port);
  fiocp__allocator_destroy(self->port);
  PyMem_RawFree(self->port);
  self->port = NULL;
}

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
  int n, i, waited = 0;
  PyObject* handles;
  FB_LOCK(self);
  if (!self->initialized || self->closed) {
    FB_UNLOCK(self);
    return 0;
  }
  self->closed = 1;
  handles = self->handles; /* dropped after unlocking: keys are user objects */
  self->handles = NULL;
  forget_keys(self);
  if (self->fork_gen != fb_fork_generation) {
    /* A forked child: the kernel objects and threads are the parent's.
     * Touch nothing; the child's copies of the records and buffers are
     * simply left behind, and its completions no longer name the port. */
    self->leaked = 1;
    fiocp__foreach_owned(self->port, detach_completion, NULL);
    port_forget_pools(self, 1);
    FB_UNLOCK(self);
    if (self->emulate_slots) fb_slot_release(self); /* forget this thread's */
    Py_XDECREF(handles);
    return 0;
  }
  /* The first call scans the record slabs: the lock keeps them still. */
  owed = self->backend->shutdown(self->port, 0);
  if (owed > 0) {
    self->inside++;
    waited = 1;
  }
  FB_UNLOCK(self);
  if (self->emulate_slots) fb_slot_release(self); /* forget this thread's */
  if (waited) {
    Py_BEGIN_ALLOW_THREADS
    owed = self->backend->shutdown(self->port, CLOSE_TIMEOUT_MS);
    Py_END_ALLOW_THREADS
  }
  while ((n = self->backend->drain(self->port, batch, 64)) > 0) {
    PyObject* done[64];
    int nout = fb_finish_ops(self, batch, n, done);
    for (i = 0; i < nout; i++) Py_DECREF(done[i]);
  }
  Py_XDECREF(handles);
  FB_LOCK(self);
  if (waited) self->inside--;
  if (owed > 0) {
    /* The kernel still owns buffers of these operations: keep them, their
     * records and the backend alive forever rather than risk it writing
     * into freed memory. */
    self->leaked = 1;
    fiocp__foreach_owned(self->port, detach_completion, NULL);
    port_forget_pools(self, 1);
    FB_UNLOCK(self);
    PyErr_WarnFormat(PyExc_ResourceWarning, 1,
                     "CompletionPort.close(): %lld operations did not come "
                     "back within %d ms of being cancelled; their buffers "
                     "are kept alive",
                     (long long)owed, CLOSE_TIMEOUT_MS);
    return 0;
  }
  self->destroy_pending = 1;
  port_maybe_destroy(self);
  FB_UNLOCK(self);
  return 0;
}

/* close() where no exception may escape or be lost (dealloc, tp_clear):
 * the one pending is kept, a failure is reported as unraisable. */
static void port_close_unraisable(CompletionPortObject* self) {
  PyObject *type, *value, *tb;
  if (!self->initialized || self->closed) return;
  PyErr_Fetch(&type, &value, &tb);
  if (port_close_impl(self) < 0) PyErr_WriteUnraisable((PyObject*)self);
  PyErr_Restore(type, value, tb);
}

static void CompletionPort_dealloc(CompletionPortObject* self) {
  PyObject_GC_UnTrack(self);
  /* (It keeps a pending exception across the callbacks it calls.) */
  if (self->weakreflist != NULL) PyObject_ClearWeakRefs((PyObject*)self);
#ifdef Py_GIL_DISABLED
  /* A Completion.cancel() on another thread may be following one of our
   * Completions' borrowed port pointers: wait for it, and detach them all
   * so that no later one does (binding.h). */
  if (self->port != NULL) {
    PyMutex_Lock(&fb_detach_mu);
    fiocp__foreach_owned(self->port, detach_completion, NULL);
    PyMutex_Unlock(&fb_detach_mu);
  }
#endif
  port_close_unraisable(self);
  Py_CLEAR(self->handles);
  PyMem_RawFree(self->batches);
  /* Pools still registered (a port never initialized or closed has none
   * left; a forked child's copy may): they must not name a freed port. */
#ifdef Py_GIL_DISABLED
  PyMutex_Lock(&fb_detach_mu);
#endif
  while (self->npools > 0) {
    BufferPoolObject* pool = self->pools[--self->npools];
    pool->pool.port = NULL;
    pool->port = NULL;
  }
#ifdef Py_GIL_DISABLED
  PyMutex_Unlock(&fb_detach_mu);
#endif
  PyMem_RawFree(self->pools);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

static int CompletionPort_traverse(CompletionPortObject* self, visitproc visit,
                                   void* arg) {
  Py_VISIT(self->handles);
  return 0;
}

/* The GC breaking a cycle through a key: the port closes here, not only
 * at dealloc, so that no method between the two finds it open with no
 * dict of handles. close() empties the key cache (a port never opened
 * has looked nothing up). */
static int CompletionPort_clear(CompletionPortObject* self) {
  port_close_unraisable(self);
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
    PyErr_Format(fb_BackendUnavailableError,
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
      PyErr_Format(fb_BackendUnavailableError, "no backend works here: %U", joined);
      Py_DECREF(joined);
    } else {
      PyErr_Format(fb_BackendUnavailableError, "backend %s is unavailable: %s",
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
  self->fork_gen = fb_fork_generation;
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
  if (fb_get_handle(fileobj, &h) < 0) return NULL;
  hkey = PyLong_FromLongLong((long long)h);
  if (hkey == NULL) return NULL;
  FB_LOCK(self);
  if (fb_port_check_open(self) < 0) {
    rc = -1;
  } else if ((rc = PyDict_Contains(self->handles, hkey)) != 0) {
    if (rc > 0)
      PyErr_Format(PyExc_ValueError,
                   "handle %R is already registered with this port",
                   hkey);
    rc = -1;
  } else if ((rc = self->backend->associate(self->port, h)) < 0) {
    fb_set_code_error(rc);
  } else {
    rc = PyDict_SetItem(self->handles, hkey, key);
  }
  FB_UNLOCK(self);
  Py_DECREF(hkey);
  if (rc < 0) return NULL;
  Py_RETURN_NONE;
}

static PyObject* CompletionPort_unregister(CompletionPortObject* self,
                                           PyObject* fileobj) {
  fiocp_handle_t h;
  PyObject* hkey;
  int rc;
  PyObject* key = NULL;
  if (fb_get_handle(fileobj, &h) < 0) return NULL;
  hkey = PyLong_FromLongLong((long long)h);
  if (hkey == NULL) return NULL;
  FB_LOCK(self);
  rc = fb_port_check_open(self);
  /* The key is dropped after unlocking: it is a user object. */
  if (rc == 0 && (rc = fb_dict_get_ref(self->handles, hkey, &key)) == 0) {
    PyErr_Format(PyExc_KeyError, "handle %R is not registered with this port",
                 hkey);
    rc = -1;
  }
  if (rc > 0) {
    struct key_cache_s* kc = key_place(self, h);
    if (kc->handle == h) kc->key = NULL;
    rc = PyDict_DelItem(self->handles, hkey);
  }
  FB_UNLOCK(self);
  Py_XDECREF(key);
  Py_DECREF(hkey);
  if (rc < 0) return NULL;
  Py_RETURN_NONE;
}

/* The key registered for h (a new reference), or NULL with ValueError.
 * Port lock held. */
static PyObject* lookup_key(CompletionPortObject* self, fiocp_handle_t h) {
  struct key_cache_s* kc = key_place(self, h);
  PyObject *hkey, *key = NULL;
  if (kc->key != NULL && kc->handle == h) return Py_NewRef(kc->key);
  hkey = PyLong_FromLongLong((long long)h);
  if (hkey == NULL) return NULL;
  if (fb_dict_get_ref(self->handles, hkey, &key) == 0) {
    PyErr_Format(PyExc_ValueError,
                 "handle %R is not registered with this port: call "
                 "register() first",
                 hkey);
  } else if (key != NULL) {
    kc->handle = h;
    kc->key = key; /* borrowed: the dict holds it until unregister() */
  }
  Py_DECREF(hkey);
  return key;
}

/* ======================================================================
 * CompletionPort: submission
 * ====================================================================== */

enum { BUF_NONE, BUF_READ, BUF_WRITE };

/* Undoes the hand-over of c and its record to the port after the backend
 * refused it at once (no completion will come). The port's reference to c
 * is the caller's to drop: for post() it is the only one, and its
 * finalizers must not run under the port lock. Port lock held. */
static void take_back(CompletionPortObject* self, CompletionObject* c,
                      fiocp_op_t* rec) {
  if (rec->flags & FIOCP_OPF_MULTISHOT)
    Py_DECREF(c); /* its children's; the caller still holds c */
  self->pending--;
  c->rec = NULL;
  c->port = NULL;
  rec->state = FIOCP_ST_FREE;
  fiocp__op_free(self->port, rec);
}

/* Takes a record for c (buffer pinned, key set, port open) and hands it
 * and a reference to c to the port: the record is in flight from here on.
 * Returns it, or NULL with MemoryError (nothing changed). Runs no Python
 * code. Port lock held. */
static fiocp_op_t* prepare_op(CompletionPortObject* self, CompletionObject* c,
                              fiocp_handle_t h, int64_t offset, int needs_addr,
                              const struct sockaddr_storage* ss,
                              fiocp_socklen_t sslen) {
  fiocp_op_t* rec = fiocp__op_alloc(self->port);
  if (rec == NULL) {
    PyErr_NoMemory();
    return NULL;
  }
  if (needs_addr) {
    rec->addr = fiocp__addr_alloc(self->port);
    if (rec->addr == NULL) {
      fiocp__op_free(self->port, rec);
      PyErr_NoMemory();
      return NULL;
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
  rec->flags = c->flags;
  if (c->pool != NULL) {
    rec->pool = &((BufferPoolObject*)c->pool)->pool;
    rec->len = rec->pool->size;
  }
  if (c->flags & FIOCP_OPF_MULTISHOT) {
    /* The record's own reference; each child the backend makes takes
     * one more. c stays alive until the last is finished (its children
     * read its key and context). */
    rec->refs = 1;
    Py_INCREF(c);
  }
  rec->state = FIOCP_ST_INFLIGHT;
  c->rec = rec;
  c->port = self;
  c->handle = h;
  Py_INCREF(c); /* the port's reference, given back by get() */
  self->pending++;
  return rec;
}

/* Around a backend call that makes a system call (submit, post) with the
 * port lock held before and after: on free-threaded builds the lock is let
 * go meanwhile, with the caller counted in inside so that a close() cannot
 * destroy the backend under it (threads submitting at once must not queue
 * behind each other's system calls). After call_end() the caller finishes
 * its bookkeeping, then calls port_maybe_destroy() (on GIL builds a test
 * that finds nothing to do). GIL builds: nothing (the GIL keeps close()
 * out). */
static inline void call_begin(CompletionPortObject* self) {
#ifdef Py_GIL_DISABLED
  self->inside++;
  FB_UNLOCK(self);
#else
  (void)self;
#endif
}

static inline void call_end(CompletionPortObject* self) {
#ifdef Py_GIL_DISABLED
  FB_LOCK(self);
  self->inside--;
#else
  (void)self;
#endif
}

/* After the backend refused rec at once (code rc < 0: no completion will
 * come): takes it back and raises. The caller holds a reference to c.
 * Port lock held. */
static void refused(CompletionPortObject* self, CompletionObject* c,
                    fiocp_op_t* rec, int rc) {
  take_back(self, c, rec);
  Py_DECREF(c); /* the port's; the caller's keeps c alive */
  fb_set_code_error(rc);
}

/* prepare_op(), then submits the record with the port lock still held: for
 * resubmit()'s batches, which defer (io_uring queues an SQE, no system
 * call). Returns 0, or -1 with an exception (nothing submitted; c's buffer
 * still pinned). Port lock held. */
static int start_op(CompletionPortObject* self, CompletionObject* c,
                    fiocp_handle_t h, int64_t offset, int needs_addr,
                    const struct sockaddr_storage* ss, fiocp_socklen_t sslen,
                    int defer) {
  fiocp_op_t* rec = prepare_op(self, c, h, offset, needs_addr, ss, sslen);
  int rc;
  if (rec == NULL) return -1;
  rc = self->backend->submit(self->port, rec, defer);
  if (rc < 0) {
    refused(self, c, rec, rc);
    return -1;
  }
  return 0;
}

/* What a submission may carry besides one buffer and an address: the
 * per-operation timeout and the arguments of the issue-14 operations. The
 * seed's operations without a timeout pass none (NULL). */
typedef struct {
  int64_t timeout_ns;   /* 0: none */
  uint32_t len;         /* rec->len when there is no buffer: poll's events,
                           sendfile's count, fsync's datasync */
  uint8_t ext;          /* the record needs its extension */
  uint8_t no_key;       /* not a registered handle: the key is None */
  fiocp_handle_t src;   /* sendfile: the file */
  int msgflags;         /* sendmsg/recvmsg */
  fb_msgbufs_t* msg;    /* sendmsg/recvmsg: owned by submit_op() */
  PyObject* keep;       /* kept as Completion.buffer (borrowed) */
  BufferPoolObject* pool; /* a pooled receive's pool (borrowed) */
  uint8_t flags;        /* FIOCP_OPF_POOLED / MULTISHOT / ZEROCOPY */
  uint32_t accept_info; /* CompletionObject.accept_info */
} op_extra_t;

/* Raises NotImplementedError if the port's backend cannot do kind (or
 * per-operation timeouts, when asked for one). Returns 0 or -1. */
static int check_supported(CompletionPortObject* self, uint8_t kind,
                           int64_t timeout_ns) {
  const uint8_t* sup = self->backend->support;
  if (sup == NULL) return 0; /* the backend's submit() decides */
  if (sup[kind] == FIOCP_SUP_NO) {
    PyErr_Format(PyExc_NotImplementedError,
                 "%U is not supported by the %s backend", fb_kind_names[kind],
                 self->backend->name);
    return -1;
  }
  if (timeout_ns != 0 && sup[FIOCP_SUPPORT_TIMEOUT] == FIOCP_SUP_NO) {
    PyErr_Format(PyExc_NotImplementedError,
                 "the %s backend does not support per-operation timeouts",
                 self->backend->name);
    return -1;
  }
  return 0;
}

/* Validates, pins the buffer, fills a record and submits it. Everything
 * that can fail because of the arguments fails before anything is
 * submitted. ex may be NULL; its msg is ours from the call on. GIL. */
static PyObject* submit_op(CompletionPortObject* self, uint8_t kind,
                           PyObject* fileobj, PyObject* bufarg, int bufmode,
                           int64_t offset, PyObject* address,
                           PyObject* context, op_extra_t* ex) {
  fiocp_handle_t h;
  PyObject* key;
  CompletionObject* c;
  struct sockaddr_storage ss;
  fiocp_socklen_t sslen = 0;
  fiocp_op_t* rec;
  int needs_addr, defer, rc;
  /* Python code may run in the steps that prepare the call (fileno(), a
   * socket's family, __fspath__, a buffer exporter, a finalizer run by the
   * GC when the Completion is allocated, other threads while the resolver
   * runs without the GIL), and that code may close the port or unregister
   * the handle. So the port is checked and the key looked up only once all
   * of them are done; nothing after that runs Python code. */
  fb_msgbufs_t* msg = ex != NULL ? ex->msg : NULL;
  if (fb_port_check_open(self) < 0 ||
      check_supported(self, kind, ex != NULL ? ex->timeout_ns : 0) < 0)
    goto fail_early;
  if (fileobj == NULL)
    h = (fiocp_handle_t)-1; /* timer: no handle */
  else if (fb_get_handle(fileobj, &h) < 0)
    goto fail_early;
  needs_addr = kind == FIOCP_OP_RECVFROM || kind == FIOCP_OP_SENDTO ||
               kind == FIOCP_OP_ACCEPT || kind == FIOCP_OP_CONNECT ||
               (ex != NULL && (ex->ext || ex->timeout_ns != 0));
  if (address != NULL) {
    int family = fb_get_family(fileobj, h);
    if (family < 0) goto fail_early;
    if (fb_parse_sockaddr(PyUnicode_AsUTF8(fb_kind_names[kind]), address, family,
                          &ss, &sslen) < 0)
      goto fail_early;
  }
  c = fb_Completion_create(kind, Py_None, context);
  if (c == NULL) goto fail_early;
  c->msg = msg; /* freed with c from here on */
  msg = NULL;
  if (ex != NULL && ex->keep != NULL) {
    Py_SETREF(c->buffer, Py_NewRef(ex->keep));
    fb_track_if_needed(c, ex->keep);
  }
  if (ex != NULL) {
    c->flags = ex->flags;
    c->accept_info = ex->accept_info;
    if (ex->pool != NULL) {
      c->pool = Py_NewRef((PyObject*)ex->pool);
      Py_SETREF(c->buffer, Py_NewRef((PyObject*)ex->pool));
    }
  }
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
    fb_track_if_needed(c, obj);
    if (PyObject_GetBuffer(obj, &c->view,
                           bufmode == BUF_READ ? PyBUF_WRITABLE : PyBUF_SIMPLE) <
        0) {
      if (bufmode == BUF_READ && PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s needs a writable, contiguous buffer (bytearray, "
                     "memoryview, array, mmap), not %.100s",
                     PyUnicode_AsUTF8(fb_kind_names[kind]), Py_TYPE(obj)->tp_name);
      }
      goto error;
    }
    c->pinned = 1;
  }
  FB_LOCK(self);
  if (fb_port_check_open(self) < 0) {
    FB_UNLOCK(self);
    goto error;
  }
  if (ex == NULL || !ex->no_key) {
    if ((key = lookup_key(self, h)) == NULL) {
      FB_UNLOCK(self);
      goto error;
    }
    Py_SETREF(c->key, key); /* was None */
    fb_track_if_needed(c, key);
  }
  if (c->pool != NULL &&
      fb_port_use_pool(self, (BufferPoolObject*)c->pool) < 0) {
    FB_UNLOCK(self);
    goto error;
  }
  rec = prepare_op(self, c, h, offset, needs_addr, address != NULL ? &ss : NULL,
                   sslen);
  if (rec == NULL) {
    FB_UNLOCK(self);
    goto error;
  }
  if (ex != NULL) {
    if (!c->pinned) rec->len = ex->len;
    rec->timeout_ns = ex->timeout_ns;
    if (rec->addr != NULL) {
      fiocp_addr_t* a = rec->addr;
      a->src = ex->src;
      a->msgflags = ex->msgflags;
      if (c->msg != NULL) {
        a->iovs = c->msg->iovs;
        a->niov = (uint32_t)c->msg->nviews;
        a->control = c->msg->control;
        a->controllen = (uint32_t)c->msg->controllen;
      }
      if (kind == FIOCP_OP_SENDMSG && address == NULL) a->sslen = 0;
    }
  }
  /* The system call that submits (io_uring_enter; the I/O itself on
   * epoll) runs outside the lock on 3.13t. A close() that comes meanwhile
   * makes the backend refuse it (port closed). */
  defer = fb_in_batch(self);
  call_begin(self);
  rc = self->backend->submit(self->port, rec, defer);
  call_end(self);
  if (rc < 0) refused(self, c, rec, rc);
  port_maybe_destroy(self);
  FB_UNLOCK(self);
  if (rc < 0) goto error;
  return (PyObject*)c;
error:
  if (c->pinned) {
    PyBuffer_Release(&c->view);
    c->pinned = 0;
  }
  Py_DECREF(c); /* and its msg */
  return NULL;
fail_early:
  fb_msgbufs_free(msg);
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
  if (nkw > 0 && FB_LOAD_PTR(&interned[nnames - 1]) == NULL) {
    /* Keyword names in calls are interned: compare pointers first. Two
     * threads may fill the table at once: they store the same (immortal)
     * strings, and a name not stored yet is compared by value below. */
    for (j = 0; j < nnames; j++) {
      PyObject* name = PyUnicode_InternFromString(names[j]);
      if (name == NULL) return -1;
      FB_STORE_PTR(&interned[j], name);
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
      if (kw == FB_LOAD_PTR(&interned[j])) break;
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

/* Seconds (an int or a float, >= 0; None: none) as nanoseconds: 0 for
 * None, at least 1 otherwise (0 is "no timeout" in the record). what names
 * the argument in errors. Returns 0 or -1 with an exception. */
static int parse_seconds_ns(const char* what, PyObject* obj, int64_t* ns) {
  double t;
  *ns = 0;
  if (obj == NULL || obj == Py_None) return 0;
  if (!PyLong_Check(obj) && !PyFloat_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be a number of seconds or None, not %.100s",
                 what, Py_TYPE(obj)->tp_name);
    return -1;
  }
  t = PyFloat_AsDouble(obj);
  if (t == -1.0 && PyErr_Occurred()) return -1;
  if (isnan(t) || t < 0) {
    PyErr_Format(PyExc_ValueError, "%s must be >= 0 or None", what);
    return -1;
  }
  /* About 146 years: far enough to mean "never" without overflowing the
   * kernels' timespecs and FILETIMEs. */
  *ns = t >= 4.6e9 ? (int64_t)4.6e18 : (int64_t)(t * 1e9);
  if (*ns == 0) *ns = 1;
  return 0;
}

/* The op_extra_t of a seed operation: NULL (the fast path) unless a
 * timeout was given. Returns 0 or -1 with an exception. */
static int timeout_extra(PyObject* timeout, op_extra_t* ex, op_extra_t** out) {
  *out = NULL;
  if (timeout == NULL || timeout == Py_None) return 0;
  memset(ex, 0, sizeof(*ex));
  if (parse_seconds_ns("timeout", timeout, &ex->timeout_ns) < 0) return -1;
  *out = ex;
  return 0;
}

/* An int argument of fname within [lo, hi]. */
static int parse_int_arg(const char* fname, const char* what, PyObject* obj,
                         long long lo, long long hi, long long* out) {
  long long v;
  if (!PyLong_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s() %s must be an int, not %.100s", fname,
                 what, Py_TYPE(obj)->tp_name);
    return -1;
  }
  v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
    PyErr_Clear();
    v = hi == LLONG_MAX ? lo - 1 : hi + 1; /* out of range either way */
  }
  if (v < lo || v > hi) {
    PyErr_Format(PyExc_ValueError, "%s() %s must be between %lld and %lld",
                 fname, what, lo, hi);
    return -1;
  }
  *out = v;
  return 0;
}

static PyObject* CompletionPort_read(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"file", "buffer", "offset", "context",
                                      "timeout"};
  static PyObject* interned[5];
  PyObject* a[5];
  int64_t offset;
  op_extra_t ex, *exp;
  if (parse_args("read", args, nargs, kwnames, names, interned, 5, 2, a) < 0 ||
      parse_offset(a[2], &offset) < 0 || timeout_extra(a[4], &ex, &exp) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_READ, a[0], a[1], BUF_READ, offset, NULL,
                   OR_NONE(a[3]), exp);
}

static PyObject* CompletionPort_write(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"file", "data", "offset", "context",
                                      "timeout"};
  static PyObject* interned[5];
  PyObject* a[5];
  int64_t offset;
  op_extra_t ex, *exp;
  if (parse_args("write", args, nargs, kwnames, names, interned, 5, 2, a) < 0 ||
      parse_offset(a[2], &offset) < 0 || timeout_extra(a[4], &ex, &exp) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_WRITE, a[0], a[1], BUF_WRITE, offset, NULL,
                   OR_NONE(a[3]), exp);
}

/* A bool argument (absent: false). Returns 0/1, or -1 with an exception. */
static int parse_flag(PyObject* obj) {
  return obj == NULL ? 0 : PyObject_IsTrue(obj);
}

static PyObject* CompletionPort_recv(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "buffer", "context", "timeout",
                                      "multishot"};
  static PyObject* interned[5];
  PyObject* a[5];
  op_extra_t ex, *exp;
  int multishot;
  if (parse_args("recv", args, nargs, kwnames, names, interned, 5, 2, a) < 0 ||
      timeout_extra(a[3], &ex, &exp) < 0 || (multishot = parse_flag(a[4])) < 0)
    return NULL;
  if (Py_IS_TYPE(a[1], &fb_BufferPoolType)) {
    /* A pooled receive: the buffer is taken from the pool only once data
     * is there. */
    if (exp == NULL) memset(&ex, 0, sizeof(ex));
    if (multishot && ex.timeout_ns != 0) {
      PyErr_SetString(PyExc_ValueError,
                      "recv(multishot=True) takes no timeout: cancel() ends it");
      return NULL;
    }
    ex.pool = (BufferPoolObject*)a[1];
    ex.len = ex.pool->pool.size;
    ex.flags = (uint8_t)(FIOCP_OPF_POOLED | (multishot ? FIOCP_OPF_MULTISHOT : 0));
    return submit_op(self, FIOCP_OP_RECV, a[0], NULL, BUF_NONE, 0, NULL,
                     OR_NONE(a[2]), &ex);
  }
  if (multishot) {
    PyErr_SetString(PyExc_ValueError,
                    "recv(multishot=True) needs a BufferPool as its buffer: "
                    "each result takes a buffer of the pool");
    return NULL;
  }
  return submit_op(self, FIOCP_OP_RECV, a[0], a[1], BUF_READ, 0, NULL,
                   OR_NONE(a[2]), exp);
}

static PyObject* CompletionPort_send(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "data", "context", "timeout",
                                      "zerocopy"};
  static PyObject* interned[5];
  PyObject* a[5];
  op_extra_t ex, *exp;
  int zerocopy;
  if (parse_args("send", args, nargs, kwnames, names, interned, 5, 2, a) < 0 ||
      timeout_extra(a[3], &ex, &exp) < 0 || (zerocopy = parse_flag(a[4])) < 0)
    return NULL;
  if (zerocopy) {
    if (exp == NULL) memset(&ex, 0, sizeof(ex));
    ex.flags = FIOCP_OPF_ZEROCOPY;
    exp = &ex;
  }
  return submit_op(self, FIOCP_OP_SEND, a[0], a[1], BUF_WRITE, 0, NULL,
                   OR_NONE(a[2]), exp);
}

/* send(sock, data, context): the loop's C write path
 * (csrc/loop/transport.c) submits with no argument parsing. */
PyObject* fb_port_send(CompletionPortObject* self, PyObject* sock, PyObject* data,
                       PyObject* context) {
  return submit_op(self, FIOCP_OP_SEND, sock, data, BUF_WRITE, 0, NULL, context, NULL);
}

static PyObject* CompletionPort_recvfrom(CompletionPortObject* self,
                                         FASTARGS) {
  static const char* const names[] = {"sock", "buffer", "context", "timeout"};
  static PyObject* interned[4];
  PyObject* a[4];
  op_extra_t ex, *exp;
  if (parse_args("recvfrom", args, nargs, kwnames, names, interned, 4, 2, a) < 0 ||
      timeout_extra(a[3], &ex, &exp) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_RECVFROM, a[0], a[1], BUF_READ, 0, NULL,
                   OR_NONE(a[2]), exp);
}

static PyObject* CompletionPort_sendto(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "data", "address", "context",
                                      "timeout"};
  static PyObject* interned[5];
  PyObject* a[5];
  op_extra_t ex, *exp;
  if (parse_args("sendto", args, nargs, kwnames, names, interned, 5, 3, a) < 0 ||
      timeout_extra(a[4], &ex, &exp) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_SENDTO, a[0], a[1], BUF_WRITE, 0, a[2],
                   OR_NONE(a[3]), exp);
}

/* A listening socket object's family, type and proto, packed as
 * CompletionObject.accept_info; 0 when obj is not a socket object (or
 * they do not fit). Never fails. */
static uint32_t listener_info(PyObject* obj) {
  static const char* const names[] = {"family", "type", "proto"};
  long v[3];
  int i, r = PyObject_IsInstance(obj, fb_socket_type);
  if (r <= 0) {
    PyErr_Clear();
    return 0;
  }
  for (i = 0; i < 3; i++) {
    PyObject* o = PyObject_GetAttrString(obj, names[i]);
    v[i] = o != NULL ? PyLong_AsLong(o) : -1;
    Py_XDECREF(o);
    if (v[i] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return 0;
    }
  }
  if (v[0] <= 0 || v[0] > 0xffff || v[1] <= 0 || v[1] > 0xff || v[2] < 0 ||
      v[2] > 0xff)
    return 0;
  return (uint32_t)v[0] | ((uint32_t)v[1] << 16) | ((uint32_t)v[2] << 24);
}

static PyObject* CompletionPort_accept(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "context", "timeout",
                                      "multishot"};
  static PyObject* interned[4];
  PyObject* a[4];
  op_extra_t ex, *exp;
  int multishot;
  if (parse_args("accept", args, nargs, kwnames, names, interned, 4, 1, a) < 0 ||
      timeout_extra(a[2], &ex, &exp) < 0 || (multishot = parse_flag(a[3])) < 0)
    return NULL;
  if (multishot && exp != NULL) {
    PyErr_SetString(PyExc_ValueError,
                    "accept(multishot=True) takes no timeout: cancel() ends it");
    return NULL;
  }
  if (exp == NULL) memset(&ex, 0, sizeof(ex));
  if (multishot) ex.flags = FIOCP_OPF_MULTISHOT;
  ex.accept_info = listener_info(a[0]);
  return submit_op(self, FIOCP_OP_ACCEPT, a[0], NULL, BUF_NONE, 0, NULL,
                   OR_NONE(a[1]), &ex);
}

static PyObject* CompletionPort_connect(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "address", "context", "timeout"};
  static PyObject* interned[4];
  PyObject* a[4];
  op_extra_t ex, *exp;
  if (parse_args("connect", args, nargs, kwnames, names, interned, 4, 2, a) < 0 ||
      timeout_extra(a[3], &ex, &exp) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_CONNECT, a[0], NULL, BUF_NONE, 0, a[1],
                   OR_NONE(a[2]), exp);
}

static PyObject* CompletionPort_poll(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"fileobj", "events", "context", "timeout"};
  static PyObject* interned[4];
  PyObject* a[4];
  op_extra_t ex;
  long long events;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("poll", args, nargs, kwnames, names, interned, 4, 2, a) < 0 ||
      parse_int_arg("poll", "events", a[1], 0, 0x7fffffff, &events) < 0 ||
      parse_seconds_ns("timeout", a[3], &ex.timeout_ns) < 0)
    return NULL;
  if (events & ~(long long)(FIOCP_POLLIN | FIOCP_POLLPRI | FIOCP_POLLOUT |
                            FIOCP_POLLERR | FIOCP_POLLHUP)) {
    PyErr_SetString(PyExc_ValueError,
                    "poll() events must combine POLLIN, POLLPRI, POLLOUT, "
                    "POLLERR and POLLHUP");
    return NULL;
  }
  ex.len = (uint32_t)events;
  return submit_op(self, FIOCP_OP_POLL, a[0], NULL, BUF_NONE, 0, NULL,
                   OR_NONE(a[2]), &ex);
}

/* sendmsg's and recvmsg's submission once ex->msg holds the pinned
 * buffers of seq (whose reference this takes). */
static PyObject* submit_msg(CompletionPortObject* self, uint8_t kind,
                            PyObject* sock, PyObject* seq, op_extra_t* ex,
                            long long flags, PyObject* address,
                            PyObject* context) {
  PyObject* r;
  ex->ext = 1;
  ex->msgflags = (int)flags;
  ex->keep = seq;
  r = submit_op(self, kind, sock, NULL, BUF_NONE, 0, address, context, ex);
  Py_DECREF(seq);
  return r;
}

static PyObject* CompletionPort_sendmsg(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "buffers", "ancdata", "flags",
                                      "address", "context", "timeout"};
  static PyObject* interned[7];
  PyObject *a[7], *seq = NULL;
  op_extra_t ex;
  long long flags = 0;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("sendmsg", args, nargs, kwnames, names, interned, 7, 2, a) < 0 ||
      (a[3] != NULL &&
       parse_int_arg("sendmsg", "flags", a[3], INT_MIN, INT_MAX, &flags) < 0) ||
      parse_seconds_ns("timeout", a[6], &ex.timeout_ns) < 0)
    return NULL;
  ex.msg = fb_msgbufs_pin("sendmsg", a[1], 0, &seq);
  if (ex.msg == NULL) return NULL;
  if (a[2] != NULL && fb_msgbufs_pack_ancdata(ex.msg, a[2]) < 0) {
    fb_msgbufs_free(ex.msg);
    Py_DECREF(seq);
    return NULL;
  }
  return submit_msg(self, FIOCP_OP_SENDMSG, a[0], seq, &ex, flags,
                    a[4] == Py_None ? NULL : a[4], OR_NONE(a[5]));
}

static PyObject* CompletionPort_recvmsg(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "buffers", "ancbufsize", "flags",
                                      "context", "timeout"};
  static PyObject* interned[6];
  PyObject *a[6], *seq = NULL;
  op_extra_t ex;
  long long flags = 0, ancbufsize = 0;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("recvmsg", args, nargs, kwnames, names, interned, 6, 2, a) < 0 ||
      (a[2] != NULL && parse_int_arg("recvmsg", "ancbufsize", a[2], 0, LLONG_MAX,
                                     &ancbufsize) < 0) ||
      (a[3] != NULL &&
       parse_int_arg("recvmsg", "flags", a[3], INT_MIN, INT_MAX, &flags) < 0) ||
      parse_seconds_ns("timeout", a[5], &ex.timeout_ns) < 0)
    return NULL;
  ex.msg = fb_msgbufs_pin("recvmsg", a[1], 1, &seq);
  if (ex.msg == NULL) return NULL;
  if (fb_msgbufs_alloc_control(ex.msg, ancbufsize > PY_SSIZE_T_MAX
                                           ? PY_SSIZE_T_MAX
                                           : (Py_ssize_t)ancbufsize) < 0) {
    fb_msgbufs_free(ex.msg);
    Py_DECREF(seq);
    return NULL;
  }
  return submit_msg(self, FIOCP_OP_RECVMSG, a[0], seq, &ex, flags, NULL,
                    OR_NONE(a[4]));
}

static PyObject* CompletionPort_sendfile(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"sock", "file", "offset", "count",
                                      "context", "timeout"};
  static PyObject* interned[6];
  PyObject* a[6];
  op_extra_t ex;
  long long offset, count;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("sendfile", args, nargs, kwnames, names, interned, 6, 4, a) < 0 ||
      parse_int_arg("sendfile", "offset", a[2], 0, INT64_MAX / 2, &offset) < 0 ||
      parse_int_arg("sendfile", "count", a[3], 1, MAX_TRANSFER, &count) < 0 ||
      parse_seconds_ns("timeout", a[5], &ex.timeout_ns) < 0 ||
      fb_get_handle(a[1], &ex.src) < 0)
    return NULL;
  ex.ext = 1;
  ex.len = (uint32_t)count;
  ex.keep = a[1];
  return submit_op(self, FIOCP_OP_SENDFILE, a[0], NULL, BUF_NONE,
                   (int64_t)offset, NULL, OR_NONE(a[4]), &ex);
}

static PyObject* CompletionPort_wait_process(CompletionPortObject* self,
                                             FASTARGS) {
  static const char* const names[] = {"process", "context", "timeout"};
  static PyObject* interned[3];
  PyObject *a[3], *id, *r;
  op_extra_t ex;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("wait_process", args, nargs, kwnames, names, interned, 3, 1,
                 a) < 0 ||
      parse_seconds_ns("timeout", a[2], &ex.timeout_ns) < 0)
    return NULL;
  if (PyLong_Check(a[0])) {
    id = Py_NewRef(a[0]);
  } else {
    /* A subprocess.Popen: its pid, or on Windows its process handle. */
#ifdef _WIN32
    id = PyObject_GetAttrString(a[0], "_handle");
#else
    id = PyObject_GetAttrString(a[0], "pid");
#endif
    if (id == NULL || !PyLong_Check(id)) {
      Py_XDECREF(id);
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError,
                   "wait_process() takes a subprocess.Popen or %s, not %.100s",
#ifdef _WIN32
                   "a process handle (int)",
#else
                   "a pid (int)",
#endif
                   Py_TYPE(a[0])->tp_name);
      return NULL;
    }
  }
#ifndef _WIN32
  {
    long long pid;
    if (parse_int_arg("wait_process", "pid", id, 1, INT_MAX, &pid) < 0) {
      Py_DECREF(id);
      return NULL;
    }
  }
#endif
  ex.ext = 1;
  ex.no_key = 1;
  ex.keep = a[0];
  r = submit_op(self, FIOCP_OP_WAIT_PROCESS, id, NULL, BUF_NONE, 0, NULL,
                OR_NONE(a[1]), &ex);
  Py_DECREF(id);
  return r;
}

static PyObject* CompletionPort_timer(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"delay", "context"};
  static PyObject* interned[2];
  PyObject* a[2];
  op_extra_t ex;
  int64_t ns;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("timer", args, nargs, kwnames, names, interned, 2, 1, a) < 0)
    return NULL;
  if (a[0] == Py_None) {
    PyErr_SetString(PyExc_TypeError, "timer() delay must be a number of seconds");
    return NULL;
  }
  if (parse_seconds_ns("delay", a[0], &ns) < 0) return NULL;
  ex.ext = 1;
  ex.no_key = 1;
  return submit_op(self, FIOCP_OP_TIMER, NULL, NULL, BUF_NONE, ns, NULL,
                   OR_NONE(a[1]), &ex);
}

static PyObject* CompletionPort_fsync(CompletionPortObject* self, FASTARGS) {
  static const char* const names[] = {"file", "datasync", "context", "timeout"};
  static PyObject* interned[4];
  PyObject* a[4];
  op_extra_t ex;
  int datasync = 0;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("fsync", args, nargs, kwnames, names, interned, 4, 1, a) < 0 ||
      parse_seconds_ns("timeout", a[3], &ex.timeout_ns) < 0)
    return NULL;
  if (a[1] != NULL && (datasync = PyObject_IsTrue(a[1])) < 0) return NULL;
  ex.len = (uint32_t)datasync;
  return submit_op(self, FIOCP_OP_FSYNC, a[0], NULL, BUF_NONE, 0, NULL,
                   OR_NONE(a[2]), &ex);
}

static PyObject* CompletionPort_connect_pipe(CompletionPortObject* self,
                                             FASTARGS) {
  static const char* const names[] = {"pipe", "context", "timeout"};
  static PyObject* interned[3];
  PyObject* a[3];
  op_extra_t ex;
  memset(&ex, 0, sizeof(ex));
  if (parse_args("connect_pipe", args, nargs, kwnames, names, interned, 3, 1,
                 a) < 0 ||
      parse_seconds_ns("timeout", a[2], &ex.timeout_ns) < 0)
    return NULL;
  return submit_op(self, FIOCP_OP_CONNECT_PIPE, a[0], NULL, BUF_NONE, 0, NULL,
                   OR_NONE(a[1]), &ex);
}

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
    fb_done_store(c, 1);
  }
}

/* Up to this many completions, resubmit() keeps its arrays on the stack:
 * the loop resubmits one receive per message. */
#define RESUBMIT_ON_STACK 4

/* resubmit() of items[0:n] (offsets: a tuple of n, or NULL), what the
 * method does once its arguments are a tuple. Also the loop's C read path
 * (csrc/loop/transport.c), which resubmits one receive per message. */
PyObject* fb_port_resubmit(CompletionPortObject* self, PyObject* const* items_in,
                           Py_ssize_t n, PyObject* offseq) {
  PyObject* result = NULL;
  PyObject **items = (PyObject**)items_in, **keys = NULL, **olds = NULL;
  PyObject *keys_here[RESUBMIT_ON_STACK], *olds_here[4 * RESUBMIT_ON_STACK];
  int64_t *offsets = NULL, offsets_here[RESUBMIT_ON_STACK];
  Py_ssize_t i, checked = 0, nolds = 0, nkeys = 0, failed_at = -1;
  int in_batch, on_stack = n <= RESUBMIT_ON_STACK;
  if (fb_port_check_open(self) < 0) goto done;
  if (on_stack) {
    offsets = offsets_here;
    keys = keys_here;
    olds = olds_here;
  } else {
    offsets = PyMem_Malloc((size_t)n * sizeof(*offsets));
    keys = PyMem_Malloc((size_t)n * sizeof(*keys));
    olds = PyMem_Malloc((size_t)n * 4 * sizeof(*olds));
  }
  if (offsets == NULL || keys == NULL || olds == NULL) {
    PyErr_NoMemory();
    goto done;
  }
  /* 1. Check every completion and offset. No Python code runs here but a
   * repr() for an error message, after which the call only unwinds. */
  for (checked = 0; checked < n; checked++) {
    CompletionObject* c = (CompletionObject*)items[checked];
    uint8_t k;
    if (!Py_IS_TYPE(items[checked], &fb_CompletionType)) {
      PyErr_Format(PyExc_TypeError,
                   "completions must hold Completion objects, not %.100s",
                   Py_TYPE(items[checked])->tp_name);
      goto undo_checked;
    }
    if (!fb_done_take(c, RESUBMITTING)) {
      if (fb_done_load(c) == RESUBMITTING)
        PyErr_SetString(PyExc_ValueError,
                        "the same Completion appears twice in completions (or "
                        "another resubmit() call is starting it)");
      else
        PyErr_Format(fb_InvalidStateError,
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
                   fb_kind_names[k]);
      goto undo_checked_taken;
    }
    if ((c->flags & FIOCP_OPF_MULTISHOT) || c->more) {
      PyErr_SetString(PyExc_ValueError,
                      "resubmit() takes no multishot completion: submit it "
                      "again with recv() or accept()");
      goto undo_checked_taken;
    }
    if (k != FIOCP_OP_ACCEPT && c->pool == NULL &&
        (c->buffer == NULL || c->buffer == Py_None)) {
      PyErr_SetString(PyExc_ValueError, "the completion has no buffer left");
      goto undo_checked_taken;
    }
    offsets[checked] = 0;
    if (k == FIOCP_OP_READ || k == FIOCP_OP_WRITE) {
      if (offseq == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "offsets is required to resubmit reads and writes");
        goto undo_checked_taken;
      }
      if (parse_offset(PyTuple_GET_ITEM(offseq, checked), &offsets[checked]) <
          0)
        goto undo_checked_taken;
    } else if (offseq != NULL && PyTuple_GET_ITEM(offseq, checked) != Py_None) {
      PyErr_Format(PyExc_TypeError,
                   "offsets[%zd] must be None for a %U completion", checked,
                   fb_kind_names[k]);
      goto undo_checked_taken;
    }
  }
  /* 2. Pin the buffers: an exporter may run Python code. */
  for (i = 0; i < n; i++) {
    CompletionObject* c = (CompletionObject*)items[i];
    int mode = c->kind == FIOCP_OP_WRITE || c->kind == FIOCP_OP_SEND
                   ? PyBUF_SIMPLE
                   : PyBUF_WRITABLE;
    if (c->kind == FIOCP_OP_ACCEPT || c->pool != NULL) continue;
    if (PyObject_GetBuffer(c->buffer, &c->view, mode) < 0) goto undo_all;
    c->pinned = 1;
  }
  /* 3. The port and the registrations as they are now; from here on no
   * Python code runs until every operation is submitted. */
  FB_LOCK(self);
  if (fb_port_check_open(self) < 0) goto undo_all_locked;
  for (i = 0; i < n; i++) {
    fiocp_handle_t h = ((CompletionObject*)items[i])->handle;
    /* A batch of reads is mostly on one handle: one lookup for a run. */
    if (i > 0 && h == ((CompletionObject*)items[i - 1])->handle) {
      keys[i] = keys[i - 1];
      Py_INCREF(keys[i]);
    } else {
      keys[i] = lookup_key(self, h);
      if (keys[i] == NULL) goto undo_all_locked;
    }
    nkeys++;
    if (((CompletionObject*)items[i])->pool != NULL &&
        fb_port_use_pool(self,
                         (BufferPoolObject*)((CompletionObject*)items[i])->pool) < 0)
      goto undo_all_locked;
  }
  /* 4. Submit. The references the completions drop are released at the
   * end: a finalizer must not run in the middle. */
  for (i = 0; i < n; i++) {
    CompletionObject* c = (CompletionObject*)items[i];
    int needs_addr = c->kind == FIOCP_OP_RECVFROM || c->kind == FIOCP_OP_ACCEPT;
    if (start_op(self, c, c->handle, offsets[i], needs_addr, NULL, 0, 1) < 0) {
      PyObject *type, *value, *tb;
      failed_at = i;
      PyErr_Fetch(&type, &value, &tb);
      /* The ones already queued go to the kernel all the same. */
      if (!fb_in_batch(self)) (void)self->backend->flush(self->port);
      PyErr_Restore(type, value, tb);
      break;
    }
    olds[nolds++] = c->key;
    c->key = keys[i]; /* the reference moves */
    keys[i] = NULL;
    fb_track_if_needed(c, c->key);
    olds[nolds++] = c->error;
    Py_INCREF(Py_None);
    c->error = Py_None;
    olds[nolds++] = c->extra; /* recvfrom's address, accept's socket */
    c->extra = NULL;
    if (c->pool != NULL && c->buffer != c->pool) {
      /* A pooled receive's last buffer stays with whoever holds it; the
       * receive takes the pool again. */
      olds[nolds++] = c->buffer;
      c->buffer = Py_NewRef(c->pool);
    }
    c->nbytes = 0;
    Py_XSETREF(c->nbytes_obj, PyLong_FromLong(0)); /* small int: no failure */
    c->cancelled = 0;
    fb_done_store(c, 0);
  }
  in_batch = fb_in_batch(self);
  FB_UNLOCK(self);
  if (failed_at >= 0) {
    resubmit_undo(items, failed_at, n); /* a buffer release may run Python */
    goto done;
  }
  if (!in_batch)
    result = fb_CompletionPort_flush(self, NULL);
  else {
    Py_INCREF(Py_None);
    result = Py_None;
  }
  goto done;
undo_all_locked:
  FB_UNLOCK(self);
undo_all:
  resubmit_undo(items, 0, n);
  goto done;
undo_checked_taken:
  checked++; /* the item that failed after it was taken */
undo_checked:
  resubmit_undo(items, 0, checked);
done:
  for (i = 0; i < nkeys; i++) Py_XDECREF(keys[i]);
  for (i = 0; i < nolds; i++) Py_XDECREF(olds[i]);
  if (!on_stack) {
    PyMem_Free(olds);
    PyMem_Free(keys);
    PyMem_Free(offsets);
  }
  return result;
}


static PyObject* CompletionPort_resubmit(CompletionPortObject* self,
                                         FASTARGS) {
  static const char* const names[] = {"completions", "offsets"};
  static PyObject* interned[2];
  PyObject* a[2];
  PyObject *seq = NULL, *offseq = NULL, *result = NULL;
  PyObject** items;
  Py_ssize_t n;
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
  result = fb_port_resubmit(self, items, n, offseq);
done:
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
  if (fb_port_check_open(self) < 0) return NULL;
  if (nbytes < 0 || (uint64_t)nbytes > 0xffffffffu) {
    PyErr_SetString(PyExc_ValueError, "nbytes must be between 0 and 2**32-1");
    return NULL;
  }
  c = fb_Completion_create(FIOCP_OP_POST, key, ctx);
  if (c == NULL) return NULL;
  /* Allocating the Completion may run a finalizer that closes the port. */
  FB_LOCK(self);
  if (fb_port_check_open(self) < 0) {
    rc = -1;
  } else if ((rec = fiocp__op_alloc(self->port)) == NULL) {
    PyErr_NoMemory();
    rc = -1;
  } else {
    rec->kind = FIOCP_OP_POST;
    rec->res = (int64_t)nbytes;
    rec->user = (uintptr_t)c;
    rec->state = FIOCP_ST_INFLIGHT;
    c->rec = rec;
    c->port = self;
    /* The port takes the only reference: posts are fire and forget (get()
     * returns the object). */
    self->pending++;
    call_begin(self); /* the wake-up of a waiter happens unlocked */
    rc = self->backend->post(self->port, rec);
    call_end(self);
    if (rc < 0) {
      take_back(self, c, rec);
      fb_set_code_error(rc);
    }
    port_maybe_destroy(self);
  }
  FB_UNLOCK(self);
  if (rc < 0) {
    Py_DECREF(c); /* its finalizers run unlocked */
    return NULL;
  }
  Py_RETURN_NONE;
}

PyObject* fb_port_cancel_completion(CompletionPortObject* self,
                                    CompletionObject* c) {
  int rc = 0, raised = 0;
  FB_LOCK(self);
  if (c->rec == NULL || c->port != self || c->kind == FIOCP_OP_POST) rc = 0;
  else if (fb_port_check_open(self) < 0) raised = 1;
  else rc = self->backend->cancel(self->port, c->rec);
  FB_UNLOCK(self);
  if (raised) return NULL;
  if (rc < 0) return fb_set_code_error(rc);
  return PyBool_FromLong(rc);
}

static PyObject* CompletionPort_cancel(CompletionPortObject* self,
                                       PyObject* op) {
  if (!PyObject_TypeCheck(op, &fb_CompletionType)) {
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
  return fb_port_cancel_completion(self, (CompletionObject*)op);
}

PyObject* fb_CompletionPort_flush(CompletionPortObject* self,
                                  PyObject* Py_UNUSED(ignored)) {
  int rc;
  FB_LOCK(self);
  if (fb_port_check_open(self) < 0) {
    FB_UNLOCK(self);
    return NULL;
  }
  self->inside++;
  FB_UNLOCK(self);
  Py_BEGIN_ALLOW_THREADS
  rc = self->backend->flush(self->port);
  Py_END_ALLOW_THREADS
  FB_LOCK(self);
  self->inside--;
  port_maybe_destroy(self);
  FB_UNLOCK(self);
  if (rc < 0) return fb_set_code_error(rc);
  Py_RETURN_NONE;
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

/* Dequeues up to max completions into out. Returns the count (0 on
 * timeout), or -1 with an exception. The GIL is released only if there is
 * nothing ready. On return, successful or not, the caller counts as inside
 * the port until it calls port_leave() after finishing the records: close()
 * on another thread must not free the slabs those records live in. */
static int port_dequeue(CompletionPortObject* self, fiocp_op_t** out, int max,
                        int64_t timeout_ms) {
  int64_t deadline;
  int n, closed;
  FB_LOCK(self);
  self->inside++;
  n = fb_port_check_open(self);
  FB_UNLOCK(self);
  if (n < 0) return -1;
  if (self->emulate_slots) fb_slot_release(self);
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
    FB_LOCK(self);
    closed = self->closed;
    FB_UNLOCK(self);
    if (closed) {
      fb_set_closed_error();
      return -1;
    }
    if (deadline >= 0 && fiocp__remaining_ms(deadline) == 0) return 0;
  }
done:
  if (n < 0) {
    fb_set_code_error(n);
    return -1;
  }
  if (n > 0 && self->emulate_slots) fb_slot_hold(self);
  return n;
}

static void port_leave(CompletionPortObject* self) {
  FB_LOCK(self);
  self->inside--;
  port_maybe_destroy(self);
  FB_UNLOCK(self);
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
  if (n > 0) c = fb_finish_op(self, rec);
  port_leave(self);
  if (n < 0) return NULL;
  if (n == 0) Py_RETURN_NONE;
  if (c == NULL) return PyErr_NoMemory(); /* a multishot's result lost */
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
  if (list != NULL) {
    /* Fewer when a multishot's result could not be made (memory). */
    if (n > 0) Py_SET_SIZE(list, fb_finish_ops(self, out, n,
                                               &PyList_GET_ITEM(list, 0)));
  } else {
    /* The records are already dequeued: finish them all even if the list
     * could not be made, so nothing is lost or leaked. */
    for (i = 0; i < n; i++) Py_XDECREF(fb_finish_op(self, out[i]));
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
  if (n > 0) c = fb_finish_op(self, rec);
  port_leave(self);
  if (n < 0) {
    if (PyErr_ExceptionMatches(fb_PortClosedError)) PyErr_Clear();
    return NULL;
  }
  if (n > 0 && c == NULL) return PyErr_NoMemory();
  return (PyObject*)c; /* NULL (StopIteration) only if n == 0 */
}

static PyObject* CompletionPort_close(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  if (port_close_impl(self) < 0) return NULL;
  Py_RETURN_NONE;
}

static PyObject* CompletionPort_enter(CompletionPortObject* self,
                                      PyObject* Py_UNUSED(ignored)) {
  if (fb_port_check_open(self) < 0) return NULL;
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

static PyObject* CompletionPort_get_native(CompletionPortObject* self,
                                           void* closure) {
  unsigned f = 0;
  PyObject *set, *name;
  (void)closure;
  FB_LOCK(self);
  if (fb_port_owns_backend(self) && self->backend->native_flags != NULL)
    f = self->backend->native_flags(self->port);
  FB_UNLOCK(self);
  set = PySet_New(NULL);
  if (set == NULL) return NULL;
#define ADD(bit, s)                                                      \
  if (f & (bit)) {                                                       \
    name = PyUnicode_FromString(s);                                      \
    if (name == NULL || PySet_Add(set, name) < 0) {                      \
      Py_XDECREF(name);                                                  \
      Py_DECREF(set);                                                    \
      return NULL;                                                       \
    }                                                                    \
    Py_DECREF(name);                                                     \
  }
  ADD(FIOCP_OPF_POOLED, "pooled")
  ADD(FIOCP_OPF_MULTISHOT, "multishot")
  ADD(FIOCP_OPF_ZEROCOPY, "zerocopy")
#undef ADD
  Py_SETREF(set, PyFrozenSet_New(set));
  return set;
}

static PyGetSetDef CompletionPort_getset[] = {
    {"native", (getter)CompletionPort_get_native, NULL,
     "Which of issue 18's operations the kernel does itself on this port: "
     "a frozenset of 'pooled' (provided buffers), 'multishot' and "
     "'zerocopy' (io_uring). The others work everywhere, emulated by the "
     "port (zerocopy=True is then a plain send). Empty once closed.",
     NULL},
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
#define TIMEOUT_DOC                                                       \
  " timeout: seconds after which the port cancels the operation if it is " \
  "still pending; it then completes with TimeoutError (data that arrived " \
  "first always wins)."
    {"read", (PyCFunction)(void (*)(void))CompletionPort_read, FASTKW,
     "read($self, file, buffer, offset=0, context=None, timeout=None)\n--\n\n"
     "Read into buffer (a writable buffer, or an int size to allocate a "
     "bytearray) at offset (None: the current position, for pipes). Returns "
     "the pending Completion." TIMEOUT_DOC},
    {"write", (PyCFunction)(void (*)(void))CompletionPort_write, FASTKW,
     "write($self, file, data, offset=0, context=None, timeout=None)\n--\n\n"
     "Write data at offset (None: the current position). Returns the "
     "pending Completion." TIMEOUT_DOC},
    {"recv", (PyCFunction)(void (*)(void))CompletionPort_recv, FASTKW,
     "recv($self, sock, buffer, context=None, timeout=None, multishot=False)"
     "\n--\n\nReceive into buffer (or an int size). nbytes == 0 means the "
     "peer closed.\n\nWith a BufferPool as buffer, a pooled receive: a buffer "
     "is taken from the pool only when data is there, and the completion's "
     "buffer is a PooledBuffer to release(). multishot=True (pooled only): "
     "a completion per result (more=True) until the last one, which is this "
     "Completion (end of stream, an error, a cancel)." TIMEOUT_DOC},
    {"send", (PyCFunction)(void (*)(void))CompletionPort_send, FASTKW,
     "send($self, sock, data, context=None, timeout=None, zerocopy=False)"
     "\n--\n\nSend data; nbytes may be short. zerocopy=True: the kernel "
     "sends from data without copying it where it can (io_uring SEND_ZC; "
     "the completion comes once it no longer reads data), a plain send "
     "elsewhere." TIMEOUT_DOC},
    {"recvfrom", (PyCFunction)(void (*)(void))CompletionPort_recvfrom, FASTKW,
     "recvfrom($self, sock, buffer, context=None, timeout=None)\n--\n\nReceive a "
     "datagram; result() is (nbytes, address)." TIMEOUT_DOC},
    {"sendto", (PyCFunction)(void (*)(void))CompletionPort_sendto, FASTKW,
     "sendto($self, sock, data, address, context=None, timeout=None)\n--\n\n"
     "Send a datagram to address." TIMEOUT_DOC},
    {"accept", (PyCFunction)(void (*)(void))CompletionPort_accept, FASTKW,
     "accept($self, sock, context=None, timeout=None, multishot=False)\n--\n\n"
     "Accept a connection on a listening socket; result() is "
     "(socket.socket, address). multishot=True: a completion per "
     "connection (more=True) until cancel() or an error ends it with this "
     "Completion." TIMEOUT_DOC},
    {"connect", (PyCFunction)(void (*)(void))CompletionPort_connect, FASTKW,
     "connect($self, sock, address, context=None, timeout=None)\n--\n\nConnect a "
     "stream socket (TCP v4/v6, Unix)." TIMEOUT_DOC},
    {"poll", (PyCFunction)(void (*)(void))CompletionPort_poll, FASTKW,
     "poll($self, fileobj, events, context=None, timeout=None)\n--\n\nOne-shot "
     "readiness: completes when any of events (POLLIN, POLLPRI, POLLOUT) holds; "
     "POLLERR and POLLHUP are always reported. nbytes and result() are the "
     "events that fired." TIMEOUT_DOC},
    {"sendmsg", (PyCFunction)(void (*)(void))CompletionPort_sendmsg, FASTKW,
     "sendmsg($self, sock, buffers, ancdata=(), flags=0, address=None, "
     "context=None, timeout=None)\n--\n\nGathering send of a sequence of buffers, "
     "with ancillary data ((level, type, data) items, e.g. SCM_RIGHTS; "
     "not on Windows) as socket.sendmsg() takes them. nbytes may be short."
     TIMEOUT_DOC},
    {"recvmsg", (PyCFunction)(void (*)(void))CompletionPort_recvmsg, FASTKW,
     "recvmsg($self, sock, buffers, ancbufsize=0, flags=0, context=None, "
     "timeout=None)\n--\n\nScattering receive into a sequence of writable "
     "buffers; result() is (nbytes, ancdata, msg_flags, address), as "
     "socket.recvmsg_into() returns (ancillary data: not on Windows)."
     TIMEOUT_DOC},
    {"sendfile", (PyCFunction)(void (*)(void))CompletionPort_sendfile, FASTKW,
     "sendfile($self, sock, file, offset, count, context=None, timeout=None)\n"
     "--\n\nSend count bytes of file from offset to sock, copied by the kernel "
     "(splice or sendfile on Linux, TransmitFile on Windows). nbytes is what "
     "was sent: short at the end of the file." TIMEOUT_DOC},
    {"wait_process", (PyCFunction)(void (*)(void))CompletionPort_wait_process,
     FASTKW,
     "wait_process($self, process, context=None, timeout=None)\n--\n\nCompletes "
     "when a child process exits. process: a subprocess.Popen, or a pid "
     "(POSIX) / process handle (Windows). result() is the return code as "
     "Popen.returncode gives it (minus the signal number if a signal ended "
     "it). The child is not reaped: Popen.wait() or os.waitpid() then "
     "returns at once." TIMEOUT_DOC},
    {"timer", (PyCFunction)(void (*)(void))CompletionPort_timer, FASTKW,
     "timer($self, delay, context=None)\n--\n\nCompletes after delay seconds "
     "(result() is None). cancel() ends it early, as cancelled."},
    {"fsync", (PyCFunction)(void (*)(void))CompletionPort_fsync, FASTKW,
     "fsync($self, file, datasync=False, context=None, timeout=None)\n--\n\n"
     "Flush the file's data (and, unless datasync, its metadata) to storage."
     TIMEOUT_DOC},
    {"connect_pipe", (PyCFunction)(void (*)(void))CompletionPort_connect_pipe,
     FASTKW,
     "connect_pipe($self, pipe, context=None, timeout=None)\n--\n\nWindows: wait "
     "for a client to connect to a named pipe server handle (opened with "
     "FILE_FLAG_OVERLAPPED and registered). NotImplementedError elsewhere."
     TIMEOUT_DOC},
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
    {"flush", (PyCFunction)fb_CompletionPort_flush, METH_NOARGS,
     "flush($self)\n--\n\nSubmit operations deferred by batch() now."},
    {"batch", (PyCFunction)fb_CompletionPort_batch, METH_NOARGS,
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

PyTypeObject fb_CompletionPortType = {
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
