// readblock.c - upmig test victim: a process blocked in read(2) on stdin.
//
// After READY it calls read(0, ...) once; the test attaches stdin to a pipe
// and, after dump + resume, writes "hello upmig\n". The interrupted read must
// be restarted transparently: returning -1 (any errno, EINTR included), EOF
// or other data is a failure (reported at once: FAIL line, exit 1).
// On success it prints "GOT hello upmig", then waits for SIGTERM -> PASS.
// -DBREAK: corrupts the received buffer before the check -> FAIL.
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "victim.h"

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(void)
{
    static const char want[] = "hello upmig\n";
    setvbuf(stdout, NULL, _IONBF, 0);
    catch_sigterm(on_term);
    printf("READY\n");

    char buf[256];
    ssize_t n = read(0, buf, sizeof buf); /* blocks here while being migrated */
    if (n < 0)
        fail("read returned -1: %s", strerror(errno));
#ifdef BREAK
    buf[0] ^= 0x20;
#endif
    if (n != (ssize_t)strlen(want) || memcmp(buf, want, n) != 0)
        fail("read returned %zd bytes: \"%.*s\"", n, (int)(n > 40 ? 40 : n), buf);
    printf("GOT hello upmig\n");

    while (!stop)
        usleep(10000);
    printf("PASS\n");
    return 0;
}
