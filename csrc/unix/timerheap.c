/* timerheap.c: the Linux backends' timer heap (see timerheap.h). */
#define _GNU_SOURCE
#include "timerheap.h"

#include <errno.h>
#include <stdlib.h>

#define TH_SLACK_DEFAULT 1000000   /* ns: 1 ms, libuv's timer granularity */
#define TH_SLACK_MAX 1000000000    /* ns: what FASTIOCP_TIMER_SLACK_US may ask */
#define TH_CAP_MIN 64

void fiocp__th_init(fiocp_theap_t* h, int slot) {
  h->heap = NULL;
  h->n = h->cap = 0;
  h->seq = 0;
  h->slot = slot;
  h->armed = INT64_MAX;
  h->slack = fiocp__th_slack();
}

void fiocp__th_free(fiocp_theap_t* h) {
  free(h->heap);
  h->heap = NULL;
  h->n = h->cap = 0;
}

int64_t fiocp__th_slack(void) {
  const char* env = getenv("FASTIOCP_TIMER_SLACK_US");
  char* end;
  long long us;
  if (env == NULL || *env == 0) return TH_SLACK_DEFAULT;
  errno = 0;
  us = strtoll(env, &end, 10);
  if (errno != 0 || *end != 0 || us < 0) return TH_SLACK_DEFAULT;
  return us > TH_SLACK_MAX / 1000 ? TH_SLACK_MAX : (int64_t)us * 1000;
}

int64_t fiocp__th_fire_at(const fiocp_theap_t* h, int64_t when) {
  when = when > INT64_MAX - h->slack ? INT64_MAX - 1 : when + h->slack;
  return when < 1 ? 1 : when; /* an all-zero timespec disarms a timerfd */
}

int fiocp__th_needs_arm(const fiocp_theap_t* h, int64_t when) {
  return when < h->armed - h->slack;
}

static int th_less(const fiocp_tment_t* a, const fiocp_tment_t* b) {
  return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

/* Every move records the new index in the record, which is what makes
 * removal by record O(log n). */
static void th_place(fiocp_theap_t* h, size_t i, fiocp_tment_t ent) {
  h->heap[i] = ent;
  ent.op->addr->scratch.i64[h->slot] = (int64_t)i + 1;
}

static void th_up(fiocp_theap_t* h, size_t i) {
  fiocp_tment_t ent = h->heap[i];
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!th_less(&ent, &h->heap[parent])) break;
    th_place(h, i, h->heap[parent]);
    i = parent;
  }
  th_place(h, i, ent);
}

static void th_down(fiocp_theap_t* h, size_t i) {
  fiocp_tment_t ent = h->heap[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= h->n) break;
    if (c + 1 < h->n && th_less(&h->heap[c + 1], &h->heap[c])) c++;
    if (!th_less(&h->heap[c], &ent)) break;
    th_place(h, i, h->heap[c]);
    i = c;
  }
  th_place(h, i, ent);
}

static void th_remove_at(fiocp_theap_t* h, size_t i) {
  h->heap[i].op->addr->scratch.i64[h->slot] = 0;
  h->n--;
  if (i < h->n) {
    h->heap[i] = h->heap[h->n];
    if (i > 0 && th_less(&h->heap[i], &h->heap[(i - 1) / 2])) th_up(h, i);
    else th_down(h, i);
  }
}

int fiocp__th_push(fiocp_theap_t* h, fiocp_op_t* op, int64_t when) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? h->cap * 2 : TH_CAP_MIN;
    fiocp_tment_t* a;
    if (cap > SIZE_MAX / sizeof(*a)) return FIOCP_ENOMEM;
    a = (fiocp_tment_t*)realloc(h->heap, cap * sizeof(*a));
    if (a == NULL) return FIOCP_ENOMEM;
    h->heap = a;
    h->cap = cap;
  }
  h->heap[h->n].when = when;
  h->heap[h->n].seq = h->seq++;
  h->heap[h->n].op = op;
  h->n++;
  th_up(h, h->n - 1);
  return 0;
}

int fiocp__th_remove(fiocp_theap_t* h, fiocp_op_t* op) {
  int64_t idx = op->addr->scratch.i64[h->slot];
  if (idx <= 0) return 0;
  th_remove_at(h, (size_t)idx - 1);
  return 1;
}

int64_t fiocp__th_earliest(const fiocp_theap_t* h) {
  return h->n > 0 ? h->heap[0].when : INT64_MAX;
}

fiocp_op_t* fiocp__th_pop_due(fiocp_theap_t* h, int64_t now) {
  fiocp_op_t* op;
  if (h->n == 0 || h->heap[0].when > now) return NULL;
  op = h->heap[0].op;
  th_remove_at(h, 0);
  return op;
}

fiocp_op_t* fiocp__th_take_kind(fiocp_theap_t* h, unsigned kind) {
  fiocp_op_t* out = NULL;
  fiocp_op_t** tail = &out;
  size_t i, k = 0;
  for (i = 0; i < h->n; i++) {
    fiocp_tment_t ent = h->heap[i];
    if (ent.op->kind == kind) {
      ent.op->addr->scratch.i64[h->slot] = 0;
      ent.op->next = NULL;
      *tail = ent.op;
      tail = &ent.op->next;
    } else {
      h->heap[k++] = ent;
    }
  }
  h->n = k;
  for (i = 0; i < k; i++)
    h->heap[i].op->addr->scratch.i64[h->slot] = (int64_t)i + 1;
  for (i = k / 2; i-- > 0;) th_down(h, i); /* heapify what is left */
  return out;
}
