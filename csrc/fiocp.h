/* fiocp.h: the internal contract between the Python binding (binding/)
 * and the platform backends (unix/io_uring.c, unix/epoll.c, win/iocp.c).
 *
 * Nothing here includes Python.h: backend code cannot touch Python objects,
 * which keeps the GIL-release boundary honest.
 *
 * Conventions.
 * - Every function that can fail returns >= 0 on success or a negative code.
 *   On POSIX the code is -errno; on Windows it is -winerror (GetLastError()
 *   or WSAGetLastError() values are all below 2^31). The codes below
 *   FIOCP__ECODE_BASE are fastiocp's own.
 * - "GIL" means the caller holds the GIL; "no GIL" means the function may be
 *   called with the GIL released and must never block on Python.
 * - Timeouts are in milliseconds; a negative value means "forever".
 * - An operation record (fiocp_op_t) belongs to the port from the moment
 *   submit() accepts it until wait()/drain() hands it back. The backend never
 *   frees it; the binding returns it to the port's free list after dequeue.
 */
#ifndef FIOCP_H
#define FIOCP_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
# ifndef _WIN32_WINNT
#  define _WIN32_WINNT 0x0600
# endif
# include <winsock2.h>
# include <ws2tcpip.h>
# include <windows.h>
typedef uintptr_t fiocp_handle_t;   /* HANDLE or SOCKET */
typedef int fiocp_socklen_t;
#else
# include <sys/socket.h>
# include <sys/uio.h>
typedef intptr_t fiocp_handle_t;    /* a file descriptor */
typedef socklen_t fiocp_socklen_t;
#endif

/* fastiocp's own codes: far below any errno or winerror. */
#define FIOCP__ECODE_BASE (-0x40000000)
#define FIOCP_ECLOSED     (FIOCP__ECODE_BASE - 1) /* port closed */
#define FIOCP_EINTR       (FIOCP__ECODE_BASE - 2) /* wait interrupted: check
                                                     signals, then retry */
#define FIOCP_ENOMEM      (FIOCP__ECODE_BASE - 3)
#define FIOCP_EUNSUPPORTED (FIOCP__ECODE_BASE - 4) /* op not on this backend */
#define FIOCP_EOWNHANDLE  (FIOCP__ECODE_BASE - 5) /* associate(): the handle
                                                     is one of the port's own
                                                     (its ring, epoll set,
                                                     eventfd, IOCP handle) */
#define FIOCP_ETIMEDOUT   (FIOCP__ECODE_BASE - 6) /* the operation's own
                                                     timeout (timeout_ns)
                                                     expired first: it was
                                                     cancelled by the port */
#define FIOCP_ENOBUFS     (FIOCP__ECODE_BASE - 7) /* a pooled receive found
                                                     its pool empty when data
                                                     was there: the data is
                                                     still in the socket;
                                                     release buffers and
                                                     receive again */

/* Operation kinds. The binding maps them to the strings of Completion.op. */
enum {
  FIOCP_OP_READ = 1,
  FIOCP_OP_WRITE,
  FIOCP_OP_RECV,
  FIOCP_OP_SEND,
  FIOCP_OP_RECVFROM,
  FIOCP_OP_SENDTO,
  FIOCP_OP_ACCEPT,
  FIOCP_OP_CONNECT,
  FIOCP_OP_POST,
  /* The operations of issue 14. Per kind, what the record's fields mean
   * (fields not named are unused; addr is the record's extension):
   * POLL:         handle; len = the events wanted (FIOCP_POLL*); res = the
   *               events that fired (> 0; ERR and HUP always reported).
   * SENDMSG,
   * RECVMSG:      handle (a socket); addr->iovs/niov (the buffers),
   *               addr->control/controllen (SENDMSG: packed cmsgs; RECVMSG:
   *               room for them, out: the length received), addr->msgflags
   *               (in: flags; out for RECVMSG: msg_flags), addr->ss/sslen
   *               (SENDMSG: destination, sslen 0 for none; RECVMSG out: the
   *               sender, sslen 0 if none); res = bytes.
   * SENDFILE:     handle (socket), addr->src (the file), offset (>= 0),
   *               len = count (> 0); res = bytes sent (short at end of
   *               file or when the peer stops; the kernel copies, never
   *               user space). Once some bytes went out, a later error,
   *               cancel or timeout still reports their count.
   * WAIT_PROCESS: handle = a pid (POSIX) or a process HANDLE (Windows);
   *               res = POSIX: the wait status as waitpid() would give it
   *               (the child is not reaped: WNOWAIT); Windows: the exit
   *               code (GetExitCodeProcess). A process that is not the
   *               caller's child completes at once with ECHILD (POSIX).
   * TIMER:        offset = the delay in nanoseconds (>= 0); res = 0 when
   *               it fires (a cancel gives the cancellation error).
   * FSYNC:        handle (a file); len = 1 for data only (fdatasync);
   *               res = 0.
   * CONNECT_PIPE: Windows: handle = a named pipe server HANDLE opened with
   *               FILE_FLAG_OVERLAPPED; res = 0 once a client connected
   *               (ERROR_PIPE_CONNECTED is success). Elsewhere
   *               FIOCP_EUNSUPPORTED. */
  FIOCP_OP_POLL,
  FIOCP_OP_SENDMSG,
  FIOCP_OP_RECVMSG,
  FIOCP_OP_SENDFILE,
  FIOCP_OP_WAIT_PROCESS,
  FIOCP_OP_TIMER,
  FIOCP_OP_FSYNC,
  FIOCP_OP_CONNECT_PIPE,
  FIOCP_OP__COUNT
};

