"""Self-checking victim: a deleted file that is mapped, not only open.

"data.bin" (3 pages + 100 bytes) is mapped shared and privately, and held open on an
fd; then unlinked. The private mapping has one page written (copy-on-write); the
shared one has a page written (into the file). A second deleted file is only mapped
(no fd). Prints READY; on SIGTERM checks every byte, and that the shared mapping and
the fd are still one file; prints PASS (or FAIL: why)."""

import mmap
import os

from victim import fail, ready_then_wait

PAGE = mmap.PAGESIZE
size = 3 * PAGE + 100
content = bytes((i * 7 + 1) & 0xFF for i in range(size))
with open("data.bin", "wb") as f:
    f.write(content)
fd = os.open("data.bin", os.O_RDWR)
shared = mmap.mmap(fd, size, mmap.MAP_SHARED)
private = mmap.mmap(fd, size, mmap.MAP_PRIVATE)
with open("only-mapped.bin", "wb") as f:
    f.write(b"M" * 5000)
only = os.open("only-mapped.bin", os.O_RDONLY)
only_map = mmap.mmap(only, 5000, mmap.MAP_SHARED, mmap.PROT_READ)
os.close(only)
os.unlink("data.bin")
os.unlink("only-mapped.bin")
private[PAGE:PAGE + 5] = b"PRIV!"
shared[2 * PAGE:2 * PAGE + 5] = b"SHRD!"
expect_shared = content[:2 * PAGE] + b"SHRD!" + content[2 * PAGE + 5:]
expect_private = content[:PAGE] + b"PRIV!" + content[PAGE + 5:2 * PAGE] + b"SHRD!" + \
    content[2 * PAGE + 5:]  # untouched private pages see the file
ready_then_wait()
if shared[:] != expect_shared:
    fail("the shared mapping changed")
if private[:PAGE * 2] != expect_private[:PAGE * 2]:
    fail("the private mapping's own page changed")
if os.pread(fd, size, 0) != expect_shared:
    fail("the file, read through the fd, changed")
os.pwrite(fd, b"VIAFD", 10)
if shared[10:15] != b"VIAFD":
    fail("the shared mapping and the fd are no longer one file")
if only_map[:] != b"M" * 5000:
    fail("the file that was only mapped changed")
if not os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"):
    fail("the file is no longer deleted")
print("PASS", flush=True)
