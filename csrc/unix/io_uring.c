/* io_uring.c: the io_uring backend, through raw system calls.
 *
 * How io_uring fits the completion-port model. One ring per port. A
 * submission queue entry (SQE) carries the operation and, as user_data, the
 * address of its fiocp_op_t record plus the record's generation in the top
 * byte; the kernel answers with one completion queue entry (CQE) per SQE.
 * Submitters from many threads fill SQEs under sq_mu; the kernel is told
 * about them by io_uring_enter(), either at once or, for deferred
 * (batched) submissions, by the next flush or the poller's own enter. The
 * CQ has one consumer at a time: whoever holds the hub's mutex (hub.h) and
 * harvests it into the hub's FIFO.
 *
 * Facts the design leans on:
 * - Requests belong to the task that called io_uring_enter() for them. When
 *   that thread exits, the kernel cancels what it still owes (a receive
 *   armed on a socket completes with -ECANCELED). Python thread pools exit
 *   threads, so a -ECANCELED that neither the user nor close() asked for is
 *   resubmitted from the harvesting thread: the request never ran, so
 *   resubmitting it is invisible to the user.
 * - With IORING_FEAT_NODROP (5.5) a full CQ is kept in an overflow backlog,
 *   flushed by io_uring_enter(GETEVENTS); while a backlog exists submit may
 *   fail with -EBUSY: reap, then enter again.
 * - IORING_FEAT_EXT_ARG (5.11) lets the wait carry a timeout without a
 *   timeout SQE; it is required (older kernels fall back to epoll).
 * - No SQPOLL: it burns a CPU while idle (libuv#4089).
 *
 * The operations of issue 14 (fiocp.h):
 * - POLL, SENDMSG, RECVMSG and FSYNC are one SQE each.
 * - TIMER lives in user space: a min-heap of deadlines (timerheap.h, the
 *   one epoll uses) under the hub's mutex, and ONE kernel TIMEOUT (an SQE
 *   of its own, user_data = its ktimer_t | UD_KTIMER, never an operation)
 *   armed to the earliest deadline plus the timer slack (timerheap.h).
 *   Every io_uring TIMEOUT is a kernel hrtimer, and each that fires is an
 *   interrupt (a VM exit under a hypervisor): one per timer cost 6 us of
 *   CPU each, while deadlines within the slack of each other now share one
 *   wake-up. When the kernel TIMEOUT's CQE comes (uring_harvest, hub.mu
 *   held), every due timer completes with 0 and the next one is armed. A
 *   new timer that goes first pushes a new TIMEOUT and cancels the ones it
 *   supersedes (a cancelled TIMEOUT costs no interrupt). A timer due at
 *   submit (timer(0)) completes straight into the hub, as a post does, after
 *   whatever in the heap is due too (deadline order). Whatever ends a
 *   kernel TIMEOUT (expiry, our cancel, the exit of the thread that
 *   submitted it), its CQE fires what is due and re-arms: no timer is left
 *   without a kernel timer behind it. Each kernel TIMEOUT's CQE is owed:
 *   it counts in hub.inflight until it comes, and its ktimer_t (whose
 *   timespec the kernel reads at submission) lives until then, so that
 *   shutdown() (which takes every timer out of the heap, completes them
 *   with -ECANCELED and cancels the kernel TIMEOUTs) waits for those CQEs
 *   and destroy() never frees what the kernel still uses. A timer's
 *   timeout_ns shorter than its delay becomes its deadline and its result
 *   FIOCP_ETIMEDOUT (no LINK_TIMEOUT: it has no SQE to link to).
 *   Locks: the heap and the kernel TIMEOUTs' list have no mutex of their
 *   own; they are the hub's (hub.mu), which submit(), cancel(), harvest
 *   and the shutdown sweep hold anyway. hub.mu comes before sq_mu, as for
 *   every push. A push that must reap (a full SQ) re-enters the harvest:
 *   kernel TIMEOUT CQEs met there only mark work (kt_due), done by the
 *   outermost caller (timers_settle_locked()).
 * - SENDFILE is the epoll way inside the ring: bursts of non-blocking
 *   sendfile() (as much as the socket takes, at most SENDFILE_BURST bytes
 *   each), the first from submit() itself, the next ones from
 *   uring_harvest() when a POLL_ADD for POLLOUT on the socket fires (the
 *   POLL is pushed again, from the resubmit list, after each burst that
 *   filled the socket or spent its budget). The POLL carries the record's
 *   user_data, so an ASYNC_CANCEL of the operation hits it. No io-wq
 *   worker, no pipe: the first version (SPLICE stages file -> pipe ->
 *   socket through a pipe of its own, each stage an io-wq punt and a
 *   completion) cost 1.6x the CPU per byte (docs/BENCHMARKS.md).
 * - WAIT_PROCESS opens a pidfd at submit, polls it for POLLIN and reads the
 *   status with waitid(P_PIDFD, WNOWAIT) in the harvest: the child is not
 *   reaped.
 * - A per-operation timeout (timeout_ns) is an IORING_OP_LINK_TIMEOUT SQE
 *   linked to the operation's SQE, pushed in the same sq_mu hold so the
 *   two are adjacent in the ring. Its timespec is ABSOLUTE (CLOCK_MONOTONIC
 *   deadline, computed once at submit, kept in the record's scratch), so
 *   that every later stage of WAIT_PROCESS and every resubmission after a
 *   thread's exit is linked again with the same deadline: the whole
 *   operation is bounded, not each stage. SENDFILE is bounded by a guard
 *   TIMEOUT of its own instead (see TK_GUARD for why). A -ECANCELED (or
 *   -EINTR) that neither the user nor close() asked for is a timeout
 *   exactly when the deadline has passed (the kernel's timer fires no
 *   earlier); otherwise it is the submitting thread's exit, and the SQE is
 *   pushed again. The record completes only once the CQEs of its linked
 *   timeouts and guard have come too (TK_* below).
 *
 * Pools, multishot operations and zero-copy sends (issue 18, fiocp.h):
 * - A pool registered with the port (pool_add) is a provided-buffer ring
 *   (IORING_REGISTER_PBUF_RING) of group pool->group, in page-aligned
 *   memory of ours, holding the free buffers used last (pbuf_t: a
 *   shallow ring, topped up from the free stack). A pooled receive is a
 *   RECV with IOSQE_BUFFER_SELECT and IORING_RECVSEND_POLL_FIRST (the
 *   kernel picks a buffer only once data is there, so an empty ring fails
 *   with -ENOBUFS having read nothing, and is pushed again while the pool
 *   has buffers); the CQE names the buffer (IORING_CQE_F_BUFFER). pool_put
 *   gives a buffer back (onto the free stack, then the ring's tail, stored
 *   with release, under the pool's mutex). Which buffers the binding holds
 *   is tracked (pbuf_t.held): a second release of one is ignored (the ring
 *   would hold it twice), and pool_remove puts every buffer not held back
 *   on the free stack: after its last operation, those not held are in
 *   the ring or on the stack already.
 * - Multishot receives (IORING_RECV_MULTISHOT) and accepts
 *   (IORING_ACCEPT_MULTISHOT): each CQE with IORING_CQE_F_MORE becomes a
 *   child record (fiocp__child_new), queued in CQE order; the CQE without
 *   it is the operation's own completion, which stays INFLIGHT until
 *   then. A child that cannot be allocated ends the operation (an
 *   ASYNC_CANCEL; its result says FIOCP_ENOMEM): its result and every
 *   later one are dropped (buffer back in the ring, accepted socket
 *   closed), as data after a hole would mislead.
 * - SEND_ZC: the CQE with F_MORE carries the result, the one with
 *   IORING_CQE_F_NOTIF (same user_data) says the kernel let go of the
 *   buffer: the record completes only after both (BK_NOTIF_*). A socket
 *   without zero-copy (AF_UNIX: -EOPNOTSUPP) or over RLIMIT_MEMLOCK
 *   (-ENOMEM), nothing sent, gets a plain SEND instead.
 * - Older kernels (native_flags() tells): without buffer rings (before
 *   5.19) a pooled receive is a POLL, then recv() into a buffer from the
 *   free stack in the harvest (BK_EMU_POOL); without the kernel's
 *   multishot (accept before 5.19, receive before 6.0) the single-shot
 *   SQE is pushed again after each result (BK_REARM). So is a multishot
 *   receive whose length is below the buffer size (the kernel's takes no
 *   length), and one on an AF_UNIX socket (is_unix_socket: the kernel's
 *   can miss the end of the stream). FASTIOCP_URING_DISABLE (a comma-separated list of pbuf_ring,
 *   recv_multishot, accept_multishot, send_zc) makes a port act as if the
 *   kernel lacked them: the tests of those paths.
 */
#define _GNU_SOURCE
#include "../fiocp.h"
#include "hub.h"
#include "nonblock.h"
#include "timerheap.h"
#include "uring_abi.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define UD_WAKE 1ULL    /* the NOP that kicks the poller */
#define UD_CANCEL 2ULL  /* an ASYNC_CANCEL's own completion */
/* The CQEs of an operation's helpers carry its user_data with a tag in
 * the low bits (records are 8-byte aligned; the constants above are
 * below 8): */
#define UD_GUARD 1ULL /* SENDFILE's guard TIMEOUT */
#define UD_LINK 2ULL  /* a LINK_TIMEOUT behind one of its SQEs */
#define UD_KTIMER 3ULL /* the timer heap's kernel TIMEOUT: a ktimer_t's
                          address (malloc'd, so 8-byte aligned too) */
#define UD_TAGS 7ULL
typedef char fu_op_aligned[__alignof__(fiocp_op_t) >= 8 ? 1 : -1];

#ifndef SYS_pidfd_open
# define SYS_pidfd_open 434 /* the generic syscall table's number (5.3) */
#endif
#ifndef P_PIDFD
# define P_PIDFD 3 /* waitid() on a pidfd (5.4) */
#endif

/* Slots of op->addr->scratch.i64 (the binding zeroes them before submit).
 * A timespec takes two slots: {tv_sec, tv_nsec}, the layout of
 * struct fu_kernel_timespec, which the kernel reads at submission. */
#define SC_LINK_TS 0  /* [0..1] the timeout's absolute deadline */
#define SC_HIDX 2     /* TIMER: heap index + 1, 0: not in the heap (hub.mu) */
#define SC_TMOUT 3    /* TIMER: 1 when its deadline is its timeout's */
#define SC_FD0 2      /* WAIT_PROCESS: the pidfd */
#define SC_STATE 4    /* tracked operations (see tracked()): TK_* bits */
#define SC_SENT 5     /* SENDFILE: bytes that reached the socket */
#define SC_RESULT 6   /* tracked, once TK_DONE: the result to deliver */

/* Tracked operations: those with a timeout, and SENDFILE. Besides the
 * operation's own CQE, the kernel owes CQEs for its helpers, which carry
 * the record's address: the record completes only once all of them came
 * (TK_DONE with no helper owed), so that none outlives it.
 * - LINK_TIMEOUTs (UD_LINK), one per SQE pushed, counted in TK_LINKS. A
 *   request whose submitting thread has exited keeps running (io_uring
 *   runs its task work from a kernel worker), and the linked timeout that
 *   fires then completes with -ECANCELED WITHOUT cancelling the request:
 *   a -ECANCELED link CQE past the deadline, with the operation still
 *   pending, makes the port cancel it itself (TK_PUSH_CANCEL).
 * - SENDFILE's guard (UD_GUARD): one TIMEOUT SQE for the whole operation
 *   instead of a LINK_TIMEOUT behind each of its POLLs (a SENDFILE may
 *   re-arm its POLL many times). The guard, when it fires, cancels the
 *   POLL in flight; its CQE finds the deadline passed. When the operation
 *   ends first, the guard is cancelled. */
#define TK_GUARD 0x100LL     /* the guard is armed: its CQE is owed */
#define TK_GUARD_OFF 0x200LL /* its cancel was asked for */
#define TK_DONE 0x400LL      /* the operation is over: SC_RESULT waits for
                                its helpers' CQEs */
#define TK_PUSH_STAGE 0x10000LL     /* to push (u->resubmit): the SQE */
#define TK_PUSH_GUARD 0x20000LL     /* the guard */
#define TK_PUSH_GUARD_OFF 0x40000LL /* an ASYNC_CANCEL of the guard */
#define TK_PUSH_CANCEL 0x80000LL    /* an ASYNC_CANCEL of the SQE */
#define TK_PUSH (TK_PUSH_STAGE | TK_PUSH_GUARD | TK_PUSH_GUARD_OFF | \
                 TK_PUSH_CANCEL)
#define TK_LINK_ONE (1LL << 24) /* TK_LINKS: LINK_TIMEOUT CQEs owed */
#define TK_LINKS (0xffffLL << 24)

/* op->bk: the state of issue 18's operations (records start zeroed;
 * choose_mode() sets the mode bits at submit). hub.mu. */
#define BK_EMU_POOL 0x01      /* pooled receive without a ring: POLL, then
                                 recv() into a buffer of the free stack */
#define BK_REARM 0x02         /* multishot without the kernel's: the
                                 single-shot SQE again after each result */
