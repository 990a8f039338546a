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
 *   lpOverlapped is the record (for file operations, the record plus a tag
 *   in its low bits: see BUG-6 below). Records live in slabs that never
 *   move, and the binding frees one only after wait() or drain() handed it
 *   back, so an OVERLAPPED stays valid until its packet has been dequeued,
 *   including after CancelIoEx (CPython #116773, pywin32 #259/#744,
 *   twisted #8870 are what happens otherwise).
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
 * (KEY_EARLY): exactly one packet again, once the packets below are
 * accounted for.
 *
 * Packets nobody should see twice (BUG-6). Windows documents that a call
 * failing at once with an NT error queues nothing, but Wine's NtReadFile and
 * NtWriteFile queue a packet anyway for many such failures of a file
 * operation (a write at offset 2**50 fails with ERROR_GEN_FAILURE and
 * queues STATUS_UNSUCCESSFUL; an offset that overflows, ERROR_INVALID_-
 * PARAMETER; not an access denied), without writing the OVERLAPPED, and a
 * driver may do the same. Such a "ghost" packet sits in the queue, ahead of
 * our KEY_EARLY packet, or arrives when the binding has already raised (an
 * argument error) and reused the record for another operation. The
 * OVERLAPPED cannot tell it apart (it holds STATUS_PENDING in both cases),
 * nor can the packet's status (Wine also completes, with the OVERLAPPED
 * untouched, the operations of a thread that exited). What does tell it
 * apart is the record's life and state:
 * - File reads and writes call NtReadFile/NtWriteFile directly (what
 *   ReadFile/WriteFile do), with the record's address plus a tag of its
 *   generation in the low bits as the APC context, which is what a packet
 *   returns as lpOverlapped. A packet of an earlier life (tag mismatch), or
 *   a tagged one for a record now used by a socket operation, is stale.
 * - Each record carries backend flags under mu: STARTING while submit() is
 *   inside the OS call (a tagged packet that arrives meanwhile waits for
 *   the outcome), EARLY once it failed at once (only its KEY_EARLY packet,
 *   whose key carries the generation too, completes it), TAKEN once a
 *   packet for it was claimed (any other is stale).
 * - take_entries() claims every entry under mu before doing any work, and
 *   drops (without touching the record) a packet whose record is not in
 *   flight, already taken, or of another life.
 * Socket calls (Winsock) keep the OVERLAPPED as APC context; no socket call
 * queues a packet after failing at once (Wine's server honours the rule).
 *
 * Handles whose number outlived them (BUG-7). The binding keys
 * registrations by handle value, like descriptors on Linux, but a completion
 * port association belongs to the kernel object: a socket or File closed
 * without unregister() leaves a registration whose value the next handle
 * (socket or file) may get, and operations through it then run on an object
 * that was never associated with this port (no packet ever comes), or that
 * another port associated (its packets go there). Three defences:
 * - A KEY_IO packet whose record is not in this port's slabs is forwarded
 *   to the live port that owns it (a registry of ports, under reg_lock), in
 *   a heap envelope (KEY_FWD), or dropped if no live port owns it; it is
 *   never completed by the wrong port. That needs the receiving port to be
 *   dequeued, as any port in use is.
 * - close() cancels the other ports' operations on handles whose current
 *   object it associated (of two ports holding a handle value, the one that
 *   associated it last: assoc_clock), and forwards their packets before it
 *   goes: nothing is lost into a port nobody dequeues.
 * - sweep_locked(): when a wait slice ends with nothing dequeued (and in
 *   close()), at most every SWEEP_MS, the records in flight whose OVERLAPPED
 *   shows them finished are looked at twice; still finished, still without
 *   a packet, their handle is associated with this port at that moment
 *   (CreateIoCompletionPort succeeds only on an object no port has: proof
 *   that no packet went anywhere), and they complete from their OVERLAPPED
 *   through a KEY_ORPHAN packet. Later operations on that handle produce
 *   packets as usual. A finished operation whose handle has been closed
 *   since is completed the same way.
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
 * The operations of issue 14 (fiocp.h), and which packet completes each:
 * - poll: readiness through the AFD driver, as wepoll, mio and libuv do it:
 *   one handle per port to \Device\Afd (NtCreateFile; the name's suffix
 *   is ignored), associated with KEY_AFD, takes an IOCTL_AFD_POLL per
 *   operation (NtDeviceIoControlFile) for the socket's base handle
 *   (SIO_BASE_HANDLE), with the OVERLAPPED as IO_STATUS_BLOCK and a tagged
 *   APC context as for files (BUG-6). The AFD_POLL_INFO it fills lives in
 *   op->bk (malloc: polls need no extension record). Wine 8 implements the
 *   request (its server polls the Unix socket), so no fallback is needed;
 *   it reports a peer's FIN as readability, not AFD_POLL_DISCONNECT. A
 *   pending receive on the same socket takes arriving data before AFD
 *   sees it (Wine certainly; Windows documents nothing), so that poll
 *   waits for more.
 * - sendmsg, recvmsg: WSASend/WSASendTo, WSARecv (stream sockets) or
 *   WSARecvFrom (others) with the binding's WSABUF array. Ancillary data
 *   needs WSASendMsg/WSARecvMsg, which Windows has for datagram and raw
 *   sockets only: submit() refuses it on a stream socket with
 *   WSAEOPNOTSUPP. A datagram longer than the buffers completes with its
 *   first bytes and MSG_TRUNC, as on POSIX, not WSAEMSGSIZE.
 * - sendfile: TransmitFile from the OVERLAPPED's offset; connect_pipe:
 *   FSCTL_PIPE_LISTEN (ConnectNamedPipe) through NtFsControlFile with a
 *   tagged context; a client already connected (ERROR_PIPE_CONNECTED, no
 *   packet) succeeds through KEY_EARLY.
 * - timer, wait_process, fsync are emulated with the thread pool: a
 *   thread-pool timer, a thread-pool wait on our duplicate of the process
 *   handle (asyncio's IocpProactor waits with RegisterWaitForSingleObject),
 *   a work callback running FlushFileBuffers. Their packets (KEY_CB) are
 *   queued by those callbacks. For a timer or wait, one compare-and-swap of
 *   SC_STATE out of CB_ARMED decides who queues the one packet: the
 *   callback (CB_FIRED) or a cancellation (CB_CANCELLED, then
 *   ERROR_OPERATION_ABORTED). An fsync cannot be interrupted: cancel() and
 *   close() wait for its real result.
 * - Per-operation timeouts: a thread-pool timer per operation, armed
 *   before the OS call, whose callback cancels the operation as cancel()
 *   does (under mu, with the generation check) and marks it timed out: its
 *   cancelled completion becomes FIOCP_ETIMEDOUT; any result >= 0 wins.
 * - No callback outlives its record: finish_record(), on the thread that
 *   dequeued the packet and before the record goes back, stops the
 *   record's timers and wait and waits for a callback of theirs already
 *   running (WaitForThreadpool*Callbacks: never under mu, never in a
 *   callback). Callbacks run only while their record is owed, and
 *   destroy() comes only when nothing is owed, so none touches a destroyed
 *   port. close() cancels every kind (above), then collects their packets
 *   as any others.
 *
 * Pooled and multishot operations (issue 18; fiocp.h), the way IOCP
 * servers keep many idle connections cheap:
 * - A pooled receive posts a zero-byte WSARecv (MSG_PEEK on a datagram
 *   socket, whose zero-byte receive would drop the datagram): it pins no
 *   memory while the socket is idle. Its packet means the socket is
 *   readable; the thread that claims it (in wait() or try_get(), without
 *   the GIL in wait()) takes a buffer from the pool's free stack and
 *   receives what is there with one recv() that cannot block
 *   (pooled_receive() says why). FIONREAD 0 on a readable stream is its
 *   end or an error: a peek tells which. No free buffer: FIOCP_ENOBUFS and
 *   nothing read. The socket's SO_TYPE waits in op->offset meanwhile.
 * - A multishot receive does the same, and after each result with data
 *   hands out a child record (fiocp__child_new) holding it, in place of
 *   the packet's own record, then posts the zero-byte WSARecv again on the
 *   same record (restart_op()). It ends with its own record: end of
 *   stream, an error, FIOCP_ENOBUFS, or a cancel (found when the zero-byte
 *   receive comes back, it reads nothing: the data waits in the socket,
 *   not in a child that close() would drop); when that is decided right
 *   after a child (the next receive cannot start), the record's result
 *   goes behind the child in a KEY_EARLY packet (post_early()).
 * - A multishot accept keeps ACCEPT_KIDS AcceptEx in flight, each in a
 *   child record (malloc'd, with a malloc'd extension: its OVERLAPPED,
 *   pre-created socket and address buffer) on the port's list ip->kids.
 *   Their KEY_IO packets name records in no slab, which take_entries()
 *   finds on that list before treating a packet as another port's. Each
 *   accepted connection is a child result (res = the socket, addr->ss the
 *   peer's address), and a new child takes its place; a connection reset
 *   before it was taken restarts that AcceptEx. A cancel, close() (its
 *   scan reaches the children through their parent, which is in a slab)
 *   or an error cancels the others, and the parent's own record ends
 *   (KEY_EARLY) once the last child is back. The parent's bk counts its
 *   children in flight; its res holds the error that ends it. Children
 *   that end in an error are freed here; the binding never sees them.
 * - A zero-copy send is a plain send (its buffer stays pinned until its
 *   packet, as any send's).
 * Ordering: a multishot operation's children come out of one port FIFO
 * in the order of their packets, and its own end is queued after them.
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
#ifndef MSG_TRUNC
# define MSG_TRUNC 0x0100
#endif
#ifndef ERROR_HANDLES_CLOSED
# define ERROR_HANDLES_CLOSED 676L  /* from STATUS_HANDLES_CLOSED */
#endif

/* Completion keys. Associated handles get KEY_IO; the others mark packets
 * that this file queues itself, and carry the record's generation in bits
 * 8-15 (KEY_GEN) so that a packet of an earlier life is recognized. */
#define KEY_IO 0      /* an operation on an associated handle */
#define KEY_POST 1    /* post(): op->res holds the user's nbytes */
#define KEY_EARLY 2   /* an operation that failed at once: op->res is set */
#define KEY_WAKE 3    /* close() waking a waiter: no record */
#define KEY_ORPHAN 4  /* an operation finished without a packet (sweep) */
#define KEY_FWD 5     /* another port's KEY_IO packet: a fwd_t envelope */
#define KEY_AFD 6     /* an AFD poll, from the port's AFD handle (tagged) */
#define KEY_CB 7      /* a timer, process wait or fsync, queued by our
                         callback or by its cancellation */
#define KEY_KIND(k) ((unsigned)((k) & 0xff))
#define KEY_GEN(k) ((uint8_t)(((k) >> 8) & 0xff))
#define MAKE_KEY(kind, op) ((ULONG_PTR)(kind) | ((ULONG_PTR)(op)->gen << 8))

/* Backend bits in op->flags. The low five bits are the contract's
 * (FIOCP_OPF_CANCELLED, POOLED, MULTISHOT, ZEROCOPY, CHILD), which leaves
 * three: where submit() stands with the record (a phase, two bits) and
 * whether a packet for it was claimed. The binding zeroes the byte when it
 * frees a record. Changed under mu. The sweep's rarer marks live in a
 * table beside the records (marks_*, see the head comment on BUG-7). */
#define OPF_PHASE 0x60       /* one of the PH_* values: */
#define PH_NONE 0x00         /* never started (posts) */
#define PH_STARTING 0x20     /* submit() is inside the OS call */
#define PH_ISSUED 0x40       /* the OS accepted it (a packet should come) */
#define PH_EARLY 0x60        /* failed at once, or ended by this file: only
                                its KEY_EARLY packet completes it */
#define OPF_TAKEN 0x80       /* a packet for it was claimed */
#define OPF_BACKEND (OPF_PHASE | OPF_TAKEN)
#define OPF_CONTRACT                                                  \
  (FIOCP_OPF_CANCELLED | FIOCP_OPF_POOLED | FIOCP_OPF_MULTISHOT |     \
   FIOCP_OPF_ZEROCOPY | FIOCP_OPF_CHILD)
typedef char iocp_flag_bits_check[(OPF_CONTRACT & OPF_BACKEND) == 0 ? 1 : -1];
#define PHASE(op) ((op)->flags & OPF_PHASE)

static void set_phase(fiocp_op_t* op, uint8_t phase) {
  op->flags = (uint8_t)((op->flags & ~OPF_PHASE) | phase);
}

/* The sweep's marks (see the head comment on BUG-7), by record. */
#define MARK_SUSPECT 1     /* sweep_locked() saw it finished, no packet */
#define MARK_LATE_ASSOC 2  /* in flight when sweep_locked() associated its
                              handle: finished, it may have no packet */

/* Tagged APC contexts of file operations (see the head comment): records
 * are 8-byte aligned (slabs come from calloc, and the size and the offset
 * checked below are multiples of 8), the tag (1-7, never 0) is in the low 3
 * bits. */
#define TAG_MASK ((uintptr_t)7)
#define FILE_TAG(gen) ((uintptr_t)(1 + (gen) % 7))
typedef char iocp_record_alignment_check
    [sizeof(fiocp_op_t) % 8 == 0 && offsetof(fiocp_slab_t, ops) % 8 == 0
         ? 1
         : -1];

/* Longest single block in GetQueuedCompletionStatusEx (see the head
 * comment on Ctrl-C). */
#define SLICE_MS 100
/* Most packets taken by one GetQueuedCompletionStatusEx call. */
#define BATCH 128
/* Least time between two sweeps of a port (see the head comment on BUG-7);
 * an orphan completes after its second sweep. */
#define SWEEP_MS 400
/* Longest close() waits for the packets of the other ports' operations it
 * cancelled (see cancel_foreign()). */
#define FOREIGN_WAIT_MS 1000

/* NTSTATUS severities, from the top two bits: 2 is a warning (e.g.
 * STATUS_BUFFER_OVERFLOW, 0x80000005), 3 an error. */
#define NT_SEVERITY(st) (((ULONG)(st)) >> 30)
/* The NTSTATUS values this file looks at (ntstatus.h clashes with
 * windows.h, hence our own names). */
#define IOCP_STATUS_ALERTED 0x00000101UL
#define IOCP_STATUS_PENDING 0x00000103UL

/* NtReadFile/NtWriteFile, NtDeviceIoControlFile/NtFsControlFile (AFD polls,
 * pipe connects), NtCreateFile (the AFD handle) and RtlNtStatusToDosError,
 * from ntdll (the build links only kernel32, ws2_32 and mswsock). The
 * IO_STATUS_BLOCK is the OVERLAPPED's first two fields, as ReadFile passes
 * it. Our own names for ntdll's types: winternl.h differs between mingw and
 * the Windows SDK. */
typedef LONG(NTAPI* nt_rw_fn)(HANDLE file, HANDLE event, PVOID apc,
                              PVOID apc_context, PVOID iosb, PVOID buf,
                              ULONG len, PLARGE_INTEGER offset, PULONG key);
typedef LONG(NTAPI* nt_ioctl_fn)(HANDLE file, HANDLE event, PVOID apc,
                                 PVOID apc_context, PVOID iosb, ULONG code,
                                 PVOID in, ULONG inlen, PVOID out,
                                 ULONG outlen);
typedef struct iocp_ustr_s {
  USHORT len;
  USHORT maxlen;
  PWSTR buf;
} iocp_ustr_t;
typedef struct iocp_objattr_s {
  ULONG len;
  HANDLE root;
  iocp_ustr_t* name;
  ULONG attrs;
  PVOID sd;
  PVOID sqos;
} iocp_objattr_t;
typedef LONG(NTAPI* nt_create_fn)(PHANDLE h, ACCESS_MASK access,
                                  iocp_objattr_t* oa, PVOID iosb,
                                  PLARGE_INTEGER alloc, ULONG attrs,
                                  ULONG share, ULONG disposition,
                                  ULONG options, PVOID ea, ULONG ealen);
typedef ULONG(NTAPI* nt_to_dos_fn)(LONG status);
static nt_rw_fn nt_read_file;
static nt_rw_fn nt_write_file;
static nt_ioctl_fn nt_device_ioctl;
static nt_ioctl_fn nt_fs_control;
static nt_create_fn nt_create_file;
static nt_to_dos_fn nt_to_dos;

#define IOCP_FILE_OPEN 1                    /* NtCreateFile disposition */
#define IOCP_FSCTL_PIPE_LISTEN 0x00110008UL /* what ConnectNamedPipe sends */

/* The AFD driver's poll request (undocumented; what wepoll, mio and libuv
 * send): one socket per request here. */
#define IOCTL_AFD_POLL 0x00012024UL
#define AFD_POLL_RECEIVE 0x0001
#define AFD_POLL_RECEIVE_EXPEDITED 0x0002
#define AFD_POLL_SEND 0x0004
#define AFD_POLL_DISCONNECT 0x0008
#define AFD_POLL_ABORT 0x0010
#define AFD_POLL_LOCAL_CLOSE 0x0020
#define AFD_POLL_ACCEPT 0x0080
#define AFD_POLL_CONNECT_FAIL 0x0100
typedef struct afd_poll_info_s {
  LARGE_INTEGER timeout;
  ULONG nhandles;
  ULONG exclusive;
  struct {
    HANDLE handle;
    ULONG events;
    LONG status;
  } h[1];
} afd_poll_info_t;

/* op->addr->scratch slots of this backend (the binding zeroes them before
 * submit()). Pointer slots 0-3 and 64-bit slots 4-7 do not overlap on
 * 32-bit builds either. */
#define SC_IP 0        /* ptr: the iocp_t, for the timeout's callback */
#define SC_TIMEOUT 1   /* ptr: the PTP_TIMER of the per-operation timeout */
#define SC_OBJ 2       /* ptr: TIMER's PTP_TIMER, WAIT_PROCESS's PTP_WAIT */
#define SC_PROC 3      /* ptr: WAIT_PROCESS: our duplicate of the handle */
#define SC_STATE 4     /* i64: TIMER, WAIT_PROCESS: CB_* (interlocked) */
#define SC_TIMEDOUT 5  /* i64: 1 once the timeout cancelled it (mu) */
#define SC_GEN 6       /* i64: op->gen when the timeout was armed */
#define SC_SOTYPE 7    /* i64: SENDMSG, RECVMSG: the socket's SO_TYPE */

/* SC_STATE of a timer or process wait: who queues its KEY_CB packet. The
 * one compare-and-swap out of CB_ARMED decides it, so exactly one does. */
#define CB_NONE 0      /* not armed (yet) */
#define CB_ARMED 1
#define CB_FIRED 2     /* the callback won: the timer fired, the process
                          ended */
#define CB_CANCELLED 3 /* cancel() or the timeout won */

typedef struct assoc_s {
  uintptr_t h;
  int64_t seq;
} assoc_t;

typedef struct iocp_s {
  HANDLE port;
  CRITICAL_SECTION mu;  /* guards everything below and records' state */
  int closed;
  int64_t nwaiters;     /* threads inside wait() */
  int64_t wakes;        /* KEY_WAKE packets queued, not yet dequeued */
  int64_t owed;         /* records whose packet is not dequeued yet */
  fiocp_op_t* head;     /* records dequeued after close, for drain() */
  fiocp_op_t* tail;
  /* Handles this port associated (open addressing, h 0 = empty slot), to
   * accept a register() after unregister() of the same handle: a handle
   * stays associated with its port until it is closed. Each entry has the
   * assoc_clock value of its latest association: of two ports holding the
   * same handle value, the later one has the current object (the earlier
   * object was closed before its value could be reused). */
  assoc_t* assoc;
  size_t assoc_cap;
  size_t assoc_len;
  int64_t foreign_owed; /* other ports' operations cancelled by close(),
                           whose packets come here to be forwarded */
  int64_t foreign_until; /* fiocp__now_ms() when close() stops waiting for
                            them (their handle's object may be another) */
  int64_t last_sweep;   /* fiocp__now_ms() of the last sweep_locked() */
  HANDLE afd;           /* \Device\Afd, opened on the first poll (KEY_AFD);
                           set once, interlocked */
  /* The sweep's marks of records in flight (MARK_*): a record is there
   * only in the rare states the sweep looks into twice, and leaves when it
   * is handed back or started again. */
  struct mark_s* marks;
  size_t nmarks;
  size_t marks_cap;
  /* The children of multishot accepts whose AcceptEx is in flight, linked
   * through their next field: their packets name records that are in no
   * slab (see the head comment on multishot operations). */
  fiocp_op_t* kids;
  /* The registry of live ports (reg_lock), for KEY_FWD. */
  fiocp_port_t* owner;
  struct iocp_s* reg_next;
} iocp_t;

typedef struct mark_s {
  const fiocp_op_t* op;
  uint8_t bits;  /* MARK_* */
} mark_t;

/* A KEY_IO packet forwarded to the port owning its record. */
typedef struct fwd_s {
  OVERLAPPED_ENTRY entry;  /* as dequeued by the other port */
} fwd_t;

static SRWLOCK reg_lock = SRWLOCK_INIT;
static iocp_t* reg_head;
static volatile LONG64 assoc_clock;  /* orders associations, all ports */

/* ---- Winsock extension functions ----------------------------------------
 * AcceptEx, ConnectEx and GetAcceptExSockaddrs are reached through
 * WSAIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER) on a socket. The pointers
 * belong to the provider (mswsock for every Microsoft one); like CPython's
 * overlapped.c and libuv we load them once per process, from the first
 * socket that needs them. Racing loads store the same values. */

static LPFN_ACCEPTEX acceptex_fn;
static LPFN_CONNECTEX connectex_fn;
static LPFN_GETACCEPTEXSOCKADDRS getsockaddrs_fn;
static LPFN_TRANSMITFILE transmitfile_fn;
static LPFN_WSARECVMSG recvmsg_fn;
static LPFN_WSASENDMSG sendmsg_fn;

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

/* The extensions of sendfile, recvmsg and sendmsg, loaded when first used
 * (WSARecvMsg exists only for datagram and raw sockets' providers). */
static DWORD load_transmitfile(SOCKET s) {
  static const GUID guid = WSAID_TRANSMITFILE;
  return load_one(s, guid, (void**)&transmitfile_fn);
}

static DWORD load_msg_functions(SOCKET s) {
  static const GUID recv_guid = WSAID_WSARECVMSG;
  static const GUID send_guid = WSAID_WSASENDMSG;
  DWORD err = load_one(s, recv_guid, (void**)&recvmsg_fn);
  if (err == 0) err = load_one(s, send_guid, (void**)&sendmsg_fn);
  return err;
}

/* ---- Associated handles -------------------------------------------------- */

static size_t assoc_slot(uintptr_t h, size_t cap) {
  /* Handles are multiples of 4: mix the bits before masking. */
  uint64_t x = (uint64_t)h * 0x9E3779B97F4A7C15ULL;
  return (size_t)(x >> 32) & (cap - 1);
}

/* The entry of h in tab (cap slots), or NULL. */
static assoc_t* assoc_find(assoc_t* tab, size_t cap, uintptr_t h) {
  size_t i;
  if (cap == 0) return NULL;
  for (i = assoc_slot(h, cap); tab[i].h != 0; i = (i + 1) & (cap - 1))
    if (tab[i].h == h) return &tab[i];
  return NULL;
}

static int assoc_contains(iocp_t* ip, uintptr_t h) {
  return assoc_find(ip->assoc, ip->assoc_cap, h) != NULL;
}

/* When this port last associated h (0: never). */
static int64_t assoc_seq(iocp_t* ip, uintptr_t h) {
  assoc_t* a = assoc_find(ip->assoc, ip->assoc_cap, h);
  return a != NULL ? a->seq : 0;
}

/* Records that h was just associated with this port. A failure to grow
 * only loses the hint that lets the same handle register again after
 * unregister(); it is not an error. mu held. */
static void assoc_add(iocp_t* ip, uintptr_t h) {
  size_t i;
  int64_t seq = InterlockedIncrement64(&assoc_clock);
  assoc_t* a;
  if (h == 0) return;
  a = assoc_find(ip->assoc, ip->assoc_cap, h);
  if (a != NULL) {
    a->seq = seq;  /* the value's new object */
    return;
  }
  if (2 * (ip->assoc_len + 1) > ip->assoc_cap) {
    size_t cap = ip->assoc_cap ? 2 * ip->assoc_cap : 64, j;
    assoc_t* tab = (assoc_t*)calloc(cap, sizeof(assoc_t));
    if (tab == NULL) return;
    for (j = 0; j < ip->assoc_cap; j++) {
      if (ip->assoc[j].h == 0) continue;
      for (i = assoc_slot(ip->assoc[j].h, cap); tab[i].h != 0;
           i = (i + 1) & (cap - 1)) {
      }
      tab[i] = ip->assoc[j];
    }
    free(ip->assoc);
    ip->assoc = tab;
    ip->assoc_cap = cap;
  }
  for (i = assoc_slot(h, ip->assoc_cap); ip->assoc[i].h != 0;
       i = (i + 1) & (ip->assoc_cap - 1)) {
  }
  ip->assoc[i].h = h;
  ip->assoc[i].seq = seq;
  ip->assoc_len++;
}

/* ---- Results ------------------------------------------------------------- */

/* Operations that Winsock runs on op->handle, a socket. */
static int is_socket_op(uint8_t kind) {
  switch (kind) {
    case FIOCP_OP_RECV:
    case FIOCP_OP_SEND:
    case FIOCP_OP_RECVFROM:
    case FIOCP_OP_SENDTO:
    case FIOCP_OP_ACCEPT:
    case FIOCP_OP_CONNECT:
    case FIOCP_OP_SENDMSG:
    case FIOCP_OP_RECVMSG:
    case FIOCP_OP_SENDFILE:
      return 1;
    default:
      return 0;
  }
}

/* Operations issued through ntdll on op->handle with a tagged APC context
 * (see the head comment on BUG-6). */
static int is_tagged_io(uint8_t kind) {
  return kind == FIOCP_OP_READ || kind == FIOCP_OP_WRITE ||
         kind == FIOCP_OP_CONNECT_PIPE;
}

/* Operations completed by our own KEY_CB packet, not by an I/O request. */
static int is_cb_kind(uint8_t kind) {
  return kind == FIOCP_OP_TIMER || kind == FIOCP_OP_WAIT_PROCESS ||
         kind == FIOCP_OP_FSYNC;
}

/* Operations whose request runs on op->handle, so that their packet goes
 * where that handle is associated (sweep_locked(), cancel_foreign()). A
 * poll runs on the port's own AFD handle. */
static int is_handle_io(uint8_t kind) {
  return kind != FIOCP_OP_POST && kind != FIOCP_OP_POLL && !is_cb_kind(kind);
}

/* Frees op's side block (op->bk): a poll's AFD_POLL_INFO, a sendmsg's or
 * recvmsg's WSAMSG. Other kinds keep something else in bk. */
static void free_side(fiocp_op_t* op) {
  if (op->kind == FIOCP_OP_POLL || op->kind == FIOCP_OP_SENDMSG ||
      op->kind == FIOCP_OP_RECVMSG) {
    free((void*)op->bk);
    op->bk = 0;
  }
}

/* A multishot accept's own record (its children carry the AcceptEx). */
static int is_multi_accept(const fiocp_op_t* op) {
  return op->kind == FIOCP_OP_ACCEPT &&
         (op->flags & (FIOCP_OPF_MULTISHOT | FIOCP_OPF_CHILD)) ==
             FIOCP_OPF_MULTISHOT;
}

/* A pooled receive's own record (its zero-byte WSARecv). */
static int is_pooled_recv(const fiocp_op_t* op) {
  return op->kind == FIOCP_OP_RECV &&
         (op->flags & (FIOCP_OPF_POOLED | FIOCP_OPF_CHILD)) ==
             FIOCP_OPF_POOLED;
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

/* A finished poll's events (> 0), in poll()'s values: what AFD reported,
 * as wepoll and mio read it, kept to what was asked for plus FIOCP_POLLERR
 * and FIOCP_POLLHUP. A poll that reports nothing asked for ended because
 * the socket was closed under it (AFD_POLL_LOCAL_CLOSE): cancelled. */
static int64_t poll_result(fiocp_op_t* op) {
  const afd_poll_info_t* pi = (const afd_poll_info_t*)op->bk;
  unsigned want = op->len & (FIOCP_POLLIN | FIOCP_POLLPRI | FIOCP_POLLOUT);
  unsigned r = 0;
  ULONG ev;
  if (pi == NULL || pi->nhandles == 0)
    return -(int64_t)ERROR_OPERATION_ABORTED;
  ev = pi->h[0].events;
  if (ev & (AFD_POLL_RECEIVE | AFD_POLL_ACCEPT)) r |= FIOCP_POLLIN;
  if (ev & AFD_POLL_RECEIVE_EXPEDITED) r |= FIOCP_POLLPRI;
  if (ev & AFD_POLL_SEND) r |= FIOCP_POLLOUT;
  /* The peer closed: readable (EOF) and hung up. */
  if (ev & AFD_POLL_DISCONNECT) r |= FIOCP_POLLIN | FIOCP_POLLHUP;
  /* Reset: as Linux reports ECONNRESET. */
  if (ev & AFD_POLL_ABORT) r |= FIOCP_POLLIN | FIOCP_POLLHUP | FIOCP_POLLERR;
  if (ev & AFD_POLL_CONNECT_FAIL)
    r |= FIOCP_POLLIN | FIOCP_POLLOUT | FIOCP_POLLERR | FIOCP_POLLHUP;
  r &= want | FIOCP_POLLERR | FIOCP_POLLHUP;
  return r != 0 ? (int64_t)r : -(int64_t)ERROR_OPERATION_ABORTED;
}

/* The AFD events a poll for want (FIOCP_POLL*) asks for. A disconnect only
 * when reading: a peer's FIN must not end a poll for POLLOUT. */
static ULONG afd_events(uint32_t want) {
  ULONG e = AFD_POLL_ABORT | AFD_POLL_CONNECT_FAIL | AFD_POLL_LOCAL_CLOSE;
  if (want & FIOCP_POLLIN)
    e |= AFD_POLL_RECEIVE | AFD_POLL_ACCEPT | AFD_POLL_DISCONNECT;
  if (want & FIOCP_POLLPRI) e |= AFD_POLL_RECEIVE_EXPEDITED;
  if (want & FIOCP_POLLOUT) e |= AFD_POLL_SEND;
  return e;
}

/* A finished recvmsg's outputs (see fiocp.h): msg_flags, the control data's
 * length, the sender. A datagram longer than the buffers is not an error
 * (WSAEMSGSIZE): recvmsg() reports its first bytes and MSG_TRUNC, as on
 * POSIX. */
static int64_t finish_recvmsg(fiocp_op_t* op, DWORD err, DWORD bytes,
                              int64_t res) {
  fiocp_addr_t* a = op->addr;
  const WSAMSG* m = (const WSAMSG*)op->bk;
  int trunc = err == WSAEMSGSIZE || err == ERROR_MORE_DATA;
  if (res < 0 && !trunc) {
    a->controllen = 0;
    a->sslen = 0;
    return res;
  }
  if (m != NULL) {
    a->msgflags = (int)m->dwFlags;
    a->controllen = m->Control.len;
    a->sslen = m->namelen;
  } else {
    /* An overlapped receive's flags come back through
     * WSAGetOverlappedResult (MSG_PARTIAL and the like). */
    DWORD n = 0, fl = 0;
    if (err != 0 || !WSAGetOverlappedResult((SOCKET)op->handle, &op->ov, &n,
                                            FALSE, &fl))
      fl = 0;
    a->msgflags = (int)fl;
    a->controllen = 0;
    if (a->scratch.i64[SC_SOTYPE] == SOCK_STREAM) a->sslen = 0;
  }
  if (trunc) a->msgflags |= MSG_TRUNC;
  return (int64_t)bytes;
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
      /* A multishot accept's own result is only ever an error. */
      if (!is_multi_accept(op)) res = finish_accept(op, res);
      break;
    case FIOCP_OP_CONNECT:
      res = finish_connect(op, res);
      break;
    case FIOCP_OP_RECVMSG:
      res = finish_recvmsg(op, err, bytes, res);
      break;
    case FIOCP_OP_POLL:
      if (res >= 0) res = poll_result(op);
      break;
    case FIOCP_OP_CONNECT_PIPE:
      /* A client that connected before the call is a success, which
       * ConnectNamedPipe reports as this error (no packet is queued). */
      if (err == ERROR_PIPE_CONNECTED) res = 0;
      break;
    default:
      break;
  }
  return res;
}

/* ---- The sweep's marks --------------------------------------------------- */

/* op's marks (MARK_*). mu held. */
static uint8_t marks_of(const iocp_t* ip, const fiocp_op_t* op) {
  size_t i;
  for (i = 0; i < ip->nmarks; i++)
    if (ip->marks[i].op == op) return ip->marks[i].bits;
  return 0;
}

/* Adds bits to op's marks. Out of memory the mark is lost: the sweep then
 * waits for that operation's packet as if it had not looked. mu held. */
static void marks_add(iocp_t* ip, const fiocp_op_t* op, uint8_t bits) {
  size_t i;
  for (i = 0; i < ip->nmarks; i++) {
    if (ip->marks[i].op == op) {
      ip->marks[i].bits |= bits;
      return;
    }
  }
  if (ip->nmarks == ip->marks_cap) {
    size_t cap = ip->marks_cap ? 2 * ip->marks_cap : 16;
    mark_t* m = (mark_t*)realloc(ip->marks, cap * sizeof(mark_t));
    if (m == NULL) return;
    ip->marks = m;
    ip->marks_cap = cap;
  }
  ip->marks[ip->nmarks].op = op;
  ip->marks[ip->nmarks].bits = bits;
  ip->nmarks++;
}

/* Forgets op's marks: it is handed back, or started again. mu held. */
static void marks_drop(iocp_t* ip, const fiocp_op_t* op) {
  size_t i;
  for (i = 0; i < ip->nmarks; i++) {
    if (ip->marks[i].op == op) {
      ip->marks[i] = ip->marks[--ip->nmarks];
      return;
    }
  }
}

/* ---- Records: ownership, forwarding, orphans ----------------------------- */

/* The record a packet's lpOverlapped names (file operations tag it). */
static fiocp_op_t* untag(void* p) {
  return (fiocp_op_t*)((uintptr_t)p & ~TAG_MASK);
}

/* Whether op is one of port's records. The binding grows the slab list at
 * its head, under the GIL, possibly while this runs: a walk racing with that
 * may miss the newest slab or stop early (its fields come from calloc), but
 * never follows a bad pointer; callers look twice before concluding. */
static int port_owns(const fiocp_port_t* port, const fiocp_op_t* op) {
  const fiocp_slab_t* s = *(fiocp_slab_t* const volatile*)&port->slabs;
  uintptr_t p = (uintptr_t)op;
  for (; s != NULL; s = s->next) {
    uintptr_t first = (uintptr_t)s->ops;
    if (p >= first && p < first + s->count * sizeof(fiocp_op_t))
      return (p - first) % sizeof(fiocp_op_t) == 0;
  }
  return 0;
}

static void registry_add(iocp_t* ip) {
  AcquireSRWLockExclusive(&reg_lock);
  ip->reg_next = reg_head;
  reg_head = ip;
  ReleaseSRWLockExclusive(&reg_lock);
}

static void registry_remove(iocp_t* ip) {
  iocp_t** pp;
  AcquireSRWLockExclusive(&reg_lock);
  for (pp = &reg_head; *pp != NULL; pp = &(*pp)->reg_next) {
    if (*pp == ip) {
      *pp = ip->reg_next;
      break;
    }
  }
  ReleaseSRWLockExclusive(&reg_lock);
}

/* Whether op is one of ip's multishot accept children in flight (only
 * compares addresses: op may be anything). Takes mu. */
static int kid_known(iocp_t* ip, const fiocp_op_t* op) {
  const fiocp_op_t* k;
  EnterCriticalSection(&ip->mu);
  for (k = ip->kids; k != NULL && k != op; k = k->next) {
  }
  LeaveCriticalSection(&ip->mu);
  return k != NULL;
}

/* Takes kid off ip's list of children in flight. mu held. */
static void kid_unlink(iocp_t* ip, fiocp_op_t* kid) {
  fiocp_op_t** pp;
  for (pp = &ip->kids; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == kid) {
      *pp = kid->next;
      kid->next = NULL;
      return;
    }
  }
}

/* A KEY_IO packet whose record this port did not find in its slabs (see the
 * head comment on BUG-7): hands it, in an envelope, to the live port that
 * owns the record, and returns 1; a packet no live port owns is dropped
 * without touching its record (1 too). Returns 0 if the record is ours
 * after all (a third look, against a racing slab growth). A multishot
 * accept's child is in no slab: a port's list of them counts too. The
 * registry lock keeps the owner (its slabs and its port handle) alive
 * meanwhile; no mu is held by the caller (kid_known() takes each). */
static int forward_foreign(iocp_t* ip, const OVERLAPPED_ENTRY* e) {
  const fiocp_op_t* op = untag(e->lpOverlapped);
  iocp_t* o;
  int done = 1;
  AcquireSRWLockShared(&reg_lock);
  for (o = reg_head; o != NULL; o = o->reg_next) {
    fwd_t* f;
    if (!port_owns(o->owner, op) && !kid_known(o, op)) continue;
    if (o == ip) {
      done = 0;
      break;
    }
    f = (fwd_t*)malloc(sizeof(*f));
    if (f != NULL) {
      f->entry = *e;
      if (!PostQueuedCompletionStatus(o->port, 0, KEY_FWD, (LPOVERLAPPED)f))
        free(f);
    }
    break;  /* out of memory: that operation is lost, not misdelivered */
  }
  ReleaseSRWLockShared(&reg_lock);
  return done;
}

/* Marks the records in flight on h once sweep_locked() has associated h:
 * those that finished before have no packet. mu held. */
static void mark_late_assoc_locked(fiocp_port_t* port, iocp_t* ip,
                                   fiocp_handle_t h) {
  fiocp_slab_t* s;
  size_t i;
  for (s = port->slabs; s != NULL; s = s->next) {
    for (i = 0; i < s->count; i++) {
      fiocp_op_t* op = &s->ops[i];
      if (op->state == FIOCP_ST_INFLIGHT && op->handle == h &&
          (PHASE(op) == PH_ISSUED || PHASE(op) == PH_STARTING))
        marks_add(ip, op, MARK_LATE_ASSOC);
    }
  }
}

static int64_t cancel_kids_locked(iocp_t* ip, fiocp_op_t* parent);

/* close() of ip (see the head comment on BUG-7): other ports' operations
 * through stale registrations of handles whose current object ip
 * associated (ip's association of the value is the later one) would
 * complete into a port nobody dequeues any more. Cancels them, so that
 * their packets come while ip still forwards them. tab is a copy of ip's
 * associations (cap slots). GIL held: the other ports' slabs cannot grow.
 * Returns how many cancellations were requested. Takes reg_lock, then each
 * other port's mu (no caller holds a mu). */
static int64_t cancel_foreign(iocp_t* ip, assoc_t* tab, size_t cap) {
  iocp_t* o;
  int64_t count = 0;
  AcquireSRWLockShared(&reg_lock);
  for (o = reg_head; o != NULL; o = o->reg_next) {
    fiocp_slab_t* sl;
    size_t i;
    if (o == ip) continue;
    EnterCriticalSection(&o->mu);
    for (sl = o->owner->slabs; sl != NULL; sl = sl->next) {
      for (i = 0; i < sl->count; i++) {
        fiocp_op_t* op = &sl->ops[i];
        assoc_t* a;
        if (op->state != FIOCP_ST_INFLIGHT || !is_handle_io(op->kind) ||
            PHASE(op) != PH_ISSUED || (op->flags & OPF_TAKEN))
          continue;
        a = assoc_find(tab, cap, (uintptr_t)op->handle);
        if (a == NULL || a->seq <= assoc_seq(o, (uintptr_t)op->handle))
          continue;
        op->flags |= FIOCP_OPF_CANCELLED;
        if (is_multi_accept(op)) count += cancel_kids_locked(o, op);
        else if (CancelIoEx((HANDLE)op->handle, &op->ov)) count++;
      }
    }
    LeaveCriticalSection(&o->mu);
  }
  ReleaseSRWLockShared(&reg_lock);
  return count;
}

/* Completes, through KEY_ORPHAN packets, the operations that finished but
 * whose packet never comes (see the head comment on BUG-7): their handle
 * was never associated with a port, as CreateIoCompletionPort succeeding on
 * it proves, or has been closed since. An operation qualifies at its second
 * sweep (SWEEP_MS apart) in that state, which a packet merely on its way
 * never stays in. The first sweep of the port's life must come after the
 * slabs exist; later growth under the GIL is harmless (see port_owns()).
 * mu held. */
static void sweep_locked(fiocp_port_t* port, iocp_t* ip) {
  fiocp_slab_t* s;
  size_t i;
  int64_t now = fiocp__now_ms();
  if (ip->owed <= 0 || now - ip->last_sweep < SWEEP_MS) return;
  ip->last_sweep = now;
  for (s = *(fiocp_slab_t* volatile*)&port->slabs; s != NULL; s = s->next) {
    for (i = 0; i < s->count; i++) {
      fiocp_op_t* op = &s->ops[i];
      uint8_t marks;
      HANDLE h;
      if (op->state != FIOCP_ST_INFLIGHT || !is_handle_io(op->kind) ||
          PHASE(op) != PH_ISSUED || (op->flags & OPF_TAKEN) ||
          (ULONG)op->ov.Internal == IOCP_STATUS_PENDING)
        continue;
      marks = marks_of(ip, op);
      if (!(marks & MARK_SUSPECT)) {
        /* finished: its packet has one sweep */
        marks_add(ip, op, MARK_SUSPECT);
        continue;
      }
      h = (HANDLE)op->handle;
      if (!(marks & MARK_LATE_ASSOC)) {
        if (h == NULL || h == INVALID_HANDLE_VALUE) continue;
        /* Non-blocking, like every call made under mu. */
        if (CreateIoCompletionPort(h, ip->port, KEY_IO, 0) != NULL) {
          assoc_add(ip, (uintptr_t)h);
          mark_late_assoc_locked(port, ip, op->handle);
        } else if (GetLastError() != ERROR_INVALID_HANDLE) {
          continue;  /* associated: its packet comes, here or forwarded */
        }
      }
      op->flags |= OPF_TAKEN;
      if (!PostQueuedCompletionStatus(ip->port, 0, MAKE_KEY(KEY_ORPHAN, op),
                                      &op->ov))
        op->flags &= (uint8_t)~OPF_TAKEN;  /* next sweep */
    }
  }
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
static void finish_record(fiocp_op_t* op);
static int finish_pooled(iocp_t* ip, fiocp_op_t* op, DWORD err,
                         fiocp_op_t** kid);
static int finish_kid(iocp_t* ip, fiocp_op_t* kid);

/* One dequeued entry on its way to becoming a completion. */
typedef struct cand_s {
  fiocp_op_t* op;
  uintptr_t tag;   /* a file operation's tag, 0 for the others */
  unsigned kind;   /* KEY_IO (also forwarded), KEY_POST, KEY_EARLY,
                      KEY_ORPHAN, KEY_AFD or KEY_CB */
  uint8_t gen;     /* KEY_GEN of our own packets */
  ULONG pst;       /* KEY_IO: the packet's NTSTATUS */
  DWORD bytes;
  int state;       /* 0 undecided, 1 claimed, -1 dropped */
} cand_t;

/* Claims what it can of c[0..n) under mu (see the head comment on BUG-6):
 * a candidate is claimed (its record marked TAKEN) or dropped, or stays
 * undecided if its record's submit() is still inside the OS call. Returns
 * how many stay undecided. */
static int claim_locked(cand_t* c, ULONG n, int ignore_starting) {
  ULONG i;
  int undecided = 0;
  for (i = 0; i < n; i++) {
    fiocp_op_t* op = c[i].op;
    int ok = 0;
    if (c[i].state != 0) continue;
    if (op->state == FIOCP_ST_INFLIGHT) {
      uint8_t f = op->flags;
      switch (c[i].kind) {
        case KEY_POST:
          ok = op->kind == FIOCP_OP_POST && op->gen == c[i].gen &&
               !(f & OPF_TAKEN);
          break;
        case KEY_EARLY:
          ok = (f & OPF_PHASE) == PH_EARLY && !(f & OPF_TAKEN) &&
               op->gen == c[i].gen;
          break;
        case KEY_ORPHAN:
          /* sweep_locked() claimed it for this packet already */
          ok = (f & OPF_TAKEN) && op->gen == c[i].gen;
          c[i].state = ok ? 1 : -1;
          continue;
        case KEY_IO:
          if (op->kind == FIOCP_OP_POST) break;
          if (c[i].tag != 0) {
            /* A file operation's packet: of this life, for this kind. */
            if (!is_tagged_io(op->kind) || c[i].tag != FILE_TAG(op->gen))
              break;
            if ((f & OPF_PHASE) == PH_STARTING && !ignore_starting) {
              undecided++;  /* a ghost, or a fast completion: wait */
              continue;
            }
          } else if (is_tagged_io(op->kind)) {
            break;  /* file packets are tagged: a stale socket packet */
          }
          ok = (f & OPF_PHASE) != PH_EARLY && !(f & OPF_TAKEN);
          break;
        case KEY_AFD:
          /* Tagged like a file operation's packet, for the same reasons. */
          if (op->kind != FIOCP_OP_POLL || c[i].tag != FILE_TAG(op->gen))
            break;
          if ((f & OPF_PHASE) == PH_STARTING && !ignore_starting) {
            undecided++;
            continue;
          }
          ok = (f & OPF_PHASE) != PH_EARLY && !(f & OPF_TAKEN);
          break;
        case KEY_CB:
          if (!is_cb_kind(op->kind) || op->gen != c[i].gen) break;
          /* A timer or wait that fired at once: its submit() may still be
           * inside SetThreadpoolTimer/Wait, which finish_record() must not
           * race with CloseThreadpool*. */
          if ((f & OPF_PHASE) == PH_STARTING && !ignore_starting) {
            undecided++;
            continue;
          }
          ok = (f & OPF_PHASE) != PH_EARLY && !(f & OPF_TAKEN);
          break;
        default:
          break;
      }
    }
    if (ok) op->flags |= OPF_TAKEN;
    c[i].state = ok ? 1 : -1;
  }
  return undecided;
}

/* Turns n dequeued entries into finished records. While the port is open
 * they go to out (which has room for n: each entry gives at most one
 * record) and the count is returned; once it is closed they go to the
 * drain queue and FIOCP_ECLOSED is returned. Packets that complete nothing
 * (wake packets, stale or foreign ones, see the head comment) are consumed
 * here, and so are those of operations that go on: a pooled receive's
 * zero-byte receive (which may give a multishot child instead), a
 * multishot accept's child that failed. */
static int take_entries(fiocp_port_t* port, iocp_t* ip,
                        OVERLAPPED_ENTRY* ents, ULONG n, fiocp_op_t** out) {
  cand_t c[BATCH];
  ULONG i, m = 0;
  int k = 0, wakes = 0, j, spins = 0, forwarded = 0;
  int settled = 0;  /* owed packets whose operation is over */
  int64_t give_up = 0;
  /* 1. Decode; hand foreign packets over. No lock. */
  for (i = 0; i < n && i < BATCH; i++) {
    OVERLAPPED_ENTRY e = ents[i];
    unsigned kind = KEY_KIND(e.lpCompletionKey);
    if (e.lpCompletionKey == KEY_WAKE) {
      wakes++;
      continue;
    }
    if (e.lpOverlapped == NULL) continue;  /* nobody queues these: a bug */
    if (e.lpCompletionKey == KEY_FWD) {
      /* Another port's KEY_IO packet for one of our records. */
      fwd_t* f = (fwd_t*)e.lpOverlapped;
      e = f->entry;
      free(f);
      kind = KEY_IO;
    } else if (e.lpCompletionKey == KEY_IO) {
      fiocp_op_t* op = untag(e.lpOverlapped);
      if (!port_owns(port, op)) {
        MemoryBarrier();
        /* Not in a slab: a multishot accept's child, or another port's. */
        if (!port_owns(port, op) && !kid_known(ip, op) &&
            forward_foreign(ip, &e)) {
          forwarded++;
          continue;
        }
      }
    } else if (kind != KEY_POST && kind != KEY_EARLY && kind != KEY_ORPHAN &&
               kind != KEY_AFD && kind != KEY_CB) {
      continue;  /* nobody queues these: a bug */
    }
    c[m].op = untag(e.lpOverlapped);
    c[m].tag = (uintptr_t)e.lpOverlapped & TAG_MASK;
    c[m].kind = kind;
    c[m].gen = KEY_GEN(e.lpCompletionKey);
    /* The entry's Internal field is the packet's own status (the layout is
     * FILE_IO_COMPLETION_INFORMATION's). */
    c[m].pst = (ULONG)e.Internal;
    c[m].bytes = e.dwNumberOfBytesTransferred;
    c[m].state = 0;
    m++;
  }
  /* 2. Claim, under mu. A file packet whose submit() has not seen its call
   * return yet waits for it (microseconds: the submitter only has to take
   * mu); the bound only guards against a submitter that never returns. */
  for (;;) {
    int undecided;
    EnterCriticalSection(&ip->mu);
    undecided = claim_locked(c, m, give_up != 0 && fiocp__now_ms() > give_up);
    LeaveCriticalSection(&ip->mu);
    if (undecided == 0) break;
    if (give_up == 0) give_up = fiocp__now_ms() + 2000;
    if (++spins < 64) SwitchToThread();
    else Sleep(1);
  }
  /* 3. The per-record work (error mapping, accept and connect contexts,
   * stopping timers and waits), without the lock: a claimed record is ours
   * until its state changes below; cancel() only asks the OS, which
   * tolerates a completed operation, or loses a compare-and-swap. */
  for (i = 0; i < m; i++) {
    fiocp_op_t* op = c[i].op;
    ULONG pst;
    DWORD bytes = 0, err = 0;
    int has_result = 0;  /* err and bytes are the OS's word on op */
    if (c[i].state != 1) continue;
    if (c[i].kind == KEY_IO || c[i].kind == KEY_AFD) {
      pst = c[i].pst;
      bytes = c[i].bytes;
      if (pst == IOCP_STATUS_ALERTED) {
        if (finish_alerted(ip, op)) continue;  /* started again */
      } else {
        if ((ULONG)op->ov.Internal != pst) {
          /* Not written back (Wine: see the head comment on exiting
           * threads). The packet is the truth; packet_error() reads the
           * OVERLAPPED, so copy it there. */
          op->ov.Internal = (ULONG_PTR)pst;
          op->ov.InternalHigh = bytes;
        }
        err = pst == 0 ? 0 : packet_error(op);
        has_result = 1;
      }
    } else if (c[i].kind == KEY_ORPHAN) {
      /* Finished without a packet: the OVERLAPPED has the result. */
      pst = (ULONG)op->ov.Internal;
      bytes = (DWORD)op->ov.InternalHigh;
      err = pst == 0 ? 0 : packet_error(op);
      has_result = 1;
    }
    /* KEY_POST and KEY_EARLY: op->res was set before queueing; KEY_CB:
     * by the fsync worker, or by finish_record(). */
    if (has_result) {
      if (is_pooled_recv(op)) {
        fiocp_op_t* kid = NULL;
        if (!finish_pooled(ip, op, err, &kid)) {
          if (kid != NULL) out[k++] = kid;  /* op goes on, or ends later */
          continue;
        }
      } else {
        op->res = op_result(op, err, bytes);
      }
    }
    if (op->flags & FIOCP_OPF_CHILD) {  /* a multishot accept's */
      int r = finish_kid(ip, op);
      if (r < 0) continue;  /* its AcceptEx started again */
      settled++;
      if (r > 0) out[k++] = op;
      continue;
    }
    settled++;
    finish_record(op);
    out[k++] = op;
  }
  /* 4. Hand the records back. */
  EnterCriticalSection(&ip->mu);
  ip->wakes -= wakes;
  ip->owed -= settled;
  ip->foreign_owed -= forwarded;
  if (ip->foreign_owed < 0) ip->foreign_owed = 0;
  for (j = 0; j < k; j++) {
    out[j]->state = FIOCP_ST_DONE;
    out[j]->next = NULL;
    if (ip->nmarks > 0) marks_drop(ip, out[j]);
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

/* Readies op's OVERLAPPED for a start: zeroed, and STATUS_PENDING in its
 * status as ReadFile and WSARecv leave it, so that sweep_locked(), which
 * looks at it under mu, never takes a record being started for a finished
 * one. mu held. */
static void prepare_ov_locked(fiocp_op_t* op) {
  memset(&op->ov, 0, sizeof(op->ov));
  op->ov.Internal = (ULONG_PTR)IOCP_STATUS_PENDING;
}

/* Issues op, whose OVERLAPPED prepare_ov_locked() readied. Returns 0 if the
 * OS took it (a packet will come), or the Win32 error with which it failed
 * at once; ERROR_IO_PENDING too means a packet will come. */
static DWORD start_read_write(fiocp_op_t* op) {
  HANDLE h = (HANDLE)op->handle;
  LARGE_INTEGER off;
  LONG st;
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
  /* What ReadFile/WriteFile do, with a tagged APC context (see the head
   * comment on BUG-6); the OVERLAPPED is the IO_STATUS_BLOCK. */
  off.LowPart = op->ov.Offset;
  off.HighPart = (LONG)op->ov.OffsetHigh;
  st = (op->kind == FIOCP_OP_READ ? nt_read_file : nt_write_file)(
      h, NULL, NULL, (PVOID)((uintptr_t)op | FILE_TAG(op->gen)), &op->ov,
      op->buf, op->len, &off, NULL);
  if ((ULONG)st == IOCP_STATUS_PENDING || NT_SEVERITY(st) == 2)
    return ERROR_IO_PENDING;  /* a warning completes too: its packet comes */
  if (st >= 0) return 0;
  return nt_to_dos(st);
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

/* A pooled receive's zero-byte WSARecv (the head comment on pooled
 * receives says why): it completes once the socket has data, its end or
 * an error, and pins no memory meanwhile. On a socket that is not a stream
 * it peeks (MSG_PEEK): a zero-byte receive would take the datagram and
 * drop its bytes. op->offset holds the socket's SO_TYPE (check_args())
 * while op is in flight; its result puts the buffer id there. */
static DWORD start_pooled_recv(fiocp_op_t* op) {
  static char nothing;  /* no byte is ever written: the length is 0 */
  WSABUF wb;
  wb.len = 0;
  wb.buf = &nothing;
  /* The flags word outlives the call, as in start_op(). */
  op->bk = op->offset == SOCK_STREAM ? 0 : MSG_PEEK;
  if (WSARecv((SOCKET)op->handle, &wb, 1, NULL, (DWORD*)&op->bk, &op->ov,
              NULL) != 0)
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

/* ---- Operations of issue 14 ----------------------------------------------
 * See the head comment for how each kind fits the packet rules. */

/* The port's handle to the AFD driver, opened and associated (KEY_AFD) by
 * the first poll; racing first polls keep one handle. The "\Device\Afd\..."
 * name opens a handle on which AFD takes poll requests (wepoll's trick; the
 * suffix is ignored). Returns NULL with the error in *err. Not under mu
 * unless the handle exists (restart_op()). */
static HANDLE port_afd(iocp_t* ip, DWORD* err) {
  static const WCHAR name[] = L"\\Device\\Afd\\Fastiocp";
  HANDLE h = InterlockedCompareExchangePointer(&ip->afd, NULL, NULL), old;
  iocp_ustr_t us;
  iocp_objattr_t oa;
  ULONG_PTR iosb[2];
  LONG st;
  if (h != NULL) return h;
  us.buf = (PWSTR)name;
  us.len = us.maxlen = (USHORT)(sizeof(name) - sizeof(WCHAR));
  memset(&oa, 0, sizeof(oa));
  oa.len = (ULONG)sizeof(oa);
  oa.name = &us;
  st = nt_create_file(&h, SYNCHRONIZE, &oa, iosb, NULL, 0,
                      FILE_SHARE_READ | FILE_SHARE_WRITE, IOCP_FILE_OPEN, 0,
                      NULL, 0);
  if (st < 0) {
    *err = nt_to_dos(st);
    return NULL;
  }
  if (CreateIoCompletionPort(h, ip->port, KEY_AFD, 0) == NULL) {
    *err = GetLastError();
    (void)CloseHandle(h);
    return NULL;
  }
  old = InterlockedCompareExchangePointer(&ip->afd, h, NULL);
  if (old != NULL) {
    (void)CloseHandle(h);  /* another poll's handle won */
    return old;
  }
  return h;
}

/* The return of an NT call that took op's IO_STATUS_BLOCK, as start_op()
 * returns: pending and warnings queue a packet (see the head comment). */
static DWORD nt_started(LONG st) {
  if ((ULONG)st == IOCP_STATUS_PENDING || NT_SEVERITY(st) == 2)
    return ERROR_IO_PENDING;
  if (st >= 0) return 0;
  return nt_to_dos(st);
}

/* FIOCP_OP_POLL: an IOCTL_AFD_POLL for the socket's base handle (the one
 * AFD knows, below any layered provider), on the port's AFD handle, with
 * op's OVERLAPPED as IO_STATUS_BLOCK and a tagged APC context. The
 * AFD_POLL_INFO, in and out, lives in op->bk until the packet. */
static DWORD start_poll(iocp_t* ip, fiocp_op_t* op) {
  SOCKET base = INVALID_SOCKET;
  DWORD err = 0, n = 0;
  afd_poll_info_t* pi;
  HANDLE afd;
  op->bk = 0;
  afd = port_afd(ip, &err);
  if (afd == NULL) return err;
  if (WSAIoctl((SOCKET)op->handle, SIO_BASE_HANDLE, NULL, 0, &base,
               (DWORD)sizeof(base), &n, NULL, NULL) != 0)
    return (DWORD)WSAGetLastError();
  pi = (afd_poll_info_t*)calloc(1, sizeof(*pi));
  if (pi == NULL) return ERROR_NOT_ENOUGH_MEMORY;
  op->bk = (uintptr_t)pi;
  pi->timeout.QuadPart = INT64_MAX;  /* until an event or a cancel */
  pi->nhandles = 1;
  pi->exclusive = FALSE;
  pi->h[0].handle = (HANDLE)base;
  pi->h[0].events = afd_events(op->len);
  return nt_started(nt_device_ioctl(
      afd, NULL, NULL, (PVOID)((uintptr_t)op | FILE_TAG(op->gen)), &op->ov,
      IOCTL_AFD_POLL, pi, (ULONG)sizeof(*pi), pi, (ULONG)sizeof(*pi)));
}

/* The WSAMSG of a sendmsg/recvmsg with ancillary data (WSASendMsg and
 * WSARecvMsg, loaded for s's provider): the extension's buffers and
 * control data, the address given; kept in op->bk until completion. */
static DWORD new_wsamsg(fiocp_op_t* op, LPSOCKADDR name, INT namelen,
                        WSAMSG** out) {
  fiocp_addr_t* a = op->addr;
  WSAMSG* m;
  DWORD err = load_msg_functions((SOCKET)op->handle);
  if (err != 0) return err;
  m = (WSAMSG*)calloc(1, sizeof(*m));
  if (m == NULL) return ERROR_NOT_ENOUGH_MEMORY;
  op->bk = (uintptr_t)m;
  m->name = name;
  m->namelen = namelen;
  m->lpBuffers = (LPWSABUF)a->iovs;
  m->dwBufferCount = a->niov;
  m->Control.buf = a->control;
  m->Control.len = a->controllen;
  *out = m;
  return 0;
}

/* FIOCP_OP_SENDMSG: WSASend, or WSASendTo with an address; ancillary data
 * (datagram sockets only: check_args()) needs WSASendMsg, whose WSAMSG
 * lives in op->bk until the packet. */
static DWORD start_sendmsg(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  SOCKET s = (SOCKET)op->handle;
  int has_addr = a->sslen > 0 && a->ss.ss_family != AF_UNSPEC;
  int rc;
  op->bk = 0;
  if (a->controllen > 0) {
    WSAMSG* m;
    DWORD err = new_wsamsg(op, has_addr ? (LPSOCKADDR)&a->ss : NULL,
                           has_addr ? a->sslen : 0, &m);
    if (err != 0) return err;
    rc = sendmsg_fn(s, m, (DWORD)a->msgflags, NULL, &op->ov, NULL);
  } else if (has_addr) {
    rc = WSASendTo(s, (LPWSABUF)a->iovs, a->niov, NULL, (DWORD)a->msgflags,
                   (struct sockaddr*)&a->ss, a->sslen, &op->ov, NULL);
  } else {
    rc = WSASend(s, (LPWSABUF)a->iovs, a->niov, NULL, (DWORD)a->msgflags,
                 &op->ov, NULL);
  }
  return rc == 0 ? 0 : (DWORD)WSAGetLastError();
}

/* FIOCP_OP_RECVMSG: WSARecv on a stream socket, WSARecvFrom (the sender)
 * on others; WSARecvMsg for ancillary data (its WSAMSG in op->bk). The
 * flags word and the address length are written at completion: they live
 * in the extension. */
static DWORD start_recvmsg(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  SOCKET s = (SOCKET)op->handle;
  int rc;
  op->bk = 0;
  a->wsaflags = (DWORD)a->msgflags;
  if (a->controllen > 0) {
    WSAMSG* m;
    DWORD err = new_wsamsg(op, (LPSOCKADDR)&a->ss, (INT)sizeof(a->ss), &m);
    if (err != 0) return err;
    m->dwFlags = (DWORD)a->msgflags;
    rc = recvmsg_fn(s, m, NULL, &op->ov, NULL);
  } else if (a->scratch.i64[SC_SOTYPE] == SOCK_STREAM) {
    rc = WSARecv(s, (LPWSABUF)a->iovs, a->niov, NULL, &a->wsaflags, &op->ov,
                 NULL);
  } else {
    a->sslen = (fiocp_socklen_t)sizeof(a->ss);
    rc = WSARecvFrom(s, (LPWSABUF)a->iovs, a->niov, NULL, &a->wsaflags,
                     (struct sockaddr*)&a->ss, &a->sslen, &op->ov, NULL);
  }
  return rc == 0 ? 0 : (DWORD)WSAGetLastError();
}

/* FIOCP_OP_SENDFILE: TransmitFile from op->offset (the OVERLAPPED's
 * offset), at most 2^31 - 2 bytes (its limit: a short send). */
static DWORD start_sendfile(fiocp_op_t* op) {
  SOCKET s = (SOCKET)op->handle;
  DWORD n = op->len > 0x7ffffffeu ? 0x7ffffffeu : op->len;
  DWORD err = load_transmitfile(s);
  if (err != 0) return err;
  op->ov.Offset = (DWORD)((uint64_t)op->offset & 0xffffffffu);
  op->ov.OffsetHigh = (DWORD)((uint64_t)op->offset >> 32);
  if (!transmitfile_fn(s, (HANDLE)op->addr->src, n, 0, &op->ov, NULL, 0))
    return (DWORD)WSAGetLastError();
  return 0;
}

/* FIOCP_OP_CONNECT_PIPE: what ConnectNamedPipe does (FSCTL_PIPE_LISTEN),
 * with a tagged APC context. A client already connected fails at once with
 * ERROR_PIPE_CONNECTED and no packet: submit() queues a KEY_EARLY one and
 * op_result() makes it a success. */
static DWORD start_connect_pipe(fiocp_op_t* op) {
  return nt_started(nt_fs_control(
      (HANDLE)op->handle, NULL, NULL,
      (PVOID)((uintptr_t)op | FILE_TAG(op->gen)), &op->ov,
      IOCP_FSCTL_PIPE_LISTEN, NULL, 0, NULL, 0));
}

static volatile LONG64* cb_state(fiocp_op_t* op) {
  return (volatile LONG64*)&op->addr->scratch.i64[SC_STATE];
}

/* Queues op's KEY_CB packet (ip is in op->bk). PostQueuedCompletionStatus
 * fails only when the system is out of memory, and the packet is owed all
 * the same (exactly one party decided to queue it): retried, for about 5 s,
 * then given up (close() then times out and keeps the port). */
static VOID CALLBACK post_retry_cb(PTP_CALLBACK_INSTANCE inst, PVOID ctx) {
  fiocp_op_t* op = (fiocp_op_t*)ctx;
  iocp_t* ip = (iocp_t*)op->bk;
  int i;
  (void)inst;
  for (i = 0; i < 500; i++) {
    if (PostQueuedCompletionStatus(ip->port, 0, MAKE_KEY(KEY_CB, op),
                                   &op->ov))
      return;
    Sleep(10);
  }
}

/* mu may be held: the retries, which sleep, go to a pool thread. */
static void post_cb(fiocp_op_t* op) {
  iocp_t* ip = (iocp_t*)op->bk;
  if (PostQueuedCompletionStatus(ip->port, 0, MAKE_KEY(KEY_CB, op), &op->ov))
    return;
  if (!TrySubmitThreadpoolCallback(post_retry_cb, op, NULL)) {
    /* Out of memory twice over: the operation stays owed (see above). */
  }
}

/* The callback of a TIMER's timer or a WAIT_PROCESS's wait: queues the
 * packet unless a cancellation did. op stays in flight until then, and
 * finish_record() waits for this callback before handing op back. */
static void cb_fired(fiocp_op_t* op) {
  if (InterlockedCompareExchange64(cb_state(op), CB_FIRED, CB_ARMED) ==
      CB_ARMED)
    post_cb(op);
}

static VOID CALLBACK timer_cb(PTP_CALLBACK_INSTANCE inst, PVOID ctx,
                              PTP_TIMER t) {
  (void)inst;
  (void)t;
  cb_fired((fiocp_op_t*)ctx);
}

static VOID CALLBACK wait_cb(PTP_CALLBACK_INSTANCE inst, PVOID ctx,
                             PTP_WAIT w, TP_WAIT_RESULT result) {
  (void)inst;
  (void)w;
  (void)result;  /* WAIT_OBJECT_0: no timeout is set */
  cb_fired((fiocp_op_t*)ctx);
}

/* FIOCP_OP_FSYNC's worker: FlushFileBuffers cannot be interrupted, so it
 * always runs to its end and queues the packet with its real result. After
 * the post it touches nothing: the port may be gone. */
static VOID CALLBACK fsync_cb(PTP_CALLBACK_INSTANCE inst, PVOID ctx) {
  fiocp_op_t* op = (fiocp_op_t*)ctx;
  iocp_t* ip = (iocp_t*)op->bk;
  int i;
  (void)inst;
  op->res = FlushFileBuffers((HANDLE)op->handle) ? 0
                                                 : -(int64_t)GetLastError();
  for (i = 0; i < 500; i++) {
    if (PostQueuedCompletionStatus(ip->port, 0, MAKE_KEY(KEY_CB, op),
                                   &op->ov))
      return;
    Sleep(10);
  }
}

/* Arms t to fire once, ns nanoseconds from now: a negative due time is
 * relative, in 100 ns units (64 bits: no limit worth naming). */
static void set_timer(PTP_TIMER t, int64_t ns) {
  int64_t ticks = ns / 100 + (ns % 100 != 0);
  ULARGE_INTEGER due;
  FILETIME ft;
  if (ticks < 1) ticks = 1;
  due.QuadPart = (ULONGLONG)(-ticks);
  ft.dwLowDateTime = due.LowPart;
  ft.dwHighDateTime = due.HighPart;
  SetThreadpoolTimer(t, &ft, 0, 0);
}

/* Stops t, waits for a callback of it already running (ours take mu or
 * post: microseconds) and frees it. Never under mu, never in a callback. */
static void close_timer(PTP_TIMER t) {
  SetThreadpoolTimer(t, NULL, 0, 0);
  WaitForThreadpoolTimerCallbacks(t, TRUE);
  CloseThreadpoolTimer(t);
}

static void close_wait(PTP_WAIT w) {
  SetThreadpoolWait(w, NULL, NULL);
  WaitForThreadpoolWaitCallbacks(w, TRUE);
  CloseThreadpoolWait(w);
}

/* FIOCP_OP_TIMER: a thread-pool timer whose callback queues the packet. */
static DWORD start_timer(iocp_t* ip, fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  PTP_TIMER t = CreateThreadpoolTimer(timer_cb, op, NULL);
  if (t == NULL) return GetLastError();
  op->bk = (uintptr_t)ip;
  a->scratch.ptr[SC_OBJ] = t;
  InterlockedExchange64(cb_state(op), CB_ARMED);
  set_timer(t, op->offset);
  return ERROR_IO_PENDING;  /* op may be complete already: touch nothing */
}

/* FIOCP_OP_WAIT_PROCESS: a thread-pool wait on our own duplicate of the
 * process handle (the user may close theirs meanwhile, which would make the
 * wait undefined), as asyncio's IocpProactor.wait_for_handle does with
 * RegisterWaitForSingleObject. */
static DWORD start_wait(iocp_t* ip, fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  HANDLE self = GetCurrentProcess(), dup;
  PTP_WAIT w;
  DWORD err;
  if (!DuplicateHandle(self, (HANDLE)op->handle, self, &dup, 0, FALSE,
                       DUPLICATE_SAME_ACCESS))
    return GetLastError();
  w = CreateThreadpoolWait(wait_cb, op, NULL);
  if (w == NULL) {
    err = GetLastError();
    (void)CloseHandle(dup);
    return err;
  }
  op->bk = (uintptr_t)ip;
  a->scratch.ptr[SC_PROC] = dup;
  a->scratch.ptr[SC_OBJ] = w;
  InterlockedExchange64(cb_state(op), CB_ARMED);
  SetThreadpoolWait(w, dup, NULL);
  return ERROR_IO_PENDING;  /* op may be complete already: touch nothing */
}

/* FIOCP_OP_FSYNC: FlushFileBuffers (data and metadata: Windows has no
 * fdatasync) on a pool thread. */
static DWORD start_fsync(iocp_t* ip, fiocp_op_t* op) {
  op->bk = (uintptr_t)ip;
  if (!TrySubmitThreadpoolCallback(fsync_cb, op, NULL)) return GetLastError();
  return ERROR_IO_PENDING;
}

/* Asks for op's cancellation, the kind's way: CancelIoEx on the handle
 * that carries its request, or winning the compare-and-swap of a timer or
 * process wait and queuing its packet. An fsync cannot be interrupted: its
 * real result comes (TRUE all the same: the request is noted). mu held, op
 * in flight and past STARTING. Returns FALSE with GetLastError() set as
 * CancelIoEx does (ERROR_NOT_FOUND: already complete). */
static BOOL cancel_locked(iocp_t* ip, fiocp_op_t* op) {
  switch (op->kind) {
    case FIOCP_OP_POLL: {
      HANDLE afd = InterlockedCompareExchangePointer(&ip->afd, NULL, NULL);
      if (afd == NULL) {
        SetLastError(ERROR_NOT_FOUND);  /* never issued */
        return FALSE;
      }
      return CancelIoEx(afd, &op->ov);
    }
    case FIOCP_OP_TIMER:
    case FIOCP_OP_WAIT_PROCESS:
      if (InterlockedCompareExchange64(cb_state(op), CB_CANCELLED,
                                       CB_ARMED) != CB_ARMED) {
        SetLastError(ERROR_NOT_FOUND);  /* fired, or never armed */
        return FALSE;
      }
      post_cb(op);
      return TRUE;
    case FIOCP_OP_FSYNC:
      return TRUE;
    case FIOCP_OP_ACCEPT:
      if (!is_multi_accept(op)) break;
      /* Its children carry the requests; it ends when the last is back. */
      (void)cancel_kids_locked(ip, op);
      if (op->bk > 0) return TRUE;
      SetLastError(ERROR_NOT_FOUND);  /* its end is queued already */
      return FALSE;
    case FIOCP_OP_RECV:
      /* A multishot receive between a result and its next zero-byte
       * receive: restart_op() sees the flag and ends it. */
      if ((op->flags & FIOCP_OPF_MULTISHOT) && (op->flags & OPF_TAKEN) &&
          PHASE(op) == PH_ISSUED)
        return TRUE;
      break;
    default:
      break;
  }
  return CancelIoEx((HANDLE)op->handle, &op->ov);
}

/* The callback of a per-operation timeout: cancels op, as cancel() does
 * (under mu, with the generation check), and marks it timed out so that
 * its cancelled completion reads FIOCP_ETIMEDOUT. Not if its packet was
 * claimed, it failed at once, or a cancellation came first. op cannot be
 * handed back meanwhile: finish_record() waits for this callback. */
static VOID CALLBACK timeout_cb(PTP_CALLBACK_INSTANCE inst, PVOID ctx,
                                PTP_TIMER t) {
  fiocp_op_t* op = (fiocp_op_t*)ctx;
  fiocp_addr_t* a = op->addr;
  iocp_t* ip = (iocp_t*)a->scratch.ptr[SC_IP];
  (void)inst;
  (void)t;
  EnterCriticalSection(&ip->mu);
  if (op->state == FIOCP_ST_INFLIGHT &&
      op->gen == (uint8_t)a->scratch.i64[SC_GEN] &&
      PHASE(op) != PH_EARLY &&
      !(op->flags & (OPF_TAKEN | FIOCP_OPF_CANCELLED))) {
    a->scratch.i64[SC_TIMEDOUT] = 1;
    op->flags |= FIOCP_OPF_CANCELLED;
    /* A record still STARTING is cancelled by its submit() once issued. */
    if (PHASE(op) != PH_STARTING) (void)cancel_locked(ip, op);
  }
  LeaveCriticalSection(&ip->mu);
}

/* Arms op's timeout (op->timeout_ns > 0, op->addr set: check_args()), before
 * its OS call, so that it exists whenever a packet can. */
static DWORD arm_timeout(iocp_t* ip, fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  PTP_TIMER t;
  if (op->timeout_ns <= 0) return 0;
  a->scratch.ptr[SC_IP] = ip;
  a->scratch.i64[SC_GEN] = op->gen;
  a->scratch.i64[SC_TIMEDOUT] = 0;
  t = CreateThreadpoolTimer(timeout_cb, op, NULL);
  if (t == NULL) return GetLastError();
  a->scratch.ptr[SC_TIMEOUT] = t;
  set_timer(t, op->timeout_ns);
  return 0;
}

/* The last work on a finished op, claimed or never issued: stops its
 * timeout, timer or process wait and waits for their callbacks (none runs
 * after this), gives a timer or wait its result from SC_STATE, frees the
 * side block and the process handle, and turns a cancellation by the
 * timeout into FIOCP_ETIMEDOUT (any result >= 0 wins). Not under mu; never
 * in a callback (it waits for them). */
static void finish_record(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  if (a != NULL) {
    PTP_TIMER to = (PTP_TIMER)a->scratch.ptr[SC_TIMEOUT];
    LONG64 st;
    if (to != NULL) {
      close_timer(to);
      a->scratch.ptr[SC_TIMEOUT] = NULL;
    }
    if (op->kind == FIOCP_OP_TIMER || op->kind == FIOCP_OP_WAIT_PROCESS) {
      if (a->scratch.ptr[SC_OBJ] != NULL) {
        if (op->kind == FIOCP_OP_TIMER)
          close_timer((PTP_TIMER)a->scratch.ptr[SC_OBJ]);
        else
          close_wait((PTP_WAIT)a->scratch.ptr[SC_OBJ]);
        a->scratch.ptr[SC_OBJ] = NULL;
      }
      st = *cb_state(op);
      if (st == CB_CANCELLED) {
        op->res = -(int64_t)ERROR_OPERATION_ABORTED;
      } else if (st == CB_FIRED && op->kind == FIOCP_OP_TIMER) {
        op->res = 0;
      } else if (st == CB_FIRED) {
        DWORD code;
        op->res = GetExitCodeProcess((HANDLE)a->scratch.ptr[SC_PROC], &code)
                      ? (int64_t)code
                      : -(int64_t)GetLastError();
      }
      /* CB_NONE: it failed at once; op->res says how. */
      if (a->scratch.ptr[SC_PROC] != NULL) {
        (void)CloseHandle((HANDLE)a->scratch.ptr[SC_PROC]);
        a->scratch.ptr[SC_PROC] = NULL;
      }
    }
    if (op->timeout_ns > 0 && a->scratch.i64[SC_TIMEDOUT] &&
        op->res == -(int64_t)ERROR_OPERATION_ABORTED)
      op->res = FIOCP_ETIMEDOUT;
  }
  /* A pooled receive holds a buffer only with data (its offset held the
   * socket's type until now). */
  if (is_pooled_recv(op) && op->res <= 0) op->offset = -1;
  free_side(op);
}

/* Refusals of the arguments, before anything starts (submit() returns
 * them; the binding raises). Records the socket type of sendmsg, recvmsg
 * and pooled receives (op->offset, see start_pooled_recv()). Ancillary
 * data needs WSASendMsg/WSARecvMsg, which Windows has for datagram and raw
 * sockets only: WSAEOPNOTSUPP on a stream socket. POOLED is for receives,
 * MULTISHOT for pooled receives and accepts (fiocp.h). */
static DWORD check_args(fiocp_op_t* op) {
  fiocp_addr_t* a = op->addr;
  int type = 0, tlen = (int)sizeof(type);
  if (op->timeout_ns > 0 && a == NULL) return ERROR_INVALID_PARAMETER;
  if ((op->flags & FIOCP_OPF_MULTISHOT) && !is_multi_accept(op) &&
      !is_pooled_recv(op))
    return ERROR_INVALID_PARAMETER;
  if (op->flags & FIOCP_OPF_POOLED) {
    if (!is_pooled_recv(op) || op->pool == NULL || op->len == 0)
      return ERROR_INVALID_PARAMETER;
    if (getsockopt((SOCKET)op->handle, SOL_SOCKET, SO_TYPE, (char*)&type,
                   &tlen) != 0)
      return (DWORD)WSAGetLastError();
    op->offset = type;
    return 0;
  }
  switch (op->kind) {
    case FIOCP_OP_SENDMSG:
    case FIOCP_OP_RECVMSG:
      if (a == NULL || (a->niov > 0 && a->iovs == NULL) ||
          (a->controllen > 0 && a->control == NULL))
        return ERROR_INVALID_PARAMETER;
      if (getsockopt((SOCKET)op->handle, SOL_SOCKET, SO_TYPE, (char*)&type,
                     &tlen) != 0)
        return (DWORD)WSAGetLastError();
      a->scratch.i64[SC_SOTYPE] = type;
      if (a->controllen > 0 && type != SOCK_DGRAM && type != SOCK_RAW)
        return WSAEOPNOTSUPP;
      return 0;
    case FIOCP_OP_SENDFILE:
      if (a == NULL || op->offset < 0 || op->len == 0)
        return ERROR_INVALID_PARAMETER;
      return 0;
    case FIOCP_OP_TIMER:
      if (a == NULL || op->offset < 0) return ERROR_INVALID_PARAMETER;
      return 0;
    case FIOCP_OP_WAIT_PROCESS:
      if (a == NULL) return ERROR_INVALID_PARAMETER;
      return 0;
    default:
      return 0;
  }
}

static DWORD start_multi_accept(iocp_t* ip, fiocp_op_t* op);

static DWORD start_op(iocp_t* ip, fiocp_op_t* op) {
  SOCKET s = (SOCKET)op->handle;
  WSABUF wb;
  int rc;
  wb.len = op->len;
  wb.buf = op->buf;
  switch (op->kind) {
    case FIOCP_OP_READ:
    case FIOCP_OP_WRITE:
      return start_read_write(op);
    case FIOCP_OP_RECV:
      if (op->flags & FIOCP_OPF_POOLED) return start_pooled_recv(op);
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
      /* A multishot accept's children are started from its own record, a
       * child alone only when restart_op() starts it again. */
      if (is_multi_accept(op)) return start_multi_accept(ip, op);
      return start_accept(op);
    case FIOCP_OP_CONNECT:
      return start_connect(op);
    case FIOCP_OP_POLL:
      return start_poll(ip, op);
    case FIOCP_OP_SENDMSG:
      return start_sendmsg(op);
    case FIOCP_OP_RECVMSG:
      return start_recvmsg(op);
    case FIOCP_OP_SENDFILE:
      return start_sendfile(op);
    case FIOCP_OP_CONNECT_PIPE:
      return start_connect_pipe(op);
    case FIOCP_OP_TIMER:
      return start_timer(ip, op);
    case FIOCP_OP_WAIT_PROCESS:
      return start_wait(ip, op);
    case FIOCP_OP_FSYNC:
      return start_fsync(ip, op);
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
 * the head comment on exiting threads), a pooled receive's zero-byte
 * receive (after a multishot result, or one that found nothing), or a
 * multishot accept's child. Returns 1 if it is in flight again (a packet
 * will come), 0 if it ends now with op->res set: cancelled (by the user or
 * close()), or failed when started again. With end_by_packet, an op that
 * ends is readied for post_early() in the same critical section: its
 * result goes behind a multishot child just handed out. */
static int restart_op(iocp_t* ip, fiocp_op_t* op, int end_by_packet) {
  DWORD err;
  int started = 0;
  /* Under mu, cancel() and shutdown() either see the old OVERLAPPED
   * (then the CANCELLED flag or the closed port stops us) or the new one
   * (then CancelIoEx reaches it); and the new packet cannot be claimed
   * before the record is no longer TAKEN. */
  EnterCriticalSection(&ip->mu);
  if (ip->closed || (op->flags & FIOCP_OPF_CANCELLED)) {
    err = ERROR_OPERATION_ABORTED;
  } else {
    if (op->kind == FIOCP_OP_ACCEPT &&
        op->addr->accept_sock != INVALID_SOCKET) {
      closesocket(op->addr->accept_sock);  /* start_accept makes another */
      op->addr->accept_sock = INVALID_SOCKET;
    }
    prepare_ov_locked(op);
    err = start_op(ip, op);
    started = err == 0 || err == ERROR_IO_PENDING ||
              NT_SEVERITY(op->ov.Internal) == 2;
    if (started) {
      op->flags &= (uint8_t)~OPF_TAKEN;
      marks_drop(ip, op);
    }
  }
  if (!started && end_by_packet) {
    set_phase(op, PH_EARLY);
    op->flags &= (uint8_t)~OPF_TAKEN;
    marks_drop(ip, op);
  }
  LeaveCriticalSection(&ip->mu);
  if (started) return 1;
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
      return restart_op(ip, op, 0);
    case FIOCP_OP_RECVMSG:
    case FIOCP_OP_POLL:
      free_side(op);  /* the start makes another */
      return restart_op(ip, op, 0);
    case FIOCP_OP_ACCEPT: {
      fiocp_addr_t* a = op->addr;
      SOCKET ls = (SOCKET)op->handle, as = a->accept_sock;
      if (as == INVALID_SOCKET ||
          getpeername(as, (struct sockaddr*)&ss, &len) != 0)
        return restart_op(ip, op, 0);  /* nothing was accepted */
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

/* ---- Pooled and multishot operations -------------------------------------
 * See the head comment for the design; fiocp.h for the contract. */

/* AcceptEx kept in flight by one multishot accept. */
#define ACCEPT_KIDS 4

/* Most bytes one recv() call takes (its length is an int). */
#define RECV_MAX 0x7fffffffu

typedef struct repost_s {
  HANDLE port;
  ULONG_PTR key;
  LPOVERLAPPED ov;
} repost_t;

static VOID CALLBACK repost_cb(PTP_CALLBACK_INSTANCE inst, PVOID ctx) {
  repost_t* r = (repost_t*)ctx;
  int i;
  (void)inst;
  for (i = 0; i < 500; i++) {
    if (PostQueuedCompletionStatus(r->port, 0, r->key, r->ov)) break;
    Sleep(10);
  }
  free(r);
}

/* Queues op's KEY_EARLY packet: an operation that this file ended, whose
 * result (op->res) must come behind what it already handed out (its phase
 * is PH_EARLY). PostQueuedCompletionStatus fails only out of memory, and
 * the packet is owed all the same: retried from a pool thread for about
 * 5 s, as post_cb() does (op is owed, so the port outlives the retries or
 * is kept by close()). No lock held. */
static void post_early(iocp_t* ip, fiocp_op_t* op) {
  ULONG_PTR key = MAKE_KEY(KEY_EARLY, op);
  repost_t* r;
  if (PostQueuedCompletionStatus(ip->port, 0, key, &op->ov)) return;
  r = (repost_t*)malloc(sizeof(*r));
  if (r != NULL) {
    r->port = ip->port;
    r->key = key;
    r->ov = &op->ov;
    if (TrySubmitThreadpoolCallback(repost_cb, r, NULL)) return;
    free(r);
  }
  /* Out of memory twice over: the operation stays owed (close() then times
   * out and keeps the port). */
}

/* The receive of a pooled operation whose zero-byte WSARecv came back
 * with err (0: the socket is readable: data, its end, or an error).
 * Returns the bytes received (> 0) into pool buffer *id, 0 at end of
 * stream, or a negative code: the receive's error, or FIOCP_ENOBUFS when
 * data is there but no buffer is free (then nothing was read). Sets *again
 * when there was nothing to receive after all (another receiver took it):
 * op then waits again. No lock held.
 *
 * Why it never blocks: recv() on a stream socket returns as soon as any
 * byte is there, and it is called only once FIONREAD counted some (or a
 * peek, made only on a socket select() finds readable, found one); on
 * another socket the zero-byte peek completed because a datagram is
 * there, which recv() returns at once. Those bytes could go only through
 * another receive on the same socket in the microseconds between the two
 * calls, which a pooled receive does not share its socket with (a second
 * concurrent reader of a stream scrambles it anyway); a socket the user
 * made non-blocking then answers WSAEWOULDBLOCK, which is *again. Why no
 * data is lost: each call takes at most one buffer's worth into a buffer
 * that the result then holds, and none at all without a free buffer; a
 * datagram longer than the buffer gives its first bytes, as POSIX's
 * recv() does. */
static int64_t pooled_receive(fiocp_op_t* op, DWORD err, int64_t* id,
                              int* again) {
  SOCKET s = (SOCKET)op->handle;
  fiocp_pool_t* pool = op->pool;
  int stream = op->offset == SOCK_STREAM;
  uint32_t want = op->len < pool->size ? op->len : pool->size;
  int64_t got;
  int r, e;
  *again = 0;
  if (want > RECV_MAX) want = RECV_MAX;
  /* A datagram is longer than the zero bytes peeked: not an error. */
  if (err != 0 &&
      (stream || (err != WSAEMSGSIZE && err != ERROR_MORE_DATA)))
    return op_result(op, err, 0);
  if (stream) {
    u_long avail = 0;
    char c;
    if (ioctlsocket(s, FIONREAD, &avail) != 0)
      return -(int64_t)WSAGetLastError();
    if (avail == 0) {
      /* Readable without data: its end, or an error, waits in the socket,
       * unless another receive took the data. A select() that does not
       * wait tells the latter (then a peek could block); a peek tells the
       * others apart without taking anything (or finds data that came
       * meanwhile). */
      fd_set readable;
      struct timeval now = {0, 0};
      FD_ZERO(&readable);
      FD_SET(s, &readable);
      r = select(0, &readable, NULL, NULL, &now);
      if (r < 0) return -(int64_t)WSAGetLastError();
      if (r == 0) {
        *again = 1;
        return 0;
      }
      r = recv(s, &c, 1, MSG_PEEK);
      if (r == 0) return 0;
      if (r < 0) {
        e = WSAGetLastError();
        if (e == WSAEWOULDBLOCK) *again = 1;
        return e == WSAEWOULDBLOCK ? 0 : -(int64_t)e;
      }
    }
  }
  got = fiocp__pool_take(pool);
  if (got < 0) return FIOCP_ENOBUFS;
  r = recv(s, pool->base + (size_t)got * pool->size, (int)want, 0);
  e = r < 0 ? WSAGetLastError() : 0;
  if (r < 0 && !stream && e == WSAEMSGSIZE) r = (int)want;
  if (r > 0) {
    *id = got;
    return r;
  }
  fiocp__pool_give(pool, (uint32_t)got);
  if (r == 0) return 0;
  if (e == WSAEWOULDBLOCK) *again = 1;
  return e == WSAEWOULDBLOCK ? 0 : -(int64_t)e;
}

/* A pooled receive whose zero-byte WSARecv came back with err (its packet
 * claimed): receives, then decides what follows. Returns 1 when op is
 * over (op->res and op->offset set, for the caller to hand back); 0 when
 * it goes on: its next zero-byte receive is in flight, or its end was
 * queued (post_early()) behind the multishot child *kid that holds this
 * result, for the caller to hand out (NULL if none). No lock held. */
static int finish_pooled(iocp_t* ip, fiocp_op_t* op, DWORD err,
                         fiocp_op_t** kid) {
  int64_t id = -1, res;
  int again;
  fiocp_op_t* child;
  *kid = NULL;
  if (op->flags & FIOCP_OPF_MULTISHOT) {
    /* Cancelled or closed: nothing is read, so that nothing goes into a
     * child that close() would drop; the data waits in the socket. */
    int stop;
    EnterCriticalSection(&ip->mu);
    stop = ip->closed || (op->flags & FIOCP_OPF_CANCELLED);
    LeaveCriticalSection(&ip->mu);
    if (stop) {
      op->res = -(int64_t)ERROR_OPERATION_ABORTED;
      op->offset = -1;
      return 1;
    }
  }
  res = pooled_receive(op, err, &id, &again);
  if (again) return !restart_op(ip, op, 0);  /* over only if cancelled */
  if (res <= 0 || !(op->flags & FIOCP_OPF_MULTISHOT)) {
    op->res = res;
    op->offset = res > 0 ? id : -1;
    return 1;
  }
  child = fiocp__child_new(op);
  if (child == NULL) {
    /* It cannot go on: its own record carries this last result. */
    op->res = res;
    op->offset = id;
    return 1;
  }
  /* The contract's bits, none of this file's (fiocp__child_new copies the
   * parent's byte). */
  child->flags = (uint8_t)((op->flags & OPF_CONTRACT & ~FIOCP_OPF_CANCELLED) |
                           FIOCP_OPF_CHILD);
  child->res = res;
  child->offset = id;
  *kid = child;
  if (!restart_op(ip, op, 1)) {
    /* Cancelled, closed, or the next receive failed at once (op->res): its
     * end comes after the child. */
    op->offset = -1;
    post_early(ip, op);
  }
  return 0;
}

/* Keeps ACCEPT_KIDS AcceptEx of the multishot accept parent in flight,
 * each in a child record of its own (with a malloc'd extension for the
 * pre-created socket and the addresses, which fiocp__child_free frees).
 * parent->bk counts them. Returns 0, or the error of the first that could
 * not start (those started stay). mu held: their packets cannot be
 * claimed before they are on ip->kids. */
static DWORD top_up_kids_locked(iocp_t* ip, fiocp_op_t* parent) {
  while (parent->bk < ACCEPT_KIDS) {
    fiocp_op_t* kid = fiocp__child_new(parent);
    DWORD err;
    if (kid == NULL) return ERROR_NOT_ENOUGH_MEMORY;
    kid->flags = (uint8_t)((parent->flags & OPF_CONTRACT &
                            ~FIOCP_OPF_CANCELLED) |
                           FIOCP_OPF_CHILD);
    kid->addr = (fiocp_addr_t*)calloc(1, sizeof(fiocp_addr_t));
    if (kid->addr == NULL) {
      (void)fiocp__child_free(kid);
      return ERROR_NOT_ENOUGH_MEMORY;
    }
    prepare_ov_locked(kid);
    err = start_accept(kid);
    if (err != 0 && err != ERROR_IO_PENDING &&
        NT_SEVERITY(kid->ov.Internal) != 2) {
      if (kid->addr->accept_sock != INVALID_SOCKET)
        closesocket(kid->addr->accept_sock);
      (void)fiocp__child_free(kid);  /* parent keeps the binding's ref */
      return err;
    }
    set_phase(kid, PH_ISSUED);
    kid->next = ip->kids;
    ip->kids = kid;
    parent->bk++;
    ip->owed++;
  }
  return 0;
}

/* Cancels the AcceptEx of parent's children (a closed socket's AcceptEx
 * fails the same way, and finish_accept() closes the pre-created sockets
 * of the cancelled ones). Returns how many cancellations were requested.
 * mu held. */
static int64_t cancel_kids_locked(iocp_t* ip, fiocp_op_t* parent) {
  fiocp_op_t* kid;
  int64_t n = 0;
  for (kid = ip->kids; kid != NULL; kid = kid->next) {
    if (kid->parent != parent) continue;
    kid->flags |= FIOCP_OPF_CANCELLED;
    if (!(kid->flags & OPF_TAKEN) &&
        CancelIoEx((HANDLE)kid->handle, &kid->ov))
      n++;
  }
  return n;
}

/* Whether a multishot accept is winding down: it takes no new AcceptEx
 * and ends when its last child is back. mu held. */
static int multi_ending(const iocp_t* ip, const fiocp_op_t* parent) {
  return ip->closed || (parent->flags & FIOCP_OPF_CANCELLED) ||
         parent->res < 0;
}

/* FIOCP_OP_ACCEPT with MULTISHOT: the record itself starts nothing; its
 * children do. Its phase is ISSUED before any child can complete, and it
 * ends (post_early()) when its last child is back. Fails at once only if
 * no child started. */
static DWORD start_multi_accept(iocp_t* ip, fiocp_op_t* op) {
  DWORD err;
  if (op->addr != NULL) op->addr->accept_sock = INVALID_SOCKET;
  op->res = 0;  /* the error that ends it, once one does */
  EnterCriticalSection(&ip->mu);
  op->bk = 0;
  err = top_up_kids_locked(ip, op);
  if (op->bk > 0) {
    set_phase(op, PH_ISSUED);
    if (err != 0) {
      /* It cannot keep its count from the start: it ends with that error
       * once the children started are back. */
      op->res = -(int64_t)err;
      (void)cancel_kids_locked(ip, op);
    }
    err = ERROR_IO_PENDING;
  }
  LeaveCriticalSection(&ip->mu);
  return err;
}

/* A connection that the peer reset or aborted before AcceptEx took it:
 * that child's AcceptEx starts again, nothing ends. */
static int is_accept_transient(int64_t res) {
  return res == -(int64_t)WSAECONNRESET ||
         res == -(int64_t)ERROR_NETNAME_DELETED ||
         res == -(int64_t)WSAECONNABORTED ||
         res == -(int64_t)ERROR_CONNECTION_ABORTED;
}

/* A multishot accept's child whose AcceptEx came back, kid->res set (the
 * new socket, or the error). Returns -1 if its AcceptEx started again (no
 * result), 1 if kid is a result to hand out, 0 if it was freed (an error:
 * its parent ends with it). Keeps the parent's count of AcceptEx in flight,
 * and ends the parent once the last is back from a cancel, close() or an
 * error (post_early(), after kid is freed or handed out). No lock held. */
static int finish_kid(iocp_t* ip, fiocp_op_t* kid) {
  fiocp_op_t* parent = kid->parent;
  int out, last;
  DWORD err;
  if (is_accept_transient(kid->res) && restart_op(ip, kid, 0)) return -1;
  out = kid->res >= 0;
  EnterCriticalSection(&ip->mu);
  kid_unlink(ip, kid);
  parent->bk--;
  if (!multi_ending(ip, parent)) {
    if (!out) parent->res = kid->res;
    else if ((err = top_up_kids_locked(ip, parent)) != 0)
      parent->res = -(int64_t)err;
    if (parent->res < 0) (void)cancel_kids_locked(ip, parent);
  }
  last = parent->bk == 0;
  if (last) {
    if (parent->res >= 0) parent->res = -(int64_t)ERROR_OPERATION_ABORTED;
    set_phase(parent, PH_EARLY);
    parent->flags &= (uint8_t)~OPF_TAKEN;
  }
  LeaveCriticalSection(&ip->mu);
  /* Before the parent's end: the binding must not see its references
   * fall to 0 while a child it never saw holds one. */
  if (!out) (void)fiocp__child_free(kid);
  if (last) post_early(ip, parent);
  return out;
}

/* ---- Contract ------------------------------------------------------------ */

/* Resolves the ntdll functions of file operations, polls and pipe connects.
 * Racing calls store the same values (pointer-sized, aligned stores). */
static DWORD load_ntdll(void) {
  HMODULE nt = GetModuleHandleW(L"ntdll.dll");
  FARPROC r, w, e, d, f, c;
  if (nt == NULL) return GetLastError();
  r = GetProcAddress(nt, "NtReadFile");
  w = GetProcAddress(nt, "NtWriteFile");
  e = GetProcAddress(nt, "RtlNtStatusToDosError");
  d = GetProcAddress(nt, "NtDeviceIoControlFile");
  f = GetProcAddress(nt, "NtFsControlFile");
  c = GetProcAddress(nt, "NtCreateFile");
  if (r == NULL || w == NULL || e == NULL || d == NULL || f == NULL ||
      c == NULL)
    return ERROR_PROC_NOT_FOUND;
  nt_read_file = (nt_rw_fn)(void (*)(void))r;  /* any function type */
  nt_write_file = (nt_rw_fn)(void (*)(void))w;
  nt_to_dos = (nt_to_dos_fn)(void (*)(void))e;
  nt_device_ioctl = (nt_ioctl_fn)(void (*)(void))d;
  nt_fs_control = (nt_ioctl_fn)(void (*)(void))f;
  nt_create_file = (nt_create_fn)(void (*)(void))c;
  return 0;
}

static int iocp_probe(char* why, size_t whylen) {
  HANDLE p;
  DWORD err = load_ntdll();
  if (err != 0) {
    snprintf(why, whylen, "NtReadFile and co. not found in ntdll "
             "(error %lu)", (unsigned long)err);
    return -(int)err;
  }
  p = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 1);
  if (p == NULL) {
    err = GetLastError();
    snprintf(why, whylen, "CreateIoCompletionPort failed with error %lu",
             (unsigned long)err);
    return -(int)err;
  }
  if (!CloseHandle(p)) {
    err = GetLastError();
    snprintf(why, whylen, "CloseHandle of a completion port failed with "
             "error %lu", (unsigned long)err);
    return -(int)err;
  }
  return 0;
}

static int iocp_init(fiocp_port_t* port, unsigned entries,
                     unsigned concurrency, char* why, size_t whylen) {
  iocp_t* ip;
  DWORD err = load_ntdll();
  (void)entries;  /* an IOCP queue has no fixed size */
  if (err != 0) {
    snprintf(why, whylen, "NtReadFile and co. not found in ntdll "
             "(error %lu)", (unsigned long)err);
    return -(int)err;
  }
  ip = (iocp_t*)calloc(1, sizeof(*ip));
  if (ip == NULL) {
    snprintf(why, whylen, "out of memory");
    return FIOCP_ENOMEM;
  }
  ip->port = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0,
                                    (DWORD)concurrency);
  if (ip->port == NULL) {
    err = GetLastError();
    snprintf(why, whylen, "CreateIoCompletionPort failed with error %lu",
             (unsigned long)err);
    free(ip);
    return -(int)err;
  }
  /* Cannot fail since Windows Vista. */
  InitializeCriticalSection(&ip->mu);
  ip->owner = port;
  ip->last_sweep = fiocp__now_ms();
  port->impl = ip;
  registry_add(ip);
  return 0;
}

static int iocp_associate(fiocp_port_t* port, fiocp_handle_t h) {
  iocp_t* ip = (iocp_t*)port->impl;
  DWORD err;
  int known;
  if ((HANDLE)h == ip->port ||
      (HANDLE)h == InterlockedCompareExchangePointer(&ip->afd, NULL, NULL))
    return FIOCP_EOWNHANDLE;
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

/* The prologue of submit(), post() and wait(): under mu, refuses a closed
 * port (returns 0) or counts the caller in (*count += 1, returns 1). For a
 * submission (op not NULL) it also readies the record for its OS call:
 * STARTING, no other backend flag, a fresh OVERLAPPED. */
static int enter_if_open(iocp_t* ip, int64_t* count, fiocp_op_t* op) {
  EnterCriticalSection(&ip->mu);
  if (ip->closed) {
    LeaveCriticalSection(&ip->mu);
    return 0;
  }
  ++*count;
  if (op != NULL) {
    op->flags = (uint8_t)((op->flags & ~OPF_BACKEND) | PH_STARTING);
    if (ip->nmarks > 0) marks_drop(ip, op);
    op->bk = 0;  /* free_side() must find nothing of a start not made */
    prepare_ov_locked(op);
  }
  LeaveCriticalSection(&ip->mu);
  return 1;
}

static int iocp_submit(fiocp_port_t* port, fiocp_op_t* op, int defer) {
  iocp_t* ip = (iocp_t*)port->impl;
  uint8_t gen = op->gen;
  DWORD err;
  int queued;
  (void)defer;  /* every submission is one system call already */
  err = check_args(op);
  if (err != 0) return -(int)err;
  if (!enter_if_open(ip, &ip->owed, op)) return FIOCP_ECLOSED;
  /* A timeout exists before the operation can complete: a packet always
   * finds it (finish_record()). Failing to arm it fails the operation. */
  err = arm_timeout(ip, op);
  if (err == 0) err = start_op(ip, op);
  /* Success and ERROR_IO_PENDING both queue a packet, and so does a
   * warning status (see the head comment). */
  queued = err == 0 || err == ERROR_IO_PENDING ||
           NT_SEVERITY(op->ov.Internal) == 2;
  /* The outcome, for the packets waiting on STARTING and for the sweep.
   * A socket operation's packet may have been claimed meanwhile, but the
   * binding frees records under the GIL, which its submit() holds: the
   * generation check only guards against a future caller without it. */
  EnterCriticalSection(&ip->mu);
  if (op->gen == gen) {
    /* A socket operation that failed at once, yet whose packet another
     * thread already claimed (only tagged packets wait for STARTING): a
     * driver queued one after all, and that packet is its completion. */
    if (!queued && (op->flags & OPF_TAKEN)) queued = 1;
    /* Unless it is already past that: a multishot accept's record is
     * ISSUED by its first child, and ended (EARLY) by this file when
     * those came back at once; a pooled receive's zero-byte receive may
     * have come back and been started again or ended meanwhile. */
    if (PHASE(op) == PH_STARTING) set_phase(op, queued ? PH_ISSUED : PH_EARLY);
    /* cancel() or shutdown()'s sweep came while the OS call ran, before
     * the OVERLAPPED existed for CancelIoEx: reach it now (still under mu,
     * so the record cannot have been handed back). Free-threaded builds
     * run submit() outside the port lock; with the GIL this never fires. */
    if (queued && (op->flags & FIOCP_OPF_CANCELLED))
      (void)cancel_locked(ip, op);
  }
  if (!queued && is_argument_error(err)) {
    ip->owed--;
    marks_drop(ip, op);  /* the binding takes the record back */
  }
  LeaveCriticalSection(&ip->mu);
  if (queued) return 0;  /* another thread may own the record already */
  if (!is_argument_error(err)) {
    /* The operation itself failed: deliver that as its completion. A
     * packet the OS queued for it all the same is dropped (EARLY). */
    op->res = op_result(op, err, 0);
    if (PostQueuedCompletionStatus(ip->port, 0, MAKE_KEY(KEY_EARLY, op),
                                   &op->ov))
      return 0;
    /* Out of memory for the packet: raise the operation's error now. */
    EnterCriticalSection(&ip->mu);
    ip->owed--;
    LeaveCriticalSection(&ip->mu);
  } else if (op->kind == FIOCP_OP_ACCEPT && op->addr != NULL &&
             op->addr->accept_sock != INVALID_SOCKET) {
    closesocket(op->addr->accept_sock);
    op->addr->accept_sock = INVALID_SOCKET;
  }
  finish_record(op);  /* no packet comes: its timeout and side block go */
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
  /* A record still STARTING is cancelled by its submit() once issued. */
  ok = PHASE(op) == PH_STARTING || cancel_locked(ip, op);
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
  rc = take_entries(port, ip, ents, n, out);
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
  int64_t start = fiocp__now_ms();
  int64_t deadline = timeout_ms < 0 ? -1 : start + timeout_ms;
  int64_t slice_end = start + SLICE_MS;
  int rc;
  if (!enter_if_open(ip, &ip->nwaiters, NULL)) return FIOCP_ECLOSED;
  /* Every pass ends by the caller's deadline and by the end of this slice,
   * whatever the packets dequeued: take_entries() may consume some that
   * complete nothing (wake, stale or foreign packets, an operation started
   * again). */
  for (;;) {
    int64_t left = fiocp__remaining_ms(deadline);
    int64_t in_slice = slice_end - fiocp__now_ms();
    DWORD ms;
    if (in_slice < 0) in_slice = 0;
    ms = (DWORD)(left >= 0 && left < in_slice ? left : in_slice);
    n = 0;
    if (!GetQueuedCompletionStatusEx(ip->port, ents, want, &n, ms, FALSE)) {
      DWORD err = GetLastError();
      if (err == WAIT_TIMEOUT) {
        /* Nothing dequeued: the deadline, or the end of a slice, when the
         * caller checks for Ctrl-C and calls again (see the head comment).
         * A closed flag without a wake packet for us ends the wait too. An
         * idle moment is when orphans are looked for. */
        EnterCriticalSection(&ip->mu);
        rc = ip->closed;
        if (!rc) sweep_locked(port, ip);
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
    rc = take_entries(port, ip, ents, n, out);
    if (rc != 0) break;
    if (fiocp__remaining_ms(deadline) == 0) break;  /* rc == 0: timed out */
    if (fiocp__now_ms() >= slice_end) {
      rc = FIOCP_EINTR;  /* the slice is over: let the caller check */
      break;
    }
  }
  EnterCriticalSection(&ip->mu);
  ip->nwaiters--;
  top_up_wakes_locked(ip);
  LeaveCriticalSection(&ip->mu);
  return rc;
}

static int iocp_post(fiocp_port_t* port, fiocp_op_t* op) {
  iocp_t* ip = (iocp_t*)port->impl;
  if (!enter_if_open(ip, &ip->owed, NULL)) return FIOCP_ECLOSED;
  memset(&op->ov, 0, sizeof(op->ov));
  if (!PostQueuedCompletionStatus(ip->port, (DWORD)op->res,
                                  MAKE_KEY(KEY_POST, op), &op->ov)) {
    DWORD err = GetLastError();
    EnterCriticalSection(&ip->mu);
    ip->owed--;
    LeaveCriticalSection(&ip->mu);
    return -(int)err;
  }
  return 0;
}

static void cancel_one(fiocp_port_t* port, fiocp_op_t* op, void* arg) {
  (void)arg;
  if (op->kind == FIOCP_OP_POST) return;
  op->flags |= FIOCP_OPF_CANCELLED;
  /* Fails with ERROR_NOT_FOUND for an operation that already completed and
   * whose packet is queued: nothing to do then. A record still STARTING is
   * cancelled by its submit() once issued. */
  if (PHASE(op) != PH_STARTING)
    (void)cancel_locked((iocp_t*)port->impl, op);
}

static int64_t iocp_shutdown(fiocp_port_t* port, int64_t timeout_ms) {
  iocp_t* ip = (iocp_t*)port->impl;
  int64_t deadline = timeout_ms < 0 ? -1 : fiocp__now_ms() + timeout_ms;
  OVERLAPPED_ENTRY ents[BATCH];
  fiocp_op_t* sink[BATCH];
  assoc_t* tab = NULL;
  size_t cap = 0;
  EnterCriticalSection(&ip->mu);
  if (!ip->closed) {
    /* First call, GIL held: the slabs cannot grow, and states only change
     * under mu. */
    ip->closed = 1;
    fiocp__foreach_inflight(port, cancel_one, NULL);
    top_up_wakes_locked(ip);
    if (ip->assoc_len > 0) {
      tab = (assoc_t*)malloc(ip->assoc_cap * sizeof(assoc_t));
      if (tab != NULL) {
        memcpy(tab, ip->assoc, ip->assoc_cap * sizeof(assoc_t));
        cap = ip->assoc_cap;
      }
    }
  }
  LeaveCriticalSection(&ip->mu);
  if (tab != NULL) {
    int64_t n = cancel_foreign(ip, tab, cap);
    free(tab);
    EnterCriticalSection(&ip->mu);
    ip->foreign_owed += n;
    ip->foreign_until = fiocp__now_ms() + FOREIGN_WAIT_MS;
    LeaveCriticalSection(&ip->mu);
  }
  for (;;) {
    int64_t owed, foreign, left;
    int64_t nwaiters;
    ULONG n = 0;
    DWORD slice;
    EnterCriticalSection(&ip->mu);
    owed = ip->owed;
    foreign = ip->foreign_owed;
    if (foreign > 0 && fiocp__now_ms() > ip->foreign_until)
      foreign = ip->foreign_owed = 0;  /* they went elsewhere, or nowhere */
    nwaiters = ip->nwaiters;
    LeaveCriticalSection(&ip->mu);
    if (owed <= 0 && foreign <= 0) return 0;
    left = fiocp__remaining_ms(deadline);
    /* A call without time (the binding's first) counts the other ports'
     * packets still to forward too, so that the binding gives us the time
     * to; what the binding keeps alive on a timeout is only our own. */
    if (left == 0) return timeout_ms == 0 ? owed + foreign : owed;
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
      /* Cancelled operations that can have no packet (see the head
       * comment on BUG-7) complete through the sweep. */
      EnterCriticalSection(&ip->mu);
      sweep_locked(port, ip);
      LeaveCriticalSection(&ip->mu);
      continue;
    }
    /* Records go to the drain queue (the port is closed); leftover wake
     * packets are dropped, other ports' packets forwarded. */
    (void)take_entries(port, ip, ents, n, sink);
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
  ULONG n = 0, i;
  if (ip == NULL) return;
  /* No other port forwards to this one from now on. */
  registry_remove(ip);
  /* Only called once nothing is owed: what is left is wake packets, which
   * carry no OVERLAPPED, stale packets (see the head comment) and maybe
   * other ports' packets. Dequeue them rather than leave packets in a port
   * being closed; forwarded envelopes are ours to free. */
  while (GetQueuedCompletionStatusEx(ip->port, ents, BATCH, &n, 0, FALSE) &&
         n > 0) {
    for (i = 0; i < n; i++) {
      if (ents[i].lpCompletionKey == KEY_FWD) {
        free(ents[i].lpOverlapped);
      } else if (ents[i].lpCompletionKey == KEY_IO &&
                 ents[i].lpOverlapped != NULL &&
                 !port_owns(port, untag(ents[i].lpOverlapped))) {
        (void)forward_foreign(ip, &ents[i]);  /* a late foreign packet */
      }
    }
  }
  /* Every poll came back (nothing is owed): no request uses it. */
  if (ip->afd != NULL) (void)CloseHandle(ip->afd);
  (void)CloseHandle(ip->port);  /* nothing useful to do if it fails */
  DeleteCriticalSection(&ip->mu);
  free(ip->assoc);
  free(ip->marks);
  free(ip);
  port->impl = NULL;
}

/* What each kind is: an overlapped request of the OS (native), or our own
 * thread-pool callbacks queuing packets (emulated; timeouts too). */
static const uint8_t iocp_support[FIOCP_OP__COUNT] = {
    [FIOCP_SUPPORT_TIMEOUT] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_READ] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_WRITE] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_RECV] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SEND] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_RECVFROM] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SENDTO] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_ACCEPT] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_CONNECT] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_POST] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_POLL] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SENDMSG] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_RECVMSG] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_SENDFILE] = FIOCP_SUP_NATIVE,
    [FIOCP_OP_WAIT_PROCESS] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_TIMER] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_FSYNC] = FIOCP_SUP_EMULATED,
    [FIOCP_OP_CONNECT_PIPE] = FIOCP_SUP_NATIVE,
};

/* release is NULL: the kernel enforces the concurrency value itself, by
 * counting the threads that dequeued from the port and are running. The
 * pool members are NULL: pooled receives take from the pool's own free
 * stack (fiocp__pool_take), and the binding gives back with
 * fiocp__pool_give. native_flags is NULL: pooled receives, multishot
 * operations and zero-copy sends are this file's (a zero-byte receive, a
 * few AcceptEx, a plain send), not a mechanism of the kernel's. */
const fiocp_backend_t fiocp__iocp_backend = {
    .name = "iocp",
    .probe = iocp_probe,
    .init = iocp_init,
    .associate = iocp_associate,
    .submit = iocp_submit,
    .flush = iocp_flush,
    .cancel = iocp_cancel,
    .try_get = iocp_try_get,
    .wait = iocp_wait,
    .post = iocp_post,
    .shutdown = iocp_shutdown,
    .drain = iocp_drain,
    .destroy = iocp_destroy,
    .release = NULL,
    .support = iocp_support,
    .pool_add = NULL,
    .pool_put = NULL,
    .pool_remove = NULL,
    .native_flags = NULL,
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
