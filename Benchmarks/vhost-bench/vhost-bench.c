/*
 * vhost-bench: a busy-polling vhost-user front-end for benchmarks.
 *
 * It connects to a vhost-user-blk or vhost-user-scsi back-end socket, shares a memfd as "guest"
 * memory (guest physical 0 = offset 0), sets up split rings, negotiates features (EVENT_IDX on or
 * off) and drives 4 KiB (-b) random reads or writes at queue depth -d for -t seconds, with virtio-blk
 * requests or virtio-scsi READ(10)/WRITE(10). It never waits for interrupts: it polls the used ring
 * and asks for none (VRING_AVAIL_F_NO_INTERRUPT, or a used_event kept half a ring ahead with
 * EVENT_IDX). It kicks only when the device asks (VRING_USED_F_NO_NOTIFY / avail_event).
 *
 * With -q N, N request queues are driven by N threads (one queue each).
 * Prints one line: IOPS (measured part), kicks and interrupts per request (the device's notification
 * cost), and the requests completed over the whole run (warm-up included, for per-request counters).
 *
 * Usage: vhost-bench -s SOCKET [-T blk|scsi] [-w] [-d DEPTH] [-t SECONDS] [-b BYTES] [-S SPAN]
 *                    [-q QUEUES] [-e 0|1] [-l LUN] [-n RINGSIZE]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum {
    GET_FEATURES = 1, SET_FEATURES = 2, SET_OWNER = 3, SET_MEM_TABLE = 5, SET_VRING_NUM = 8,
    SET_VRING_ADDR = 9, SET_VRING_BASE = 10, SET_VRING_KICK = 12, SET_VRING_CALL = 13,
    GET_PROTOCOL_FEATURES = 15, SET_PROTOCOL_FEATURES = 16, SET_VRING_ENABLE = 18,
};
#define F_VERSION_1 (1ULL << 32)
#define F_EVENT_IDX (1ULL << 29)
#define F_PROTOCOL_FEATURES (1ULL << 30)
#define BLK_F_MQ (1ULL << 12)
#define PROTO_F_MQ (1ULL << 0)
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "vhost-bench: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    exit(2);
}

static int sock = -1;

static void send_msg(uint32_t req, const void *payload, uint32_t size, const int *fds, int nfds) {
    uint8_t buf[512];
    uint32_t hdr[3] = {req, 1, size};
    memcpy(buf, hdr, 12);
    if (size) memcpy(buf + 12, payload, size);
    struct iovec iov = {buf, 12 + size};
    char ctl[CMSG_SPACE(sizeof(int) * 8)];
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (nfds > 0) {
        memset(ctl, 0, sizeof ctl);
        m.msg_control = ctl;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    if (sendmsg(sock, &m, 0) != (ssize_t)(12 + size)) die("sendmsg: %s", strerror(errno));
}

static void send_u64(uint32_t req, uint64_t v) { send_msg(req, &v, 8, NULL, 0); }

static uint64_t get_u64(uint32_t req) {
    send_msg(req, NULL, 0, NULL, 0);
    uint8_t buf[20];
    size_t got = 0;
    while (got < 20) {
        ssize_t n = recv(sock, buf + got, 20 - got, 0);
        if (n <= 0) die("no reply from the back-end%s", "");
        got += (size_t)n;
    }
    uint64_t v;
    memcpy(&v, buf + 12, 8);
    return v;
}

static void send_state(uint32_t req, uint32_t index, uint32_t num) {
    uint32_t p[2] = {index, num};
    send_msg(req, p, 8, NULL, 0);
}

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

/* One queue, driven by one thread. */
struct queue {
    int index;            /* vhost-user ring index */
    unsigned size;        /* ring entries */
    struct desc *desc;
    uint16_t *avail;      /* flags, idx, ring[size], used_event */
    uint16_t *used;       /* flags, idx, ring[size] (8 bytes each), avail_event */
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint8_t *slots;       /* per-request header + status/response area */
    uint64_t slots_gpa;
    uint8_t *data;
    uint64_t data_gpa;
    int kick, call;
    uint16_t avail_idx, last_used;
    uint64_t done, total, kicks, errors;
    uint64_t seed;
    pthread_t thread;
};

