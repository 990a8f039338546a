/* epoll.c: the epoll backend, for machines where io_uring is unavailable
 * (Docker's default seccomp profile, kernel.io_uring_disabled, old kernels).
 *
 * How readiness becomes completions. epoll only says when a descriptor is
 * ready; the completion-port contract wants operations that finish. So the
 * backend performs the I/O itself, at the first moment it cannot block:
 *
 * - At submit time, when nothing is queued ahead of it, an operation on a
 *   socket or pipe is tried at once with a non-blocking call (recv/send with
 *   MSG_DONTWAIT, preadv2/pwritev2 with RWF_NOWAIT, ...). If that finishes
 *   it, in success or error, the operation completes then and there.
 *   Except a recv on a stream socket whose last recv found it drained
 *   (EAGAIN, or less than it asked for): in request-response traffic the
 *   next data comes only after this side answers, so that try would be a
 *   system call saying EAGAIN. It waits for readiness straight away, as
 *   io_uring's POLL_FIRST does; arming reports data that came meanwhile.
 * - Otherwise (EAGAIN) it joins a per-descriptor queue, one FIFO per
 *   direction (reads: read, recv, recvfrom, accept; writes: write, send,
 *   sendto, connect), so that several operations on one socket keep their
 *   order, and the descriptor's epoll interest is armed.
 * - Whichever thread is the hub's poller (hub.h) returns from epoll_wait(),
 *   runs the head of each ready queue again, non-blocking, until one says
 *   EAGAIN, re-arms the interest if anything is left, and hands what
 *   finished to the hub through harvest().
 * - Regular files (and block devices, and anything epoll refuses with
 *   EPERM) are always "ready" yet may block on the disk: a small pool of C
 *   threads runs pread/pwrite for them and completes through
 *   fiocp__hub_complete(), which kicks the poller. A read at an offset
 *   whose data is all in the page cache is done at submit time instead
 *   (cached_read()).
 * - I/O happens only while somebody polls, where io_uring's kernel finishes
 *   operations by itself. So try_get() and a wait() with a zero timeout,
 *   which the hub answers without polling, poll once without blocking
 *   first (fiocp__hub_poll_once()).
 *
 * Interest is armed with EPOLLONESHOT, and every queued operation re-arms it
 * with EPOLL_CTL_MOD. Why one-shot rather than level-triggered:
 * - Disarming after an event is free, where level-triggered interest would
 *   need a MOD to remove it whenever a queue empties (or spin meanwhile).
 * - The MOD on each enqueue doubles as a check that the descriptor number
 *   still names the file that was registered: epoll forgets a registration
 *   silently when the file is closed, and MOD then fails with ENOENT (a new
 *   file took the number) or EBADF. Operations queued for the old file are
 *   then completed with -EBADF instead of being run against the new file or
 *   waiting forever for an event that cannot come.
 * - A stale registration that survives elsewhere (the old file kept open by
 *   a dup or a child process) fires at most once, and its epoll data carries
 *   a generation number that no longer matches, so it is ignored.
 * Edge-triggered interest registered once would save that MOD per waiting
 * operation but leaves no moment at which a reused descriptor is noticed.
 *
 * Descriptors without O_NONBLOCK (Python sockets are blocking by default)
 * never block the poller:
 * - recv, send, recvmsg and sendmsg take MSG_DONTWAIT, which does not touch
 *   the file's flags; sends also take MSG_NOSIGNAL.
 * - Reads and writes on pipes and other streams use preadv2/pwritev2 with
 *   RWF_NOWAIT, which does not touch the flags either.
 * - accept(), connect(), and stream reads and writes where RWF_NOWAIT is not
 *   supported, have no per-call non-blocking flag. For them O_NONBLOCK is
 *   set for the duration of the one call and the previous flags restored
 *   right after (nonblock.h); a descriptor that already has O_NONBLOCK is
 *   left alone. While the flag is set, another thread of the
 *   user's doing a blocking call on the same file would see EAGAIN: mixing
 *   blocking calls and port operations on one socket is not supported.
 *
 * Descriptors closed by the user with operations queued: epoll drops the
 * registration without a word, so those operations wait until cancel() or
 * shutdown() (-ECANCELED), or until the number is reused and an operation
 * on the new file notices (-EBADF, above). Unlike io_uring, which holds a
 * reference to the file, the backend cannot keep the old file alive.
 *
 * Known limitation: a socket whose error queue is not empty (IP_RECVERR,
 * SO_TIMESTAMPING, MSG_ZEROCOPY notifications) reports EPOLLERR for as long
 * as it stays so, and epoll cannot mask EPOLLERR; a receive queued on it
 * then makes the poller spin until data arrives or the user reads the
 * error queue. The backend never reads the error queue itself: it is the
 * user's data.
 *
 * The operations of issue 14 ride on the same machinery:
 * - poll: a third per-descriptor list beside the two direction queues, in
 *   no order (a poll consumes nothing, so it never waits behind a read).
 *   Tried with poll(2) at submit; then the descriptor's interest is the
 *   union of its queues' directions and its polls' masks, and each event
 *   completes every poll whose mask it meets, whatever the queues do with
 *   it. A poll for POLLIN beside a pending recv both complete.
 * - sendmsg and recvmsg join the write and read queues (MSG_DONTWAIT);
 *   sendfile joins the write queue and, like accept, toggles O_NONBLOCK
 *   for its calls; its progress survives EAGAIN in the record's scratch.
 * - wait_process opens a pidfd (the backend's own descriptor, never the
 *   user's) and queues a non-reaping waitid(P_PIDFD, WNOWAIT) on it as a
 *   read; the pidfd is closed when the operation leaves the backend
 *   (finish_op()), under its descriptor state's lock, so the number's
 *   next owner starts with a clean registration.
 * - fsync runs on the file pool.
 * - Timers and per-operation timeouts share one min-heap of deadlines
 *   (CLOCK_MONOTONIC ns; timerheap.h, shared with io_uring) under tm_mu
 *   and one timerfd in the epoll set,
 *   armed to the earliest deadline plus the timer slack (1 ms unless
 *   FASTIOCP_TIMER_SLACK_US says otherwise, so that deadlines that close
 *   share one wake-up), and set again only when a new entry goes first (the
 *   timerfd is created the first time a port needs it). Each entry's heap
 *   index lives in the record's scratch, so removing an entry when its
 *   operation finishes first costs O(log n). When the timerfd fires, the
 *   poller pops what expired: a timer completes with 0; an operation whose
 *   timeout expired is cancelled exactly as cancel() does it and completes
 *   with FIOCP_ETIMEDOUT, unless it had already left its place (its result
 *   wins). An operation whose timeout fires before it was placed in a queue
 *   (submit in progress) sees the TM_EXPIRED mark under its queue's lock
 *   right after queueing, as it sees e->closing, and takes itself out.
 *
 * Pooled and multishot operations (issue 18; epoll has no kernel buffer
 * rings, so both are emulated on readiness, as libuv and the stdlib's
 * selector loop do):
 * - A pooled recv takes a buffer from the pool's free stack
 *   (fiocp__pool_take) for each attempt and gives it back when the attempt
 *   read nothing (EAGAIN, end of stream, error): a buffer is held only by a
 *   result with data. With the pool empty, a one-byte MSG_PEEK tells
 *   whether data is there (FIOCP_ENOBUFS, nothing consumed) or not (wait).
 * - A multishot op (pooled recv, accept) stays at the head of its read
 *   queue after each result and keeps the interest armed. Each result is a
 *   child record, at most MULTISHOT_BURST per readiness event, so that a
 *   flooded socket does not starve the others: the re-arm (EPOLL_CTL_MOD)
 *   puts a descriptor that is still ready at the tail of epoll's ready
 *   list. What is queued behind it in that direction waits until it ends;
 *   the other direction (a send) and polls are not affected.
 * - Order. Children go to e->done while their descriptor's lock is held,
 *   in the order of their data; a multishot op's own completion goes
 *   through e->done too, after them, from whatever path ends it (the
 *   poller, cancel(), shutdown()): harvest() moves e->done into the hub's
 *   queue in order, so the op never overtakes its children. Children are
 *   not in flight for the hub (they were never begun); the op is.
 *
 * Locks. hub.mu (the hub's) comes before every lock here, and is never held
 * while one of these is taken, except done_mu in harvest(). done_mu is the
 * last lock of all (a descriptor's lock is held while children go to
 * e->done; a buffer pool's mutex, fiocp__pool_take's, is a leaf too, not
 * to be confused with the file pool's below). tm_mu comes
 * before the descriptor and pool mutexes (an expiry cancels under it), and
 * is taken with none of them held: every completion path first lets go of
 * its place's lock, then calls finish_op(), which removes the heap entry.
 * An expiry holds tm_mu while it looks at an operation, so that operation
 * cannot complete and be recycled meanwhile. Each descriptor
 * state has its own mutex, held while its queues change and while its
 * non-blocking calls run (so a submit and the poller never interleave on one
 * queue); tab_mu guards growth of the descriptor table; the pool has its own
 * mutex; nonblock.h's mutex serializes the O_NONBLOCK toggles (taken inside
 * a descriptor mutex, never the other way round).
 *
 * fiocp_op_t.bk says where an operation is (a descriptor queue, the pool's
 * queue, a pool thread, or nowhere) plus a few per-operation facts; it is
 * only changed under the lock of the place it names, which is what cancel()
 * relies on. A timer's place is the heap (its scratch index, under tm_mu).
 */
#define _GNU_SOURCE
#include "../fiocp.h"
#include "hub.h"
#include "nonblock.h"
#include "timerheap.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
# define SYS_pidfd_open 434   /* the same on every architecture */
#endif
#ifndef P_PIDFD
# define P_PIDFD 3
#endif

/* fastiocp's POLL* values are Linux's, so revents pass through as they are. */
typedef char fiocp__poll_values_match[
    (FIOCP_POLLIN == EPOLLIN && FIOCP_POLLPRI == EPOLLPRI &&
     FIOCP_POLLOUT == EPOLLOUT && FIOCP_POLLERR == EPOLLERR &&
     FIOCP_POLLHUP == EPOLLHUP && POLLIN == EPOLLIN && POLLPRI == EPOLLPRI &&
     POLLOUT == EPOLLOUT && POLLERR == EPOLLERR && POLLHUP == EPOLLHUP)
        ? 1 : -1];

#ifndef RWF_NOWAIT
# define RWF_NOWAIT 0x00000008
#endif

/* preadv2/pwritev2 through syscall(): glibc before 2.26 (manylinux2014) has
 * no wrappers, and older kernel headers lack the numbers. Elsewhere the
 * backend falls back to toggling O_NONBLOCK around read()/write(). */
