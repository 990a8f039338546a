/* binding.h: the internal header of the CPython binding (csrc/binding/),
 * the only code that includes Python.h.
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
 *
 * Files, one per concern:
 *   module.c        module init, module state, exceptions and error mapping,
 *                   backend_status()
 *   port.c          the CompletionPort type: lifetime, registration,
 *                   submission, resubmit, post, cancel, flush, dequeue
 *   thread_state.c  a port's per-thread state: batch() blocks and the
 *                   concurrency slots a thread holds
 *   completion.c    the Completion type, its free list, finishing an
 *                   operation into it
 *   pool.c          BufferPool and PooledBuffer: pooled receives' buffers
 *   message.c       sendmsg/recvmsg: the pinned buffer vector and the
 *                   ancillary data, packed and parsed
 *   sockaddr.c      Python addresses <-> sockaddr
 *   filehandle.c    the _FileHandle type, handle conversion, the Windows
 *                   file helpers
 * What one file uses from another is declared here, prefixed fb_ (fastiocp
 * binding); everything else is static to its file. GIL everywhere unless
 * said otherwise.
 *
 * Free-threaded CPython (3.13t, Py_GIL_DISABLED). The module declares that
 * it runs without the GIL; what the GIL made atomic, these make atomic:
 * - Each port has a mutex (FB_LOCK/FB_UNLOCK; nothing on GIL builds) for
 *   its bookkeeping: the record allocator and the records' states,
 *   `pending`, `inside`, `closed` and the destroy decision, the batch table,
 *   a registration's check-then-act, and the in-flight fields of its
 *   Completions (rec, port). It is never held while Python code can run
 *   (a fileno(), a buffer exporter, a repr, a finalizer: references to user
 *   objects are dropped after unlocking) nor while a thread waits: a
 *   backend call that may block runs with `inside` counted instead, which
 *   keeps the backend from being destroyed under it.
 * - A Completion's `done` changes by atomic compare-and-swap (resubmit()
 *   from two threads takes it once).
 * - Completion.cancel() follows a Completion's borrowed `port` only under
 *   fb_detach_mu, which a port's deallocation also takes to detach its
 *   Completions first: cancel() never reaches a freed port.
 * - The Completion free list and the last-nbytes cache, process-wide, are
 *   off; a FileHandle's handle is read and cleared atomically.
 * A Completion returned by get() belongs to the thread it was returned to:
 * other threads may cancel it, not read it while it is being finished.
 */
#ifndef FASTIOCP_BINDING_H
#define FASTIOCP_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fiocp.h"

/* What this header declares is internal to the extension: hidden from the
 * shared object's symbol table (only PyInit__fastiocp is exported), so
 * that on ELF the compiler calls and inlines these functions as directly
 * as the static functions they were while the binding was one file. PE
 * (Windows) exports nothing unless asked to. */
#if defined(__GNUC__) && !defined(_WIN32)
# pragma GCC visibility push(hidden)
#endif

/* ======================================================================
 * Module state (module.c)
 * ====================================================================== */

extern PyObject* fb_FastIOCPError;
extern PyObject* fb_BackendUnavailableError;
extern PyObject* fb_PortClosedError;
extern PyObject* fb_InvalidStateError;
extern PyObject* fb_socket_type;     /* socket.socket */
extern PyObject* fb_str_fileno;      /* "fileno", interned */
extern PyObject* fb_kind_names[FIOCP_OP__COUNT];

/* Bumped in the child after fork(). A port belongs to the process that
 * created it: its ring, epoll set and threads are the parent's, and a child
 * that used them (or closed them on exit) would cancel and steal the
 * parent's completions. */
extern volatile unsigned long fb_fork_generation;

/* Raises PortClosedError. */
void fb_set_closed_error(void);
/* Raises the exception for a negative fiocp code. Returns NULL. */
PyObject* fb_set_code_error(int64_t code);
/* The exception object (not raised) for a failed operation. */
PyObject* fb_make_code_error(int64_t code);
/* The exception being raised, taken: a new reference, normalized, its
 * traceback attached; NULL if none is set. */
PyObject* fb_take_exception(void);
/* Whether code is the one a cancelled operation completes with. */
int fb_is_cancel_code(int64_t code);

/* ======================================================================
 * The objects (completion.c, port.c)
 * ====================================================================== */

struct CompletionPortObject;

/* sendmsg/recvmsg: the buffers pinned for the kernel and the arrays the
 * record's extension points to. Owned by the Completion while in flight,
 * freed when it is finished (or if submission fails). */
