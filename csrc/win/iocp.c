/* iocp.c: the Windows backend, I/O completion ports.
 *
 * How IOCP fits the completion-port contract (fiocp.h). The contract is
 * IOCP's own model, so the mapping is direct:
 * - One kernel completion port per CompletionPort, created with the user's
 *   concurrency value (0: as many running threads as CPUs). register()
 *   associates the handle with completion key KEY_IO; the Python key
 *   travels in the record (op->user), never in the completion key, which
 *   only tells our own packets apart (see the KEY_* values below).
 * - Every record starts with its OVERLAPPED, so a dequeued packet's
 *   lpOverlapped is the record. Records live in slabs that never move, and
 *   the binding frees one only after wait() or drain() handed it back, so an
 *   OVERLAPPED stays valid until its packet has been dequeued, including
 *   after CancelIoEx (CPython #116773, pywin32 #259/#744, twisted #8870 are
 *   what happens otherwise).
 * - Any number of threads dequeue at once with GetQueuedCompletionStatusEx,
 *   a batch per call; the kernel arbitrates, so there is no hub here.
 *
 * Exactly one packet per submission. FILE_SKIP_COMPLETION_PORT_ON_SUCCESS is
 * never set, so a call that succeeds at once still queues its packet, like
 * one that returns ERROR_IO_PENDING. A call that fails at once queues none,
 * with one exception: the I/O manager queues a packet, and writes the
 * status into the OVERLAPPED, for every request that did not fail with an
 * NT error, and an NT *warning* such as STATUS_BUFFER_OVERFLOW makes the
 * Win32 call return FALSE (ERROR_MORE_DATA, WSAEMSGSIZE) all the same
 * (CPython's Modules/overlapped.c treats ERROR_MORE_DATA as pending for
 * this reason). So after an immediate failure we look at the OVERLAPPED
 * (zeroed before the call): a warning status there means a packet is on its
 * way. Otherwise the error belongs either to the arguments (a bad handle or
 * parameter: submit() returns it and the binding raises at once) or to the
 * operation itself (a reset connection, EOF, access denied). The contract
 * delivers the latter in the completion on every platform, so we set
 * op->res and queue the record ourselves with PostQueuedCompletionStatus
 * (KEY_EARLY): exactly one packet again.
 *
 * Reading a dequeued packet. GetQueuedCompletionStatus has three failure
 * shapes: FALSE with no OVERLAPPED (nothing dequeued: a timeout or a broken
 * port), FALSE with an OVERLAPPED (a failed operation was dequeued; key and
 * byte count valid) and ERROR_ABANDONED_WAIT_0 (the port was closed during
 * the wait). GetQueuedCompletionStatusEx keeps the first and the last (it
 * returns FALSE with WAIT_TIMEOUT or the error) and folds the second into
 * success: each entry carries its packet's NTSTATUS (in its Internal
 * field), which Windows also wrote into the OVERLAPPED's Internal field
 * before queueing the packet. A non-zero status is turned into the Win32
 * error with WSAGetOverlappedResult for sockets (which gives Winsock's
 * codes: WSAECONNRESET rather than ERROR_NETNAME_DELETED) or
 * GetOverlappedResult for other handles (RtlNtStatusToDosError inside).
 * ERROR_HANDLE_EOF and ERROR_BROKEN_PIPE on a read are end of file: 0 bytes.
 *
 * Operations whose thread exits. Since Vista, Windows does not cancel the
 * I/O of an exiting thread on a handle associated with a completion port.
 * Wine finishes a socket or pipe operation in an APC run by the submitting
 * thread; when that thread exits as the operation's event comes, the APC
 * is destroyed unrun and the server completes the operation with the APC's
 * STATUS_ALERTED and 0 bytes (thread_apc_destroy() in its server/thread.c),
 * leaving the OVERLAPPED untouched. STATUS_ALERTED is never the final
 * status of a Windows I/O, so such a packet means exactly that, and
 * finish_alerted() sorts it out by kind: a receive never ran (the APC does
 * the recvmsg), so it is started again from the dequeuing thread, as
 * io_uring.c resubmits requests cancelled by the exit of their thread; an
 * accept or connect done by the server is checked for a peer; anything
 * else has an unknown outcome (a pipe read's data went to the lost APC) and
 * completes with ERROR_OPERATION_ABORTED. Python thread pools exit threads.
 *
 * Ctrl-C. The binding loops on FIOCP_EINTR and checks signals in between,
 * but Windows has no EINTR: CPython's SIGINT handler runs in another
 * thread (the console's, or the one that called raise()) and sets a flag
 * and an event that this file, which cannot call into Python, cannot see.
 * So wait() blocks in slices of at most SLICE_MS and returns FIOCP_EINTR
 * after a slice that dequeued nothing and did not reach the caller's
 * deadline; the binding then runs the signal handlers (on the main
 * thread: KeyboardInterrupt) and calls wait() again with the time left.
 * Ctrl-C therefore takes effect within SLICE_MS. Other threads make the
 * same round trip, which costs one GIL acquisition per slice while idle.
 *
 * Close. shutdown() marks the port closed, calls CancelIoEx on every record
 * in flight, and queues one KEY_WAKE packet per thread blocked in wait()
 * (threads that consume more than their share top the count up, and the
 * slices above are the backstop). A thread that dequeues anything once the
 * port is closed moves the records to the drain queue and returns
 * FIOCP_ECLOSED. shutdown() then dequeues, bounded by its timeout, until
 * every packet it is owed has arrived; drain() hands those records back,
 * and destroy() closes the port, which by then holds at most wake packets,
 * which carry no OVERLAPPED.
 *
 * Lock order: mu is a leaf lock; no Win32 call made under it blocks.
 */