#if !defined(SYS_preadv2)
# if defined(__x86_64__) && !defined(__ILP32__)
#  define SYS_preadv2 327
#  define SYS_pwritev2 328
# elif defined(__i386__)
#  define SYS_preadv2 378
#  define SYS_pwritev2 379
# elif defined(__aarch64__) || defined(__riscv)
#  define SYS_preadv2 286
#  define SYS_pwritev2 287
# endif
#endif

#define EV_BATCH 128          /* events taken per epoll_wait() */
#define POOL_THREADS 4        /* file pool size, started lazily */
#define KICK_DATA UINT64_MAX  /* epoll data of the eventfd; a descriptor's
                                 data (gen << 32 | fd) never reaches it */
#define TIMER_DATA (UINT64_MAX - 1) /* the timerfd's, likewise */
#define PENDING INT64_MIN     /* try_io(): would block, wait for readiness */
#define MULTISHOT_BURST 16    /* results of one multishot op per readiness
                                 event (fairness between descriptors) */

/* fiocp_op_t.bk: where the operation is (low two bits), facts about it,
 * and, for BK_FDQ, the address of its descriptor state (64-byte aligned). */
#define BK_WHERE 0x3u
#define BK_NONE 0x0u          /* not queued: running inline or completing */
#define BK_FDQ 0x1u           /* in a descriptor queue */
#define BK_POOLQ 0x2u         /* in the file pool's queue */
#define BK_POOLRUN 0x3u       /* running in a pool thread */
#define BK_SOCKIO 0x4u        /* read/write on a socket: use recv/send */
#define BK_NOPOS 0x8u         /* read/write on a stream: no offset */
#define BK_STARTED 0x10u      /* connect: connect() returned EINPROGRESS */
#define BK_FLAGS (BK_SOCKIO | BK_NOPOS | BK_STARTED)
#define BK_MASK 0x3fu
#define FDST_ALIGN 64

/* A descriptor's queues: reads and writes run in order, each direction on
 * its own; polls wait unordered on the third. */
enum { DIR_IN = 0, DIR_OUT = 1, DIR_POLL = 2, NQ = 3 };

/* fiocp_addr_t.scratch slots of this backend (records that carry an
 * extension; ep_submit() sets them before anything can see the record). */
#define S_HIDX 0     /* timer heap index + 1; 0: not in the heap (tm_mu) */
#define S_TMST 1     /* TM_* bits, atomic */
#define S_SENT 2     /* sendfile: bytes sent so far */
#define S_PIDFD 3    /* wait_process: the pidfd, or -1 */
#define TM_EXPIRED 0x1   /* the operation's timeout fired */
#define TM_ISTIMEOUT 0x2 /* timer: its heap entry is its timeout (shorter
                            than its delay), so it ends in FIOCP_ETIMEDOUT */

typedef struct opq_s {
  fiocp_op_t* head;
  fiocp_op_t* tail;
} opq_t;

/* What the backend knows about one descriptor number. Created the first
 * time a readiness-driven operation is submitted on a descriptor that
 * exists, kept until destroy(). */
typedef struct fdst_s {
  pthread_mutex_t mu;
  int fd;
  int registered;        /* ADDed to epoll (for the file the number named
                            then; epoll may have dropped it since) */
  uint32_t gen;          /* in the epoll data; bumped when the queued
                            operations are found to belong to a closed file */
  opq_t q[NQ];           /* DIR_IN, DIR_OUT, DIR_POLL */
  uint8_t kind;          /* FD_KIND_*: whether it is a stream socket */
  uint8_t recv_drained;  /* its last recv found it empty: see fd_submit() */
} fdst_t;

enum { FD_KIND_UNKNOWN, FD_KIND_STREAM, FD_KIND_OTHER };

/* Descriptor table: a hash of descriptor states keyed by descriptor number
 * (open addressing, linear probing, at most half full), so that its size
 * follows the descriptors used, not their numbers (a table indexed by the
 * number took 16 GB of address space for descriptor 2**31 - 1). Entries
 * are never removed. Readers probe it without a lock; it grows under
 * tab_mu by copying into a table twice the size, and the smaller tables
 * stay allocated (chained by older) until destroy(), so a reader holding
 * an old one is never left with freed memory. */
typedef struct fdtab_s {
  size_t cap;            /* a power of two, 2**(32 - shift) */
  size_t used;
  unsigned shift;
  struct fdtab_s* older;
  fdst_t* slot[];
} fdtab_t;

#define FDTAB_MIN_BITS 6

typedef struct pool_s {
  pthread_mutex_t mu;
  pthread_cond_t cv;     /* work queued, or stop */
  opq_t q;
  size_t qlen;
  int nthreads;
  int idle;              /* threads waiting on cv */
  int stop;
  pthread_t th[POOL_THREADS];
} pool_t;

/* Timers and timeouts: the min-heap (timerheap.h) under mu, and a timerfd
 * armed to its earliest deadline (see the head comment); h.armed is when
 * the timerfd fires (INT64_MAX: disarmed). */
typedef struct timers_s {
  pthread_mutex_t mu;
  fiocp_theap_t h;
  int fd;                /* timerfd, -1 until first needed (atomic reads
                            outside mu) */
} timers_t;

typedef struct ep_s {
  fiocp_hub_t hub; /* first: see FIOCP__HUB() */
  fiocp_port_t* port;
  int epfd;
  int evfd;              /* kick(): wakes a poller blocked in epoll_wait */
  int closing;           /* atomic: shutdown() began cancelling */
  pthread_mutex_t tab_mu;
  fdtab_t* tab;          /* atomic pointer */
  pthread_mutex_t done_mu;
  opq_t done;            /* finished by poll(), taken by harvest() */
  pool_t pool;
  timers_t tm;
} ep_t;

/* 0 once the kernel said ENOSYS to preadv2 (before 4.6). */
static int nowait_works = 1;

/* ---- Small helpers ------------------------------------------------------ */

static uintptr_t bk_get(const fiocp_op_t* op) {
  return __atomic_load_n(&op->bk, __ATOMIC_ACQUIRE);
}

static void bk_set(fiocp_op_t* op, uintptr_t v) {
  __atomic_store_n(&op->bk, v, __ATOMIC_RELEASE);
}

/* Moves op to a new place, keeping its facts. */
static void bk_move(fiocp_op_t* op, uintptr_t where, const void* ptr) {
  bk_set(op, (uintptr_t)ptr | where | (bk_get(op) & BK_FLAGS));
}

static int op_dir(int kind) {
  switch (kind) {
    case FIOCP_OP_WRITE:
    case FIOCP_OP_SEND:
    case FIOCP_OP_SENDTO:
    case FIOCP_OP_CONNECT:
    case FIOCP_OP_SENDMSG:
    case FIOCP_OP_SENDFILE:
      return DIR_OUT;
    case FIOCP_OP_POLL:
      return DIR_POLL;
    default:
      return DIR_IN;
  }
}

/* The descriptor an operation waits on: a wait_process waits on its pidfd,
 * every other kind on its handle. */
static int op_fd(const fiocp_op_t* op) {
  if (op->kind == FIOCP_OP_WAIT_PROCESS)
    return (int)op->addr->scratch.i64[S_PIDFD];
  return (int)op->handle;
}

/* The readiness events a poll asks for (ERR and HUP come unasked). */
static uint32_t poll_wanted(const fiocp_op_t* op) {
  return op->len & (uint32_t)(FIOCP_POLLIN | FIOCP_POLLPRI | FIOCP_POLLOUT);
}

static void q_push(opq_t* q, fiocp_op_t* op) {
  op->next = NULL;
  if (q->tail) q->tail->next = op;
  else q->head = op;
  q->tail = op;
}

static fiocp_op_t* q_pop(opq_t* q) {
  fiocp_op_t* op = q->head;
  if (op != NULL) {
    q->head = op->next;
    if (q->head == NULL) q->tail = NULL;
    op->next = NULL;
  }
  return op;
}

/* Unlinks op from q; returns 1 if it was there. */
static int q_remove(opq_t* q, fiocp_op_t* op) {
  fiocp_op_t *prev = NULL, *cur = q->head;
  while (cur != NULL && cur != op) {
    prev = cur;
    cur = cur->next;
  }
  if (cur == NULL) return 0;
  if (prev) prev->next = op->next;
  else q->head = op->next;
  if (q->tail == op) q->tail = prev;
  op->next = NULL;
  return 1;
}

/* Appends every operation of src to dst and empties src. */
static void q_splice(opq_t* dst, opq_t* src) {
  if (src->head == NULL) return;
  if (dst->tail) dst->tail->next = src->head;
  else dst->head = src->head;
  dst->tail = src->tail;
  src->head = src->tail = NULL;
}

static void finish_op(ep_t* e, fiocp_op_t* op);
static int tm_expired(const fiocp_op_t* op);
static void ep_harvest(void* ctx);
static void ep_kick(void* ctx);

/* Appends q to e->done (for harvest()), in order. Any lock but done_mu
 * may be held. */
static void done_splice(ep_t* e, opq_t* q) {
  if (q->head == NULL) return;
  pthread_mutex_lock(&e->done_mu);
  q_splice(&e->done, q);
  pthread_mutex_unlock(&e->done_mu);
}

/* Moves e->done into the hub's queue from outside poll() and wakes a
 * waiter for it (or the poller, when nobody else could take it). No lock
 * of ours held. */
static void publish_done(ep_t* e) {
  int kick;
  pthread_mutex_lock(&e->hub.mu);
  ep_harvest(e);
  fiocp__hub_wake_locked(&e->hub);
  kick = e->hub.poller_active && e->hub.waiters == NULL;
  pthread_mutex_unlock(&e->hub.mu);
  if (kick) ep_kick(e);
}

/* Hands a finished op (res set, out of every place) to the hub. A
 * multishot op goes through e->done, behind the children it produced
 * (see the head comment). No lock of ours may be held. */
static void deliver(ep_t* e, fiocp_op_t* op) {
  bk_move(op, BK_NONE, NULL);
  finish_op(e, op);
  if (op->flags & FIOCP_OPF_MULTISHOT) {
    opq_t one = {NULL, NULL};
    q_push(&one, op);
    done_splice(e, &one);
    publish_done(e);
  } else {
    fiocp__hub_complete(&e->hub, op, 1);
  }
}

/* Completes op with res from outside poll(): no lock of ours may be held. */
static void complete(ep_t* e, fiocp_op_t* op, int64_t res) {
  op->res = res;
  deliver(e, op);
}

