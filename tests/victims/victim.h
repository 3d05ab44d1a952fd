/* victim.h - shared by the test victims: how a victim reports a failed check. */
#ifndef VICTIM_H
#define VICTIM_H
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Print "FAIL: why" on stdout (what the tests read) and exit 1. */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn, unused));
static void fail(const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("FAIL: %s\n", msg);
    exit(1);
}

/* Run handler on SIGTERM (how the tests ask a victim to check itself and end). */
static void catch_sigterm(void (*handler)(int)) __attribute__((unused));
static void catch_sigterm(void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTERM, &sa, NULL) != 0)
        fail("sigaction(SIGTERM)");
}

/* SIGTERM caught, and blocked but while wait_for_sigterm() waits for it: one sent
 * between a test of the flag and the wait (say, right after a resume, which puts
 * the process back just before its wait) is not lost. */
static volatile sig_atomic_t sigterm_seen;
static void note_sigterm(int sig) __attribute__((unused));
static void note_sigterm(int sig) { (void)sig; sigterm_seen = 1; }

static void hold_sigterm(void) __attribute__((unused));
static void hold_sigterm(void)
{
    sigset_t term;
    catch_sigterm(note_sigterm);
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &term, NULL) != 0)
        fail("sigprocmask");
}

static void wait_for_sigterm(void) __attribute__((unused));
static void wait_for_sigterm(void)
{
    sigset_t none;
    sigemptyset(&none);
    while (!sigterm_seen)
        sigsuspend(&none);
}
#endif