/* Readiness events of FIOCP_OP_POLL: Linux's poll() values on every
 * platform (the Python constants fastiocp.POLLIN etc. are these). */
#define FIOCP_POLLIN 0x001
#define FIOCP_POLLPRI 0x002
#define FIOCP_POLLOUT 0x004
#define FIOCP_POLLERR 0x008
#define FIOCP_POLLHUP 0x010

/* fiocp_backend_t.support[kind]: how a backend does an operation kind.
 * Index FIOCP_SUPPORT_TIMEOUT (0, no kind) is the per-operation timeout. */
enum { FIOCP_SUP_NO = 0, FIOCP_SUP_NATIVE = 1, FIOCP_SUP_EMULATED = 2 };
#define FIOCP_SUPPORT_TIMEOUT 0

/* Operation record states. */
enum {
  FIOCP_ST_FREE = 0,   /* on the free list */
  FIOCP_ST_INFLIGHT,   /* accepted by submit(); its completion is owed */
  FIOCP_ST_DONE,       /* completed, queued for (or handed to) a waiter */
  FIOCP_ST_LINGER      /* a multishot op whose last result the binding
                          finished while some of its children were not yet
                          (refs > 0): given back when the last one is */
};

/* Flag bits of fiocp_op_t.flags. The binding sets POOLED, MULTISHOT and
 * ZEROCOPY before submit(); backends set CHILD (fiocp__child_new) and
 * CANCELLED (cancel, close).
 *
 * POOLED (recv only): op->pool is a registered pool (fiocp_pool_t) and
 *   op->buf is NULL; op->len is the most to receive (<= pool->size). The
 *   backend takes a buffer from the pool only once data is there
 *   (io_uring: IOSQE_BUFFER_SELECT on the pool's provided-buffer ring;
 *   epoll: readiness, then fiocp__pool_take and recv(); IOCP: a zero-byte
 *   WSARecv, then fiocp__pool_take and a non-blocking receive). Result:
 *   res = bytes (> 0) and offset = the buffer's id (its memory is
 *   pool->base + id * pool->size), now held by the binding until it
 *   gives it back with fiocp_backend_t.pool_put. res = 0 (end of stream)
 *   and errors carry no buffer (offset = -1). No buffer free when data is
 *   there: res = FIOCP_ENOBUFS and nothing was read.
 * MULTISHOT (pooled recv, accept): one submission, many results. Each
 *   result but the last is a child record (fiocp__child_new) that the
 *   backend completes like any record; the last is op itself and ends the
 *   operation: an error (cancel, FIOCP_ENOBUFS, ...), end of stream (recv:
 *   res = 0), or a result after which the backend could not go on (it
 *   then carries it). The order of one operation's results is kept:
 *   children are queued in the order of their data, op after all of them.
 *   Cancelling op ends it (its remaining children still come first).
 *   The kernels' ways: io_uring IORING_RECV_MULTISHOT with buffer select,
 *   IORING_ACCEPT_MULTISHOT; epoll: stays armed after each result; IOCP:
 *   the zero-byte receive posted again after each result, several AcceptEx
 *   kept outstanding.
 * ZEROCOPY (send): the kernel sends from op->buf without copying it
 *   (io_uring IORING_OP_SEND_ZC); op completes only once the kernel no
 *   longer reads the buffer (the notification CQE), with res = bytes
 *   sent. Backends without it send normally.
 * CHILD: a child record, see fiocp__child_new. */
