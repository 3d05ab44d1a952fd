/* upmig-init: PID 1 of the PID namespace that `upmig resume --pidns` makes, so that
 * the resumed process can have its original PID and TIDs (the kernel gives a chosen
 * PID in a new namespace only once it has a PID 1).
 *
 * fd 3 is a pipe from upmig: it writes the resumed process's PID (as this namespace
 * sees it) once the process runs, and closes it. PID 1 then reaps what is orphaned
 * into it. Once that process has exited, what it left behind (its children, now
 * PID 1's) runs on as it would have on the source: PID 1 reaps them and exits when
 * none is left, which ends the namespace. EOF without a PID means the resume
 * failed: exit at once, taking the half-built process with the namespace. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void quiet_stdio(void)
{
    /* Keep no pipe of upmig's caller open: it would wait for our EOF forever. */
    int null = open("/dev/null", O_RDWR);
    if (null < 0)
        return;
    for (int fd = 0; fd < 3; fd++)
        dup2(null, fd);
    if (null > 2)
        close(null);
}

static long read_pid(int fd)
{
    char buf[32];
    size_t got = 0;
    while (got < sizeof buf - 1) {
        ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    buf[got] = '\0';
    return got ? strtol(buf, NULL, 10) : 0;
}

int main(void)
{
    quiet_stdio();
    long pid = read_pid(3);
    close(3);
    if (pid <= 0)
        return 1;
    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
    if (pidfd < 0)
        return 1;
    struct pollfd p = { .fd = pidfd, .events = POLLIN };
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (poll(&p, 1, 500) > 0)
            break;
    }
    /* Its orphans were handed to us as it exited: every process left in the
     * namespace descends from one of our children now. */
    for (;;) {
        if (waitpid(-1, NULL, 0) < 0 && errno != EINTR)
            return 0;   /* ECHILD: nobody left */
    }
}