/* Completes every operation of q (their res already set). */
static void complete_all(ep_t* e, opq_t* q) {
  fiocp_op_t* op;
  while ((op = q_pop(q)) != NULL) deliver(e, op);
}

/* ---- Non-blocking attempts ---------------------------------------------- */

static int64_t sys_result(ssize_t r) {
  if (r >= 0) return (int64_t)r;
  if (errno == EAGAIN || errno == EWOULDBLOCK) return PENDING;
  return -(int64_t)errno;
}

/* Reads or writes a stream that is not a socket (a pipe, a FIFO, a tty, a
 * character device) without blocking. */
static int64_t stream_io(fiocp_op_t* op, int wr) {
  int fd = (int)op->handle;
  int64_t pos = (bk_get(op) & BK_NOPOS) ? -1 : op->offset;
  int saved, rc;
  ssize_t r;
#ifdef SYS_preadv2
  if (__atomic_load_n(&nowait_works, __ATOMIC_RELAXED)) {
    struct iovec iov;
    uint64_t upos = (uint64_t)pos;
    iov.iov_base = op->buf;
    iov.iov_len = op->len;
    /* The raw ABI splits the offset in two longs; on 64-bit kernels the
     * high half is ignored. */
    do {
      r = syscall(wr ? SYS_pwritev2 : SYS_preadv2, fd, &iov, 1,
                  (unsigned long)upos, (unsigned long)(upos >> 16 >> 16),
                  RWF_NOWAIT);
    } while (r < 0 && errno == EINTR);
    if (r >= 0 || (errno != EOPNOTSUPP && errno != ENOSYS))
      return sys_result(r);
    if (errno == ENOSYS)
      __atomic_store_n(&nowait_works, 0, __ATOMIC_RELAXED);
  }
#endif
  /* No RWF_NOWAIT for this file (a tty, some character devices): make the
   * file non-blocking for the call. */
  rc = fiocp__nb_enter(fd, &saved);
  if (rc < 0) return rc;
  do {
    if (pos < 0)
      r = wr ? write(fd, op->buf, op->len) : read(fd, op->buf, op->len);
    else if (wr)
      r = pwrite(fd, op->buf, op->len, (off_t)pos);
    else
      r = pread(fd, op->buf, op->len, (off_t)pos);
  } while (r < 0 && errno == EINTR);
  fiocp__nb_leave(fd, saved);
  return sys_result(r);
}

static void msg_prep(fiocp_op_t* op, int recv) {
  fiocp_addr_t* a = op->addr;
  memset(&a->msg, 0, sizeof(a->msg));
  a->iov.iov_base = op->buf;
  a->iov.iov_len = op->len;
  a->msg.msg_iov = &a->iov;
  a->msg.msg_iovlen = 1;
  a->msg.msg_name = &a->ss;
  a->msg.msg_namelen = recv ? (socklen_t)sizeof(a->ss) : a->sslen;
}

static int64_t do_accept(fiocp_op_t* op) {
  int fd = (int)op->handle;
  fiocp_addr_t* a = op->addr;
  int saved, rc, nfd;
  rc = fiocp__nb_enter(fd, &saved);
  if (rc < 0) return rc;
  do {
    a->sslen = (fiocp_socklen_t)sizeof(a->ss);
    nfd = accept4(fd, (struct sockaddr*)&a->ss, &a->sslen, SOCK_CLOEXEC);
  } while (nfd < 0 && errno == EINTR);
  fiocp__nb_leave(fd, saved);
  return sys_result(nfd);
}

/* Starts a connect, or, once the socket reported writability, reads its
 * outcome. */
static int64_t do_connect(fiocp_op_t* op) {
  int fd = (int)op->handle;
  fiocp_addr_t* a = op->addr;
  int saved, rc, err;
  if (!(bk_get(op) & BK_STARTED)) {
    int tries = 0;
    rc = fiocp__nb_enter(fd, &saved);
    if (rc < 0) return rc;
    do {
      rc = connect(fd, (const struct sockaddr*)&a->ss, a->sslen);
      err = rc < 0 ? errno : 0;
      /* A socket whose earlier non-blocking connect failed (its error
       * already read with SO_ERROR) is still "connecting" to the kernel:
       * the next connect() only reports ECONNABORTED and resets it. Start
       * the new connection then, as a blocking connect and io_uring do
       * (the kernel's seen_econnaborted; liburing test/connect-rep.c). */
    } while (err == ECONNABORTED && ++tries < 2);
    fiocp__nb_leave(fd, saved);
    if (rc == 0) return 0;
    if (err == EINPROGRESS || err == EINTR) {
      /* EINTR: the connection goes on asynchronously, as EINPROGRESS. */
      bk_set(op, bk_get(op) | BK_STARTED);
      return PENDING;
    }
    /* EAGAIN here is not "try later": a Unix socket's listener has a full
     * backlog, and no readiness event reports the end of that. */
    return -(int64_t)err;
  } else {
    socklen_t len = sizeof(err);
    struct sockaddr_storage peer;
    socklen_t plen = sizeof(peer);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
      return -(int64_t)errno;
    if (err != 0) return -(int64_t)err;
    /* No error pending: connected, unless the wake-up was for something
     * else and the handshake is still going on. */
    if (getpeername(fd, (struct sockaddr*)&peer, &plen) == 0) return 0;
    if (errno == ENOTCONN) return PENDING;
    return -(int64_t)errno;
  }
}

/* sendmsg/recvmsg with the binding's iovec array, control buffer and
 * address (fiocp.h, FIOCP_OP_SENDMSG). The msghdr lives on the stack: the
 * call never outlasts it. A receive writes back what the kernel reported,
 * only on success, so an EAGAIN leaves the inputs for the next try. */
