"""The identity of the files a process maps (its executable, its libraries) or
holds by path (its fds' files and directories, its working directory): what must be
the same on the target for the restored process to have the files it had."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import time
from typing import TYPE_CHECKING

from upmig import _native, _proc
from upmig.errors import Corrupt, Mismatch, RestoreError
from upmig.records import FileIdentity, MappedFile

if TYPE_CHECKING:
    from upmig.inject import Session

PT_NOTE = 4
NT_GNU_BUILD_ID = 3


def elf_build_id(f) -> str:
    """The hex GNU build-id of an ELF64 file, or "" if it has none."""
    head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return ""
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        phdr = f.read(40)
        if len(phdr) < 40:
            return ""  # cut short inside its headers: identified by contents instead
        ptype, _, offset, _, _, filesz = struct.unpack("<IIQQQQ", phdr)
        if ptype != PT_NOTE:
            continue
        f.seek(offset)
        notes = f.read(filesz)
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name_end = pos + 12 + ((namesz + 3) & ~3)
            if ntype == NT_GNU_BUILD_ID and notes[pos + 12:pos + 12 + namesz] == b"GNU\0":
                return notes[name_end:name_end + descsz].hex()
            pos = name_end + ((descsz + 3) & ~3)
    return ""


def content_hash(f, size: int) -> str:
    if size == 0:
        return "0"
    with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        return f"{_native.xxh64(m):016x}"


def identify(path: str) -> MappedFile:
    return _identified(path)[0]


def _identified(path: str) -> tuple[MappedFile, os.stat_result]:
    """The identity of the file at path, and the stat of the very file it was read from.
    Only a regular file is opened: an image may name a FIFO (an open that never
    returns) or a device (an open with effects of its own)."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped since the lstat
            raise OSError(errno.EINVAL, "not a regular file", path)
        build_id = elf_build_id(f)
        digest = "" if build_id else content_hash(f, st.st_size)
    return MappedFile(path=path, size=st.st_size, mtime=st.st_mtime, build_id=build_id,
                      content_hash=digest), st


def still(rec: MappedFile | None) -> MappedFile | None:
    """rec if its file looks unchanged since it was identified (size, mtime), else None."""
    if rec is None:
        return None
    try:
        st = os.stat(rec.path)
    except OSError:
        return None
    return rec if (st.st_size, st.st_mtime) == (rec.size, rec.mtime) else None


def check(rec: MappedFile) -> os.stat_result:
    """Raise Mismatch naming the file if the target's copy is not the one dumped (or
    is reached through a symlink: resume opens it through none); the stat of the
    file found, if it is."""
    try:
        link = _walk(rec.path)[1]
        if link:
            raise Mismatch(f"mapped file {rec.path} {_through(rec.path, link)}")
        here, st = _identified(rec.path)
    except OSError as e:
        raise Mismatch(f"mapped file {rec.path} cannot be opened here: {e.strerror}") from None
    if here.size != rec.size:
        raise Mismatch(f"mapped file {rec.path} differs here (size {here.size}, "
                       f"image has {rec.size})")
    if (here.build_id, here.content_hash) != (rec.build_id, rec.content_hash):
        what = "build-id" if rec.build_id else "contents"
        raise Mismatch(f"mapped file {rec.path} differs here ({what} changed)")
    return st


def object_id(st: os.stat_result) -> int:
    """One number for a file object (a pipe, a FIFO, a deleted file) across the whole
    process: its inode number is unique only within its filesystem."""
    return _native.xxh64(struct.pack("<QQ", st.st_dev, st.st_ino)) >> 1


# ---- files held by path

KINDS = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO",
         stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
         stat.S_IFLNK: "symlink", stat.S_IFSOCK: "socket"}


def identity(fd: int, st: os.stat_result, boot: str) -> FileIdentity:
    return FileIdentity(fd=fd, mode=st.st_mode, size=st.st_size, mtime_ns=st.st_mtime_ns,
                        dev=st.st_dev, ino=st.st_ino, rdev=st.st_rdev, boot=boot)


def capture_held(pid: int, fds: list[int]) -> list[FileIdentity]:
    """The identity of the (frozen) process's working directory and of the files open
    at fds, read through /proc: what they are, not what their paths name now."""
    boot = _proc.boot_id()
    links = [(-1, "cwd"), *((fd, f"fd/{fd}") for fd in fds)]
    return [identity(fd, os.stat(f"/proc/{pid}/{link}"), boot) for fd, link in links]


