"""Self-checking victim: files with no name, opened with the flags real programs use.

- Python's tempfile.TemporaryFile() (O_TMPFILE | O_NOFOLLOW | O_RDWR), offset 777;
- nofollow.bin, opened O_RDWR | O_NOFOLLOW (offset at its end), again O_RDONLY |
  O_NOFOLLOW (offset 100) and O_PATH | O_NOFOLLOW, then unlinked;
- a file made with O_TMPFILE | O_WRONLY, and opened again O_RDONLY through
  /proc/self/fd (how a program reads one back), offset 5.
Prints READY; on SIGTERM checks every fd's bytes, offset, flags (but the lookup
flags O_NOFOLLOW and O_TMPFILE: a file with no name is reopened through
/proc/self/fd, where they have no meaning), mode, that the descriptions of one
file still share it, and that none has a name; prints PASS. With the argument
`break`, moves one offset before checking: FAIL."""

import os
import stat
import sys
import tempfile

from victim import fail, ready_then_wait

LOOKUP_FLAGS = os.O_NOFOLLOW | os.O_TMPFILE  # (O_TMPFILE includes O_DIRECTORY)
BLOB = bytes((i * 29 + 11) & 0xFF for i in range(100_000))


def getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


temp = tempfile.TemporaryFile(dir=".")
temp.write(BLOB)
temp.flush()
temp.seek(777)

rw = os.open("nofollow.bin", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_EXCL, 0o640)
os.write(rw, BLOB)
ro = os.open("nofollow.bin", os.O_RDONLY | os.O_NOFOLLOW)
os.lseek(ro, 100, os.SEEK_SET)
path_fd = os.open("nofollow.bin", os.O_PATH | os.O_NOFOLLOW)
os.unlink("nofollow.bin")

anon = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600)
os.write(anon, BLOB[:5000])
anon_ro = os.open(f"/proc/self/fd/{anon}", os.O_RDONLY)
os.lseek(anon_ro, 5, os.SEEK_SET)

fds = {"TemporaryFile": temp.fileno(), "nofollow rw": rw, "nofollow ro": ro,
       "nofollow O_PATH": path_fd, "O_TMPFILE": anon, "O_TMPFILE reopened": anon_ro}
flags = {name: getfl(fd) for name, fd in fds.items()}
if not flags["TemporaryFile"] & os.O_NOFOLLOW or not flags["nofollow O_PATH"] & os.O_PATH:
    fail(f"the flags are not the ones this victim is about: {flags}")
ready_then_wait()
if "break" in sys.argv[1:]:
    os.lseek(ro, 1, os.SEEK_CUR)

for name, fd in fds.items():
    want = flags[name] & ~LOOKUP_FLAGS
    if getfl(fd) & ~LOOKUP_FLAGS != want:
        fail(f"{name}: F_GETFL is {getfl(fd):#o}, expected {want:#o} (but lookup flags)")
    if os.fstat(fd).st_nlink != 0:
        fail(f"{name}: the file has a name now")
offsets = {"TemporaryFile": 777, "nofollow rw": len(BLOB), "nofollow ro": 100,
           "O_TMPFILE": 5000, "O_TMPFILE reopened": 5}
for name, want in offsets.items():
    if os.lseek(fds[name], 0, os.SEEK_CUR) != want:
        fail(f"{name}: offset {os.lseek(fds[name], 0, os.SEEK_CUR)}, expected {want}")
for name, blob in (("TemporaryFile", BLOB), ("nofollow rw", BLOB), ("nofollow ro", BLOB),
                   ("O_TMPFILE reopened", BLOB[:5000])):
    if os.pread(fds[name], len(BLOB) + 1, 0) != blob:
        fail(f"{name}: the bytes changed")
inodes = {name: os.fstat(fd).st_ino for name, fd in fds.items()}
if not inodes["nofollow rw"] == inodes["nofollow ro"] == inodes["nofollow O_PATH"]:
    fail("the three fds of nofollow.bin are no longer one file")
if inodes["O_TMPFILE"] != inodes["O_TMPFILE reopened"]:
    fail("the two fds of the O_TMPFILE file are no longer one file")
if stat.S_IMODE(os.fstat(rw).st_mode) != 0o640:
    fail(f"nofollow.bin has mode {stat.S_IMODE(os.fstat(rw).st_mode):o}, expected 640")
try:
    os.read(path_fd, 1)
    fail("the O_PATH fd reads: it is no longer O_PATH")
except OSError:
    pass
os.pwrite(rw, b"after", len(BLOB))  # the descriptions still share the bytes
if os.pread(ro, 5, len(BLOB)) != b"after":
    fail("nofollow.bin's two descriptions no longer see one file")
os.write(anon, b"more")
if os.pread(anon_ro, 4, 5000) != b"more":
    fail("the O_TMPFILE file's two descriptions no longer see one file")
print("PASS", flush=True)
