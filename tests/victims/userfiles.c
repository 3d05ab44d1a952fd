/* userfiles.c - a user's job holding two of its files: READ open for reading and
 * WRITE for reading and writing (userfiles READ WRITE). On SIGTERM: each fd is
 * still the file at its path (same device and inode), READ reads as it did at the
 * start, and a line written through WRITE lands in that file. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include "victim.h"

static void same_file(int fd, const char *path)
{
    struct stat held, named;
    if (fstat(fd, &held) != 0 || stat(path, &named) != 0)
        fail("stat %s", path);
    if (held.st_dev != named.st_dev || held.st_ino != named.st_ino)
        fail("fd %d is not the file %s", fd, path);
}

int main(int argc, char **argv)
{
    static const char line[] = "written by the job\n";
    char before[256] = { 0 }, after[256] = { 0 };
    if (argc != 3)
        fail("usage: userfiles READ WRITE");
    hold_sigterm();
    setvbuf(stdout, NULL, _IONBF, 0);
    int rd = open(argv[1], O_RDONLY), rw = open(argv[2], O_RDWR);
    if (rd < 0 || rw < 0)
        fail("open");
    if (read(rd, before, sizeof before - 1) <= 0 || lseek(rd, 0, SEEK_SET) != 0)
        fail("read %s", argv[1]);
    printf("READY\n");
    wait_for_sigterm();
    same_file(rd, argv[1]);
    same_file(rw, argv[2]);
    if (read(rd, after, sizeof after - 1) <= 0 || strcmp(before, after) != 0)
        fail("%s reads otherwise", argv[1]);
    if (lseek(rw, 0, SEEK_END) < 0 || write(rw, line, sizeof line - 1) != sizeof line - 1)
        fail("write %s", argv[2]);
    printf("PASS\n");
    return 0;
}
