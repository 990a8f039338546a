/* common.c: what every backend shares: the record allocator, the backend
 * table and the monotonic clock. */
#include "fiocp.h"

#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
# include <pthread.h>
# include <sys/mman.h>
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

/* ---- Buffer pools -------------------------------------------------------
 * The memory comes straight from the OS, page aligned (the kernel maps
 * provided buffers page by page) and untouched until used: a pool of many
 * buffers costs resident memory only for the buffers that received. */

#ifdef _WIN32
typedef SRWLOCK pool_mutex_t;
#else
typedef pthread_mutex_t pool_mutex_t;
#endif

int fiocp__pool_init(fiocp_pool_t* pool, uint32_t size, uint32_t count) {
  size_t bytes = (size_t)size * count, i;
  pool_mutex_t* mu;
  memset(pool, 0, sizeof(*pool));
  if (size == 0 || count == 0 || count > FIOCP_POOL_MAX) return FIOCP_ENOMEM;
  pool->free_ids = (uint32_t*)malloc(count * sizeof(uint32_t));
  mu = (pool_mutex_t*)malloc(sizeof(*mu));
  if (pool->free_ids == NULL || mu == NULL) goto fail;
#ifdef _WIN32
  pool->base = (char*)VirtualAlloc(NULL, bytes, MEM_RESERVE | MEM_COMMIT,
                                   PAGE_READWRITE);
  if (pool->base == NULL) goto fail;
  InitializeSRWLock(mu);
#else
  pool->base = (char*)mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pool->base == MAP_FAILED) {
    pool->base = NULL;
    goto fail;
  }
  if (pthread_mutex_init(mu, NULL) != 0) {
    munmap(pool->base, bytes);
    pool->base = NULL;
    goto fail;
  }
#endif
  pool->lock = mu;
  pool->size = size;
  pool->count = count;
  /* Lowest ids on top: the first buffers used are the first pages. */
  for (i = 0; i < count; i++) pool->free_ids[i] = (uint32_t)(count - 1 - i);
  pool->nfree = count;
  return 0;
fail:
  free(pool->free_ids);
  free(mu);
  memset(pool, 0, sizeof(*pool));
  return FIOCP_ENOMEM;
}

void fiocp__pool_fini(fiocp_pool_t* pool) {
  if (pool->base != NULL) {
#ifdef _WIN32
    VirtualFree(pool->base, 0, MEM_RELEASE);
#else
    munmap(pool->base, (size_t)pool->size * pool->count);
    pthread_mutex_destroy((pool_mutex_t*)pool->lock);
#endif
  }
  free(pool->free_ids);
  free(pool->lock);
  memset(pool, 0, sizeof(*pool));
}

void fiocp__pool_lock(fiocp_pool_t* pool) {
#ifdef _WIN32
  AcquireSRWLockExclusive((pool_mutex_t*)pool->lock);
#else
  pthread_mutex_lock((pool_mutex_t*)pool->lock);
#endif
}

void fiocp__pool_unlock(fiocp_pool_t* pool) {
#ifdef _WIN32
  ReleaseSRWLockExclusive((pool_mutex_t*)pool->lock);
#else
  pthread_mutex_unlock((pool_mutex_t*)pool->lock);
#endif
}

int64_t fiocp__pool_take(fiocp_pool_t* pool) {
  int64_t id = -1;
  fiocp__pool_lock(pool);
  if (pool->nfree > 0) id = pool->free_ids[--pool->nfree];
  fiocp__pool_unlock(pool);
  return id;
}

void fiocp__pool_give_locked(fiocp_pool_t* pool, uint32_t id) {
  if (pool->nfree < pool->count) pool->free_ids[pool->nfree++] = id;
}

void fiocp__pool_give(fiocp_pool_t* pool, uint32_t id) {
  fiocp__pool_lock(pool);
  fiocp__pool_give_locked(pool, id);
  fiocp__pool_unlock(pool);
}

/* ---- Multishot children ------------------------------------------------
 * A busy multishot makes a child per message: they are kept for reuse (at
 * most CHILD_CACHE_MAX, process-wide, under one mutex) rather than going
 * through malloc and free each time. */

#define CHILD_CACHE_MAX 1024

static fiocp_op_t* child_cache;
static int child_cache_len;
#ifdef _WIN32
static SRWLOCK child_cache_mu = SRWLOCK_INIT;
# define CHILD_LOCK() AcquireSRWLockExclusive(&child_cache_mu)
# define CHILD_UNLOCK() ReleaseSRWLockExclusive(&child_cache_mu)
#else
static pthread_mutex_t child_cache_mu = PTHREAD_MUTEX_INITIALIZER;
# define CHILD_LOCK() pthread_mutex_lock(&child_cache_mu)
# define CHILD_UNLOCK() pthread_mutex_unlock(&child_cache_mu)

/* fork() while another thread holds the mutex would leave it locked
 * forever in the child: fork waits for it. */
static void child_cache_prefork(void) { pthread_mutex_lock(&child_cache_mu); }
static void child_cache_postfork(void) { pthread_mutex_unlock(&child_cache_mu); }
__attribute__((constructor)) static void child_cache_atfork(void) {
  (void)pthread_atfork(child_cache_prefork, child_cache_postfork,
                       child_cache_postfork);
}
#endif

fiocp_op_t* fiocp__child_new(fiocp_op_t* parent) {
  fiocp_op_t* child;
  CHILD_LOCK();
  child = child_cache;
  if (child != NULL) {
    child_cache = child->next;
    child_cache_len--;
  }
  CHILD_UNLOCK();
  if (child != NULL)
    memset(child, 0, sizeof(*child));
  else if ((child = (fiocp_op_t*)calloc(1, sizeof(*child))) == NULL)
    return NULL;
  child->kind = parent->kind;
  child->state = FIOCP_ST_INFLIGHT;
  child->flags = (uint8_t)((parent->flags & ~FIOCP_OPF_CANCELLED) |
                           FIOCP_OPF_CHILD);
  child->handle = parent->handle;
  child->len = parent->len;
  child->user = parent->user;
  child->pool = parent->pool;
  child->parent = parent;
  child->offset = -1;
  __atomic_add_fetch(&parent->refs, 1, __ATOMIC_ACQ_REL);
  return child;
}

uint32_t fiocp__op_unref(fiocp_op_t* parent) {
  return __atomic_sub_fetch(&parent->refs, 1, __ATOMIC_ACQ_REL);
}

uint32_t fiocp__child_free(fiocp_op_t* child) {
  fiocp_op_t* parent = child->parent;
  free(child->addr);
  child->addr = NULL;
  CHILD_LOCK();
  if (child_cache_len < CHILD_CACHE_MAX) {
    child->next = child_cache;
    child_cache = child;
    child_cache_len++;
    child = NULL;
  }
  CHILD_UNLOCK();
  free(child);
  return fiocp__op_unref(parent);
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