typedef struct fb_msgbufs_s {
  Py_ssize_t nviews;  /* views[0..nviews) are exported */
  void* iovs;         /* struct iovec (POSIX) or WSABUF (Windows) [nviews] */
  char* control;      /* packed ancillary data, or room for it; or NULL */
  Py_ssize_t controllen;
  Py_buffer views[1]; /* allocated for as many as there are buffers */
} fb_msgbufs_t;

/* message.c. Pins every buffer of the sequence `buffers` (writable ones
 * for a receive) and points the I/O vector at them. Returns the new
 * msgbufs, with the sequence in *seq_out (a new reference: the list or
 * tuple the Completion keeps as its buffer), or NULL with an exception. */
fb_msgbufs_t* fb_msgbufs_pin(const char* fname, PyObject* buffers,
                             int writable, PyObject** seq_out);
/* Packs sendmsg's ancdata (an iterable of (level, type, data)) into
 * m->control as the kernel reads it. Returns 0 or -1 with an exception. */
int fb_msgbufs_pack_ancdata(fb_msgbufs_t* m, PyObject* ancdata);
/* Gives m a zeroed control buffer of size bytes for recvmsg. Returns 0 or
 * -1 with an exception. */
int fb_msgbufs_alloc_control(fb_msgbufs_t* m, Py_ssize_t size);
/* Releases m's views and frees it (NULL: nothing). */
void fb_msgbufs_free(fb_msgbufs_t* m);
/* recvmsg's ancillary data as socket.recvmsg() gives it: a list of
 * (level, type, data) from the control bytes the kernel filled. */
PyObject* fb_parse_ancdata(const char* control, size_t len);

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
  PyObject* op;       /* fb_kind_names[kind] */
  PyObject* nbytes_obj; /* nbytes as an int */
  PyObject* extra;    /* recvfrom: address; accept: (socket, address);
                         recvmsg: (ancdata, msg_flags, address);
                         wait_process: the return code */
  Py_ssize_t nbytes;
  fiocp_handle_t handle; /* the handle of its last submission (resubmit) */
  Py_buffer view;     /* exported while in flight */
  fb_msgbufs_t* msg;  /* sendmsg/recvmsg while in flight, else NULL */
  /* A pooled receive's BufferPool (a strong reference, kept for the
   * Completion's life: a multishot's children still name the pool after
   * its last result was finished), else NULL. */
  PyObject* pool;
  uint8_t kind;
  uint8_t pinned;
  uint8_t done;
  uint8_t cancelled;
  uint8_t flags;      /* FIOCP_OPF_POOLED / MULTISHOT / ZEROCOPY asked for */
  uint8_t more;       /* a multishot's result that is not its last */
  /* accept: the listening socket's family (bits 0-15), type (16-23) and
   * proto (24-31), so that an accepted socket object is made without
   * asking the kernel for them (three system calls, 2.4 µs here);
   * 0: unknown (a descriptor or a proto above 255: asked). */
  uint32_t accept_info;
} CompletionObject;

/* A BufferPool (pool.c). */
typedef struct BufferPoolObject {
  PyObject_HEAD
  fiocp_pool_t pool;
  /* The port it is registered with (borrowed: the port forgets its pools
   * before it is freed), or NULL. */
  struct CompletionPortObject* port;
  Py_ssize_t in_use;  /* buffers handed out and not given back */
  uint8_t leaked;     /* its port was leaked at close: keep the memory */
  PyObject* weakreflist;
} BufferPoolObject;

/* How many handles' keys a port keeps at hand (key_cache below). */
#define FB_KEY_CACHE 64

typedef struct CompletionPortObject {
  PyObject_HEAD
  fiocp_port_t* port;       /* malloc'd: may outlive us if leaked at close */
  const fiocp_backend_t* backend;
  PyObject* handles;        /* {handle int: key} */
  /* The keys of handles submitted on lately, so that a submission needs no
   * dict lookup (port.c, lookup_key): one place per handle, the key
   * borrowed from `handles`. A handle's place is emptied when it is
   * unregistered, all of them when `handles` goes. Port lock held. */
  struct key_cache_s {
    fiocp_handle_t handle;
    PyObject* key; /* NULL: empty */
  } key_cache[FB_KEY_CACHE];
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
  BufferPoolObject** pools; /* registered (pool_add), borrowed; few */
  int npools, pools_cap;
  unsigned long fork_gen;   /* fb_fork_generation when created */
  PyObject* weakreflist;
#ifdef Py_GIL_DISABLED
  PyMutex mu;               /* see the head comment */
#endif
} CompletionPortObject;

