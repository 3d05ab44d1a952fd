"""Self-checking victim: an inotify instance with three watches, numbered 1, 3 and 4
(watch 2 was removed: a gap the kernel never fills soon). Prints READY; on SIGTERM
touches each watched thing and checks every event arrives under its old watch
number; prints PASS (or FAIL: why)."""

import ctypes
import os
import struct

from victim import fail, ready_then_wait

IN_MODIFY, IN_CREATE, IN_DELETE = 0x2, 0x100, 0x200
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("watched", exist_ok=True)
for name in ("a.txt", "b.txt"):
    open(name, "w").close()
ino = libc.inotify_init1(os.O_NONBLOCK)
wd_dir = libc.inotify_add_watch(ino, b"watched", IN_CREATE | IN_DELETE)
gone = libc.inotify_add_watch(ino, b"a.txt", IN_MODIFY)
libc.inotify_rm_watch(ino, gone)
wd_a = libc.inotify_add_watch(ino, b"a.txt", IN_MODIFY)
wd_b = libc.inotify_add_watch(ino, b"b.txt", IN_MODIFY)
os.read(ino, 4096)  # the IN_IGNORED of the removed watch: nothing left unread



if (wd_dir, wd_a, wd_b) != (1, 3, 4):
    fail(f"watch numbers {(wd_dir, wd_a, wd_b)} before the move")
ready_then_wait()
open("watched/new", "w").close()
with open("b.txt", "a") as f:
    f.write("x")
with open("a.txt", "a") as f:
    f.write("y")
data = os.read(ino, 4096)  # inotify queues each event in the call that makes it
events = []
while data:
    wd, mask, _, length = struct.unpack_from("iIII", data)
    events.append((wd, mask))
    data = data[16 + length:]
if events != [(1, IN_CREATE), (4, IN_MODIFY), (3, IN_MODIFY)]:
    fail(f"events {events}")
print("PASS", flush=True)