def _walk(path: str) -> tuple[os.stat_result, str]:
    """lstat of path, and the first of it and the directories on its way that is a
    symlink (or "")."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, "not an absolute path")
    at = ""
    for name in path.split("/")[1:]:
        at = f"{at}/{name}"
        st = os.lstat(at)
        if stat.S_ISLNK(st.st_mode):
            return st, at
    return st, ""


def _through(path: str, link: str) -> str:
    return "is a symlink now" if link == path else f"resolves through the symlink {link} now"


class Held:
    """The files and directories the processes of an image hold by path, checked in
    two steps. check(), before any process is made: each path, followed through no
    symlink (the paths /proc gave at dump are canonical), against its identity record,
    for a clean refusal. open(), in the stub: openat2 through no symlink, then the fd
    opened must be the very file check() found, still matching its record; so a file
    swapped in between is refused too. Mapped files the same way: check_mapped() (by
    their contents, see check()), then open_mapped().

    What must match: the type; the inode, on the same boot of the same host; a
    device's number; a regular file must be at least as long as the fd's offset and,
    unless allow_changed, of the same size and mtime. A directory's size and mtime are
    not compared: its entries come and go (the image itself may be written there)."""

    def __init__(self, allow_changed: bool = False):
        self.allow_changed = allow_changed
        self.boot = _proc.boot_id()
        self.found: dict[str, tuple[int, int]] = {}  # path -> (dev, ino) found by check

    def check(self, pid: int, path: str, rec: FileIdentity | None, what: str,
              pos: int = 0) -> None:
        """path, held as what ("fd 3") by pid (its PID in the image) at offset pos."""
        if rec is None:
            raise Corrupt(f"{what} of pid {pid} ({path}) has no identity record")
        try:
            st, link = _walk(path)
        except OSError as e:
            why = "is not here" if e.errno == errno.ENOENT else \
                f"cannot be looked at here ({e.strerror})"
            raise Mismatch(f"{path} ({what}) {why}", pid=pid) from None
        if link:
            raise Mismatch(f"{path} ({what}) {_through(path, link)}", pid=pid)
        self._compare(pid, path, what, rec, st, pos)
        self.found[path] = (st.st_dev, st.st_ino)

    def open(self, s: Session, pid: int, path: str, flags: int, rec: FileIdentity | None,
             what: str, pos: int = 0) -> int:
        """path opened with flags in the process s drives, through no symlink, and
        checked (as check() was told): the new fd."""
        fd = self.try_open(s, pid, path, flags, rec, what, pos)
        if fd < 0:
            raise RestoreError(f"cannot reopen {path} for {what} of pid {pid}: "
                               f"{os.strerror(-fd)}")
        return fd

    def try_open(self, s: Session, pid: int, path: str, flags: int,
                 rec: FileIdentity | None, what: str, pos: int = 0) -> int:
        """As open(), but what the kernel refuses to open is -errno, not raised (the
        caller may try otherwise: see task._enter_cwd)."""
        fd = s.open_path(path, flags)
        if fd == -errno.ELOOP:
            raise Mismatch(f"{path} ({what}) resolves through a symlink now", pid=pid)
        if fd < 0:
            return fd
        st = self._found_again(s, fd, path, f"{path} ({what})", pid)
        if rec is None:
            raise Corrupt(f"{what} of pid {pid} ({path}) has no identity record")
        self._compare(pid, path, what, rec, st, pos)
        return fd

    def check_mapped(self, rec: MappedFile) -> None:
        """A mapped file (the executable, a library): see check()."""
        st = check(rec)
        self.found[rec.path] = (st.st_dev, st.st_ino)

    def open_mapped(self, s: Session, path: str, flags: int) -> int:
        """A mapped file opened in the process s drives, through no symlink, and
        checked to be the file check_mapped() found: the new fd."""
        fd = s.open_path(path, flags)
        if fd == -errno.ELOOP:
            raise Mismatch(f"mapped file {path} resolves through a symlink now")
        if fd < 0:
            raise RestoreError(f"cannot open the mapped file {path}: {os.strerror(-fd)}")
        self._found_again(s, fd, path, f"mapped file {path}")
        return fd

    def _found_again(self, s: Session, fd: int, path: str, what: str,
                     pid: int | None = None) -> os.stat_result:
        """The stat of fd (in the process s drives), which must be the file found at
        path by the first check."""
        if path not in self.found:
            raise Corrupt(f"{what} has no identity record in the image")
        st = os.stat(f"/proc/{s.inj.pid}/fd/{fd}")
        if self.found[path] != (st.st_dev, st.st_ino):
            raise Mismatch(f"{what} was replaced while resume was opening it", pid=pid)
        return st

    def _compare(self, pid: int, path: str, what: str, rec: FileIdentity,
                 st: os.stat_result, pos: int) -> None:
        why = self._change(rec, st, pos)
        if why:
            raise Mismatch(f"{path} ({what}) {why}", pid=pid)

    def _change(self, rec: FileIdentity, st: os.stat_result, pos: int) -> str:
        """What makes st not the file rec describes, in words; "" if nothing."""
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(rec.mode):
            return f"is {_kind(st.st_mode)} now, was {_kind(rec.mode)}"
        if rec.boot == self.boot and (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
            return "is another file now: it was replaced since the dump"
        if (stat.S_ISCHR(rec.mode) or stat.S_ISBLK(rec.mode)) and st.st_rdev != rec.rdev:
            return (f"is another device now ({_devno(st.st_rdev)}, was "
                    f"{_devno(rec.rdev)})")
        if not stat.S_ISREG(rec.mode):
            return ""
        if st.st_size < pos:
            return f"is {st.st_size} bytes now, shorter than the fd's offset {pos}"
        if self.allow_changed or (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns):
            return ""
        changes = [f"size {st.st_size}, was {rec.size}"] if st.st_size != rec.size else []
        if st.st_mtime_ns != rec.mtime_ns:
            changes.append(f"modified {_when(st.st_mtime_ns)}, was {_when(rec.mtime_ns)}")
        return (f"changed since the dump ({'; '.join(changes)}); resume with "
                "--allow-changed-files to use it as it is now")


def kind(mode: int) -> str:
    """The type of a file of st_mode mode, in words."""
    return KINDS.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):o}")


def _kind(mode: int) -> str:
    return f"a {kind(mode)}"


def _devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + \
        f".{ns % 10**9:09d}"