#ifdef Py_GIL_DISABLED
# define FB_LOCK(p) PyMutex_Lock(&(p)->mu)
# define FB_UNLOCK(p) PyMutex_Unlock(&(p)->mu)
# define FB_LOAD_PTR(pp) ((PyObject*)_Py_atomic_load_ptr_acquire(pp))
# define FB_STORE_PTR(pp, v) _Py_atomic_store_ptr_release((pp), (v))
extern PyMutex fb_detach_mu;
#else
# define FB_LOCK(p) ((void)0)
# define FB_UNLOCK(p) ((void)0)
# define FB_LOAD_PTR(pp) (*(pp))
# define FB_STORE_PTR(pp, v) (*(pp) = (v))
#endif
/* Per-object critical sections (3.13+; nothing before, and nothing on GIL
 * builds). */
#ifndef Py_BEGIN_CRITICAL_SECTION
# define Py_BEGIN_CRITICAL_SECTION(op) {
# define Py_END_CRITICAL_SECTION() }
#endif

/* ======================================================================
 * Completion (completion.c)
 * ====================================================================== */

extern PyTypeObject fb_CompletionType;

/* Completion.done: 0 in flight, 1 dequeued, or a resubmit() mark. Atomic
 * on free-threaded builds (binding.h head comment). fb_done_take() sets it
 * to mark if it was 1 and says whether it did. */
static inline uint8_t fb_done_load(CompletionObject* c) {
#ifdef Py_GIL_DISABLED
  return _Py_atomic_load_uint8(&c->done);
#else
  return c->done;
#endif
}
static inline void fb_done_store(CompletionObject* c, uint8_t v) {
#ifdef Py_GIL_DISABLED
  _Py_atomic_store_uint8(&c->done, v);
#else
  c->done = v;
#endif
}
static inline int fb_done_take(CompletionObject* c, uint8_t mark) {
#ifdef Py_GIL_DISABLED
  uint8_t expected = 1;
  return _Py_atomic_compare_exchange_uint8(&c->done, &expected, mark);
#else
  if (c->done != 1) return 0;
  c->done = mark;
  return 1;
#endif
}

/* Tracks c by the cyclic GC once ref could refer back to it. */
void fb_track_if_needed(CompletionObject* c, PyObject* ref);
/* A new pending Completion (from the free list when it has one). */
CompletionObject* fb_Completion_create(uint8_t kind, PyObject* key,
                                       PyObject* context);
/* Finishes a dequeued record: its Completion, filled in, and the port's
 * reference to it, now the caller's. A multishot's child gets a new
 * Completion (NULL when there was no memory for it: its buffer or socket
 * was given back). */
CompletionObject* fb_finish_op(CompletionPortObject* self, fiocp_op_t* rec);
/* The same for n records, their Completions into out[] (the port's
 * references, now the caller's), taking the port lock once. Returns how
 * many Completions it put in out[]: n, less any child left out for want
 * of memory. */
int fb_finish_ops(CompletionPortObject* self, fiocp_op_t** recs, int n,
                  PyObject** out);

/* ======================================================================
 * CompletionPort (port.c)
 * ====================================================================== */

extern PyTypeObject fb_CompletionPortType;

/* d[k] as a new reference in *out: 1 found, 0 not (no exception), -1
 * error. PyDict_GetItemRef() where it exists (3.13: a borrowed item could
 * be freed by another thread). */
static inline int fb_dict_get_ref(PyObject* d, PyObject* k, PyObject** out) {
#if PY_VERSION_HEX >= 0x030D0000
  return PyDict_GetItemRef(d, k, out);
#else
  *out = PyDict_GetItemWithError(d, k);
  if (*out == NULL) return PyErr_Occurred() ? -1 : 0;
  Py_INCREF(*out);
  return 1;
#endif
}

/* 0 if the port may be used, else -1 with an exception. */
int fb_port_check_open(CompletionPortObject* self);
/* Whether this process may call into the port's backend. */
int fb_port_owns_backend(CompletionPortObject* p);
/* Completion.cancel() and CompletionPort.cancel(). */
PyObject* fb_port_cancel_completion(CompletionPortObject* self,
                                    CompletionObject* c);
/* CompletionPort.flush(). */
/* port.resubmit(items[0:n], offsets) once its arguments are a tuple
 * (offsets: a tuple of n, or NULL); the caller keeps items alive. */
PyObject* fb_port_resubmit(CompletionPortObject* self, PyObject* const* items,
                           Py_ssize_t n, PyObject* offsets);
/* port.send(sock, data, context), with no argument parsing. */
PyObject* fb_port_send(CompletionPortObject* self, PyObject* sock, PyObject* data,
                       PyObject* context);
PyObject* fb_CompletionPort_flush(CompletionPortObject* self,
                                  PyObject* Py_UNUSED(ignored));

