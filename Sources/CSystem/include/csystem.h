#ifndef SCSIGATE_CSYSTEM_H
#define SCSIGATE_CSYSTEM_H
/* Thin wrappers for Linux APIs that Swift's Glibc module does not export
 * (eventfd, memfd_create, timerfd, CMSG_* macros, block-device ioctls, fallocate flags).
 * Bodies live in csystem.c, which is compiled with _GNU_SOURCE. */
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <poll.h>

/* eventfd(2). Returns fd or -1 with errno. */
int csys_eventfd(unsigned int initval, int nonblock);
/* Adds 1 (or value) to an eventfd. Returns 0 or -errno. */
int csys_eventfd_signal(int fd, uint64_t value);
/* Reads and resets an eventfd counter; returns 0 and the value, or -errno (-EAGAIN when empty). */
int csys_eventfd_drain(int fd, uint64_t *value);

/* memfd_create(2) with MFD_CLOEXEC (and MFD_ALLOW_SEALING when sealing != 0). */
int csys_memfd_create(const char *name, int sealing);

/* O_DIRECT value for open(2). */
int csys_o_direct(void);

/* fallocate(2) helpers. Return 0 or -errno. */
int csys_punch_hole(int fd, uint64_t offset, uint64_t length);
int csys_zero_range(int fd, uint64_t offset, uint64_t length, int keep_size);

/* Block device ioctls. Return 0 or -errno. */
int csys_blk_getsize64(int fd, uint64_t *bytes);
int csys_blk_sszget(int fd, uint32_t *logical);
int csys_blk_pbszget(int fd, uint32_t *physical);
int csys_blk_discard(int fd, uint64_t offset, uint64_t length);
int csys_blk_zeroout(int fd, uint64_t offset, uint64_t length);
int csys_blk_roget(int fd, int *readonly);

/* SCM_RIGHTS: send `nfds` fds with `len` bytes on a stream socket. Returns bytes sent or -errno. */
ssize_t csys_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* Receives up to `len` bytes and up to `maxfds` fds (MSG_CMSG_CLOEXEC). *nfds gets the count,
 * *truncated is set when control data was truncated (surplus fds are closed by this call).
 * Returns bytes received (0 on EOF) or -errno. */
ssize_t csys_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated);

/* Thread naming, CPU time. */
int csys_set_thread_name(const char *name);

/* Guest-shared memory accesses (vfio-user / PVSCSI rings): single loads and stores with
 * acquire/release ordering, so each field is read exactly once. */
uint32_t csys_load32_acquire(const void *p);
void csys_store32_release(void *p, uint32_t v);
void csys_fence_seq_cst(void);
/* Sets SO_RCVTIMEO / SO_SNDTIMEO on a socket (milliseconds). Return 0 or -errno. */
int csys_set_recv_timeout(int sock, int milliseconds);
int csys_set_send_timeout(int sock, int milliseconds);
/* Unix stream socket helpers. Return fd or -errno. */
int csys_unix_listen(const char *path, int backlog);
int csys_unix_connect(const char *path);
int csys_accept_nonblock(int sock);
/* systemd service notification (sd_notify protocol): sends `message` as one datagram to the
 * AF_UNIX socket `socket_path` ($NOTIFY_SOCKET: a path, or '@' for the abstract namespace).
 * Returns 0 or -errno. */
int csys_notify_send(const char *socket_path, const char *message, size_t length);
/* Describes an inherited socket (systemd socket activation): fails with -ENOTSOCK unless fd is an
 * AF_UNIX SOCK_STREAM socket; *listening is 1 when it accepts connections; its bound path is copied to
 * `path` (empty when unnamed or abstract). Returns 0 or -errno. */
int csys_unix_socket_info(int fd, char *path, size_t capacity, int *listening);
/* mmap a shared file mapping; returns NULL (and errno) on failure. */
void *csys_mmap_shared(int fd, uint64_t length, uint64_t offset, int writable);
int csys_munmap(void *p, uint64_t length);

/* Shared-memory accessors for virtqueues (guest memory written by another process):
 * acquire/release loads and stores and full fences, inlined into Swift callers. */
static inline uint16_t csys_load_acquire_u16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline uint16_t csys_load_relaxed_u16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline void csys_store_release_u16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
static inline void csys_store_relaxed_u16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline uint32_t csys_load_acquire_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline uint32_t csys_load_relaxed_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline void csys_store_release_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
/* Atomic fetch-or of one byte (dirty-page log bitmaps shared with a VMM that clears them concurrently). */
static inline void csys_atomic_or_u8(void *p, uint8_t v) { __atomic_fetch_or((uint8_t *)p, v, __ATOMIC_SEQ_CST); }

/* Size of the object behind an fd (fstat st_size), or -errno. */
int64_t csys_fd_size(int fd);
/* Waits up to timeout_ms for fd to become readable. Returns 1 ready, 0 timeout, -errno. */
int csys_wait_readable(int fd, int timeout_ms);

/* ---- Back-end helpers (Backends module) ---- */
/* preadv2/pwritev2 (flags: RWF_*). Return bytes or -errno (EINTR is retried). */
ssize_t csys_preadv2(int fd, const struct iovec *iov, int iovcnt, uint64_t offset, int flags);
ssize_t csys_pwritev2(int fd, const struct iovec *iov, int iovcnt, uint64_t offset, int flags);
/* RWF_DSYNC value (per-write O_DSYNC semantics). */
int csys_rwf_dsync(void);
/* O_DIRECT alignment from statx(STATX_DIOALIGN): memory and file-offset alignment in bytes.
 * Returns 0, -EOPNOTSUPP when the kernel or filesystem does not report it, or -errno. */
int csys_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align);
/* flock(fd, LOCK_EX | LOCK_NB). Returns 0 or -errno (-EWOULDBLOCK when held elsewhere). */
int csys_flock_exclusive(int fd);
/* lseek(fd, offset, SEEK_DATA / SEEK_HOLE). Returns the offset or -errno (-ENXIO past the end). */
int64_t csys_seek_data(int fd, uint64_t offset);
int64_t csys_seek_hole(int fd, uint64_t offset);
/* Whether the block device behind fd accepts discards: reads
 * /sys/dev/block/MAJOR:MINOR/queue/discard_max_bytes. Returns 1, 0, or -errno. */
int csys_blk_discard_supported(int fd);
/* IOV_MAX */
int csys_iov_max(void);

#endif
