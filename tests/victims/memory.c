// memory.c - upmig test victim: heap and mmap'd data verified by checksums.
//
// Exercises: 100 small malloc blocks, a 3 MiB block in the brk heap, a 40 MiB
// mmap'd malloc block, a sparse 16 MiB anonymous mapping (only every 7th page
// touched: holes must stay zero), a mapping made PROT_READ after filling, and
// a PROT_NONE guard in the middle of a mapping with data on both sides.
// The loop keeps re-verifying one region at a time and mutating a word, so
// memory changes between dumps. Checksum: sum of word[w]*(2w+1) mod 2^64,
// which catches any single-word change and can be updated incrementally.
// -DBREAK: flips one bit of the 40 MiB block before verification -> FAIL.
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "victim.h"

#define PG 4096UL
#define WPP (PG / 8) /* 64-bit words per page */
#define MIB (1UL << 20)

struct region {
    const char *name;
    uint64_t *p;
    size_t nwords;
    size_t step; /* only pages with index % step == 0 hold data */
    int ro;      /* read-only: never mutated */
    uint64_t sum;
};

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }
static struct region reg[110];
static int nreg;
static char err[256]; /* first error seen in the loop, reported at SIGTERM */
static uint64_t rng = 0x2545F4914F6CDD1DULL;

static uint64_t xorshift(void)
{
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

/* Fill (fill=1) or checksum (fill=0) the data pages of a region. */
static uint64_t walk(struct region *r, int fill)
{
    uint64_t s = 0;
    for (size_t pg = 0; pg * WPP < r->nwords; pg += r->step)
        for (size_t w = pg * WPP; w < r->nwords && w < (pg + 1) * WPP; w++) {
            if (fill)
                r->p[w] = xorshift();
            s += r->p[w] * (2 * w + 1);
        }
    return s;
}

static void add(const char *name, void *p, size_t bytes, size_t step, int ro)
{
    if (p == NULL || p == MAP_FAILED)
        fail("allocating %s", name);
    struct region *r = &reg[nreg++];
    *r = (struct region){name, p, bytes / 8, step, ro, 0};
    r->sum = walk(r, 1);
}

/* Permission string of the /proc/self/maps entry covering [a, a+len). */
static const char *perms(const void *a, size_t len)
{
    static char pr[8];
    char line[512];
    unsigned long s, e, x = (unsigned long)a;
    FILE *f = fopen("/proc/self/maps", "r");
    strcpy(pr, "none");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx %7s", &s, &e, pr) == 3 && s <= x && x + len <= e)
            break;
        else
            strcpy(pr, "none");
    if (f)
        fclose(f);
    return pr;
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    struct sigaction sa = {.sa_handler = on_term};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    /* Raise the mmap threshold so the 3 MiB block lands in the brk heap,
     * while the 40 MiB one (above the 32 MiB max threshold) is mmap'd. */
    mallopt(M_MMAP_THRESHOLD, 16 * MIB);

    for (int i = 0; i < 100; i++)
        add("small", malloc(8 * (1 + (i * 37) % 500)), 8 * (1 + (i * 37) % 500), 1, 0);
    add("heap-3M", malloc(3 * MIB), 3 * MIB, 1, 0);
    add("mmap-40M", malloc(40 * MIB), 40 * MIB, 1, 0);
    int rw = PROT_READ | PROT_WRITE, fl = MAP_PRIVATE | MAP_ANONYMOUS;
    uint64_t *sparse = mmap(NULL, 16 * MIB, rw, fl, -1, 0);
    madvise(sparse, 16 * MIB, MADV_NOHUGEPAGE); /* keep holes real holes even with THP */
    add("sparse", sparse, 16 * MIB, 7, 0);
    uint64_t *ro = mmap(NULL, MIB, rw, fl, -1, 0);
    add("readonly", ro, MIB, 1, 1);
    if (mprotect(ro, MIB, PROT_READ) != 0)
        fail("mprotect ro");
    /* 16 pages: 0-5 data, 6-9 PROT_NONE guard, 10-15 data */
    char *g = mmap(NULL, 16 * PG, rw, fl, -1, 0);
    add("guard-lo", g, 6 * PG, 1, 0);
    add("guard-hi", g + 10 * PG, 6 * PG, 1, 0);
    if (mprotect(g + 6 * PG, 4 * PG, PROT_NONE) != 0)
        fail("mprotect guard");
    printf("READY\n");

    for (unsigned long it = 0; !stop; it++) {
        struct region *r = &reg[it % nreg];
        if (walk(r, 0) != r->sum && !err[0])
            snprintf(err, sizeof err, "loop: checksum of %s #%lu changed", r->name, it % nreg);
        if (!r->ro) { /* mutate one data word, keeping the checksum in step */
            size_t npg = (r->nwords + WPP - 1) / WPP, pg = xorshift() % ((npg + r->step - 1) / r->step) * r->step;
            size_t n = r->nwords - pg * WPP < WPP ? r->nwords - pg * WPP : WPP, w = pg * WPP + xorshift() % n;
            uint64_t old = r->p[w], nw = xorshift();
            r->p[w] = nw;
            r->sum += (nw - old) * (2 * w + 1);
        }
        usleep(100);
    }
#ifdef BREAK
    ((volatile char *)reg[101].p)[12345] ^= 4;
#endif
    if (err[0])
        fail("%s", err);
    for (int i = 0; i < nreg; i++)
        if (walk(&reg[i], 0) != reg[i].sum)
            fail("checksum of region %s #%d mismatch", reg[i].name, i);
    for (size_t pg = 0; pg < 16 * MIB / PG; pg++)
        for (size_t w = 0; pg % 7 && w < WPP; w++)
            if (sparse[pg * WPP + w] != 0)
                fail("untouched sparse page %zu is not zero", pg);
    if (strcmp(perms(ro, MIB), "r--p") != 0)
        fail("read-only mapping has perms %s", perms(ro, MIB));
    if (strcmp(perms(g + 6 * PG, 4 * PG), "---p") != 0)
        fail("guard region has perms %s", perms(g + 6 * PG, 4 * PG));
    if (strcmp(perms(g, 6 * PG), "rw-p") || strcmp(perms(g + 10 * PG, 6 * PG), "rw-p"))
        fail("data around the guard is not rw-p");
    printf("PASS\n");
    return 0;
}