/* The most one operation moves. */
#define FB_MAX_TRANSFER 0x7ffff000u

/* Registers pool with self (pool_add) unless it already is. Returns 0, or
 * -1 with ValueError (registered with another port) or the backend's
 * error. Port lock held. */
int fb_port_use_pool(CompletionPortObject* self, BufferPoolObject* pool);
/* Unregisters pool from self (pool_remove while the backend lives).
 * Port lock held. */
void fb_port_forget_pool(CompletionPortObject* self, BufferPoolObject* pool);

/* ======================================================================
 * Buffer pools (pool.c)
 * ====================================================================== */

extern PyTypeObject fb_BufferPoolType;
extern PyTypeObject fb_PooledBufferType;

/* The BufferPool whose fiocp_pool_t p is. */
BufferPoolObject* fb_pool_from_c(fiocp_pool_t* p);
/* Gives buffer id back to pool (its backend's pool_put while registered).
 * GIL. */
void fb_pool_give(BufferPoolObject* pool, uint32_t id);
/* A PooledBuffer holding buffer id of pool, len bytes. */
PyObject* fb_PooledBuffer_new(BufferPoolObject* pool, uint32_t id,
                              Py_ssize_t len);
/* PooledBuffer.release(): 0, or -1 with BufferError while exported. */
int fb_PooledBuffer_release(PyObject* buf);

/* ======================================================================
 * Per-thread state of a port (thread_state.c)
 * ====================================================================== */

extern PyTypeObject fb_BatchType;
extern PyTypeObject fb_ThreadSlotsType;
/* "fastiocp.thread_slots", interned by module init: where a thread's state
 * dict keeps its slots. */
extern PyObject* fb_str_thread_slots;

/* Whether the calling thread is inside one of its own port.batch() blocks. */
int fb_in_batch(CompletionPortObject* self);
/* Enters / leaves a batch() block of the calling thread (leaving the
 * outermost flushes): what `with port.batch():` does. None, or NULL with
 * an exception. */
PyObject* fb_batch_enter(CompletionPortObject* self, PyObject* unused);
PyObject* fb_batch_exit(CompletionPortObject* self, PyObject* unused);
/* CompletionPort.batch(). */
PyObject* fb_CompletionPort_batch(CompletionPortObject* self,
                                  PyObject* Py_UNUSED(ignored));
/* Gives back the calling thread's concurrency slot on self, if it holds
 * one. */
void fb_slot_release(CompletionPortObject* self);
/* Records that the calling thread took a concurrency slot on self. */
void fb_slot_hold(CompletionPortObject* self);

/* ======================================================================
 * Socket addresses (sockaddr.c)
 * ====================================================================== */

/* Python address from a sockaddr, in the socket module's shapes. */
PyObject* fb_make_sockaddr(const struct sockaddr_storage* ss,
                           fiocp_socklen_t len);
/* Parses a Python address for family into a sockaddr, as the socket
 * module's caller() (sendto, connect) would. Returns 0, or -1 with an
 * exception. */
int fb_parse_sockaddr(const char* caller, PyObject* addr, int family,
                      struct sockaddr_storage* ss, fiocp_socklen_t* len);
/* The address family of a socket object, or of the socket h names.
 * Returns it, or -1 with an exception. */
int fb_get_family(PyObject* sockobj, fiocp_handle_t h);

/* ======================================================================
 * Handles (filehandle.c)
 * ====================================================================== */

extern PyTypeObject fb_FileHandleType;

/* The OS handle of an int, a socket or any object with fileno(). Returns
 * 0, or -1 with an exception. */
int fb_get_handle(PyObject* obj, fiocp_handle_t* out);

/* The descriptor of an open socket object, read from the object as its
 * fileno() would return it: 1 with *fd set, or 0 (not a plain socket, or
 * closed: call fileno()). No exception either way. */
int fb_socket_fd(PyObject* obj, long long* fd);

/* Finds _socket.socket for fb_socket_fd(), at module init. Returns 0, or -1
 * with an exception. */
int fb_handles_init(void);

#ifdef _WIN32
/* The module functions _win_open, _win_close_handle, _win_file_size and
 * _win_truncate (module.c lists them). */
PyObject* fb_mod_win_open(PyObject* m, PyObject* args);
PyObject* fb_mod_win_close_handle(PyObject* m, PyObject* args);
PyObject* fb_mod_win_file_size(PyObject* m, PyObject* args);
PyObject* fb_mod_win_truncate(PyObject* m, PyObject* args);
#endif

#if defined(__GNUC__) && !defined(_WIN32)
# pragma GCC visibility pop
#endif

#endif /* FASTIOCP_BINDING_H */