static uint8_t *mem;
static uint64_t mem_size;
static int scsi, writes, event_idx = 1, depth = 32, block = 4096, seconds = 5, queues = 1, lun = 0;
static unsigned ring_size = 256;
static uint64_t span = 256ULL << 20;
static atomic_int phase; /* 0 warm-up, 1 measuring, 2 stop */

#define SLOT_BYTES 256 /* blk: header 16 at 0, status at 128; scsi: request 51 at 0, response 108 at 128 */

static inline uint64_t next_random(struct queue *q) {
    q->seed ^= q->seed << 13;
    q->seed ^= q->seed >> 7;
    q->seed ^= q->seed << 17;
    return q->seed;
}

/* Fills slot s (descriptors 3s..3s+2) with a new random request and puts it in the avail ring. */
static inline void queue_request(struct queue *q, unsigned s) {
    uint64_t blocks = span / (uint64_t)block;
    uint64_t offset = (next_random(q) % blocks) * (uint64_t)block;
    uint8_t *hdr = q->slots + (size_t)s * SLOT_BYTES;
    uint64_t hdr_gpa = q->slots_gpa + (uint64_t)s * SLOT_BYTES;
    struct desc *d = q->desc + 3 * s;
    uint64_t data_gpa = q->data_gpa + (uint64_t)s * (uint64_t)block;
    if (!scsi) {
        uint32_t type = writes ? 1 : 0;
        uint64_t sector = offset / 512;
        memcpy(hdr, &type, 4);
        memset(hdr + 4, 0, 4);
        memcpy(hdr + 8, &sector, 8);
        hdr[128] = 0xff;
        d[0] = (struct desc){hdr_gpa, 16, DESC_F_NEXT, (uint16_t)(3 * s + 1)};
        d[1] = (struct desc){data_gpa, (uint32_t)block, (uint16_t)(DESC_F_NEXT | (writes ? 0 : DESC_F_WRITE)), (uint16_t)(3 * s + 2)};
        d[2] = (struct desc){hdr_gpa + 128, 1, DESC_F_WRITE, 0};
    } else {
        uint32_t lba = (uint32_t)(offset / 512);
        uint16_t count = (uint16_t)(block / 512);
        memset(hdr, 0, 51);
        hdr[0] = 1;
        hdr[1] = 0;
        hdr[2] = (uint8_t)(0x40 | (lun >> 8));
        hdr[3] = (uint8_t)lun;
        memcpy(hdr + 8, &s, 4); /* tag */
        uint8_t *cdb = hdr + 19;
        cdb[0] = writes ? 0x2a : 0x28;
        cdb[2] = (uint8_t)(lba >> 24); cdb[3] = (uint8_t)(lba >> 16); cdb[4] = (uint8_t)(lba >> 8); cdb[5] = (uint8_t)lba;
        cdb[7] = (uint8_t)(count >> 8); cdb[8] = (uint8_t)count;
        hdr[128 + 11] = 0xff; /* response byte */
        d[0] = (struct desc){hdr_gpa, 51, DESC_F_NEXT, (uint16_t)(3 * s + 1)};
        if (writes) {
            d[1] = (struct desc){data_gpa, (uint32_t)block, DESC_F_NEXT, (uint16_t)(3 * s + 2)};
            d[2] = (struct desc){hdr_gpa + 128, 108, DESC_F_WRITE, 0};
        } else {
            d[1] = (struct desc){hdr_gpa + 128, 108, DESC_F_NEXT | DESC_F_WRITE, (uint16_t)(3 * s + 2)};
            d[2] = (struct desc){data_gpa, (uint32_t)block, DESC_F_WRITE, 0};
        }
    }
    q->avail[2 + (q->avail_idx % q->size)] = (uint16_t)(3 * s);
    q->avail_idx++;
}

static inline int request_failed(struct queue *q, unsigned s) {
    uint8_t *hdr = q->slots + (size_t)s * SLOT_BYTES;
    if (!scsi) return hdr[128] != 0;
    return hdr[128 + 11] != 0 || hdr[128 + 10] != 0; /* response VIRTIO_SCSI_S_OK, status GOOD */
}

