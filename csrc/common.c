/* common.c: what every backend shares: the record allocator, the backend
 * table and the monotonic clock. */
#include "fiocp.h"

#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
# include <time.h>
#endif

/* Backends compiled in, best first. backend="auto" takes the first whose
 * probe() succeeds. */
const fiocp_backend_t* const fiocp__backends[] = {
#ifdef _WIN32
    &fiocp__iocp_backend,
#endif
#ifdef __linux__
    &fiocp__uring_backend,
    &fiocp__epoll_backend,
#endif
    NULL};
const int fiocp__nbackends =
    (int)(sizeof(fiocp__backends) / sizeof(fiocp__backends[0])) - 1;

const fiocp_backend_t* fiocp__backend_by_name(const char* name) {
  int i;
  for (i = 0; i < fiocp__nbackends; i++)
    if (strcmp(fiocp__backends[i]->name, name) == 0)
      return fiocp__backends[i];
  return NULL;
}

/* ---- Record allocator ---------------------------------------------------
 * Slabs grow geometrically (64, 128, ... up to 4096 records) so that a port
 * that only ever has a few operations in flight stays small, and a port with
 * 100,000 pending receives does not call malloc 100,000 times. */

#define SLAB_MIN 64
#define SLAB_MAX 4096

fiocp_op_t* fiocp__op_alloc(fiocp_port_t* port) {
  fiocp_op_t* op = port->free_ops;
  if (op == NULL) {
    size_t n = port->nops < SLAB_MIN ? SLAB_MIN : port->nops;
    size_t i;
    fiocp_slab_t* slab;
    if (n > SLAB_MAX) n = SLAB_MAX;
    slab = (fiocp_slab_t*)calloc(1, sizeof(*slab) + n * sizeof(fiocp_op_t));
    if (slab == NULL) return NULL;
    slab->count = n;
    slab->next = port->slabs;
    port->slabs = slab;
    port->nops += n;
    for (i = n; i-- > 0;) {
      slab->ops[i].next = port->free_ops;
      port->free_ops = &slab->ops[i];
    }
    op = port->free_ops;
  }
  port->free_ops = op->next;
  op->next = NULL;
  return op;
}

void fiocp__op_free(fiocp_port_t* port, fiocp_op_t* op) {
  fiocp_addr_t* addr = op->addr;
  uint8_t gen = (uint8_t)(op->gen + 1);
  if (addr != NULL) {
    addr->next_free = port->free_addrs;
    port->free_addrs = addr;
  }
  /* Clear everything but the OVERLAPPED/slab identity in one go: a reused
   * record must never carry state from its previous operation. */
  memset(op, 0, sizeof(*op));
  op->state = FIOCP_ST_FREE;
  op->gen = gen;
  op->next = port->free_ops;
  port->free_ops = op;
}

typedef struct addr_chunk_s {
  struct addr_chunk_s* next;
  fiocp_addr_t addrs[64];
} addr_chunk_t;

fiocp_addr_t* fiocp__addr_alloc(fiocp_port_t* port) {
  fiocp_addr_t* a = port->free_addrs;
  if (a == NULL) {
    size_t i;
    addr_chunk_t* chunk = (addr_chunk_t*)calloc(1, sizeof(*chunk));
    if (chunk == NULL) return NULL;
    chunk->next = (addr_chunk_t*)port->addr_chunks;
    port->addr_chunks = chunk;
    for (i = 64; i-- > 0;) {
      chunk->addrs[i].next_free = port->free_addrs;
      port->free_addrs = &chunk->addrs[i];
    }
    a = port->free_addrs;
  }
  port->free_addrs = a->next_free;
  memset(a, 0, sizeof(*a));
  return a;
}

void fiocp__allocator_destroy(fiocp_port_t* port) {
  fiocp_slab_t* slab = port->slabs;
  addr_chunk_t* chunk = (addr_chunk_t*)port->addr_chunks;
  while (slab != NULL) {
    fiocp_slab_t* next = slab->next;
    free(slab);
    slab = next;
  }
  while (chunk != NULL) {
    addr_chunk_t* next = chunk->next;
    free(chunk);
    chunk = next;
  }
  port->slabs = NULL;
  port->addr_chunks = NULL;
  port->free_ops = NULL;
  port->free_addrs = NULL;
  port->nops = 0;
}

/* Calls fn for every record whose state is in the mask (1 << state). */
static void foreach_in_states(fiocp_port_t* port, unsigned mask,
                              void (*fn)(fiocp_port_t*, fiocp_op_t*, void*),
                              void* arg) {
  fiocp_slab_t* slab;
  size_t i;
  for (slab = port->slabs; slab != NULL; slab = slab->next)
    for (i = 0; i < slab->count; i++)
      if (mask & (1u << slab->ops[i].state)) fn(port, &slab->ops[i], arg);
}

void fiocp__foreach_inflight(fiocp_port_t* port,
                             void (*fn)(fiocp_port_t*, fiocp_op_t*, void*),
                             void* arg) {
  foreach_in_states(port, 1u << FIOCP_ST_INFLIGHT, fn, arg);
}

void fiocp__foreach_owned(fiocp_port_t* port,
                          void (*fn)(fiocp_port_t*, fiocp_op_t*, void*),
                          void* arg) {
  foreach_in_states(port, (1u << FIOCP_ST_INFLIGHT) | (1u << FIOCP_ST_DONE),
                    fn, arg);
}

/* ---- Clock ------------------------------------------------------------- */

int64_t fiocp__now_ms(void) {
#ifdef _WIN32
  return (int64_t)GetTickCount64();
#else
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
#endif
}

int64_t fiocp__remaining_ms(int64_t deadline) {
  int64_t left;
  if (deadline < 0) return -1;
  left = deadline - fiocp__now_ms();
  return left < 0 ? 0 : left;
}
