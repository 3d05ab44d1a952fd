"""Self-checking victim: files deleted while open.

A 3 MiB + 123 bytes file open read-write (offset at its end) and again read-only
(offset 1000, a second open file description), both after the file was unlinked;
and an empty deleted file. Prints READY; on SIGTERM checks contents, offsets, that
the two descriptions still see one file, and that it is still deleted; prints PASS."""
import os

from victim import ready_then_wait

blob = bytes((i * 13 + 5) & 0xFF for i in range(3 * 1024 * 1024 + 123))
f = open("scratch.bin", "w+b")
f.write(blob)
f.flush()
g = open("scratch.bin", "rb")
g.seek(1000)
os.unlink("scratch.bin")
empty = open("empty.bin", "w")
os.unlink("empty.bin")
ready_then_wait()
assert f.tell() == len(blob), f.tell()
f.seek(0)
assert f.read() == blob
assert g.tell() == 1000 and g.read(10) == blob[1000:1010]
f.write(b"more")
f.flush()
g.seek(len(blob))
assert g.read() == b"more", "the two fds are no longer one file"
assert os.readlink(f"/proc/self/fd/{f.fileno()}").endswith(" (deleted)")
assert os.fstat(empty.fileno()).st_size == 0
print("PASS", flush=True)
