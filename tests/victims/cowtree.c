/* cowtree.c - a forked worker pool's memory: the parent fills a buffer, then forks
 * workers that each overwrite the second half of their copy with their own pattern;
 * the first half stays shared copy-on-write with the parent. On SIGTERM every
 * process checks its whole buffer; the parent reports "PASS N" for N processes
 * whose memory is intact, or what was wrong.
 * Usage: cowtree [PROCESSES] [MIB]  (defaults 8 and 4) */
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>
#include "victim.h"

static volatile sig_atomic_t term;

static void on_term(int sig)
{
    (void)sig;
    term = 1;
}

/* Until SIGTERM: blocked but while waiting, so one sent between the test of term and
 * the wait (say, just after a resume) is not lost. */
static void wait_for_term(void)
{
    sigset_t none;
    sigemptyset(&none);
    while (!term)
        sigsuspend(&none);
}

static uint64_t word(uint64_t i, uint64_t who)  /* the pattern: word i of process who */
{
    return (i * 0x9e3779b97f4a7c15ULL) ^ (who << 56) ^ 0x5555;
}

/* 0 if buf holds the parent's pattern in its first half and who's in the second. */
static long check(const uint64_t *buf, size_t words, uint64_t who)
{
    for (size_t i = 0; i < words; i++)
        if (buf[i] != word(i, i < words / 2 ? 0 : who))
            return (long)i + 1;
    return 0;
}

int main(int argc, char **argv)
{
    int procs = argc > 1 ? atoi(argv[1]) : 8;
    size_t size = (size_t)(argc > 2 ? atoi(argv[2]) : 4) << 20, words = size / 8;
    uint64_t *buf = malloc(size);
    int ready[2];
    if (!buf || pipe(ready) != 0)
        fail("setup");
    catch_sigterm(on_term);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, NULL);
    for (size_t i = 0; i < words; i++)
        buf[i] = word(i, 0);
    pid_t *kids = calloc(procs, sizeof *kids);
    for (int k = 1; k < procs; k++) {
        kids[k] = fork();
        if (kids[k] < 0)
            fail("fork");
        if (kids[k] == 0) {
            for (size_t i = words / 2; i < words; i++)
                buf[i] = word(i, k);
            if (write(ready[1], "r", 1) != 1)
                _exit(3);
            wait_for_term();
            _exit(check(buf, words, k) ? 2 : 0);
        }
    }
    for (int k = 1; k < procs; k++) {
        char c;
        if (read(ready[0], &c, 1) != 1)
            fail("a worker did not start");
    }
    printf("READY\n");
    fflush(stdout);
    wait_for_term();
    long bad = check(buf, words, 0);
    int good = !bad;
    if (bad)
        printf("FAIL: the parent's word %ld is wrong\n", bad - 1);
    for (int k = 1; k < procs; k++) {
        int status;
        kill(kids[k], SIGTERM);
        if (waitpid(kids[k], &status, 0) != kids[k])
            fail("waitpid");
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            good++;
        else
            printf("FAIL: worker %d ended with status %#x\n", k, status);
    }
    printf("PASS %d\n", good);
    return 0;
}