#include "../fiocp.h"

#include <mswsock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef WSA_FLAG_NO_HANDLE_INHERIT
# define WSA_FLAG_NO_HANDLE_INHERIT 0x80
#endif
#ifndef ERROR_HANDLES_CLOSED
# define ERROR_HANDLES_CLOSED 676L  /* from STATUS_HANDLES_CLOSED */
#endif

/* Completion keys. Associated handles get KEY_IO; the others mark packets
 * that this file queues itself. */
#define KEY_IO 0     /* an operation on an associated handle */
#define KEY_POST 1   /* post(): op->res holds the user's nbytes */
#define KEY_EARLY 2  /* an operation that failed at once: op->res is set */
#define KEY_WAKE 3   /* close() waking a waiter: no record */

/* Longest single block in GetQueuedCompletionStatusEx (see the head
 * comment on Ctrl-C). */
#define SLICE_MS 100
/* Most packets taken by one GetQueuedCompletionStatusEx call. */
#define BATCH 128

/* NTSTATUS severities, from the top two bits: 2 is a warning (e.g.
 * STATUS_BUFFER_OVERFLOW, 0x80000005), 3 an error. */
#define NT_SEVERITY(st) (((ULONG)(st)) >> 30)
/* The NTSTATUS values this file looks at (ntstatus.h clashes with
 * windows.h, hence our own names). */
#define IOCP_STATUS_ALERTED 0x00000101UL

typedef struct iocp_s {
  HANDLE port;
  CRITICAL_SECTION mu;  /* guards everything below and records' state */
  int closed;
  int nwaiters;         /* threads inside wait() */
  int wakes;            /* KEY_WAKE packets queued, not yet dequeued */
  int64_t owed;         /* records whose packet is not dequeued yet */
  fiocp_op_t* head;     /* records dequeued after close, for drain() */
  fiocp_op_t* tail;
  /* Handles this port associated (open addressing, 0 = empty slot), to
   * accept a register() after unregister() of the same handle: a handle
   * stays associated with its port until it is closed. */
  uintptr_t* assoc;
  size_t assoc_cap;
  size_t assoc_len;
} iocp_t;

/* ---- Winsock extension functions ----------------------------------------
 * AcceptEx, ConnectEx and GetAcceptExSockaddrs are reached through
 * WSAIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER) on a socket. The pointers
 * belong to the provider (mswsock for every Microsoft one); like CPython's
 * overlapped.c and libuv we load them once per process, from the first
 * socket that needs them. Racing loads store the same values. */

static LPFN_ACCEPTEX acceptex_fn;
static LPFN_CONNECTEX connectex_fn;
static LPFN_GETACCEPTEXSOCKADDRS getsockaddrs_fn;

static DWORD load_one(SOCKET s, GUID guid, void** slot) {
  void* fn = NULL;
  DWORD bytes = 0;
  if (InterlockedCompareExchangePointer(slot, NULL, NULL) != NULL) return 0;
  if (WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &guid, sizeof(guid),
               &fn, sizeof(fn), &bytes, NULL, NULL) != 0)
    return (DWORD)WSAGetLastError();
  if (fn == NULL) return WSAEOPNOTSUPP;
  InterlockedExchangePointer(slot, fn);
  return 0;
}

static DWORD load_extensions(SOCKET s) {
  static const GUID acceptex_guid = WSAID_ACCEPTEX;
  static const GUID connectex_guid = WSAID_CONNECTEX;
  static const GUID sockaddrs_guid = WSAID_GETACCEPTEXSOCKADDRS;
  DWORD err = load_one(s, acceptex_guid, (void**)&acceptex_fn);
  if (err == 0) err = load_one(s, connectex_guid, (void**)&connectex_fn);
  if (err == 0) err = load_one(s, sockaddrs_guid, (void**)&getsockaddrs_fn);
  return err;
}

/* ---- Associated handles -------------------------------------------------- */

static size_t assoc_slot(uintptr_t h, size_t cap) {
  /* Handles are multiples of 4: mix the bits before masking. */
  uint64_t x = (uint64_t)h * 0x9E3779B97F4A7C15ULL;
  return (size_t)(x >> 32) & (cap - 1);
}

static int assoc_contains(const iocp_t* ip, uintptr_t h) {
  size_t i;
  if (ip->assoc_cap == 0) return 0;
  for (i = assoc_slot(h, ip->assoc_cap); ip->assoc[i] != 0;
       i = (i + 1) & (ip->assoc_cap - 1))
    if (ip->assoc[i] == h) return 1;
  return 0;
}

/* Records h. A failure to grow only loses the hint that lets the same
 * handle register again after unregister(); it is not an error. */
static void assoc_add(iocp_t* ip, uintptr_t h) {
  size_t i;
  if (h == 0 || assoc_contains(ip, h)) return;
  if (2 * (ip->assoc_len + 1) > ip->assoc_cap) {
    size_t cap = ip->assoc_cap ? 2 * ip->assoc_cap : 64, j;
    uintptr_t* tab = (uintptr_t*)calloc(cap, sizeof(uintptr_t));
    if (tab == NULL) return;
    for (j = 0; j < ip->assoc_cap; j++) {
      if (ip->assoc[j] == 0) continue;
      for (i = assoc_slot(ip->assoc[j], cap); tab[i] != 0;
           i = (i + 1) & (cap - 1)) {
      }
      tab[i] = ip->assoc[j];
    }
    free(ip->assoc);
    ip->assoc = tab;
    ip->assoc_cap = cap;
  }
  for (i = assoc_slot(h, ip->assoc_cap); ip->assoc[i] != 0;
       i = (i + 1) & (ip->assoc_cap - 1)) {
  }
  ip->assoc[i] = h;
  ip->assoc_len++;
}

