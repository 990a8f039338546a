/* echo_uring.c: a small TCP echo server in C on io_uring, the reference
 * contender ("what C can do on this kernel") of `python -m fastiocp bench`.
 *
 * Built at run time by the bench runner with the system C compiler; needs
 * <linux/io_uring.h> (linux-libc-dev) and nothing else (raw system calls,
 * no liburing). Single thread, the same scheme as the Python servers: one
 * receive in flight per connection; a received chunk is sent back, and the
 * next receive is submitted when the send completes. One io_uring_enter()
 * both submits everything queued and waits for at least one completion.
 *
 *   echo_uring PORT      (0: any) prints "echo server on 127.0.0.1:PORT"
 *
 * Runs until SIGTERM or SIGINT, or until its parent exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ENTRIES 4096
#define BUFSIZE 65536
enum { K_ACCEPT = 1, K_RECV, K_SEND };

typedef struct {
  int fd;
  unsigned len, off; /* bytes to send back, bytes sent so far */
  char buf[BUFSIZE];
} conn_t;

static int ring_fd;
static unsigned *sq_head, *sq_tail, *sq_mask, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe* sqes;
static struct io_uring_cqe* cqes;
static unsigned tail_local, to_submit;
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static int enter(unsigned submit, unsigned wait) {
  return (int)syscall(__NR_io_uring_enter, ring_fd, submit, wait,
                      wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
}

static struct io_uring_sqe* get_sqe(void) {
  struct io_uring_sqe* sqe;
  while (tail_local - __atomic_load_n(sq_head, __ATOMIC_ACQUIRE) >= ENTRIES) {
    __atomic_store_n(sq_tail, tail_local, __ATOMIC_RELEASE);
    if (enter(to_submit, 0) >= 0) to_submit = 0;
  }
  sqe = &sqes[tail_local & *sq_mask];
  memset(sqe, 0, sizeof(*sqe));
  tail_local++;
  to_submit++;
  return sqe;
}

static uint64_t ud(int kind, void* p) { return (uint64_t)(uintptr_t)p | (uint64_t)kind; }

static void q_accept(int lfd) {
  struct io_uring_sqe* s = get_sqe();
  s->opcode = IORING_OP_ACCEPT;
  s->fd = lfd;
  s->accept_flags = SOCK_CLOEXEC;
  s->user_data = ud(K_ACCEPT, NULL);
}

static void q_recv(conn_t* c) {
  struct io_uring_sqe* s = get_sqe();
  s->opcode = IORING_OP_RECV;
  s->fd = c->fd;
  s->addr = (uint64_t)(uintptr_t)c->buf;
  s->len = BUFSIZE;
  s->user_data = ud(K_RECV, c);
}

static void q_send(conn_t* c) {
  struct io_uring_sqe* s = get_sqe();
  s->opcode = IORING_OP_SEND;
  s->fd = c->fd;
  s->addr = (uint64_t)(uintptr_t)(c->buf + c->off);
  s->len = c->len - c->off;
  s->msg_flags = MSG_NOSIGNAL;
  s->user_data = ud(K_SEND, c);
}

int main(int argc, char** argv) {
  struct io_uring_params p;
  struct sockaddr_in sa;
  socklen_t salen = sizeof(sa);
  void *sq, *cq;
  unsigned* array;
  unsigned i;
  int lfd, one = 1;
  struct sigaction act;

  prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (getppid() == 1) return 1;
  memset(&act, 0, sizeof(act));
  act.sa_handler = on_signal; /* no SA_RESTART: the wait returns EINTR */
  sigaction(SIGTERM, &act, NULL);
  sigaction(SIGINT, &act, NULL);

  lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa.sin_port = htons((uint16_t)(argc > 1 ? atoi(argv[1]) : 0));
  if (bind(lfd, (struct sockaddr*)&sa, sizeof(sa)) < 0 || listen(lfd, 1024) < 0 ||
      getsockname(lfd, (struct sockaddr*)&sa, &salen) < 0) {
    perror("echo_uring: listen");
    return 1;
  }

  memset(&p, 0, sizeof(p));
  ring_fd = (int)syscall(__NR_io_uring_setup, ENTRIES, &p);
  if (ring_fd < 0) {
    perror("echo_uring: io_uring_setup");
    return 1;
  }
  sq = mmap(NULL, p.sq_off.array + p.sq_entries * sizeof(unsigned),
            PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd,
            IORING_OFF_SQ_RING);
  cq = mmap(NULL, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
            PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd,
            IORING_OFF_CQ_RING);
  sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe),
              PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd,
              IORING_OFF_SQES);
  if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
    perror("echo_uring: mmap");
    return 1;
  }
  sq_head = (unsigned*)((char*)sq + p.sq_off.head);
  sq_tail = (unsigned*)((char*)sq + p.sq_off.tail);
  sq_mask = (unsigned*)((char*)sq + p.sq_off.ring_mask);
  array = (unsigned*)((char*)sq + p.sq_off.array);
  for (i = 0; i < p.sq_entries; i++) array[i] = i;
  cq_head = (unsigned*)((char*)cq + p.cq_off.head);
  cq_tail = (unsigned*)((char*)cq + p.cq_off.tail);
  cq_mask = (unsigned*)((char*)cq + p.cq_off.ring_mask);
  cqes = (struct io_uring_cqe*)((char*)cq + p.cq_off.cqes);
  tail_local = *sq_tail;

  printf("echo server on 127.0.0.1:%d\n", ntohs(sa.sin_port));
  fflush(stdout);
  q_accept(lfd);

  while (!stop) {
    unsigned head, tail;
    int rc;
    __atomic_store_n(sq_tail, tail_local, __ATOMIC_RELEASE);
    rc = enter(to_submit, 1);
    if (rc < 0) {
      if (errno == EINTR) continue;
      if (errno != EBUSY && errno != EAGAIN) {
        perror("echo_uring: io_uring_enter");
        return 1;
      }
    } else {
      to_submit -= (unsigned)rc < to_submit ? (unsigned)rc : to_submit;
    }
    head = *cq_head;
    tail = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
      struct io_uring_cqe* e = &cqes[head & *cq_mask];
      int kind = (int)(e->user_data & 7);
      conn_t* c = (conn_t*)(uintptr_t)(e->user_data & ~(uint64_t)7);
      int res = e->res;
      if (kind == K_ACCEPT) {
        if (res >= 0) {
          conn_t* n = malloc(sizeof(conn_t));
          if (n == NULL) {
            close(res);
          } else {
            setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            n->fd = res;
            q_recv(n);
          }
        }
        q_accept(lfd);
      } else if (kind == K_RECV) {
        if (res <= 0) {
          close(c->fd);
          free(c);
        } else {
          c->len = (unsigned)res;
          c->off = 0;
          q_send(c);
        }
      } else if (kind == K_SEND) {
        if (res < 0) {
          close(c->fd);
          free(c);
        } else {
          c->off += (unsigned)res;
          if (c->off < c->len) q_send(c);
          else q_recv(c);
        }
      }
    }
    __atomic_store_n(cq_head, head, __ATOMIC_RELEASE);
  }
  return 0;
}
