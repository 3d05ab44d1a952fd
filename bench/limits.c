// limits.c - what this machine can move, to judge upmig's throughput against.
//
// usage: limits MIB REPS DIR
// Prints one line per measurement: "key GB/s description", the best of REPS runs,
// each moving MIB MiB (GB = 1e9 bytes). A child process holds the remote memory:
// one populated region (read and overwritten) and one that is emptied with
// MADV_DONTNEED before each run, so every write there faults pages in, as when
// resume fills a freshly mapped process. DIR must be on tmpfs, where images go.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1UL << 20) /* upmig moves pages through a 1 MiB buffer too */

static size_t size;
static pid_t child;
static char *remote_full, *remote_empty; /* addresses in the child */
static char *src, *dst, *chunk;           /* local, pre-faulted */
static int cmd_fd, ack_fd, tmp_fd;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double now(void)
{
    struct timespec t;
    if (clock_gettime(CLOCK_MONOTONIC, &t) != 0)
        die("clock_gettime");
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *map(size_t len, int populate)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    if (populate)
        memset(p, 0x5a, len); /* non-zero: real pages, not the shared zero page */
    return p;
}

static void read_all(int fd, void *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read");
        if (n == 0) {
            fprintf(stderr, "limits: unexpected end of pipe\n");
            exit(1);
        }
        buf = (char *)buf + n;
        len -= (size_t)n;
    }
}

static void write_all(int fd, const void *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write");
        buf = (const char *)buf + n;
        len -= (size_t)n;
    }
}

/* The child: map both regions, send their addresses, then empty the second one
 * each time the parent asks, until the parent closes the pipe. */
static void serve(int cmd, int ack)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
        die("prctl");
    char *full = map(size, 1), *empty = map(size, 0), c;
    char *addrs[2] = {full, empty};
    write_all(ack, addrs, sizeof addrs);
    for (;;) {
        ssize_t n = read(cmd, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read");
        if (n == 0)
            _exit(0);
        if (madvise(empty, size, MADV_DONTNEED) != 0)
            die("madvise");
        write_all(ack, &c, 1);
    }
}

static void start_child(void)
{
    int cmd[2], ack[2];
    if (pipe2(cmd, O_CLOEXEC) != 0 || pipe2(ack, O_CLOEXEC) != 0)
        die("pipe2");
    child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        if (close(cmd[1]) != 0 || close(ack[0]) != 0)
            die("close");
        serve(cmd[0], ack[1]);
    }
    if (close(cmd[0]) != 0 || close(ack[1]) != 0)
        die("close");
    cmd_fd = cmd[1];
    ack_fd = ack[0];
    char *addrs[2];
    read_all(ack_fd, addrs, sizeof addrs);
    remote_full = addrs[0];
    remote_empty = addrs[1];
}

static void stop_child(void)
{
    int status;
    if (close(cmd_fd) != 0 || close(ack_fd) != 0)
        die("close");
    if (waitpid(child, &status, 0) != child)
        die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "limits: child failed (status %#x)\n", (unsigned)status);
        exit(1);
    }
}

/* Move size bytes between local and remote in CHUNK pieces; the local side
 * advances with the remote one unless it is the reused chunk buffer. */
static void vm_copy(char *local, char *remote, int writing)
{
    for (size_t off = 0; off < size; off += CHUNK) {
        struct iovec l = {local + (local == chunk ? 0 : off), CHUNK};
        struct iovec r = {remote + off, CHUNK};
        ssize_t n = writing ? process_vm_writev(child, &l, 1, &r, 1, 0)
                            : process_vm_readv(child, &l, 1, &r, 1, 0);
        if (n < 0)
            die(writing ? "process_vm_writev" : "process_vm_readv");
        if ((size_t)n != CHUNK) {
            fprintf(stderr, "limits: short process_vm copy (%zd bytes)\n", n);
            exit(1);
        }
    }
}

/* One timed run of each measurement; any set-up that must not count comes first. */
static double run_memcpy(void)
{
    double t = now();
    memcpy(dst, src, size);
    __asm__ volatile("" ::"r"(dst) : "memory"); /* the copy must happen */
    return now() - t;
}

static double run_readv_reused(void)
{
    double t = now();
    vm_copy(chunk, remote_full, 0);
    return now() - t;
}

static double run_readv_fresh(void)
{
    char *fresh = map(size, 0);
    double t = now();
    vm_copy(fresh, remote_full, 0);
    t = now() - t;
    if (munmap(fresh, size) != 0)
        die("munmap");
    return t;
}

static double run_writev_populated(void)
{
    double t = now();
    vm_copy(chunk, remote_full, 1);
    return now() - t;
}

static double run_writev_unpopulated(void)
{
    char c = 'e';
    write_all(cmd_fd, &c, 1);
    read_all(ack_fd, &c, 1);
    double t = now();
    vm_copy(chunk, remote_empty, 1);
    return now() - t;
}

static double run_tmpfs_write(void)
{
    if (ftruncate(tmp_fd, 0) != 0 || lseek(tmp_fd, 0, SEEK_SET) != 0)
        die("ftruncate");
    double t = now();
    for (size_t off = 0; off < size; off += CHUNK)
        write_all(tmp_fd, chunk, CHUNK);
    return now() - t;
}

static void report(const char *key, const char *what, double (*run)(void), int reps)
{
    double best = run();
    for (int i = 1; i < reps; i++) {
        double t = run();
        if (t < best)
            best = t;
    }
    printf("%s %.2f %s\n", key, (double)size / best / 1e9, what);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 4 || atoi(argv[1]) <= 0 || atoi(argv[2]) <= 0) {
        fprintf(stderr, "usage: limits MIB REPS DIR\n");
        return 2;
    }
    size = (size_t)atoi(argv[1]) << 20;
    int reps = atoi(argv[2]);

    src = map(size, 1);
    dst = map(size, 1);
    report("memcpy", "memcpy between pre-faulted buffers", run_memcpy, reps);
    if (munmap(src, size) != 0 || munmap(dst, size) != 0)
        die("munmap");

    chunk = map(CHUNK, 1);
    start_child();
    report("readv", "process_vm_readv into a reused 1 MiB buffer", run_readv_reused, reps);
    report("readv_fresh", "process_vm_readv into a fresh (unfaulted) buffer",
           run_readv_fresh, reps);
    report("writev_full", "process_vm_writev into populated memory", run_writev_populated,
           reps);
    report("writev", "process_vm_writev into unpopulated memory", run_writev_unpopulated, reps);
    stop_child();

    tmp_fd = open(argv[3], O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (tmp_fd < 0)
        die("open O_TMPFILE");
    report("tmpfs_write", "write(2) of a 1 MiB buffer to a tmpfs file", run_tmpfs_write, reps);
    if (close(tmp_fd) != 0)
        die("close");
    return 0;
}
