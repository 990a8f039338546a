/* nonblock.c: see nonblock.h. */
#include "nonblock.h"

#include "../fiocp.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>

static pthread_mutex_t nb_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t nb_once = PTHREAD_ONCE_INIT;

/* The fork waits for a toggle in progress, which never waits for anything. */
static void nb_prepare(void) { pthread_mutex_lock(&nb_mu); }
static void nb_release(void) { pthread_mutex_unlock(&nb_mu); }
static void nb_register_atfork(void) {
  /* Fails only with ENOMEM; the fork hazard is then left as it was. */
  (void)pthread_atfork(nb_prepare, nb_release, nb_release);
}

int fiocp__nb_enter(int fd, int* saved) {
  int fl = fcntl(fd, F_GETFL);
  *saved = -1;
  if (fl < 0) return -errno;
  if (fl & O_NONBLOCK) return 0;
  (void)pthread_once(&nb_once, nb_register_atfork); /* cannot fail here */
  pthread_mutex_lock(&nb_mu);
  /* Read again under the lock: another toggle may have just ended. */
  fl = fcntl(fd, F_GETFL);
  if (fl < 0 || (fl & O_NONBLOCK)) {
    int rc = fl < 0 ? -errno : 0;
    pthread_mutex_unlock(&nb_mu);
    return rc;
  }
  if (fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    int rc = -errno;
    pthread_mutex_unlock(&nb_mu);
    return rc;
  }
  *saved = fl;
  return 0;
}

void fiocp__nb_leave(int fd, int saved) {
  int err = errno;
  if (saved < 0) return;
  /* Restoring can only fail if the user closed fd meanwhile (EBADF), and
   * then there is no flag left to restore. */
  (void)fcntl(fd, F_SETFL, saved);
  pthread_mutex_unlock(&nb_mu);
  errno = err;
}

int64_t fiocp__pool_recv(fiocp_pool_t* pool, int fd, size_t len, int64_t* id) {
  int64_t taken = fiocp__pool_take(pool);
  ssize_t n;
  int err;
  if (len > pool->size) len = pool->size;
  if (taken < 0) {
    char peek;
    do {
      n = recv(fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n > 0) return FIOCP_ENOBUFS;
    return n == 0 ? 0 : -(int64_t)errno;
  }
  do {
    n = recv(fd, pool->base + (size_t)taken * pool->size, len, MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    *id = taken;
    return (int64_t)n;
  }
  err = n == 0 ? 0 : errno;
  fiocp__pool_give(pool, (uint32_t)taken);
  return -(int64_t)err;
}
