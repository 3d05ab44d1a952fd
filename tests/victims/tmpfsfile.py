"""Self-checking victim: a file in a directory under /dev/shm (a tmpfs, but not a
POSIX shared memory object), held open for appending, and a POSIX object
/dev/shm/NAME beside it.

Argument: the directory (under /dev/shm) and the object's NAME. Writes "before\\n"
to DIR/log and 4096 bytes to the object; prints READY; on SIGTERM appends
"after\\n" through the same fd and checks that the fd is still the file at
DIR/log (same inode), that the file holds both lines, and that the object's fd is
the object at /dev/shm/NAME with its bytes; prints PASS. With a third argument
`break`, checks for a line that was never written: FAIL."""

import os
import sys

from victim import fail, ready_then_wait

where, name = sys.argv[1], sys.argv[2]
log = os.open(os.path.join(where, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.write(log, b"before\n")
obj_path = f"/dev/shm/{name}"
obj = os.open(obj_path, os.O_RDWR | os.O_CREAT, 0o600)
blob = bytes(range(256)) * 16
os.write(obj, blob)

ready_then_wait()
os.write(log, b"after\n")
if os.fstat(log).st_ino != os.stat(os.path.join(where, "log")).st_ino:
    fail("the log fd is not the file at its path")
want = b"before\nafter\n" + (b"never\n" if sys.argv[3:] == ["break"] else b"")
with open(os.path.join(where, "log"), "rb") as f:
    got = f.read()
if got != want:
    fail(f"the log holds {got!r}")
if os.fstat(obj).st_ino != os.stat(obj_path).st_ino or os.pread(obj, 8192, 0) != blob:
    fail("the shared memory object is not what it was")
print("PASS", flush=True)