/* ---- Results ------------------------------------------------------------- */

static int is_socket_op(uint8_t kind) {
  return kind != FIOCP_OP_READ && kind != FIOCP_OP_WRITE;
}

/* The Win32 error of a dequeued operation whose NTSTATUS is not zero, or 0
 * if that status counts as success. */
static DWORD packet_error(fiocp_op_t* op) {
  DWORD n = 0, flags = 0, err;
  if (is_socket_op(op->kind)) {
    if (WSAGetOverlappedResult((SOCKET)op->handle, &op->ov, &n, FALSE,
                               &flags))
      return 0;
    err = (DWORD)WSAGetLastError();
    /* WSAGetOverlappedResult looks the socket up first: if the user closed
     * it meanwhile, fall back to the generic mapping of the status. */
    if (err != WSAENOTSOCK && err != WSA_INVALID_HANDLE &&
        err != WSA_IO_INCOMPLETE && err != 0)
      return err;
  }
  /* With bWait FALSE and a status other than STATUS_PENDING in the
   * OVERLAPPED, GetOverlappedResult only reads the OVERLAPPED: the handle
   * need not be valid any more. */
  if (GetOverlappedResult((HANDLE)op->handle, &op->ov, &n, FALSE)) return 0;
  err = GetLastError();
  return err != 0 ? err : ERROR_GEN_FAILURE;
}

/* Turns a failed or finished AcceptEx into the contract's result: the new
 * SOCKET and the peer's address, or the error (the socket is closed). */
static int64_t finish_accept(fiocp_op_t* op, int64_t res) {
  fiocp_addr_t* a = op->addr;
  SOCKET ls = (SOCKET)op->handle, as = a->accept_sock;
  a->accept_sock = INVALID_SOCKET;
  if (as == INVALID_SOCKET) return res < 0 ? res : -(int64_t)WSAENOTSOCK;
  if (res >= 0 && setsockopt(as, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT,
                             (char*)&ls, (int)sizeof(ls)) != 0)
    res = -(int64_t)WSAGetLastError();
  if (res < 0) {
    closesocket(as);
    return res;
  }
  {
    DWORD alen = (DWORD)(sizeof(struct sockaddr_storage) + 16);
    struct sockaddr *local = NULL, *remote = NULL;
    int llen = 0, rlen = 0;
    getsockaddrs_fn(a->accept_buf, 0, alen, alen, &local, &llen, &remote,
                    &rlen);
    if (remote != NULL && rlen > 0 && (size_t)rlen <= sizeof(a->ss)) {
      memcpy(&a->ss, remote, (size_t)rlen);
      a->sslen = rlen;
    } else {
      a->sslen = 0;  /* the binding reports the address as None */
    }
  }
  return (int64_t)as;
}

static int64_t finish_connect(fiocp_op_t* op, int64_t res) {
  if (res < 0) return res;
  /* Without this, getpeername(), shutdown() and friends fail on a socket
   * connected by ConnectEx. */
  if (setsockopt((SOCKET)op->handle, SOL_SOCKET, SO_UPDATE_CONNECT_CONTEXT,
                 NULL, 0) != 0)
    return -(int64_t)WSAGetLastError();
  return 0;
}

/* The result of an operation that ended with err (0: success) after
 * transferring bytes. */
static int64_t op_result(fiocp_op_t* op, DWORD err, DWORD bytes) {
  int64_t res;
  /* An operation still pending when its handle is closed is cancelled:
   * Windows completes it with STATUS_CANCELLED (closesocket() documents
   * WSA_OPERATION_ABORTED), Wine with STATUS_HANDLES_CLOSED. */
  if (err == ERROR_HANDLES_CLOSED) err = ERROR_OPERATION_ABORTED;
  res = err == 0 ? (int64_t)bytes : -(int64_t)err;
  switch (op->kind) {
    case FIOCP_OP_READ:
      /* End of file and a pipe whose writer closed are EOF, not errors. A
       * message-mode pipe reports the rest of a long message as
       * ERROR_MORE_DATA: for a byte stream that is a short read. */
      if (err == ERROR_HANDLE_EOF || err == ERROR_BROKEN_PIPE) res = 0;
      else if (err == ERROR_MORE_DATA) res = (int64_t)bytes;
      break;
    case FIOCP_OP_ACCEPT:
      res = finish_accept(op, res);
      break;
    case FIOCP_OP_CONNECT:
      res = finish_connect(op, res);
      break;
    default:
      break;
  }
  return res;
}

/* ---- Dequeue ------------------------------------------------------------- */

/* Wakes waiters after close: keeps one KEY_WAKE packet queued per thread
 * still blocked in wait(). mu held. */
static void top_up_wakes_locked(iocp_t* ip) {
  if (!ip->closed) return;
  while (ip->wakes < ip->nwaiters) {
    if (!PostQueuedCompletionStatus(ip->port, 0, KEY_WAKE, NULL))
      break;  /* out of memory: the waiters' slices end the wait anyway */
    ip->wakes++;
  }
}

static int finish_alerted(iocp_t* ip, fiocp_op_t* op);

/* Turns n dequeued entries into finished records. While the port is open
 * they go to out (which has room for n) and the count is returned; once it
 * is closed they go to the drain queue and FIOCP_ECLOSED is returned. */
