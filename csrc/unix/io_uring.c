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
 */
#define _GNU_SOURCE
#include "../fiocp.h"
#include "hub.h"
#include "uring_abi.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define UD_WAKE 1ULL    /* the NOP that kicks the poller */
#define UD_CANCEL 2ULL  /* an ASYNC_CANCEL's own completion */

#define DEFAULT_ENTRIES 1024u

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
} uring_t;

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
    case FIOCP_OP_SEND:
      sqe->opcode = op->kind == FIOCP_OP_RECV ? FU_OP_RECV : FU_OP_SEND;
      sqe->addr = (uint64_t)(uintptr_t)op->buf;
      sqe->len = op->len;
      sqe->op_flags = op->kind == FIOCP_OP_SEND ? MSG_NOSIGNAL : 0;
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
  }
}

/* Reserves an SQE under sq_mu, entering the kernel to make room when the
 * ring is full. Returns the SQE with sq_mu held, or NULL (sq_mu released)
 * and *err set. */
static struct fu_sqe* get_sqe_locked(uring_t* u, int hub_locked, int* err) {
  for (;;) {
    unsigned head = __atomic_load_n(u->sq_khead, __ATOMIC_ACQUIRE);
    int rc;
    if (u->sq_tail - head < u->sq_entries)
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

static void publish_locked(uring_t* u) {
  u->sq_tail++;
  __atomic_store_n(u->sq_ktail, u->sq_tail, __ATOMIC_RELEASE);
}

/* Queues an SQE for op (or a control SQE when op is NULL). */
static int push_op(uring_t* u, int hub_locked, fiocp_op_t* op,
                   uint8_t ctl_opcode, uint64_t ctl_addr, uint64_t ctl_ud) {
  int err = 0;
  struct fu_sqe* sqe;
  pthread_mutex_lock(&u->sq_mu);
  sqe = get_sqe_locked(u, hub_locked, &err);
  if (sqe == NULL) return err;
  if (op != NULL) {
    prep_sqe(sqe, op);
  } else {
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = ctl_opcode;
    sqe->fd = -1;
    sqe->addr = ctl_addr;
    sqe->user_data = ctl_ud;
  }
  publish_locked(u);
  pthread_mutex_unlock(&u->sq_mu);
  return 0;
}

static int uring_submit(fiocp_port_t* port, fiocp_op_t* op, int defer) {
  uring_t* u = (uring_t*)port->impl;
  int rc;
  /* Accounted and queued under one hold of the hub's mutex: shutdown()'s
   * sweep (and cancel()) take it too, so their ASYNC_CANCEL always follows
   * this SQE in the ring. With the two steps apart, a close() on another
   * thread (3.13t, where submit runs outside the port lock) could cancel
   * the record before its SQE existed, and the operation would stay owed
   * forever. */
  pthread_mutex_lock(&u->hub.mu);
  rc = fiocp__hub_begin_locked(&u->hub);
  if (rc == 0) {
    rc = push_op(u, 1, op, 0, 0, 0);
    if (rc < 0) u->hub.inflight--;
  }
  pthread_mutex_unlock(&u->hub.mu);
  if (rc < 0) return rc;
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

/* Moves every CQE into the hub's queue. Called with the hub's mutex held,
 * so there is one CQ consumer at a time. */
static void uring_harvest(void* ctx) {
  uring_t* u = (uring_t*)ctx;
  fiocp_hub_t* hub = &u->hub;
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
      fiocp_op_t* op;
      int32_t res;
      if (ud == UD_WAKE || ud == UD_CANCEL) continue;
      op = user_data_op(ud);
      res = cqe->res;
      /* A request that io_uring moved to an io-wq worker (a receive whose
       * poll kept waking for data another reader took) is interrupted, not
       * cancelled, when cancelled or when its task exits: -EINTR, with
       * nothing transferred (a partial transfer reports its count). */
      if (res == -ECANCELED || res == -EINTR) {
        if (op->flags & FIOCP_OPF_CANCELLED) {
          res = -ECANCELED;
        } else if (!hub->closed) {
          /* Cancelled by the exit of the thread that submitted it (see the
           * head comment): it never ran, so run it again. */
          op->next = u->resubmit;
          u->resubmit = op;
          continue;
        }
      }
      op->res = res;
      if (op->kind == FIOCP_OP_RECVFROM)
        op->addr->sslen = op->addr->msg.msg_namelen;
      fiocp__hub_complete_locked(hub, op, 1);
    }
    __atomic_store_n(u->cq_khead, head, __ATOMIC_RELEASE);
  }
  while (u->resubmit != NULL) {
    fiocp_op_t* op = u->resubmit;
    u->resubmit = op->next;
    op->next = NULL;
    if (push_op(u, 1, op, 0, 0, 0) < 0) {
      /* Out of SQ room with the kernel refusing to take more: give the
       * operation its cancellation rather than lose it. */
      op->res = -ECANCELED;
      fiocp__hub_complete_locked(hub, op, 1);
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
  op->flags |= FIOCP_OPF_CANCELLED;
  (void)push_op(u, 1, NULL, FU_OP_ASYNC_CANCEL, op_user_data(op), UD_CANCEL);
}

static int64_t uring_shutdown(fiocp_port_t* port, int64_t timeout_ms) {
  uring_t* u = (uring_t*)port->impl;
  if (fiocp__hub_close(&u->hub)) {
    /* First call, GIL held: states are stable under the hub's mutex, and
     * the slabs cannot grow meanwhile. */
    pthread_mutex_lock(&u->hub.mu);
    fiocp__foreach_inflight(port, cancel_one, NULL);
    pthread_mutex_unlock(&u->hub.mu);
    (void)uring_enter_submit(u, 0);
  }
  return fiocp__hub_wait_idle(&u->hub, timeout_ms);
}

static void uring_destroy(fiocp_port_t* port) {
  uring_t* u = (uring_t*)port->impl;
  if (u == NULL) return;
  uring_unmap(u);
  if (u->fd >= 0) close(u->fd);
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
};
