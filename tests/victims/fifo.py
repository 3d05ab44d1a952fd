"""Self-checking victim: a FIFO (named pipe) it holds both ends of, with 5000 bytes
unread in it, the read end non-blocking; and a second FIFO held open read-write.
Prints READY; on SIGTERM reads the bytes back, checks both still work, prints PASS."""

import os

from victim import fail, ready_then_wait

for name in ("one.fifo", "two.fifo"):
    if not os.path.exists(name):
        os.mkfifo(name)
r = os.open("one.fifo", os.O_RDONLY | os.O_NONBLOCK)
w = os.open("one.fifo", os.O_WRONLY)
os.write(w, b"fifo-bytes" * 500)
rw = os.open("two.fifo", os.O_RDWR)
os.write(rw, b"both")
ready_then_wait()
if os.get_blocking(r) or not os.get_blocking(w):
    fail("blocking modes changed")
if os.read(r, 10000) != b"fifo-bytes" * 500:
    fail("the bytes in the FIFO changed")
if os.read(rw, 10) != b"both":
    fail("the read-write FIFO lost its bytes")
os.write(w, b"again")
if os.read(r, 10) != b"again":
    fail("the FIFO no longer carries bytes")
print("PASS", flush=True)
