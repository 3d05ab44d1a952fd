/* sysvpart.c - a private SysV segment of 1 MiB attached at 8 GiB (the lowest free
 * address resume looks for its scratch area at), of which the process keeps only the
 * first 64 KiB: the rest is unmapped. On SIGTERM it checks the part it kept still
 * holds its pattern, is the segment (shmctl says one attachment), and that the rest
 * is still unmapped; then removes the segment and prints PASS. */
#include <errno.h>
#include <stdint.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>
#include "victim.h"

#define AT ((void *)(8UL << 30))
#define SIZE (1 << 20)
#define KEPT (64 * 1024)

static volatile sig_atomic_t term;
static int shm_id = -1;

static void on_term(int sig) { (void)sig; term = 1; }
static void tidy(void) { if (shm_id >= 0) shmctl(shm_id, IPC_RMID, NULL); }

int main(void)
{
    atexit(tidy);
    shm_id = shmget(IPC_PRIVATE, SIZE, IPC_CREAT | 0600);
    if (shm_id < 0)
        fail("shmget: %s", strerror(errno));
    unsigned char *p = shmat(shm_id, AT, 0);
    if (p != AT)
        fail("shmat at 8 GiB: %s", strerror(errno));
    for (int i = 0; i < KEPT; i++)
        p[i] = (unsigned char)(i * 13 + 7);
    if (munmap(p + KEPT, SIZE - KEPT) != 0)
        fail("munmap: %s", strerror(errno));
    catch_sigterm(on_term);
    sigset_t block, none;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, NULL);
    printf("READY\n");
    fflush(stdout);
    sigemptyset(&none);
    while (!term)
        sigsuspend(&none);
    for (int i = 0; i < KEPT; i++)
        if (p[i] != (unsigned char)(i * 13 + 7))
            fail("byte %d of the segment changed", i);
    struct shmid_ds ds;
    if (shmctl(shm_id, IPC_STAT, &ds) != 0 || ds.shm_nattch != 1 || ds.shm_segsz != SIZE)
        fail("the segment is not what it was");
    /* the rest stays unmapped: a fixed no-replace mapping there must succeed */
    void *q = mmap(p + KEPT, SIZE - KEPT, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS |
                   MAP_FIXED_NOREPLACE, -1, 0);
    if (q != p + KEPT)
        fail("the unmapped rest of the segment is mapped again");
    printf("PASS\n");
    return 0;
}
