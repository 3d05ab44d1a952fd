// signals.c - upmig test victim: signal dispositions, masks, pending, alarm.
//
// Set up before READY: SIGUSR1 handler (SA_RESTART|SA_SIGINFO|SA_ONSTACK,
// sa_mask = {SIGUSR2, SIGWINCH}) running on a sigaltstack; SIGUSR2 ignored;
// SIGALRM handler counting; SIGHUP blocked and raised, so it stays PENDING;
// alarm(3) armed right before READY (the itimer must survive migration); its
// handler prints ALARM.
// Test driver: dump soon after READY, resume, wait for ALARM, send SIGUSR1 once,
// then SIGTERM. On SIGTERM everything is re-checked and PASS/FAIL printed.
// -DBREAK: resets SIGUSR2 to SIG_DFL before verification -> FAIL.
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "victim.h"

#ifndef SA_RESTORER
#define SA_RESTORER 0x04000000 /* added by libc; not part of what we installed */
#endif

static char altstack[65536];
static volatile sig_atomic_t stop, n_alrm, n_usr1, usr1_on_alt, usr1_mask_ok, usr1_info_ok;

static void on_term(int sig) { (void)sig; stop = 1; }
static void on_alrm(int sig)
{
    (void)sig;
    n_alrm++;
    if (write(1, "ALARM\n", 6) != 6) /* async-signal-safe, unlike printf */
        n_alrm += 100;                 /* reported by the check */
}

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    volatile char local; /* its address tells which stack we run on */
    sigset_t cur;
    n_usr1++;
    usr1_on_alt = &local >= altstack && &local < altstack + sizeof altstack;
    /* Inside the handler the kernel blocks sa_mask + SIGUSR1 itself, on top
     * of the process mask (SIGHUP). */
    sigprocmask(SIG_BLOCK, NULL, &cur);
    usr1_mask_ok = sigismember(&cur, SIGUSR2) == 1 && sigismember(&cur, SIGWINCH) == 1 &&
                   sigismember(&cur, SIGUSR1) == 1 && sigismember(&cur, SIGHUP) == 1 &&
                   sigismember(&cur, SIGALRM) == 0;
    usr1_info_ok = sig == SIGUSR1 && si->si_signo == SIGUSR1 && si->si_code == SI_USER;
}

/* Set of the classic signals 1..31 as a bit mask (comparable with ==). */
static unsigned long bits(const sigset_t *s)
{
    unsigned long b = 0;
    for (int i = 1; i < 32; i++)
        if (sigismember(s, i) == 1)
            b |= 1UL << i;
    return b;
}

static void install(int sig, void *handler, int flags, unsigned long mask)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = (void (*)(int))handler; /* same storage as sa_sigaction */
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    for (int i = 1; i < 32; i++)
        if (mask & (1UL << i))
            sigaddset(&sa.sa_mask, i);
    if (sigaction(sig, &sa, NULL) != 0)
        fail("sigaction(%d)", sig);
}

static void expect(int sig, void *handler, int flags, unsigned long mask)
{
    struct sigaction sa;
    if (sigaction(sig, NULL, &sa) != 0)
        fail("sigaction query %d", sig);
    if ((void *)sa.sa_handler != handler)
        fail("signal %d: handler %p, expected %p", sig, (void *)sa.sa_handler, handler);
    if ((sa.sa_flags & ~SA_RESTORER) != flags)
        fail("signal %d: flags %#x, expected %#x", sig, sa.sa_flags & ~SA_RESTORER, flags);
    if (bits(&sa.sa_mask) != mask)
        fail("signal %d: sa_mask %#lx, expected %#lx", sig, bits(&sa.sa_mask), mask);
}

#define B(s) (1UL << (s))
#define USR1_FLAGS (SA_RESTART | SA_SIGINFO | SA_ONSTACK)

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0)
        fail("sigaltstack");
    install(SIGTERM, (void *)on_term, 0, 0);
    install(SIGUSR1, (void *)on_usr1, USR1_FLAGS, B(SIGUSR2) | B(SIGWINCH));
    install(SIGUSR2, (void *)SIG_IGN, 0, 0);
    install(SIGALRM, (void *)on_alrm, SA_RESTART, 0);
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    sigprocmask(SIG_BLOCK, &hup, NULL);
    raise(SIGHUP); /* stays pending: blocked for the whole run */
    alarm(3);
    printf("READY\n");

    while (!stop)
        usleep(10000);
#ifdef BREAK
    signal(SIGUSR2, SIG_DFL);
#endif

    if (n_alrm != 1)
        fail("SIGALRM handler ran %d times, expected 1", (int)n_alrm);
    if (n_usr1 != 1)
        fail("SIGUSR1 handler ran %d times, expected 1", (int)n_usr1);
    if (!usr1_on_alt)
        fail("SIGUSR1 handler did not run on the alternate stack");
    if (!usr1_mask_ok)
        fail("wrong signal mask inside the SIGUSR1 handler");
    if (!usr1_info_ok)
        fail("wrong siginfo in the SIGUSR1 handler");
    expect(SIGTERM, (void *)on_term, 0, 0);
    expect(SIGUSR1, (void *)on_usr1, USR1_FLAGS, B(SIGUSR2) | B(SIGWINCH));
    expect(SIGUSR2, (void *)SIG_IGN, 0, 0);
    expect(SIGALRM, (void *)on_alrm, SA_RESTART, 0);
    expect(SIGHUP, (void *)SIG_DFL, 0, 0);

    sigset_t cur, pend;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    if (bits(&cur) != B(SIGHUP))
        fail("blocked mask %#lx, expected only SIGHUP", bits(&cur));
    sigpending(&pend);
    if (bits(&pend) != B(SIGHUP))
        fail("pending set %#lx, expected only SIGHUP", bits(&pend));
    stack_t now;
    sigaltstack(NULL, &now);
    if (now.ss_sp != altstack || now.ss_size != sizeof altstack || now.ss_flags != 0)
        fail("sigaltstack changed: sp=%p size=%zu flags=%d", now.ss_sp, now.ss_size, now.ss_flags);
    if (alarm(0) != 0)
        fail("an alarm is still armed");
    printf("PASS\n");
    return 0;
}
