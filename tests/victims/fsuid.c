/* fsuid.c - a root process that works with another user's filesystem rights, as
 * NFS servers do (fsuid UID GID: setfsuid, setfsgid). On SIGTERM: its fs ids are
 * still those, its other ids root's. */
#define _GNU_SOURCE
#include <sys/fsuid.h>
#include <unistd.h>
#include "victim.h"

/* The four ids of a "Uid:" or "Gid:" line of /proc/self/status, as printed. */
static void ids(const char *key, char *out, size_t size)
{
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        fail("/proc/self/status");
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, strlen(key)) == 0)
            snprintf(out, size, "%s", line + strlen(key));
    fclose(f);
}

int main(int argc, char **argv)
{
    char want[64], got[64];
    if (argc != 3)
        fail("usage: fsuid UID GID");
    hold_sigterm();
    setvbuf(stdout, NULL, _IONBF, 0);
    setfsgid(atoi(argv[2]));
    setfsuid(atoi(argv[1]));
    printf("READY\n");
    wait_for_sigterm();
    snprintf(want, sizeof want, "\t0\t0\t0\t%s\n", argv[1]);
    ids("Uid:", got, sizeof got);
    if (strcmp(got, want) != 0)
        fail("uids are%s", got);
    snprintf(want, sizeof want, "\t0\t0\t0\t%s\n", argv[2]);
    ids("Gid:", got, sizeof got);
    if (strcmp(got, want) != 0)
        fail("gids are%s", got);
    printf("PASS\n");
    return 0;
}