#define BK_ZC 0x04            /* a SEND_ZC (cleared: a plain SEND) */
#define BK_NOTIF_OWED 0x08    /* SEND_ZC: its notification CQE is owed */
#define BK_NOTIF_EARLY 0x10   /* it came before the CQE announcing it */
#define BK_NOTIF_REQUEUE 0x20 /* the next SQE waits for it */
#define BK_DELIVER 0x40       /* finished: queued once nothing holds it */
#define BK_NOMEM 0x80         /* a child could not be allocated: later
                                 results are dropped, FIOCP_ENOMEM ends it */
#define BK_PUSH_CANCEL 0x100  /* on u->resubmit for an ASYNC_CANCEL */

/* What this port's kernel does (uring_t.have), as native_flags() tells. */
#define HAVE_PBUF 0x1       /* IORING_REGISTER_PBUF_RING (5.19) */
#define HAVE_ACCEPT_MS 0x2  /* IORING_ACCEPT_MULTISHOT (5.19) */
#define HAVE_RECV_MS 0x4    /* IORING_RECV_MULTISHOT (6.0) */
#define HAVE_SEND_ZC 0x8    /* IORING_OP_SEND_ZC (6.0) */

/* Receives an emulated multishot (BK_EMU_POOL) makes per POLL: the
 * harvest runs them with hub.mu held. */
#define EMU_BURST 16

#define NS_PER_S 1000000000LL
/* A SENDFILE burst's budget: the harvest runs bursts with hub.mu held, so
 * each is bounded (about 0.4 ms of CPU here). 2 and 4 MiB measured alike;
 * 16 MiB and unbounded were a tenth slower (docs/BENCHMARKS.md). */
#define SENDFILE_BURST (2 << 20)

typedef char fu_ts_is_two_slots[sizeof(struct fu_kernel_timespec) ==
                                2 * sizeof(int64_t) ? 1 : -1];

#define DEFAULT_ENTRIES 1024u

/* One kernel TIMEOUT of the timer heap, from its push to its CQE (hub.mu). */
typedef struct ktimer_s {
  struct fu_kernel_timespec ts; /* absolute; the kernel reads it when it
                                   takes the SQE */
  int64_t at;                   /* the same, in ns */
  int cancelling;               /* superseded: an ASYNC_CANCEL was pushed */
  struct ktimer_s* prev;
  struct ktimer_s* next;
} ktimer_t;

typedef struct uring_s {
  fiocp_hub_t hub; /* first: see FIOCP__HUB() */
  fiocp_port_t* port;
  int fd;
  unsigned features;
  pthread_mutex_t sq_mu;
  /* Submission ring. */
  unsigned* sq_khead;
  unsigned* sq_ktail;
  unsigned* sq_kflags;
  unsigned sq_mask;
  unsigned sq_entries;
  unsigned sq_tail;           /* ours; published to *sq_ktail */
  struct fu_sqe* sqes;
  /* Completion ring. */
  unsigned* cq_khead;
  unsigned* cq_ktail;
  unsigned cq_mask;
  struct fu_cqe* cqes;
  /* Mappings. */
  void* sq_ring;
  size_t sq_ring_size;
  void* cq_ring;
  size_t cq_ring_size;
  size_t sqes_size;
  /* Cancelled-by-exit operations waiting to be resubmitted (by ->next). */
  fiocp_op_t* resubmit;
  /* TIMER records (hub.mu); timers.armed: the earliest kernel TIMEOUT not
   * being cancelled (INT64_MAX: none). */
  fiocp_theap_t timers;
  ktimer_t* kt;                 /* kernel TIMEOUTs whose CQE is owed */
  int kt_busy;                  /* kt_arm() or the sweep is pushing */
  int kt_due;                   /* a kernel TIMEOUT's CQE came: settle */
  unsigned have;                /* HAVE_* */
  uint16_t next_group;          /* the next buffer group id to try */
  fiocp_pool_t* pools;          /* registered pools, by ->next (GIL) */
} uring_t;

/* A registered pool's state (pool->impl). With a buffer ring (bufs), up
 * to depth free buffers are in the ring and the rest on the free stack;
 * without (BK_EMU_POOL), all on the free stack. held[id] (atomic bytes):
 * the binding holds buffer id (set when a result hands it out, cleared by
 * pool_put). pool->impl is stored and loaded atomically: submit and the
 * harvest read it without the pool's mutex.
 *
 * Why a shallow ring: the kernel takes buffers from the ring in the order
 * they were added, so a ring holding every free buffer cycles through the
 * whole pool (the loop's is 64 MiB), and each receive copies into memory
 * long out of the CPU's caches (a 10 KiB echo spent 7.6% of its time in
 * the kernel's copy to user space, against 2.0% into a buffer of its
 * own). A buffer given back goes on top of the free stack and from there
 * into the ring: the ring cycles through depth recently used buffers. A
 * receive that found the ring empty while the pool was not (-ENOBUFS)
 * doubles depth and is pushed again (pool_ring_retry): only an empty pool
 * fails one. */
typedef struct pbuf_s {
  struct fu_buf* bufs; /* NULL: no ring */
  size_t bytes;        /* of the bufs mapping */
  uint32_t mask;       /* ring entries - 1 */
  uint16_t tail;       /* ours; published to bufs[0].resv (pool mutex) */
  uint32_t in_ring;    /* added and not yet seen taken (a CQE naming it):
                          at least the ring's count (pool mutex) */
  uint32_t depth;      /* how many ring_fill() keeps in the ring */
  uint8_t* held;       /* [pool->count] */
} pbuf_t;

/* A new pool's depth; pool_ring_retry() doubles it up to the pool's
 * count. Receives completing faster than the harvest hands them out
 * need that many. */
#define POOL_RING_DEPTH 8

static int sys_setup(unsigned entries, struct fu_params* p) {
  long rc = syscall(__NR_io_uring_setup, entries, p);
  return rc < 0 ? -errno : (int)rc;
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete,
                     unsigned flags, void* arg, size_t argsz) {
  long rc = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags,
                    arg, argsz);
  return rc < 0 ? -errno : (int)rc;
}

static int sys_register(int fd, unsigned opcode, void* arg, unsigned nr) {
  long rc = syscall(__NR_io_uring_register, fd, opcode, arg, nr);
  return rc < 0 ? -errno : (int)rc;
}

static uint64_t op_user_data(const fiocp_op_t* op) {
  return (uint64_t)(uintptr_t)op | ((uint64_t)op->gen << 56);
}

static fiocp_op_t* user_data_op(uint64_t ud) {
  return (fiocp_op_t*)(uintptr_t)(ud & ((1ULL << 56) - 1));
}

/* ---- Setup and probe ---------------------------------------------------- */

static const struct {
  uint8_t op;
  const char* name;
} needed_ops[] = {
    {FU_OP_NOP, "NOP"},       {FU_OP_READ, "READ"},
    {FU_OP_WRITE, "WRITE"},   {FU_OP_SEND, "SEND"},
    {FU_OP_RECV, "RECV"},     {FU_OP_SENDMSG, "SENDMSG"},
    {FU_OP_RECVMSG, "RECVMSG"}, {FU_OP_ACCEPT, "ACCEPT"},
    {FU_OP_CONNECT, "CONNECT"}, {FU_OP_ASYNC_CANCEL, "ASYNC_CANCEL"},
    /* All older than EXT_ARG (5.11), which is required anyway. */
    {FU_OP_FSYNC, "FSYNC"},   {FU_OP_POLL_ADD, "POLL_ADD"},
    {FU_OP_TIMEOUT, "TIMEOUT"}, {FU_OP_LINK_TIMEOUT, "LINK_TIMEOUT"},
};

static const char* errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case ENOMEM: return "ENOMEM";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case EACCES: return "EACCES";
    default: return strerror(e);
  }
}

static void uring_unmap(uring_t* u) {
  if (u->sqes && u->sqes != MAP_FAILED) munmap(u->sqes, u->sqes_size);
  if (u->cq_ring && u->cq_ring != MAP_FAILED && u->cq_ring != u->sq_ring)
    munmap(u->cq_ring, u->cq_ring_size);
  if (u->sq_ring && u->sq_ring != MAP_FAILED)
    munmap(u->sq_ring, u->sq_ring_size);
  u->sqes = NULL;
  u->sq_ring = u->cq_ring = NULL;
}

/* Opens a ring with fd and mappings in u, checks features and opcodes.
 * Returns 0 or a negative errno with a reason in why. */
static int uring_open(uring_t* u, unsigned entries, char* why, size_t whylen) {
  struct fu_params p;
  int rc, i;
  unsigned k;
  struct fu_probe* probe;
  const size_t probe_size = sizeof(struct fu_probe) + 256 * sizeof(struct fu_probe_op);

  memset(&p, 0, sizeof(p));
  /* The CQ is four times the SQ: completions of deferred and in-flight
   * operations must rarely need the overflow backlog. */
  p.flags = FU_SETUP_CQSIZE | FU_SETUP_CLAMP;
  p.cq_entries = entries * 4;
  /* An operation with a timeout takes two adjacent SQEs (the operation and
   * its LINK_TIMEOUT): the SQ must hold two, whatever the hint. */
  if (entries < 2) entries = 2;
  /* COOP_TASKRUN: a completion for a thread busy in user space waits for
   * that thread's next system call instead of interrupting it with an IPI
   * (about 5% of a loopback HTTP server's CPU went to those). TASKRUN_FLAG tells
   * the harvester when such completions wait, so that it enters to run
   * them. Kernels before 5.19 refuse the flags: open without them. */
  p.flags |= FU_SETUP_COOP_TASKRUN | FU_SETUP_TASKRUN_FLAG;
  rc = sys_setup(entries, &p);
  if (rc == -EINVAL) {
    memset(&p, 0, sizeof(p));
    p.flags = FU_SETUP_CQSIZE | FU_SETUP_CLAMP;
    p.cq_entries = entries * 4;
    rc = sys_setup(entries, &p);
  }
  if (rc < 0) {
    const char* hint = "";
    if (rc == -EPERM)
      hint = ": blocked by seccomp or kernel.io_uring_disabled";
    else if (rc == -ENOSYS)
      hint = ": the kernel has no io_uring";
    snprintf(why, whylen, "io_uring_setup failed with %s%s",
             errno_name(-rc), hint);
    return rc;
  }
  u->fd = rc;
  u->features = p.features;
  if (!(p.features & FU_FEAT_NODROP) || !(p.features & FU_FEAT_EXT_ARG) ||
      !(p.features & FU_FEAT_RW_CUR_POS) ||
      !(p.features & FU_FEAT_SUBMIT_STABLE)) {
    snprintf(why, whylen,
             "io_uring lacks NODROP/EXT_ARG/RW_CUR_POS/SUBMIT_STABLE "
             "(kernel older than 5.11)");
    close(u->fd);
    u->fd = -1;
    return -EINVAL;
  }

  u->sq_ring_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  u->cq_ring_size = p.cq_off.cqes + p.cq_entries * sizeof(struct fu_cqe);
  if (p.features & FU_FEAT_SINGLE_MMAP) {
    if (u->cq_ring_size > u->sq_ring_size) u->sq_ring_size = u->cq_ring_size;
    u->cq_ring_size = u->sq_ring_size;
  }
  u->sq_ring = mmap(NULL, u->sq_ring_size, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, u->fd, FU_OFF_SQ_RING);
  if (u->sq_ring == MAP_FAILED) goto mmap_failed;
  if (p.features & FU_FEAT_SINGLE_MMAP) {
    u->cq_ring = u->sq_ring;
  } else {
    u->cq_ring = mmap(NULL, u->cq_ring_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, u->fd, FU_OFF_CQ_RING);
    if (u->cq_ring == MAP_FAILED) goto mmap_failed;
  }
  u->sqes_size = p.sq_entries * sizeof(struct fu_sqe);
  u->sqes = (struct fu_sqe*)mmap(NULL, u->sqes_size, PROT_READ | PROT_WRITE,
                                 MAP_SHARED | MAP_POPULATE, u->fd, FU_OFF_SQES);
  if (u->sqes == MAP_FAILED) goto mmap_failed;

  u->sq_khead = (unsigned*)((char*)u->sq_ring + p.sq_off.head);
  u->sq_ktail = (unsigned*)((char*)u->sq_ring + p.sq_off.tail);
  u->sq_kflags = (unsigned*)((char*)u->sq_ring + p.sq_off.flags);
  u->sq_mask = *(unsigned*)((char*)u->sq_ring + p.sq_off.ring_mask);
  u->sq_entries = *(unsigned*)((char*)u->sq_ring + p.sq_off.ring_entries);
  u->sq_tail = *u->sq_ktail;
  {
    /* Identity map: SQE i sits in slot i, set once. */
    unsigned* array = (unsigned*)((char*)u->sq_ring + p.sq_off.array);
    for (k = 0; k < u->sq_entries; k++) array[k] = k;
  }
  u->cq_khead = (unsigned*)((char*)u->cq_ring + p.cq_off.head);
  u->cq_ktail = (unsigned*)((char*)u->cq_ring + p.cq_off.tail);
  u->cq_mask = *(unsigned*)((char*)u->cq_ring + p.cq_off.ring_mask);
  u->cqes = (struct fu_cqe*)((char*)u->cq_ring + p.cq_off.cqes);

  probe = (struct fu_probe*)calloc(1, probe_size);
  if (probe == NULL) {
    snprintf(why, whylen, "out of memory");
    rc = -ENOMEM;
    goto fail;
  }
  rc = sys_register(u->fd, FU_REGISTER_PROBE, probe, 256);
  if (rc < 0) {
    free(probe);
    snprintf(why, whylen, "IORING_REGISTER_PROBE failed with %s",
             errno_name(-rc));
    goto fail;
  }
  for (i = 0; i < (int)(sizeof(needed_ops) / sizeof(needed_ops[0])); i++) {
    uint8_t op = needed_ops[i].op;
    if (op > probe->last_op ||
        !(probe->ops[op].flags & FU_PROBE_OP_SUPPORTED)) {
      snprintf(why, whylen, "io_uring opcode %s is not supported",
               needed_ops[i].name);
      free(probe);
      rc = -EINVAL;
      goto fail;
    }
  }
  /* SEND_ZC and IORING_RECV_MULTISHOT came together (6.0); what 5.19
   * brought (buffer rings, multishot accept) is older: uring_init. */
  if (probe->last_op >= FU_OP_SEND_ZC &&
      (probe->ops[FU_OP_SEND_ZC].flags & FU_PROBE_OP_SUPPORTED))
    u->have |= HAVE_SEND_ZC | HAVE_RECV_MS | HAVE_PBUF | HAVE_ACCEPT_MS;
  free(probe);
  return 0;

mmap_failed:
  rc = -errno;
  snprintf(why, whylen, "mmap of the io_uring rings failed with %s",
           errno_name(-rc));
fail:
  uring_unmap(u);
  close(u->fd);
  u->fd = -1;
  return rc;
}

