#include "csystem.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/sysmacros.h>
#include <stddef.h>

int csys_eventfd(unsigned int initval, int nonblock) {
    return eventfd(initval, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
}

int csys_eventfd_signal(int fd, uint64_t value) {
    for (;;) {
        ssize_t n = write(fd, &value, sizeof value);
        if (n == (ssize_t)sizeof value) return 0;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EIO;
    }
}

int csys_eventfd_drain(int fd, uint64_t *value) {
    for (;;) {
        ssize_t n = read(fd, value, sizeof *value);
        if (n == (ssize_t)sizeof *value) return 0;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EIO;
    }
}

int csys_memfd_create(const char *name, int sealing) {
    return memfd_create(name, MFD_CLOEXEC | (sealing ? MFD_ALLOW_SEALING : 0));
}

int csys_o_direct(void) { return O_DIRECT; }

int csys_punch_hole(int fd, uint64_t offset, uint64_t length) {
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) < 0) return -errno;
    return 0;
}

int csys_zero_range(int fd, uint64_t offset, uint64_t length, int keep_size) {
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE | (keep_size ? FALLOC_FL_KEEP_SIZE : 0), (off_t)offset, (off_t)length) < 0) return -errno;
    return 0;
}

int csys_blk_getsize64(int fd, uint64_t *bytes) { return ioctl(fd, BLKGETSIZE64, bytes) < 0 ? -errno : 0; }
int csys_blk_sszget(int fd, uint32_t *logical) {
    int v = 0;
    if (ioctl(fd, BLKSSZGET, &v) < 0) return -errno;
    *logical = (uint32_t)v;
    return 0;
}
int csys_blk_pbszget(int fd, uint32_t *physical) {
    unsigned int v = 0;
    if (ioctl(fd, BLKPBSZGET, &v) < 0) return -errno;
    *physical = v;
    return 0;
}
int csys_blk_discard(int fd, uint64_t offset, uint64_t length) {
    uint64_t range[2] = {offset, length};
    return ioctl(fd, BLKDISCARD, &range) < 0 ? -errno : 0;
}
int csys_blk_zeroout(int fd, uint64_t offset, uint64_t length) {
    uint64_t range[2] = {offset, length};
    return ioctl(fd, BLKZEROOUT, &range) < 0 ? -errno : 0;
}
int csys_blk_roget(int fd, int *readonly) { return ioctl(fd, BLKROGET, readonly) < 0 ? -errno : 0; }

ssize_t csys_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int) * 32)];
    if (nfds > 32) return -EINVAL;
    if (nfds > 0) {
        memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    for (;;) {
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : n;
    }
}

ssize_t csys_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated) {
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg;
    char control[CMSG_SPACE(sizeof(int) * 64)];
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    *nfds = 0;
    *truncated = 0;
    ssize_t n;
    for (;;) {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        break;
    }
    if (n < 0) return -errno;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *received = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < maxfds) {
                fds[(*nfds)++] = received[i];
            } else {
                close(received[i]);
                *truncated = 1;
            }
        }
    }
    return n;
}

int csys_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    return pthread_setname_np(pthread_self(), buf);
}


int64_t csys_fd_size(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    return (int64_t)st.st_size;
}

int csys_wait_readable(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        return r > 0 ? 1 : 0;
    }
}

uint32_t csys_load32_acquire(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
void csys_store32_release(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
void csys_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

int csys_set_recv_timeout(int sock, int milliseconds) {
    struct timeval tv = {.tv_sec = milliseconds / 1000, .tv_usec = (milliseconds % 1000) * 1000};
    return setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ? -errno : 0;
}

int csys_set_send_timeout(int sock, int milliseconds) {
    struct timeval tv = {.tv_sec = milliseconds / 1000, .tv_usec = (milliseconds % 1000) * 1000};
    return setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0 ? -errno : 0;
}

#include <sys/un.h>
int csys_unix_listen(const char *path, int backlog) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -errno;
    unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, backlog) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int csys_notify_send(const char *socket_path, const char *message, size_t length) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    size_t n = strlen(socket_path);
    if (n == 0 || (socket_path[0] != '/' && socket_path[0] != '@')) return -EINVAL;
    if (n >= sizeof addr.sun_path) return -ENAMETOOLONG;
    memcpy(addr.sun_path, socket_path, n);
    /* Abstract namespace: a leading NUL, and the address length counts exactly the name's bytes. */
    if (addr.sun_path[0] == '@') addr.sun_path[0] = 0;
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (socket_path[0] == '@' ? 0 : 1));
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    ssize_t sent;
    do {
        sent = sendto(fd, message, length, MSG_NOSIGNAL, (struct sockaddr *)&addr, len);
    } while (sent < 0 && errno == EINTR);
    int e = sent < 0 ? errno : 0;
    close(fd);
    if (e) return -e;
    return (size_t)sent == length ? 0 : -EMSGSIZE;
}

