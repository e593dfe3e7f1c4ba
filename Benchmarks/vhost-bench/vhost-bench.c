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
 * With -L (--dirty-log) it runs as QEMU does while migrating: it negotiates VHOST_USER_PROTOCOL_F_LOG_SHMFD and
 * VHOST_F_LOG_ALL, gives the back-end a memfd dirty log sized for its guest memory (SET_LOG_BASE, whose reply
 * it reads), sets every ring with VHOST_VRING_F_LOG and its used ring's guest address, clears the log when the
 * measured part starts, and at the end checks the log page by page: every used-ring page and every page of a
 * device-writable buffer (status/response bytes, data-in buffers of reads) marked, no other page marked. A
 * back-end that does not log fails the run (exit 1), so a figure "with logging" cannot be one without.
 * Prints one line: IOPS (measured part), kicks and interrupts per request (the device's notification
 * cost), and the requests completed over the whole run (warm-up included, for per-request counters); after a
 * SIGUSR1 also those completed since the signal ("since-mark", for a profiler zeroed at that moment).
 *
 * Usage: vhost-bench -s SOCKET [-T blk|scsi] [-w] [-d DEPTH] [-t SECONDS] [-b BYTES] [-S SPAN]
 *                    [-q QUEUES] [-e 0|1] [-l LUN] [-n RINGSIZE] [-L|--dirty-log]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
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
    GET_FEATURES = 1, SET_FEATURES = 2, SET_OWNER = 3, SET_MEM_TABLE = 5, SET_LOG_BASE = 6, SET_VRING_NUM = 8,
    SET_VRING_ADDR = 9, SET_VRING_BASE = 10, SET_VRING_KICK = 12, SET_VRING_CALL = 13,
    GET_PROTOCOL_FEATURES = 15, SET_PROTOCOL_FEATURES = 16, SET_VRING_ENABLE = 18,
};
#define F_VERSION_1 (1ULL << 32)
#define F_EVENT_IDX (1ULL << 29)
#define F_PROTOCOL_FEATURES (1ULL << 30)
#define BLK_F_MQ (1ULL << 12)
#define PROTO_F_MQ (1ULL << 0)
#define PROTO_F_LOG_SHMFD (1ULL << 1)
#define F_LOG_ALL (1ULL << 26)
#define VRING_F_LOG 1
#define LOG_PAGE 4096ULL
#define REPLY_FLAG 0x4
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

static void recv_all(void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(sock, (uint8_t *)buf + got, len - got, 0);
        if (n <= 0) die("no reply from the back-end%s", "");
        got += (size_t)n;
    }
}

/* Reads the reply to request req: checks its header, returns its payload size (at most cap bytes kept). */
static uint32_t read_reply(uint32_t req, void *payload, uint32_t cap) {
    uint32_t hdr[3];
    recv_all(hdr, 12);
    if (hdr[0] != req || !(hdr[1] & REPLY_FLAG) || hdr[2] > 4096) die("unexpected reply from the back-end%s", "");
    uint8_t buf[4096];
    recv_all(buf, hdr[2]);
    memcpy(payload, buf, hdr[2] < cap ? hdr[2] : cap);
    return hdr[2];
}

