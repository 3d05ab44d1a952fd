// files.c - upmig test victim: assorted file descriptors and their state.
//
// fds: app.log (O_WRONLY|O_APPEND), data.rw (O_RDWR) plus a dup() of it that
// shares the open file description (one offset), "." (O_DIRECTORY),
// /dev/null, /dev/zero, /dev/urandom (the only one opened O_CLOEXEC).
// Loop step k: lseek app.log to 0 then append "line k" (O_APPEND must still
// send it to EOF); write 16 bytes at data.rw's offset through fd or dup
// alternately, then seek back 8 (so the shared offset matters); every 10th
// step read /dev/zero and /dev/urandom. On SIGTERM the file contents, the
// shared offset, F_GETFL/F_GETFD of every fd, the identity of the files
// (fstatat via the dir fd) and the device numbers are verified.
// -DBREAK: moves the shared data.rw offset by 1 before verification -> FAIL.
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "victim.h"

enum { LOG, DATA, DUP, DIR_, NUL, ZERO, URND, NFD };
static const char *name[NFD] = {"app.log", "data.rw", "dup", ".", "null", "zero", "urandom"};
static int fd[NFD], fl0[NFD];
static volatile sig_atomic_t stop;
static char err[256]; /* first error seen in the loop, reported at SIGTERM */
static void on_term(int sig) { (void)sig; stop = 1; }

#define NOTE(...) (err[0] ? 0 : snprintf(err, sizeof err, __VA_ARGS__))

static void block(long k, unsigned char *b) /* the 16 bytes written at step k */
{
    for (int j = 0; j < 16; j++)
        b[j] = (unsigned char)(k * 16 + j + (k >> 8));
}

static void same_file(const char *path, int f)
{
    struct stat a, b;
    if (fstatat(fd[DIR_], path, &a, 0) != 0 || fstat(f, &b) != 0)
        fail("fstatat/fstat %s: %s", path, strerror(errno));
    if (a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        fail("fd of %s no longer refers to the file in the directory", path);
}

static void chardev(int f, unsigned mn, const char *what)
{
    struct stat st;
    if (fstat(f, &st) != 0 || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(1, mn))
        fail("fd %d is not %s", f, what);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    catch_sigterm(on_term);
    fd[LOG] = open("app.log", O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644);
    fd[DATA] = open("data.rw", O_RDWR | O_CREAT | O_TRUNC, 0644);
    fd[DUP] = dup(fd[DATA]);
    fd[DIR_] = open(".", O_RDONLY | O_DIRECTORY);
    fd[NUL] = open("/dev/null", O_WRONLY);
    fd[ZERO] = open("/dev/zero", O_RDONLY);
    fd[URND] = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    for (int i = 0; i < NFD; i++)
        if (fd[i] < 0 || (fl0[i] = fcntl(fd[i], F_GETFL)) < 0)
            fail("opening %s: %s", name[i], strerror(errno));
    printf("READY\n");

    long k = 0;
    while (!stop) {
        char line[32];
        unsigned char b[64];
        int len = snprintf(line, sizeof line, "line %ld\n", k);
        lseek(fd[LOG], 0, SEEK_SET);
        if (write(fd[LOG], line, len) != len)
            NOTE("append to app.log failed at step %ld", k);
        int f = fd[k & 1 ? DUP : DATA];
        block(k, b);
        if (write(f, b, 16) != 16 || lseek(f, -8, SEEK_CUR) < 0)
            NOTE("write/lseek data.rw failed at step %ld", k);
        if (k % 10 == 0) {
            memset(b, 0xff, sizeof b);
            if (read(fd[ZERO], b, 64) != 64 || memchr(b, 0xff, 64) || memchr(b, 1, 64))
                NOTE("read /dev/zero failed at step %ld", k);
            if (read(fd[URND], b, 16) != 16)
                NOTE("read /dev/urandom failed at step %ld", k);
        }
        k++;
        usleep(2000);
    }
#ifdef BREAK
    lseek(fd[DUP], 1, SEEK_CUR);
#endif
    if (err[0])
        fail("%s", err);

    /* app.log: exactly "line 0" .. "line k-1" */
    struct stat st;
    int rf = open("app.log", O_RDONLY);
    if (rf < 0 || fstat(rf, &st) != 0)
        fail("reopen app.log");
    char *log = malloc(st.st_size + 1), *p = log;
    if (!log || read(rf, log, st.st_size) != st.st_size)
        fail("read app.log");
    log[st.st_size] = 0;
    for (long i = 0; i < k; i++) {
        char line[32];
        int len = snprintf(line, sizeof line, "line %ld\n", i);
        if (strncmp(p, line, len) != 0)
            fail("app.log: line %ld wrong", i);
        p += len;
    }
    if (p != log + st.st_size)
        fail("app.log has %ld extra bytes", (long)(log + st.st_size - p));

    /* data.rw: replay the model; step i wrote [8i, 8i+16) */
    long size = k ? 8 * k + 8 : 0;
    unsigned char *model = calloc(size + 16, 1), *got = malloc(size + 16);
    for (long i = 0; i < k; i++)
        block(i, model + 8 * i);
    if (pread(fd[DATA], got, size + 16, 0) != size || memcmp(got, model, size) != 0)
        fail("data.rw content differs from the model");
    if (lseek(fd[DATA], 0, SEEK_CUR) != 8 * k || lseek(fd[DUP], 0, SEEK_CUR) != 8 * k)
        fail("data.rw offsets %ld/%ld, expected %ld", (long)lseek(fd[DATA], 0, SEEK_CUR),
             (long)lseek(fd[DUP], 0, SEEK_CUR), 8 * k);
    if (lseek(fd[DATA], 3, SEEK_SET) != 3 || lseek(fd[DUP], 0, SEEK_CUR) != 3)
        fail("data.rw and its dup no longer share one offset");

    for (int i = 0; i < NFD; i++) {
        int fl = fcntl(fd[i], F_GETFL), cloexec = fcntl(fd[i], F_GETFD) & FD_CLOEXEC;
        if (fl != fl0[i])
            fail("F_GETFL of %s is %#o, expected %#o", name[i], fl, fl0[i]);
        if (!cloexec != (i != URND))
            fail("FD_CLOEXEC of %s is %s", name[i], cloexec ? "set" : "clear");
    }
    if ((fl0[LOG] & (O_ACCMODE | O_APPEND)) != (O_WRONLY | O_APPEND) ||
        (fl0[DATA] & (O_ACCMODE | O_APPEND)) != O_RDWR || (fl0[DIR_] & O_ACCMODE) != O_RDONLY)
        fail("unexpected open flags");
    same_file("app.log", fd[LOG]);
    same_file("data.rw", fd[DATA]);
    struct stat cwd; /* the dir fd was opened as ".": it must still be the cwd */
    if (stat(".", &cwd) != 0 || fstat(fd[DIR_], &st) != 0 || !S_ISDIR(st.st_mode) ||
        cwd.st_dev != st.st_dev || cwd.st_ino != st.st_ino)
        fail("directory fd is not the current directory");
    chardev(fd[NUL], 3, "/dev/null");
    chardev(fd[ZERO], 5, "/dev/zero");
    chardev(fd[URND], 9, "/dev/urandom");
    if (write(fd[NUL], "x", 1) != 1)
        fail("write to /dev/null failed");
    printf("PASS\n");
    return 0;
}
