/* unixlisten.c - listens on a unix socket bound to a path (unixlisten PATH). On
 * SIGTERM: it still listens there, a connection to PATH reaching its socket. */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "victim.h"

int main(int argc, char **argv)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (argc != 2 || strlen(argv[1]) >= sizeof addr.sun_path)
        fail("usage: unixlisten PATH");
    strcpy(addr.sun_path, argv[1]);
    hold_sigterm();
    setvbuf(stdout, NULL, _IONBF, 0);
    int srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(srv, 4) != 0)
        fail("listen on %s", argv[1]);
    printf("READY\n");
    wait_for_sigterm();
    int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&addr, sizeof addr) != 0)
        fail("connect to %s", argv[1]);
    int a = accept(srv, NULL, NULL);
    if (a < 0 || write(c, "x", 1) != 1)
        fail("accept");
    char ch = 0;
    if (read(a, &ch, 1) != 1 || ch != 'x')
        fail("the connection is not to this socket");
    unlink(argv[1]);
    printf("PASS\n");
    return 0;
}
