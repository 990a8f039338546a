/* loadgen.c: the TCP echo load generator of `python -m fastiocp bench`.
 *
 * Built at run time by the bench runner (fastiocp/bench/runner.py) with the system
 * C compiler; plain POSIX + epoll, no dependencies. One thread drives every
 * connection, each with exactly one message in flight: send MSGSIZE bytes,
 * wait until all of them came back, send again. A large message (up to 1 MiB)
 * goes out in pieces as the socket takes them (EPOLLOUT) while its echo is
 * read back, and each piece of the echo is compared with the bytes sent at the
 * same offset: the next message starts only when the whole echo came back.
 *
 *   loadgen echo HOST PORT CONNS MSGSIZE WARMUP_S DURATION_S SERVER_PID
 *   loadgen connect HOST PORT INFLIGHT WARMUP_S DURATION_S SERVER_PID
 *
 * connect (issue 18's accept benchmark) keeps INFLIGHT non-blocking
 * connects going; each one that completes is closed at once with a reset
 * (SO_LINGER 0: no TIME_WAIT, so the ephemeral ports never run out) and
 * replaced. The server's accept rate bounds the connect rate once its
 * backlog is full. It prints connections, seconds, conns_per_s and the
 * same CPU figures.
 *
 * After WARMUP_S seconds it samples its own CPU time and the server's
 * (/proc/SERVER_PID/stat, every thread of the process), counts messages for
 * DURATION_S seconds, samples again and prints one JSON object on stdout:
 * messages, seconds, latency percentiles (microseconds, measured from the
 * send to the last byte of the echo), its own CPU seconds and the server's.
 * It exits with status 2 on a connection error and never runs longer than
 * WARMUP_S + DURATION_S + 30 s (alarm), nor outlives its parent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 100000 /* 1 us buckets up to 100 ms, then one overflow */

typedef struct {
  int fd;
  size_t put;    /* bytes of the current message sent */
  size_t got;    /* bytes of the current echo received */
  int wants_out; /* EPOLLOUT registered: the rest of the message waits */
  double sent;   /* when the current message was sent */
} conn_t;

static uint64_t hist[HIST_US + 1];

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_self_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* utime + stime of a whole process, in seconds; -1 if unreadable. */
static double cpu_of_pid(long pid) {
  char path[64], buf[4096];
  FILE* f;
  size_t n;
  char* p;
  unsigned long long ut = 0, st = 0;
  int field;
  if (pid <= 0) return -1;
  snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
  f = fopen(path, "r");
  if (f == NULL) return -1;
  n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = 0;
  p = strrchr(buf, ')'); /* the command name may hold spaces */
  if (p == NULL) return -1;
  p++;
  /* After ')': field 3 (state) onwards; utime is 14, stime 15. */
  for (field = 3; field <= 15 && *p; field++) {
    while (*p == ' ') p++;
    if (field == 14) ut = strtoull(p, NULL, 10);
    if (field == 15) st = strtoull(p, NULL, 10);
    while (*p && *p != ' ') p++;
  }
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double percentile(uint64_t total, double q) {
  uint64_t want = (uint64_t)((double)total * q), seen = 0;
  size_t i;
  if (total == 0) return 0;
  if (want >= total) want = total - 1;
  for (i = 0; i <= HIST_US; i++) {
    seen += hist[i];
    if (seen > want) return (double)i;
  }
  return (double)HIST_US;
}

/* The measured window: it opens WARMUP_S after the start (sampling this
 * process's CPU and the server's) and closes DURATION_S later. */
typedef struct {
  double start, warmup, duration, t0, t_end, cpu0, scpu0;
  long server_pid;
  int measuring;
} window_t;

static void window_init(window_t* w, double warmup, double duration, long server_pid) {
  memset(w, 0, sizeof(*w));
  w->start = now_s();
  w->warmup = warmup;
  w->duration = duration;
  w->server_pid = server_pid;
}

/* Called at time t in the loop: opens the window when the warm-up is
 * over; returns 1 once it has closed. */
static int window_tick(window_t* w, double t) {
  if (!w->measuring && t - w->start >= w->warmup) {
    w->measuring = 1;
    w->t0 = now_s();
    w->cpu0 = cpu_self_s();
    w->scpu0 = cpu_of_pid(w->server_pid);
    w->t_end = w->t0 + w->duration;
  } else if (w->measuring && t >= w->t_end) {
    return 1;
  }
  return 0;
}

/* At the close: the window's seconds, this process's CPU seconds in it
 * and the server's (-1 if unreadable). */
static void window_close(window_t* w, double* secs, double* cpu, double* scpu) {
  double t1 = now_s(), cpu1 = cpu_self_s(), scpu1 = cpu_of_pid(w->server_pid);
  *secs = t1 - w->t0;
  *cpu = cpu1 - w->cpu0;
  *scpu = (w->scpu0 < 0 || scpu1 < 0) ? -1.0 : scpu1 - w->scpu0;
}

static int fail(const char* what) {
  fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
  return 2;
}

/* Sends what the socket takes of the rest of c's message; waits for
 * EPOLLOUT while some is left. -1 on an error. */
static int send_more(int ep, conn_t* c, uint32_t idx, const char* msg, size_t len) {
  struct epoll_event ev;
  while (c->put < len) {
    ssize_t r = send(c->fd, msg + c->put, len - c->put, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      return -1;
    }
    c->put += (size_t)r;
  }
  if ((c->put < len) != c->wants_out) {
    c->wants_out = c->put < len;
    ev.events = EPOLLIN | (c->wants_out ? EPOLLOUT : 0);
    ev.data.u32 = idx;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) return -1;
  }
  return 0;
}

