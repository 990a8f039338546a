/* nonblock.c: see nonblock.h. */
#include "nonblock.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>

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
