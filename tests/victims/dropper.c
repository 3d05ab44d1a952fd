/* dropper.c - a root parent and its child that became another user (dropper UID
 * GID FILE), as a server's master and worker: the parent opened FILE (root's
 * alone) before the fork, the child holds it and the parent's working directory.
 * SIGTERM to the parent: it passes it on; the child checks its ids and reads FILE
 * through the fd it inherited; the parent prints PASS if the child did. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>
#include "victim.h"

static int child(int fd, uid_t uid, gid_t gid)
{
    char got[64] = { 0 };
    if (setgroups(0, NULL) != 0 || setresgid(gid, gid, gid) != 0 ||
        setresuid(uid, uid, uid) != 0)
        return 2;
    wait_for_sigterm();
    if (getuid() != uid || getgid() != gid || geteuid() != uid)
        return 3;
    if (pread(fd, got, sizeof got - 1, 0) <= 0 || strncmp(got, "root's", 6) != 0)
        return 4;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        fail("usage: dropper UID GID FILE");
    hold_sigterm();
    setvbuf(stdout, NULL, _IONBF, 0);
    int fd = open(argv[3], O_RDONLY);
    if (fd < 0)
        fail("open %s", argv[3]);
    pid_t pid = fork();
    if (pid == 0)
        _exit(child(fd, atoi(argv[1]), atoi(argv[2])));
    printf("READY\n");
    wait_for_sigterm();
    int status;
    kill(pid, SIGTERM);
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
        fail("the child ended with status %#x", status);
    printf("PASS\n");
    return 0;
}
