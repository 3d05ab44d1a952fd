// cflags: -pthread
/* sharedmem.c - a parent and two workers that share memory of every kind a forked
 * job shares, and can only go on together if it is still shared after a move:
 *   - MAP_SHARED|MAP_ANONYMOUS memory made before the fork (some of its pages first
 *     touched by a worker after it), holding a process-shared unnamed semaphore;
 *   - a memfd, mapped and held open, with seals; another sealed against writes and
 *     mapped read-only;
 *   - a POSIX shared memory object in /dev/shm (shm_open), still named;
 *   - a named POSIX semaphore, unlinked at once (multiprocessing's kind).
 * Each round the parent writes the round into the memfd and wakes each worker; each
 * adds into its slot of the shm object and to a counter on a page only workers
 * touch, then reports. The parent prints what it sees. Anything copied instead of
 * shared stops the rounds or changes the report. Usage: sharedmem [ROUNDS]. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "victim.h"

#define ANON_SIZE (1 << 20)
#define WORKERS 2

struct anon {           /* the first page of the anonymous region */
    sem_t done;
    sem_t go1;          /* worker 1's; worker 0's is the named semaphore */
};

static int64_t *worker_page(char *anon)  /* a page the parent never touches before fork */
{
    return (int64_t *)(anon + ANON_SIZE / 2);
}

static void worker(int id, char *anon, volatile int64_t *memfd_area, int64_t *slots,
                   sem_t *go, int rounds)
{
    struct anon *a = (struct anon *)anon;
    for (int r = 1; r <= rounds; r++) {
        if (sem_wait(go) != 0)
            fail("sem_wait(go)");
        int64_t seen = memfd_area[0];
        if (seen != r)
            fail("worker %d saw round %lld in the memfd, expected %d", id, (long long)seen, r);
        slots[id] += seen * (id + 2);
        __atomic_add_fetch(worker_page(anon), id + 1, __ATOMIC_SEQ_CST);
        if (sem_post(&a->done) != 0)
            fail("sem_post(done)");
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1200;
    char shm_name[64], sem_name[64];
    snprintf(shm_name, sizeof shm_name, "/upmig-victim-shm-%d", getpid());
    snprintf(sem_name, sizeof sem_name, "/upmig-victim-sem-%d", getpid());

    char *anon = mmap(NULL, ANON_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                      -1, 0);
    if (anon == MAP_FAILED)
        fail("mmap(shared anonymous)");
    struct anon *a = (struct anon *)anon;
    if (sem_init(&a->done, 1, 0) != 0 || sem_init(&a->go1, 1, 0) != 0)
        fail("sem_init");
    memset(anon + 4096, 0x5a, ANON_SIZE / 4);  /* pages that are in the image once */

    int mfd = memfd_create("upmig-victim", MFD_ALLOW_SEALING);
    if (mfd < 0 || ftruncate(mfd, 65536) != 0)
        fail("memfd");
    int64_t *memfd_area = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (memfd_area == MAP_FAILED)
        fail("mmap(memfd)");
    if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
        fail("F_ADD_SEALS");

    /* a memfd written once, then sealed against writes and mapped read-only */
    int rofd = memfd_create("upmig-victim-sealed", MFD_ALLOW_SEALING);
    if (rofd < 0 || ftruncate(rofd, 4096) != 0 || pwrite(rofd, "sealed contents", 16, 0) != 16)
        fail("sealed memfd");
    if (fcntl(rofd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW) != 0)
        fail("F_SEAL_WRITE");
    const char *sealed = mmap(NULL, 4096, PROT_READ, MAP_SHARED, rofd, 0);
    if (sealed == MAP_FAILED)
        fail("mmap(sealed memfd)");

    int sfd = shm_open(shm_name, O_CREAT | O_EXCL | O_RDWR, 0640);
    if (sfd < 0 || ftruncate(sfd, 8192) != 0)
        fail("shm_open");
    int64_t *slots = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (slots == MAP_FAILED)
        fail("mmap(shm)");
    close(sfd);

    sem_t *go = sem_open(sem_name, O_CREAT | O_EXCL, 0600, 0);
    if (go == SEM_FAILED)
        fail("sem_open");
    sem_unlink(sem_name);

    pid_t kids[WORKERS];
    for (int i = 0; i < WORKERS; i++) {
        kids[i] = fork();
        if (kids[i] < 0)
            fail("fork");
        if (kids[i] == 0)
            worker(i, anon, memfd_area, slots, i ? &a->go1 : go, rounds);
    }
    printf("READY\n");
    fflush(stdout);
    for (int r = 1; r <= rounds; r++) {
        memfd_area[0] = r;
        sem_post(go);
        sem_post(&a->go1);
        for (int i = 0; i < WORKERS; i++) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += 20;
            while (sem_timedwait(&a->done, &until) != 0)
                if (errno != EINTR)
                    fail("round %d: the workers did not report", r);
        }
        if (r % 50 == 0)
            printf("round %d: slots %lld %lld, workers' page %lld\n", r, (long long)slots[0],
                   (long long)slots[1], (long long)*worker_page(anon));
        fflush(stdout);
        usleep(2000);
    }
    for (int i = 0; i < WORKERS; i++) {
        int status;
        if (waitpid(kids[i], &status, 0) != kids[i] || status != 0)
            fail("worker %d ended with status %#x", i, status);
    }
    printf("seals %#x\n", fcntl(mfd, F_GET_SEALS));
    printf("sealed %#x %s\n", fcntl(rofd, F_GET_SEALS), sealed);
    shm_unlink(shm_name);
    printf("DONE\n");
    return 0;
}