static int uring_probe(char* why, size_t whylen) {
  uring_t u;
  int rc;
  memset(&u, 0, sizeof(u));
  u.fd = -1;
  rc = uring_open(&u, 4, why, whylen);
  if (rc == 0) {
    uring_unmap(&u);
    close(u.fd);
  }
  return rc;
}

/* ---- Submission --------------------------------------------------------- */

static void uring_harvest(void* ctx);

/* Tells the kernel about every SQE published so far. hub_locked says
 * whether the caller holds the hub's mutex (the CQ consumer's lock). Returns
 * 0 or a negative errno (never -EINTR or -EBUSY: those are retried). */
static int uring_enter_submit(uring_t* u, int hub_locked) {
  for (;;) {
    unsigned tail = __atomic_load_n(u->sq_ktail, __ATOMIC_ACQUIRE);
    unsigned head = __atomic_load_n(u->sq_khead, __ATOMIC_ACQUIRE);
    int rc;
    if (tail == head) return 0;
    rc = sys_enter(u->fd, tail - head, 0, 0, NULL, 0);
    if (rc >= 0) continue; /* loop: more may have been published */
    if (rc == -EINTR) continue;
    if (rc == -EBUSY || rc == -EAGAIN) {
      /* The CQ overflowed into the backlog (or the kernel is short of
       * memory): let a consumer drain it, then try again. */
      fiocp_hub_t* hub = &u->hub;
      if (hub_locked) {
        uring_harvest(u);
      } else {
        pthread_mutex_lock(&hub->mu);
        uring_harvest(u);
        fiocp__hub_wake_locked(hub);
        pthread_mutex_unlock(&hub->mu);
      }
      sched_yield();
      continue;
    }
    return rc;
  }
}

/* poll32_events of a POLL_ADD SQE: the kernel swaps its half-words on
 * big-endian machines (liburing does the same before it). */
static uint32_t poll32(uint32_t events) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  events = (events << 16) | (events >> 16);
#endif
  return events;
}

static void prep_poll(struct fu_sqe* sqe, int fd, uint32_t events) {
  sqe->opcode = FU_OP_POLL_ADD;
  sqe->fd = fd;
  sqe->op_flags = poll32(events);
}

/* Fills the SQE for op. */
static void prep_sqe(struct fu_sqe* sqe, fiocp_op_t* op) {
  memset(sqe, 0, sizeof(*sqe));
  sqe->fd = (int32_t)op->handle;
  sqe->user_data = op_user_data(op);
  switch (op->kind) {
    case FIOCP_OP_READ:
    case FIOCP_OP_WRITE:
      sqe->opcode = op->kind == FIOCP_OP_READ ? FU_OP_READ : FU_OP_WRITE;
      sqe->addr = (uint64_t)(uintptr_t)op->buf;
      sqe->len = op->len;
      sqe->off = (uint64_t)op->offset; /* -1: current position */
      break;
    case FIOCP_OP_RECV:
      if (op->bk & BK_EMU_POOL) {
        /* Until data (or its end) is there; then recv() into a buffer
         * (pooled_poll_step). */
        prep_poll(sqe, (int)op->handle, POLLIN);
        break;
      }
      sqe->opcode = FU_OP_RECV;
      sqe->addr = (uint64_t)(uintptr_t)op->buf;
      sqe->len = op->len;
      if (op->flags & FIOCP_OPF_POOLED) {
        /* POLL_FIRST: the buffer is chosen only once data is there. */
        sqe->addr = 0;
        sqe->flags = FU_SQE_BUFFER_SELECT;
        sqe->buf_index = op->pool->group;
        sqe->ioprio = FU_RECVSEND_POLL_FIRST;
        if ((op->flags & FIOCP_OPF_MULTISHOT) && !(op->bk & BK_REARM)) {
          sqe->ioprio |= FU_RECV_MULTISHOT;
          sqe->len = 0; /* required: each result is at most a buffer */
        }
      }
      break;
    case FIOCP_OP_SEND:
      sqe->opcode = (op->bk & BK_ZC) ? FU_OP_SEND_ZC : FU_OP_SEND;
      sqe->addr = (uint64_t)(uintptr_t)op->buf;
      sqe->len = op->len;
      sqe->op_flags = MSG_NOSIGNAL;
      break;
    case FIOCP_OP_RECVFROM:
    case FIOCP_OP_SENDTO: {
      fiocp_addr_t* a = op->addr;
      memset(&a->msg, 0, sizeof(a->msg));
      a->iov.iov_base = op->buf;
      a->iov.iov_len = op->len;
      a->msg.msg_iov = &a->iov;
      a->msg.msg_iovlen = 1;
      a->msg.msg_name = &a->ss;
      if (op->kind == FIOCP_OP_RECVFROM) {
        a->msg.msg_namelen = sizeof(a->ss);
        sqe->opcode = FU_OP_RECVMSG;
      } else {
        a->msg.msg_namelen = a->sslen;
        sqe->opcode = FU_OP_SENDMSG;
        sqe->op_flags = MSG_NOSIGNAL;
      }
      sqe->addr = (uint64_t)(uintptr_t)&a->msg;
      sqe->len = 1;
      break;
    }
    case FIOCP_OP_ACCEPT:
      if ((op->flags & FIOCP_OPF_MULTISHOT) && !(op->bk & BK_REARM)) {
        /* Every accept would write the one address: none is asked for
         * (children have none; finish_op() asks for a final one's). */
        op->addr->sslen = 0;
        sqe->opcode = FU_OP_ACCEPT;
        sqe->op_flags = SOCK_CLOEXEC;
        sqe->ioprio = FU_ACCEPT_MULTISHOT;
        break;
      }
      op->addr->sslen = sizeof(op->addr->ss);
      sqe->opcode = FU_OP_ACCEPT;
      sqe->addr = (uint64_t)(uintptr_t)&op->addr->ss;
      sqe->off = (uint64_t)(uintptr_t)&op->addr->sslen;
      sqe->op_flags = SOCK_CLOEXEC;
      break;
    case FIOCP_OP_CONNECT:
      sqe->opcode = FU_OP_CONNECT;
      sqe->addr = (uint64_t)(uintptr_t)&op->addr->ss;
      sqe->off = (uint64_t)op->addr->sslen;
      break;
    case FIOCP_OP_POLL:
      /* One-shot. ERR and HUP are always armed by the kernel. */
      prep_poll(sqe, (int)op->handle, op->len & 0xffffu);
      break;
    case FIOCP_OP_SENDMSG:
    case FIOCP_OP_RECVMSG: {
      /* Rebuilt at every (re)submission: the kernel copies the header at
       * submission and, for RECVMSG, writes msg_namelen, msg_controllen
       * and msg_flags back into it on completion (finish_op). */
      fiocp_addr_t* a = op->addr;
      memset(&a->msg, 0, sizeof(a->msg));
      a->msg.msg_iov = (struct iovec*)a->iovs;
      a->msg.msg_iovlen = a->niov;
      a->msg.msg_control = a->controllen > 0 ? a->control : NULL;
      a->msg.msg_controllen = a->controllen;
      if (op->kind == FIOCP_OP_RECVMSG) {
        a->msg.msg_name = &a->ss;
        a->msg.msg_namelen = sizeof(a->ss);
        sqe->opcode = FU_OP_RECVMSG;
        /* Received descriptors (SCM_RIGHTS) must not leak into children,
         * as CPython's socket.recvmsg() makes sure of. */
        sqe->op_flags = (uint32_t)a->msgflags | MSG_CMSG_CLOEXEC;
      } else {
        if (a->sslen > 0) {
          a->msg.msg_name = &a->ss;
          a->msg.msg_namelen = a->sslen;
        }
        sqe->opcode = FU_OP_SENDMSG;
        sqe->op_flags = (uint32_t)a->msgflags | MSG_NOSIGNAL;
      }
      sqe->addr = (uint64_t)(uintptr_t)&a->msg;
      sqe->len = 1;
      break;
    }
    case FIOCP_OP_SENDFILE:
      /* Between bursts: until the socket takes more (or fails). */
      prep_poll(sqe, (int)op->handle, POLLOUT);
      break;
    case FIOCP_OP_WAIT_PROCESS:
      /* The pidfd becomes readable when the process exits. */
      prep_poll(sqe, (int)op->addr->scratch.i64[SC_FD0], POLLIN);
      break;
    case FIOCP_OP_FSYNC:
      sqe->opcode = FU_OP_FSYNC;
      sqe->op_flags = op->len == 1 ? FU_FSYNC_DATASYNC : 0;
      break;
  }
}

/* Reserves need (1 or 2) adjacent SQEs under sq_mu, entering the kernel to
 * make room when the ring is full. Returns the first with sq_mu held, or
 * NULL (sq_mu released) and *err set. */
static struct fu_sqe* get_sqe_locked(uring_t* u, int hub_locked,
                                     unsigned need, int* err) {
  for (;;) {
    unsigned head = __atomic_load_n(u->sq_khead, __ATOMIC_ACQUIRE);
    int rc;
    if (u->sq_tail - head + need <= u->sq_entries)
      return &u->sqes[u->sq_tail & u->sq_mask];
    /* Full: flush what is there. Release sq_mu first: the flush may need
     * to reap, and the hub lock comes before sq_mu. */
    pthread_mutex_unlock(&u->sq_mu);
    rc = uring_enter_submit(u, hub_locked);
    pthread_mutex_lock(&u->sq_mu);
    if (rc < 0) {
      pthread_mutex_unlock(&u->sq_mu);
      *err = rc;
      return NULL;
    }
  }
}

/* Publishes n SQEs with one store: an enter sees both of a linked pair or
 * neither, so a chain is never cut between two submissions. */
static void publish_locked(uring_t* u, unsigned n) {
  u->sq_tail += n;
  __atomic_store_n(u->sq_ktail, u->sq_tail, __ATOMIC_RELEASE);
}

/* Whether op's timeout is a LINK_TIMEOUT behind each of its SQEs (all but
 * SENDFILE, whose timeout is a guard: see TK_GUARD). */
static int uses_link(const fiocp_op_t* op) {
  return op->timeout_ns > 0 && op->kind != FIOCP_OP_SENDFILE;
}

/* Whether op is tracked (TK_* in its scratch: see there). */
static int tracked(const fiocp_op_t* op) {
  return op->timeout_ns > 0 || op->kind == FIOCP_OP_SENDFILE;
}

/* Queues an SQE for op (or a control SQE when op is NULL). An operation
 * with a timeout gets IOSQE_IO_LINK and its LINK_TIMEOUT right behind it. */
static int push_op(uring_t* u, int hub_locked, fiocp_op_t* op,
                   uint8_t ctl_opcode, uint64_t ctl_addr, uint64_t ctl_ud) {
  int err = 0;
  unsigned need = (op != NULL && uses_link(op)) ? 2 : 1;
  struct fu_sqe* sqe;
  pthread_mutex_lock(&u->sq_mu);
  sqe = get_sqe_locked(u, hub_locked, need, &err);
  if (sqe == NULL) return err;
  if (op != NULL) {
    prep_sqe(sqe, op);
    if (need == 2) {
      struct fu_sqe* lt = &u->sqes[(u->sq_tail + 1) & u->sq_mask];
      sqe->flags |= FU_SQE_IO_LINK;
      memset(lt, 0, sizeof(*lt));
      lt->opcode = FU_OP_LINK_TIMEOUT;
      lt->fd = -1;
      lt->addr = (uint64_t)(uintptr_t)&op->addr->scratch.i64[SC_LINK_TS];
      lt->len = 1;
      lt->op_flags = FU_TIMEOUT_ABS;
      lt->user_data = op_user_data(op) | UD_LINK;
      /* hub.mu is held by every caller that pushes an operation. */
      op->addr->scratch.i64[SC_STATE] += TK_LINK_ONE;
    }
  } else {
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = ctl_opcode;
    sqe->fd = -1;
    sqe->addr = ctl_addr;
    sqe->user_data = ctl_ud;
  }
  publish_locked(u, need);
  pthread_mutex_unlock(&u->sq_mu);
  return 0;
}