static int run_echo(int argc, char** argv) {
  const char* host;
  int port, nconns, i, ep, one = 1;
  size_t msgsize;
  double warmup, duration, last_progress;
  window_t win;
  long server_pid;
  conn_t* conns;
  char *msg, *rbuf;
  struct sockaddr_in sa;
  struct epoll_event evs[256];
  uint64_t messages = 0, errors = 0;

  if (argc != 9) {
    fprintf(stderr,
            "usage: loadgen echo HOST PORT CONNS MSGSIZE WARMUP_S DURATION_S "
            "SERVER_PID\n");
    return 64;
  }
  host = argv[2];
  port = atoi(argv[3]);
  nconns = atoi(argv[4]);
  msgsize = (size_t)atol(argv[5]);
  warmup = atof(argv[6]);
  duration = atof(argv[7]);
  server_pid = atol(argv[8]);
  if (nconns < 1 || msgsize < 1 || msgsize > (1 << 20) || duration <= 0) {
    fprintf(stderr, "loadgen: bad arguments\n");
    return 64;
  }
  alarm((unsigned)(warmup + duration + 30));

  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)port);
  if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
    fprintf(stderr, "loadgen: HOST must be an IPv4 address\n");
    return 64;
  }
  conns = calloc((size_t)nconns, sizeof(conn_t));
  msg = malloc(msgsize);
  rbuf = malloc(msgsize);
  if (!conns || !msg || !rbuf) return fail("malloc");
  for (i = 0; i < (int)msgsize; i++) msg[i] = (char)('a' + i % 26);

  ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return fail("epoll_create1");
  for (i = 0; i < nconns; i++) {
    struct epoll_event ev;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("socket");
    if (connect(fd, (struct sockaddr*)&sa, sizeof(sa)) < 0) return fail("connect");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    conns[i].fd = fd;
    ev.events = EPOLLIN;
    ev.data.u32 = (uint32_t)i;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) return fail("epoll_ctl");
  }
  window_init(&win, warmup, duration, server_pid);
  for (i = 0; i < nconns; i++) {
    conns[i].sent = now_s();
    if (send_more(ep, &conns[i], (uint32_t)i, msg, msgsize) < 0) return fail("send");
  }
  last_progress = win.start;

  for (;;) {
    int n = epoll_wait(ep, evs, 256, 100), k;
    double t = now_s();
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("epoll_wait");
    }
    for (k = 0; k < n; k++) {
      uint32_t idx = evs[k].data.u32;
      conn_t* c = &conns[idx];
      ssize_t r;
      if ((evs[k].events & EPOLLOUT) && c->put < msgsize &&
          send_more(ep, c, idx, msg, msgsize) < 0)
        return fail("send");
      if (!(evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
      /* The echo of what was sent so far, never more: a server that sent
       * more than it was given shows as a wrong echo, not as the next one. */
      r = recv(c->fd, rbuf, c->put > c->got ? c->put - c->got : 1, 0);
      if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        fprintf(stderr, "loadgen: connection %u %s\n", idx,
                r == 0 ? "closed by the server" : strerror(errno));
        return 2;
      }
      if (c->got + (size_t)r > c->put ||
          memcmp(rbuf, msg + c->got, (size_t)r) != 0) {
        errors++;
        fprintf(stderr, "loadgen: connection %u: wrong echo at byte %zu\n", idx, c->got);
        return 3;
      }
      c->got += (size_t)r;
      if (c->got < msgsize) continue;
      c->got = 0;
      c->put = 0;
      if (win.measuring) {
        double us = (t - c->sent) * 1e6;
        size_t b = us < 0 ? 0 : (us >= HIST_US ? HIST_US : (size_t)us);
        hist[b]++;
        messages++;
      }
      c->sent = t;
      if (send_more(ep, c, idx, msg, msgsize) < 0) return fail("send");
    }
    if (n > 0) last_progress = t;
    else if (t - last_progress > 5.0) {
      fprintf(stderr, "loadgen: no echo for 5 s: the server is stuck\n");
      return 2;
    }
    if (window_tick(&win, t)) break;
  }
  {
    double secs, cpu, scpu;
    window_close(&win, &secs, &cpu, &scpu);
    printf("{\"messages\": %llu, \"seconds\": %.6f, \"msgs_per_s\": %.1f, "
           "\"lat_p50_us\": %.0f, \"lat_p90_us\": %.0f, \"lat_p99_us\": %.0f, "
           "\"lat_p999_us\": %.0f, \"loadgen_cpu_s\": %.4f, "
           "\"server_cpu_s\": %.4f, \"bad_echoes\": %llu, \"connections\": %d}\n",
           (unsigned long long)messages, secs, (double)messages / secs,
           percentile(messages, 0.50), percentile(messages, 0.90),
           percentile(messages, 0.99), percentile(messages, 0.999), cpu, scpu,
           (unsigned long long)errors, nconns);
    fflush(stdout);
  }
  for (i = 0; i < nconns; i++) close(conns[i].fd);
  return errors ? 3 : 0;
}