static int take_entries(iocp_t* ip, OVERLAPPED_ENTRY* ents, ULONG n,
                        fiocp_op_t** out) {
  ULONG i;
  int k = 0, wakes = 0, j;
  /* The per-record work (error mapping, accept and connect contexts) needs
   * no lock: until its state changes below, nobody else touches a record
   * but cancel(), which tolerates a completed operation. */
  for (i = 0; i < n; i++) {
    fiocp_op_t* op = (fiocp_op_t*)ents[i].lpOverlapped;
    ULONG_PTR key = ents[i].lpCompletionKey;
    if (key == KEY_WAKE) {
      wakes++;
      continue;
    }
    /* Nobody else can queue to this private port: a packet without a
     * record or with another key is a bug, and has nothing to return. */
    if (op == NULL || (key != KEY_IO && key != KEY_POST && key != KEY_EARLY))
      continue;
    if (key == KEY_IO) {
      /* The entry's Internal field is the packet's own status (the layout
       * is FILE_IO_COMPLETION_INFORMATION's), the same as the one in the
       * OVERLAPPED, which Windows writes before it queues the packet. */
      ULONG pst = (ULONG)ents[i].Internal;
      DWORD bytes = ents[i].dwNumberOfBytesTransferred;
      if (pst == IOCP_STATUS_ALERTED && finish_alerted(ip, op))
        continue;  /* started again: its packet will come */
      if (pst != IOCP_STATUS_ALERTED) {
        if ((ULONG)op->ov.Internal != pst) {
          /* Not written back (Wine: see the head comment on exiting
           * threads). The packet is the truth; packet_error() reads the
           * OVERLAPPED, so copy it there. */
          op->ov.Internal = (ULONG_PTR)pst;
          op->ov.InternalHigh = bytes;
        }
        op->res = op_result(op, pst == 0 ? 0 : packet_error(op), bytes);
      }
    }
    /* KEY_POST and KEY_EARLY: op->res was set before queueing. */
    out[k++] = op;
  }
  EnterCriticalSection(&ip->mu);
  ip->wakes -= wakes;
  ip->owed -= k;
  for (j = 0; j < k; j++) {
    out[j]->state = FIOCP_ST_DONE;
    out[j]->next = NULL;
  }
  if (ip->closed) {
    for (j = 0; j < k; j++) {
      if (ip->tail) ip->tail->next = out[j];
      else ip->head = out[j];
      ip->tail = out[j];
    }
    LeaveCriticalSection(&ip->mu);
    return FIOCP_ECLOSED;
  }
  LeaveCriticalSection(&ip->mu);
  return k;
}

/* ---- Submission ---------------------------------------------------------- */

/* Issues op. Returns 0 if the OS took it (a packet will come), or the Win32
 * error with which it failed at once. */
static DWORD start_read_write(fiocp_op_t* op) {
  HANDLE h = (HANDLE)op->handle;
  BOOL ok;
  if (op->offset >= 0) {
    op->ov.Offset = (DWORD)((uint64_t)op->offset & 0xffffffffu);
    op->ov.OffsetHigh = (DWORD)((uint64_t)op->offset >> 32);
  } else {
    /* "The current position". Pipes, consoles and sockets have none and
     * ignore the offset. A disk file opened for overlapped I/O has no file
     * pointer either: a write goes to its end (FILE_WRITE_TO_END_OF_FILE,
     * which is what offset=None means in append mode on Linux), and a read
     * has nowhere to start, a bad argument. */
    DWORD type = GetFileType(h);
    if (type == FILE_TYPE_UNKNOWN && GetLastError() != NO_ERROR)
      return GetLastError();
    if (type == FILE_TYPE_DISK) {
      if (op->kind == FIOCP_OP_READ) return ERROR_INVALID_PARAMETER;
      op->ov.Offset = 0xffffffffu;
      op->ov.OffsetHigh = 0xffffffffu;
    }
  }
  if (op->kind == FIOCP_OP_READ)
    ok = ReadFile(h, op->buf, op->len, NULL, &op->ov);
  else
    ok = WriteFile(h, op->buf, op->len, NULL, &op->ov);
  return ok ? 0 : GetLastError();
}