/* Queues a TIMEOUT SQE firing at the absolute time *ts (which the kernel
 * reads at submission) with user_data ud: a SENDFILE's guard, the timer
 * heap's kernel timer. */
static int push_abs_timeout(uring_t* u, const void* ts, uint64_t ud) {
  int err = 0;
  struct fu_sqe* sqe;
  pthread_mutex_lock(&u->sq_mu);
  sqe = get_sqe_locked(u, 1, 1, &err);
  if (sqe == NULL) return err;
  memset(sqe, 0, sizeof(*sqe));
  sqe->opcode = FU_OP_TIMEOUT;
  sqe->fd = -1;
  sqe->addr = (uint64_t)(uintptr_t)ts;
  sqe->len = 1;
  sqe->op_flags = FU_TIMEOUT_ABS;
  sqe->user_data = ud;
  publish_locked(u, 1);
  pthread_mutex_unlock(&u->sq_mu);
  return 0;
}

/* Queues a SENDFILE's guard: a TIMEOUT at its absolute deadline. */
static int push_guard(uring_t* u, fiocp_op_t* op) {
  return push_abs_timeout(u, &op->addr->scratch.i64[SC_LINK_TS],
                          op_user_data(op) | UD_GUARD);
}

/* CLOCK_MONOTONIC, the clock of io_uring's timeouts, in nanoseconds. */
static int64_t mono_ns(void) {
  struct timespec ts;
  /* Cannot fail with a valid clock and pointer; should it, the answer
   * "late" ends timeouts rather than re-arming them forever. */
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return INT64_MAX;
  return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* Stores now + delay_ns (saturated) as a timespec in scratch slots
 * [slot, slot + 1]. */
static void put_deadline(fiocp_addr_t* a, int slot, int64_t delay_ns) {
  int64_t now = mono_ns();
  int64_t at = delay_ns > INT64_MAX - now ? INT64_MAX : now + delay_ns;
  a->scratch.i64[slot] = at / NS_PER_S;
  a->scratch.i64[slot + 1] = at % NS_PER_S;
}

/* Whether op's own timeout (timeout_ns) has expired. */
static int deadline_passed(const fiocp_op_t* op) {
  const int64_t* ts = &op->addr->scratch.i64[SC_LINK_TS];
  int64_t at = ts[0] >= INT64_MAX / NS_PER_S ? INT64_MAX
                                             : ts[0] * NS_PER_S + ts[1];
  return mono_ns() >= at;
}

static void close_slot(fiocp_addr_t* a, int slot) {
  int fd = (int)a->scratch.i64[slot];
  if (fd >= 0) {
    /* close() releases the descriptor even when it reports an error;
     * nothing more can be done about one. */
    (void)close(fd);
    a->scratch.i64[slot] = -1;
  }
}

/* The descriptors a record holds between submit and completion. */
static void release_fds(fiocp_op_t* op) {
  if (op->kind == FIOCP_OP_WAIT_PROCESS) close_slot(op->addr, SC_FD0);
}

/* The exit status of the process behind pidfd, as waitpid() encodes it,
 * without reaping it. Returns 1 (status in *status), 0 (still running) or
 * a negative errno (ECHILD: not a child of this process). */
static int pidfd_status(int pidfd, int64_t* status) {
  siginfo_t si;
  int rc;
  memset(&si, 0, sizeof(si));
  do {
    rc = waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si,
                WEXITED | WNOHANG | WNOWAIT);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return -errno;
  if (si.si_pid == 0) return 0; /* WNOHANG: not exited yet */
  switch (si.si_code) {
    case CLD_EXITED:
      *status = (int64_t)(si.si_status & 0xff) << 8;
      return 1;
    case CLD_KILLED:
      *status = si.si_status & 0x7f;
      return 1;
    case CLD_DUMPED:
      *status = (si.si_status & 0x7f) | 0x80;
      return 1;
    default: /* not an exit: WEXITED alone never reports one */
      return 0;
  }
}

/* The work of submit() done before the record enters the ring: the
 * deadlines and descriptors the kinds of issue 14 need. Returns < 0 for
 * an argument error (nothing held), 0 to go on, 1 when the operation
 * already has its result in op->res (a failure of the operation itself,
 * or a process that has already exited): it completes without an SQE. */
static int prepare_op(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  if (op->timeout_ns > 0) {
    put_deadline(a, SC_LINK_TS, op->timeout_ns);
    a->scratch.i64[SC_STATE] = 0;
  }
  switch (op->kind) {
    case FIOCP_OP_SENDFILE:
      a->scratch.i64[SC_SENT] = 0;
      a->scratch.i64[SC_STATE] = 0;
      if (op->offset < 0) return -EINVAL; /* the binding refuses it too */
      if (op->len == 0) {
        op->res = 0;
        return 1;
      }
      return 0;
    case FIOCP_OP_WAIT_PROCESS: {
      long fd;
      int rc;
      int64_t status = 0;
      a->scratch.i64[SC_FD0] = -1;
      if (op->handle <= 0 || op->handle > INT32_MAX) return -EINVAL;
      fd = syscall(SYS_pidfd_open, (pid_t)op->handle, 0u); /* O_CLOEXEC */
      if (fd < 0) {
        /* No such process: it was reaped already, and waitpid() would say
         * ECHILD. ENOSYS (before 5.3) and EMFILE are the operation's. */
        op->res = errno == ESRCH ? -ECHILD : -errno;
        return 1;
      }
      a->scratch.i64[SC_FD0] = fd;
      /* Not a child (ECHILD), or exited already: the result is known. */
      rc = pidfd_status((int)fd, &status);
      if (rc != 0) {
        op->res = rc < 0 ? rc : status;
        release_fds(op);
        return 1;
      }
      return 0;
    }
    default:
      return 0;
  }
}

static int sendfile_burst(fiocp_op_t* op, int64_t* res);

/* Whether kind needs the record's extension (addr). */
static int kind_needs_addr(unsigned kind) {
  switch (kind) {
    case FIOCP_OP_RECVFROM:
    case FIOCP_OP_SENDTO:
    case FIOCP_OP_ACCEPT:
    case FIOCP_OP_CONNECT:
    case FIOCP_OP_SENDMSG:
    case FIOCP_OP_RECVMSG:
    case FIOCP_OP_SENDFILE:
    case FIOCP_OP_WAIT_PROCESS:
    case FIOCP_OP_TIMER:
      return 1;
    default:
      return 0;
  }
}

static const uint8_t uring_support[FIOCP_OP__COUNT] = {
    [FIOCP_SUPPORT_TIMEOUT] = FIOCP_SUP_NATIVE, /* LINK_TIMEOUT */
    [FIOCP_OP_READ] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_WRITE] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_RECV] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SEND] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_RECVFROM] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SENDTO] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_ACCEPT] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_CONNECT] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_POST] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_POLL] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SENDMSG] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_RECVMSG] = FIOCP_SUP_NATIVE,
    /* POLL_ADD, then sendfile() bursts from the backend (no opcode): */
    [FIOCP_OP_SENDFILE] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_WAIT_PROCESS] = FIOCP_SUP_NATIVE, /* pidfd + POLL_ADD */
    [FIOCP_OP_TIMER] = FIOCP_SUP_EMULATED, /* a heap on one TIMEOUT */
    [FIOCP_OP_FSYNC] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_CONNECT_PIPE] = FIOCP_SUP_NO, /* Windows named pipes */
};

/* ---- Buffer pools ------------------------------------------------------- */

static pbuf_t* pool_impl(fiocp_pool_t* pool) {
  return (pbuf_t*)__atomic_load_n(&pool->impl, __ATOMIC_ACQUIRE);
}

/* Appends buffer id to the ring, unpublished. Pool mutex held. */
static void ring_add(fiocp_pool_t* pool, pbuf_t* r, uint32_t id) {
  struct fu_buf* b = &r->bufs[r->tail & r->mask];
  /* Never b->resv: in slot 0 it is the tail. */
  b->addr = (uint64_t)(uintptr_t)(pool->base + (size_t)id * pool->size);
  b->len = pool->size;
  b->bid = (uint16_t)id;
  r->tail++;
}

/* Shows the kernel the slots added: their contents before the tail. */
static void ring_publish(pbuf_t* r) {
  __atomic_store_n(&r->bufs[0].resv, r->tail, __ATOMIC_RELEASE);
}

/* Moves buffers from the top of the free stack (the latest given back)
 * into the ring until it holds r->depth. Pool mutex held. */
static void ring_fill(fiocp_pool_t* pool, pbuf_t* r) {
  int added = 0;
  while (r->in_ring < r->depth && pool->nfree > 0) {
    ring_add(pool, r, pool->free_ids[--pool->nfree]);
    r->in_ring++;
    added = 1;
  }
  if (added) ring_publish(r);
}

/* Gives held buffer id back: onto the free stack, and from there into the
 * ring when it holds fewer than its depth (ring_fill: the buffer given
 * back last is used first). A buffer not held (released twice) is
 * ignored: in the ring twice, it could receive for two results at once.
 * Thread-safe. */
static void pool_put_id(fiocp_pool_t* pool, uint32_t id) {
  pbuf_t* r;
  if (id >= pool->count) return;
  fiocp__pool_lock(pool);
  r = pool_impl(pool);
  if (r == NULL || __atomic_load_n(&r->held[id], __ATOMIC_RELAXED)) {
    if (r != NULL) __atomic_store_n(&r->held[id], 0, __ATOMIC_RELAXED);
    fiocp__pool_give_locked(pool, id);
    if (r != NULL && r->bufs != NULL) ring_fill(pool, r); /* to the ring if short */
  }
  fiocp__pool_unlock(pool);
}

/* Registers r's ring under the next free group id. Returns 0 (the id in
 * *group) or a negative errno. */
static int ring_register(uring_t* u, pbuf_t* r, uint16_t* group) {
  struct fu_buf_reg reg;
  int rc = -EEXIST;
  unsigned tries;
  /* -EEXIST: a live group of this port has the id (the counter wrapped). */
  for (tries = 0; rc == -EEXIST && tries <= UINT16_MAX; tries++) {
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)r->bufs;
    reg.ring_entries = r->mask + 1;
    reg.bgid = u->next_group++;
    rc = sys_register(u->fd, FU_REGISTER_PBUF_RING, &reg, 1);
    if (rc == 0) *group = reg.bgid;
  }
  return rc;
}

static int uring_pool_add(fiocp_port_t* port, fiocp_pool_t* pool) {
  uring_t* u = (uring_t*)port->impl;
  pbuf_t* r;
  uint32_t entries = 1, i;
  uint16_t group = 0;
  int rc = 0;
  if (pool->port == port) return 0;
  if (pool->port != NULL || pool->count == 0 || pool->count > FIOCP_POOL_MAX)
    return -EINVAL;
  r = (pbuf_t*)calloc(1, sizeof(*r));
  if (r == NULL) return FIOCP_ENOMEM;
  r->held = (uint8_t*)calloc(pool->count, 1);
  if (r->held == NULL) {
    free(r);
    return FIOCP_ENOMEM;
  }
  if (u->have & HAVE_PBUF) {
    long page = sysconf(_SC_PAGESIZE);
    size_t bytes;
    if (page <= 0) page = 4096;
    while (entries < pool->count) entries <<= 1;
    bytes = (size_t)entries * sizeof(struct fu_buf);
    r->mask = entries - 1;
    r->bytes = (bytes + (size_t)page - 1) / (size_t)page * (size_t)page;
    r->bufs = (struct fu_buf*)mmap(NULL, r->bytes, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->bufs == MAP_FAILED) {
      rc = -errno;
      r->bufs = NULL;
      goto fail;
    }
  }
  fiocp__pool_lock(pool);
  /* Whatever is not on the free stack is held already. r is not
   * published yet: plain stores. */
  memset(r->held, 1, pool->count);
  for (i = 0; i < pool->nfree; i++) r->held[pool->free_ids[i]] = 0;
  if (r->bufs != NULL) {
    rc = ring_register(u, r, &group);
    if (rc == 0) {
      /* The top of the free stack (lowest ids) goes into the ring. */
      r->depth = pool->count < POOL_RING_DEPTH ? pool->count : POOL_RING_DEPTH;
      ring_fill(pool, r);
      pool->group = group;
    }
  }
  if (rc == 0) {
    pool->port = port;
    __atomic_store_n(&pool->impl, (void*)r, __ATOMIC_RELEASE);
  }
  fiocp__pool_unlock(pool);
  if (rc < 0) goto fail;
  pool->next = u->pools;
  u->pools = pool;
  return 0;
fail:
  if (r->bufs != NULL) munmap(r->bufs, r->bytes);
  free(r->held);
  free(r);
  return rc;
}

/* Takes pool off the port. No operation names it any more, so every
 * buffer the binding does not hold is free: in the ring (unregistered and
 * unmapped here) or on the free stack. GIL. */
