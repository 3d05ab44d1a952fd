"""Self-checking victim: files and directories held by path, for the checks resume
makes of them (tests/test_file_identity.py changes them between dump and resume).

- data/a.txt open O_RDONLY, 6 bytes read (offset 6), on fd 3;
- data/b.txt open O_RDWR, 5 bytes read (offset 5), on fd 4;
- the directory sub open O_RDONLY | O_DIRECTORY, on fd 5;
- its working directory is work.
Prints READY; on SIGTERM checks the offsets and that every fd (and the working
directory) is the file its path names, then writes "!" into b.txt at its offset,
prints `READ <the rest of a.txt from its offset, as a Python bytes literal>` and
PASS. With the argument `break`, moves a.txt's offset before checking: FAIL."""

import os
import sys

from victim import fail, ready_then_wait

os.makedirs("data", exist_ok=True)
os.makedirs("sub", exist_ok=True)
os.makedirs("work", exist_ok=True)
with open("data/a.txt", "wb") as f:
    f.write(b"alpha:the rest of a")
with open("data/b.txt", "wb") as f:
    f.write(b"bravo")
a = os.open("data/a.txt", os.O_RDONLY)
b = os.open("data/b.txt", os.O_RDWR)
sub = os.open("sub", os.O_RDONLY | os.O_DIRECTORY)
if (a, b, sub) != (3, 4, 5) or os.read(a, 6) != b"alpha:" or os.read(b, 5) != b"bravo":
    fail(f"unexpected start: fds {a}, {b}, {sub}")
os.chdir("work")
ready_then_wait()
if "break" in sys.argv[1:]:
    os.lseek(a, 1, os.SEEK_CUR)


def same(fd_or_path, path: str) -> bool:
    st = os.stat(fd_or_path)
    there = os.stat(path)
    return (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino)


if (os.lseek(a, 0, os.SEEK_CUR), os.lseek(b, 0, os.SEEK_CUR)) != (6, 5):
    fail(f"offsets {os.lseek(a, 0, os.SEEK_CUR)} and {os.lseek(b, 0, os.SEEK_CUR)}, "
         "expected 6 and 5")
for fd, path in ((a, "../data/a.txt"), (b, "../data/b.txt"), (sub, "../sub")):
    if not same(fd, path):
        fail(f"fd {fd} is not {path}")
if not same(".", "../work"):
    fail("the working directory is not work")
os.write(b, b"!")
print("READ", os.read(a, 1000), flush=True)
print("PASS", flush=True)
