// hog.c - upmig benchmark victim: N MiB of touched anonymous memory, random content.
//
// usage: hog MIB [THREADS]
// Maps MIB MiB, fills it with xorshift64 output (one value per 8 bytes, fast and
// incompressible), prints "READY <checksum>" and sleeps in pause(). On SIGUSR1 it
// checks every word against the regenerated sequence and prints "OK <checksum>"
// (or "BAD <count> words differ, first at byte <offset>"), where the checksum is
// recomputed from memory: so the bench can tell that a resumed copy is intact.
// The check runs inside the handler so that no signal can slip in before pause().
// With THREADS > 1, THREADS-1 more threads wait in pause() with SIGUSR1 blocked, so
// the main thread takes it.
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define SEED 0x2545F4914F6CDD1DULL

static uint64_t *mem;
static size_t nwords;

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Sum of word[w] * (2w+1) mod 2^64: any single changed or moved word changes it. */
static uint64_t checksum(void)
{
    uint64_t sum = 0;
    for (size_t w = 0; w < nwords; w++)
        sum += mem[w] * (2 * w + 1);
    return sum;
}

/* Append s, or the decimal of v, at *p: the line is built first and written with
 * one write(2), so a reader never sees half of it. Async-signal-safe. */
static void put(char **p, const char *s)
{
    while (*s)
        *(*p)++ = *s++;
}

static void put_num(char **p, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (n > 0)
        *(*p)++ = tmp[--n];
}

static void say(const char *line, char *end)
{
    size_t len = (size_t)(end - line);
    while (len > 0) {
        ssize_t n = write(STDOUT_FILENO, line, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(3);
        line += n;
        len -= (size_t)n;
    }
}

static void on_usr1(int sig)
{
    (void)sig;
    int saved = errno;
    uint64_t s = SEED, bad = 0, first = 0;
    for (size_t w = 0; w < nwords; w++)
        if (mem[w] != xorshift(&s) && bad++ == 0)
            first = w * 8;
    char line[128], *p = line;
    if (bad == 0) {
        put(&p, "OK ");
        put_num(&p, checksum());
    } else {
        put(&p, "BAD ");
        put_num(&p, bad);
        put(&p, " words differ, first at byte ");
        put_num(&p, first);
    }
    put(&p, "\n");
    say(line, p);
    errno = saved;
}

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static int start_threads(unsigned long n)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 << 10);   /* 256 threads: keep the maps small */
    sigset_t usr1;                              /* inherited: blocked in every new thread */
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    for (unsigned long i = 1; i < n; i++) {
        pthread_t t;
        int e = pthread_create(&t, &a, idle, NULL);
        if (e) {
            errno = e;
            perror("hog: pthread_create");
            return -1;
        }
    }
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
    return 0;
}

int main(int argc, char **argv)
{
    char *end = "", *tend = "";
    unsigned long mib = argc >= 2 ? strtoul(argv[1], &end, 10) : 0;
    unsigned long threads = argc == 3 ? strtoul(argv[2], &tend, 10) : 1;
    if (argc < 2 || argc > 3 || *end != '\0' || *tend != '\0' || mib > (1UL << 20)
        || threads < 1 || threads > 4096) {
        fprintf(stderr, "usage: hog MIB [THREADS]\n");
        return 2;
    }
    nwords = (mib << 20) / 8;
    if (nwords > 0) {
        mem = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            perror("hog: mmap");
            return 1;
        }
    }
    uint64_t s = SEED;
    for (size_t w = 0; w < nwords; w++)
        mem[w] = xorshift(&s);

    struct sigaction sa = {.sa_handler = on_usr1};
    if (sigemptyset(&sa.sa_mask) != 0 || sigaction(SIGUSR1, &sa, NULL) != 0) {
        perror("hog: sigaction");
        return 1;
    }
    if (start_threads(threads) != 0)
        return 1;
    char line[64], *p = line;
    put(&p, "READY ");
    put_num(&p, checksum());
    put(&p, "\n");
    say(line, p);
    for (;;)
        pause();
}
