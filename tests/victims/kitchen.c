// cflags: -pthread
/* kitchen.c - a little of every kind of state, in one small tree, for the image fuzz
 * (tests/imagefuzz.py): every record kind an image can hold is in its image.
 *   - a forked child: copy-on-write memory (1 MiB filled before the fork), a page of
 *     MAP_SHARED anonymous memory it writes and the parent checks, the data file's
 *     open file description shared with the parent; and a zombie child (status 7);
 *   - a second thread blocked in read(), answering a ping after resume;
 *   - a memfd and a POSIX shm object (/dev/shm/upmig-kitchen-PID) mapped shared, a
 *     deleted file held open;
 *   - a SysV segment and a semaphore set, keyed 0x4b490000 | (pid & 0xffff);
 *   - a pipe with bytes in it, an eventfd (5), epoll watching both, a timerfd armed
 *     for 1000 s, a signalfd, inotify watching a directory, a unix socket pair with bytes
 *     queued, a listener on an abstract name, an unbound unix datagram socket, a file
 *     with an offset, a flock and a POSIX lock, a FIFO with bytes in it, a UDP socket
 *     and a TCP listener on 127.0.0.1, O_ASYNC on the pipe (SIGUSR2 to itself), stdin
 *     inherited (a pipe from whoever started it, re-attached to the resumer's);
 *   - handlers (SIGTERM, SIGUSR1 with SA_RESTART|SA_SIGINFO, SIGUSR2, SIGALRM),
 *     SIGPIPE ignored, an itimer 1000 s away, an alternate signal stack.
 * On SIGTERM it checks all of it, prints PASS (or FAIL: why) and exits; either way
 * its named objects (POSIX shm, SysV) are removed and its child ended. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include "victim.h"

#define COW_SIZE (1 << 20)
#define SYSV_SIZE (64 * 1024)
#define SHM_SIZE 8192

static volatile sig_atomic_t term;
static char shm_name[64];
static int shm_id = -1, sem_id = -1;
static pid_t kid = -1;
static char altstack[65536];

static void on_term(int sig) { (void)sig; term = 1; }
static void on_usr1(int sig, siginfo_t *info, void *ctx) { (void)sig; (void)info; (void)ctx; }
static void on_alrm(int sig) { (void)sig; }
static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig) { (void)sig; got_usr2++; }

static int bound(int type, struct sockaddr_in *at)
{
    int fd = socket(AF_INET, type, 0);
    struct sockaddr_in any = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof *at;
    if (fd < 0 || bind(fd, (struct sockaddr *)&any, sizeof any) != 0 ||
        getsockname(fd, (struct sockaddr *)at, &len) != 0)
        fail("bind: %s", strerror(errno));
    return fd;
}

static int same_name(int fd, const struct sockaddr_in *want)
{
    struct sockaddr_in at;
    socklen_t len = sizeof at;
    return getsockname(fd, (struct sockaddr *)&at, &len) == 0 && at.sin_port == want->sin_port &&
           at.sin_addr.s_addr == want->sin_addr.s_addr;
}

static uint64_t word(size_t i) { return i * 0x9e3779b97f4a7c15ULL ^ 0x4b49; }

/* Whatever happens, leave nothing behind: named objects and the child. */
static void tidy(void)
{
    if (kid > 0) {
        kill(kid, SIGKILL);
        waitpid(kid, NULL, 0);
        kid = -1;
    }
    if (shm_name[0])
        shm_unlink(shm_name);
    if (shm_id >= 0)
        shmctl(shm_id, IPC_RMID, NULL);
    if (sem_id >= 0)
        semctl(sem_id, 0, IPC_RMID);
}

static void wait_for_term(void)
{
    sigset_t none;
    sigemptyset(&none);
    while (!term)
        sigsuspend(&none);
}

static int ping_in[2], ping_out[2];

static void *echo(void *arg)
{
    (void)arg;
    char c;
    while (read(ping_in[0], &c, 1) == 1)
        if (write(ping_out[1], &c, 1) != 1)
            break;
    return NULL;
}

