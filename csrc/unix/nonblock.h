/* nonblock.h: the non-blocking calls the Linux backends share: one call on
 * a descriptor that may be blocking, for the system calls that have no
 * per-call non-blocking flag (sendfile, and read/write/accept where the
 * backend needs them), and a receive into a pool buffer (fiocp__pool_recv).
 *
 * O_NONBLOCK is set for the call and restored after it, under one
 * process-wide mutex: two toggles on one file (by any port, any backend)
 * never interleave and leave the flag set. fork() waits for a toggle in
 * progress (pthread_atfork), so a child never inherits the mutex locked.
 * While the flag is set, another thread's blocking call on the same file
 * may see EAGAIN: the price of a flag that belongs to the open file. */
#ifndef FIOCP_NONBLOCK_H
#define FIOCP_NONBLOCK_H

#include <stddef.h>
#include <stdint.h>

/* Makes fd non-blocking for one call. *saved receives the flags to
 * restore, or -1 if the descriptor was already non-blocking (nothing to
 * undo). Returns 0 or -errno. On success with *saved >= 0 the mutex is held
 * until fiocp__nb_leave(): make only the one non-blocking call meanwhile. */
int fiocp__nb_enter(int fd, int* saved);

/* Restores what fiocp__nb_enter() changed (nothing if saved < 0) and
 * releases the mutex. Keeps errno. */
void fiocp__nb_leave(int fd, int saved);

/* One non-blocking receive of at most len bytes (and a buffer's size) into
 * a buffer of pool taken for it: a pooled receive (FIOCP_OPF_POOLED) done
 * on readiness, by epoll and by io_uring without buffer rings. Returns the
 * bytes (> 0: the buffer's id in *id, held by the caller now), 0 at end of
 * stream, FIOCP_ENOBUFS when data is there but no buffer is free (a 1-byte
 * MSG_PEEK tells; nothing is read), or -errno (-EAGAIN: nothing there).
 * Unless data came, the buffer goes back to the pool. Thread-safe. */
struct fiocp_pool_s;
int64_t fiocp__pool_recv(struct fiocp_pool_s* pool, int fd, size_t len,
                         int64_t* id);

#endif