#define FIOCP_OPF_CANCELLED 0x1  /* the user or close() asked to cancel it */
#define FIOCP_OPF_POOLED    0x2
#define FIOCP_OPF_MULTISHOT 0x4
#define FIOCP_OPF_ZEROCOPY  0x8
#define FIOCP_OPF_CHILD     0x10

/* The record's extension: the socket address and per-backend scratch of
 * the operations that carry an address (recvfrom, sendto, accept, connect),
 * the arguments of the issue-14 kinds that need more than the record
 * (sendmsg, recvmsg, sendfile, wait_process, timer), and of every
 * operation submitted with a timeout (timeout_ns > 0). Allocated from the
 * port's free list only then, so that plain reads and receives stay small
 * (100,000 pending receives must cost little beyond their buffers). The
 * binding fills the argument fields and owns the arrays they point to; it
 * zeroes scratch before submit() and frees nothing until the record is
 * dequeued. */
typedef struct fiocp_addr_s {
  struct sockaddr_storage ss;
  fiocp_socklen_t sslen;           /* in: size of ss or of the address to
                                      send to; out: the peer's length */
  void* iovs;                      /* sendmsg/recvmsg: struct iovec[niov]
                                      (POSIX) or WSABUF[niov] (Windows) */
  uint32_t niov;
  uint32_t controllen;             /* see FIOCP_OP_SENDMSG/RECVMSG */
  char* control;
  int msgflags;
  fiocp_handle_t src;              /* sendfile: the file */
  /* The backend's own per-operation state (timespecs the kernel reads,
   * splice pipes, wait or timer handles, counters). */
  union {
    int64_t i64[8];
    intptr_t ip[8];
    void* ptr[8];
  } scratch;
#ifdef _WIN32
  WSABUF wsabuf;
  DWORD wsaflags;
  SOCKET accept_sock;              /* AcceptEx: the pre-created socket */
  char accept_buf[2 * (sizeof(struct sockaddr_storage) + 16)];
#else
  struct msghdr msg;               /* recvmsg/sendmsg for recvfrom/sendto */
  struct iovec iov;
#endif
  struct fiocp_addr_s* next_free;
} fiocp_addr_t;

/* One submitted operation. On Windows the OVERLAPPED comes first: a dequeued
 * packet carries its address, and it must not move or be freed before that
 * packet is dequeued, even after CancelIoEx. Records live in slabs that are
 * never moved, so a pointer to one stays valid for the port's lifetime. */
typedef struct fiocp_op_s {
#ifdef _WIN32
  OVERLAPPED ov;
#endif
  uint8_t kind;          /* FIOCP_OP_* */
  uint8_t state;         /* FIOCP_ST_*; changed under the port's locks */
  uint8_t flags;         /* FIOCP_OPF_* */
  uint8_t gen;           /* bumped each time the record is reused, so that a
                            late cancel cannot hit the record's next life */
  uint32_t len;          /* buffer length in bytes */
  fiocp_handle_t handle; /* fd, HANDLE or SOCKET */
  char* buf;             /* the pinned buffer (NULL for connect/post) */
  int64_t offset;        /* file offset for read/write; -1: current position
                            (streams such as pipes) */
  int64_t res;           /* on completion: bytes transferred (>= 0) or a
                            negative code; for accept the new handle; for
                            post the nbytes the user posted */
  uintptr_t user;        /* the binding's token (its Operation object) */
  fiocp_addr_t* addr;    /* NULL unless the kind carries an address */
  struct fiocp_op_s* next;  /* free list, completion queue or backend list */
  uintptr_t bk;          /* backend scratch (epoll: interest bookkeeping) */
  struct fiocp_pool_s* pool; /* POOLED: the pool; else NULL */
  /* MULTISHOT op: 1 + its children not yet finished by the binding
   * (changed atomically: fiocp__child_new, fiocp__child_free). The record
   * is given back to the allocator only once it is 0, and the binding
   * keeps op's Completion alive until then. A child: its op. */
  uint32_t refs;
  struct fiocp_op_s* parent;
  int64_t timeout_ns;    /* 0: none (records start zeroed; a timeout of
                            0 s is stored as 1 ns). Otherwise the port
                            cancels the operation if it is still pending
                            this long after submit(); it then completes
                            with FIOCP_ETIMEDOUT, unless data had arrived
                            (a result >= 0 always wins). addr is set then. */
} fiocp_op_t;

