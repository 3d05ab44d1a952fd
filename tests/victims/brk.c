// brk.c - upmig test victim: the program break must be restored exactly.
//
// Exercises: the heap grown with sbrk() by a non-page-aligned amount (so the
// kernel's brk value is not page-aligned and must be restored byte-exact),
// its content, mm->start_brk, and that brk can still grow/shrink after resume.
// Uses write(2) only and never calls malloc (directly or through stdio before
// the end), so nothing else moves the break behind our back.
// NOTE: glibc's sbrk(0) returns a value cached in libc memory; the kernel's
// real break is read with syscall(SYS_brk, 0).
// -DBREAK: flips one heap byte before verification -> FAIL.
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define GROW (1024 * 1024 + 1234) /* deliberately not a multiple of the page size */
#define BIG (8L << 20)

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static void say(const char *s) { (void)!write(1, s, strlen(s)); }

static void fail(const char *fmt, ...)
{
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(msg, sizeof msg, "FAIL: ");
    vsnprintf(msg + n, sizeof msg - n - 1, fmt, ap);
    va_end(ap);
    strcat(msg, "\n");
    say(msg);
    exit(1);
}

static char *kernel_brk(void) { return (char *)syscall(SYS_brk, 0); }
static unsigned char pat(long i) { return (unsigned char)(i * 131 + (i >> 12)) ^ 0x5a; }

/* Field 47 of /proc/self/stat is start_brk (see proc(5)). */
static unsigned long start_brk(void)
{
    char buf[4096];
    int fd = open("/proc/self/stat", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *s = strrchr(buf, ')'); /* comm may contain spaces: skip past it */
    if (!s)
        return 0;
    s += 2; /* now at field 3 */
    for (int f = 3; f < 47 && s; f++)
        if ((s = strchr(s, ' ')))
            s++;
    return s ? strtoul(s, NULL, 10) : 0;
}

static void check_data(unsigned char *p, const char *when)
{
    for (long i = 0; i < GROW; i++)
        if (p[i] != pat(i))
            fail("heap byte %ld wrong %s", i, when);
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);

    unsigned long sbrk0 = start_brk();
    unsigned char *base = sbrk(GROW);
    if (base == (void *)-1)
        fail("sbrk(GROW) failed");
    char *end0 = kernel_brk();
    if (end0 != (char *)base + GROW)
        fail("kernel brk %p != %p after sbrk", (void *)end0, (void *)((char *)base + GROW));
    for (long i = 0; i < GROW; i++)
        base[i] = pat(i);
    say("READY\n");

    while (!stop)
        usleep(1000);
#ifdef BREAK
    base[777] ^= 1;
#endif

    if (kernel_brk() != end0)
        fail("brk is %p, expected %p", (void *)kernel_brk(), (void *)end0);
    if ((char *)sbrk(0) != end0)
        fail("libc's cached brk %p, expected %p", sbrk(0), (void *)end0);
    if (start_brk() != sbrk0)
        fail("start_brk is %#lx, expected %#lx", start_brk(), sbrk0);
    check_data(base, "after resume");

    /* The restored break must be a working one: grow by 8 MiB, use it all. */
    char *p = sbrk(BIG);
    if (p == (void *)-1)
        fail("sbrk(+8MiB) failed");
    if (p != end0 || kernel_brk() != end0 + BIG)
        fail("sbrk(+8MiB) returned %p, brk %p", (void *)p, (void *)kernel_brk());
    for (long i = 0; i < BIG; i++)
        p[i] = (char)(i ^ (i >> 9));
    for (long i = 0; i < BIG; i++)
        if (p[i] != (char)(i ^ (i >> 9)))
            fail("grown heap byte %ld wrong", i);
    if (sbrk(-BIG) == (void *)-1)
        fail("sbrk(-8MiB) failed");
    if (kernel_brk() != end0)
        fail("brk after shrink is %p, expected %p", (void *)kernel_brk(), (void *)end0);
    check_data(base, "after grow/shrink");
    say("PASS\n");
    return 0;
}
