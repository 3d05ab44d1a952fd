/* sysvshm.c - the classic SysV example: a segment made with shmget, a parent and a
 * forked child both attached, taking turns through a SysV semaphore set.
 *   - segment A: a key of its own, mode 0640, attached by both (the child at a fixed
 *     address it chose), holding the counter they pass back and forth;
 *   - segment B: private, removed (IPC_RMID) at once, still attached by both;
 *   - a semaphore set of two (key-less) for the turns, and one of three set once and
 *     left alone (found again on the next move only if resume kept it the tree's).
 * Each round the parent adds to the counter and posts the child's semaphore; the
 * child adds its part to A and B and posts back. The parent prints what it sees.
 * At the end it checks ids, keys, modes and attachments are what they were.
 * Usage: sysvshm [ROUNDS] */
#include <errno.h>
#include <stdint.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>
#include "victim.h"

#define SIZE (64 * 1024)

static void turn(int semid, int num, int delta)
{
    struct sembuf op = { .sem_num = num, .sem_op = delta, .sem_flg = 0 };
    while (semop(semid, &op, 1) != 0)
        if (errno != EINTR)
            fail("semop: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 900;
    key_t key = 0x75500000 | (getpid() & 0xfffff);
    int a_id = shmget(key, SIZE, IPC_CREAT | IPC_EXCL | 0640);
    int b_id = shmget(IPC_PRIVATE, SIZE, IPC_CREAT | 0600);
    int sem = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
    int idle = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);  /* set once, then left alone */
    if (a_id < 0 || b_id < 0 || sem < 0 || idle < 0)
        fail("shmget/semget");
    unsigned short start[3] = { 11, 22, 33 };
    if (semctl(idle, 0, SETALL, start) != 0)
        fail("SETALL");
    volatile int64_t *a = shmat(a_id, NULL, 0), *b = shmat(b_id, NULL, 0);
    if (a == (void *)-1 || b == (void *)-1)
        fail("shmat");
    shmctl(b_id, IPC_RMID, NULL);
    a[100] = 7;                            /* pages the child reads before any turn */
    pid_t kid = fork();
    if (kid < 0)
        fail("fork");
    if (kid == 0) {
        /* again, where the child wants it */
        volatile int64_t *mine = shmat(a_id, (void *)0x7a0000000000, SHM_RND);
        if (mine == (void *)-1)
            fail("child shmat");
        for (int r = 1; r <= rounds; r++) {
            turn(sem, 1, -1);
            mine[0] += r * 3 + mine[100];
            b[1] += r;
            turn(sem, 0, 1);
        }
        _exit(0);
    }
    printf("READY\n");
    fflush(stdout);
    for (int r = 1; r <= rounds; r++) {
        a[0] += 1;
        turn(sem, 1, 1);
        turn(sem, 0, -1);
        if (r % 50 == 0)
            printf("round %d: a %lld b %lld\n", r, (long long)a[0], (long long)b[1]);
        fflush(stdout);
        usleep(3000);
    }
    int status;
    if (waitpid(kid, &status, 0) != kid || status != 0)
        fail("child ended with %#x", status);
    struct shmid_ds ds;
    if (shmctl(a_id, IPC_STAT, &ds) != 0 || ds.shm_perm.__key != key ||
        (ds.shm_perm.mode & 0777) != 0640 || ds.shm_segsz != SIZE || ds.shm_nattch != 1)
        fail("segment A is not what it was (nattch %lu)", (unsigned long)ds.shm_nattch);
    if (shmget(key, 0, 0) != a_id)
        fail("key lookup gives another segment");
    unsigned short now[3];
    if (semctl(idle, 0, GETALL, now) != 0 || now[0] != 11 || now[1] != 22 || now[2] != 33)
        fail("the idle semaphore set lost its values");
    printf("segment A ok\n");
    shmctl(a_id, IPC_RMID, NULL);
    semctl(sem, 0, IPC_RMID);
    semctl(idle, 0, IPC_RMID);
    printf("DONE\n");
    return 0;
}