static int64_t do_msg(fiocp_op_t* op, int recv) {
  int fd = (int)op->handle;
  fiocp_addr_t* a = op->addr;
  struct msghdr m;
  ssize_t r;
  memset(&m, 0, sizeof(m));
  m.msg_iov = (struct iovec*)a->iovs;
  m.msg_iovlen = a->niov;
  m.msg_control = a->controllen > 0 ? a->control : NULL;
  m.msg_controllen = a->controllen;
  if (recv) {
    m.msg_name = &a->ss;
    m.msg_namelen = (socklen_t)sizeof(a->ss);
  } else if (a->sslen > 0) {
    m.msg_name = &a->ss;
    m.msg_namelen = a->sslen;
  }
  do {
    /* MSG_CMSG_CLOEXEC: received descriptors must not leak into children
     * spawned before the user could set the flag. */
    r = recv ? recvmsg(fd, &m, a->msgflags | MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
             : sendmsg(fd, &m, a->msgflags | MSG_DONTWAIT | MSG_NOSIGNAL);
  } while (r < 0 && errno == EINTR);
  if (r >= 0 && recv) {
    int own = MSG_CMSG_CLOEXEC & ~a->msgflags;
    a->controllen = (uint32_t)m.msg_controllen;
    /* Linux echoes MSG_CMSG_CLOEXEC into msg_flags: the user did not ask
     * for it, so it is not news to them. */
    a->msgflags = m.msg_flags & ~own;
    a->sslen = m.msg_namelen;
  }
  return sys_result(r);
}

/* sendfile(2) from addr->src at offset + what was sent before, until the
 * count is sent, end of file, or the socket is full (PENDING, progress
 * kept in scratch). The offset pointer form never moves the file's
 * position. An error after some bytes reports the bytes. */
static int64_t do_sendfile(fiocp_op_t* op) {
  int fd = (int)op->handle;
  fiocp_addr_t* a = op->addr;
  int64_t sent = a->scratch.i64[S_SENT], res;
  int saved, rc;
  if (op->offset < 0) return -EINVAL;
  /* sendfile has no per-call non-blocking flag. */
  rc = fiocp__nb_enter(fd, &saved);
  if (rc < 0) return sent > 0 ? sent : rc;
  for (;;) {
    int64_t pos = op->offset + sent;
    off_t off = (off_t)pos;
    ssize_t r;
    if ((int64_t)off != pos) { /* a 32-bit off_t */
      res = sent > 0 ? sent : -EOVERFLOW;
      break;
    }
    r = sendfile(fd, (int)a->src, &off, (size_t)((int64_t)op->len - sent));
    if (r > 0) {
      sent += r;
      if (sent >= (int64_t)op->len) {
        res = sent;
        break;
      }
    } else if (r == 0) {
      res = sent; /* end of file */
      break;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      res = PENDING; /* wait for writability, keep the progress */
      break;
    } else if (errno != EINTR) {
      res = sent > 0 ? sent : -(int64_t)errno;
      break;
    }
  }
  fiocp__nb_leave(fd, saved);
  a->scratch.i64[S_SENT] = sent;
  return res;
}

/* A non-reaping waitid() on the pidfd: PENDING while the process runs,
 * else its status as waitpid() would give it, or -errno (ECHILD: not a
 * child of ours, or already reaped). */
static int64_t do_wait_process(fiocp_op_t* op) {
  siginfo_t si;
  int r;
  memset(&si, 0, sizeof(si)); /* si_pid stays 0 if nothing exited */
  do {
    r = waitid((idtype_t)P_PIDFD, (id_t)op_fd(op), &si,
               WEXITED | WNOHANG | WNOWAIT);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return -(int64_t)errno;
  if (si.si_pid == 0) return PENDING;
  switch (si.si_code) {
    case CLD_EXITED:
      return (int64_t)((si.si_status & 0xff) << 8);
    case CLD_KILLED:
      return (int64_t)(si.si_status & 0x7f);
    case CLD_DUMPED:
      return (int64_t)((si.si_status & 0x7f) | 0x80);
    default: /* WEXITED reports nothing else */
      return -EINVAL;
  }
}

/* A poll's try: poll(2) without waiting. The events that fired, or
 * PENDING. */
static int64_t do_poll(fiocp_op_t* op) {
  struct pollfd p;
  int r;
  uint32_t m;
  p.fd = (int)op->handle;
  p.events = (short)poll_wanted(op);
  p.revents = 0;
  do {
    r = poll(&p, 1, 0);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return -(int64_t)errno;
  if (p.revents & POLLNVAL) return -EBADF;
  m = (uint32_t)p.revents & (poll_wanted(op) | POLLERR | POLLHUP);
  return m != 0 ? (int64_t)m : PENDING;
}

/* A pooled recv's try (FIOCP_OPF_POOLED, fiocp__pool_recv): the buffer's
 * id goes to op->offset when data came; EAGAIN is PENDING. */
static int64_t pooled_recv(fiocp_op_t* op) {
  int64_t id = -1;
  int64_t r = fiocp__pool_recv(op->pool, (int)op->handle, op->len, &id);
  if (r > 0) op->offset = id;
  if (r == -EAGAIN || r == -EWOULDBLOCK) return PENDING;
  return r;
}

/* Runs op without blocking. Returns bytes (or the new descriptor, or 0),
 * -errno, or PENDING if it would block. */
static int64_t try_io(fiocp_op_t* op) {
  int fd = (int)op->handle;
  ssize_t r;
  switch (op->kind) {
    case FIOCP_OP_READ:
      if (!(bk_get(op) & BK_SOCKIO)) return stream_io(op, 0);
      /* fall through */
    case FIOCP_OP_RECV:
      if (op->flags & FIOCP_OPF_POOLED) return pooled_recv(op);
      do {
        r = recv(fd, op->buf, op->len, MSG_DONTWAIT);
      } while (r < 0 && errno == EINTR);
      return sys_result(r);
    case FIOCP_OP_WRITE:
      if (!(bk_get(op) & BK_SOCKIO)) return stream_io(op, 1);
      /* fall through */
    case FIOCP_OP_SEND:
      do {
        r = send(fd, op->buf, op->len, MSG_DONTWAIT | MSG_NOSIGNAL);
      } while (r < 0 && errno == EINTR);
      return sys_result(r);
    case FIOCP_OP_RECVFROM:
      do {
        msg_prep(op, 1);
        r = recvmsg(fd, &op->addr->msg, MSG_DONTWAIT);
      } while (r < 0 && errno == EINTR);
      if (r >= 0) op->addr->sslen = op->addr->msg.msg_namelen;
      return sys_result(r);
    case FIOCP_OP_SENDTO:
      do {
        msg_prep(op, 0);
        r = sendmsg(fd, &op->addr->msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      } while (r < 0 && errno == EINTR);
      return sys_result(r);
    case FIOCP_OP_ACCEPT:
      return do_accept(op);
    case FIOCP_OP_CONNECT:
      return do_connect(op);
    case FIOCP_OP_SENDMSG:
      return do_msg(op, 0);
    case FIOCP_OP_RECVMSG:
      return do_msg(op, 1);
    case FIOCP_OP_SENDFILE:
      return do_sendfile(op);
    case FIOCP_OP_WAIT_PROCESS:
      return do_wait_process(op);
    case FIOCP_OP_POLL:
      return do_poll(op);
    default:
      return -EINVAL;
  }
}

/* Turns one result of multishot op into a child record appended to kids:
 * res, and the pooled buffer (op->offset), move to it; an accept's child
 * gets a copy of the peer's address when memory allows (the binding asks
 * getpeername() otherwise). Returns 0, or -1 when no child could be made:
 * op then carries the result itself and ends (nothing is lost). */
static int child_of(fiocp_op_t* op, int64_t res, opq_t* kids) {
  fiocp_op_t* child = fiocp__child_new(op);
  if (child == NULL) return -1;
  child->res = res;
  child->offset = op->offset;
  op->offset = -1;
  if (op->kind == FIOCP_OP_ACCEPT) {
    fiocp_addr_t* a = (fiocp_addr_t*)calloc(1, sizeof(*a));
    if (a != NULL) {
      memcpy(&a->ss, &op->addr->ss, sizeof(a->ss));
      a->sslen = op->addr->sslen;
      child->addr = a;
    }
  }
  q_push(kids, child);
  return 0;
}

/* Runs multishot op: up to MULTISHOT_BURST results, each a child appended
 * to kids. Returns PENDING while op goes on (it would block, or its burst
 * is spent and the re-armed interest brings it back), else the result that
 * ends it: an error (FIOCP_ENOBUFS among them), end of stream for a recv,
 * or a result op carries because no child could be made. */
static int64_t run_multishot(fiocp_op_t* op, opq_t* kids) {
  int n;
  for (n = 0; n < MULTISHOT_BURST; n++) {
    int64_t res = try_io(op);
    if (res == PENDING) return PENDING;
    if (res < 0 || (res == 0 && op->kind == FIOCP_OP_RECV)) return res;
    if (child_of(op, res, kids) < 0) return res;
  }
  return PENDING;
}

/* ---- Descriptor table --------------------------------------------------- */

/* Fibonacci hashing: the top bits of fd times 2**32 / phi, which spreads
 * both dense numbers and numbers that share their low bits. */
static size_t fd_slot(const fdtab_t* t, int fd) {
  return (size_t)(((uint32_t)fd * 2654435769u) >> t->shift);
}

static fdst_t* tab_find(const fdtab_t* t, int fd) {
  size_t i;
  if (t == NULL) return NULL;
  for (i = fd_slot(t, fd);; i = (i + 1) & (t->cap - 1)) {
    fdst_t* st = __atomic_load_n(&t->slot[i], __ATOMIC_ACQUIRE);
    if (st == NULL || st->fd == fd) return st;
  }
}

static void tab_insert(fdtab_t* t, fdst_t* st) {
  size_t i = fd_slot(t, st->fd);
  while (t->slot[i] != NULL) i = (i + 1) & (t->cap - 1);
  __atomic_store_n(&t->slot[i], st, __ATOMIC_RELEASE);
  t->used++;
}

static fdst_t* fdst_find(ep_t* e, int fd) {
  return tab_find(__atomic_load_n(&e->tab, __ATOMIC_ACQUIRE), fd);
}

/* The state of fd, created if need be: into *out, returning 0, -EBADF if
 * fd names no open file (no state is kept for numbers that were never
 * descriptors), or FIOCP_ENOMEM. */
static int fdst_get(ep_t* e, int fd, fdst_t** out) {
  fdst_t* st = fdst_find(e, fd);
  fdtab_t* t;
  void* mem;
  int rc = FIOCP_ENOMEM;
  *out = st; /* NULL unless found: set on every path */
  if (st != NULL) return 0;
  pthread_mutex_lock(&e->tab_mu);
  t = e->tab;
  st = tab_find(t, fd);
  if (st != NULL) goto done;
  if (fcntl(fd, F_GETFD) < 0) {
    rc = -errno;
    goto fail;
  }
  if (t == NULL || (t->used + 1) * 2 > t->cap) {
    unsigned bits = t ? 33 - t->shift : FDTAB_MIN_BITS;
    size_t cap = (size_t)1 << bits, i;
    fdtab_t* nt = (fdtab_t*)calloc(1, sizeof(*nt) + cap * sizeof(fdst_t*));
    if (nt == NULL) goto fail;
    nt->cap = cap;
    nt->shift = 32 - bits;
    nt->older = t;
    if (t != NULL)
      for (i = 0; i < t->cap; i++)
        if (t->slot[i] != NULL) tab_insert(nt, t->slot[i]);
    __atomic_store_n(&e->tab, nt, __ATOMIC_RELEASE);
    t = nt;
  }
  if (posix_memalign(&mem, FDST_ALIGN, sizeof(fdst_t)) != 0) goto fail;
  st = (fdst_t*)mem;
  memset(st, 0, sizeof(*st));
  if (pthread_mutex_init(&st->mu, NULL) != 0) {
    free(st);
    goto fail;
  }
  st->fd = fd;
  tab_insert(t, st);
done:
  pthread_mutex_unlock(&e->tab_mu);
  *out = st;
  return 0;
fail:
  pthread_mutex_unlock(&e->tab_mu);
  return rc;
}

static uint32_t interest(const fdst_t* st) {
  uint32_t ev = (st->q[DIR_IN].head ? (uint32_t)EPOLLIN : 0u) |
                (st->q[DIR_OUT].head ? (uint32_t)EPOLLOUT : 0u);
  const fiocp_op_t* op;
  /* EPOLLERR is reported unasked; asking for it keeps the interest
   * non-zero (armed) for a poll that wants only ERR and HUP. */
  for (op = st->q[DIR_POLL].head; op != NULL; op = op->next)
    ev |= poll_wanted(op) | (uint32_t)EPOLLERR;
  return ev;
}

static int ctl(ep_t* e, fdst_t* st, int opcode, uint32_t events) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof(ev));
  ev.events = events | EPOLLONESHOT;
  ev.data.u64 = ((uint64_t)st->gen << 32) | (uint32_t)st->fd;
  return epoll_ctl(e->epfd, opcode, st->fd, &ev) < 0 ? -errno : 0;
}

/* The file the queued operations were meant for is no longer at this
 * descriptor number: moves every queued operation but keep into out with
 * -EBADF, and forgets the registration. st->mu held. */
static void orphan_locked(fdst_t* st, fiocp_op_t* keep, opq_t* out) {
  int d;
  for (d = 0; d < NQ; d++) {
    fiocp_op_t* op;
    opq_t rest = {NULL, NULL};
    while ((op = q_pop(&st->q[d])) != NULL) {
      if (op == keep) {
        q_push(&rest, op);
      } else {
        op->res = -EBADF;
        bk_move(op, BK_NONE, NULL);
        q_push(out, op);
      }
    }
    st->q[d] = rest;
  }
  st->gen++;
  st->registered = 0;
  st->kind = FD_KIND_UNKNOWN; /* the number names another file now */
  st->recv_drained = 0;
}

/* Arms the interest of st for what its queues hold, right after newop was
 * queued. Operations found to belong to a closed file go to orphans.
 * Returns 0 or -errno (-EPERM: epoll does not support this file). st->mu
 * held. */
static int arm_locked(ep_t* e, fdst_t* st, fiocp_op_t* newop, opq_t* orphans) {
  int rc;
  if (st->registered) {
    rc = ctl(e, st, EPOLL_CTL_MOD, interest(st));
    if (rc == 0) return 0;
    if (rc != -ENOENT && rc != -EBADF) return rc;
    /* ENOENT: epoll dropped the registration, so the file it was for was
     * closed, and the number now names another file. EBADF: it names
     * nothing. Either way what was queued before newop cannot finish. */
    orphan_locked(st, newop, orphans);
    if (rc == -EBADF) return rc;
  }
  rc = ctl(e, st, EPOLL_CTL_ADD, interest(st));
  if (rc == -EEXIST) rc = ctl(e, st, EPOLL_CTL_MOD, interest(st));
  if (rc == 0) st->registered = 1;
  return rc;
}

/* ---- File pool ---------------------------------------------------------- */

/* A read of a regular file whose data is all in the page cache, done at
 * submit time with RWF_NOWAIT (a page-cache hit costs one call instead of a
 * trip through the pool). Returns the result, or PENDING when the pool must
 * do it: data not cached, RWF_NOWAIT unsupported, an error (the pool's
 * blocking call gives the authoritative one), or a short read that is not
 * the end of the file (RWF_NOWAIT stops at the first page not cached, and
 * callers of files rightly expect short reads only at the end). Only for a
 * given offset: a read at the current position cannot be redone, and not
 * for O_DIRECT. */
static int64_t cached_read(fiocp_op_t* op, const struct stat* sb) {
#ifdef SYS_preadv2
  struct iovec iov;
  ssize_t r;
  int fl;
  if (op->kind != FIOCP_OP_READ || op->offset < 0 ||
      !__atomic_load_n(&nowait_works, __ATOMIC_RELAXED))
    return PENDING;
  /* O_DIRECT reads bypass the page cache: RWF_NOWAIT only spares them the
   * lock waits, and a synchronous call still waits for the device. */
  fl = fcntl((int)op->handle, F_GETFL);
  if (fl < 0 || (fl & O_DIRECT)) return PENDING;
  iov.iov_base = op->buf;
  iov.iov_len = op->len;
  do {
    r = syscall(SYS_preadv2, (int)op->handle, &iov, 1,
                (unsigned long)(uint64_t)op->offset,
                (unsigned long)((uint64_t)op->offset >> 16 >> 16), RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == ENOSYS) __atomic_store_n(&nowait_works, 0, __ATOMIC_RELAXED);
    return PENDING;
  }
  /* Written as a difference: both are >= 0, so it cannot overflow. */
  if ((uint64_t)r == op->len ||
      (int64_t)r >= (int64_t)sb->st_size - op->offset)
    return (int64_t)r;
#else
  (void)op;
  (void)sb;
#endif
  return PENDING;
}

static int64_t file_io(fiocp_op_t* op) {
  int fd = (int)op->handle;
  ssize_t r;
  if (op->kind == FIOCP_OP_FSYNC) {
    int rc;
    do {
      rc = op->len == 1 ? fdatasync(fd) : fsync(fd);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -(int64_t)errno : 0;
  }
  do {
    if (op->kind == FIOCP_OP_READ)
      r = op->offset < 0 ? read(fd, op->buf, op->len)
                         : pread(fd, op->buf, op->len, (off_t)op->offset);
    else
      r = op->offset < 0 ? write(fd, op->buf, op->len)
                         : pwrite(fd, op->buf, op->len, (off_t)op->offset);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? -(int64_t)errno : (int64_t)r;
}

static void* pool_main(void* arg) {
  ep_t* e = (ep_t*)arg;
  pool_t* p = &e->pool;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    fiocp_op_t* op;
    int64_t res;
    while (p->q.head == NULL && !p->stop) {
      p->idle++;
      pthread_cond_wait(&p->cv, &p->mu);
      p->idle--;
    }
    op = q_pop(&p->q);
    if (op == NULL) break; /* stop, nothing left */
    p->qlen--;
    bk_move(op, BK_POOLRUN, NULL);
    pthread_mutex_unlock(&p->mu);
    res = file_io(op);
    pthread_mutex_lock(&p->mu);
    /* Under the pool's lock, so that cancel() sees either "running" or
     * "done", never a half-way state. */
    bk_move(op, BK_NONE, NULL);
    pthread_mutex_unlock(&p->mu);
    complete(e, op, res);
    pthread_mutex_lock(&p->mu);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Starts one more pool thread, with every signal blocked so that signals
 * keep going to the Python threads. p->mu held. Returns 0 or -errno. */
static int pool_start_locked(ep_t* e) {
  pool_t* p = &e->pool;
  sigset_t all, old;
  int rc;
  sigfillset(&all);
  rc = pthread_sigmask(SIG_SETMASK, &all, &old);
  if (rc != 0) return -rc;
  rc = pthread_create(&p->th[p->nthreads], NULL, pool_main, e);
  (void)pthread_sigmask(SIG_SETMASK, &old, NULL); /* cannot fail: old is
                                                     a valid set */
  if (rc != 0) return -rc;
  p->nthreads++;
  return 0;
}

/* Hands op to the file pool. The operation's completion is owed either
 * way. */
static void pool_submit(ep_t* e, fiocp_op_t* op) {
  pool_t* p = &e->pool;
  int64_t fail = 0;
  pthread_mutex_lock(&p->mu);
  if (__atomic_load_n(&e->closing, __ATOMIC_SEQ_CST)) {
    /* shutdown() has swept the pool's queue already, or is about to; it
     * would not see this one. */
    op->flags |= FIOCP_OPF_CANCELLED;
    fail = -ECANCELED;
  } else if (tm_expired(op)) {
    /* Its timeout fired before it got here (see fd_submit()). */
    op->flags |= FIOCP_OPF_CANCELLED;
    fail = FIOCP_ETIMEDOUT;
  } else {
    q_push(&p->q, op);
    p->qlen++;
    bk_move(op, BK_POOLQ, NULL);
    if ((size_t)p->idle < p->qlen && p->nthreads < POOL_THREADS) {
      int rc = pool_start_locked(e);
      if (rc < 0 && p->nthreads == 0) {
        /* No thread at all to run it. */
        q_remove(&p->q, op);
        p->qlen--;
        fail = rc;
      }
    }
    if (fail == 0) pthread_cond_signal(&p->cv);
  }
  pthread_mutex_unlock(&p->mu);
  if (fail != 0) complete(e, op, fail);
}

/* ---- Timers and timeouts ------------------------------------------------ */

static int64_t now_ns(void) {
  struct timespec ts;
  /* CLOCK_MONOTONIC with a valid pointer cannot fail. */
  (void)clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* now + ns, saturating (a delay of years must not wrap into the past). */
static int64_t deadline_after(int64_t ns) {
  int64_t now = now_ns();
  if (ns < 0) ns = 0;
  return ns > INT64_MAX - now ? INT64_MAX : now + ns;
}

/* Whether op's timeout has fired (op carries an extension). */
static int tm_expired(const fiocp_op_t* op) {
  return op->timeout_ns > 0 &&
         (__atomic_load_n(&op->addr->scratch.i64[S_TMST], __ATOMIC_SEQ_CST) &
          TM_EXPIRED);
}

/* Sets the timerfd to fire the heap's slack after when (absolute), or
 * disarms it (when == INT64_MAX). Either way its expiration count drops to
 * zero, which is what clears its readiness (no read() needed). tm_mu
 * held. */
static int tm_arm_locked(timers_t* t, int64_t when) {
  struct itimerspec its;
  memset(&its, 0, sizeof(its));
  if (when != INT64_MAX) {
    when = fiocp__th_fire_at(&t->h, when);
    its.it_value.tv_sec = (time_t)(when / 1000000000);
    its.it_value.tv_nsec = (long)(when % 1000000000);
  }
  if (timerfd_settime(t->fd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
    return -errno;
  t->h.armed = when;
  return 0;
}

/* Creates the timerfd and adds it to the epoll set (level-triggered: the
 * expiry's timerfd_settime() clears it). tm_mu held. */
static int tm_open_locked(ep_t* e) {
  struct epoll_event ev;
  int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  if (fd < 0) return -errno;
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN;
  ev.data.u64 = TIMER_DATA;
  if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
    int rc = -errno;
    (void)close(fd); /* never failed to open: nothing to report */
    return rc;
  }
  __atomic_store_n(&e->tm.fd, fd, __ATOMIC_RELEASE);
  return 0;
}

/* Adds op's deadline to the heap. For a timer (its only place), refuses
 * with -ECANCELED once shutdown() began: the sweep may have passed. Returns
 * 0, -ECANCELED, FIOCP_ENOMEM or -errno (timerfd). */
static int tm_add(ep_t* e, fiocp_op_t* op, int64_t when) {
  timers_t* t = &e->tm;
  int rc = 0;
  pthread_mutex_lock(&t->mu);
  if (op->kind == FIOCP_OP_TIMER &&
      __atomic_load_n(&e->closing, __ATOMIC_SEQ_CST)) {
    rc = -ECANCELED;
    goto out;
  }
  if (t->fd < 0 && (rc = tm_open_locked(e)) < 0) goto out;
  if ((rc = fiocp__th_push(&t->h, op, when)) < 0) goto out;
  /* Arm only for a new earliest deadline: the timerfd is already set to
   * fire no later than every other entry. */
  if (fiocp__th_needs_arm(&t->h, when) && (rc = tm_arm_locked(t, when)) < 0)
    (void)fiocp__th_remove(&t->h, op);
out:
  pthread_mutex_unlock(&t->mu);
  return rc;
}

/* Removes op's entry if it still has one. The timerfd stays armed: an
 * early wake finds nothing due and re-arms (cheaper than a settime per
 * removal). Returns 1 if removed. No lock of ours held. */
static int tm_del(ep_t* e, fiocp_op_t* op) {
  timers_t* t = &e->tm;
  int found;
  pthread_mutex_lock(&t->mu);
  found = fiocp__th_remove(&t->h, op);
  pthread_mutex_unlock(&t->mu);
  return found;
}

enum { CC_NONE = 0, CC_TAKEN, CC_RUNNING };
static int cancel_core(ep_t* e, fiocp_op_t* op);

/* The poller's part when the timerfd fired: pops every due entry; timers
 * and timed-out operations go to done (res set). No lock of ours held. */
static void tm_expire(ep_t* e, opq_t* done) {
  timers_t* t = &e->tm;
  int64_t now = now_ns();
  fiocp_op_t* op;
  pthread_mutex_lock(&t->mu);
  while ((op = fiocp__th_pop_due(&t->h, now)) != NULL) {
    if (op->kind == FIOCP_OP_TIMER) {
      if (__atomic_load_n(&op->addr->scratch.i64[S_TMST], __ATOMIC_RELAXED) &
          TM_ISTIMEOUT) {
        op->flags |= FIOCP_OPF_CANCELLED;
        op->res = FIOCP_ETIMEDOUT;
      } else {
        op->res = 0;
      }
      q_push(done, op);
      continue;
    }
    /* Marked first, so that a submit still on its way to a queue sees it
     * there; then cancelled as cancel() would. tm_mu keeps the record from
     * completing and being reused under our feet. */
    __atomic_fetch_or(&op->addr->scratch.i64[S_TMST], TM_EXPIRED,
                      __ATOMIC_SEQ_CST);
    if (cancel_core(e, op) == CC_TAKEN) {
      op->res = FIOCP_ETIMEDOUT;
      q_push(done, op);
    }
  }
  /* If it fired, it stays readable until set again: set it to the next
   * deadline, or disarm it. (If it has not, a submit set it since: the
   * event was stale, and it is not readable any more.) Cannot fail: a
   * valid timerfd and a valid absolute time. */
  if (t->h.armed <= now) (void)tm_arm_locked(t, fiocp__th_earliest(&t->h));
  pthread_mutex_unlock(&t->mu);
}

/* Takes every pending timer out of the heap (shutdown): they go to out,
 * -ECANCELED. Entries of other operations stay: those complete through
 * their own places, which remove them. No lock of ours held. */
static void tm_cancel_timers(ep_t* e, opq_t* out) {
  timers_t* t = &e->tm;
  fiocp_op_t *op, *next;
  pthread_mutex_lock(&t->mu);
  for (op = fiocp__th_take_kind(&t->h, FIOCP_OP_TIMER); op != NULL;
       op = next) {
    next = op->next;
    op->flags |= FIOCP_OPF_CANCELLED;
    op->res = -ECANCELED;
    q_push(out, op);
  }
  pthread_mutex_unlock(&t->mu);
}

/* ---- Leaving the backend ------------------------------------------------ */

/* Closes a wait_process's pidfd. Under its descriptor state's lock, with
 * the registration forgotten first (its epoll entry goes with the file), so
 * that whoever gets the number next starts clean and a late event for the
 * pidfd is ignored. No lock of ours held. */
static void pidfd_release(ep_t* e, fiocp_op_t* op) {
  int fd = (int)op->addr->scratch.i64[S_PIDFD];
  fdst_t* st;
  opq_t stray = {NULL, NULL};
  if (fd < 0) return;
  op->addr->scratch.i64[S_PIDFD] = -1;
  st = fdst_find(e, fd);
  if (st != NULL) pthread_mutex_lock(&st->mu);
  /* Only operations of a user who guessed the number could be left. */
  if (st != NULL) orphan_locked(st, NULL, &stray);
  /* A pidfd's close cannot fail but with EINTR, after which Linux has
   * released it anyway. */
  (void)close(fd);
  if (st != NULL) pthread_mutex_unlock(&st->mu);
  complete_all(e, &stray);
}

/* What an operation leaves behind when it completes (or when submit()
 * hands it back): its heap entry and its pidfd. Its place's lock must not
 * be held (tm_mu comes first). */
static void finish_op(ep_t* e, fiocp_op_t* op) {
  if (op->addr == NULL) return; /* plain operations: nothing */
  if (op->kind == FIOCP_OP_TIMER || op->timeout_ns > 0) (void)tm_del(e, op);
  if (op->kind == FIOCP_OP_WAIT_PROCESS) pidfd_release(e, op);
}

/* ---- Submission --------------------------------------------------------- */

/* Whether st's descriptor is a stream socket, asked once (a number
 * reused by another file is asked again, orphan_locked()). st->mu held. */
static int is_stream_locked(fdst_t* st) {
  if (st->kind == FD_KIND_UNKNOWN) {
    int type = 0;
    socklen_t len = sizeof(type);
    /* Anything but a stream socket (ENOTSOCK too) is FD_KIND_OTHER. */
    st->kind = getsockopt(st->fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 &&
                       type == SOCK_STREAM
                   ? FD_KIND_STREAM
                   : FD_KIND_OTHER;
  }
  return st->kind == FD_KIND_STREAM;
}

/* The operations recv_drained is about: one-shot recvs (a multishot one
 * reads until EAGAIN anyway). */
static int is_oneshot_recv(const fiocp_op_t* op) {
  return op->kind == FIOCP_OP_RECV && !(op->flags & FIOCP_OPF_MULTISHOT);
}

/* Records what a recv's try found: a stream socket that had nothing
 * (EAGAIN) or less than was asked for has been drained. st->mu held. */
static void note_recv_locked(fdst_t* st, const fiocp_op_t* op, int64_t res) {
  if (!is_oneshot_recv(op)) return;
  st->recv_drained = (res == PENDING || (res > 0 && (uint64_t)res < op->len)) &&
                     is_stream_locked(st);
}

/* Submits a readiness-driven operation (socket, pipe, other streams). */
static int fd_submit(ep_t* e, fiocp_op_t* op) {
  int dir = op_dir(op->kind);
  fdst_t* st;
  opq_t orphans = {NULL, NULL};
  int64_t res = 0;
  int rc = fdst_get(e, op_fd(op), &st), to_pool = 0, failed = 0;
  int kids_made = 0;
  if (rc == FIOCP_ENOMEM) {
    finish_op(e, op); /* its heap entry, its pidfd */
    fiocp__hub_abort(&e->hub);
    return rc;
  }
  if (rc < 0) { /* no such descriptor: the operation's own failure */
    complete(e, op, rc);
    return 0;
  }
  pthread_mutex_lock(&st->mu);
  /* Nothing ahead of it in this direction (polls have no order): try it
   * now. Unless it is a recv on a stream socket that the last recv
   * drained: in a request-response exchange the next data comes only
   * after this side's answer, so the try would cost a system call that
   * says EAGAIN (io_uring's POLL_FIRST). Arming the interest reports it
   * at once if data came meanwhile (EPOLL_CTL_MOD polls the file). */
  if ((dir == DIR_POLL || st->q[dir].head == NULL) &&
      !(st->recv_drained && is_oneshot_recv(op))) {
    if (op->flags & FIOCP_OPF_MULTISHOT) {
      opq_t kids = {NULL, NULL};
      res = run_multishot(op, &kids);
      /* Under st->mu: ahead of anything a poller makes of op once it is
       * queued. */
      kids_made = kids.head != NULL;
      done_splice(e, &kids);
    } else {
      res = try_io(op);
      note_recv_locked(st, op, res);
    }
    if (res != PENDING) {
      pthread_mutex_unlock(&st->mu);
      complete(e, op, res); /* publishes the children first */
      return 0;
    }
  }
  q_push(&st->q[dir], op);
  bk_move(op, BK_FDQ, st);
  rc = arm_locked(e, st, op, &orphans);
  if (rc < 0) {
    q_remove(&st->q[dir], op);
    failed = 1;
    if (rc == -EPERM &&
        (op->kind == FIOCP_OP_READ || op->kind == FIOCP_OP_WRITE))
      to_pool = 1; /* not pollable (e.g. /dev/null): use the pool */
    else
      res = rc;
  } else if (__atomic_load_n(&e->closing, __ATOMIC_SEQ_CST)) {
    /* shutdown() may have swept this descriptor before op was queued. */
    q_remove(&st->q[dir], op);
    op->flags |= FIOCP_OPF_CANCELLED;
    failed = 1;
    res = -ECANCELED;
  } else if (tm_expired(op)) {
    /* Its timeout fired while it was on its way here; the expiry found it
     * nowhere (see tm_expire()). */
    q_remove(&st->q[dir], op);
    op->flags |= FIOCP_OPF_CANCELLED;
    failed = 1;
    res = FIOCP_ETIMEDOUT;
  }
  pthread_mutex_unlock(&st->mu);
  complete_all(e, &orphans);
  if (to_pool) pool_submit(e, op);
  else if (failed) complete(e, op, res);
  else if (kids_made) publish_done(e); /* op waits: its children do not */
  return 0;
}

static const uint8_t ep_support[FIOCP_OP__COUNT];

/* A timer's submit: its place is the heap. */
static int timer_submit(ep_t* e, fiocp_op_t* op) {
  int64_t delay = op->offset < 0 ? 0 : op->offset;
  int rc;
  if (op->timeout_ns > 0 && op->timeout_ns < delay) {
    /* Its own timeout comes first: it ends in FIOCP_ETIMEDOUT. */
    op->addr->scratch.i64[S_TMST] = TM_ISTIMEOUT;
    delay = op->timeout_ns;
  }
  rc = tm_add(e, op, deadline_after(delay));
  if (rc == -ECANCELED) {
    op->flags |= FIOCP_OPF_CANCELLED;
    complete(e, op, rc);
  } else if (rc < 0) {
    fiocp__hub_abort(&e->hub);
    return rc;
  }
  return 0;
}

static int ep_submit(fiocp_port_t* port, fiocp_op_t* op, int defer) {
  ep_t* e = (ep_t*)port->impl;
  int fd = (int)op->handle;
  int kind = op->kind;
  int rc;
  (void)defer; /* nothing to batch: each operation is tried at once */
  if (kind < FIOCP_OP_READ || kind >= FIOCP_OP__COUNT ||
      kind == FIOCP_OP_POST || ep_support[kind] == FIOCP_SUP_NO)
    return FIOCP_EUNSUPPORTED;
  /* A wait_process's handle is a pid; a timer has none. */
  if (kind != FIOCP_OP_TIMER && kind != FIOCP_OP_WAIT_PROCESS &&
      (op->handle < 0 || op->handle > INT_MAX))
    return -EBADF;
  if (op->addr == NULL &&
      (op->timeout_ns > 0 || kind == FIOCP_OP_RECVFROM ||
       kind == FIOCP_OP_SENDTO || kind == FIOCP_OP_ACCEPT ||
       kind == FIOCP_OP_CONNECT || kind == FIOCP_OP_SENDMSG ||
       kind == FIOCP_OP_RECVMSG || kind == FIOCP_OP_SENDFILE ||
       kind == FIOCP_OP_WAIT_PROCESS || kind == FIOCP_OP_TIMER))
    return -EINVAL;
  /* Pools serve receives; multishot is for pooled receives and accepts
   * (fiocp.h). ZEROCOPY needs nothing: epoll's sends copy. */
  if ((op->flags & FIOCP_OPF_POOLED) &&
      (kind != FIOCP_OP_RECV || op->pool == NULL || op->pool->size == 0))
    return -EINVAL;
  if ((op->flags & FIOCP_OPF_MULTISHOT) && kind != FIOCP_OP_ACCEPT &&
      !(kind == FIOCP_OP_RECV && (op->flags & FIOCP_OPF_POOLED)))
    return -EINVAL;
  if (op->flags & FIOCP_OPF_POOLED) op->offset = -1; /* no buffer held */
  rc = fiocp__hub_begin(&e->hub);
  if (rc < 0) return rc;
  op->next = NULL;
  bk_set(op, 0);
  if (op->addr != NULL) {
    /* Before anything can see the record (the binding zeroes scratch, but
     * the pidfd slot needs -1 and nothing here should rely on it). */
    op->addr->scratch.i64[S_HIDX] = 0;
    op->addr->scratch.i64[S_TMST] = 0;
    op->addr->scratch.i64[S_SENT] = 0;
    op->addr->scratch.i64[S_PIDFD] = -1;
  }
  if (kind == FIOCP_OP_TIMER) return timer_submit(e, op);
  if (op->timeout_ns > 0) {
    /* In the heap before the operation can complete: completion removes
     * the entry (finish_op()), and an entry added after it would outlive
     * the record. */
    rc = tm_add(e, op, deadline_after(op->timeout_ns));
    if (rc < 0) {
      fiocp__hub_abort(&e->hub);
      return rc;
    }
  }
  if (kind == FIOCP_OP_FSYNC) {
    pool_submit(e, op);
    return 0;
  }
  if (kind == FIOCP_OP_WAIT_PROCESS) {
    long pfd;
    if (op->handle <= 0 || op->handle > INT_MAX) {
      complete(e, op, -EINVAL);
      return 0;
    }
    pfd = syscall(SYS_pidfd_open, (pid_t)op->handle, 0);
    if (pfd < 0) {
      complete(e, op, -(int64_t)errno);
      return 0;
    }
    op->addr->scratch.i64[S_PIDFD] = pfd;
    return fd_submit(e, op);
  }
  if (kind == FIOCP_OP_READ || kind == FIOCP_OP_WRITE) {
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
      complete(e, op, -(int64_t)errno);
      return 0;
    }
    if (S_ISREG(sb.st_mode) || S_ISBLK(sb.st_mode) || S_ISDIR(sb.st_mode)) {
      int64_t res = S_ISREG(sb.st_mode) ? cached_read(op, &sb) : PENDING;
      if (res != PENDING) complete(e, op, res);
      else pool_submit(e, op);
      return 0;
    }
    /* Streams take no offset (io_uring ignores it there too): pipes,
     * sockets, and character devices that cannot seek (ttys). */
    if (S_ISSOCK(sb.st_mode))
      bk_set(op, BK_SOCKIO | BK_NOPOS);
    else if (S_ISFIFO(sb.st_mode) ||
             (S_ISCHR(sb.st_mode) && lseek(fd, 0, SEEK_CUR) < 0 &&
              errno == ESPIPE))
      bk_set(op, BK_NOPOS);
  }
  return fd_submit(e, op);
}

static int ep_flush(fiocp_port_t* port) {
  (void)port;
  return 0;
}

/* ---- Cancellation ------------------------------------------------------- */

/* Takes op out of the place bk names. Returns CC_TAKEN (op is the
 * caller's to complete, flagged cancelled), CC_RUNNING (in a pool thread:
 * flagged, it completes with its real result) or CC_NONE (finished, or
 * finishing elsewhere right now). No lock of ours held but tm_mu. */
static int cancel_core(ep_t* e, fiocp_op_t* op) {
  int attempt;
  /* bk only changes under the lock of the place it names: read it, lock
   * that place, and check again. An operation leaves a descriptor queue for
   * the pool only inside its own submit(), so two rounds always suffice. */
  for (attempt = 0; attempt < 2; attempt++) {
    uintptr_t bk = bk_get(op);
    uintptr_t where = bk & BK_WHERE;
    if (where == BK_FDQ) {
      fdst_t* st = (fdst_t*)(bk & ~(uintptr_t)BK_MASK);
      int found = 0;
      pthread_mutex_lock(&st->mu);
      bk = bk_get(op);
      if ((bk & BK_WHERE) == BK_FDQ &&
          (fdst_t*)(bk & ~(uintptr_t)BK_MASK) == st &&
          q_remove(&st->q[op_dir(op->kind)], op)) {
        op->flags |= FIOCP_OPF_CANCELLED;
        bk_move(op, BK_NONE, NULL);
        found = 1;
      }
      /* The interest stays armed; an event for an empty queue is ignored
       * and not re-armed. */
      pthread_mutex_unlock(&st->mu);
      if (found) return CC_TAKEN;
    } else if (where == BK_POOLQ || where == BK_POOLRUN) {
      pool_t* p = &e->pool;
      int found = 0;
      pthread_mutex_lock(&p->mu);
      where = bk_get(op) & BK_WHERE;
      if (where == BK_POOLQ && q_remove(&p->q, op)) {
        p->qlen--;
        bk_move(op, BK_NONE, NULL);
        found = 1;
      }
      if (where == BK_POOLQ || where == BK_POOLRUN)
        op->flags |= FIOCP_OPF_CANCELLED;
      pthread_mutex_unlock(&p->mu);
      if (found) return CC_TAKEN;
      /* Running: a pread cannot be stopped; it completes with its real
       * result. */
      if (where == BK_POOLRUN) return CC_RUNNING;
    } else {
      return CC_NONE; /* finished, or finishing in the poller right now */
    }
  }
  return CC_NONE;
}

static int ep_cancel(fiocp_port_t* port, fiocp_op_t* op) {
  ep_t* e = (ep_t*)port->impl;
  int rc;
  if (op->kind == FIOCP_OP_TIMER) {
    /* Its place is the heap: whoever takes the entry completes it. */
    if (op->addr == NULL || !tm_del(e, op)) return 0;
    op->flags |= FIOCP_OPF_CANCELLED;
    complete(e, op, -ECANCELED);
    return 1;
  }
  rc = cancel_core(e, op);
  if (rc == CC_TAKEN) complete(e, op, -ECANCELED);
  return rc != CC_NONE;
}

/* ---- Polling ------------------------------------------------------------ */

/* Runs the queue of one direction from its head until an operation would
 * block (or a multishot op at the head spent its burst); finished
 * operations go to done, a multishot op's children straight to e->done.
 * st->mu held. */
static void run_queue_locked(ep_t* e, fdst_t* st, int dir, opq_t* done) {
  fiocp_op_t* op;
  while ((op = st->q[dir].head) != NULL) {
    int64_t res;
    if (op->flags & FIOCP_OPF_MULTISHOT) {
      opq_t kids = {NULL, NULL};
      res = run_multishot(op, &kids);
      done_splice(e, &kids); /* before op's own completion, in done */
    } else {
      res = try_io(op);
      note_recv_locked(st, op, res);
    }
    if (res == PENDING) break;
    (void)q_pop(&st->q[dir]);
    op->res = res;
    bk_move(op, BK_NONE, NULL);
    q_push(done, op);
  }
}

/* Completes every poll of st whose events are among revents. st->mu
 * held. */
static void run_polls_locked(fdst_t* st, uint32_t revents, opq_t* done) {
  opq_t* q = &st->q[DIR_POLL];
  fiocp_op_t *prev = NULL, *op, *next;
  uint32_t fired = revents & (uint32_t)(EPOLLIN | EPOLLPRI | EPOLLOUT |
                                        EPOLLERR | EPOLLHUP);
  for (op = q->head; op != NULL; op = next) {
    uint32_t m = fired & (poll_wanted(op) | (uint32_t)(EPOLLERR | EPOLLHUP));
    next = op->next;
    if (m == 0) {
      prev = op;
      continue;
    }
    if (prev) prev->next = next;
    else q->head = next;
    if (q->tail == op) q->tail = prev;
    op->res = (int64_t)m;
    bk_move(op, BK_NONE, NULL);
    q_push(done, op);
  }
}

static void handle_event(ep_t* e, uint64_t data, uint32_t revents,
                         opq_t* done) {
  int fd = (int)(uint32_t)data;
  uint32_t gen = (uint32_t)(data >> 32);
  fdst_t* st = fdst_find(e, fd);
  if (st == NULL) return;
  pthread_mutex_lock(&st->mu);
  if (st->gen == gen && st->registered) {
    /* Polls first: they report what fired, before a read consumes it. */
    if (st->q[DIR_POLL].head != NULL) run_polls_locked(st, revents, done);
    if (revents & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))
      run_queue_locked(e, st, DIR_IN, done);
    if (revents & (EPOLLOUT | EPOLLERR | EPOLLHUP))
      run_queue_locked(e, st, DIR_OUT, done);
    if (interest(st) != 0) {
      int rc = ctl(e, st, EPOLL_CTL_MOD, interest(st));
      if (rc == -ENOENT || rc == -EBADF) {
        /* Closed between the event and now (see arm_locked()). */
        orphan_locked(st, NULL, done);
      } else if (rc < 0) {
        /* Cannot wait any longer (out of memory): fail what is queued
         * rather than leave it waiting for an event that cannot come. */
        int d;
        for (d = 0; d < NQ; d++) {
          fiocp_op_t* op;
          while ((op = q_pop(&st->q[d])) != NULL) {
            op->res = rc;
            bk_move(op, BK_NONE, NULL);
            q_push(done, op);
          }
        }
      }
    }
  }
  pthread_mutex_unlock(&st->mu);
}

static void drain_eventfd(ep_t* e) {
  uint64_t v;
  ssize_t r;
  do {
    r = read(e->evfd, &v, sizeof(v));
  } while (r < 0 && errno == EINTR);
  /* EAGAIN: another poll already reset it. */
}

/* The hub's poll(): waits for readiness (or a kick), then performs the I/O
 * of the ready descriptors. What finished waits in e->done for harvest(). */
static int ep_poll(void* ctx, int64_t timeout_ms) {
  ep_t* e = (ep_t*)ctx;
  struct epoll_event evs[EV_BATCH];
  opq_t done = {NULL, NULL};
  int n, i, timeout;
  if (timeout_ms < 0) timeout = -1;
  else if (timeout_ms > INT_MAX) timeout = INT_MAX;
  else timeout = (int)timeout_ms;
  n = epoll_wait(e->epfd, evs, EV_BATCH, timeout);
  if (n < 0) return errno == EINTR ? FIOCP_EINTR : -errno;
  for (i = 0; i < n; i++) {
    if (evs[i].data.u64 == KICK_DATA) drain_eventfd(e);
    else if (evs[i].data.u64 == TIMER_DATA) tm_expire(e, &done);
    else handle_event(e, evs[i].data.u64, evs[i].events, &done);
  }
  if (done.head != NULL) {
    fiocp_op_t* op;
    /* Heap entries and pidfds, with no descriptor lock held (tm_mu comes
     * first), before harvest() lets the records go. */
    for (op = done.head; op != NULL; op = op->next) finish_op(e, op);
    pthread_mutex_lock(&e->done_mu);
    q_splice(&e->done, &done);
    pthread_mutex_unlock(&e->done_mu);
  }
  return 0;
}

/* The hub's harvest(): hub.mu held. */
static void ep_harvest(void* ctx) {
  ep_t* e = (ep_t*)ctx;
  opq_t done;
  fiocp_op_t* op;
  pthread_mutex_lock(&e->done_mu);
  done = e->done;
  e->done.head = e->done.tail = NULL;
  pthread_mutex_unlock(&e->done_mu);
  /* Children were never in flight for the hub; their parents are. */
  while ((op = q_pop(&done)) != NULL)
    fiocp__hub_complete_locked(&e->hub, op,
                               !(op->flags & FIOCP_OPF_CHILD));
}

static void ep_kick(void* ctx) {
  ep_t* e = (ep_t*)ctx;
  uint64_t one = 1;
  ssize_t r;
  do {
    r = write(e->evfd, &one, sizeof(one));
  } while (r < 0 && errno == EINTR);
  /* EAGAIN: the counter is saturated, so the poller wakes anyway. */
}

/* ---- Contract ----------------------------------------------------------- */

static int ep_probe(char* why, size_t whylen) {
  int epfd = epoll_create1(EPOLL_CLOEXEC);
  int evfd;
  if (epfd < 0) {
    int err = errno;
    snprintf(why, whylen, "epoll_create1 failed: %s", strerror(err));
    return -err;
  }
  evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (evfd < 0) {
    int err = errno;
    snprintf(why, whylen, "eventfd failed: %s", strerror(err));
    close(epfd);
    return -err;
  }
  close(evfd);
  close(epfd);
  return 0;
}

static int ep_init(fiocp_port_t* port, unsigned entries, unsigned concurrency,
                   char* why, size_t whylen) {
  ep_t* e = (ep_t*)calloc(1, sizeof(*e));
  struct epoll_event ev;
  int rc, stage = 0;
  (void)entries;
  if (e == NULL) {
    snprintf(why, whylen, "out of memory");
    return FIOCP_ENOMEM;
  }
  e->port = port;
  e->epfd = e->evfd = -1;
  e->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (e->epfd < 0) {
    rc = -errno;
    snprintf(why, whylen, "epoll_create1 failed: %s", strerror(-rc));
    goto fail;
  }
  e->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (e->evfd < 0) {
    rc = -errno;
    snprintf(why, whylen, "eventfd failed: %s", strerror(-rc));
    goto fail;
  }
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN; /* level-triggered: poll() reads it back to 0 */
  ev.data.u64 = KICK_DATA;
  if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->evfd, &ev) < 0) {
    rc = -errno;
    snprintf(why, whylen, "epoll_ctl(eventfd) failed: %s", strerror(-rc));
    goto fail;
  }
  rc = fiocp__hub_init(&e->hub);
  if (rc < 0) goto fail_mutex;
  stage = 1;
  if ((rc = pthread_mutex_init(&e->tab_mu, NULL)) != 0) goto fail_errno;
  stage = 2;
  if ((rc = pthread_mutex_init(&e->done_mu, NULL)) != 0) goto fail_errno;
  stage = 3;
  if ((rc = pthread_mutex_init(&e->pool.mu, NULL)) != 0) goto fail_errno;
  stage = 4;
  if ((rc = pthread_cond_init(&e->pool.cv, NULL)) != 0) goto fail_errno;
  stage = 5;
  if ((rc = pthread_mutex_init(&e->tm.mu, NULL)) != 0) goto fail_errno;
  e->tm.fd = -1;
  /* Timers fire up to the slack late (fiocp__th_slack()): each wake-up
   * of the poller costs some 10-20 us of CPU, and deadlines within the
   * slack share one. */
  fiocp__th_init(&e->tm.h, S_HIDX);
  e->hub.ctx = e;
  e->hub.concurrency = concurrency; /* emulated by the hub (fiocp.h) */
  e->hub.poll = ep_poll;
  e->hub.harvest = ep_harvest;
  e->hub.kick = ep_kick;
  port->impl = e;
  return 0;

fail_errno:
  rc = -rc;
fail_mutex:
  snprintf(why, whylen, "pthread initialization failed: %s", strerror(-rc));
  if (stage >= 5) pthread_cond_destroy(&e->pool.cv);
  if (stage >= 4) pthread_mutex_destroy(&e->pool.mu);
  if (stage >= 3) pthread_mutex_destroy(&e->done_mu);
  if (stage >= 2) pthread_mutex_destroy(&e->tab_mu);
  if (stage >= 1) fiocp__hub_destroy(&e->hub);
fail:
  if (e->evfd >= 0) close(e->evfd);
  if (e->epfd >= 0) close(e->epfd);
  free(e);
  return rc;
}

static int ep_associate(fiocp_port_t* port, fiocp_handle_t h) {
  ep_t* e = (ep_t*)port->impl;
  /* Interest is registered lazily, when an operation has to wait; only the
   * port's own descriptors are refused (an operation on the eventfd would
   * replace its wake-up registration with a one-shot one). */
  return h == e->epfd || h == e->evfd ||
                 h == __atomic_load_n(&e->tm.fd, __ATOMIC_ACQUIRE)
             ? FIOCP_EOWNHANDLE
             : 0;
}

static int ep_try_get(fiocp_port_t* port, fiocp_op_t** out, int max) {
  ep_t* e = (ep_t*)port->impl;
  int n = fiocp__hub_try_get(&e->hub, out, max);
  if (n != 0) return n;
  fiocp__hub_poll_once(&e->hub);
  return fiocp__hub_try_get(&e->hub, out, max);
}

static int ep_wait(fiocp_port_t* port, fiocp_op_t** out, int max,
                   int64_t timeout_ms) {
  ep_t* e = (ep_t*)port->impl;
  if (timeout_ms == 0) {
    /* fiocp__hub_wait() does not poll for a zero timeout. */
    int n = fiocp__hub_wait(&e->hub, out, max, 0);
    if (n != 0) return n;
    fiocp__hub_poll_once(&e->hub);
  }
  return fiocp__hub_wait(&e->hub, out, max, timeout_ms);
}

/* Cancels everything queued, in descriptor queues and in the pool's queue.
 * Called once, after e->closing is set: a submit() that queues after the
 * sweep passed sees the flag under the same lock and cancels itself. */
static void cancel_all(ep_t* e) {
  fdtab_t* t;
  opq_t out = {NULL, NULL};
  size_t i;
  fiocp_op_t* op;
  pthread_mutex_lock(&e->tab_mu);
  t = e->tab;
  pthread_mutex_unlock(&e->tab_mu);
  for (i = 0; t != NULL && i < t->cap; i++) {
    fdst_t* st = __atomic_load_n(&t->slot[i], __ATOMIC_ACQUIRE);
    int d;
    if (st == NULL) continue;
    pthread_mutex_lock(&st->mu);
    for (d = 0; d < NQ; d++) {
      while ((op = q_pop(&st->q[d])) != NULL) {
        op->flags |= FIOCP_OPF_CANCELLED;
        op->res = -ECANCELED;
        bk_move(op, BK_NONE, NULL);
        q_push(&out, op);
      }
    }
    pthread_mutex_unlock(&st->mu);
  }
  pthread_mutex_lock(&e->pool.mu);
  while ((op = q_pop(&e->pool.q)) != NULL) {
    op->flags |= FIOCP_OPF_CANCELLED;
    op->res = -ECANCELED;
    bk_move(op, BK_NONE, NULL);
    q_push(&out, op);
  }
  e->pool.qlen = 0;
  pthread_mutex_unlock(&e->pool.mu);
  /* Timers (a submit that adds one after this sees e->closing under
   * tm_mu). Timeouts of what was swept above go with their operations. */
  tm_cancel_timers(e, &out);
  complete_all(e, &out);
}

static int64_t ep_shutdown(fiocp_port_t* port, int64_t timeout_ms) {
  ep_t* e = (ep_t*)port->impl;
  if (fiocp__hub_close(&e->hub)) {
    __atomic_store_n(&e->closing, 1, __ATOMIC_SEQ_CST);
    cancel_all(e);
  }
  /* What is left is running in pool threads (a pread cannot be
   * interrupted) or finishing in a poller: wait for it, bounded. */
  return fiocp__hub_wait_idle(&e->hub, timeout_ms);
}

static void ep_destroy(fiocp_port_t* port) {
  ep_t* e = (ep_t*)port->impl;
  pool_t* p;
  fdtab_t* t;
  int i;
  if (e == NULL) return;
  p = &e->pool;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  /* shutdown() returned 0, so no thread runs an operation: they all leave
   * at once. */
  for (i = 0; i < p->nthreads; i++) (void)pthread_join(p->th[i], NULL);
  /* close() of an epoll fd or an eventfd cannot fail but with EINTR, and
   * even then Linux has released the descriptor: nothing to retry. The
   * same holds in probe() and init()'s failure path. */
  (void)close(e->evfd);
  if (e->tm.fd >= 0) (void)close(e->tm.fd); /* likewise for a timerfd */
  (void)close(e->epfd);
  fiocp__th_free(&e->tm.h); /* no timer left: shutdown() returned 0 */
  pthread_mutex_destroy(&e->tm.mu);
  t = e->tab;
  if (t != NULL) {
    size_t k;
    for (k = 0; k < t->cap; k++) {
      if (t->slot[k] != NULL) {
        pthread_mutex_destroy(&t->slot[k]->mu);
        free(t->slot[k]);
      }
    }
  }
  while (t != NULL) {
    fdtab_t* older = t->older;
    free(t);
    t = older;
  }
  pthread_cond_destroy(&p->cv);
  pthread_mutex_destroy(&p->mu);
  pthread_mutex_destroy(&e->done_mu);
  pthread_mutex_destroy(&e->tab_mu);
  fiocp__hub_destroy(&e->hub);
  free(e);
  port->impl = NULL;
}

/* How each kind is done (fiocp.h): the readiness-driven and pooled kinds
 * are emulated; a poll is epoll's own business; post() is the hub's queue;
 * named pipes are Windows'. */
static const uint8_t ep_support[FIOCP_OP__COUNT] = {
    [FIOCP_SUPPORT_TIMEOUT] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_READ] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_WRITE] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_RECV] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_SEND] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_RECVFROM] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_SENDTO] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_ACCEPT] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_CONNECT] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_POST] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_POLL] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SENDMSG] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_RECVMSG] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_SENDFILE] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_WAIT_PROCESS] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_TIMER] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_FSYNC] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_CONNECT_PIPE] = FIOCP_SUP_NO,
};

const fiocp_backend_t fiocp__epoll_backend = {
    "epoll",
    ep_probe,
    ep_init,
    ep_associate,
    ep_submit,
    ep_flush,
    ep_cancel,
    ep_try_get,
    ep_wait,
    fiocp__hub_port_post,
    ep_shutdown,
    fiocp__hub_port_drain,
    ep_destroy,
    fiocp__hub_port_release,
    ep_support,
    NULL, /* pool_add: the pool's own free stack serves (pooled_recv()) */
    NULL, /* pool_put: fiocp__pool_give */
    NULL, /* pool_remove */
    NULL, /* native_flags: pools and multishot are emulated; sends copy */
};
