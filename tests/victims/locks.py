"""Self-checking victim: file locks of every kind.

- flock(LOCK_EX) on "a.lock" through fd A, and fd B = dup(A);
- a POSIX write lock on bytes 5-14 of "b.lock", and a read lock on bytes 20 to EOF;
- an OFD read lock on the whole of "c.lock".
Prints READY; on SIGTERM checks through /proc/self/fdinfo that it still holds
exactly these locks and prints PASS (or FAIL: why)."""

import fcntl
import os
import re
import struct

from victim import fail, ready_then_wait

a = open("a.lock", "w")
fcntl.flock(a, fcntl.LOCK_EX)
b_fd = os.dup(a.fileno())
b = open("b.lock", "w+")
b.write("x" * 100)
b.flush()
fcntl.lockf(b, fcntl.LOCK_EX, 10, 5)
fcntl.lockf(b, fcntl.LOCK_SH, 0, 20)
c = open("c.lock", "w+")
fcntl.fcntl(c, fcntl.F_OFD_SETLK, struct.pack("hhxxxxqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))


def held(fd: int) -> list[str]:
    text = open(f"/proc/self/fdinfo/{fd}").read()
    return sorted(" ".join(m.group(1, 2, 3, 4)) for m in re.finditer(
        r"^lock:\s*\d+:\s*(\S+)\s+\S+\s+(\S+)\s+\S+\s+\S+\s+(\S+)\s+(\S+)", text, re.M))


before = {fd: held(fd) for fd in (a.fileno(), b_fd, b.fileno(), c.fileno())}
ready_then_wait()
after = {fd: held(fd) for fd in before}
if after != before:
    fail(f"locks were {before}, are {after}")
if before[a.fileno()] != ["FLOCK WRITE 0 EOF"]:
    fail(f"unexpected flock {before[a.fileno()]}")
print("PASS", flush=True)
