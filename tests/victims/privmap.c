// privmap.c - upmig test victim: a written MAP_PRIVATE file mapping.
//
// Creates data.bin (64 pages, deterministic bytes), maps it MAP_PRIVATE
// read/write and rewrites every 3rd page (copy-on-write: the file itself must
// stay unchanged), and maps it a second time MAP_PRIVATE read-only. The loop
// keeps incrementing one byte of a modified page per iteration. On SIGTERM the
// expected private content is rebuilt from scratch (file bytes, page rewrite,
// replay of the K increments) and compared; untouched pages must still equal
// the file, the file on disk must be unchanged, the read-only mapping must
// equal the file, and /proc/self/maps must still show both as data.bin maps.
// -DBREAK: changes a byte of an untouched private page -> FAIL.
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "victim.h"

#define PG 4096
#define NPG 64
#define SIZE (NPG * PG)
#define NMOD ((NPG + 2) / 3) /* modified pages: 0, 3, ..., 63 */

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static unsigned char file_byte(size_t i) { return (unsigned char)((i * 2654435761u) >> 13); }
/* Differs from file_byte everywhere: the xor value is 0xA5 ^ page, never 0. */
static unsigned char mod_byte(size_t i) { return file_byte(i) ^ 0xA5 ^ (unsigned char)(i / PG); }
/* Byte incremented by loop step k (always inside a modified page). */
static size_t step_pos(unsigned long k) { return (k % NMOD) * 3 * PG + (k * 2053) % PG; }

/* Does the /proc/self/maps entry covering p have these perms and this file? */
static int mapped_as(const void *p, const char *perms)
{
    char line[4096], pr[8], path[4096];
    unsigned long s, e, x = (unsigned long)p;
    int ok = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    while (f && fgets(line, sizeof line, f)) {
        path[0] = 0;
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %4095s", &s, &e, pr, path) >= 3 && s <= x &&
            x + SIZE <= e) {
            size_t n = strlen(path);
            ok = !strcmp(pr, perms) && n >= 9 && !strcmp(path + n - 9, "/data.bin");
            break;
        }
    }
    if (f)
        fclose(f);
    return ok;
}

int main(void)
{
    static unsigned char buf[SIZE + 1], expect[SIZE];
    setvbuf(stdout, NULL, _IONBF, 0);
    catch_sigterm(on_term);

    for (size_t i = 0; i < SIZE; i++)
        buf[i] = file_byte(i);
    int fd = open("data.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, buf, SIZE) != SIZE)
        fail("creating data.bin");
    unsigned char *priv = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    unsigned char *ro = mmap(NULL, SIZE, PROT_READ, MAP_PRIVATE, fd, 0);
    if (priv == MAP_FAILED || ro == MAP_FAILED)
        fail("mmap data.bin");
    close(fd); /* the mappings alone must keep the file reachable */
    for (size_t i = 0; i < SIZE; i++)
        if ((i / PG) % 3 == 0)
            priv[i] = mod_byte(i);
    printf("READY\n");

    unsigned long k = 0;
    while (!stop) {
        priv[step_pos(k)]++;
        k++;
        usleep(1000);
    }
#ifdef BREAK
    priv[PG + 5] ^= 1;
#endif

    for (size_t i = 0; i < SIZE; i++)
        expect[i] = (i / PG) % 3 == 0 ? mod_byte(i) : file_byte(i);
    for (unsigned long j = 0; j < k; j++)
        expect[step_pos(j)]++;
    for (size_t i = 0; i < SIZE; i++)
        if (priv[i] != expect[i])
            fail("private mapping byte %zu (page %zu) is %d, expected %d (k=%lu)", i, i / PG,
                 priv[i], expect[i], k);
    for (size_t i = 0; i < SIZE; i++)
        if (ro[i] != file_byte(i))
            fail("read-only mapping byte %zu differs from the file", i);
    fd = open("data.bin", O_RDONLY);
    if (fd < 0 || read(fd, buf, SIZE + 1) != SIZE)
        fail("data.bin missing or has the wrong size");
    for (size_t i = 0; i < SIZE; i++)
        if (buf[i] != file_byte(i))
            fail("data.bin on disk changed at byte %zu", i);
    if (!mapped_as(priv, "rw-p") || !mapped_as(ro, "r--p"))
        fail("mappings are no longer private maps of data.bin with the right perms");
    printf("PASS\n");
    return 0;
}
