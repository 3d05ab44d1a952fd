/* tree - a process tree that checks its own relations and prints a deterministic
 * report at the end.
 *
 * The parent forks three workers, each writing its progress into a pipe of its own
 * that the parent reads slowly (so bytes are buffered in the pipes at any moment):
 *   worker 0 leads its own process group, worker 1 its own session, worker 2 stays
 *   in the parent's group and forks a grandchild it reaps at the end;
 * and a child that exits at once with status 7 and is left a zombie until the end.
 * Every worker checks its parent, group and session at each step; the parent checks
 * the zombie is still one. The report (each worker's lines in order, exit statuses)
 * is the same however often the tree is moved. Usage: tree [STEPS] */
#include "victim.h"
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 3

static void nap(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void check_place(int me, pid_t parent)
{
    if (getppid() != parent)
        fail("worker %d: parent is %d, not %d", me, getppid(), parent);
    pid_t pg = getpgid(0), sid = getsid(0);
    if (me == 0 && (pg != getpid() || sid == getpid()))
        fail("worker 0: group %d session %d", pg, sid);
    if (me == 1 && (sid != getpid() || pg != getpid()))
        fail("worker 1: group %d session %d", pg, sid);
    if (me == 2 && (pg != getpgid(parent) || sid != getsid(parent) || pg == getpid()))
        fail("worker 2: group %d session %d", pg, sid);
}

static void worker(int me, int fd, int steps)
{
    pid_t parent = getppid(), grandchild = 0;
    if (me == 0)
        setpgid(0, 0);
    if (me == 1)
        setsid();
    if (me == 2) {
        grandchild = fork();
        if (grandchild == 0) {
            nap(200000);
            _exit(3);
        }
    }
    unsigned long sum = 0;
    for (int i = 0; i < steps; i++) {
        check_place(me, parent);
        sum = sum * 31 + (unsigned long)(i * (me + 1));
        char line[96];
        int n = snprintf(line, sizeof line, "worker %d step %d sum %lu\n", me, i, sum % 1000003);
        if (write(fd, line, n) != n)
            fail("worker %d: write: %s", me, strerror(errno));
        nap(2000);
    }
    if (grandchild) {
        int status;
        if (waitpid(grandchild, &status, 0) != grandchild)
            fail("worker 2: waitpid(grandchild): %s", strerror(errno));
        char line[64];
        int n = snprintf(line, sizeof line, "worker 2 grandchild exit %d\n", WEXITSTATUS(status));
        if (write(fd, line, n) != n)
            fail("worker 2: write");
    }
    _exit(10 + me);
}

int main(int argc, char **argv)
{
    int steps = argc > 1 ? atoi(argv[1]) : 1500;
    int fds[WORKERS][2];
    pid_t pids[WORKERS];
    setvbuf(stdout, NULL, _IONBF, 0);
    pid_t zombie = fork();
    if (zombie == 0)
        _exit(7);
    for (int w = 0; w < WORKERS; w++) {
        if (pipe(fds[w]) < 0)
            fail("pipe: %s", strerror(errno));
        pids[w] = fork();
        if (pids[w] == 0) {
            for (int v = 0; v <= w; v++)
                close(fds[v][0]);
            worker(w, fds[w][1], steps);
        }
        close(fds[w][1]);
    }
    printf("READY\n");
    /* Collect every worker's output; read slowly so the pipes hold bytes. */
    static char got[WORKERS][1 << 17];
    size_t len[WORKERS] = {0};
    int open_pipes = WORKERS;
    while (open_pipes) {
        struct pollfd p[WORKERS];
        for (int w = 0; w < WORKERS; w++)
            p[w] = (struct pollfd){.fd = fds[w][0], .events = POLLIN};
        if (poll(p, WORKERS, -1) < 0 && errno != EINTR)
            fail("poll: %s", strerror(errno));
        for (int w = 0; w < WORKERS; w++) {
            if (!(p[w].revents & (POLLIN | POLLHUP)))
                continue;
            ssize_t n = read(fds[w][0], got[w] + len[w], 512);
            if (n < 0)
                fail("read: %s", strerror(errno));
            if (n == 0) {
                fds[w][0] = -1;
                open_pipes--;
            }
            len[w] += n;
            if (len[w] + 512 > sizeof got[w])
                fail("worker %d wrote too much", w);
        }
        nap(3000);
    }
    for (int w = 0; w < WORKERS; w++) {
        int status;
        if (waitpid(pids[w], &status, 0) != pids[w])
            fail("waitpid(worker %d): %s", w, strerror(errno));
        fwrite(got[w], 1, len[w], stdout);
        printf("worker %d exit %d\n", w, WEXITSTATUS(status));
    }
    int status;
    if (waitpid(zombie, &status, WNOHANG) != zombie)
        fail("the zombie child was not there to be reaped");
    printf("zombie exit %d\n", WEXITSTATUS(status));
    printf("DONE\n");
    return 0;
}
