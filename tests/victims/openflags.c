// openflags.c - upmig test victim: named files and directories held with the open
// flags real programs use, each reopened by its path on resume.
//
// fds: nofollow.txt (O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC, offset 10), path.txt
// (O_PATH) and again (O_PATH|O_NOFOLLOW), the directory sub (O_RDONLY|O_DIRECTORY|O_NOFOLLOW|
// O_CLOEXEC, as fts and nftw open one) and again (O_PATH|O_DIRECTORY), and linked.bin:
// made with O_TMPFILE|O_RDWR, then given its name with linkat (its flags keep
// O_TMPFILE). On SIGTERM every fd's flags (exactly; for linked.bin but O_TMPFILE,
// which cannot be given to a file that has a name), close-on-exec, offset, file (by
// device and inode, through its name) and use are checked.
// -DBREAK: moves nofollow.txt's offset by 1 before verification -> FAIL.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "victim.h"

enum { NOFOLLOW, PATH, PATH_NOFOLLOW, DIR_, DIR_PATH, LINKED, NFD };
static const char *name[NFD] = {"nofollow.txt", "path.txt", "path.txt", "sub", "sub",
                                "linked.bin"};
static int fd[NFD], fl0[NFD];
static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static void put(const char *path, const char *text)
{
    int f = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (f < 0 || write(f, text, strlen(text)) != (ssize_t)strlen(text) || close(f) != 0)
        fail("writing %s: %s", path, strerror(errno));
}

static void same_file(int i)
{
    struct stat a, b;
    if (fstatat(AT_FDCWD, name[i], &a, AT_SYMLINK_NOFOLLOW) != 0 || fstat(fd[i], &b) != 0)
        fail("fstatat/fstat %s: %s", name[i], strerror(errno));
    if (a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        fail("fd %d no longer refers to %s", fd[i], name[i]);
}

static void reads(int dir, const char *path, const char *want)
{
    char got[64] = {0};
    int f = openat(dir, path, O_RDONLY);
    if (f < 0 || read(f, got, sizeof got - 1) < 0 || strcmp(got, want) != 0)
        fail("reading %s through a directory fd: %s", path, f < 0 ? strerror(errno) : got);
    close(f);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    catch_sigterm(on_term);
    put("nofollow.txt", "0123456789abcdefghij");
    put("path.txt", "path");
    if (mkdir("sub", 0755) != 0 && errno != EEXIST)
        fail("mkdir sub: %s", strerror(errno));
    put("sub/inner.txt", "inner");
    fd[NOFOLLOW] = open("nofollow.txt", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    fd[PATH] = open("path.txt", O_PATH);
    fd[PATH_NOFOLLOW] = open("path.txt", O_PATH | O_NOFOLLOW);
    fd[DIR_] = open("sub", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    fd[DIR_PATH] = open("sub", O_PATH | O_DIRECTORY);
    fd[LINKED] = open(".", O_TMPFILE | O_RDWR, 0600);
    char self[64], first[10];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd[LINKED]);
    if (fd[LINKED] < 0 || write(fd[LINKED], "linked", 6) != 6 ||
        linkat(AT_FDCWD, self, AT_FDCWD, "linked.bin", AT_SYMLINK_FOLLOW) != 0)
        fail("making linked.bin: %s", strerror(errno));
    for (int i = 0; i < NFD; i++)
        if (fd[i] < 0 || (fl0[i] = fcntl(fd[i], F_GETFL)) < 0)
            fail("opening %s: %s", name[i], strerror(errno));
    if (read(fd[NOFOLLOW], first, 10) != 10 || (fl0[LINKED] & O_TMPFILE) != O_TMPFILE)
        fail("unexpected start");
    printf("READY\n");
    while (!stop)
        usleep(2000);
#ifdef BREAK
    lseek(fd[NOFOLLOW], 1, SEEK_CUR);
#endif

    for (int i = 0; i < NFD; i++) {
        int fl = fcntl(fd[i], F_GETFL), cloexec = fcntl(fd[i], F_GETFD) & FD_CLOEXEC;
        int want = i == LINKED ? fl0[i] & ~O_TMPFILE : fl0[i];
        if ((i == LINKED ? fl & ~O_TMPFILE : fl) != want)
            fail("F_GETFL of fd %d (%s) is %#o, expected %#o", fd[i], name[i], fl, want);
        if (!cloexec != (i != NOFOLLOW && i != DIR_))
            fail("FD_CLOEXEC of fd %d (%s) is %s", fd[i], name[i], cloexec ? "set" : "clear");
        same_file(i);
    }
    char rest[16] = {0};
    if (lseek(fd[NOFOLLOW], 0, SEEK_CUR) != 10 || read(fd[NOFOLLOW], rest, 10) != 10 ||
        strcmp(rest, "abcdefghij") != 0)
        fail("nofollow.txt: not at offset 10 (read \"%s\")", rest);
    if (read(fd[PATH], rest, 1) != -1 || errno != EBADF ||
        read(fd[PATH_NOFOLLOW], rest, 1) != -1 || errno != EBADF)
        fail("an O_PATH fd of path.txt reads: it is no longer O_PATH");
    reads(fd[DIR_], "inner.txt", "inner");
    reads(fd[DIR_PATH], "inner.txt", "inner");
    struct stat st;
    if (lseek(fd[LINKED], 0, SEEK_CUR) != 6 || fstat(fd[LINKED], &st) != 0 ||
        st.st_nlink != 1 || pwrite(fd[LINKED], "!", 1, 6) != 1)
        fail("linked.bin: wrong offset, name count or not writable");
    reads(AT_FDCWD, "linked.bin", "linked!");
    printf("PASS\n");
    return 0;
}
