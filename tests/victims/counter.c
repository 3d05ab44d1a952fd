// counter.c - upmig test victim: writes an increasing counter to counter.log.
//
// Exercises: a regular file opened O_WRONLY|O_CREAT|O_TRUNC whose file offset
// and content must survive migration; a process that mostly sits in usleep().
// On SIGTERM: counter.log must hold exactly the lines 0..N-1 (N = in-memory
// counter) and the fd's offset must equal the number of bytes written.
// -DBREAK: bumps the counter before verification, so the check must FAIL.
#include <errno.h>
#include <fcntl.h>
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
    setvbuf(stdout, NULL, _IONBF, 0); /* stdout is a file: no buffered lines */
    catch_sigterm(on_term);

    int fd = open("counter.log", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        fail("open counter.log: %s", strerror(errno));
    printf("READY\n");

    /* The handler only sets a flag, so an iteration (write + n++) is never
     * cut in half by SIGTERM: file and counter always agree. */
    int n = 0;
    long bytes = 0;
    while (!stop) {
        char line[32];
        int len = snprintf(line, sizeof line, "%d\n", n);
        ssize_t w = write(fd, line, len);
        if (w != len)
            fail("write returned %zd: %s", w, strerror(errno));
        n++;
        bytes += len;
        usleep(2000);
    }
#ifdef BREAK
    n++; /* claim one line more than was written */
#endif

    /* The restored fd must keep its offset (else lines would be overwritten). */
    off_t pos = lseek(fd, 0, SEEK_CUR);
    if (pos != bytes)
        fail("fd offset is %ld, expected %ld", (long)pos, bytes);

    FILE *f = fopen("counter.log", "r");
    if (!f)
        fail("reopen counter.log: %s", strerror(errno));
    char buf[64];
    int expect = 0;
    while (fgets(buf, sizeof buf, f)) {
        char *end;
        long v = strtol(buf, &end, 10);
        if (buf[0] < '0' || buf[0] > '9' || *end != '\n' || v != expect)
            fail("line %d is \"%.20s\", expected %d", expect, buf, expect);
        expect++;
    }
    if (expect != n)
        fail("counter.log has %d lines, counter is %d", expect, n);
    printf("PASS\n");
    return 0;
}
