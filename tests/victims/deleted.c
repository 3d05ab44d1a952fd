/* deleted.c - holds a file of its own that it has deleted (deleted PATH): made,
 * filled, unlinked, held open. On SIGTERM: the fd still reads what was written,
 * and the file is still nameless. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include "victim.h"

int main(int argc, char **argv)
{
    static const char text[] = "bytes only this process still has\n";
    char got[sizeof text] = { 0 };
    if (argc != 2)
        fail("usage: deleted PATH");
    hold_sigterm();
    setvbuf(stdout, NULL, _IONBF, 0);
    int fd = open(argv[1], O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd < 0 || write(fd, text, sizeof text - 1) != sizeof text - 1 || unlink(argv[1]) != 0)
        fail("make %s", argv[1]);
    printf("READY\n");
    wait_for_sigterm();
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_nlink != 0)
        fail("the file has a name again");
    if (pread(fd, got, sizeof got - 1, 0) != sizeof text - 1 || strcmp(got, text) != 0)
        fail("the file reads '%s'", got);
    printf("PASS\n");
    return 0;
}