static void pool_detach(uring_t* u, fiocp_pool_t* pool) {
  pbuf_t* r;
  uint32_t id;
  fiocp__pool_lock(pool);
  r = pool_impl(pool);
  if (r != NULL && r->bufs != NULL) {
    struct fu_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.bgid = pool->group;
    /* Fails only for a group not registered: nothing to undo then (and
     * closing the ring frees its groups). */
    (void)sys_register(u->fd, FU_UNREGISTER_PBUF_RING, &reg, 1);
    pool->nfree = 0;
    for (id = pool->count; id-- > 0;) /* lowest ids on top */
      if (!__atomic_load_n(&r->held[id], __ATOMIC_RELAXED))
        pool->free_ids[pool->nfree++] = id;
  }
  __atomic_store_n(&pool->impl, NULL, __ATOMIC_RELEASE);
  pool->port = NULL;
  fiocp__pool_unlock(pool);
  if (r != NULL) {
    if (r->bufs != NULL) munmap(r->bufs, r->bytes);
    free(r->held);
    free(r);
  }
}

static void uring_pool_remove(fiocp_port_t* port, fiocp_pool_t* pool) {
  uring_t* u = (uring_t*)port->impl;
  fiocp_pool_t** pp;
  if (pool->port != port) return;
  for (pp = &u->pools; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == pool) {
      *pp = pool->next;
      break;
    }
  }
  pool->next = NULL;
  pool_detach(u, pool);
}

static void uring_pool_put(fiocp_port_t* port, fiocp_pool_t* pool,
                           uint32_t id) {
  (void)port;
  pool_put_id(pool, id);
}

static unsigned uring_native_flags(fiocp_port_t* port) {
  unsigned have = ((uring_t*)port->impl)->have, flags = 0;
  const unsigned ms = HAVE_PBUF | HAVE_RECV_MS | HAVE_ACCEPT_MS;
  if (have & HAVE_PBUF) flags |= FIOCP_OPF_POOLED;
  if ((have & ms) == ms) flags |= FIOCP_OPF_MULTISHOT;
  if (have & HAVE_SEND_ZC) flags |= FIOCP_OPF_ZEROCOPY;
  return flags;
}

/* Whether fd is an AF_UNIX socket. Their receives report how much is left
 * queued (msg_inq, which the kernel's multishot receive reads to decide
 * whether to go on at once) without TCP's hint that the stream has ended
 * (tcp_inq_hint): a multishot receive that takes the last data of a
 * stream whose end is queued behind it then waits for a wake-up the
 * shutdown gave already, and its end never comes (6.18; seen with data
 * and shutdown queued before the receive ran). */
static int is_unix_socket(fiocp_handle_t fd) {
  int domain = 0;
  socklen_t len = sizeof(domain);
  return getsockopt((int)fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
         domain == AF_UNIX;
}

/* Checks issue 18's flags of op and picks how it runs (op->bk). Returns 0
 * or a negative code (nothing submitted). */
static int choose_mode(uring_t* u, fiocp_op_t* op) {
  unsigned flags = op->flags;
  op->bk = 0;
  if (flags & FIOCP_OPF_POOLED) {
    fiocp_pool_t* pool = op->pool;
    pbuf_t* r;
    if (op->kind != FIOCP_OP_RECV || pool == NULL || pool->port != u->port ||
        (r = pool_impl(pool)) == NULL)
      return -EINVAL;
    if (op->len == 0 || op->len > pool->size) op->len = pool->size;
    op->offset = -1; /* no buffer held */
    if (r->bufs == NULL) op->bk |= BK_EMU_POOL;
  }
  if (flags & FIOCP_OPF_MULTISHOT) {
    if (op->timeout_ns > 0) return -EINVAL; /* the binding refuses them */
    if (op->kind == FIOCP_OP_RECV) {
      if (!(flags & FIOCP_OPF_POOLED)) return -EINVAL;
      if (!(op->bk & BK_EMU_POOL) &&
          (!(u->have & HAVE_RECV_MS) || op->len < op->pool->size ||
           is_unix_socket(op->handle)))
        op->bk |= BK_REARM;
    } else if (op->kind == FIOCP_OP_ACCEPT) {
      if (!(u->have & HAVE_ACCEPT_MS)) op->bk |= BK_REARM;
    } else {
      return -EINVAL;
    }
  }
  if (flags & FIOCP_OPF_ZEROCOPY) {
    if (op->kind != FIOCP_OP_SEND) return -EINVAL;
    if (u->have & HAVE_SEND_ZC) op->bk |= BK_ZC;
  }
  return 0;
}

/* ---- Timers ------------------------------------------------------------- */

/* Pushes k's kernel TIMEOUT (absolute, k->ts). hub.mu held. */
static int push_ktimer(uring_t* u, ktimer_t* k) {
  return push_abs_timeout(u, &k->ts, (uint64_t)(uintptr_t)k | UD_KTIMER);
}

/* timers.armed: the earliest kernel TIMEOUT not being cancelled. */
static void kt_recompute(uring_t* u) {
  ktimer_t* o;
  int64_t armed = INT64_MAX;
  for (o = u->kt; o != NULL; o = o->next)
    if (!o->cancelling && o->at < armed) armed = o->at;
  u->timers.armed = armed;
}

static void kt_unlink(uring_t* u, ktimer_t* k) {
  if (k->prev != NULL) k->prev->next = k->next;
  else u->kt = k->next;
  if (k->next != NULL) k->next->prev = k->prev;
}

/* Pushes an ASYNC_CANCEL of every kernel TIMEOUT not being cancelled yet.
 * A push may reap CQEs (a full SQ: get_sqe_locked()), which may free list
 * entries: each is marked before its push and the scan starts over. A
 * failed push leaves that TIMEOUT to expire and find nothing due; its CQE
 * still comes. A cancel that outlives its target (which expired first)
 * may hit a later ktimer_t at the same address: that one's CQE re-arms,
 * as after any end. hub.mu held, u->kt_busy set. */
static void kt_cancel_all(uring_t* u) {
  for (;;) {
    ktimer_t* o = u->kt;
    while (o != NULL && o->cancelling) o = o->next;
    if (o == NULL) break;
    o->cancelling = 1;
    (void)push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL,
                  (uint64_t)(uintptr_t)o | UD_KTIMER, UD_CANCEL);
  }
  kt_recompute(u);
}

/* Arms a kernel TIMEOUT for deadline when (+ slack), earlier than any
 * armed, after cancelling those it supersedes (their expiry would be a
 * wake-up for nothing). Its CQE is owed from the push on (hub.inflight;
 * the record is listed first, as a reap inside the push may already see
 * its CQE). Returns 0, FIOCP_ENOMEM or a negative errno. hub.mu held. */
static int kt_arm(uring_t* u, int64_t when) {
  ktimer_t* k = (ktimer_t*)malloc(sizeof(*k));
  int rc;
  if (k == NULL) return FIOCP_ENOMEM;
  u->kt_busy++;
  kt_cancel_all(u);
  k->at = fiocp__th_fire_at(&u->timers, when);
  k->ts.tv_sec = k->at / NS_PER_S;
  k->ts.tv_nsec = k->at % NS_PER_S;
  k->cancelling = 0;
  k->prev = NULL;
  k->next = u->kt;
  if (u->kt != NULL) u->kt->prev = k;
  u->kt = k;
  u->hub.inflight++;
  u->timers.armed = k->at;
  rc = push_ktimer(u, k);
  if (rc < 0) {
    /* Not published: no CQE will come. */
    kt_unlink(u, k);
    free(k);
    u->hub.inflight--;
    kt_recompute(u);
  }
  u->kt_busy--;
  return rc;
}

/* Completes every timer due by now, in deadline order. hub.mu held. */
static void timers_fire_locked(uring_t* u, int64_t now) {
  fiocp_op_t* op;
  while ((op = fiocp__th_pop_due(&u->timers, now)) != NULL) {
    op->res = op->addr->scratch.i64[SC_TMOUT] ? FIOCP_ETIMEDOUT : 0;
    fiocp__hub_complete_locked(&u->hub, op, 1);
  }
}

/* A kernel TIMEOUT's CQE, whatever ended it (-ETIME: expired; -ECANCELED:
 * our cancel or the exit of the thread that submitted it): forgotten, and
 * timers_settle_locked() is owed. No push here: this runs inside the CQ
 * loop, which a push's reap would re-enter. hub.mu held. */
static void ktimer_cqe(uring_t* u, ktimer_t* k) {
  kt_unlink(u, k);
  free(k);
  u->hub.inflight--;
  kt_recompute(u);
  u->kt_due = 1;
}

/* After kernel TIMEOUT CQEs: what is due fires, and a kernel timer is
 * armed for what is left unless one already covers it. Not while kt_arm()
 * or the shutdown sweep is under way below (a reap inside their pushes):
 * they call this again when done. A failed arm leaves timers.armed past
 * the earliest deadline, so the next timer submitted arms again. Returns
 * 1 if it pushed an SQE. hub.mu held. */
static int timers_settle_locked(uring_t* u) {
  int pushed = 0;
  while (u->kt_due && u->kt_busy == 0) {
    u->kt_due = 0;
    if (u->hub.closed) break; /* shutdown() takes the timers */
    timers_fire_locked(u, mono_ns());
    if (u->timers.n > 0 &&
        fiocp__th_needs_arm(&u->timers, fiocp__th_earliest(&u->timers)) &&
        kt_arm(u, fiocp__th_earliest(&u->timers)) == 0)
      pushed = 1;
  }
  return pushed;
}

/* A timer's submit: its place is the heap, or the hub at once when it is
 * due already. */
static int timer_submit(uring_t* u, fiocp_op_t* op) {
  int64_t delay = op->offset, now, when;
  int rc, direct = 0;
  if (delay < 0) return -EINVAL;
  op->addr->scratch.i64[SC_HIDX] = 0;
  op->addr->scratch.i64[SC_TMOUT] = 0;
  if (op->timeout_ns > 0 && op->timeout_ns < delay) {
    /* Its own timeout comes first: it ends in FIOCP_ETIMEDOUT. */
    op->addr->scratch.i64[SC_TMOUT] = 1;
    delay = op->timeout_ns;
  }
  now = mono_ns();
  when = delay > INT64_MAX - now ? INT64_MAX : now + delay;
  pthread_mutex_lock(&u->hub.mu);
  rc = fiocp__hub_begin_locked(&u->hub);
  if (rc == 0) {
    /* Read again: timer(0) arrives as 1 ns (the binding's zero), which has
     * passed by now. Whatever the heap holds that is due goes first:
     * deadline order. */
    now = mono_ns();
    if (fiocp__th_earliest(&u->timers) <= now) {
      timers_fire_locked(u, now);
      fiocp__hub_wake_locked(&u->hub);
    }
    if (when <= now) {
      direct = 1; /* no kernel timer at all */
    } else {
      rc = fiocp__th_push(&u->timers, op, when);
      if (rc == 0 && fiocp__th_needs_arm(&u->timers, when) &&
          (rc = kt_arm(u, when)) < 0)
        (void)fiocp__th_remove(&u->timers, op);
      if (rc < 0) u->hub.inflight--;
    }
    /* CQEs reaped inside kt_arm()'s pushes, if any. */
    (void)timers_settle_locked(u);
  }
  pthread_mutex_unlock(&u->hub.mu);
  if (direct) {
    /* Owed like any other completion (a cancel or a close() sweep
     * meanwhile finds it in no heap); this wakes and kicks as needed. */
    op->res = op->addr->scratch.i64[SC_TMOUT] ? FIOCP_ETIMEDOUT : 0;
    fiocp__hub_complete(&u->hub, op, 1);
  }
  return rc;
}

/* shutdown(): every timer completes with -ECANCELED and every kernel
 * TIMEOUT is cancelled (its CQE stays owed). hub.mu held. */
static void timers_cancel_locked(uring_t* u) {
  fiocp_op_t *op, *next;
  for (op = fiocp__th_take_kind(&u->timers, FIOCP_OP_TIMER); op != NULL;
       op = next) {
    next = op->next;
    op->flags |= FIOCP_OPF_CANCELLED;
    op->res = -ECANCELED;
    fiocp__hub_complete_locked(&u->hub, op, 1);
  }
  /* A failed cancel push leaves that TIMEOUT to expire: close() then
   * waits for it, bounded. */
  u->kt_busy++;
  kt_cancel_all(u);
  u->kt_busy--;
}