static DWORD start_accept(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  SOCKET ls = (SOCKET)op->handle, as;
  WSAPROTOCOL_INFOW info;
  int ilen = (int)sizeof(info);
  DWORD alen = (DWORD)(sizeof(struct sockaddr_storage) + 16), err;
  a->accept_sock = INVALID_SOCKET;
  err = load_extensions(ls);
  if (err != 0) return err;
  /* The accepted connection needs a socket made in advance, of the
   * listener's family, type and protocol. */
  if (getsockopt(ls, SOL_SOCKET, SO_PROTOCOL_INFOW, (char*)&info, &ilen) != 0)
    return (DWORD)WSAGetLastError();
  as = WSASocketW(info.iAddressFamily, info.iSocketType, info.iProtocol, NULL,
                  0, WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
  if (as == INVALID_SOCKET) return (DWORD)WSAGetLastError();
  a->accept_sock = as;
  if (!acceptex_fn(ls, as, a->accept_buf, 0, alen, alen, NULL, &op->ov))
    return (DWORD)WSAGetLastError();
  return 0;
}

static DWORD start_connect(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  SOCKET s = (SOCKET)op->handle;
  struct sockaddr_storage local;
  int llen = (int)sizeof(local);
  DWORD err = load_extensions(s);
  if (err != 0) return err;
  if (getsockname(s, (struct sockaddr*)&local, &llen) != 0) {
    err = (DWORD)WSAGetLastError();
    if (err != WSAEINVAL) return err;
    /* Not bound yet. ConnectEx needs a bound socket, where connect() binds
     * implicitly: bind to the wildcard address of the family, port 0. */
    memset(&local, 0, sizeof(local));
    local.ss_family = a->ss.ss_family;
    if (a->ss.ss_family == AF_INET) llen = (int)sizeof(struct sockaddr_in);
    else if (a->ss.ss_family == AF_INET6)
      llen = (int)sizeof(struct sockaddr_in6);
    else return WSAEAFNOSUPPORT;
    if (bind(s, (struct sockaddr*)&local, llen) != 0)
      return (DWORD)WSAGetLastError();
  }
  if (!connectex_fn(s, (struct sockaddr*)&a->ss, a->sslen, NULL, 0, NULL,
                    &op->ov))
    return (DWORD)WSAGetLastError();
  return 0;
}

static DWORD start_op(fiocp_op_t* op) {
  SOCKET s = (SOCKET)op->handle;
  WSABUF wb;
  int rc;
  memset(&op->ov, 0, sizeof(op->ov));
  wb.len = op->len;
  wb.buf = op->buf;
  switch (op->kind) {
    case FIOCP_OP_READ:
    case FIOCP_OP_WRITE:
      return start_read_write(op);
    case FIOCP_OP_RECV:
      /* The flags word must outlive the call (the provider may update it
       * at completion): keep it in the record's backend scratch. */
      op->bk = 0;
      rc = WSARecv(s, &wb, 1, NULL, (DWORD*)&op->bk, &op->ov, NULL);
      break;
    case FIOCP_OP_SEND:
      rc = WSASend(s, &wb, 1, NULL, 0, &op->ov, NULL);
      break;
    case FIOCP_OP_RECVFROM:
      op->addr->wsabuf = wb;
      op->addr->wsaflags = 0;
      op->addr->sslen = (fiocp_socklen_t)sizeof(op->addr->ss);
      rc = WSARecvFrom(s, &op->addr->wsabuf, 1, NULL, &op->addr->wsaflags,
                       (struct sockaddr*)&op->addr->ss, &op->addr->sslen,
                       &op->ov, NULL);
      break;
    case FIOCP_OP_SENDTO:
      op->addr->wsabuf = wb;
      rc = WSASendTo(s, &op->addr->wsabuf, 1, NULL, 0,
                     (struct sockaddr*)&op->addr->ss, op->addr->sslen,
                     &op->ov, NULL);
      break;
    case FIOCP_OP_ACCEPT:
      return start_accept(op);
    case FIOCP_OP_CONNECT:
      return start_connect(op);
    default:
      return ERROR_INVALID_PARAMETER;
  }
  return rc == 0 ? 0 : (DWORD)WSAGetLastError();
}

/* Errors that blame the arguments rather than the operation: submit()
 * returns them and the binding raises at once. */
static int is_argument_error(DWORD err) {
  switch (err) {
    case ERROR_INVALID_HANDLE:     /* also WSA_INVALID_HANDLE */
    case ERROR_INVALID_PARAMETER:  /* also WSA_INVALID_PARAMETER */
    case ERROR_NOACCESS:           /* a buffer the OS cannot touch */
    case WSAENOTSOCK:
    case WSAEFAULT:
      return 1;
    default:
      return 0;
  }
}

/* Starts again a receive or accept that completed without having run (see
 * the head comment on exiting threads). Returns 1 if it is in flight again (a
 * packet will come), 0 if it ends now with op->res set: cancelled (by the
 * user or close()), or failed when started again. */
static int restart_op(iocp_t* ip, fiocp_op_t* op) {
  DWORD err;
  int stop;
  /* Under mu, cancel() and shutdown() either see the old OVERLAPPED
   * (then the CANCELLED flag or the closed port stops us) or the new one
   * (then CancelIoEx reaches it). */
  EnterCriticalSection(&ip->mu);
  stop = ip->closed || (op->flags & FIOCP_OPF_CANCELLED);
  if (stop) {
    err = ERROR_OPERATION_ABORTED;
  } else {
    if (op->kind == FIOCP_OP_ACCEPT &&
        op->addr->accept_sock != INVALID_SOCKET) {
      closesocket(op->addr->accept_sock);  /* start_accept makes another */
      op->addr->accept_sock = INVALID_SOCKET;
    }
    err = start_op(op);
  }
  LeaveCriticalSection(&ip->mu);
  if (!stop && (err == 0 || err == ERROR_IO_PENDING ||
                NT_SEVERITY(op->ov.Internal) == 2))
    return 1;
  op->res = op_result(op, err, 0);
  return 0;
}

/* Handles a packet with STATUS_ALERTED (see the head comment on exiting
 * threads). Returns 1 if op was started again (a packet will come), 0 if
 * it ends now with op->res set. */
static int finish_alerted(iocp_t* ip, fiocp_op_t* op) {
  struct sockaddr_storage ss;
  int len = (int)sizeof(ss);
  switch (op->kind) {
    case FIOCP_OP_RECV:
    case FIOCP_OP_RECVFROM:
      return restart_op(ip, op);
    case FIOCP_OP_ACCEPT: {
      fiocp_addr_t* a = op->addr;
      SOCKET ls = (SOCKET)op->handle, as = a->accept_sock;
      if (as == INVALID_SOCKET ||
          getpeername(as, (struct sockaddr*)&ss, &len) != 0)
        return restart_op(ip, op);  /* nothing was accepted */
      /* Accepted; only the report, with the address buffer, was lost. */
      a->accept_sock = INVALID_SOCKET;
      if (setsockopt(as, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT, (char*)&ls,
                     (int)sizeof(ls)) != 0) {
        op->res = -(int64_t)WSAGetLastError();
        closesocket(as);
        return 0;
      }
      memcpy(&a->ss, &ss, (size_t)len);
      a->sslen = len;
      op->res = (int64_t)as;
      return 0;
    }
    case FIOCP_OP_CONNECT:
      /* Connected or not: a connect still in progress cannot be waited
       * for from here, and starting another would fail. */
      op->res = op_result(op,
                          getpeername((SOCKET)op->handle,
                                      (struct sockaddr*)&ss, &len) == 0
                              ? 0
                              : ERROR_OPERATION_ABORTED,
                          0);
      return 0;
    default:
      op->res = op_result(op, ERROR_OPERATION_ABORTED, 0);
      return 0;
  }
}

/* ---- Contract ------------------------------------------------------------ */

static int iocp_probe(char* why, size_t whylen) {
  HANDLE p = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 1);
  if (p == NULL) {
    DWORD err = GetLastError();
    snprintf(why, whylen, "CreateIoCompletionPort failed with error %lu",
             (unsigned long)err);
    return -(int)err;
  }
  if (!CloseHandle(p)) {
    DWORD err = GetLastError();
    snprintf(why, whylen, "CloseHandle of a completion port failed with "
             "error %lu", (unsigned long)err);
    return -(int)err;
  }
  return 0;
}

