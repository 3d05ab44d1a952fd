// sleeper.c - upmig test victim: a process blocked in nanosleep(2).
//
// After READY it sleeps 3 s with one nanosleep call. If migrated mid-sleep,
// the sleep must be restarted transparently: return value must be 0 (-1 with
// EINTR is a failure) and at least 3 s of CLOCK_MONOTONIC must have elapsed.
// Then it prints "SLEPT" and, until SIGTERM, keeps checking that the vDSO
// clock_gettime (CLOCK_MONOTONIC, CLOCK_REALTIME) never goes backwards and
// agrees with the real syscall (a stale vvar page after restore would not).
// Failures before SIGTERM print a FAIL line and exit 1 immediately.
// Caveat: a step of the host's wall clock during the run breaks REALTIME.
// -DBREAK: pretends the sleep returned early -> FAIL.
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "victim.h"

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }
static struct timespec last[2]; /* last value seen for each checked clock */

static long long ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

/* vDSO read <= syscall read <= vDSO read, and never below the previous one. */
static void check_clocks(void)
{
    static const clockid_t clk[2] = {CLOCK_MONOTONIC, CLOCK_REALTIME};
    static const char *name[2] = {"CLOCK_MONOTONIC", "CLOCK_REALTIME"};
    for (int i = 0; i < 2; i++) {
        struct timespec a, k, b;
        clock_gettime(clk[i], &a);
        syscall(SYS_clock_gettime, clk[i], &k);
        clock_gettime(clk[i], &b);
        if (ns(a) < ns(last[i]) || ns(k) < ns(a) || ns(b) < ns(k))
            fail("%s out of order: last %lld vdso %lld syscall %lld vdso %lld", name[i],
                 ns(last[i]), ns(a), ns(k), ns(b));
        last[i] = b;
    }
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    catch_sigterm(on_term);
    printf("READY\n");

    struct timespec t0, t1, req = {3, 0}, rem = {0, 0};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int r = nanosleep(&req, &rem); /* migrated while blocked here */
    if (r != 0)
        fail("nanosleep returned %d: %s (remaining %ld.%09ld s)", r, strerror(errno),
             (long)rem.tv_sec, rem.tv_nsec);
    clock_gettime(CLOCK_MONOTONIC, &t1);
#ifdef BREAK
    t1 = t0;
#endif
    if (ns(t1) - ns(t0) < 3000000000LL)
        fail("slept only %lld ns", ns(t1) - ns(t0));
    printf("SLEPT\n");

    for (int i = 0; i < 1000; i++)
        check_clocks();
    while (!stop) {
        check_clocks();
        usleep(1000);
    }
    check_clocks();
    printf("PASS\n");
    return 0;
}
