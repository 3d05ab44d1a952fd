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
#endif