static int uring_submit(fiocp_port_t* port, fiocp_op_t* op, int defer) {
  uring_t* u = (uring_t*)port->impl;
  int rc, early;
  if (op->kind == 0 || op->kind >= FIOCP_OP__COUNT ||
      uring_support[op->kind] == FIOCP_SUP_NO)
    return FIOCP_EUNSUPPORTED;
  if (op->kind == FIOCP_OP_POST) return -EINVAL; /* post() queues those */
  if (op->addr == NULL && (op->timeout_ns > 0 || kind_needs_addr(op->kind)))
    return -EINVAL;
  if (op->flags & (FIOCP_OPF_POOLED | FIOCP_OPF_MULTISHOT |
                   FIOCP_OPF_ZEROCOPY)) {
    rc = choose_mode(u, op);
    if (rc < 0) return rc;
  } else {
    op->bk = 0;
  }
  if (op->kind == FIOCP_OP_TIMER) {
    /* Its kernel TIMEOUT, if it pushed one, waits for the next enter like
     * any deferred SQE. */
    rc = timer_submit(u, op);
    if (rc == 0 && !defer) (void)uring_enter_submit(u, 0);
    return rc;
  }
  early = prepare_op(op);
  if (early < 0) return early;
  /* Accounted and queued under one hold of the hub's mutex: shutdown()'s
   * sweep (and cancel()) take it too, so their ASYNC_CANCEL always follows
   * this SQE in the ring. With the two steps apart, a close() on another
   * thread (3.13t, where submit runs outside the port lock) could cancel
   * the record before its SQE existed, and the operation would stay owed
   * forever. */
  pthread_mutex_lock(&u->hub.mu);
  rc = fiocp__hub_begin_locked(&u->hub);
  if (rc == 0 && !early && op->kind == FIOCP_OP_SENDFILE) {
    /* The first burst goes out from this thread, without the hub's mutex:
     * accounted already, so that a close() meanwhile finds the operation
     * (it marks it cancelled, checked below); no SQE yet, so nothing else
     * touches the record. The poll follows only if the socket filled. */
    int64_t out = 0, sent;
    int over;
    pthread_mutex_unlock(&u->hub.mu);
    over = sendfile_burst(op, &out);
    pthread_mutex_lock(&u->hub.mu);
    sent = op->addr->scratch.i64[SC_SENT];
    if (!over && ((op->flags & FIOCP_OPF_CANCELLED) || u->hub.closed)) {
      out = sent > 0 ? sent : -ECANCELED;
      over = 1;
    } else if (!over && op->timeout_ns > 0 && deadline_passed(op)) {
      out = sent > 0 ? sent : FIOCP_ETIMEDOUT;
      over = 1;
    }
    if (over) {
      op->res = out;
      early = 1; /* completes below, as one known at once */
    }
  }
  if (rc == 0 && !early) {
    rc = push_op(u, 1, op, 0, 0, 0);
    if (rc < 0) {
      u->hub.inflight--;
    } else if (op->timeout_ns > 0 && op->kind == FIOCP_OP_SENDFILE) {
      /* After the POLL: a close() sweep cancels the POLL, and the guard
       * is cancelled once the operation is over. Not queued (the kernel
       * refuses SQEs): the operation runs unbounded rather than fail. */
      op->addr->scratch.i64[SC_STATE] |= TK_GUARD;
      if (push_guard(u, op) < 0)
        op->addr->scratch.i64[SC_STATE] &= ~TK_GUARD;
    }
  }
  pthread_mutex_unlock(&u->hub.mu);
  if (rc < 0) {
    release_fds(op);
    return rc;
  }
  if (early) {
    /* Its completion is owed like any other: queue it (a cancel or a
     * close() sweep meanwhile only finds no request: -ENOENT). */
    fiocp__hub_complete(&u->hub, op, 1);
    return 0;
  }
  if (!defer) {
    /* The SQE is published: from here on the kernel owes a CQE (a failed
     * enter still leaves it queued for the next one). */
    (void)uring_enter_submit(u, 0);
  }
  return 0;
}

static int uring_flush(fiocp_port_t* port) {
  return uring_enter_submit((uring_t*)port->impl, 0);
}

static int uring_cancel(fiocp_port_t* port, fiocp_op_t* op) {
  uring_t* u = (uring_t*)port->impl;
  int rc;
  pthread_mutex_lock(&u->hub.mu);
  if (op->state != FIOCP_ST_INFLIGHT) {
    pthread_mutex_unlock(&u->hub.mu);
    return 0;
  }
  if (op->kind == FIOCP_OP_TIMER) {
    /* Its place is the heap: whoever takes it out completes it (a timer
     * completing straight from submit is in none: nothing to do). The
     * kernel TIMEOUT stays; an early wake finds nothing due. */
    int found = fiocp__th_remove(&u->timers, op);
    pthread_mutex_unlock(&u->hub.mu);
    if (!found) return 0;
    op->flags |= FIOCP_OPF_CANCELLED;
    op->res = -ECANCELED;
    fiocp__hub_complete(&u->hub, op, 1);
    return 1;
  }
  op->flags |= FIOCP_OPF_CANCELLED;
  /* The generation in the target's user_data keeps this cancel from ever
   * matching a later operation that reuses the record. */
  rc = push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL, op_user_data(op), UD_CANCEL);
  pthread_mutex_unlock(&u->hub.mu);
  if (rc < 0) return rc;
  rc = uring_enter_submit(u, 0);
  return rc < 0 ? rc : 1;
}

/* ---- Completion --------------------------------------------------------- */

static void finish_op(uring_t* u, fiocp_op_t* op, int64_t res);

/* Queues op, finished with its result in op->res, once nothing holds it
 * back (BK_DELIVER until then): a SEND_ZC's notification still owed, or
 * its place on the resubmit list (BK_PUSH_CANCEL: op->next links that
 * list, the hub's queue links the same field). hub.mu held. */
static void settle_held(uring_t* u, fiocp_op_t* op) {
  if ((op->bk & BK_DELIVER) &&
      !(op->bk & (BK_NOTIF_OWED | BK_PUSH_CANCEL))) {
    op->bk &= ~(uintptr_t)BK_DELIVER;
    fiocp__hub_complete_locked(&u->hub, op, 1);
  }
}

static void deliver_locked(uring_t* u, fiocp_op_t* op) {
  op->bk |= BK_DELIVER;
  settle_held(u, op);
}

/* Lists op for an ASYNC_CANCEL of its SQE, pushed after the CQ loop: a
 * push may reap, which must not re-enter that loop. hub.mu held. */
static void list_cancel(uring_t* u, fiocp_op_t* op) {
  if (op->bk & BK_PUSH_CANCEL) return;
  op->bk |= BK_PUSH_CANCEL;
  op->next = u->resubmit;
  u->resubmit = op;
}

/* Undoes a result nobody will get: its buffer (bid >= 0) goes back, an
 * accepted socket is closed. */
static void drop_result(fiocp_op_t* op, int64_t res, int64_t bid) {
  if (bid >= 0)
    pool_put_id(op->pool, (uint32_t)bid);
  else if (op->kind == FIOCP_OP_ACCEPT && res >= 0)
    (void)close((int)res); /* releases the descriptor whatever it says */
}

/* The peer address of an accepted socket into a (sslen 0 if unknown). */
static void peer_address(fiocp_addr_t* a, int fd) {
  socklen_t len = sizeof(a->ss);
  if (getpeername(fd, (struct sockaddr*)&a->ss, &len) == 0)
    a->sslen = len;
  else
    a->sslen = 0;
}

/* Puts a tracked operation on the resubmit list for what (TK_PUSH_*),
 * once: several of its CQEs may ask for pushes in one harvest, and
 * op->next links one list only. */
static void track_push(uring_t* u, fiocp_op_t* op, int64_t what) {
  int64_t* sc = op->addr->scratch.i64;
  int listed = (sc[SC_STATE] & TK_PUSH) != 0;
  sc[SC_STATE] |= what;
  if (!listed) {
    op->next = u->resubmit;
    u->resubmit = op;
  }
}

/* Delivers a tracked operation's completion when it is over, no helper
 * CQE is owed, and it is not on the resubmit list (whose loop calls this
 * again when it takes it off). hub.mu held. */
static void track_settle(uring_t* u, fiocp_op_t* op) {
  int64_t* sc = op->addr->scratch.i64;
  if (!(sc[SC_STATE] & TK_DONE) ||
      (sc[SC_STATE] & (TK_GUARD | TK_PUSH | TK_LINKS)))
    return;
  op->res = sc[SC_RESULT];
  deliver_locked(u, op);
}

/* A SENDFILE guard's CQE. */
static void guard_cqe(uring_t* u, fiocp_op_t* op, int32_t res) {
  int64_t* sc = op->addr->scratch.i64;
  sc[SC_STATE] &= ~(TK_GUARD | TK_GUARD_OFF);
  if (sc[SC_STATE] & TK_DONE) {
    track_settle(u, op); /* the last CQE the operation owed */
  } else if (res == -ETIME) {
    /* Expired: cancel the POLL in flight; its CQE finds the deadline
     * passed and ends the operation (op_cqe, sendfile_step). */
    track_push(u, op, TK_PUSH_CANCEL);
  } else if (!u->hub.closed && !(op->flags & FIOCP_OPF_CANCELLED)) {
    /* Cancelled though nobody asked: the exit of the thread that armed
     * it. Arm it again (same absolute deadline). */
    sc[SC_STATE] |= TK_GUARD;
    track_push(u, op, TK_PUSH_GUARD);
  }
}

/* A LINK_TIMEOUT's CQE: -ECANCELED when its operation completed first
 * (disarmed), -ETIME or a cancel's result when it fired, and -ECANCELED
 * too when it fired for a thread that has exited, without cancelling
 * anything (see TK_LINKS). */
static void link_cqe(uring_t* u, fiocp_op_t* op, int32_t res) {
  int64_t* sc = op->addr->scratch.i64;
  sc[SC_STATE] -= TK_LINK_ONE;
  if (sc[SC_STATE] & TK_DONE) {
    track_settle(u, op);
  } else if (res == -ECANCELED && !(op->flags & FIOCP_OPF_CANCELLED) &&
             deadline_passed(op)) {
    /* Still pending past its deadline. Should the operation's own CQE be
     * on its way, the cancel finds nothing (-ENOENT). */
    track_push(u, op, TK_PUSH_CANCEL);
  }
}

/* The resubmit loop's work for a tracked operation: the pushes its CQEs
 * asked for, then its completion if that is all that was left. hub.mu
 * held. */
static void track_pushes(uring_t* u, fiocp_op_t* op) {
  int64_t* sc = op->addr->scratch.i64;
  int64_t what = sc[SC_STATE] & TK_PUSH;
  sc[SC_STATE] &= ~TK_PUSH;
  if (sc[SC_STATE] & TK_DONE) {
    /* The operation is over: a guard not re-armed yet is simply not. */
    if (what & TK_PUSH_GUARD) sc[SC_STATE] &= ~(TK_GUARD | TK_GUARD_OFF);
    what &= TK_PUSH_GUARD_OFF;
  }
  if (!(sc[SC_STATE] & TK_GUARD)) what &= ~TK_PUSH_GUARD_OFF;
  if (what & TK_PUSH_STAGE) {
    if (push_op(u, 1, op, 0, 0, 0) < 0) {
      /* Out of SQ room with the kernel refusing to take more: give it its
       * cancellation rather than lose it (this may list it again for its
       * guard's cancel). */
      finish_op(u, op, -ECANCELED);
      return;
    }
  }
  /* A failed push of a cancel leaves an SQE pending until it ends, or a
   * guard until it fires; a failed guard leaves the operation unbounded.
   * None loses the completion. */
  if (what & TK_PUSH_CANCEL)
    (void)push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL, op_user_data(op), UD_CANCEL);
  if ((what & TK_PUSH_GUARD) && push_guard(u, op) < 0)
    sc[SC_STATE] &= ~TK_GUARD;
  if ((what & TK_PUSH_GUARD_OFF) &&
      push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL, op_user_data(op) | UD_GUARD,
              UD_CANCEL) < 0)
    sc[SC_STATE] &= ~TK_GUARD_OFF;
  track_settle(u, op);
}

/* Completes op with res: the kind's write-backs and clean-up, then the
 * hub's queue (a tracked operation: once its helpers are over too).
 * hub.mu held. */
static void finish_op(uring_t* u, fiocp_op_t* op, int64_t res) {
  fiocp_addr_t* a = op->addr;
  if (op->flags & FIOCP_OPF_POOLED) {
    if (res == -ENOBUFS) res = FIOCP_ENOBUFS;
    if (res <= 0 && op->offset >= 0) {
      pool_put_id(op->pool, (uint32_t)op->offset);
      op->offset = -1;
    }
  }
  if (op->bk & BK_NOMEM) {
    /* Results after a lost one would mislead: this one goes too. */
    if (op->flags & FIOCP_OPF_POOLED) {
      drop_result(op, res, op->offset);
      op->offset = -1;
    } else {
      drop_result(op, res, -1);
    }
    res = FIOCP_ENOMEM;
  } else if (op->kind == FIOCP_OP_ACCEPT && res >= 0 &&
             (op->flags & FIOCP_OPF_MULTISHOT) && !(op->bk & BK_REARM)) {
    peer_address(a, (int)res); /* the kernel wrote none (prep_sqe) */
  }
  switch (op->kind) {
    case FIOCP_OP_RECVFROM:
      a->sslen = a->msg.msg_namelen;
      break;
    case FIOCP_OP_RECVMSG:
      /* The kernel wrote these into the msghdr (____sys_recvmsg); on an
       * error it may not have: report nothing received then. */
      if (res >= 0) {
        int added = MSG_CMSG_CLOEXEC & ~a->msgflags; /* ours, see prep_sqe */
        a->controllen = (uint32_t)a->msg.msg_controllen;
        a->msgflags = a->msg.msg_flags & ~added;
        a->sslen = a->msg.msg_namelen;
      } else {
        a->controllen = 0;
        a->msgflags = 0;
        a->sslen = 0;
      }
      break;
    case FIOCP_OP_SENDFILE: {
      int64_t* sc = a->scratch.i64;
      /* Bytes that reached the socket win over a later error, a cancel or
       * a timeout, as a short write would. */
      if (res < 0 && sc[SC_SENT] > 0) res = sc[SC_SENT];
      release_fds(op);
      if ((sc[SC_STATE] & (TK_GUARD | TK_GUARD_OFF)) == TK_GUARD) {
        sc[SC_STATE] |= TK_GUARD_OFF;
        track_push(u, op, TK_PUSH_GUARD_OFF);
      }
      break;
    }
    case FIOCP_OP_WAIT_PROCESS:
      release_fds(op);
      break;
  }
  if (tracked(op)) {
    op->addr->scratch.i64[SC_RESULT] = res;
    op->addr->scratch.i64[SC_STATE] |= TK_DONE;
    track_settle(u, op);
    return;
  }
  op->res = res;
  deliver_locked(u, op);
}

