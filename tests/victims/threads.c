// cflags: -pthread
// threads.c - upmig test victim: threads in the states real programs leave them in.
//
// Usage: threads MODE [N]
//   mutex N   N workers add to one counter under a mutex and count their own adds in
//             __thread storage; at the end the sums must agree and every thread's
//             TLS must still hold its own index.
//   condvar   producer/consumer through a 16-slot ring on two condition variables;
//             the consumer checks every number arrives once and in order.
//   join      main blocks in pthread_join on a thread that sleeps 3 s after READY,
//             then prints JOINED.
//   futex     4 threads blocked in a raw FUTEX_WAIT; woken only after SIGTERM.
//   sigmask   per-thread signal masks, a signal pending on one thread only (blocked
//             there), and that thread's own sigaltstack; after SIGTERM the thread
//             unblocks it and must take it itself, on its altstack. Also SIGHUP,
//             blocked everywhere, pending for the whole process.
//   many N    N threads named park-I park on a condition variable with per-thread
//             TLS values.
//   io        one thread blocked in poll on stdin, then read; prints GOT <line>.
// Every mode checks that each thread's TID (gettid) is what it was at start.
// Protocol: READY once set up; on SIGTERM (taken by sigwait in main) it stops,
// verifies and prints PASS (or FAIL: why) and exits 0 (1).
// -DBREAK: one thread's TLS is changed before the check, which must then FAIL.
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "victim.h"

#define MAXT 512

static pid_t tid(void) { return (pid_t)syscall(SYS_gettid); }

static __thread long tls_index = -1;
static __thread long tls_adds;
static __thread pid_t tls_tid;
static pthread_t th[MAXT];
static int nthreads;

static void tls_start(long i)
{
    tls_index = i;
    tls_tid = tid();
}

static void tls_check(long i)
{
    if (tls_index != i)
        fail("thread %ld: TLS index is %ld", i, tls_index);
    if (tls_tid != tid())
        fail("thread %ld: TID was %d, is %d", i, tls_tid, tid());
}

static void start(void *(*fn)(void *), int n)
{
    nthreads = n;
    for (long i = 0; i < n; i++) {
        int e = pthread_create(&th[i], NULL, fn, (void *)i);
        if (e)
            fail("pthread_create: %s", strerror(e));
    }
}

static long join_all(void)
{
    long sum = 0;
    for (int i = 0; i < nthreads; i++) {
        void *ret;
        int e = pthread_join(th[i], &ret);
        if (e)
            fail("pthread_join: %s", strerror(e));
        sum += (long)ret;
    }
    return sum;
}

static void wait_term(void)
{
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    int sig;
    if (sigwait(&term, &sig) != 0)
        fail("sigwait");
}

static atomic_int stop;

/* ---- mutex */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long counter;

static void *adder(void *arg)
{
    long i = (long)arg;
    tls_start(i);
    while (!atomic_load(&stop)) {
        pthread_mutex_lock(&lock);
        counter++;
        tls_adds++;
        pthread_mutex_unlock(&lock);
        if (tls_adds % 64 == 0)
            usleep(200);
    }
#ifdef BREAK
    if (i == 0)
        tls_index = 99;
#endif
    tls_check(i);
    return (void *)tls_adds;
}

static void mode_mutex(int n)
{
    start(adder, n);
    printf("READY\n");
    wait_term();
    atomic_store(&stop, 1);
    long sum = join_all();
    if (sum != counter || counter == 0)
        fail("threads added %ld, counter is %ld", sum, counter);
}

/* ---- condvar */

static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER, not_full = PTHREAD_COND_INITIALIZER;
static long ring[16];
static long head, tail, produced, consumed;

static void *producer(void *arg)
{
    tls_start((long)arg);
    for (long n = 0; !atomic_load(&stop); n++) {
        pthread_mutex_lock(&lock);
        while (head - tail == 16 && !atomic_load(&stop))
            pthread_cond_wait(&not_full, &lock);
        if (atomic_load(&stop)) {   /* under the lock: the consumer may have left */
            pthread_mutex_unlock(&lock);
            break;
        }
        ring[head++ % 16] = n;
        produced++;
        pthread_cond_signal(&not_empty);
        pthread_mutex_unlock(&lock);
        if (n % 128 == 0)
            usleep(500);
    }
    tls_check((long)arg);
    return NULL;
}

