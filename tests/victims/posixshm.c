/* posixshm.c - a POSIX shared memory object of its own (posixshm /NAME), 256 KiB,
 * held open and mapped shared, a pattern on every 4th page. On SIGTERM: the fd and
 * the mapping are still the object NAME in /dev/shm, the pattern is intact and the
 * other pages zero; then the object is unlinked. Made with open(2) in /dev/shm,
 * which is what shm_open does, less its O_NOFOLLOW (this victim is about who makes
 * the object on resume, not about reopening flags). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "victim.h"

#define SIZE (256 << 10)
#define PAGE 4096

int main(int argc, char **argv)
{
    char path[256];
    if (argc != 2 || snprintf(path, sizeof path, "/dev/shm%s", argv[1]) >= (int)sizeof path)
        fail("usage: posixshm /NAME");
    hold_sigterm();
    setvbuf(stdout, NULL, _IONBF, 0);
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, SIZE) != 0)
        fail("open %s", path);
    uint64_t *m = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        fail("mmap");
    for (size_t off = 0; off < SIZE; off += 4 * PAGE)
        m[off / 8] = off ^ 0x5eed;
    printf("READY\n");
    wait_for_sigterm();
    struct stat held, named;
    if (fstat(fd, &held) != 0 || stat(path, &named) != 0 || held.st_ino != named.st_ino ||
        held.st_dev != named.st_dev)
        fail("fd %d is not %s", fd, path);
    for (size_t off = 0; off < SIZE; off += PAGE)
        if (m[off / 8] != (off % (4 * PAGE) ? 0 : off ^ 0x5eed))
            fail("page at %zu holds %llx", off, (unsigned long long)m[off / 8]);
    m[0] = 1;  /* still shared with the object */
    uint64_t first;
    if (pread(fd, &first, sizeof first, 0) != sizeof first || first != 1)
        fail("the mapping is not the object's");
    unlink(path);
    printf("PASS\n");
    return 0;
}