static int iocp_init(fiocp_port_t* port, unsigned entries,
                     unsigned concurrency, char* why, size_t whylen) {
  iocp_t* ip = (iocp_t*)calloc(1, sizeof(*ip));
  (void)entries;  /* an IOCP queue has no fixed size */
  if (ip == NULL) {
    snprintf(why, whylen, "out of memory");
    return FIOCP_ENOMEM;
  }
  ip->port = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0,
                                    (DWORD)concurrency);
  if (ip->port == NULL) {
    DWORD err = GetLastError();
    snprintf(why, whylen, "CreateIoCompletionPort failed with error %lu",
             (unsigned long)err);
    free(ip);
    return -(int)err;
  }
  /* Cannot fail since Windows Vista. */
  InitializeCriticalSection(&ip->mu);
  port->impl = ip;
  return 0;
}

static int iocp_associate(fiocp_port_t* port, fiocp_handle_t h) {
  iocp_t* ip = (iocp_t*)port->impl;
  DWORD err;
  int known;
  if (CreateIoCompletionPort((HANDLE)h, ip->port, KEY_IO, 0) != NULL) {
    EnterCriticalSection(&ip->mu);
    assoc_add(ip, (uintptr_t)h);
    LeaveCriticalSection(&ip->mu);
    return 0;
  }
  err = GetLastError();
  /* A handle stays associated until it is closed, and a second association
   * fails with ERROR_INVALID_PARAMETER: fine if it is with this port (the
   * handle was unregistered and is registered again). */
  EnterCriticalSection(&ip->mu);
  known = assoc_contains(ip, (uintptr_t)h);
  LeaveCriticalSection(&ip->mu);
  if (err == ERROR_INVALID_PARAMETER && known) return 0;
  return -(int)err;
}

static int iocp_submit(fiocp_port_t* port, fiocp_op_t* op, int defer) {
  iocp_t* ip = (iocp_t*)port->impl;
  DWORD err;
  (void)defer;  /* every submission is one system call already */
  EnterCriticalSection(&ip->mu);
  if (ip->closed) {
    LeaveCriticalSection(&ip->mu);
    return FIOCP_ECLOSED;
  }
  ip->owed++;
  LeaveCriticalSection(&ip->mu);
  err = start_op(op);
  /* Success and ERROR_IO_PENDING both queue a packet, and so does a
   * warning status (see the head comment). From here on another thread
   * may already own the record: do not touch it. */
  if (err == 0 || err == ERROR_IO_PENDING ||
      NT_SEVERITY(op->ov.Internal) == 2)
    return 0;
  if (!is_argument_error(err)) {
    /* The operation itself failed: deliver that as its completion. */
    op->res = op_result(op, err, 0);
    if (PostQueuedCompletionStatus(ip->port, 0, KEY_EARLY, &op->ov))
      return 0;
    /* Out of memory for the packet: raise the operation's error now. */
  } else if (op->kind == FIOCP_OP_ACCEPT &&
             op->addr->accept_sock != INVALID_SOCKET) {
    closesocket(op->addr->accept_sock);
    op->addr->accept_sock = INVALID_SOCKET;
  }
  EnterCriticalSection(&ip->mu);
  ip->owed--;
  LeaveCriticalSection(&ip->mu);
  return -(int)err;
}

static int iocp_flush(fiocp_port_t* port) {
  (void)port;
  return 0;  /* nothing is ever deferred */
}

static int iocp_cancel(fiocp_port_t* port, fiocp_op_t* op) {
  iocp_t* ip = (iocp_t*)port->impl;
  BOOL ok;
  DWORD err = 0;
  EnterCriticalSection(&ip->mu);
  if (op->state != FIOCP_ST_INFLIGHT || op->kind == FIOCP_OP_POST) {
    LeaveCriticalSection(&ip->mu);
    return 0;
  }
  op->flags |= FIOCP_OPF_CANCELLED;
  /* Under mu the record cannot be handed back (and reused) meanwhile. */
  ok = CancelIoEx((HANDLE)op->handle, &op->ov);
  if (!ok) err = GetLastError();
  LeaveCriticalSection(&ip->mu);
  if (ok) return 1;
  /* ERROR_NOT_FOUND: it completed already (or failed at once and its
   * KEY_EARLY packet is queued). ERROR_INVALID_HANDLE: the handle was
   * closed, which cancelled it. Either way its packet is coming. */
  if (err == ERROR_NOT_FOUND || err == ERROR_INVALID_HANDLE) return 0;
  return -(int)err;
}

