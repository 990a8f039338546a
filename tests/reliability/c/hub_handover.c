/* hub_handover.c: drives csrc/unix/hub.c with a fake backend and forces the
 * interleaving of HOSTILE-11 (tests/reliability/test_hostile_defects.py):
 *
 *   P polls; L and then S sleep (S on top: the hub wakes the most recent
 *   sleeper). Operation A completes; P leaves the OS but, while it holds
 *   the hub's mutex (a harvest that stalls), S's own timeout expires. P
 *   then hands the poller's role to S. S wakes with its deadline passed.
 *   Before the fix S returned "timed out" and the role was lost: L slept
 *   on while operation B's completion waited for a poller.
 *
 * Exit status 0 and "handed over" when L takes B at once; 1 otherwise.
 * Built and run by the test; links hub.c and common.c only. */
#include "fiocp.h"
#include "unix/hub.h"

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* common.c's backend table names these; nothing here uses them. */
const fiocp_backend_t fiocp__uring_backend = {"io_uring"};
const fiocp_backend_t fiocp__epoll_backend = {"epoll"};

typedef struct {
  fiocp_hub_t hub;
  int pipe[2];            /* the "kernel": readable when something completed */
  pthread_mutex_t mu;     /* guards the fields below */
  fiocp_op_t* finished[2];
  int nfinished;
  int stall_ms;           /* the next harvest holds hub.mu this long */
} fake_t;

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

static int fake_poll(void* ctx, int64_t timeout_ms) {
  fake_t* f = (fake_t*)ctx;
  struct pollfd p = {f->pipe[0], POLLIN, 0};
  char buf[16];
  int rc = poll(&p, 1, timeout_ms < 0 ? -1 : (int)timeout_ms);
  if (rc > 0 && read(f->pipe[0], buf, sizeof(buf)) < 0) return -1;
  return 0;
}

static void fake_harvest(void* ctx) { /* hub.mu held */
  fake_t* f = (fake_t*)ctx;
  int i, stall;
  pthread_mutex_lock(&f->mu);
  stall = f->stall_ms;
  f->stall_ms = 0;
  pthread_mutex_unlock(&f->mu);
  if (stall) sleep_ms(stall);
  pthread_mutex_lock(&f->mu);
  for (i = 0; i < f->nfinished; i++)
    fiocp__hub_complete_locked(&f->hub, f->finished[i], 1);
  f->nfinished = 0;
  pthread_mutex_unlock(&f->mu);
}

static void fake_kick(void* ctx) {
  fake_t* f = (fake_t*)ctx;
  if (write(f->pipe[1], "k", 1) < 0) perror("write");
}

static void finish(fake_t* f, fiocp_op_t* op, int stall_ms) {
  pthread_mutex_lock(&f->mu);
  op->res = 1;
  f->finished[f->nfinished++] = op;
  if (stall_ms) f->stall_ms = stall_ms;
  pthread_mutex_unlock(&f->mu);
  if (write(f->pipe[1], "c", 1) < 0) perror("write"); /* the kernel's wake */
}

typedef struct {
  fake_t* f;
  int64_t timeout_ms;
  int n;
  fiocp_op_t* got;
  int64_t returned_at;
} waiter_t;

static void* run_waiter(void* arg) {
  waiter_t* w = (waiter_t*)arg;
  w->n = fiocp__hub_wait(&w->f->hub, &w->got, 1, w->timeout_ms);
  w->returned_at = fiocp__now_ms();
  return NULL;
}

int main(void) {
  static fake_t f;
  fiocp_op_t a, b;
  waiter_t P = {&f, -1, 0, NULL, 0}, L = {&f, 20000, 0, NULL, 0},
           S = {&f, 150, 0, NULL, 0};
  pthread_t tp, tl, ts;
  int64_t t0, deadline;
  memset(&a, 0, sizeof(a));
  memset(&b, 0, sizeof(b));
  if (pipe(f.pipe) != 0 || pthread_mutex_init(&f.mu, NULL) != 0 ||
      fiocp__hub_init(&f.hub) != 0) {
    perror("setup");
    return 2;
  }
  f.hub.ctx = &f;
  f.hub.poll = fake_poll;
  f.hub.harvest = fake_harvest;
  f.hub.kick = fake_kick;
  fiocp__hub_begin(&f.hub); /* A */
  fiocp__hub_begin(&f.hub); /* B */

  pthread_create(&tp, NULL, run_waiter, &P); /* becomes the poller */
  sleep_ms(100);
  pthread_create(&tl, NULL, run_waiter, &L); /* sleeps */
  sleep_ms(100);
  pthread_create(&ts, NULL, run_waiter, &S); /* sleeps, on top */
  sleep_ms(50);

  /* A completes; P's harvest then holds hub.mu for 400 ms, past S's
   * deadline (150 ms), before it hands the poller's role to S. */
  finish(&f, &a, 400);
  pthread_join(tp, NULL);
  pthread_join(ts, NULL);
  printf("P took %s; S returned %d\n", P.got == &a ? "A" : "?", S.n);
  if (P.n != 1 || P.got != &a || S.n != 0) {
    printf("unexpected setup outcome\n");
    return 2;
  }

  /* B completes. Somebody must be polling: L, if S passed the role on. */
  t0 = fiocp__now_ms();
  finish(&f, &b, 0);
  deadline = t0 + 3000;
  while (fiocp__now_ms() < deadline) {
    if (__atomic_load_n(&L.returned_at, __ATOMIC_ACQUIRE) != 0) break;
    sleep_ms(10);
  }
  if (__atomic_load_n(&L.returned_at, __ATOMIC_ACQUIRE) == 0) {
    printf("dropped: L still asleep 3 s after B completed (no poller)\n");
    fiocp__hub_close(&f.hub);
    pthread_join(tl, NULL);
    return 1;
  }
  pthread_join(tl, NULL);
  if (L.n != 1 || L.got != &b) {
    printf("L returned %d without B\n", L.n);
    return 1;
  }
  printf("handed over: L took B %lld ms after it completed\n",
         (long long)(L.returned_at - t0));
  return 0;
}
