/* uring_abi.h: the io_uring kernel ABI, spelled out here so that building
 * needs no linux/io_uring.h (manylinux images ship kernel headers older than
 * io_uring) and running needs no liburing. Only what fastiocp uses. The
 * layouts and numbers are the kernel's (include/uapi/linux/io_uring.h);
 * they are stable ABI. */
#ifndef FIOCP_URING_ABI_H
#define FIOCP_URING_ABI_H

#include <stdint.h>

#ifndef __NR_io_uring_setup
/* The same on every architecture that uses the generic syscall table
 * (x86_64, aarch64, riscv64, ...); alpha and mips differ and are not built. */
# define __NR_io_uring_setup 425
# define __NR_io_uring_enter 426
# define __NR_io_uring_register 427
#endif

struct fu_sqe {
  uint8_t opcode;
  uint8_t flags;
  uint16_t ioprio;
  int32_t fd;
  uint64_t off;      /* offset, or addr2 */
  uint64_t addr;     /* buffer or address */
  uint32_t len;
  uint32_t op_flags; /* rw_flags, msg_flags, accept_flags, cancel_flags... */
  uint64_t user_data;
  uint16_t buf_index;
  uint16_t personality;
  int32_t splice_fd_in;
  uint64_t pad2[2];
};

struct fu_cqe {
  uint64_t user_data;
  int32_t res;
  uint32_t flags;
};

struct fu_sqring_offsets {
  uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
  uint64_t resv2;
};

struct fu_cqring_offsets {
  uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
  uint64_t resv2;
};

struct fu_params {
  uint32_t sq_entries;
  uint32_t cq_entries;
  uint32_t flags;
  uint32_t sq_thread_cpu;
  uint32_t sq_thread_idle;
  uint32_t features;
  uint32_t wq_fd;
  uint32_t resv[3];
  struct fu_sqring_offsets sq_off;
  struct fu_cqring_offsets cq_off;
};

struct fu_getevents_arg {
  uint64_t sigmask;
  uint32_t sigmask_sz;
  uint32_t pad;
  uint64_t ts;
};

struct fu_kernel_timespec {
  int64_t tv_sec;
  long long tv_nsec;
};

struct fu_probe_op {
  uint8_t op;
  uint8_t resv;
  uint16_t flags;
  uint32_t resv2;
};

struct fu_probe {
  uint8_t last_op;
  uint8_t ops_len;
  uint16_t resv;
  uint32_t resv2[3];
  struct fu_probe_op ops[];
};

/* Setup flags. */
#define FU_SETUP_CQSIZE (1U << 3)
#define FU_SETUP_CLAMP (1U << 4)
#define FU_SETUP_COOP_TASKRUN (1U << 8)  /* 5.19 */
#define FU_SETUP_TASKRUN_FLAG (1U << 9)  /* 5.19 */

/* Features. */
#define FU_FEAT_SINGLE_MMAP (1U << 0)
#define FU_FEAT_NODROP (1U << 1)
#define FU_FEAT_SUBMIT_STABLE (1U << 2)
#define FU_FEAT_RW_CUR_POS (1U << 3)
#define FU_FEAT_EXT_ARG (1U << 8)

/* io_uring_enter flags. */
#define FU_ENTER_GETEVENTS (1U << 0)
#define FU_ENTER_EXT_ARG (1U << 3)

/* sq_ring flags. */
#define FU_SQ_CQ_OVERFLOW (1U << 1)
#define FU_SQ_TASKRUN (1U << 2)  /* completions wait as task work */

/* mmap offsets. */
#define FU_OFF_SQ_RING 0ULL
#define FU_OFF_CQ_RING 0x8000000ULL
#define FU_OFF_SQES 0x10000000ULL

/* Opcodes. */
#define FU_OP_NOP 0
#define FU_OP_FSYNC 3
#define FU_OP_POLL_ADD 6
#define FU_OP_SENDMSG 9
#define FU_OP_RECVMSG 10
#define FU_OP_TIMEOUT 11
#define FU_OP_ACCEPT 13
#define FU_OP_ASYNC_CANCEL 14
#define FU_OP_LINK_TIMEOUT 15
#define FU_OP_CONNECT 16
#define FU_OP_READ 22
#define FU_OP_WRITE 23
#define FU_OP_SEND 26
#define FU_OP_RECV 27
#define FU_OP_SPLICE 30
#define FU_OP_SEND_ZC 47 /* 6.0 */

/* SQE flags (fu_sqe.flags). */
#define FU_SQE_IO_LINK (1U << 2) /* the next SQE waits for this one */
#define FU_SQE_BUFFER_SELECT (1U << 5) /* a buffer from the group in
                                          buf_index (buf_group) */

/* fu_sqe.ioprio of SEND, RECV and SEND_ZC (send/recv flags) and of
 * ACCEPT (accept flags). */
#define FU_RECVSEND_POLL_FIRST (1U << 0) /* arm the poll before trying */
#define FU_RECV_MULTISHOT (1U << 1)      /* 6.0; needs buffer select and
                                            len 0 */
#define FU_ACCEPT_MULTISHOT (1U << 0)    /* 5.19 */

/* CQE flags (fu_cqe.flags). */
#define FU_CQE_F_BUFFER (1U << 0) /* the upper 16 bits are a buffer id */
#define FU_CQE_F_MORE (1U << 1)   /* more CQEs follow for this SQE */
#define FU_CQE_F_NOTIF (1U << 3)  /* SEND_ZC: the kernel let go of the
                                     buffer */
#define FU_CQE_BUFFER_SHIFT 16

/* A provided-buffer ring (5.19): entries slots of struct fu_buf in
 * page-aligned memory of ours; the tail the kernel reads (with acquire)
 * overlays bufs[0].resv. */
struct fu_buf {
  uint64_t addr;
  uint32_t len;
  uint16_t bid;
  uint16_t resv; /* bufs[0]: the ring's tail */
};

struct fu_buf_reg {
  uint64_t ring_addr;
  uint32_t ring_entries; /* a power of two, below 65536 */
  uint16_t bgid;
  uint16_t flags;
  uint64_t resv[3];
};

/* fu_sqe.op_flags of FSYNC (fsync_flags) and TIMEOUT/LINK_TIMEOUT
 * (timeout_flags). SPLICE puts splice_off_in in addr, off_out in off, the
 * input fd in splice_fd_in and its flags in op_flags; POLL_ADD puts
 * poll32_events in op_flags (half-words swapped on big-endian). */
#define FU_FSYNC_DATASYNC (1U << 0)
#define FU_TIMEOUT_ABS (1U << 0) /* CLOCK_MONOTONIC unless a clock flag */

/* register opcodes. */
#define FU_REGISTER_PROBE 8
#define FU_REGISTER_PBUF_RING 22   /* 5.19; arg: struct fu_buf_reg, nr 1 */
#define FU_UNREGISTER_PBUF_RING 23 /* arg: struct fu_buf_reg (bgid) */
#define FU_PROBE_OP_SUPPORTED (1U << 0)

#endif /* FIOCP_URING_ABI_H */
