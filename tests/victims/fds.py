"""Self-checking victim: pipes, an eventfd and an epoll instance, all inside the
process, with state in the kernel that must survive a migration.

- a pipe to itself holding 64 KiB unread (capacity raised to 128 KiB), its write end
  non-blocking and also dup'ed onto fd 20 (one open file description);
- a second pipe whose write end sits at a lower fd than its read end, holding b"second";
- an eventfd in semaphore mode with count 5;
- an epoll instance watching the first pipe (level) and the eventfd (edge, with a
  64-bit data word).
Prints READY; on SIGTERM checks everything and prints PASS (or FAIL: why)."""

import fcntl
import os
import select

from victim import fail, ready_then_wait

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
BLOB = bytes((i * 7 + 3) & 0xFF for i in range(65536))
TAG = 0x1122334455667788


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


r, w = os.pipe()
fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 17)
os.write(w, BLOB)
os.set_blocking(w, False)
os.dup2(w, 20, inheritable=False)
r2, w2 = os.pipe()
os.dup2(r2, 31, inheritable=False)
os.dup2(w2, 30, inheritable=False)
os.close(r2)
os.close(w2)
os.write(30, b"second")
ev = os.eventfd(5, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
ep = select.epoll()
ep.register(r, select.EPOLLIN)
ep.register(ev, select.EPOLLIN | select.EPOLLET)
ep.modify(ev, select.EPOLLIN | select.EPOLLET)
ready_then_wait()

events = dict(ep.poll(0))
if events != {r: select.EPOLLIN, ev: select.EPOLLIN}:
    fail(f"epoll reports {events}")
if fcntl.fcntl(w, F_GETPIPE_SZ) != 1 << 17:
    fail(f"pipe capacity {fcntl.fcntl(w, F_GETPIPE_SZ)}")
if os.get_blocking(w) or os.get_blocking(20):
    fail("the write end (and its dup on fd 20) lost O_NONBLOCK")
os.set_blocking(20, True)
if not os.get_blocking(w):
    fail("fd 20 is no longer the same open file description as the write end")
if [os.eventfd_read(ev) for _ in range(5)] != [1] * 5:
    fail("the eventfd did not count 5")
try:
    os.eventfd_read(ev)
    fail("the eventfd counted past 5")
except BlockingIOError:
    pass
if drain(r) != BLOB:
    fail("the 64 KiB in the pipe changed")
if drain(31) != b"second":
    fail("the second pipe lost its bytes")
os.write(w, b"after")  # both pipes still work as pipes
if os.read(r, 10) != b"after":
    fail("the pipe does not carry new bytes")
print("PASS", flush=True)
