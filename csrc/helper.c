/* upmig's C helper. No Python here: each function does one kernel job and
 * returns >= 0 or -errno; upmig/_native.py turns failures into exceptions. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helper.h"

#define UP_IOV_BATCH 1024       /* IOV_MAX: most iovecs one call takes */

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

/* The chained hash of one frame: over its 8-byte head, then its payload. */
static uint64_t frame_hash(const uint8_t *head, const void *payload, size_t len, uint64_t prev)
{
    return up_xxh64(payload, len, up_xxh64(head, UP_FRAME_HEAD, prev));
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

/* Word indexes in x86-64 struct user_regs_struct. */
enum { R_R10 = 7, R_R9 = 8, R_R8 = 9, R_RAX = 10, R_RDX = 12, R_RSI = 13, R_RDI = 14,
       R_ORIG_RAX = 15, R_RIP = 16 };

int up_inject(int pid, void *regs, long nr, const uint64_t *args, int64_t *ret)
{
    uint64_t *r = regs;
    uint64_t rip = r[R_RIP];
    int status;

    r[R_RAX] = (uint64_t)nr;
    r[R_ORIG_RAX] = (uint64_t)-1;   /* no syscall-restart fix-up on the way out */
    r[R_RDI] = args[0];
    r[R_RSI] = args[1];
    r[R_RDX] = args[2];
    r[R_R10] = args[3];
    r[R_R8] = args[4];
    r[R_R9] = args[5];
    if (ptrace(PTRACE_SETREGS, pid, 0, r) < 0)
        return -errno;
    if (ptrace(PTRACE_SINGLESTEP, pid, 0, 0) < 0)
        return -errno;
    int w = up_waitpid(pid, &status, 0);
    if (w < 0)
        return w;
    if (!WIFSTOPPED(status))
        return -ESRCH;          /* the tracee died under us */
    if (WSTOPSIG(status) != SIGTRAP)
        return -ECANCELED;      /* some other stop: the caller must not go on */
    if (ptrace(PTRACE_GETREGS, pid, 0, r) < 0)
        return -errno;
    if (r[R_RIP] != rip + 2)
        return -ECANCELED;      /* the syscall instruction did not run */
    *ret = (int64_t)r[R_RAX];
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

/* ---- bulk copies ---- */

static int write_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
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

long up_dump_pages(int pid, int mem_fd, const struct up_range *runs, size_t nruns,
                   int out_fd, void *buf, size_t buflen, struct up_copy_stats *stats)
{
    struct iovec rem[UP_IOV_BATCH];
    size_t ri = 0;
    uint64_t roff = 0;

    stats->failed_op = 0;
    while (ri < nruns) {
        size_t fill = 0;
        int nrem = 0;
        while (fill < buflen && ri < nruns && nrem < UP_IOV_BATCH) {
            uint64_t len = runs[ri].end - runs[ri].start - roff;
            if (len > buflen - fill)
                len = buflen - fill;
            rem[nrem].iov_base = (void *)(uintptr_t)(runs[ri].start + roff);
            rem[nrem].iov_len = len;
            nrem++;
            fill += len;
            roff += len;
            if (roff == runs[ri].end - runs[ri].start) {
                ri++;
                roff = 0;
            }
        }
        int r = read_remote(pid, mem_fd, buf, fill, rem, nrem);
        if (r < 0) {
            stats->failed_op = 1;
            return r;
        }
        uint32_t head32[2] = { UP_FRAME_DATA, (uint32_t)fill };
        uint8_t head[UP_FRAME_HEAD];
        memcpy(head, head32, sizeof(head));
        uint64_t h = frame_hash(head, buf, fill, stats->hash);
        struct iovec out[3] = { { head, sizeof(head) }, { buf, fill }, { &h, sizeof(h) } };
        r = write_all(out_fd, out, 3);
        if (r < 0) {
            stats->failed_op = 2;
            return r;
        }
        stats->hash = h;
        stats->bytes += fill;
        stats->frames++;
    }
    return (long)stats->bytes;
}

long up_fill_pages(int pid, int mem_fd, const struct up_range *src, size_t nsrc,
                   const struct up_range *dst, size_t ndst)
{
    struct iovec loc[UP_IOV_BATCH], rem[UP_IOV_BATCH];
    size_t si = 0, di = 0;
    uint64_t soff = 0, doff = 0, total = 0;

    while (si < nsrc && di < ndst) {
        int n = 0;
        size_t batch = 0;
        /* Cut both lists at every boundary of either, so piece i of each side match. */
        while (n < UP_IOV_BATCH && si < nsrc && di < ndst) {
            uint64_t sl = src[si].end - src[si].start - soff;
            uint64_t dl = dst[di].end - dst[di].start - doff;
            uint64_t len = sl < dl ? sl : dl;
            loc[n].iov_base = (void *)(uintptr_t)(src[si].start + soff);
            rem[n].iov_base = (void *)(uintptr_t)(dst[di].start + doff);
            loc[n].iov_len = rem[n].iov_len = len;
            n++;
            batch += len;
            soff += len;
            doff += len;
            if (soff == src[si].end - src[si].start) { si++; soff = 0; }
            if (doff == dst[di].end - dst[di].start) { di++; doff = 0; }
        }
        if (mem_fd >= 0) {
            for (int i = 0; i < n; i++) {
                size_t done = 0;
                while (done < rem[i].iov_len) {
                    ssize_t w = pwrite(mem_fd, (char *)loc[i].iov_base + done,
                                       rem[i].iov_len - done,
                                       (off_t)(uintptr_t)rem[i].iov_base + (off_t)done);
                    if (w < 0 && errno == EINTR)
                        continue;
                    if (w <= 0)
                        return w < 0 ? -errno : -EFAULT;
                    done += (size_t)w;
                }
            }
        } else {
            ssize_t w = process_vm_writev(pid, loc, (unsigned long)n, rem, (unsigned long)n, 0);
            if (w < 0)
                return -errno;
            if ((size_t)w != batch)
                return -EFAULT;
        }
        total += batch;
    }
    return (long)total;
}

long up_verify_frames(const void *base, size_t len, size_t start, uint64_t seed,
                      uint64_t max_payload, uint64_t *bad_off, uint64_t *end_hash)
{
    const uint8_t *img = base;
    size_t off = start;
    long count = 0;

    for (;;) {
        *bad_off = off;
        if (len - off < UP_FRAME_HEAD)
            return -ENODATA;
        uint32_t type = rd32(img + off), plen = rd32(img + off + 4);
        if (type < 1 || type > 3 || plen > max_payload)
            return -EINVAL;
        if (len - off - UP_FRAME_HEAD < (uint64_t)plen + UP_FRAME_TAIL)
            return -ENODATA;
        uint64_t h = frame_hash(img + off, img + off + UP_FRAME_HEAD, plen, seed);
        if (h != rd64(img + off + UP_FRAME_HEAD + plen))
            return -EBADMSG;
        seed = h;
        off += UP_FRAME_HEAD + plen + UP_FRAME_TAIL;
        count++;
        if (type == 3) {                /* trailer: must be the very end */
            *bad_off = off;
            *end_hash = seed;
            return off == len ? count : -EINVAL;
        }
    }
}

/* ---- processes ---- */

struct up_clone_args {          /* linux/sched.h, clone3 */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};

int up_spawn(int set_tid, const char *path, int traceme)
{
    pid_t tid = set_tid;
    struct up_clone_args args = { .exit_signal = SIGCHLD };
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
    syscall(SYS_close_range, 3, ~0U, 0);
    syscall(SYS_execve, path, argv, envp);
    syscall(SYS_exit_group, 127);
    return -1;                  /* not reached */
}

int up_kcmp(int pid1, int pid2, int type, uint64_t idx1, uint64_t idx2)
{
    long r = syscall(SYS_kcmp, pid1, pid2, type, idx1, idx2);
    return r < 0 ? -errno : (int)r;
}