static uint64_t get_u64(uint32_t req) {
    send_msg(req, NULL, 0, NULL, 0);
    uint64_t v = 0;
    if (read_reply(req, &v, 8) != 8) die("reply of the wrong size%s", "");
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
static int dirty_log;
static _Atomic uint64_t *log_words; /* the dirty log (-L): bit n of the bitmap = guest page n */
static uint64_t log_bytes;
static uint64_t span = 256ULL << 20;
static atomic_int phase; /* 0 warm-up, 1 measuring, 2 stop */
static struct queue *all_queues;
static volatile uint64_t mark_total; /* requests completed when SIGUSR1 came (0: never) */
static volatile sig_atomic_t marked;

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
    uint8_t *resp = hdr + 128;
    if (resp[11] != 0) return 1; /* response VIRTIO_SCSI_S_OK */
    if (resp[10] == 0) return 0; /* status GOOD */
    /* CHECK CONDITION with UNIT ATTENTION (fixed or descriptor sense): the first command of a new nexus
     * (POWER ON, RESET) may get it, and a slow target may answer it after the warm-up: not a failure. */
    uint8_t *sense = resp + 12;
    uint32_t sense_len;
    memcpy(&sense_len, resp, 4);
    uint8_t key = sense_len >= 3 && (sense[0] & 0x7f) <= 0x71 ? sense[2] & 0x0f : sense_len >= 2 ? sense[1] & 0x0f : 0;
    return !(resp[10] == 0x02 && key == 0x06);
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

/* SIGUSR1: notes how many requests have completed so far, so that a profiler zeroed at the same moment can
 * divide what it counts afterwards by the requests completed afterwards ("since-mark" in the output). */
static void on_mark(int sig) {
    (void)sig;
    uint64_t t = 0;
    for (int i = 0; all_queues && i < queues; i++) t += ((volatile struct queue *)&all_queues[i])->total;
    mark_total = t;
    marked = 1;
}

/* Marks the pages of [gpa, gpa + len) in a page bitmap. */
static void mark(uint8_t *bits, uint64_t gpa, uint64_t len) {
    for (uint64_t p = gpa / LOG_PAGE; len && p <= (gpa + len - 1) / LOG_PAGE; p++) bits[p / 8] |= (uint8_t)(1u << (p % 8));
}

/* The pages a logging back-end must have marked, and only those: each queue's used ring (entries, index and
 * avail_event) and every device-writable buffer of the requests in its slots (blk status, scsi response;
 * data-in buffers of reads). Returns the number of mismatched pages (printed). */
static uint64_t check_log(const struct queue *qs) {
    uint64_t pages = mem_size / LOG_PAGE, bad = 0, marked = 0;
    uint8_t *want = calloc(1, log_bytes);
    for (int i = 0; i < queues; i++) {
        const struct queue *q = &qs[i];
        mark(want, q->used_gpa, 6 + 8ULL * q->size);
        for (int s = 0; s < depth; s++) {
            const struct desc *d = q->desc + 3 * s;
            for (int k = 0; k < 3; k++)
                if (d[k].flags & DESC_F_WRITE) mark(want, d[k].addr, d[k].len);
        }
    }
    for (uint64_t p = 0; p < pages; p++) {
        int w = (want[p / 8] >> (p % 8)) & 1;
        int got = (((const uint8_t *)log_words)[p / 8] >> (p % 8)) & 1;
        marked += (uint64_t)got;
        if (w != got) {
            if (bad < 8) fprintf(stderr, "vhost-bench: dirty log: page %" PRIu64 " %s\n", p, w ? "not marked" : "marked but never written");
            bad++;
        }
    }
    free(want);
    printf("dirty-log pages %" PRIu64 " of %" PRIu64 " marked, %" PRIu64 " wrong\n", marked, pages, bad);
    return bad;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Sleeps for `seconds`, whatever signals (SIGUSR1) interrupt it. */
static void sleep_for(double seconds) {
    double end = now() + seconds;
    for (double left = seconds; left > 0; left = end - now()) {
        struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static void usage(void) {
    fprintf(stderr, "usage: vhost-bench -s SOCKET [-T blk|scsi] [-w] [-d DEPTH] [-t SECONDS] [-b BYTES] [-S SPAN]\n"
                    "                   [-q QUEUES] [-e 0|1] [-l LUN] [-n RINGSIZE] [-L|--dirty-log]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int opt;
    static const struct option longopts[] = {{"dirty-log", no_argument, NULL, 'L'}, {0, 0, 0, 0}};
    while ((opt = getopt_long(argc, argv, "s:T:wd:t:b:S:q:e:l:n:Lh", longopts, NULL)) != -1) {
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
        case 'L': dirty_log = 1; break;
        default: usage();
        }
    }
    signal(SIGUSR1, on_mark);
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
    if (dirty_log && (!(offered & F_LOG_ALL) || !(proto & PROTO_F_LOG_SHMFD))) die("back-end lacks VHOST_F_LOG_ALL or LOG_SHMFD%s", "");
    send_u64(SET_PROTOCOL_FEATURES, proto & (PROTO_F_MQ | (dirty_log ? PROTO_F_LOG_SHMFD : 0)));
    send_msg(SET_OWNER, NULL, 0, NULL, 0);
    uint64_t features = F_VERSION_1 | F_PROTOCOL_FEATURES | (event_idx ? F_EVENT_IDX : 0) | (dirty_log ? F_LOG_ALL : 0);
    if (!scsi && queues > 1) {
        if (!(offered & BLK_F_MQ)) die("back-end lacks VIRTIO_BLK_F_MQ%s", "");
        features |= BLK_F_MQ;
    }
    send_u64(SET_FEATURES, features);
    struct { uint32_t n, pad; uint64_t gpa, size, uaddr, offset; } table = {1, 0, 0, mem_size, (uint64_t)(uintptr_t)mem, 0};
    send_msg(SET_MEM_TABLE, &table, sizeof table, &memfd, 1);
    if (dirty_log) {
        /* One bit per 4 KiB page of guest memory, in whole u64 words (as QEMU sizes it). */
        log_bytes = ((mem_size / LOG_PAGE + 63) / 64) * 8;
        uint64_t map = (log_bytes + 4095) & ~4095ULL;
        int logfd = memfd_create("vhost-bench-log", MFD_CLOEXEC);
        if (logfd < 0 || ftruncate(logfd, (off_t)map) != 0) die("log memfd: %s", strerror(errno));
        log_words = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, logfd, 0);
        if (log_words == MAP_FAILED) die("log mmap: %s", strerror(errno));
        uint64_t lb[2] = {log_bytes, 0}; /* mmap_size, mmap_offset */
        send_msg(SET_LOG_BASE, lb, sizeof lb, &logfd, 1);
        /* With LOG_SHMFD the back-end answers SET_LOG_BASE once the log is mapped (libvhost-user with a u64,
         * others empty): read that reply, whatever its payload. */
        uint64_t ignored;
        (void)read_reply(SET_LOG_BASE, &ignored, sizeof ignored);
        close(logfd);
    }

    struct queue *qs = calloc((size_t)queues, sizeof *qs);
    all_queues = qs;
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
            (uint32_t)q->index, dirty_log ? VRING_F_LOG : 0, (uint64_t)(uintptr_t)(mem + q->desc_gpa),
            (uint64_t)(uintptr_t)(mem + q->used_gpa), (uint64_t)(uintptr_t)(mem + q->avail_gpa), dirty_log ? q->used_gpa : 0};
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
    printf("running\n"); /* set-up done (a profiler may zero its counts from here, see SIGUSR1) */
    fflush(stdout);
    sleep_for(0.5);
    /* The log as the VMM syncs it: fetched and cleared word by word while the back-end sets bits. From here
     * on only what the measured part writes is in it. */
    for (uint64_t w = 0; w < log_bytes / 8; w++) atomic_exchange(&log_words[w], 0);
    atomic_store(&phase, 1);
    double t0 = now();
    sleep_for(seconds);
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
    uint64_t wrong = dirty_log ? check_log(qs) : 0;
    printf("iops %.0f kicks/req %.4f irqs/req %.4f total %" PRIu64 " errors %" PRIu64, (double)done / elapsed,
           done ? (double)kicks / (double)done : 0.0, total ? (double)irqs / (double)total : 0.0, total, errors);
    if (marked) printf(" since-mark %" PRIu64, total - mark_total);
    printf("\n");
    close(sock);
    return errors || wrong ? 1 : 0;
}
