/* hub.h: the multi-waiter completion queue shared by the Linux backends.
 *
 * How it fits together. Completed operations wait in a FIFO under one mutex.
 * Any number of threads call fiocp__hub_wait(). At most one of them, the
 * poller, blocks in the OS (io_uring_enter or epoll_wait) through the
 * backend's poll() hook; the others sleep on a futex of their own, in a LIFO
 * stack (as IOCP wakes the most recent waiter: its cache is warm). When the
 * poller comes back it moves what the OS finished into the FIFO (harvest()),
 * takes a batch for itself and wakes one sleeper, which takes the next batch
 * or becomes the next poller. A thread with nothing in flight to poll for
 * sleeps on its futex, so post() from another thread costs one futex wake,
 * not a system call into the kernel queue.
 *
 * With a concurrency limit N (the Linux emulation of IOCP's), packets are
 * handed only to a thread that can take one of N slots; release() frees a
 * slot and wakes a sleeper if packets wait.
 *
 * Sleeps and polls return on signals (CPython installs its handlers without
 * SA_RESTART), so a main thread blocked in get() sees Ctrl-C at once.
 */
#ifndef FIOCP_HUB_H
#define FIOCP_HUB_H

#include "../fiocp.h"

#include <pthread.h>

typedef struct fiocp_waiter_s {
  int state;                      /* futex word: 0 sleeping, 1 woken */
  struct fiocp_waiter_s* next;
  struct fiocp_waiter_s* prev;
} fiocp_waiter_t;

typedef struct fiocp_hub_s {
  pthread_mutex_t mu;
  fiocp_op_t* head;               /* completed operations, FIFO by ->next */
  fiocp_op_t* tail;
  size_t qlen;
  fiocp_waiter_t* waiters;        /* sleeping threads, most recent first */
  int poller_active;              /* a thread is inside poll() */
  int kick_pending;               /* a kick() is on its way to the poller */
  int closed;
  int64_t inflight;               /* operations the OS still owes */
  unsigned concurrency;           /* 0: no limit (see fiocp.h, release) */
  unsigned active;                /* threads holding dequeued packets */

  /* Backend hooks. ctx is the backend's state. */
  void* ctx;
  /* Blocks in the OS for up to timeout_ms (-1: forever) until something
   * completes or kick() is called. Called without mu. Returns 0,
   * FIOCP_EINTR, or a negative error. */
  int (*poll)(void* ctx, int64_t timeout_ms);
  /* Moves what the OS has finished into the queue with
   * fiocp__hub_complete_locked(). Called with mu held; may be NULL. */
  void (*harvest)(void* ctx);
  /* Makes a poll() in progress return soon. Called without mu. */
  void (*kick)(void* ctx);
} fiocp_hub_t;

int fiocp__hub_init(fiocp_hub_t* hub);
void fiocp__hub_destroy(fiocp_hub_t* hub);

/* Accounts for one more operation in flight and wakes a sleeper to become
 * the poller if nobody polls. Call before the OS can complete it. Returns
 * FIOCP_ECLOSED if the port is closed (then nothing was accounted). */
int fiocp__hub_begin(fiocp_hub_t* hub);
/* The same with mu held: for a backend whose hand-over to the OS must not
 * interleave with close()'s cancellation sweep (io_uring). */
int fiocp__hub_begin_locked(fiocp_hub_t* hub);
/* Undoes fiocp__hub_begin() for an operation that failed at once. */
void fiocp__hub_abort(fiocp_hub_t* hub);

/* Queues a finished operation (op->res set); mu held. If it was in flight
 * (not a post), the in-flight count drops. Wakes are left to the caller
 * (fiocp__hub_wake_locked) so that a harvest of many wakes once. */
void fiocp__hub_complete_locked(fiocp_hub_t* hub, fiocp_op_t* op,
                                int was_inflight);
/* Wakes one sleeper if there is work for it (packets queued, or nobody
 * polling while operations are in flight). mu held. */
void fiocp__hub_wake_locked(fiocp_hub_t* hub);
/* Locks, completes, wakes: for backends that finish work outside harvest(),
 * e.g. epoll's poller or its file thread pool. */
void fiocp__hub_complete(fiocp_hub_t* hub, fiocp_op_t* op, int was_inflight);

/* The contract's post(): queues a user packet and wakes a waiter. */
int fiocp__hub_post(fiocp_hub_t* hub, fiocp_op_t* op);
/* The contract's try_get() and wait(). */
int fiocp__hub_try_get(fiocp_hub_t* hub, fiocp_op_t** out, int max);
int fiocp__hub_wait(fiocp_hub_t* hub, fiocp_op_t** out, int max,
                    int64_t timeout_ms);
/* Marks the hub closed and wakes every sleeper and the poller. Returns 1 the
 * first time, 0 after. */
int fiocp__hub_close(fiocp_hub_t* hub);
/* After close: polls until nothing is in flight or the timeout expires;
 * returns the count still owed. */
int64_t fiocp__hub_wait_idle(fiocp_hub_t* hub, int64_t timeout_ms);
/* After close: pops up to max queued operations. */
int fiocp__hub_drain(fiocp_hub_t* hub, fiocp_op_t** out, int max);
/* Polls the OS once without blocking, unless another thread polls or
 * nothing is in flight; harvests and hands work on as a returning poller
 * does. For backends whose operations progress only while somebody polls
 * (epoll), so that get(timeout=0) makes progress. */
void fiocp__hub_poll_once(fiocp_hub_t* hub);
/* The contract's release(): gives back a concurrency slot. */
void fiocp__hub_release(fiocp_hub_t* hub);

/* Contract entries (fiocp.h) that are the hub's own, for backends whose
 * port->impl begins with their fiocp_hub_t. */
#define FIOCP__HUB(port) ((fiocp_hub_t*)(port)->impl)
int fiocp__hub_port_try_get(fiocp_port_t* port, fiocp_op_t** out, int max);
int fiocp__hub_port_wait(fiocp_port_t* port, fiocp_op_t** out, int max,
                         int64_t timeout_ms);
int fiocp__hub_port_post(fiocp_port_t* port, fiocp_op_t* op);
int fiocp__hub_port_drain(fiocp_port_t* port, fiocp_op_t** out, int max);
void fiocp__hub_port_release(fiocp_port_t* port);

#endif /* FIOCP_HUB_H */