int csys_unix_socket_info(int fd, char *path, size_t capacity, int *listening) {
    int domain = 0, type = 0, accepting = 0;
    socklen_t optlen = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &optlen) < 0) return -errno;
    optlen = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &optlen) < 0) return -errno;
    if (domain != AF_UNIX || type != SOCK_STREAM) return -ENOTSOCK;
    optlen = sizeof accepting;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &optlen) < 0) return -errno;
    *listening = accepting ? 1 : 0;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    socklen_t alen = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &alen) < 0) return -errno;
    if (capacity == 0) return -EINVAL;
    path[0] = 0;
    size_t name = alen > offsetof(struct sockaddr_un, sun_path) ? alen - offsetof(struct sockaddr_un, sun_path) : 0;
    if (name > 0 && addr.sun_path[0] != 0) {
        size_t len = strnlen(addr.sun_path, name);
        if (len >= capacity) return -ENAMETOOLONG;
        memcpy(path, addr.sun_path, len);
        path[len] = 0;
    }
    return 0;
}

int csys_unix_connect(const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int csys_accept_nonblock(int sock) {
    int fd = accept4(sock, NULL, NULL, SOCK_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

void *csys_mmap_shared(int fd, uint64_t length, uint64_t offset, int writable) {
    void *p = mmap(NULL, (size_t)length, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

int csys_munmap(void *p, uint64_t length) { return munmap(p, (size_t)length) < 0 ? -errno : 0; }
/* ---- Back-end helpers (Backends module) ---- */
ssize_t csys_preadv2(int fd, const struct iovec *iov, int iovcnt, uint64_t offset, int flags) {
    for (;;) {
        ssize_t n = preadv2(fd, iov, iovcnt, (off_t)offset, flags);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : n;
    }
}

ssize_t csys_pwritev2(int fd, const struct iovec *iov, int iovcnt, uint64_t offset, int flags) {
    for (;;) {
        ssize_t n = pwritev2(fd, iov, iovcnt, (off_t)offset, flags);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : n;
    }
}

int csys_rwf_dsync(void) { return RWF_DSYNC; }

int csys_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align) {
#ifdef STATX_DIOALIGN
    struct statx stx;
    memset(&stx, 0, sizeof stx);
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_offset_align == 0) return -EOPNOTSUPP;
    *mem_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 0;
#else
    (void)fd; (void)mem_align; (void)offset_align;
    return -EOPNOTSUPP;
#endif
}

int csys_flock_exclusive(int fd) {
    for (;;) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return 0;
        if (errno == EINTR) continue;
        return -errno;
    }
}

int64_t csys_seek_data(int fd, uint64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_DATA);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t csys_seek_hole(int fd, uint64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_HOLE);
    return r < 0 ? -errno : (int64_t)r;
}

int csys_iov_max(void) { return IOV_MAX; }

int csys_blk_discard_supported(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    if (!S_ISBLK(st.st_mode)) return -ENOTBLK;
    char path[96];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/discard_max_bytes", major(st.st_rdev), minor(st.st_rdev));
    int sysfd = open(path, O_RDONLY | O_CLOEXEC);
    if (sysfd < 0) {
        /* Partitions: the queue directory is the parent's. */
        snprintf(path, sizeof path, "/sys/dev/block/%u:%u/../queue/discard_max_bytes", major(st.st_rdev), minor(st.st_rdev));
        sysfd = open(path, O_RDONLY | O_CLOEXEC);
        if (sysfd < 0) return -errno;
    }
    char text[32];
    ssize_t n;
    do { n = read(sysfd, text, sizeof text - 1); } while (n < 0 && errno == EINTR);
    int saved = errno;
    close(sysfd);
    if (n < 0) return -saved;
    text[n] = 0;
    return strtoull(text, NULL, 10) > 0 ? 1 : 0;
}