static int iocp_try_get(fiocp_port_t* port, fiocp_op_t** out, int max) {
  iocp_t* ip = (iocp_t*)port->impl;
  OVERLAPPED_ENTRY ents[BATCH];
  ULONG n = 0, want = max < BATCH ? (ULONG)max : BATCH;
  int rc;
  EnterCriticalSection(&ip->mu);
  rc = ip->closed;
  LeaveCriticalSection(&ip->mu);
  if (rc) return FIOCP_ECLOSED;
  if (!GetQueuedCompletionStatusEx(ip->port, ents, want, &n, 0, FALSE)) {
    DWORD err = GetLastError();
    if (err == WAIT_TIMEOUT) return 0;
    if (err == ERROR_ABANDONED_WAIT_0) return FIOCP_ECLOSED;
    return -(int)err;
  }
  rc = take_entries(ip, ents, n, out);
  if (rc == FIOCP_ECLOSED) {
    /* Closed meanwhile: wake packets this thread took belong to waiters. */
    EnterCriticalSection(&ip->mu);
    top_up_wakes_locked(ip);
    LeaveCriticalSection(&ip->mu);
  }
  return rc;
}

static int iocp_wait(fiocp_port_t* port, fiocp_op_t** out, int max,
                     int64_t timeout_ms) {
  iocp_t* ip = (iocp_t*)port->impl;
  OVERLAPPED_ENTRY ents[BATCH];
  ULONG n, want = max < BATCH ? (ULONG)max : BATCH;
  int64_t deadline = timeout_ms < 0 ? -1 : fiocp__now_ms() + timeout_ms;
  int rc;
  EnterCriticalSection(&ip->mu);
  if (ip->closed) {
    LeaveCriticalSection(&ip->mu);
    return FIOCP_ECLOSED;
  }
  ip->nwaiters++;
  LeaveCriticalSection(&ip->mu);
  for (;;) {
    int64_t left = fiocp__remaining_ms(deadline);
    DWORD slice = left < 0 || left > SLICE_MS ? SLICE_MS : (DWORD)left;
    n = 0;
    if (!GetQueuedCompletionStatusEx(ip->port, ents, want, &n, slice,
                                     FALSE)) {
      DWORD err = GetLastError();
      if (err == WAIT_TIMEOUT) {
        /* Nothing dequeued: the deadline, or the end of a slice, when the
         * caller checks for Ctrl-C and calls again (see the head comment).
         * A closed flag without a wake packet for us ends the wait too. */
        EnterCriticalSection(&ip->mu);
        rc = ip->closed;
        LeaveCriticalSection(&ip->mu);
        if (rc) rc = FIOCP_ECLOSED;
        else rc = fiocp__remaining_ms(deadline) == 0 ? 0 : FIOCP_EINTR;
      } else if (err == ERROR_ABANDONED_WAIT_0) {
        rc = FIOCP_ECLOSED;  /* the port handle was closed under us */
      } else {
        rc = -(int)err;
      }
      break;
    }
    rc = take_entries(ip, ents, n, out);
    if (rc != 0) break;
    /* Nothing but packets without a record, which only a bug could queue
     * while the port is open: wait again for the time left. */
  }
  EnterCriticalSection(&ip->mu);
  ip->nwaiters--;
  top_up_wakes_locked(ip);
  LeaveCriticalSection(&ip->mu);
  return rc;
}

static int iocp_post(fiocp_port_t* port, fiocp_op_t* op) {
  iocp_t* ip = (iocp_t*)port->impl;
  EnterCriticalSection(&ip->mu);
  if (ip->closed) {
    LeaveCriticalSection(&ip->mu);
    return FIOCP_ECLOSED;
  }
  ip->owed++;
  LeaveCriticalSection(&ip->mu);
  memset(&op->ov, 0, sizeof(op->ov));
  if (!PostQueuedCompletionStatus(ip->port, (DWORD)op->res, KEY_POST,
                                  &op->ov)) {
    DWORD err = GetLastError();
    EnterCriticalSection(&ip->mu);
    ip->owed--;
    LeaveCriticalSection(&ip->mu);
    return -(int)err;
  }
  return 0;
}

static void cancel_one(fiocp_port_t* port, fiocp_op_t* op, void* arg) {
  (void)port;
  (void)arg;
  if (op->kind == FIOCP_OP_POST) return;
  op->flags |= FIOCP_OPF_CANCELLED;
  /* Fails with ERROR_NOT_FOUND for an operation that already completed and
   * whose packet is queued: nothing to do then. */
  (void)CancelIoEx((HANDLE)op->handle, &op->ov);
}