/* Queues op for a push of its current SQE (see the end of uring_harvest). */
static void requeue(uring_t* u, fiocp_op_t* op) {
  if (op->bk & BK_NOTIF_OWED) {
    /* Pushed once the kernel let go of the buffer (zc_notif): one
     * request of the record at a time. */
    op->bk |= BK_NOTIF_REQUEUE;
    return;
  }
  if (tracked(op)) {
    track_push(u, op, TK_PUSH_STAGE);
    return;
  }
  op->next = u->resubmit;
  u->resubmit = op;
}

/* Moves a multi-stage operation to its next SQE, unless it was cancelled
 * or timed out meanwhile (the cancel found the previous stage done and
 * nothing to hit; the linked timeout was disarmed with it). */
static void next_stage(uring_t* u, fiocp_op_t* op) {
  if ((op->flags & FIOCP_OPF_CANCELLED) || u->hub.closed)
    finish_op(u, op, -ECANCELED);
  else if (op->timeout_ns > 0 && deadline_passed(op))
    finish_op(u, op, FIOCP_ETIMEDOUT);
  else
    requeue(u, op);
}

/* One burst of a SENDFILE: sendfile() from the file at offset + what was
 * sent before (the offset form never moves the file's position), as much
 * as the socket takes now, up to SENDFILE_BURST bytes. Returns 1 when the
 * operation is over (its result in *res: the bytes sent, short at end of
 * file; an error only if nothing was sent), 0 when it waits for POLLOUT
 * again (the socket is full, or the budget is spent). Called by submit()
 * (no lock: the record is not in the ring yet) and by the harvest (hub.mu
 * held); never blocks. */
static int sendfile_burst(fiocp_op_t* op, int64_t* res) {
  fiocp_addr_t* a = op->addr;
  int fd = (int)op->handle;
  int64_t sent = a->scratch.i64[SC_SENT];
  int64_t budget = SENDFILE_BURST;
  int saved, over = 0, rc;
  /* sendfile() has no per-call non-blocking flag: a blocking socket is made
   * non-blocking for the burst (nonblock.h). */
  rc = fiocp__nb_enter(fd, &saved);
  if (rc < 0) {
    *res = sent > 0 ? sent : rc;
    return 1;
  }
  for (;;) {
    int64_t pos = op->offset + sent, want = (int64_t)op->len - sent;
    off_t off = (off_t)pos;
    ssize_t r;
    if ((int64_t)off != pos) { /* a 32-bit off_t */
      *res = sent > 0 ? sent : -EOVERFLOW;
      over = 1;
      break;
    }
    if (want > budget) want = budget;
    r = sendfile(fd, (int)a->src, &off, (size_t)want);
    if (r > 0) {
      sent += r;
      budget -= r;
      if (sent >= (int64_t)op->len) {
        *res = sent;
        over = 1;
        break;
      }
      if (budget <= 0) break; /* spent: let the hub's other work run */
    } else if (r == 0) {
      *res = sent; /* end of file */
      over = 1;
      break;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      break; /* full: wait for POLLOUT */
    } else if (errno != EINTR) {
      *res = sent > 0 ? sent : -(int64_t)errno;
      over = 1;
      break;
    }
  }
  fiocp__nb_leave(fd, saved);
  a->scratch.i64[SC_SENT] = sent;
  return over;
}

/* A SENDFILE's POLL fired (res: the events, or an error): the next burst,
 * then the next POLL unless the burst ended the operation. hub.mu held. */
static void sendfile_step(uring_t* u, fiocp_op_t* op, int32_t res) {
  int64_t out;
  if (res < 0) {
    finish_op(u, op, res);
    return;
  }
  /* Cancelled, closed or timed out while the POLL's CQE was on its way
   * (the cancel found nothing to hit): no more bytes go out. */
  if ((op->flags & FIOCP_OPF_CANCELLED) || u->hub.closed) {
    finish_op(u, op, -ECANCELED);
    return;
  }
  if (op->timeout_ns > 0 && deadline_passed(op)) {
    finish_op(u, op, FIOCP_ETIMEDOUT);
    return;
  }
  if (sendfile_burst(op, &out))
    finish_op(u, op, out);
  else
    requeue(u, op);
}

static void wait_process_step(uring_t* u, fiocp_op_t* op, int32_t res) {
  int64_t status = 0;
  int rc;
  if (res < 0) {
    finish_op(u, op, res);
    return;
  }
  rc = pidfd_status((int)op->addr->scratch.i64[SC_FD0], &status);
  if (rc == 0)
    next_stage(u, op); /* readable but no exit to report: poll again */
  else
    finish_op(u, op, rc < 0 ? rc : status);
}

/* The buffer a pooled receive's CQE names (IORING_CQE_F_BUFFER), which
 * the kernel took from the ring: held for the binding when data came in
 * it (returns its id), else back in the ring at once (returns -1). */
static int64_t cqe_buffer(fiocp_op_t* op, int32_t res, uint32_t cflags) {
  fiocp_pool_t* pool = op->pool;
  uint32_t bid = cflags >> FU_CQE_BUFFER_SHIFT;
  pbuf_t* r;
  if (!(cflags & FU_CQE_F_BUFFER)) return -1;
  r = pool_impl(pool);
  if (r == NULL || bid >= pool->count) return -1; /* not one of ours */
  fiocp__pool_lock(pool);
  if (r->in_ring > 0) r->in_ring--;
  if (res <= 0) {
    fiocp__pool_give_locked(pool, bid);
    bid = UINT32_MAX;
  } else {
    __atomic_store_n(&r->held[bid], 1, __ATOMIC_RELAXED);
  }
  if (r->bufs != NULL) ring_fill(pool, r); /* the ring tops up as it is used */
  fiocp__pool_unlock(pool);
  return bid == UINT32_MAX ? -1 : (int64_t)bid;
}

/* A pooled receive's -ENOBUFS: the ring was empty when data came. When
 * the pool was not (buffers on the free stack, or added to the ring
 * since), the ring doubles its depth and 1 says push the receive again;
 * 0 when the pool is empty: the receive fails with ENOBUFS. */
static int pool_ring_retry(fiocp_op_t* op) {
  fiocp_pool_t* pool = op->pool;
  pbuf_t* r = pool_impl(pool);
  int retry = 0;
  if (r == NULL || r->bufs == NULL) return 0;
  fiocp__pool_lock(pool);
  if (pool->nfree > 0) {
    r->depth = r->depth > pool->count / 2 ? pool->count : r->depth * 2;
    ring_fill(pool, r);
  }
  retry = r->in_ring > 0;
  fiocp__pool_unlock(pool);
  return retry;
}

/* Whether res is a result after which a multishot op goes on. */
static int goes_on(const fiocp_op_t* op, int64_t res) {
  return op->kind == FIOCP_OP_ACCEPT ? res >= 0 : res > 0;
}

/* Queues one result of the multishot op (res, and its buffer or -1) as a
 * child record, after the ones before it. Without memory for a child, the
 * result is dropped, and so is every later one (BK_NOMEM): returns
 * FIOCP_ENOMEM, and the caller ends the operation. hub.mu held. */
static int emit_child(uring_t* u, fiocp_op_t* op, int64_t res, int64_t bid) {
  fiocp_op_t* child = (op->bk & BK_NOMEM) ? NULL : fiocp__child_new(op);
  if (child == NULL) {
    drop_result(op, res, bid);
    op->bk |= BK_NOMEM;
    return FIOCP_ENOMEM;
  }
  child->res = res;
  child->offset = bid;
  fiocp__hub_complete_locked(&u->hub, child, 0); /* op stays in flight */
  return 0;
}

/* A CQE with IORING_CQE_F_MORE of a kernel multishot: a child. Should
 * none be allocated, the operation is cancelled (its last CQE then says
 * FIOCP_ENOMEM: finish_op). hub.mu held. */
static void multishot_more(uring_t* u, fiocp_op_t* op, int32_t res,
                           int64_t bid) {
  if (emit_child(u, op, res, bid) < 0 && !(op->flags & FIOCP_OPF_CANCELLED))
    list_cancel(u, op);
}

/* A result of an emulated multishot (BK_REARM): a child, then the same
 * SQE again unless the operation was cancelled or the port closed
 * meanwhile. hub.mu held. */
static void rearm_result(uring_t* u, fiocp_op_t* op, int64_t res,
                         int64_t bid) {
  if (emit_child(u, op, res, bid) < 0)
    finish_op(u, op, FIOCP_ENOMEM);
  else
    next_stage(u, op);
}

/* BK_EMU_POOL: one non-blocking receive into a buffer from the free
 * stack (fiocp__pool_recv), the buffer marked held when data came. */
static int64_t pooled_recv_now(fiocp_op_t* op, int64_t* bid) {
  int64_t n = fiocp__pool_recv(op->pool, (int)op->handle, op->len, bid);
  if (n > 0) __atomic_store_n(&pool_impl(op->pool)->held[*bid], 1, __ATOMIC_RELAXED);
  return n;
}

/* BK_EMU_POOL: the POLL fired (res: the events, or an error). A receive,
 * or for a multishot up to EMU_BURST (children), then the POLL again
 * while the stream goes on. hub.mu held. */
static void pooled_poll_step(uring_t* u, fiocp_op_t* op, int32_t res) {
  int n;
  if (res < 0) {
    finish_op(u, op, res);
    return;
  }
  /* Cancelled while the POLL's CQE was on its way: nothing is read. */
  if ((op->flags & FIOCP_OPF_CANCELLED) || u->hub.closed) {
    finish_op(u, op, -ECANCELED);
    return;
  }
  for (n = 0;; n++) {
    int64_t bid = -1, got = pooled_recv_now(op, &bid);
    if (got == -EAGAIN || got == -EWOULDBLOCK) {
      next_stage(u, op); /* woken for data another reader took */
      return;
    }
    if (got > 0 && (op->flags & FIOCP_OPF_MULTISHOT)) {
      if (emit_child(u, op, got, bid) < 0) {
        finish_op(u, op, FIOCP_ENOMEM);
        return;
      }
      if (n + 1 < EMU_BURST) continue;
      next_stage(u, op); /* the POLL fires again at once if data waits */
      return;
    }
    op->offset = bid;
    finish_op(u, op, got);
    return;
  }
}

/* A SEND_ZC's CQE with F_MORE: its notification is owed, unless it came
 * first (the kernel orders them only outside io-wq). */
static void zc_more(fiocp_op_t* op) {
  if (op->bk & BK_NOTIF_EARLY)
    op->bk &= ~(uintptr_t)BK_NOTIF_EARLY;
  else
    op->bk |= BK_NOTIF_OWED;
}

/* A SEND_ZC's notification (IORING_CQE_F_NOTIF): the kernel no longer
 * reads the buffer. What waited for it goes on: the completion, or the
 * next request (checked again: the port may have closed meanwhile).
 * hub.mu held. */
static void zc_notif(uring_t* u, fiocp_op_t* op) {
  if (!(op->bk & BK_NOTIF_OWED)) {
    op->bk |= BK_NOTIF_EARLY;
    return;
  }
  op->bk &= ~(uintptr_t)BK_NOTIF_OWED;
  if (op->bk & BK_NOTIF_REQUEUE) {
    op->bk &= ~(uintptr_t)BK_NOTIF_REQUEUE;
    next_stage(u, op);
  }
  settle_held(u, op);
}

