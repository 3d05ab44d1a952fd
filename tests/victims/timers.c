// timers.c - upmig test victim: a timerfd and a signalfd, with state in the kernel.
//
// - a periodic CLOCK_MONOTONIC timerfd (first expiry 1.5 s after start, then every
//   100 ms), non-blocking, whose expirations are never read until the check;
// - a one-shot CLOCK_REALTIME timerfd that expired before READY: 1 unread tick;
// - a signalfd for SIGUSR1 and SIGRTMIN (both blocked), with SIGUSR1 pending.
// On SIGTERM: the one-shot timer has exactly its 1 tick; the periodic one has fired
// (its interval kept); the signalfd reads SIGUSR1 with the value it was sent with,
// and nothing else. Prints PASS (or FAIL: why).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "victim.h"

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);

    int periodic = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct itimerspec p = {{0, 100000000}, {1, 500000000}};
    int once = timerfd_create(CLOCK_REALTIME, 0);
    struct itimerspec o = {{0, 0}, {0, 1000}};
    if (periodic < 0 || once < 0 || timerfd_settime(periodic, 0, &p, NULL) != 0
        || timerfd_settime(once, 0, &o, NULL) != 0)
        fail("timerfd: %s", strerror(errno));
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &m, NULL);
    int sfd = signalfd(-1, &m, SFD_NONBLOCK);
    if (sfd < 0)
        fail("signalfd: %s", strerror(errno));
    union sigval v = {.sival_int = 4242};
    sigqueue(getpid(), SIGUSR1, v);
    struct pollfd expired = {.fd = once, .events = POLLIN};
    if (poll(&expired, 1, 10000) != 1) /* the one-shot timer has fired (not read) */
        fail("the one-shot timerfd did not fire");
    printf("READY\n");
    while (!stop)
        pause();

    uint64_t ticks = 0;
    if (read(once, &ticks, 8) != 8 || ticks != 1)
        fail("one-shot timerfd: %llu ticks", (unsigned long long)ticks);
    struct itimerspec now;
    timerfd_gettime(periodic, &now);
    if (now.it_interval.tv_sec != 0 || now.it_interval.tv_nsec != 100000000)
        fail("periodic timerfd interval %ld.%09ld", now.it_interval.tv_sec,
             now.it_interval.tv_nsec);
    if (read(periodic, &ticks, 8) != 8 || ticks < 1)
        fail("periodic timerfd has not fired");
    if (fcntl(periodic, F_GETFL) & O_NONBLOCK) {
        if (read(periodic, &ticks, 8) != -1 || errno != EAGAIN)
            fail("periodic timerfd: a second read did not say EAGAIN");
    } else {
        fail("periodic timerfd lost O_NONBLOCK");
    }
    struct signalfd_siginfo si;
    if (read(sfd, &si, sizeof si) != sizeof si)
        fail("signalfd: nothing to read: %s", strerror(errno));
    if (si.ssi_signo != SIGUSR1 || si.ssi_int != 4242 || si.ssi_code != SI_QUEUE)
        fail("signalfd read signal %u value %d code %d", si.ssi_signo, si.ssi_int,
             si.ssi_code);
    if (read(sfd, &si, sizeof si) != -1 || errno != EAGAIN)
        fail("signalfd: more than one signal");
    printf("PASS\n");
    return 0;
}
