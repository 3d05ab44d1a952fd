/* upmig's C helper. No Python here: each function does one kernel job and
 * returns >= 0 or -errno; upmig/_native.py turns failures into exceptions. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "helper.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23      /* Linux 5.14; older headers lack it */
#endif

#define UP_IOV_BATCH 1024       /* IOV_MAX: most iovecs one call takes */
#define UP_MAX_THREADS 8

/* ---- XXH64 (Yann Collet's algorithm, written from its specification) ---- */

#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P3 1609587929392839161ULL
#define P4 9650029242287828579ULL
#define P5 2870177450012600261ULL

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t round1(uint64_t acc, uint64_t in)
{
    acc += in * P2;
    return rotl(acc, 31) * P1;
}
static inline uint64_t merge(uint64_t acc, uint64_t v)
{
    acc ^= round1(0, v);
    return acc * P1 + P4;
}

uint64_t up_xxh64(const void *buf, size_t len, uint64_t seed)
{
    const uint8_t *p = buf, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = round1(v1, rd64(p));
            v2 = round1(v2, rd64(p + 8));
            v3 = round1(v3, rd64(p + 16));
            v4 = round1(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(merge(merge(merge(h, v1), v2), v3), v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    for (; p + 8 <= end; p += 8)
        h = rotl(h ^ round1(0, rd64(p)), 27) * P1 + P4;
    if (p + 4 <= end) {
        h = rotl(h ^ ((uint64_t)rd32(p) * P1), 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; p++)
        h = rotl(h ^ (*p * P5), 11) * P1;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/* ---- the image's seal: every frame's tail is a keyed tag ---- */

_Static_assert(UP_FRAME_HEAD == 2 * sizeof(uint32_t), "a frame head is its type and length");

/* A context keyed for frame tags (AES-256-GCM with nothing to encrypt: GMAC), or
 * NULL if OpenSSL cannot make one (out of memory). */
static EVP_CIPHER_CTX *tag_context(const uint8_t key[UP_FRAME_KEY])
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* A frame's tag: GMAC of its head and payload, with the frame's offset in the image
 * as the nonce (unique within an image, whose key is its own), so a frame changed,
 * moved or dropped by anyone without the key does not verify. OpenSSL's failures
 * carry no errno: they are reported as EIO. */
static int frame_tag(EVP_CIPHER_CTX *ctx, uint64_t off, const uint8_t *head,
                     const uint8_t *payload, size_t len, uint8_t tag[UP_FRAME_TAIL])
{
    uint8_t iv[12] = { 0 }, none[16];
    int n;
    memcpy(iv, &off, sizeof(off));
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1 ||
        EVP_EncryptUpdate(ctx, NULL, &n, head, UP_FRAME_HEAD) != 1)
        return -EIO;
    while (len) {               /* OpenSSL takes an int's worth at a time */
        int piece = len > (1u << 30) ? 1 << 30 : (int)len;
        if (EVP_EncryptUpdate(ctx, NULL, &n, payload, piece) != 1)
            return -EIO;
        payload += piece;
        len -= (size_t)piece;
    }
    if (EVP_EncryptFinal_ex(ctx, none, &n) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, UP_FRAME_TAIL, tag) != 1)
        return -EIO;
    return 0;
}

/* ---- ptrace ---- */

long up_ptrace(long req, int pid, uint64_t addr, uint64_t data, uint64_t *out)
{
    errno = 0;
    long r = ptrace((enum __ptrace_request)req, pid, (void *)addr, (void *)data);
    if (r == -1 && errno)
        return -errno;
    if (out)
        *out = (uint64_t)r;
    return r < 0 ? 0 : r;
}

int up_waitpid(int pid, int *status, int flags)
{
    int r;
    do {
        r = waitpid(pid, status, flags | __WALL);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

long up_getregset(int pid, int note, void *buf, size_t len)
{
    struct iovec iov = { buf, len };
    if (ptrace(PTRACE_GETREGSET, pid, (void *)(long)note, &iov) < 0)
        return -errno;
    return (long)iov.iov_len;
}

long up_setregset(int pid, int note, const void *buf, size_t len)
{
    struct iovec iov = { (void *)buf, len };
    if (ptrace(PTRACE_SETREGSET, pid, (void *)(long)note, &iov) < 0)
        return -errno;
    return (long)iov.iov_len;
}

/* A fault of the tracee's own (the kernel's SIGSEGV at an unmapped syscall
 * instruction, say), not a signal sent to it: resuming it would fault again, for ever. */
static int faulted(int pid, int sig)
{
    siginfo_t si;
    if (sig != SIGSEGV && sig != SIGBUS && sig != SIGILL && sig != SIGFPE)
        return 0;
    if (ptrace(PTRACE_GETSIGINFO, pid, 0, &si) < 0)
        return 1;
    return si.si_code > 0;      /* SI_USER, SI_TKILL, SI_QUEUE... are <= 0 */
}

int up_inject(int pid, void *regs, long nr, const uint64_t *args, int64_t *ret,
              int *held_sig, uint64_t *clone_msg)
{
    struct user_regs_struct *r = regs;
    uint64_t rip = r->rip;
    int status;

    r->rax = (uint64_t)nr;
    r->orig_rax = (uint64_t)-1;     /* no syscall-restart fix-up on the way out */
    r->rdi = args[0];
    r->rsi = args[1];
    r->rdx = args[2];
    r->r10 = args[3];
    r->r8 = args[4];
    r->r9 = args[5];
    if (ptrace(PTRACE_SETREGS, pid, 0, r) < 0)
        return -errno;
    /* Syscall-enter stop, then syscall-exit stop. Unlike a single step, these stops
     * send the tracee no SIGTRAP (a forced SIGTRAP would reset its disposition). */
    for (int stop = 0, events = 0; stop < 2;) {
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
            return -errno;
        int w = up_waitpid(pid, &status, 0);
        if (w < 0)
            return w;
        if (!WIFSTOPPED(status))
            return -ESRCH;      /* the tracee died under us */
        if (WSTOPSIG(status) == (SIGTRAP | 0x80)) {
            stop++;
            continue;
        }
        if (status >> 16 == 128 && ++events <= 4)
            continue;           /* a job-control (group) stop, or a late interrupt trap */
        if (status >> 16 == PTRACE_EVENT_CLONE || status >> 16 == PTRACE_EVENT_FORK) {
            /* The clone we injected: the new task's id as the tracer sees it. */
            unsigned long msg = 0;
            if (ptrace(PTRACE_GETEVENTMSG, pid, 0, &msg) < 0)
                return -errno;
            *clone_msg = msg;
            continue;
        }
        if (status >> 16 != 0)
            return -ECANCELED;  /* another ptrace event: the caller must not go on */
        if (faulted(pid, WSTOPSIG(status)))
            return -EFAULT;     /* the syscall instruction cannot run there */
        /* A signal that cannot be blocked (SIGSTOP) arrived: hold it for the caller
         * to send again once the process is back as it was. */
        *held_sig = WSTOPSIG(status);
    }
    if (ptrace(PTRACE_GETREGS, pid, 0, r) < 0)
        return -errno;
    if (r->rip != rip + 2)
        return -ECANCELED;      /* the syscall instruction did not run */
    *ret = (int64_t)r->rax;
    return 0;
}

/* ---- pagemap ---- */

struct pm_scan_arg {            /* linux/fs.h, Linux 6.7 */
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)

long up_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t required,
                     uint64_t inverted, uint64_t anyof, uint64_t returned,
                     struct up_range *out, size_t max, uint64_t *walk_end)
{
    struct pm_scan_arg arg = {
        .size = sizeof(arg), .start = start, .end = end,
        .vec = (uint64_t)(uintptr_t)out, .vec_len = max,
        .category_inverted = inverted, .category_mask = required,
        .category_anyof_mask = anyof, .return_mask = returned,
    };
    long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n < 0)
        return -errno;
    *walk_end = arg.walk_end;
    return n;
}

#define PM_PRESENT (1ULL << 63)
#define PM_PFN ((1ULL << 55) - 1)
#define PM_BATCH 4096           /* pagemap entries read at once (32 KiB) */

/* pread or pwrite all of len bytes at off. */
static int rw_all(int fd, char *buf, size_t len, off_t off, int writing)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = writing ? pwrite(fd, buf + done, len - done, off + done)
                            : pread(fd, buf + done, len - done, off + done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        done += r;
    }
    return 0;
}

long up_same_pages(int pagemap_a, int pagemap_b, const struct up_range *runs, size_t nruns,
                   struct up_range *out, size_t max)
{
    static __thread uint64_t a[PM_BATCH], b[PM_BATCH];
    long page = sysconf(_SC_PAGESIZE);
    size_t n = 0;
    for (size_t i = 0; i < nruns; i++) {
        for (uint64_t at = runs[i].start; at < runs[i].end;) {
            size_t pages = (runs[i].end - at) / page;
            if (pages > PM_BATCH)
                pages = PM_BATCH;
            off_t off = at / page * sizeof(uint64_t);
            int rc = rw_all(pagemap_a, (char *)a, pages * sizeof(uint64_t), off, 0);
            if (!rc)
                rc = rw_all(pagemap_b, (char *)b, pages * sizeof(uint64_t), off, 0);
            if (rc)
                return rc;
            for (size_t p = 0; p < pages; p++, at += page) {
                if (!(a[p] & PM_PRESENT) || !(b[p] & PM_PRESENT) || !(a[p] & PM_PFN) ||
                    (a[p] & PM_PFN) != (b[p] & PM_PFN))
                    continue;
                if (n && out[n - 1].end == at) {
                    out[n - 1].end = at + page;
                    continue;
                }
                if (n == max)
                    return -ENOSPC;
                out[n].start = at;
                out[n].end = at + page;
                out[n].flags = 0;
                n++;
            }
        }
    }
    return n;
}

/* One piece through a buffer: process_vm_readv/writev, or /proc/PID/mem where a
 * protection stops those (EFAULT: PROT_NONE, read-only). */
static int copy_piece(int src_pid, int src_mem_fd, int dst_pid, int dst_mem_fd, char *buf,
                      uint64_t at, size_t len)
{
    struct iovec local = { buf, len }, remote = { (void *)(uintptr_t)at, len };
    ssize_t r = process_vm_readv(src_pid, &local, 1, &remote, 1, 0);
    int rc = r == (ssize_t)len ? 0 : rw_all(src_mem_fd, buf, len, at, 0);
    if (rc)
        return rc;
    r = process_vm_writev(dst_pid, &local, 1, &remote, 1, 0);
    return r == (ssize_t)len ? 0 : rw_all(dst_mem_fd, buf, len, at, 1);
}

long up_copy_same_addresses(int src_pid, int src_mem_fd, int dst_pid, int dst_mem_fd,
                            const struct up_range *runs, size_t nruns)
{
    enum { CHUNK = 4 << 20 };
    char *buf = malloc(CHUNK);
    long total = 0;
    if (!buf)
        return -ENOMEM;
    for (size_t i = 0; i < nruns; i++) {
        for (uint64_t at = runs[i].start; at < runs[i].end;) {
            size_t len = runs[i].end - at < CHUNK ? runs[i].end - at : CHUNK;
            int rc = copy_piece(src_pid, src_mem_fd, dst_pid, dst_mem_fd, buf, at, len);
            if (rc) {
                free(buf);
                return rc;
            }
            at += len;
            total += len;
        }
    }
    free(buf);
    return total;
}

long up_syscall4(long nr, long a, long b, long c, uint64_t d)
{
    long r = syscall(nr, a, b, c, d);
    return r < 0 ? -errno : r;
}

/* ---- bulk copies ---- */

/* A position in the byte stream formed by a list of ranges laid end to end. */
struct cursor {
    const struct up_range *r;
    size_t n, i;
    uint64_t off;               /* offset inside r[i] */
};

static void cur_skip(struct cursor *c, uint64_t len)
{
    while (len && c->i < c->n) {
        uint64_t left = c->r[c->i].end - c->r[c->i].start - c->off;
        uint64_t step = len < left ? len : left;
        c->off += step;
        len -= step;
        if (c->off == c->r[c->i].end - c->r[c->i].start) {
            c->i++;
            c->off = 0;
        }
    }
}

/* The next piece of at most len bytes, not crossing a range boundary. */
static uint64_t cur_piece(struct cursor *c, uint64_t len, uint64_t *addr)
{
    if (c->i >= c->n)
        return 0;
    uint64_t left = c->r[c->i].end - c->r[c->i].start - c->off;
    *addr = c->r[c->i].start + c->off;
    return len < left ? len : left;
}

static int write_all(int fd, struct iovec *iov, int n, int64_t off)
{
    while (n > 0) {
        ssize_t w = off >= 0 ? pwritev(fd, iov, n, off) : writev(fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        if (off >= 0)
            off += w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Read the remote pieces into buf, all of them or fail. */
static int read_remote(int pid, int mem_fd, void *buf, size_t fill, struct iovec *rem, int nrem)
{
    if (mem_fd >= 0) {
        char *dst = buf;
        for (int i = 0; i < nrem; i++) {
            size_t done = 0;
            while (done < rem[i].iov_len) {
                ssize_t r = pread(mem_fd, dst + done, rem[i].iov_len - done,
                                  (off_t)(uintptr_t)rem[i].iov_base + (off_t)done);
                if (r < 0 && errno == EINTR)
                    continue;
                if (r <= 0)
                    return r < 0 ? -errno : -EFAULT;
                done += (size_t)r;
            }
            dst += rem[i].iov_len;
        }
        return 0;
    }
    struct iovec local = { buf, fill };
    ssize_t r = process_vm_readv(pid, &local, 1, rem, (unsigned long)nrem, 0);
    if (r < 0)
        return -errno;
    return (size_t)r == fill ? 0 : -EFAULT;     /* frozen target: short means a hole */
}

/* Read chunk number idx of the runs' byte stream into buf; its length in *len. */
static int read_chunk(int pid, int mem_fd, struct cursor *cur, uint64_t *pos, uint64_t idx,
                      uint64_t chunk, uint64_t total, void *buf, uint64_t *len)
{
    struct iovec rem[UP_IOV_BATCH];
    uint64_t at = idx * chunk, want = total - at < chunk ? total - at : chunk, got = 0;
    int nrem = 0;

    cur_skip(cur, at - *pos);
    while (got < want) {
        uint64_t addr, n = cur_piece(cur, want - got, &addr);
        if (n == 0 || nrem == UP_IOV_BATCH)
            return -E2BIG;      /* cannot happen for chunk <= 4 MiB: <= 1024 pages */
        rem[nrem].iov_base = (void *)(uintptr_t)addr;
        rem[nrem].iov_len = n;
        nrem++;
        got += n;
        cur_skip(cur, n);
    }
    *pos = at + want;
    *len = want;
    return read_remote(pid, mem_fd, buf, want, rem, nrem);
}

/* Run fn over n workers' arguments (args, each size bytes apart): this thread is
 * worker 0, the others threads of their own, all joined on return. Returns how
 * many ran: fewer than n if a thread could not be made (the caller's failure). */
static int run_workers(void *(*fn)(void *), void *args, size_t size, int n)
{
    pthread_t th[UP_MAX_THREADS];
    int started = 1;

    while (started < n &&
           pthread_create(&th[started], NULL, fn, (char *)args + (size_t)started * size) == 0)
        started++;
    fn(args);
    for (int k = 1; k < started; k++)
        pthread_join(th[k], NULL);
    return started;
}

struct dump_job {               /* shared by the workers of one up_dump_pages call */
    int pid, mem_fd, out_fd, nthreads;
    uint8_t *map;               /* the image's frames mapped (MAP_SHARED), or NULL */
    const struct up_range *runs;
    size_t nruns;
    uint64_t total, chunk, nchunks, base;
    const uint8_t *key;         /* the image's frame key */
    int stream;                 /* out_fd is a pipe or socket: frames go out in order */
    pthread_mutex_t lock;       /* stream: whose turn it is to write */
    pthread_cond_t turn;
    uint64_t next;              /* stream: the chunk to be written next */
    volatile int stop;
};

struct dump_worker {
    struct dump_job *job;
    int k, err, failed_op;
};

static void stop_all(struct dump_job *j)
{
    pthread_mutex_lock(&j->lock);
    j->stop = 1;
    pthread_cond_broadcast(&j->turn);     /* no one waits for a turn that never comes */
    pthread_mutex_unlock(&j->lock);
}

/* A stream has no offsets to write at: chunk i goes out after chunk i - 1, while the
 * other workers read and tag the chunks after it. */
static int write_in_turn(struct dump_job *j, uint64_t i, struct iovec *out)
{
    pthread_mutex_lock(&j->lock);
    while (j->next != i && !j->stop)
        pthread_cond_wait(&j->turn, &j->lock);
    int stopped = j->stop;
    pthread_mutex_unlock(&j->lock);
    if (stopped)
        return -ECANCELED;      /* another worker failed: its error is the one */
    int r = write_all(j->out_fd, out, 3, -1);
    pthread_mutex_lock(&j->lock);
    j->next++;
    pthread_cond_broadcast(&j->turn);
    pthread_mutex_unlock(&j->lock);
    return r;
}

static void *dump_worker(void *arg)
{
    struct dump_worker *w = arg;
    struct dump_job *j = w->job;
    struct cursor cur = { j->runs, j->nruns, 0, 0 };
    uint64_t pos = 0;
    uint8_t *buf = j->map ? NULL : malloc(j->chunk);
    EVP_CIPHER_CTX *ctx = tag_context(j->key);

    if ((!j->map && !buf) || !ctx) {
        w->err = -ENOMEM;
        stop_all(j);
        free(buf);
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    for (uint64_t i = (uint64_t)w->k; i < j->nchunks && !j->stop; i += (uint64_t)j->nthreads) {
        uint64_t off = i * (UP_FRAME_HEAD + j->chunk + UP_FRAME_TAIL), len;
        /* With the image mapped, the kernel copies the target's pages straight into
         * the image's pages: one copy, and no file lock shared by the workers. */
        uint8_t *dst = j->map ? j->map + off + UP_FRAME_HEAD : buf;   /* map starts at base */
        int r = read_chunk(j->pid, j->mem_fd, &cur, &pos, i, j->chunk, j->total, dst, &len);
        if (r < 0) {
            w->err = r;
            w->failed_op = 1;
            break;
        }
        uint32_t head32[2] = { UP_FRAME_DATA, (uint32_t)len };
        uint8_t head[UP_FRAME_HEAD], tag[UP_FRAME_TAIL];
        memcpy(head, head32, sizeof(head));
        r = frame_tag(ctx, j->base + off, head, dst, len, tag);  /* while dst is hot */
        if (r < 0) {
            w->err = r;
            w->failed_op = 3;
            break;
        }
        if (j->map) {
            memcpy(j->map + off, head, sizeof(head));
            memcpy(j->map + off + UP_FRAME_HEAD + len, tag, sizeof(tag));
            continue;
        }
        struct iovec out[3] = { { head, sizeof(head) }, { buf, len }, { tag, sizeof(tag) } };
        r = j->stream ? write_in_turn(j, i, out) : write_all(j->out_fd, out, 3,
                                                             (int64_t)(j->base + off));
        if (r < 0) {
            w->err = r;
            w->failed_op = 2;
            break;
        }
    }
    if (w->err)
        stop_all(j);
    free(buf);
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* Map the image's next size bytes for the workers when the file system lets us
 * reserve them first (fallocate: a full disk is then an error here, never a
 * SIGBUS later); otherwise leave j->map NULL and the workers pwrite. */
static int map_image(struct dump_job *j, uint64_t size, size_t *map_len)
{
    if (size < (16u << 20))
        return 0;               /* small: not worth a mapping */
    if (fallocate(j->out_fd, 0, (off_t)j->base, (off_t)size) < 0)
        return errno == EOPNOTSUPP || errno == ENODEV ? 0 : -errno;
    uint64_t lead = j->base & 4095;
    *map_len = size + lead;
    void *m = mmap(NULL, *map_len, PROT_READ | PROT_WRITE, MAP_SHARED, j->out_fd,
                   (off_t)(j->base - lead));
    if (m == MAP_FAILED)
        return 0;               /* pwrite will do */
    j->map = (uint8_t *)m + lead;
    return 0;
}

long up_dump_pages(int pid, int mem_fd, const struct up_range *runs, size_t nruns,
                   int out_fd, uint64_t off, int stream, size_t chunk, int nthreads,
                   const uint8_t *key, struct up_copy_stats *stats)
{
    struct dump_job j = { .pid = pid, .mem_fd = mem_fd, .out_fd = out_fd, .runs = runs,
                          .nruns = nruns, .chunk = chunk, .key = key, .base = off,
                          .stream = stream, .lock = PTHREAD_MUTEX_INITIALIZER,
                          .turn = PTHREAD_COND_INITIALIZER };
    struct dump_worker w[UP_MAX_THREADS];

    stats->failed_op = 0;
    for (size_t i = 0; i < nruns; i++)
        j.total += runs[i].end - runs[i].start;
    if (chunk > (4u << 20) || nthreads < 1 || nthreads > UP_MAX_THREADS)
        return -EINVAL;
    j.nchunks = (j.total + chunk - 1) / chunk;
    if (j.nchunks < (uint64_t)nthreads)
        nthreads = j.nchunks ? (int)j.nchunks : 1;
    j.nthreads = nthreads;
    uint64_t size = j.nchunks * (UP_FRAME_HEAD + UP_FRAME_TAIL) + j.total;
    size_t map_len = 0;
    int err = stream ? 0 : map_image(&j, size, &map_len);
    if (err) {
        stats->failed_op = 2;
        return err;
    }
    for (int k = 0; k < nthreads; k++)
        w[k] = (struct dump_worker){ .job = &j, .k = k };
    int started = run_workers(dump_worker, w, sizeof(w[0]), nthreads);
    if (started < nthreads)
        err = -EAGAIN;          /* the chunks of the missing workers were not copied */
    for (int k = 0; k < started && !err; k++) {
        if (w[k].err && w[k].err != -ECANCELED) {
            err = w[k].err;
            stats->failed_op = w[k].failed_op;
        }
    }
    if (j.map)
        munmap(j.map - (j.base & 4095), map_len);
    if (err)
        return err;
    if (!stream && lseek(out_fd, (off_t)(j.base + size), SEEK_SET) < 0)
        return -errno;
    stats->bytes = j.total;
    stats->frames = j.nchunks;
    return (long)j.total;
}

/* ---- restore: fill the target's memory ---- */

struct fill_job {
    int pid, mem_fd, err;
    const struct up_range *src, *dst;
    size_t nsrc, ndst;
    uint64_t from, len;         /* this worker's part of the byte stream */
};

static int put_pieces(struct fill_job *f, struct iovec *loc, struct iovec *rem, int n,
                      uint64_t batch)
{
    if (f->mem_fd < 0) {
        ssize_t w = process_vm_writev(f->pid, loc, (unsigned long)n, rem, (unsigned long)n, 0);
        if (w < 0)
            return -errno;
        return (uint64_t)w == batch ? 0 : -EFAULT;
    }
    for (int i = 0; i < n; i++) {
        size_t done = 0;
        while (done < rem[i].iov_len) {
            ssize_t w = pwrite(f->mem_fd, (char *)loc[i].iov_base + done, rem[i].iov_len - done,
                               (off_t)(uintptr_t)rem[i].iov_base + (off_t)done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return w < 0 ? -errno : -EFAULT;
            done += (size_t)w;
        }
    }
    return 0;
}

static void *fill_worker(void *arg)
{
    struct fill_job *f = arg;
    struct iovec loc[UP_IOV_BATCH], rem[UP_IOV_BATCH];
    struct cursor s = { f->src, f->nsrc, 0, 0 }, d = { f->dst, f->ndst, 0, 0 };
    uint64_t left = f->len;

    cur_skip(&s, f->from);
    cur_skip(&d, f->from);
    while (left && !f->err) {
        int n = 0;
        uint64_t batch = 0;
        /* Cut both lists at every boundary of either, so piece i of each side match. */
        while (n < UP_IOV_BATCH && left) {
            uint64_t sa, da, sl = cur_piece(&s, left, &sa), dl = cur_piece(&d, left, &da);
            uint64_t len = sl < dl ? sl : dl;
            if (len == 0) {
                f->err = -EINVAL;       /* the lists' lengths differ */
                return NULL;
            }
            loc[n].iov_base = (void *)(uintptr_t)sa;
            rem[n].iov_base = (void *)(uintptr_t)da;
            loc[n].iov_len = rem[n].iov_len = len;
            n++;
            batch += len;
            left -= len;
            cur_skip(&s, len);
            cur_skip(&d, len);
        }
        f->err = put_pieces(f, loc, rem, n, batch);
    }
    return NULL;
}

long up_fill_pages(int pid, int mem_fd, const struct up_range *src, size_t nsrc,
                   const struct up_range *dst, size_t ndst, int nthreads)
{
    struct fill_job f[UP_MAX_THREADS];
    uint64_t total = 0;

    for (size_t i = 0; i < ndst; i++)
        total += dst[i].end - dst[i].start;
    if (nthreads < 1 || nthreads > UP_MAX_THREADS)
        return -EINVAL;
    /* Equal parts on page boundaries, so no two workers touch one page. */
    uint64_t part = ((total / (uint64_t)nthreads) + 4095) & ~4095ULL;
    for (int k = 0; k < nthreads; k++) {
        uint64_t from = (uint64_t)k * part;
        f[k] = (struct fill_job){ .pid = pid, .mem_fd = mem_fd, .src = src, .nsrc = nsrc,
                                  .dst = dst, .ndst = ndst, .from = from,
                                  .len = from >= total ? 0 : (total - from < part ? total - from
                                                                                  : part) };
    }
    int started = run_workers(fill_worker, f, sizeof(f[0]), nthreads);
    if (started < nthreads)
        return -EAGAIN;         /* the parts of the missing workers were not filled */
    for (int k = 0; k < started; k++)
        if (f[k].err)
            return f[k].err;
    return (long)total;
}

/* ---- resume: an image from a stream ---- */

/* Read exactly len bytes; -ENODATA if the stream ends first. */
static int read_exact(int fd, uint8_t *buf, uint64_t len, uint64_t *got)
{
    while (len) {
        ssize_t r = read(fd, buf, len > (1u << 30) ? (1u << 30) : len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -ENODATA;
        buf += r;
        len -= (uint64_t)r;
        *got += (uint64_t)r;
    }
    return 0;
}

/* Room for need more bytes after used: the mapping doubled (it moves) when short. */
static int grow(uint8_t **base, uint64_t *size, uint64_t used, uint64_t need, uint64_t cap)
{
    if (used + need <= *size)
        return 0;
    if (used + need > cap)
        return -EFBIG;
    uint64_t want = *size;
    while (want < used + need)
        want *= 2;
    if (want > cap)
        want = cap;
    void *m = mremap(*base, *size, want, MREMAP_MAYMOVE);
    if (m == MAP_FAILED)
        return -errno;

    *base = m;
    *size = want;
    return 0;
}

long up_read_stream(int fd, const void *prefix, size_t prefix_len, int head_in_prefix,
                    uint64_t max_payload, uint64_t cap, void **base_out, uint64_t *size_out,
                    uint64_t *len_out)
{
    uint64_t size = prefix_len > (32u << 20) ? 2 * (uint64_t)prefix_len : 64u << 20;
    uint64_t got = prefix_len;
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t head[2];
    int r = 0;

    if (base == MAP_FAILED)
        return -errno;

    memcpy(base, prefix, prefix_len);
    /* Frame by frame, each read asking for the frame's rest and the next head, so
     * that nothing after the trailer is consumed (a socket may carry more). */
    if (head_in_prefix && prefix_len < UP_FRAME_HEAD)
        r = -EINVAL;
    if (!r && !head_in_prefix) {
        r = grow(&base, &size, got, UP_FRAME_HEAD, cap);
        if (!r)
            r = read_exact(fd, base + got, UP_FRAME_HEAD, &got);
    }
    while (!r) {
        memcpy(head, base + got - UP_FRAME_HEAD, sizeof(head));
        if (head[0] < UP_FRAME_RECORD || head[0] > UP_FRAME_TRAILER || head[1] > max_payload) {
            r = -EINVAL;        /* not a frame: the walk names the offset */
            break;
        }
        int last = head[0] == UP_FRAME_TRAILER;
        uint64_t rest = (uint64_t)head[1] + UP_FRAME_TAIL + (last ? 0 : UP_FRAME_HEAD);
        r = grow(&base, &size, got, rest, cap);
        if (!r) {   /* the frame's pages in one go, not a fault each: ~20% of the read */
            uint64_t from = got & ~4095ULL, len = got + rest - from;
            madvise(base + from, len, MADV_POPULATE_WRITE);     /* only ever faster */
        }
        if (!r)
            r = read_exact(fd, base + got, rest, &got);
        if (!r && last)
            break;
    }
    *base_out = base;
    *size_out = size;
    *len_out = got;
    return r;
}

/* Write len bytes of buf to the next pieces of cur: into pid's memory, or at those
 * offsets of the file out_fd when out_fd >= 0. */
static int put_stream_bytes(int pid, int out_fd, struct cursor *cur, const uint8_t *buf,
                            uint64_t len)
{
    while (len) {
        struct iovec loc[UP_IOV_BATCH], rem[UP_IOV_BATCH];
        uint64_t batch = 0;
        int n = 0;
        while (n < UP_IOV_BATCH && batch < len) {
            uint64_t addr, piece = cur_piece(cur, len - batch, &addr);
            if (piece == 0)
                return -EINVAL;         /* more bytes than runs: cannot happen */
            loc[n].iov_base = (void *)(buf + batch);
            rem[n].iov_base = (void *)(uintptr_t)addr;
            loc[n].iov_len = rem[n].iov_len = piece;
            n++;
            batch += piece;
            cur_skip(cur, piece);
        }
        if (out_fd < 0) {
            ssize_t w = process_vm_writev(pid, loc, (unsigned long)n, rem, (unsigned long)n, 0);
            if (w < 0)
                return -errno;
            if ((uint64_t)w != batch)
                return -EFAULT;
        } else {
            for (int i = 0; i < n; i++) {
                int r = rw_all(out_fd, loc[i].iov_base, loc[i].iov_len,
                               (off_t)(uintptr_t)rem[i].iov_base, 1);
                if (r < 0)
                    return r;
            }
        }
        buf += batch;
        len -= batch;
    }
    return 0;
}

long up_fill_from_stream(int in_fd, int pid, int out_fd, const struct up_range *runs,
                         size_t nruns, const uint8_t *key, uint64_t max_payload,
                         const uint8_t *first_head, uint64_t *off)
{
    struct cursor cur = { runs, nruns, 0, 0 };
    uint64_t total = 0, done = 0, got = 0, cap = 0;
    uint8_t *buf = NULL;
    EVP_CIPHER_CTX *ctx = tag_context(key);
    int r = ctx ? 0 : -ENOMEM;

    for (size_t i = 0; i < nruns; i++)
        total += runs[i].end - runs[i].start;
    while (!r && done < total) {
        uint8_t head[UP_FRAME_HEAD], tag[UP_FRAME_TAIL];
        uint32_t h[2];
        if (first_head) {
            memcpy(head, first_head, sizeof(head));
            first_head = NULL;
        } else if ((r = read_exact(in_fd, head, sizeof(head), &got)) < 0) {
            break;
        }
        memcpy(h, head, sizeof(h));
        if (h[0] != UP_FRAME_DATA || h[1] == 0 || h[1] > max_payload || h[1] > total - done) {
            r = -EINVAL;        /* not the data this pages record is owed */
            break;
        }
        if (h[1] + UP_FRAME_TAIL > cap) {
            free(buf);
            cap = h[1] + UP_FRAME_TAIL;
            if (!(buf = malloc(cap))) {
                r = -ENOMEM;
                break;
            }
        }
        if ((r = read_exact(in_fd, buf, h[1] + UP_FRAME_TAIL, &got)) < 0)
            break;
        if ((r = frame_tag(ctx, *off, head, buf, h[1], tag)) < 0)
            break;
        if (CRYPTO_memcmp(tag, buf + h[1], UP_FRAME_TAIL) != 0) {
            r = -EBADMSG;
            break;
        }
        if ((r = put_stream_bytes(pid, out_fd, &cur, buf, h[1])) < 0)
            break;
        *off += UP_FRAME_HEAD + h[1] + UP_FRAME_TAIL;
        done += h[1];
    }
    free(buf);
    EVP_CIPHER_CTX_free(ctx);
    return r < 0 ? r : (long)done;
}

void up_unmap(void *base, uint64_t size)
{
    munmap(base, size);
}

/* The frames of an image walked in order, checking types, lengths and the trailer
 * last at the very end. Every frame that lies whole within the image is put in
 * offs[] (malloc'd; *count of them), even when the walk then fails, so that their
 * tags can still be checked: a frame that does not match its tag is what changed,
 * and the strange structure only its consequence. Returns 0, or -ENODATA (cut
 * short), -EINVAL (bad type or length), -EMSGSIZE (bytes after the trailer), with
 * *bad_off where; -ENOMEM. */
static long walk_frames(const uint8_t *img, size_t len, size_t start, uint64_t max_payload,
                        uint64_t **offs, long *count, uint64_t *bad_off)
{
    size_t off = start, cap = 1024;
    uint64_t *out = malloc(cap * sizeof(*out));

    *count = 0;
    *offs = out;
    if (!out)
        return -ENOMEM;
    for (;;) {
        *bad_off = off;
        if (len - off < UP_FRAME_HEAD)
            return -ENODATA;
        uint32_t type = rd32(img + off), plen = rd32(img + off + 4);
        if (plen > max_payload)
            return -EINVAL;
        if (len - off - UP_FRAME_HEAD < (uint64_t)plen + UP_FRAME_TAIL)
            return -ENODATA;
        if ((size_t)*count == cap) {
            uint64_t *more = realloc(out, 2 * cap * sizeof(*out));
            if (!more)
                return -ENOMEM;
            *offs = out = more;
            cap *= 2;
        }
        out[(*count)++] = off;
        if (type < UP_FRAME_RECORD || type > UP_FRAME_TRAILER)
            return -EINVAL;
        off += UP_FRAME_HEAD + plen + UP_FRAME_TAIL;
        if (type == UP_FRAME_TRAILER) { /* must be the very end */
            *bad_off = off;
            return off == len ? 0 : -EMSGSIZE;
        }
    }
}

struct verify_job {
    const uint8_t *img, *key;
    const uint64_t *offs;
    long count;
    int nthreads, k;
    long bad;                   /* index of this worker's first bad frame, or -1 */
    int err;
};

static void *verify_worker(void *arg)
{
    struct verify_job *v = arg;
    EVP_CIPHER_CTX *ctx = tag_context(v->key);

    v->bad = -1;
    if (!ctx) {
        v->err = -ENOMEM;
        return NULL;
    }
    for (long i = v->k; i < v->count; i += v->nthreads) {
        const uint8_t *f = v->img + v->offs[i];
        uint32_t plen = rd32(f + 4);
        uint8_t tag[UP_FRAME_TAIL];
        int r = frame_tag(ctx, v->offs[i], f, f + UP_FRAME_HEAD, plen, tag);
        if (r < 0) {
            v->err = r;
            break;
        }
        if (CRYPTO_memcmp(tag, f + UP_FRAME_HEAD + plen, UP_FRAME_TAIL) != 0) {
            v->bad = i;         /* the first of this worker's: the lowest it has */
            break;
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

long up_verify_frames(const void *base, size_t len, size_t start, const uint8_t *key,
                      uint64_t max_payload, int nthreads, uint64_t *bad_off)
{
    uint64_t *offs = NULL;
    long count;
    long shape = walk_frames(base, len, start, max_payload, &offs, &count, bad_off);
    struct verify_job v[UP_MAX_THREADS];
    int started = 0;
    long err = 0, bad = -1;

    if (shape == -ENOMEM || !key || !count)
        goto out;               /* no key: the structure is all that can be checked */
    if (nthreads < 1 || nthreads > UP_MAX_THREADS)
        nthreads = 1;
    if (count < nthreads)
        nthreads = (int)count;
    for (int k = 0; k < nthreads; k++)
        v[k] = (struct verify_job){ .img = base, .key = key, .offs = offs, .count = count,
                                    .nthreads = nthreads, .k = k };
    started = run_workers(verify_worker, v, sizeof(v[0]), nthreads);
    if (started < nthreads)
        err = -EAGAIN;          /* the frames of the missing workers were not checked */
    for (int k = 0; k < started; k++) {
        if (v[k].err && !err)
            err = v[k].err;
        if (v[k].bad >= 0 && (bad < 0 || v[k].bad < bad))
            bad = v[k].bad;
    }
    if (!err && bad >= 0) {
        *bad_off = offs[bad];
        err = -EBADMSG;
    }
out:
    free(offs);
    return err ? err : shape ? shape : count;
}

int up_frame_tag(const uint8_t *key, uint64_t off, const void *head, const void *payload,
                 size_t len, uint8_t *tag)
{
    EVP_CIPHER_CTX *ctx = tag_context(key);
    if (!ctx)
        return -ENOMEM;
    int r = frame_tag(ctx, off, head, payload, len, tag);
    EVP_CIPHER_CTX_free(ctx);
    return r;
}

/* ---- processes ---- */

struct up_clone_args {          /* linux/sched.h, clone3 */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};

int up_spawn(int set_tid, const char *path, int traceme, uint64_t flags, int pass_fd)
{
    pid_t tid = set_tid;
    struct up_clone_args args = { .flags = flags, .exit_signal = SIGCHLD };
    if (set_tid > 0) {
        args.set_tid = (uint64_t)(uintptr_t)&tid;
        args.set_tid_size = 1;
    }
    long pid = syscall(SYS_clone3, &args, sizeof(args));
    if (pid < 0)
        return -errno;
    if (pid > 0)
        return (int)pid;
    /* The child: only raw syscalls from here, it is a copy of a Python process. */
    char *argv[] = { (char *)path, NULL }, *envp[] = { NULL };
    if (traceme)
        syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0);
    /* Ignored signals stay ignored across exec: the stub starts with none (upmig's
     * own SIGPIPE, say), so what resume does not set is the default. */
    uint64_t dfl[4] = { 0, 0, 0, 0 };  /* the kernel's sigaction: SIG_DFL, no flags */
    for (int sig = 1; sig <= 64; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, dfl, NULL, 8);
    /* dup2 clears close-on-exec on its copy; an fd already at 3 is cleared by hand. */
    if (pass_fd >= 0 && (pass_fd == 3 ? syscall(SYS_fcntl, 3, F_SETFD, 0) == 0
                                      : syscall(SYS_dup2, pass_fd, 3) == 3))
        syscall(SYS_close_range, 4, ~0U, 0);
    else
        syscall(SYS_close_range, 3, ~0U, 0);
    syscall(SYS_execve, path, argv, envp);
    syscall(SYS_exit_group, 127);
    return -1;                  /* not reached */
}

int up_get_robust_list(int tid, uint64_t *head, uint64_t *len)
{
    void *h = NULL;
    size_t n = 0;
    if (syscall(SYS_get_robust_list, tid, &h, &n) < 0)
        return -errno;
    *head = (uint64_t)(uintptr_t)h;
    *len = n;
    return 0;
}

int up_pidfd_getfd(int pidfd, int fd)
{
    long r = syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    return r < 0 ? -errno : (int)r;
}

long up_pipe_peek(int fd, void *buf, size_t cap)
{
    int queued = 0;
    if (ioctl(fd, FIONREAD, &queued) < 0)
        return -errno;
    if (queued == 0)
        return 0;
    if ((size_t)queued > cap)
        return -EOVERFLOW;
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    long ret;
    if (fcntl(p[1], F_SETPIPE_SZ, (int)cap) < 0) {
        ret = -errno;
        goto out;
    }
    ssize_t n = tee(fd, p[1], cap, SPLICE_F_NONBLOCK);
    if (n < 0) {
        ret = -errno;
        goto out;
    }
    if (n != queued) {          /* tee stops at the first buffer that will not fit */
        ret = -EOVERFLOW;
        goto out;
    }
    size_t got = 0;
    while (got < (size_t)n) {
        ssize_t r = read(p[0], (char *)buf + got, (size_t)n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            ret = r < 0 ? -errno : -EIO;
            goto out;
        }
        got += (size_t)r;
    }
    ret = (long)got;
out:
    close(p[0]);
    close(p[1]);
    return ret;
}

int up_open_by_handle(int mount_fd, int type, const void *bytes, unsigned len, int flags)
{
    if (len > MAX_HANDLE_SZ)
        return -EINVAL;
    struct file_handle *h = malloc(sizeof *h + len);
    if (!h)
        return -ENOMEM;
    h->handle_bytes = len;
    h->handle_type = type;
    memcpy(h->f_handle, bytes, len);
    int fd = open_by_handle_at(mount_fd, h, flags);
    int err = errno;
    free(h);
    return fd < 0 ? -err : fd;
}

int up_setns(int fd, int nstype)
{
    return setns(fd, nstype) < 0 ? -errno : 0;
}

int up_kcmp(int pid1, int pid2, int type, uint64_t idx1, uint64_t idx2)
{
    long r = syscall(SYS_kcmp, pid1, pid2, type, idx1, idx2);
    return r < 0 ? -errno : (int)r;
}


int up_link_fd(int fd, const char *path)
{
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    return linkat(AT_FDCWD, self, AT_FDCWD, path, AT_SYMLINK_FOLLOW) < 0 ? -errno : 0;
}