typedef struct fiocp_port_s fiocp_port_t;

/* A pool of equal buffers for pooled receives (FIOCP_OPF_POOLED), shared
 * by any number of operations of one port. Its memory is the binding's
 * (fastiocp.BufferPool) and outlives every record that names it. Buffer
 * ids are 0 .. count-1. A buffer is at any time in one place: free (on
 * the pool's free stack, or in io_uring's provided-buffer ring), or held
 * (handed out in a result, until pool_put gives it back). */
typedef struct fiocp_pool_s {
  char* base;             /* count * size bytes */
  uint32_t size;          /* bytes per buffer (>= 1) */
  uint32_t count;         /* 1 .. FIOCP_POOL_MAX buffers */
  /* The free stack (fiocp__pool_take/give): backends without a kernel
   * ring take from it; io_uring moves it into its ring at pool_add. */
  uint32_t* free_ids;
  uint32_t nfree;
  void* lock;             /* fiocp__pool_init's mutex */
  fiocp_port_t* port;     /* registered with (pool_add), or NULL */
  uint16_t group;         /* io_uring: the buffer group id */
  void* impl;             /* the backend's (io_uring: the ring) */
  struct fiocp_pool_s* next; /* the backend's list of its pools */
} fiocp_pool_t;

/* io_uring's buffer ids are 16 bits. */
#define FIOCP_POOL_MAX 32768

/* Sets up pool (memory from the OS: mmap / VirtualAlloc, page aligned;
 * every buffer free). Returns 0 or FIOCP_ENOMEM. GIL or no GIL. */
int fiocp__pool_init(fiocp_pool_t* pool, uint32_t size, uint32_t count);
/* Frees what fiocp__pool_init allocated (not registered with a port). */
void fiocp__pool_fini(fiocp_pool_t* pool);
/* A free buffer's id, or -1 when none is free. Thread-safe. */
int64_t fiocp__pool_take(fiocp_pool_t* pool);
/* Puts buffer id back on the free stack. Thread-safe. */
void fiocp__pool_give(fiocp_pool_t* pool, uint32_t id);
/* The same, with the pool's mutex held (fiocp__pool_lock). */
void fiocp__pool_give_locked(fiocp_pool_t* pool, uint32_t id);
/* Locks the pool's mutex (for a backend's own free set: io_uring's ring
 * tail). */
void fiocp__pool_lock(fiocp_pool_t* pool);
void fiocp__pool_unlock(fiocp_pool_t* pool);

/* A child record: one result of the multishot operation parent, for the
 * backend to fill (res, offset) and complete like any record. It copies
 * parent's kind, handle, user, pool and flags (plus FIOCP_OPF_CHILD) and
 * takes a reference on parent (parent->refs + 1, atomically). Memory from
 * malloc (no port lock: backends call it without the GIL); addr is NULL
 * (a backend that needs an extension mallocs one: fiocp__child_free frees
 * it). NULL when out of memory: the backend then ends the operation.
 * Thread-safe. */
fiocp_op_t* fiocp__child_new(fiocp_op_t* parent);
/* Frees a child after the binding finished it, and returns its parent's
 * remaining references (parent->refs - 1, atomically): 0 means the
 * binding may now give the parent back. */
uint32_t fiocp__child_free(fiocp_op_t* child);
/* Drops the parent's own reference (its last result finished): returns
 * the references left, as fiocp__child_free. */
uint32_t fiocp__op_unref(fiocp_op_t* parent);

/* A backend: one table of functions, chosen at run time (Linux builds carry
 * two backends). */
