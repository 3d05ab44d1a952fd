"""Pipes with both ends inside the process (or the tree), and the bytes buffered in
them (for FIFOs too: upmig.fds.fifo).

Dump copies the read end into upmig (pidfd_getfd) and tee()s the buffer into a
pipe of its own: the process's bytes stay where they are, so a dump that fails or
leaves the process running takes nothing from it. Resume makes a new pipe inside
the process, gives it the old capacity and writes the bytes back in, both ends at
once, at the first fd of either; an end only a later process of the tree holds is
parked above the fd table for it (upmig.sharing)."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from upmig import _native as nat
from upmig import fileid, schema
from upmig.errors import CantMigrate
from upmig.fds.base import Kind, Rebuild, Scan, Seen
from upmig.records import Fd, Pipe
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.inject import Session
    from upmig.sharing import TreeFds


@dataclass(kw_only=True)
class PipeEnd(Fd):
    """An end of a pipe or FIFO: its Pipe record's id, and which end."""

    checks: ClassVar[dict] = {"pipe": schema.OBJECT, "end": schema.one_of("r", "w")}
    pipe: int                # fileid.object_id of the pipe: its Pipe record's id
    end: str                 # "r" | "w"


@dataclass(kw_only=True)
class PipeFd(PipeEnd):
    """An end of a pipe whose other end is in the tree."""

    kind: ClassVar[str] = "fd_pipe"


def end(flags: int) -> str:
    return "w" if flags & os.O_ACCMODE == os.O_WRONLY else "r"


def ends(flags: int) -> set[str]:
    """The ends an fd holds: a FIFO opened O_RDWR holds both."""
    return {"r", "w"} if flags & os.O_ACCMODE == os.O_RDWR else {end(flags)}


def ends_held(scan: Scan) -> dict[int, set[str]]:
    """The ends of each pipe and FIFO (by object id) the process holds, or the tree."""
    def compute() -> dict[int, set[str]]:
        held: dict[int, set[str]] = {}
        for e in scan.seen:
            if e.st is not None and stat.S_ISFIFO(e.st.st_mode):  # pipes, FIFOs by path
                held.setdefault(fileid.object_id(e.st), set()).update(ends(e.flags))
        if scan.tree:  # a pipe's ends may be in other processes of the tree
            held.update({obj: scan.tree.pipe_ends[obj] for obj in held
                         if obj in scan.tree.pipe_ends})
        return held
    return scan.memo("pipe.ends", compute)


def buffers(pid: int, recs: list[Fd], tree: TreeFds | None = None) -> list[Pipe]:
    """A Pipe for every pipe and FIFO of recs this process is the first of the tree
    to hold, with its buffer, read through a read end wherever in the tree one is."""
    ours = [r for r in recs if isinstance(r, PipeEnd)]
    read_ends = {}
    for r in ours:
        if r.end == "r":
            read_ends.setdefault(r.pipe, (pid, r.fd))
    if tree:
        for r in ours:
            if tree.pipe_first.get(r.pipe) == pid:
                read_ends.setdefault(r.pipe, tree.read_end[r.pipe])
            else:
                read_ends.pop(r.pipe, None)  # an earlier process holds it: its record
    out = []
    for ino, (holder, fd) in read_ends.items():
        with nat.borrowed_fd(holder, fd) as mine:
            size = fcntl.fcntl(mine, fcntl.F_GETPIPE_SZ)
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
    s.call(nr.fcntl, wr, fcntl.F_SETPIPE_SZ, pipe.size, what="fcntl(F_SETPIPE_SZ)")
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


class PipeKind(Kind):
    name = "pipe"
    records = (PipeFd,)

    def classify(self, e: Seen, scan: Scan) -> bool:
        return e.target.startswith("pipe:") and e.st is not None and \
            ends_held(scan)[fileid.object_id(e.st)] == {"r", "w"}

    def capture(self, e: Seen, scan: Scan) -> PipeFd:
        rec = PipeFd(**e.common(e.target), pipe=fileid.object_id(e.st), end=end(e.flags))
        firsts = scan.memo("pipe.firsts", set)
        if rec.shared_with < 0:  # (opened again through /proc/PID/fd: two descriptions)
            if (rec.pipe, rec.end) in firsts:
                raise CantMigrate(f"holds one end of a pipe through two open file "
                                  f"descriptions (fd {rec.fd}); this is not supported yet",
                                  pid=scan.pid)
            firsts.add((rec.pipe, rec.end))
        return rec

    def restore(self, ctx: Rebuild, rec: PipeFd) -> None:
        """Both ends at once, at the first fd of either; an end this process does not
        hold (another process of the tree does) is parked above the fds."""
        if rec.pipe in ctx.made:
            return
        ctx.made.add(rec.pipe)
        pipe = ctx.by_id.get(Pipe, rec.pipe)
        rd, wr = create(ctx.s, ctx.pid, pipe)
        rd_rec, wr_rec = (self._primaries(ctx).get((rec.pipe, e)) for e in "rw")
        if rd_rec and wr_rec:
            ctx.place_two(rd, rd_rec, wr, wr_rec)
            return
        (keep, placed), (away, other) = ((rd, rd_rec), (wr, "w")) if rd_rec else \
            ((wr, wr_rec), (rd, "r"))
        ctx.park(pipe.ends[other], ctx.move_aside(away))
        ctx.place(keep, placed)

    def _primaries(self, ctx: Rebuild) -> dict[tuple[int, str], PipeFd]:
        """Each pipe end's first fd (the others are its dups)."""
        return ctx.memo("pipe.primaries", lambda: {
            (r.pipe, r.end): r for r in ctx.img.of(PipeFd) if r.shared_with < 0})

    def refers_to(self, rec: PipeFd) -> Any:
        return rec.pipe, rec.end

    def describe(self, rec: PipeFd, others) -> dict[str, Any]:
        p = others.get(Pipe, rec.pipe)
        return {**super().describe(rec, others), "end": rec.end,
                "buffered": len(p.data) if p else 0}


PIPE = PipeKind()