static int64_t iocp_shutdown(fiocp_port_t* port, int64_t timeout_ms) {
  iocp_t* ip = (iocp_t*)port->impl;
  int64_t deadline = timeout_ms < 0 ? -1 : fiocp__now_ms() + timeout_ms;
  OVERLAPPED_ENTRY ents[BATCH];
  fiocp_op_t* sink[BATCH];
  EnterCriticalSection(&ip->mu);
  if (!ip->closed) {
    /* First call, GIL held: the slabs cannot grow, and states only change
     * under mu. */
    ip->closed = 1;
    fiocp__foreach_inflight(port, cancel_one, NULL);
    top_up_wakes_locked(ip);
  }
  LeaveCriticalSection(&ip->mu);
  for (;;) {
    int64_t owed, left;
    int nwaiters;
    ULONG n = 0;
    DWORD slice;
    EnterCriticalSection(&ip->mu);
    owed = ip->owed;
    nwaiters = ip->nwaiters;
    LeaveCriticalSection(&ip->mu);
    if (owed <= 0) return 0;
    left = fiocp__remaining_ms(deadline);
    if (left == 0) return owed;
    if (nwaiters > 0) {
      /* The waiters are leaving (each has or will get a wake packet, or
       * ends its slice) and move what they dequeue to the drain queue.
       * Dequeuing here now would only steal their wake packets. */
      Sleep(1);
      continue;
    }
    slice = left < 0 || left > 50 ? 50 : (DWORD)left;
    if (!GetQueuedCompletionStatusEx(ip->port, ents, BATCH, &n, slice,
                                     FALSE)) {
      DWORD err = GetLastError();
      if (err != WAIT_TIMEOUT) return owed;  /* the port itself is broken */
      continue;
    }
    /* Records go to the drain queue (the port is closed); leftover wake
     * packets are dropped. */
    (void)take_entries(ip, ents, n, sink);
  }
}

static int iocp_drain(fiocp_port_t* port, fiocp_op_t** out, int max) {
  iocp_t* ip = (iocp_t*)port->impl;
  int n = 0;
  EnterCriticalSection(&ip->mu);
  while (n < max && ip->head != NULL) {
    fiocp_op_t* op = ip->head;
    ip->head = op->next;
    op->next = NULL;
    out[n++] = op;
  }
  if (ip->head == NULL) ip->tail = NULL;
  LeaveCriticalSection(&ip->mu);
  return n;
}

static void iocp_destroy(fiocp_port_t* port) {
  iocp_t* ip = (iocp_t*)port->impl;
  OVERLAPPED_ENTRY ents[BATCH];
  ULONG n = 0;
  if (ip == NULL) return;
  /* Only called once nothing is owed: what is left is wake packets, which
   * carry no OVERLAPPED. Dequeue them anyway rather than leave packets in a
   * port being closed. */
  while (GetQueuedCompletionStatusEx(ip->port, ents, BATCH, &n, 0, FALSE) &&
         n > 0) {
  }
  (void)CloseHandle(ip->port);  /* nothing useful to do if it fails */
  DeleteCriticalSection(&ip->mu);
  free(ip->assoc);
  free(ip);
  port->impl = NULL;
}

/* release is NULL: the kernel enforces the concurrency value itself, by
 * counting the threads that dequeued from the port and are running. */
const fiocp_backend_t fiocp__iocp_backend = {
    "iocp",      iocp_probe,   iocp_init,     iocp_associate,
    iocp_submit, iocp_flush,   iocp_cancel,   iocp_try_get,
    iocp_wait,   iocp_post,    iocp_shutdown, iocp_drain,
    iocp_destroy, NULL,
};

/* ---- Windows file helpers --------------------------------------------------
 * The OS half of fastiocp.open() on Windows (src/fastiocp/_files.py); the
 * binding wraps them. Each returns 0 or -winerror. */

int fiocp__win_open(const wchar_t* path, int readable, int writable,
                    int kind, int direct, fiocp_handle_t* out) {
  DWORD access = 0, disposition;
  DWORD flags = FILE_ATTRIBUTE_NORMAL | FILE_FLAG_OVERLAPPED;
  HANDLE h;
  switch (kind) {
    case 'r': disposition = OPEN_EXISTING; break;
    case 'w': disposition = CREATE_ALWAYS; break;  /* truncates */
    case 'a': disposition = OPEN_ALWAYS; break;
    case 'x': disposition = CREATE_NEW; break;
    default: return -(int)ERROR_INVALID_PARAMETER;
  }
  if (readable) access |= GENERIC_READ;
  if (writable && kind == 'a') {
    /* Append mode: FILE_APPEND_DATA without FILE_WRITE_DATA makes the OS
     * put every write at the end of the file, whatever its offset, as
     * O_APPEND does on Linux. (Changing the size with truncate() then needs
     * FILE_WRITE_DATA and fails with access denied.) */
    access |= FILE_GENERIC_WRITE & ~(DWORD)FILE_WRITE_DATA;
  } else if (writable) {
    access |= GENERIC_WRITE;
  }
  if (direct) flags |= FILE_FLAG_NO_BUFFERING;
  /* Shared for reading, writing and deletion, as POSIX files are. Not
   * inheritable (no SECURITY_ATTRIBUTES), as CPython's own files. */
  h = CreateFileW(path, access,
                  FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
                  NULL, disposition, flags, NULL);
  if (h == INVALID_HANDLE_VALUE) return -(int)GetLastError();
  *out = (fiocp_handle_t)h;
  return 0;
}

int fiocp__win_close_handle(fiocp_handle_t h) {
  return CloseHandle((HANDLE)h) ? 0 : -(int)GetLastError();
}

int fiocp__win_file_size(fiocp_handle_t h, int64_t* size) {
  LARGE_INTEGER li;
  if (!GetFileSizeEx((HANDLE)h, &li)) return -(int)GetLastError();
  *size = (int64_t)li.QuadPart;
  return 0;
}

int fiocp__win_truncate(fiocp_handle_t h, int64_t size) {
  FILE_END_OF_FILE_INFO info;
  if (size < 0) return -(int)ERROR_NEGATIVE_SEEK;
  info.EndOfFile.QuadPart = (LONGLONG)size;
  if (!SetFileInformationByHandle((HANDLE)h, FileEndOfFileInfo, &info,
                                  (DWORD)sizeof(info)))
    return -(int)GetLastError();
  return 0;
}