static void *consumer(void *arg)
{
    tls_start((long)arg);
    for (long want = 0;; want++) {
        pthread_mutex_lock(&lock);
        while (head == tail && !atomic_load(&stop))
            pthread_cond_wait(&not_empty, &lock);
        if (head == tail) {
            pthread_mutex_unlock(&lock);
            break;
        }
        long got = ring[tail++ % 16];
        consumed++;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&lock);
        if (got != want)
            fail("consumer got %ld, wanted %ld", got, want);
    }
    tls_check((long)arg);
    return NULL;
}

static void mode_condvar(void)
{
    nthreads = 2;
    pthread_create(&th[0], NULL, producer, (void *)0);
    pthread_create(&th[1], NULL, consumer, (void *)1);
    printf("READY\n");
    wait_term();
    pthread_mutex_lock(&lock);
    atomic_store(&stop, 1);
    pthread_cond_broadcast(&not_empty);
    pthread_cond_broadcast(&not_full);
    pthread_mutex_unlock(&lock);
    join_all();
    if (produced != consumed || produced == 0)
        fail("produced %ld, consumed %ld", produced, consumed);
}

/* ---- join */

static void *sleeper(void *arg)
{
    tls_start((long)arg);
    struct timespec ts = {3, 0};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
    tls_check((long)arg);
    return (void *)42;
}

static void mode_join(void)
{
    start(sleeper, 1);
    printf("READY\n");
    if (join_all() != 42)
        fail("join returned the wrong value");
    printf("JOINED\n");
    wait_term();
}

/* ---- futex */

static atomic_int word;
static atomic_int woken;

static void *futex_waiter(void *arg)
{
    tls_start((long)arg);
    while (atomic_load(&word) == 0) {
        long r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        if (r < 0 && errno != EAGAIN && errno != EINTR)
            fail("futex wait: %s", strerror(errno));
    }
    atomic_fetch_add(&woken, 1);
    tls_check((long)arg);
    return NULL;
}

static void mode_futex(void)
{
    start(futex_waiter, 4);
    printf("READY\n");
    wait_term();
    if (atomic_load(&woken) != 0)
        fail("%d waiters woke before the word changed", atomic_load(&woken));
    atomic_store(&word, 1);
    syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
    join_all();
    if (atomic_load(&woken) != 4)
        fail("%d of 4 waiters woke", atomic_load(&woken));
}

/* ---- sigmask */

static atomic_int usr2_tid, usr2_on_alt, go, masked;
static char altstack[65536];

static void on_usr2(int sig)
{
    (void)sig;
    char here;
    usr2_tid = tid();
    usr2_on_alt = &here >= altstack && &here < altstack + sizeof altstack;
}

static void park_until_go(void)
{
    pthread_mutex_lock(&lock);
    while (!atomic_load(&go))
        pthread_cond_wait(&not_empty, &lock);
    pthread_mutex_unlock(&lock);
}

/* SIGTERM (main's sigwait) and SIGHUP (pending for the process) are blocked in
 * every thread; each thread blocks one more of its own. */
static void block_only(int own)
{
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGTERM);
    sigaddset(&m, SIGHUP);
    if (own)
        sigaddset(&m, own);
    pthread_sigmask(SIG_SETMASK, &m, NULL);
}

static void check_mask(const char *who, int own)
{
    sigset_t m;
    pthread_sigmask(SIG_SETMASK, NULL, &m);
    for (int s = 1; s < 32; s++)
        if (sigismember(&m, s) != (s == SIGTERM || s == SIGHUP || s == own))
            fail("%s: signal %d is %sblocked", who, s, sigismember(&m, s) ? "" : "not ");
    sigset_t p;
    sigpending(&p);
    if (!sigismember(&p, SIGHUP))
        fail("%s: SIGHUP, pending for the process, is not", who);
}

static void *holds_usr1(void *arg)   /* blocks SIGUSR1: nothing is pending for it */
{
    tls_start((long)arg);
    block_only(SIGUSR1);
    atomic_fetch_add(&masked, 1);
    park_until_go();
    check_mask("thread A", SIGUSR1);
    sigset_t p;
    sigpending(&p);   /* its own queue and the shared one: B's signal is in neither */
    if (sigismember(&p, SIGUSR2))
        fail("thread A sees SIGUSR2 pending: it moved to the shared queue");
    tls_check((long)arg);
    return NULL;
}

