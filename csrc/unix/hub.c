/* hub.c: see hub.h for how the waiting threads share the queue. */
#include "hub.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- Futex sleeps ------------------------------------------------------- */

/* Sleeps while *word == 0, for up to timeout_ms (-1: forever). Returns 0
 * when woken or spuriously, FIOCP_EINTR on a signal, 1 on timeout. */
static int futex_sleep(int* word, int64_t timeout_ms) {
  struct timespec ts, *tsp = NULL;
  long rc;
  if (timeout_ms >= 0) {
    ts.tv_sec = (time_t)(timeout_ms / 1000);
    ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
    tsp = &ts;
  }
  rc = syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, 0, tsp, NULL, 0);
  if (rc == 0) return 0;
  if (errno == EINTR) return FIOCP_EINTR;
  if (errno == ETIMEDOUT) return 1;
  return 0; /* EAGAIN: already woken */
}

static void futex_wake(int* word) {
  __atomic_store_n(word, 1, __ATOMIC_RELEASE);
  /* Failure is impossible for a valid private futex word; nothing to do. */
  (void)syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* ---- Queue ------------------------------------------------------------- */

int fiocp__hub_init(fiocp_hub_t* hub) {
  int rc = pthread_mutex_init(&hub->mu, NULL);
  if (rc != 0) return -rc;
  hub->head = hub->tail = NULL;
  hub->qlen = 0;
  hub->waiters = NULL;
  hub->poller_active = 0;
  hub->kick_pending = 0;
  hub->closed = 0;
  hub->inflight = 0;
  hub->concurrency = 0;
  hub->active = 0;
  return 0;
}

void fiocp__hub_destroy(fiocp_hub_t* hub) { pthread_mutex_destroy(&hub->mu); }

static void unlink_waiter(fiocp_hub_t* hub, fiocp_waiter_t* w) {
  if (w->prev) w->prev->next = w->next;
  else if (hub->waiters == w) hub->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  w->next = w->prev = NULL;
}

/* Pops the most recent sleeper and wakes it. mu held. */
static int wake_one_locked(fiocp_hub_t* hub) {
  fiocp_waiter_t* w = hub->waiters;
  if (w == NULL) return 0;
  unlink_waiter(hub, w);
  futex_wake(&w->state);
  return 1;
}

static int slot_free_locked(const fiocp_hub_t* hub) {
  return hub->concurrency == 0 || hub->active < hub->concurrency;
}

void fiocp__hub_wake_locked(fiocp_hub_t* hub) {
  if ((hub->qlen > 0 && slot_free_locked(hub)) ||
      (!hub->poller_active && hub->inflight > 0))
    wake_one_locked(hub);
}

static int need_kick_locked(fiocp_hub_t* hub);

void fiocp__hub_release(fiocp_hub_t* hub) {
  int kick;
  pthread_mutex_lock(&hub->mu);
  if (hub->active > 0) hub->active--;
  fiocp__hub_wake_locked(hub);
  /* Queued packets may wait for this slot while the only other waiter is
   * blocked in the OS: make it come back and take them. */
  kick = hub->qlen > 0 && need_kick_locked(hub);
  pthread_mutex_unlock(&hub->mu);
  if (kick && hub->kick) hub->kick(hub->ctx);
}

/* Decides, with mu held, whether the caller must kick the poller after
 * unlocking: someone is blocked in the OS and no sleeper can take the
 * packet instead. */
static int need_kick_locked(fiocp_hub_t* hub) {
  if (hub->waiters == NULL && hub->poller_active && !hub->kick_pending) {
    hub->kick_pending = 1;
    return 1;
  }
  return 0;
}

int fiocp__hub_begin_locked(fiocp_hub_t* hub) {
  if (hub->closed) return FIOCP_ECLOSED;
  hub->inflight++;
  if (!hub->poller_active) wake_one_locked(hub);
  return 0;
}

int fiocp__hub_begin(fiocp_hub_t* hub) {
  int rc;
  pthread_mutex_lock(&hub->mu);
  rc = fiocp__hub_begin_locked(hub);
  pthread_mutex_unlock(&hub->mu);
  return rc;
}

void fiocp__hub_abort(fiocp_hub_t* hub) {
  pthread_mutex_lock(&hub->mu);
  hub->inflight--;
  pthread_mutex_unlock(&hub->mu);
}

void fiocp__hub_complete_locked(fiocp_hub_t* hub, fiocp_op_t* op,
                                int was_inflight) {
  op->state = FIOCP_ST_DONE;
  op->next = NULL;
  if (hub->tail) hub->tail->next = op;
  else hub->head = op;
  hub->tail = op;
  hub->qlen++;
  if (was_inflight) hub->inflight--;
}

void fiocp__hub_complete(fiocp_hub_t* hub, fiocp_op_t* op, int was_inflight) {
  int kick;
  pthread_mutex_lock(&hub->mu);
  fiocp__hub_complete_locked(hub, op, was_inflight);
  fiocp__hub_wake_locked(hub);
  kick = need_kick_locked(hub);
  pthread_mutex_unlock(&hub->mu);
  /* A completion made outside poll() (a file worker thread) must reach a
   * poller blocked in the OS. */
  if (kick && hub->kick) hub->kick(hub->ctx);
}

int fiocp__hub_post(fiocp_hub_t* hub, fiocp_op_t* op) {
  int kick;
  pthread_mutex_lock(&hub->mu);
  if (hub->closed) {
    pthread_mutex_unlock(&hub->mu);
    return FIOCP_ECLOSED;
  }
  fiocp__hub_complete_locked(hub, op, 0);
  fiocp__hub_wake_locked(hub);
  kick = need_kick_locked(hub);
  pthread_mutex_unlock(&hub->mu);
  if (kick) hub->kick(hub->ctx);
  return 0;
}

static int pop_any_locked(fiocp_hub_t* hub, fiocp_op_t** out, int max) {
  int n = 0;
  while (n < max && hub->head != NULL) {
    fiocp_op_t* op = hub->head;
    hub->head = op->next;
    op->next = NULL;
    out[n++] = op;
  }
  if (hub->head == NULL) hub->tail = NULL;
  hub->qlen -= (size_t)n;
  return n;
}

/* Pops for a thread that will hold what it gets: only with a free slot,
 * which it then takes. */
static int pop_locked(fiocp_hub_t* hub, fiocp_op_t** out, int max) {
  int n;
  if (hub->qlen == 0 || !slot_free_locked(hub)) return 0;
  n = pop_any_locked(hub, out, max);
  if (n > 0 && hub->concurrency > 0) hub->active++;
  return n;
}

int fiocp__hub_try_get(fiocp_hub_t* hub, fiocp_op_t** out, int max) {
  int n;
  pthread_mutex_lock(&hub->mu);
  if (hub->closed) {
    pthread_mutex_unlock(&hub->mu);
    return FIOCP_ECLOSED;
  }
  if (!hub->poller_active && hub->harvest) hub->harvest(hub->ctx);
  n = pop_locked(hub, out, max);
  /* Leftovers, or polling nobody does now that this thread goes back to
   * Python: hand them to a sleeper. */
  if (n > 0) fiocp__hub_wake_locked(hub);
  pthread_mutex_unlock(&hub->mu);
  return n;
}

int fiocp__hub_wait(fiocp_hub_t* hub, fiocp_op_t** out, int max,
                    int64_t timeout_ms) {
  int64_t deadline = timeout_ms < 0 ? -1 : fiocp__now_ms() + timeout_ms;
  int n, rc;
  pthread_mutex_lock(&hub->mu);
  for (;;) {
    int64_t left;
    if (hub->closed) {
      pthread_mutex_unlock(&hub->mu);
      return FIOCP_ECLOSED;
    }
    if (!hub->poller_active && hub->harvest) hub->harvest(hub->ctx);
    n = pop_locked(hub, out, max);
    if (n > 0) {
      fiocp__hub_wake_locked(hub);
      pthread_mutex_unlock(&hub->mu);
      return n;
    }
    left = fiocp__remaining_ms(deadline);
    if (left == 0) {
      /* This thread may have been woken to poll or to take packets at the
       * moment its own deadline passed: pass that duty on, or the other
       * sleepers sleep on while completions wait in the kernel. */
      fiocp__hub_wake_locked(hub);
      pthread_mutex_unlock(&hub->mu);
      return 0;
    }
    if (!hub->poller_active && hub->inflight > 0) {
      /* Become the poller. */
      hub->poller_active = 1;
      pthread_mutex_unlock(&hub->mu);
      rc = hub->poll(hub->ctx, left);
      pthread_mutex_lock(&hub->mu);
      hub->poller_active = 0;
      hub->kick_pending = 0;
      if (hub->harvest) hub->harvest(hub->ctx);
      if (rc < 0) {
        /* Somebody else must poll while this thread handles the signal or
         * the error. */
        fiocp__hub_wake_locked(hub);
        if (hub->qlen == 0 || rc != FIOCP_EINTR) {
          pthread_mutex_unlock(&hub->mu);
          return rc;
        }
      }
      continue;
    } else {
      /* Sleep until a packet, a turn to poll, the deadline or a signal. */
      fiocp_waiter_t w;
      w.state = 0;
      w.prev = NULL;
      w.next = hub->waiters;
      if (w.next) w.next->prev = &w;
      hub->waiters = &w;
      pthread_mutex_unlock(&hub->mu);
      do {
        rc = futex_sleep(&w.state, fiocp__remaining_ms(deadline));
      } while (rc == 0 && __atomic_load_n(&w.state, __ATOMIC_ACQUIRE) == 0);
      pthread_mutex_lock(&hub->mu);
      if (__atomic_load_n(&w.state, __ATOMIC_ACQUIRE) == 0) {
        /* Timed out or interrupted while still listed. */
        unlink_waiter(hub, &w);
        if (rc == FIOCP_EINTR) {
          pthread_mutex_unlock(&hub->mu);
          return FIOCP_EINTR;
        }
      } else if (rc == FIOCP_EINTR) {
        /* Woken and interrupted at once: the wake was meant for a thread
         * that would act on it, so pass it on before leaving. */
        fiocp__hub_wake_locked(hub);
        pthread_mutex_unlock(&hub->mu);
        return FIOCP_EINTR;
      }
    }
  }
}

int fiocp__hub_close(fiocp_hub_t* hub) {
  int first, kick;
  pthread_mutex_lock(&hub->mu);
  first = !hub->closed;
  hub->closed = 1;
  while (wake_one_locked(hub)) {
  }
  kick = hub->poller_active;
  pthread_mutex_unlock(&hub->mu);
  if (kick && hub->kick) hub->kick(hub->ctx);
  return first;
}

int64_t fiocp__hub_wait_idle(fiocp_hub_t* hub, int64_t timeout_ms) {
  int64_t deadline = timeout_ms < 0 ? -1 : fiocp__now_ms() + timeout_ms;
  int64_t owed;
  pthread_mutex_lock(&hub->mu);
  for (;;) {
    int64_t left;
    if (!hub->poller_active && hub->harvest) hub->harvest(hub->ctx);
    owed = hub->inflight;
    left = fiocp__remaining_ms(deadline);
    if (owed <= 0 || left == 0) break;
    if (!hub->poller_active) {
      hub->poller_active = 1;
      pthread_mutex_unlock(&hub->mu);
      /* Short slices: a signal or a kick must not stretch the wait. */
      hub->poll(hub->ctx, left < 0 || left > 50 ? 50 : left);
      pthread_mutex_lock(&hub->mu);
      hub->poller_active = 0;
      hub->kick_pending = 0;
    } else {
      /* Another thread is still inside poll(); close() kicked it and it
       * will leave at once. */
      pthread_mutex_unlock(&hub->mu);
      sched_yield();
      usleep(1000);
      pthread_mutex_lock(&hub->mu);
    }
  }
  pthread_mutex_unlock(&hub->mu);
  return owed < 0 ? 0 : owed;
}

void fiocp__hub_poll_once(fiocp_hub_t* hub) {
  pthread_mutex_lock(&hub->mu);
  if (hub->closed || hub->poller_active || hub->inflight <= 0) {
    pthread_mutex_unlock(&hub->mu);
    return;
  }
  hub->poller_active = 1;
  pthread_mutex_unlock(&hub->mu);
  (void)hub->poll(hub->ctx, 0); /* EINTR or an error: the next wait sees it */
  pthread_mutex_lock(&hub->mu);
  hub->poller_active = 0;
  hub->kick_pending = 0;
  if (hub->harvest) hub->harvest(hub->ctx);
  fiocp__hub_wake_locked(hub);
  pthread_mutex_unlock(&hub->mu);
}

int fiocp__hub_drain(fiocp_hub_t* hub, fiocp_op_t** out, int max) {
  int n;
  pthread_mutex_lock(&hub->mu);
  n = pop_any_locked(hub, out, max);
  pthread_mutex_unlock(&hub->mu);
  return n;
}

/* ---- Contract entries --------------------------------------------------- */

int fiocp__hub_port_try_get(fiocp_port_t* port, fiocp_op_t** out, int max) {
  return fiocp__hub_try_get(FIOCP__HUB(port), out, max);
}

int fiocp__hub_port_wait(fiocp_port_t* port, fiocp_op_t** out, int max,
                         int64_t timeout_ms) {
  return fiocp__hub_wait(FIOCP__HUB(port), out, max, timeout_ms);
}

int fiocp__hub_port_post(fiocp_port_t* port, fiocp_op_t* op) {
  return fiocp__hub_post(FIOCP__HUB(port), op);
}

int fiocp__hub_port_drain(fiocp_port_t* port, fiocp_op_t** out, int max) {
  return fiocp__hub_drain(FIOCP__HUB(port), out, max);
}

void fiocp__hub_port_release(fiocp_port_t* port) {
  fiocp__hub_release(FIOCP__HUB(port));
}