static void child(const uint64_t *cow, volatile char *anon, int ready)
{
    memset((char *)anon + 4096, 0x6b, 4096);     /* the page the parent checks */
    if (write(ready, "r", 1) != 1)
        _exit(3);
    close(ready);
    wait_for_term();
    for (size_t i = 0; i < COW_SIZE / 8; i++)
        if (cow[i] != word(i))
            _exit(2);
    _exit(0);
}

static void expect(int ok, const char *what)
{
    if (!ok)
        fail("%s", what);
}

int main(void)
{
    atexit(tidy);
    pid_t me = getpid();
    key_t key = 0x4b490000 | (me & 0xffff);
    snprintf(shm_name, sizeof shm_name, "/upmig-kitchen-%d", me);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_RESTART | SA_SIGINFO;
    sigaddset(&sa.sa_mask, SIGUSR2);
    expect(sigaction(SIGUSR1, &sa, NULL) == 0, "sigaction(SIGUSR1)");
    signal(SIGUSR2, on_usr2);
    signal(SIGALRM, on_alrm);
    signal(SIGPIPE, SIG_IGN);
    catch_sigterm(on_term);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, NULL);
    stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0 };
    expect(sigaltstack(&ss, NULL) == 0, "sigaltstack");
    struct itimerval it = { .it_value = { .tv_sec = 1000 } };
    expect(setitimer(ITIMER_REAL, &it, NULL) == 0, "setitimer");

    uint64_t *cow = malloc(COW_SIZE);
    expect(cow != NULL, "malloc");
    for (size_t i = 0; i < COW_SIZE / 8; i++)
        cow[i] = word(i);
    char *anon = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    expect(anon != MAP_FAILED, "mmap(shared anonymous)");
    memset(anon, 0x11, 4096);

    int mfd = memfd_create("upmig-kitchen", 0);
    expect(mfd >= 0 && ftruncate(mfd, 4096) == 0, "memfd");
    char *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    expect(mem != MAP_FAILED, "mmap(memfd)");
    strcpy(mem, "memfd contents");

    int sfd = shm_open(shm_name, O_CREAT | O_EXCL | O_RDWR, 0600);
    expect(sfd >= 0 && ftruncate(sfd, SHM_SIZE) == 0, "shm_open");
    char *posix = mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    expect(posix != MAP_FAILED, "mmap(shm)");
    close(sfd);
    strcpy(posix + 4096, "posix contents");

    int gfd = open("ghost.tmp", O_RDWR | O_CREAT | O_TRUNC, 0600);
    expect(gfd >= 0 && write(gfd, "ghost bytes", 11) == 11 && unlink("ghost.tmp") == 0,
           "deleted file");

    shm_id = shmget(key, SYSV_SIZE, IPC_CREAT | IPC_EXCL | 0600);
    sem_id = semget(key, 2, IPC_CREAT | IPC_EXCL | 0600);
    expect(shm_id >= 0 && sem_id >= 0, "shmget/semget");
    unsigned short values[2] = { 3, 7 };
    expect(semctl(sem_id, 0, SETALL, values) == 0, "SETALL");
    char *sysv = shmat(shm_id, NULL, 0);
    expect(sysv != (void *)-1, "shmat");
    strcpy(sysv + 8192, "sysv contents");

    int data = open("data.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
    expect(data >= 0 && write(data, "0123456789", 10) == 10 && lseek(data, 4, SEEK_SET) == 4,
           "data file");
    expect(flock(data, LOCK_EX) == 0, "flock");
    struct flock range = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 2, .l_len = 3 };
    expect(fcntl(data, F_SETLK, &range) == 0, "POSIX lock");
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    expect(dir >= 0 && null >= 0, "dir, /dev/null");

    int p[2];
    expect(pipe(p) == 0 && write(p[1], "pipe bytes", 10) == 10, "pipe");
    expect(fcntl(p[0], F_SETOWN, me) == 0 && fcntl(p[0], F_SETSIG, SIGUSR2) == 0 &&
           fcntl(p[0], F_SETFL, O_ASYNC | O_NONBLOCK) == 0, "O_ASYNC");
    int ev = eventfd(5, EFD_NONBLOCK);
    int ep = epoll_create1(0);
    struct epoll_event e1 = { .events = EPOLLIN, .data.u64 = 0x1111 };
    struct epoll_event e2 = { .events = EPOLLIN, .data.u64 = 0x2222 };
    expect(ev >= 0 && ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e1) == 0 &&
           epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e2) == 0, "eventfd, epoll");
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec ts = { .it_value = { .tv_sec = 1000 } };
    expect(tfd >= 0 && timerfd_settime(tfd, 0, &ts, NULL) == 0, "timerfd");
    sigset_t wmask;
    sigemptyset(&wmask);
    sigaddset(&wmask, SIGWINCH);
    int sigfd = signalfd(-1, &wmask, SFD_NONBLOCK);
    int ino = inotify_init1(IN_NONBLOCK);
    mkdir("watched", 0700);
    expect(sigfd >= 0 && ino >= 0 && inotify_add_watch(ino, "watched", IN_CREATE) == 1,
           "signalfd, inotify");
    int pair[2];
    expect(socketpair(AF_UNIX, SOCK_STREAM, 0, pair) == 0 && write(pair[0], "to b", 4) == 4,
           "socketpair");
    int lis = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    int namelen = snprintf(sun.sun_path + 1, sizeof sun.sun_path - 1, "upmig-kitchen-%d", me);
    socklen_t alen = offsetof(struct sockaddr_un, sun_path) + 1 + namelen;
    expect(lis >= 0 && bind(lis, (struct sockaddr *)&sun, alen) == 0 && listen(lis, 5) == 0,
           "listener");
    int loose = socket(AF_UNIX, SOCK_DGRAM, 0);
    expect(loose >= 0, "unbound socket");

    struct sockaddr_in udp_at, tcp_at;
    int udp = bound(SOCK_DGRAM, &udp_at), tcp = bound(SOCK_STREAM, &tcp_at);
    expect(listen(tcp, 4) == 0, "listen");
    mkfifo("fifo", 0600);
    int fifo_r = open("fifo", O_RDONLY | O_NONBLOCK), fifo_w = open("fifo", O_WRONLY);
    expect(fifo_r >= 0 && fifo_w >= 0 && write(fifo_w, "fifo bytes", 10) == 10, "FIFO");

    expect(pipe(ping_in) == 0 && pipe(ping_out) == 0, "ping pipes");
    pthread_t th;
    expect(pthread_create(&th, NULL, echo, NULL) == 0, "pthread_create");

    pid_t dead = fork();
    expect(dead >= 0, "fork");
    if (dead == 0)
        _exit(7);
    siginfo_t info;
    expect(waitid(P_PID, dead, &info, WEXITED | WNOWAIT) == 0, "waitid");  /* a zombie now */

    int ready[2];
    expect(pipe(ready) == 0, "ready pipe");
    kid = fork();
    expect(kid >= 0, "fork");
    if (kid == 0) {
        for (int fd = 3; fd < 1024; fd++)  /* keep stdio, the data file and its pipe */
            if (fd != data && fd != ready[1])
                close(fd);
        child(cow, anon, ready[1]);
    }
    char c;
    expect(read(ready[0], &c, 1) == 1, "the child did not start");
    close(ready[0]);
    close(ready[1]);
    printf("READY\n");
    fflush(stdout);
    wait_for_term();

    /* memory */
    for (size_t i = 0; i < COW_SIZE / 8; i++)
        expect(cow[i] == word(i), "the copy-on-write buffer changed");
    for (int i = 0; i < 4096; i++)
        expect(anon[i] == 0x11 && anon[4096 + i] == 0x6b, "the shared anonymous memory");
    char buf[64] = "";
    expect(strcmp(mem, "memfd contents") == 0 && pread(mfd, buf, 14, 0) == 14 &&
           memcmp(buf, "memfd contents", 14) == 0, "the memfd");
    expect(strcmp(posix + 4096, "posix contents") == 0, "the POSIX shm object");
    expect(pread(gfd, buf, 11, 0) == 11 && memcmp(buf, "ghost bytes", 11) == 0,
           "the deleted file");
    expect(strcmp(sysv + 8192, "sysv contents") == 0 && shmget(key, 0, 0) == shm_id,
           "the SysV segment");
    unsigned short now[2];
    expect(semctl(sem_id, 0, GETALL, now) == 0 && now[0] == 3 && now[1] == 7,
           "the semaphore set");
    /* files */
    expect(lseek(data, 0, SEEK_CUR) == 4, "the data file's offset");
    /* (before any other fd of data.txt is closed: that drops the process's POSIX locks) */
    struct flock probe = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
    int other = open("data.txt", O_RDONLY);
    expect(other >= 0 && fcntl(other, F_OFD_GETLK, &probe) == 0 && probe.l_type == F_WRLCK &&
           probe.l_start == 2 && probe.l_len == 3, "the POSIX lock");
    expect(flock(other, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK, "the flock");
    close(other);
    struct epoll_event got[4];
    expect(epoll_wait(ep, got, 4, 0) == 2, "epoll sees the pipe and the eventfd");
    uint64_t count;
    expect(read(ev, &count, 8) == 8 && count == 5, "the eventfd count");
    expect(read(p[0], buf, 64) == 10 && memcmp(buf, "pipe bytes", 10) == 0, "the pipe bytes");
    expect(timerfd_gettime(tfd, &ts) == 0 && ts.it_value.tv_sec > 900, "the timerfd");
    struct signalfd_siginfo si;
    expect(read(sigfd, &si, sizeof si) < 0 && errno == EAGAIN, "the signalfd");
    expect(inotify_add_watch(ino, "watched", IN_CREATE) == 1, "the inotify watch");
    expect(read(pair[1], buf, 4) == 4 && memcmp(buf, "to b", 4) == 0, "the socket pair");
    struct sockaddr_un here;
    socklen_t hlen = sizeof here;
    expect(getsockname(lis, (struct sockaddr *)&here, &hlen) == 0 && hlen == alen &&
           memcmp(&here, &sun, alen) == 0, "the listener's name");
    int stype = 0;
    socklen_t slen = sizeof stype;
    expect(getsockopt(loose, SOL_SOCKET, SO_TYPE, &stype, &slen) == 0 && stype == SOCK_DGRAM,
           "the unbound socket");
    expect(fcntl(dir, F_GETFD) == 0 && fcntl(null, F_GETFD) == FD_CLOEXEC, "dir, /dev/null");
    expect(read(fifo_r, buf, 64) == 10 && memcmp(buf, "fifo bytes", 10) == 0, "the FIFO");
    expect(same_name(udp, &udp_at) && same_name(tcp, &tcp_at), "the sockets' addresses");
    expect((fcntl(p[0], F_GETFL) & O_ASYNC) && fcntl(p[0], F_GETOWN) == me &&
           fcntl(p[0], F_GETSIG) == SIGUSR2, "O_ASYNC");
    /* signals */
    struct sigaction now_sa;
    expect(sigaction(SIGUSR1, NULL, &now_sa) == 0 && now_sa.sa_sigaction == on_usr1 &&
           (now_sa.sa_flags & (SA_RESTART | SA_SIGINFO)) == (SA_RESTART | SA_SIGINFO),
           "the SIGUSR1 handler");
    expect(sigaction(SIGPIPE, NULL, &now_sa) == 0 && now_sa.sa_handler == SIG_IGN,
           "SIGPIPE ignored");
    expect(getitimer(ITIMER_REAL, &it) == 0 && it.it_value.tv_sec > 900, "the itimer");
    expect(sigaltstack(NULL, &ss) == 0 && ss.ss_sp == altstack, "the altstack");
    /* the thread */
    struct pollfd pf = { .fd = ping_out[0], .events = POLLIN };
    expect(write(ping_in[1], "p", 1) == 1 && poll(&pf, 1, 5000) == 1 &&
           read(ping_out[0], &c, 1) == 1 && c == 'p', "the second thread does not answer");
    /* signal-driven I/O */
    int usr2 = got_usr2;
    expect(write(p[1], "x", 1) == 1, "write to the O_ASYNC pipe");
    for (int i = 0; i < 500 && got_usr2 == usr2; i++)
        usleep(10000);
    expect(got_usr2 > usr2, "no SIGUSR2 for the O_ASYNC pipe");
    /* the children */
    int status;
    expect(waitpid(dead, &status, 0) == dead && WIFEXITED(status) && WEXITSTATUS(status) == 7,
           "the zombie's status");
    kill(kid, SIGTERM);
    expect(waitpid(kid, &status, 0) == kid, "waitpid");
    kid = -1;
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child's memory");
    printf("PASS\n");
    return 0;
}
