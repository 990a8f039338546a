/* nonblock.h: one non-blocking call on a descriptor that may be blocking,
 * for the system calls that have no per-call non-blocking flag (sendfile,
 * and read/write/accept where the backend needs them), shared by the Linux
 * backends.
 *
 * O_NONBLOCK is set for the call and restored after it, under one
 * process-wide mutex: two toggles on one file (by any port, any backend)
 * never interleave and leave the flag set. fork() waits for a toggle in
 * progress (pthread_atfork), so a child never inherits the mutex locked.
 * While the flag is set, another thread's blocking call on the same file
 * may see EAGAIN: the price of a flag that belongs to the open file. */
#ifndef FIOCP_NONBLOCK_H
#define FIOCP_NONBLOCK_H

/* Makes fd non-blocking for one call. *saved receives the flags to
 * restore, or -1 if the descriptor was already non-blocking (nothing to
 * undo). Returns 0 or -errno. On success with *saved >= 0 the mutex is held
 * until fiocp__nb_leave(): make only the one non-blocking call meanwhile. */
int fiocp__nb_enter(int fd, int* saved);

/* Restores what fiocp__nb_enter() changed (nothing if saved < 0) and
 * releases the mutex. Keeps errno. */
void fiocp__nb_leave(int fd, int saved);

#endif