static void *holds_usr2(void *arg)   /* SIGUSR2 pending on this thread alone */
{
    tls_start((long)arg);
    block_only(SIGUSR2);
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    if (sigaltstack(&ss, NULL) != 0)
        fail("sigaltstack");
    atomic_fetch_add(&masked, 1);
    park_until_go();
    check_mask("thread B", SIGUSR2);
    sigset_t p;
    sigpending(&p);
    if (!sigismember(&p, SIGUSR2))
        fail("thread B: SIGUSR2 is no longer pending");
    sigset_t u;
    sigemptyset(&u);
    sigaddset(&u, SIGUSR2);
    pthread_sigmask(SIG_UNBLOCK, &u, NULL);   /* delivered here, now */
    if (usr2_tid != tid())
        fail("SIGUSR2 was taken by %d, not by thread B %d", usr2_tid, tid());
    if (!usr2_on_alt)
        fail("SIGUSR2 did not run on thread B's altstack");
    tls_check((long)arg);
    return NULL;
}

static void mode_sigmask(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR2, &sa, NULL);
    block_only(0);
    nthreads = 2;
    pthread_create(&th[0], NULL, holds_usr1, (void *)0);
    pthread_create(&th[1], NULL, holds_usr2, (void *)1);
    while (atomic_load(&masked) < 2) /* both have set their masks (and B its altstack) */
        usleep(1000);
    pthread_kill(th[1], SIGUSR2);   /* pending, on thread B only */
    kill(getpid(), SIGHUP);         /* pending, for the whole process */
    printf("READY\n");
    wait_term();
    if (usr2_tid)
        fail("SIGUSR2 was delivered early, to %d", usr2_tid);
    check_mask("main", 0);
    pthread_mutex_lock(&lock);
    atomic_store(&go, 1);
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&lock);
    join_all();
}

/* ---- many */

static atomic_int parked, checked;

static void *parker(void *arg)
{
    long i = (long)arg;
    tls_start(i);
    tls_adds = i * 7 + 1;
    char name[16];
    snprintf(name, sizeof name, "park-%ld", i);
    pthread_setname_np(pthread_self(), name);
    atomic_fetch_add(&parked, 1);
    park_until_go();
    if (tls_adds != i * 7 + 1)
        fail("thread %ld: TLS value %ld", i, tls_adds);
    char now[16];
    pthread_getname_np(pthread_self(), now, sizeof now);
    if (strcmp(now, name))
        fail("thread %ld is named %s, not %s", i, now, name);
    tls_check(i);
    atomic_fetch_add(&checked, 1);
    return NULL;
}

static void mode_many(int n)
{
    start(parker, n);
    while (atomic_load(&parked) < n)
        usleep(1000);
    printf("READY\n");
    wait_term();
    pthread_mutex_lock(&lock);
    atomic_store(&go, 1);
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&lock);
    join_all();
    if (atomic_load(&checked) != n)
        fail("%d of %d threads checked out", atomic_load(&checked), n);
}

/* ---- io */

static void *reader(void *arg)
{
    tls_start((long)arg);
    struct pollfd p = {.fd = 0, .events = POLLIN};
    int r;
    while ((r = poll(&p, 1, -1)) < 0 && errno == EINTR)
        ;
    if (r != 1)
        fail("poll returned %d: %s", r, strerror(errno));
    char line[64];
    ssize_t n;
    while ((n = read(0, line, sizeof line - 1)) < 0 && errno == EINTR)
        ;
    if (n <= 0)
        fail("read returned %zd", n);
    line[n] = '\0';
    printf("GOT %s", line);
    tls_check((long)arg);
    return NULL;
}

static void mode_io(void)
{
    start(reader, 1);
    printf("READY\n");
    join_all();
    wait_term();
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    /* SIGTERM is for main's sigwait: blocked in every thread (they inherit it). */
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &term, NULL);
    const char *mode = argc > 1 ? argv[1] : "mutex";
    int n = argc > 2 ? atoi(argv[2]) : 4;
    if (n < 1 || n > MAXT)
        fail("bad thread count %d", n);
    pid_t main_tid = tid();
    if (!strcmp(mode, "mutex"))
        mode_mutex(n);
    else if (!strcmp(mode, "condvar"))
        mode_condvar();
    else if (!strcmp(mode, "join"))
        mode_join();
    else if (!strcmp(mode, "futex"))
        mode_futex();
    else if (!strcmp(mode, "sigmask"))
        mode_sigmask();
    else if (!strcmp(mode, "many"))
        mode_many(n);
    else if (!strcmp(mode, "io"))
        mode_io();
    else
        fail("unknown mode %s", mode);
    if (tid() != main_tid || getpid() != main_tid)
        fail("main thread's id changed");
    printf("PASS\n");
    return 0;
}