/* Publishes the avail index and kicks when the device asks for it. */
static inline void publish(struct queue *q, uint16_t old) {
    atomic_store_explicit((_Atomic uint16_t *)&q->avail[1], q->avail_idx, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    int need;
    if (event_idx) {
        uint16_t ev = atomic_load_explicit((_Atomic uint16_t *)&q->used[2 + 4 * q->size], memory_order_relaxed);
        need = (uint16_t)(q->avail_idx - ev - 1) < (uint16_t)(q->avail_idx - old);
    } else {
        need = !(atomic_load_explicit((_Atomic uint16_t *)&q->used[0], memory_order_relaxed) & 1);
    }
    if (need) {
        uint64_t one = 1;
        if (write(q->kick, &one, 8) != 8) die("kick: %s", strerror(errno));
        q->kicks++;
    }
}

static void *drive(void *arg) {
    struct queue *q = arg;
    int measuring = 0;
    uint64_t done = 0, kicks = 0;
    for (int s = 0; s < depth; s++) queue_request(q, (unsigned)s);
    publish(q, 0);
    for (;;) {
        int p = atomic_load_explicit(&phase, memory_order_relaxed);
        if (p == 2) break;
        if (p == 1 && !measuring) { measuring = 1; done = 0; kicks = q->kicks; q->errors = 0; }
        uint16_t used = atomic_load_explicit((_Atomic uint16_t *)&q->used[1], memory_order_acquire);
        if (used == q->last_used) continue;
        uint16_t old = q->avail_idx;
        while (q->last_used != used) {
            uint32_t id = *(uint32_t *)&q->used[2 + 4 * (q->last_used % q->size)];
            q->last_used++;
            unsigned s = id / 3;
            if (id % 3 != 0 || s >= (unsigned)depth) die("bad used id%s", "");
            if (request_failed(q, s)) q->errors++;
            done++;
            q->total++;
            queue_request(q, s);
        }
        /* No interrupts wanted: used_event half a ring of indexes ahead (EVENT_IDX), or the flag. */
        if (event_idx) q->avail[2 + q->size] = (uint16_t)(q->last_used + 0x7fff);
        publish(q, old);
    }
    q->done = done;
    q->kicks -= kicks;
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(void) {
    fprintf(stderr, "usage: vhost-bench -s SOCKET [-T blk|scsi] [-w] [-d DEPTH] [-t SECONDS] [-b BYTES] [-S SPAN]\n"
                    "                   [-q QUEUES] [-e 0|1] [-l LUN] [-n RINGSIZE]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "s:T:wd:t:b:S:q:e:l:n:h")) != -1) {
        switch (opt) {
        case 's': path = optarg; break;
        case 'T': scsi = strcmp(optarg, "scsi") == 0; if (!scsi && strcmp(optarg, "blk")) usage(); break;
        case 'w': writes = 1; break;
        case 'd': depth = atoi(optarg); break;
        case 't': seconds = atoi(optarg); break;
        case 'b': block = atoi(optarg); break;
        case 'S': span = strtoull(optarg, NULL, 0); break;
        case 'q': queues = atoi(optarg); break;
        case 'e': event_idx = atoi(optarg); break;
        case 'l': lun = atoi(optarg); break;
        case 'n': ring_size = (unsigned)atoi(optarg); break;
        default: usage();
        }
    }
    if (!path || depth < 1 || seconds < 1 || block < 512 || block % 512 || queues < 1 || queues > 16 || lun < 0 || lun > 16383
        || ring_size & (ring_size - 1) || (unsigned)depth * 3 > ring_size || span < (uint64_t)block)
        usage();

    /* Guest memory: per queue a 64 KiB ring area, the slot area, and depth data buffers. */
    uint64_t per_queue = 65536 + (uint64_t)depth * SLOT_BYTES + (uint64_t)depth * block;
    per_queue = (per_queue + 0x1fffff) & ~0x1fffffULL;
    mem_size = per_queue * (uint64_t)queues;
    int memfd = memfd_create("vhost-bench-guest", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)mem_size) != 0) die("memfd: %s", strerror(errno));
    mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, memfd, 0);
    if (mem == MAP_FAILED) die("mmap: %s", strerror(errno));

    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) die("connect: %s", strerror(errno));

    uint64_t offered = get_u64(GET_FEATURES);
    if (!(offered & F_VERSION_1) || !(offered & F_PROTOCOL_FEATURES)) die("back-end lacks VERSION_1 or PROTOCOL_FEATURES%s", "");
    if (event_idx && !(offered & F_EVENT_IDX)) die("back-end lacks EVENT_IDX%s", "");
    uint64_t proto = get_u64(GET_PROTOCOL_FEATURES);
    send_u64(SET_PROTOCOL_FEATURES, proto & PROTO_F_MQ);
    send_msg(SET_OWNER, NULL, 0, NULL, 0);
    uint64_t features = F_VERSION_1 | F_PROTOCOL_FEATURES | (event_idx ? F_EVENT_IDX : 0);
    if (!scsi && queues > 1) {
        if (!(offered & BLK_F_MQ)) die("back-end lacks VIRTIO_BLK_F_MQ%s", "");
        features |= BLK_F_MQ;
    }
    send_u64(SET_FEATURES, features);
    struct { uint32_t n, pad; uint64_t gpa, size, uaddr, offset; } table = {1, 0, 0, mem_size, (uint64_t)(uintptr_t)mem, 0};
    send_msg(SET_MEM_TABLE, &table, sizeof table, &memfd, 1);

    struct queue *qs = calloc((size_t)queues, sizeof *qs);
    for (int i = 0; i < queues; i++) {
        struct queue *q = &qs[i];
        uint64_t base = per_queue * (uint64_t)i;
        q->index = scsi ? 2 + i : i;
        q->size = ring_size;
        q->desc_gpa = base;
        q->avail_gpa = base + 16ULL * ring_size;
        q->used_gpa = (q->avail_gpa + 6 + 2ULL * ring_size + 4095) & ~4095ULL;
        q->slots_gpa = 65536 + base;
        q->data_gpa = (q->slots_gpa + (uint64_t)depth * SLOT_BYTES + 4095) & ~4095ULL;
        q->desc = (struct desc *)(mem + q->desc_gpa);
        q->avail = (uint16_t *)(mem + q->avail_gpa);
        q->used = (uint16_t *)(mem + q->used_gpa);
        q->slots = mem + q->slots_gpa;
        q->data = mem + q->data_gpa;
        q->seed = 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1);
        memset(q->data, 0x5a, (size_t)depth * block);
        if (!event_idx) q->avail[0] = 1; /* VRING_AVAIL_F_NO_INTERRUPT */
        else q->avail[2 + ring_size] = 0x7fff;
        q->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        q->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        send_state(SET_VRING_NUM, (uint32_t)q->index, ring_size);
        struct { uint32_t index, flags; uint64_t desc, used, avail, log; } va = {
            (uint32_t)q->index, 0, (uint64_t)(uintptr_t)(mem + q->desc_gpa), (uint64_t)(uintptr_t)(mem + q->used_gpa),
            (uint64_t)(uintptr_t)(mem + q->avail_gpa), 0};
        send_msg(SET_VRING_ADDR, &va, sizeof va, NULL, 0);
        send_state(SET_VRING_BASE, (uint32_t)q->index, 0);
        uint64_t idx = (uint64_t)q->index;
        send_msg(SET_VRING_CALL, &idx, 8, &q->call, 1);
        send_msg(SET_VRING_KICK, &idx, 8, &q->kick, 1);
        send_state(SET_VRING_ENABLE, (uint32_t)q->index, 1);
    }
    /* A round trip: every message above has been handled before the rings are used. */
    (void)get_u64(GET_FEATURES);

    for (int i = 0; i < queues; i++) pthread_create(&qs[i].thread, NULL, drive, &qs[i]);
    usleep(500000);
    atomic_store(&phase, 1);
    double t0 = now();
    usleep((useconds_t)seconds * 1000000);
    atomic_store(&phase, 2);
    double elapsed = now() - t0;
    uint64_t done = 0, total = 0, kicks = 0, errors = 0, irqs = 0;
    for (int i = 0; i < queues; i++) {
        pthread_join(qs[i].thread, NULL);
        done += qs[i].done;
        total += qs[i].total;
        kicks += qs[i].kicks;
        errors += qs[i].errors;
        uint64_t v = 0;
        if (read(qs[i].call, &v, 8) == 8) irqs += v;
    }
    printf("iops %.0f kicks/req %.4f irqs/req %.4f total %" PRIu64 " errors %" PRIu64 "\n", (double)done / elapsed,
           done ? (double)kicks / (double)done : 0.0, total ? (double)irqs / (double)total : 0.0, total, errors);
    close(sock);
    return errors ? 1 : 0;
}