typedef struct fiocp_backend_s {
  const char* name;  /* "iocp", "io_uring" or "epoll" */

  /* Whether this backend can work on this machine, without keeping anything
   * open. Returns 0, or a negative code and a human-readable reason in why
   * (e.g. "io_uring_setup failed with EPERM: blocked by seccomp or
   * kernel.io_uring_disabled"). GIL or no GIL. */
  int (*probe)(char* why, size_t whylen);

  /* Sets up port->impl. entries is a size hint for the kernel queues (0: the
   * backend's default); concurrency is the user's value (0: number of CPUs).
   * On failure, nothing is left allocated and why explains. GIL. */
  int (*init)(fiocp_port_t* port, unsigned entries, unsigned concurrency,
              char* why, size_t whylen);

  /* Associates a handle with the port. Refuses the port's own handles
   * with FIOCP_EOWNHANDLE: operations on them would corrupt the port (an
   * epoll backend's eventfd read by the user loses wake-ups). GIL. */
  int (*associate)(fiocp_port_t* port, fiocp_handle_t h);

  /* Starts op (state already FIOCP_ST_INFLIGHT). Returns 0: exactly one
   * completion will be delivered by wait() or drain(). Returns < 0: the
   * operation failed at once, no completion will come, and the binding
   * takes the record back. When defer is non-zero the backend may hold the
   * submission until flush() or the next wait() (io_uring batching); other
   * backends ignore it. Thread-safe; GIL or no GIL. */
  int (*submit)(fiocp_port_t* port, fiocp_op_t* op, int defer);

  /* Pushes deferred submissions to the kernel. Thread-safe; no GIL. */
  int (*flush)(fiocp_port_t* port);

  /* Asks the OS to cancel op. Its completion still comes (with a
   * cancellation error, or its real result if it raced). Returns 1 if a
   * cancellation was requested, 0 if op already completed. It may return
   * 1 for an operation whose result is decided but whose completion waits
   * for a timer of its own to come back (io_uring). Thread-safe. */
  int (*cancel)(fiocp_port_t* port, fiocp_op_t* op);

  /* Takes up to max completed operations without blocking: the fast path
   * that needs no GIL release. Returns the count (0: none ready), or
   * FIOCP_ECLOSED. GIL. */
  int (*try_get)(fiocp_port_t* port, fiocp_op_t** out, int max);

  /* Blocks until at least one completion is available, the timeout expires
   * (returns 0), a signal arrives (FIOCP_EINTR) or the port is closed
   * (FIOCP_ECLOSED). Any number of threads may wait at once. No GIL. */
  int (*wait)(fiocp_port_t* port, fiocp_op_t** out, int max,
              int64_t timeout_ms);

  /* Queues a user packet (op->kind == FIOCP_OP_POST, op->res = nbytes).
   * Thread-safe; GIL or no GIL. */
  int (*post)(fiocp_port_t* port, fiocp_op_t* op);

  /* Closes the port for new work: wakes every waiter (they return
   * FIOCP_ECLOSED), cancels every operation in flight, and waits up to
   * timeout_ms for their completions. Returns how many operations are still
   * owed (0: all came back; they are collected with drain()). Idempotent.
   * The first call must hold the GIL (it scans the record slabs, which the
   * binding grows under the GIL); later calls, which only wait, need not. */
  int64_t (*shutdown)(fiocp_port_t* port, int64_t timeout_ms);

  /* After shutdown: takes up to max completed operations (never blocks).
   * GIL. */
  int (*drain)(fiocp_port_t* port, fiocp_op_t** out, int max);

  /* Frees port->impl. Called only when shutdown() returned 0; otherwise the
   * kernel may still write into buffers, and the port is leaked on purpose.
   * GIL. */
  void (*destroy)(fiocp_port_t* port);

  /* The concurrency emulation of backends whose OS does not provide it
   * (NULL for IOCP, where the kernel counts running threads itself). With a
   * concurrency N > 0, at most N threads hold dequeued packets at once:
   * try_get() and wait() return packets only to a thread that can take a
   * slot, and take it; release() gives the calling thread's slot back (the
   * binding calls it when the thread calls get again or exits). GIL or no
   * GIL. */
  void (*release)(fiocp_port_t* port);

  /* support[k] for k < FIOCP_OP__COUNT: FIOCP_SUP_* for operation kind k
   * (index FIOCP_SUPPORT_TIMEOUT: per-operation timeouts). submit() returns
   * FIOCP_EUNSUPPORTED for a kind marked FIOCP_SUP_NO. */
  const uint8_t* support;

  /* Buffer pools (FIOCP_OPF_POOLED). pool_add registers pool with the
   * port before its first receive (io_uring: a provided-buffer ring of
   * group pool->group holding every free buffer); NULL: nothing to do.
   * Returns 0 or a negative code. GIL. */
  int (*pool_add)(fiocp_port_t* port, fiocp_pool_t* pool);
  /* Gives buffer id (held) back to the pool: io_uring adds it to the
   * ring; NULL: the binding calls fiocp__pool_give. Thread-safe, GIL or
   * no GIL. */
  void (*pool_put)(fiocp_port_t* port, fiocp_pool_t* pool, uint32_t id);
  /* Unregisters pool: no operation in flight names it. Buffers in a ring
   * go back on the free stack. Called before destroy() for each pool
   * still registered. NULL: nothing to do. GIL. */
  void (*pool_remove)(fiocp_port_t* port, fiocp_pool_t* pool);
  /* The FIOCP_OPF_POOLED / MULTISHOT / ZEROCOPY bits this backend does
   * with the kernel's own mechanism on this port (io_uring's buffer
   * rings, multishot and SEND_ZC, as far as the kernel has them). Every
   * backend accepts all three; the others are emulated (or, ZEROCOPY, a
   * plain send). NULL: none. For tests and docs. GIL. */
  unsigned (*native_flags)(fiocp_port_t* port);
} fiocp_backend_t;

