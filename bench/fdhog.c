// fdhog.c - upmig benchmark victim: N open descriptors of mixed kinds.
//
// usage: fdhog N
// Of every 10 fds: 4 regular files (each its own open of one file, at its own
// offset), 2 ends of a pipe holding a few bytes, 1 eventfd, 2 ends of a unix socket
// pair with a message queued, 1 dup. Prints "READY <n>"; on SIGUSR1 checks every
// fd (kind, offset, bytes still in its pipe) and prints "OK <n>" or "BAD <why>".
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int n, *fdv, *kind, *offset;
static volatile sig_atomic_t check;
static void on_usr1(int sig) { (void)sig; check = 1; }

static int verify(char *why, size_t len)
{
    for (int i = 0; i < n; i++) {
        int fd = fdv[i];
        struct stat st;
        if (fstat(fd, &st) != 0) {
            snprintf(why, len, "fd %d is closed", fd);
            return 0;
        }
        int k = kind[i];
        if (k == 0 && (!S_ISREG(st.st_mode) || lseek(fd, 0, SEEK_CUR) != offset[i])) {
            snprintf(why, len, "fd %d: file offset", fd);
            return 0;
        }
        if (k == 1) {           /* pipe read end: "p" + index, left in place by peek */
            int q = 0;
            ioctl(fd, FIONREAD, &q);
            if (!S_ISFIFO(st.st_mode) || q != 4) {
                snprintf(why, len, "fd %d: pipe holds %d bytes", fd, q);
                return 0;
            }
        }
        if (k == 3 && !S_ISSOCK(st.st_mode)) {
            snprintf(why, len, "fd %d: not a socket", fd);
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv)
{
    n = argc == 2 ? atoi(argv[1]) : 0;
    if (n < 10 || n > 100000) {
        fprintf(stderr, "usage: fdhog N (10..100000)\n");
        return 2;
    }
    n -= n % 10;
    struct rlimit rl = {n + 64, n + 64};
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        perror("fdhog: setrlimit");
        return 1;
    }
    kind = calloc((size_t)n, sizeof *kind);
    fdv = calloc((size_t)n, sizeof *fdv);
    offset = calloc((size_t)n, sizeof *offset);
    int file = open("fdhog.data", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file < 0 || ftruncate(file, 4096) != 0) {
        perror("fdhog: fdhog.data");
        return 1;
    }
    for (int i = 0; i < n; i += 10) {
        int fds[10], p[2], sp[2];
        for (int j = 0; j < 4; j++) {
            fds[j] = open("fdhog.data", O_RDWR);
            lseek(fds[j], (i + j) % 97, SEEK_SET);
        }
        if (pipe(p) != 0 || write(p[1], "pipe", 4) != 4)
            return 1;
        fds[4] = p[0];
        fds[5] = p[1];
        fds[6] = eventfd((unsigned)i, EFD_NONBLOCK);
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0 || write(sp[0], "sock", 4) != 4)
            return 1;
        fds[7] = sp[0];
        fds[8] = sp[1];
        fds[9] = dup(fds[0]);
        /* fds[0] and its dup fds[9] share one description, so one offset */
        int kinds[10] = {0, 0, 0, 0, 1, 2, 2, 3, 3, 0};
        for (int j = 0; j < 10; j++) {
            fdv[i + j] = fds[j];
            kind[i + j] = kinds[j];
            offset[i + j] = (i + (j == 9 ? 0 : j)) % 97;
        }
        lseek(fds[0], i % 97, SEEK_SET);
    }
    signal(SIGUSR1, on_usr1);
    printf("READY %d\n", n);
    fflush(stdout);
    for (;;) {
        pause();
        if (check) {
            char why[128] = "";
            if (verify(why, sizeof why))
                printf("OK %d\n", n);
            else
                printf("BAD %s\n", why);
            fflush(stdout);
            check = 0;
        }
    }
}
