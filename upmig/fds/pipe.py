"""Pipes with both ends inside the process, and the bytes buffered in them.

Dump copies the read end into upmig (pidfd_getfd) and tee()s the buffer into a
pipe of its own: the process's bytes stay where they are, so a dump that fails or
leaves the process running takes nothing from it. Resume makes a new pipe inside
the process, gives it the old capacity and writes the bytes back in."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import TYPE_CHECKING

from upmig import _native as nat
from upmig.errors import CantMigrate
from upmig.inject import Session
from upmig.records import Fd, Pipe
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.sharing import TreeFds

O_ACCMODE, O_WRONLY, O_RDWR = 0o3, 0o1, 0o2
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032


def end(flags: int) -> str:
    return "w" if flags & O_ACCMODE == O_WRONLY else "r"


def ends(flags: int) -> set[str]:
    """The ends an fd holds: a FIFO opened O_RDWR holds both."""
    return {"r", "w"} if flags & O_ACCMODE == O_RDWR else {end(flags)}


def capture(pid: int, recs: list[Fd], tree: TreeFds | None = None) -> list[Pipe]:
    """A Pipe for every pipe and FIFO of recs (type "pipe"/"fifo", obj = inode) this
    process is the first of the tree to hold, with its buffer, read through a read
    end wherever in the tree one is."""
    read_ends = {}
    for r in recs:
        if r.type in ("pipe", "fifo") and r.extra["end"] == "r":
            read_ends.setdefault(r.obj, (pid, r.fd))
    if tree:
        for r in recs:
            if r.type in ("pipe", "fifo") and tree.pipe_first.get(r.obj) == pid:
                read_ends.setdefault(r.obj, tree.read_end[r.obj])
            elif r.type in ("pipe", "fifo"):
                read_ends.pop(r.obj, None)  # an earlier process holds it: its record
    out = []
    for ino, (holder, fd) in read_ends.items():
        with nat.borrowed_fd(holder, fd) as mine:
            size = fcntl.fcntl(mine, F_GETPIPE_SZ)
            try:
                data = nat.pipe_peek(mine, size)
            except OSError as e:
                raise CantMigrate(f"the pipe on fd {fd} cannot be read without "
                                  f"emptying it ({e.strerror})", pid=holder) from None
        out.append(Pipe(id=ino, size=size, data=data, ends=tree.ends_of(ino) if tree else {}))
    return out


def fill_fifo(s: Session, pid: int, fd: int, pipe: Pipe | None) -> None:
    """Put a FIFO's bytes back through fd, which holds both its ends (opened O_RDWR)
    while the process's own fds are opened. pipe is None when an earlier process of
    the tree has filled it (and holds it open still)."""
    if pipe is not None:
        _fill(s, pid, fd, pipe)


def _fill(s: Session, pid: int, wr: int, pipe: Pipe) -> None:
    s.call(nr.fcntl, wr, F_SETPIPE_SZ, pipe.size, what="fcntl(F_SETPIPE_SZ)")
    if pipe.data:
        with nat.borrowed_fd(pid, wr) as mine:
            view = memoryview(pipe.data)
            while view:  # fits: the pipe is as big as it was
                view = view[os.write(mine, view):]


def create(s: Session, pid: int, pipe: Pipe) -> tuple[int, int]:
    """A new pipe inside the process with pipe's capacity and bytes: (read, write) fds,
    at whatever numbers the kernel gave."""
    s.call(nr.pipe2, s.scratch, 0, what="pipe2")
    rd, wr = struct.unpack("<ii", s.read(s.scratch, 8))
    _fill(s, pid, wr, pipe)
    return rd, wr
