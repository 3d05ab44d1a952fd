/* Blocked in pause() or poll() while dumped: the syscall must restart after resume.
 *   waiter pause  -- pause() until SIGTERM; it must return only with EINTR, for SIGTERM.
 *   waiter poll   -- poll(stdin, infinite) until data arrives, then print GOT <data>;
 *                    poll must not fail (EINTR included). Then wait for SIGTERM. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t got_term;

static void on_term(int sig) { (void)sig; got_term = 1; }

static int fail(const char *why)
{
    printf("FAIL: %s (errno %d)\n", why, errno);
    return 1;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    setvbuf(stdout, NULL, _IONBF, 0);
    int use_poll = argc > 1 && strcmp(argv[1], "poll") == 0;
    printf("READY\n");
    if (use_poll) {
        struct pollfd p = { .fd = 0, .events = POLLIN };
        int n = poll(&p, 1, -1);
        if (n != 1 || !(p.revents & POLLIN))
            return fail("poll did not report stdin readable");
        char buf[64] = { 0 };
        ssize_t r = read(0, buf, sizeof(buf) - 1);
        if (r <= 0)
            return fail("read after poll");
        printf("GOT %s", buf);
    }
    while (!got_term) {
        /* Only SIGTERM may end pause(): a spurious return would show as a FAIL. */
        if (pause() != -1 || errno != EINTR)
            return fail("pause returned oddly");
        if (!got_term)
            return fail("pause returned without SIGTERM");
    }
    printf("PASS\n");
    return 0;
}