/* What one CQE of op means. hub.mu held. */
static void op_cqe(uring_t* u, fiocp_op_t* op, int32_t res, uint32_t cflags) {
  int64_t bid = -1;
  if (op->flags & FIOCP_OPF_ZEROCOPY) {
    if (cflags & FU_CQE_F_NOTIF) {
      zc_notif(u, op);
      return;
    }
    if (cflags & FU_CQE_F_MORE) zc_more(op);
    if ((op->bk & BK_ZC) && (res == -EOPNOTSUPP || res == -ENOMEM)) {
      /* Nothing was sent: a socket without zero-copy (AF_UNIX), or
       * pinned pages over RLIMIT_MEMLOCK. A plain send then. */
      op->bk &= ~(uintptr_t)BK_ZC;
      next_stage(u, op);
      return;
    }
  } else if (op->flags & FIOCP_OPF_POOLED) {
    bid = cqe_buffer(op, res, cflags);
  }
  if ((op->flags & FIOCP_OPF_MULTISHOT) && (cflags & FU_CQE_F_MORE)) {
    multishot_more(u, op, res, bid);
    return;
  }
  /* The kernel's internal restart codes (ERESTARTSYS 512, ERESTARTNOINTR,
   * ERESTARTNOHAND, ERESTART_RESTARTBLOCK 516) are never meant for user
   * space, yet a splice interrupted in an io-wq worker by a cancel
   * returns -ERESTARTSYS in its CQE (6.18): it is an interruption. */
  if (res <= -512 && res >= -516) res = -EINTR;
  /* A request that io_uring moved to an io-wq worker (a receive whose
   * poll kept waking for data another reader took, a splice) is
   * interrupted, not cancelled, when cancelled or when its task exits:
   * -EINTR, with nothing transferred (a partial transfer reports its
   * count). */
  if (res == -ECANCELED || res == -EINTR) {
    if ((op->flags & FIOCP_OPF_CANCELLED) || (op->bk & BK_NOMEM)) {
      finish_op(u, op, -ECANCELED);
    } else if (op->timeout_ns > 0 && deadline_passed(op)) {
      /* The linked timeout fired (it cannot before the deadline). */
      finish_op(u, op, FIOCP_ETIMEDOUT);
    } else if (!u->hub.closed) {
      /* Cancelled by the exit of the thread that submitted it (see the
       * head comment): it never ran, so run it again (with its timeout,
       * whose deadline is absolute). */
      requeue(u, op);
    } else {
      finish_op(u, op, res);
    }
    return;
  }
  if ((op->bk & BK_REARM) && goes_on(op, res)) {
    rearm_result(u, op, res, bid);
    return;
  }
  if (res == -ENOBUFS && (op->flags & FIOCP_OPF_POOLED) &&
      !(op->bk & (BK_EMU_POOL | BK_NOMEM)) && pool_ring_retry(op)) {
    next_stage(u, op);
    return;
  }
  if (bid >= 0) op->offset = bid;
  switch (op->kind) {
    case FIOCP_OP_RECV:
      if (op->bk & BK_EMU_POOL)
        pooled_poll_step(u, op, res);
      else
        finish_op(u, op, res);
      break;
    case FIOCP_OP_TIMER:
      finish_op(u, op, res == -ETIME ? 0 : res); /* -ETIME: it fired */
      break;
    case FIOCP_OP_SENDFILE:
      sendfile_step(u, op, res);
      break;
    case FIOCP_OP_WAIT_PROCESS:
      wait_process_step(u, op, res);
      break;
    default:
      finish_op(u, op, res);
      break;
  }
}

/* Moves every CQE into the hub's queue. Called with the hub's mutex held,
 * so there is one CQ consumer at a time. */
static void uring_harvest(void* ctx) {
  uring_t* u = (uring_t*)ctx;
  int resubmitted = 0;
  for (;;) {
    unsigned head = *u->cq_khead;
    unsigned tail = __atomic_load_n(u->cq_ktail, __ATOMIC_ACQUIRE);
    if (head == tail) {
      /* The backlog of an overflowed CQ, and completions waiting as task
       * work (COOP_TASKRUN), reach the ring only through an enter with
       * GETEVENTS. */
      if (__atomic_load_n(u->sq_kflags, __ATOMIC_ACQUIRE) &
          (FU_SQ_CQ_OVERFLOW | FU_SQ_TASKRUN)) {
        int rc = sys_enter(u->fd, 0, 0, FU_ENTER_GETEVENTS, NULL, 0);
        if (rc >= 0 && __atomic_load_n(u->cq_ktail, __ATOMIC_ACQUIRE) != head)
          continue;
      }
      break;
    }
    for (; head != tail; head++) {
      struct fu_cqe* cqe = &u->cqes[head & u->cq_mask];
      uint64_t ud = cqe->user_data;
      if (ud <= UD_TAGS) continue; /* UD_WAKE, UD_CANCEL */
      switch (ud & UD_TAGS) {
        case UD_KTIMER:
          ktimer_cqe(u, (ktimer_t*)(uintptr_t)(ud & ~UD_TAGS));
          break;
        case UD_GUARD:
          guard_cqe(u, user_data_op(ud & ~UD_TAGS), cqe->res);
          break;
        case UD_LINK:
          link_cqe(u, user_data_op(ud & ~UD_TAGS), cqe->res);
          break;
        default:
          op_cqe(u, user_data_op(ud), cqe->res, cqe->flags);
          break;
      }
    }
    __atomic_store_n(u->cq_khead, head, __ATOMIC_RELEASE);
  }
  /* Timers due after kernel TIMEOUT CQEs, and the next kernel TIMEOUT
   * (entered below with the rest). */
  if (timers_settle_locked(u)) resubmitted = 1;
  /* Operations to push again: resubmissions after a thread's exit, and
   * the next stages of multi-stage operations. */
  while (u->resubmit != NULL) {
    fiocp_op_t* op = u->resubmit;
    u->resubmit = op->next;
    op->next = NULL;
    if (op->bk & BK_PUSH_CANCEL) {
      op->bk &= ~(uintptr_t)BK_PUSH_CANCEL;
      /* Unless its last CQE came meanwhile (then it is delivered now). A
       * failed push leaves it running, its results dropped. */
      if (!(op->bk & BK_DELIVER) &&
          push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL, op_user_data(op),
                  UD_CANCEL) == 0)
        resubmitted = 1;
      settle_held(u, op);
    } else if (tracked(op)) {
      track_pushes(u, op);
      resubmitted = 1;
    } else if (push_op(u, 1, op, 0, 0, 0) < 0) {
      /* Out of SQ room with the kernel refusing to take more: give the
       * operation its cancellation rather than lose it. */
      finish_op(u, op, -ECANCELED);
    } else {
      resubmitted = 1;
    }
  }
  if (resubmitted) {
    unsigned tail = __atomic_load_n(u->sq_ktail, __ATOMIC_ACQUIRE);
    unsigned head = __atomic_load_n(u->sq_khead, __ATOMIC_ACQUIRE);
    if (tail != head) (void)sys_enter(u->fd, tail - head, 0, 0, NULL, 0);
  }
}

static int uring_poll(void* ctx, int64_t timeout_ms) {
  uring_t* u = (uring_t*)ctx;
  struct fu_kernel_timespec ts;
  struct fu_getevents_arg arg;
  unsigned tail, head;
  int rc;
  memset(&arg, 0, sizeof(arg));
  if (timeout_ms >= 0) {
    ts.tv_sec = timeout_ms / 1000;
    ts.tv_nsec = (timeout_ms % 1000) * 1000000LL;
    arg.ts = (uint64_t)(uintptr_t)&ts;
  }
  /* One enter both submits what was deferred and waits. */
  tail = __atomic_load_n(u->sq_ktail, __ATOMIC_ACQUIRE);
  head = __atomic_load_n(u->sq_khead, __ATOMIC_ACQUIRE);
  rc = sys_enter(u->fd, tail - head, 1, FU_ENTER_GETEVENTS | FU_ENTER_EXT_ARG,
                 &arg, sizeof(arg));
  if (rc >= 0 || rc == -ETIME || rc == -EBUSY || rc == -EAGAIN) return 0;
  if (rc == -EINTR) return FIOCP_EINTR;
  return rc;
}

static void uring_kick(void* ctx) {
  uring_t* u = (uring_t*)ctx;
  if (push_op(u, 0, NULL, FU_OP_NOP, 0, UD_WAKE) == 0)
    (void)uring_enter_submit(u, 0);
}

/* ---- Contract ----------------------------------------------------------- */

/* Whether the kernel registers provided-buffer rings (5.19): one of a
 * single slot, at once unregistered. For kernels without SEND_ZC only
 * (uring_open: those with it have them). */
static int pbuf_ring_works(uring_t* u) {
  long page = sysconf(_SC_PAGESIZE);
  struct fu_buf_reg reg;
  void* mem;
  int rc;
  if (page <= 0) page = 4096;
  mem = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 0;
  memset(&reg, 0, sizeof(reg));
  reg.ring_addr = (uint64_t)(uintptr_t)mem;
  reg.ring_entries = 1;
  reg.bgid = u->next_group;
  rc = sys_register(u->fd, FU_REGISTER_PBUF_RING, &reg, 1);
  /* Should the unregister fail, the id stays taken: ring_register() moves
   * past it (-EEXIST), and the pages stay pinned by the kernel until the
   * ring closes. */
  if (rc == 0) (void)sys_register(u->fd, FU_UNREGISTER_PBUF_RING, &reg, 1);
  munmap(mem, (size_t)page);
  return rc == 0;
}

/* FASTIOCP_URING_DISABLE: the HAVE_* bits a port acts as if its kernel
 * lacked (tests of the fallbacks), by name, comma-separated. */
static unsigned disabled_by_env(void) {
  static const struct {
    const char* name;
    unsigned bit;
  } names[] = {{"pbuf_ring", HAVE_PBUF},
               {"accept_multishot", HAVE_ACCEPT_MS},
               {"recv_multishot", HAVE_RECV_MS},
               {"send_zc", HAVE_SEND_ZC}};
  const char* env = getenv("FASTIOCP_URING_DISABLE");
  unsigned off = 0;
  size_t i;
  while (env != NULL && *env != '\0') {
    size_t len = strcspn(env, ",");
    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++)
      if (strlen(names[i].name) == len && strncmp(env, names[i].name, len) == 0)
        off |= names[i].bit;
    env += len;
    if (*env == ',') env++;
  }
  return off;
}

static int uring_init(fiocp_port_t* port, unsigned entries,
                      unsigned concurrency, char* why, size_t whylen) {
  uring_t* u = (uring_t*)calloc(1, sizeof(*u));
  int rc;
  if (u == NULL) {
    snprintf(why, whylen, "out of memory");
    return FIOCP_ENOMEM;
  }
  u->fd = -1;
  u->port = port;
  if (entries == 0) entries = DEFAULT_ENTRIES;
  rc = uring_open(u, entries, why, whylen);
  if (rc < 0) {
    free(u);
    return rc;
  }
  if (!(u->have & HAVE_PBUF) && pbuf_ring_works(u))
    u->have |= HAVE_PBUF | HAVE_ACCEPT_MS; /* both came in 5.19 */
  u->have &= ~disabled_by_env();
  rc = pthread_mutex_init(&u->sq_mu, NULL);
  if (rc == 0) {
    rc = fiocp__hub_init(&u->hub);
    if (rc < 0) pthread_mutex_destroy(&u->sq_mu);
  } else {
    rc = -rc;
  }
  if (rc < 0) {
    snprintf(why, whylen, "pthread_mutex_init failed");
    uring_unmap(u);
    close(u->fd);
    free(u);
    return rc;
  }
  fiocp__th_init(&u->timers, SC_HIDX);
  u->hub.ctx = u;
  u->hub.concurrency = concurrency;
  u->hub.poll = uring_poll;
  u->hub.harvest = uring_harvest;
  u->hub.kick = uring_kick;
  port->impl = u;
  return 0;
}

static int uring_associate(fiocp_port_t* port, fiocp_handle_t h) {
  /* io_uring needs no association; only the ring itself is refused. */
  return h == ((uring_t*)port->impl)->fd ? FIOCP_EOWNHANDLE : 0;
}

static void cancel_one(fiocp_port_t* port, fiocp_op_t* op, void* arg) {
  uring_t* u = (uring_t*)port->impl;
  (void)arg;
  if (op->kind == FIOCP_OP_TIMER) return; /* no SQE: the heap's sweep */
  op->flags |= FIOCP_OPF_CANCELLED;
  (void)push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL, op_user_data(op), UD_CANCEL);
}

static int64_t uring_shutdown(fiocp_port_t* port, int64_t timeout_ms) {
  uring_t* u = (uring_t*)port->impl;
  if (fiocp__hub_close(&u->hub)) {
    /* First call, GIL held: states are stable under the hub's mutex, and
     * the slabs cannot grow meanwhile. */
    pthread_mutex_lock(&u->hub.mu);
    timers_cancel_locked(u);
    fiocp__foreach_inflight(port, cancel_one, NULL);
    fiocp__hub_wake_locked(&u->hub);
    pthread_mutex_unlock(&u->hub.mu);
    (void)uring_enter_submit(u, 0);
  }
  return fiocp__hub_wait_idle(&u->hub, timeout_ms);
}

static void uring_destroy(fiocp_port_t* port) {
  uring_t* u = (uring_t*)port->impl;
  if (u == NULL) return;
  /* pool_remove() takes them off first; any left go now, while the ring
   * can still unregister them. */
  while (u->pools != NULL) {
    fiocp_pool_t* pool = u->pools;
    u->pools = pool->next;
    pool->next = NULL;
    pool_detach(u, pool);
  }
  uring_unmap(u);
  if (u->fd >= 0) close(u->fd);
  /* Empty once shutdown() returned 0. Should a TIMEOUT's CQE still be
   * owed, the kernel read its timespec at submission and the ring is gone:
   * nothing will touch these any more. */
  while (u->kt != NULL) {
    ktimer_t* k = u->kt;
    u->kt = k->next;
    free(k);
  }
  fiocp__th_free(&u->timers);
  fiocp__hub_destroy(&u->hub);
  pthread_mutex_destroy(&u->sq_mu);
  free(u);
  port->impl = NULL;
}

const fiocp_backend_t fiocp__uring_backend = {
    "io_uring",
    uring_probe,
    uring_init,
    uring_associate,
    uring_submit,
    uring_flush,
    uring_cancel,
    fiocp__hub_port_try_get,
    fiocp__hub_port_wait,
    fiocp__hub_port_post,
    uring_shutdown,
    fiocp__hub_port_drain,
    uring_destroy,
    fiocp__hub_port_release,
    uring_support,
    uring_pool_add,
    uring_pool_put,
    uring_pool_remove,
    uring_native_flags,
};