/* Slab allocator for operation and address records: records never move and
 * are reused through free lists, so steady-state submission does not call
 * malloc. Called by the binding with the GIL held. */
typedef struct fiocp_slab_s {
  struct fiocp_slab_s* next;
  size_t count;
  fiocp_op_t ops[];
} fiocp_slab_t;

struct fiocp_port_s {
  const fiocp_backend_t* backend;
  void* impl;                 /* backend state */
  fiocp_op_t* free_ops;
  fiocp_addr_t* free_addrs;
  fiocp_slab_t* slabs;        /* every op record ever allocated */
  void* addr_chunks;          /* list of address-record chunks */
  size_t nops;                /* records allocated in slabs */
};

fiocp_op_t* fiocp__op_alloc(fiocp_port_t* port);
void fiocp__op_free(fiocp_port_t* port, fiocp_op_t* op);
fiocp_addr_t* fiocp__addr_alloc(fiocp_port_t* port);
void fiocp__allocator_destroy(fiocp_port_t* port);

/* Calls fn for every record in state FIOCP_ST_INFLIGHT (foreach_inflight),
 * or in FIOCP_ST_INFLIGHT or FIOCP_ST_DONE: owed to the user, not yet
 * dequeued (foreach_owned). The caller holds whatever lock makes states
 * stable. */
void fiocp__foreach_inflight(fiocp_port_t* port,
                             void (*fn)(fiocp_port_t*, fiocp_op_t*, void*),
                             void* arg);
void fiocp__foreach_owned(fiocp_port_t* port,
                          void (*fn)(fiocp_port_t*, fiocp_op_t*, void*),
                          void* arg);

/* Backends compiled into this build, best first. */
extern const fiocp_backend_t* const fiocp__backends[];
extern const int fiocp__nbackends;

/* The backend called name, or NULL. */
const fiocp_backend_t* fiocp__backend_by_name(const char* name);

/* Monotonic clock in milliseconds. */
int64_t fiocp__now_ms(void);

/* Remaining milliseconds until deadline (ms since fiocp__now_ms epoch);
 * -1 when deadline < 0 (forever); never below 0 otherwise. */
int64_t fiocp__remaining_ms(int64_t deadline);

#ifdef _WIN32
extern const fiocp_backend_t fiocp__iocp_backend;

/* Windows file helpers behind fastiocp.open() (win/iocp.c). Each returns 0
 * or -winerror and never blocks on Python: GIL or no GIL.
 *
 * fiocp__win_open() opens path with FILE_FLAG_OVERLAPPED (plus
 * FILE_FLAG_NO_BUFFERING when direct), shared for reading, writing and
 * deletion, not inheritable. kind is the mode letter: 'r' opens an existing
 * file, 'w' creates or truncates, 'x' creates a new file only, 'a' opens or
 * creates without truncating, with append-only access (every write lands at
 * the end of the file, whatever its offset, as with O_APPEND). */
int fiocp__win_open(const wchar_t* path, int readable, int writable,
                    int kind, int direct, fiocp_handle_t* out);
int fiocp__win_close_handle(fiocp_handle_t h);
int fiocp__win_file_size(fiocp_handle_t h, int64_t* size);
int fiocp__win_truncate(fiocp_handle_t h, int64_t size);
#endif
#ifdef __linux__
extern const fiocp_backend_t fiocp__uring_backend;
extern const fiocp_backend_t fiocp__epoll_backend;
#endif

#endif /* FIOCP_H */
