/* timerheap.h: the Linux backends' timer heap (epoll and io_uring).
 *
 * Deadlines (CLOCK_MONOTONIC ns) of pending operations in a binary
 * min-heap, earliest first (submission order among equal deadlines). The
 * backend arms ONE kernel timer (epoll: a timerfd; io_uring: a TIMEOUT SQE)
 * to the earliest deadline plus the timer slack (fiocp__th_slack()), so
 * that deadlines close together share one wake-up: each kernel timer that
 * fires costs an interrupt (a VM exit under a hypervisor) and a wake-up.
 *
 * Each entry's heap index (+ 1; 0: not in the heap) lives in one slot of
 * its record's scratch, chosen by the backend, so that removing an entry
 * when its operation ends first costs O(log n). The heap has no lock of its
 * own: the backend holds one around every call (epoll: tm_mu; io_uring:
 * the hub's mutex).
 */
#ifndef FIOCP_TIMERHEAP_H
#define FIOCP_TIMERHEAP_H

#include "../fiocp.h"

#include <stddef.h>
#include <stdint.h>

/* One pending deadline. when and seq sit in the heap array itself, so
 * sifting compares without touching the records. */
typedef struct fiocp_tment_s {
  int64_t when;          /* CLOCK_MONOTONIC ns */
  uint64_t seq;          /* submission order among equal deadlines */
  fiocp_op_t* op;
} fiocp_tment_t;

typedef struct fiocp_theap_s {
  fiocp_tment_t* heap;
  size_t n, cap;
  uint64_t seq;
  int slot;              /* the scratch.i64 slot holding index + 1 */
  int64_t armed;         /* when the kernel timer fires (a deadline +
                            slack); INT64_MAX: none armed. The backend's to
                            keep; fiocp__th_fire_at() computes it. */
  int64_t slack;         /* ns the kernel timer fires after the earliest
                            deadline (fiocp__th_slack()) */
} fiocp_theap_t;

/* An empty heap whose entries record their index in scratch.i64[slot];
 * nothing armed, slack from the calling thread (fiocp__th_slack()). */
void fiocp__th_init(fiocp_theap_t* h, int slot);
/* Frees the array (the heap must be empty or forgotten). */
void fiocp__th_free(fiocp_theap_t* h);

/* How late a timer may fire so that nearby deadlines share one wake-up:
 * 1 ms (the granularity of libuv's timers; Windows' thread-pool timers are
 * coarser still), or FASTIOCP_TIMER_SLACK_US microseconds when set (0: a
 * kernel timer per distinct deadline). 10,000 timers spread over 100 ms
 * cost about 3.7 us of CPU each at 50 us of slack on this VM, where each
 * wake-up costs about 20 us (a timer interrupt is a VM exit), and ~1 us at
 * 1 ms. Read when the port is created. */
int64_t fiocp__th_slack(void);
/* when + slack, saturated and at least 1: the absolute time to arm the
 * kernel timer for a deadline when. */
int64_t fiocp__th_fire_at(const fiocp_theap_t* h, int64_t when);
/* Whether a new deadline when needs the kernel timer set earlier than it
 * is (h->armed): the armed timer would fire past when + slack. */
int fiocp__th_needs_arm(const fiocp_theap_t* h, int64_t when);

/* Adds op with deadline when. Returns 0 or FIOCP_ENOMEM (nothing added). */
int fiocp__th_push(fiocp_theap_t* h, fiocp_op_t* op, int64_t when);
/* Removes op's entry if it has one. Returns 1 if it did, 0 if op was not
 * in the heap. */
int fiocp__th_remove(fiocp_theap_t* h, fiocp_op_t* op);
/* The earliest deadline, INT64_MAX when empty. */
int64_t fiocp__th_earliest(const fiocp_theap_t* h);
/* Pops the earliest entry if its deadline is <= now; NULL otherwise. */
fiocp_op_t* fiocp__th_pop_due(fiocp_theap_t* h, int64_t now);
/* Takes every entry of kind (FIOCP_OP_*) out (shutdown), in array order,
 * linked by ->next; the others stay, still a heap. */
fiocp_op_t* fiocp__th_take_kind(fiocp_theap_t* h, unsigned kind);

#endif /* FIOCP_TIMERHEAP_H */