/* Starts one non-blocking connect to sa and adds it to ep. Returns the
 * socket, or -1 (errno set). */
static int start_connect(int ep, const struct sockaddr_in* sa) {
  struct epoll_event ev;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, (const struct sockaddr*)sa, sizeof(*sa)) < 0 &&
      errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  ev.events = EPOLLOUT;
  ev.data.fd = fd;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

static int run_connect(int argc, char** argv) {
  struct sockaddr_in sa;
  struct epoll_event evs[256];
  struct linger lin = {1, 0};
  int ep, inflight, i;
  long server_pid;
  double warmup, duration, last_progress;
  window_t win;
  uint64_t conns = 0, errors = 0;
  if (argc != 8) {
    fprintf(stderr, "usage: loadgen connect HOST PORT INFLIGHT WARMUP_S "
                    "DURATION_S SERVER_PID\n");
    return 64;
  }
  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)atoi(argv[3]));
  if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) return fail("inet_pton");
  inflight = atoi(argv[4]);
  warmup = atof(argv[5]);
  duration = atof(argv[6]);
  server_pid = atol(argv[7]);
  if (inflight < 1 || inflight > 4096) return fail("INFLIGHT");
  alarm((unsigned)(warmup + duration + 30));
  ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return fail("epoll_create1");
  for (i = 0; i < inflight; i++)
    if (start_connect(ep, &sa) < 0) return fail("connect");
  window_init(&win, warmup, duration, server_pid);
  last_progress = win.start;
  for (;;) {
    int n = epoll_wait(ep, evs, 256, 100), k;
    double t = now_s();
    if (n < 0 && errno != EINTR) return fail("epoll_wait");
    for (k = 0; k < n; k++) {
      int fd = evs[k].data.fd, err = 0;
      socklen_t len = sizeof(err);
      if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0)
        errors++;
      else
        conns += (uint64_t)win.measuring;
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin));
      close(fd); /* also leaves the epoll set */
      if (start_connect(ep, &sa) < 0) return fail("connect");
      last_progress = t;
    }
    if (t - last_progress > 5) {
      fprintf(stderr, "loadgen: no connection for 5 s: the server is stuck\n");
      return 2;
    }
    if (window_tick(&win, t)) break;
  }
  {
    double secs, cpu, scpu;
    window_close(&win, &secs, &cpu, &scpu);
    printf("{\"connections\": %llu, \"seconds\": %.6f, \"conns_per_s\": %.1f, "
           "\"loadgen_cpu_s\": %.4f, \"server_cpu_s\": %.4f, \"errors\": %llu}\n",
           (unsigned long long)conns, secs, (double)conns / secs, cpu, scpu,
           (unsigned long long)errors);
    fflush(stdout);
  }
  return 0;
}

int main(int argc, char** argv) {
  /* Never outlive the bench runner. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) return 1;
  if (argc >= 2 && strcmp(argv[1], "echo") == 0) return run_echo(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "connect") == 0)
    return run_connect(argc, argv);
  fprintf(stderr, "usage: loadgen echo HOST PORT CONNS MSGSIZE WARMUP_S "
                  "DURATION_S SERVER_PID\n"
                  "       loadgen connect HOST PORT INFLIGHT WARMUP_S "
                  "DURATION_S SERVER_PID\n");
  return 64;
}
