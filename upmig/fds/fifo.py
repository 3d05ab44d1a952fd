"""FIFOs opened by their path, with both ends inside the process (or the tree), and
the bytes buffered in them.

Resume opens the FIFO read-write first (which never blocks) and holds it while the
fds are made: both ends exist, so opening either end alone does not wait for the
other, and the buffer (a Pipe record, upmig.fds.pipe) is written back through it."""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Any, ClassVar

from upmig import fileid, schema
from upmig.errors import CantMigrate
from upmig.fds import path, pipe
from upmig.fds.base import Kind, Rebuild, Scan, Seen
from upmig.records import Pipe
from upmig.syscalls import nr


@dataclass(kw_only=True)
class FifoFd(pipe.PipeEnd):
    """An end of a FIFO, reopened by its path."""

    kind: ClassVar[str] = "fd_fifo"
    checks: ClassVar[dict] = {**pipe.PipeEnd.checks, "path": schema.path}
    path: str


class FifoKind(Kind):
    name = "fifo"
    records = (FifoFd,)
    created = False
    by_path = True

    def classify(self, e: Seen, scan: Scan) -> bool:
        return e.st is not None and stat.S_ISFIFO(e.st.st_mode) and e.target.startswith("/")

    def capture(self, e: Seen, scan: Scan) -> FifoFd:
        obj = fileid.object_id(e.st)
        if pipe.ends_held(scan)[obj] != {"r", "w"}:
            raise CantMigrate(f"holds the FIFO {e.target} on fd {e.fd} without its other "
                              "end, which is outside the process; this is not supported",
                              pid=scan.pid)
        return FifoFd(**e.common(), path=e.target, pipe=obj, end=pipe.end(e.flags))

    def restore(self, ctx: Rebuild, rec: FifoFd) -> None:
        s = ctx.s
        if rec.pipe not in ctx.open_meanwhile:  # both ends held open, and filled
            both = ctx.open_by_path(rec, rec.path, os.O_RDWR | os.O_NONBLOCK)
            # None: an earlier process of the tree filled it (and holds it open still)
            pipe.fill_fifo(s, ctx.pid, both, ctx.by_id.get(Pipe, rec.pipe))
            ctx.open_meanwhile[rec.pipe] = ctx.move_aside(both)
        fd = ctx.open_by_path(rec, rec.path, path.open_flags(rec.flags) | os.O_NONBLOCK)
        ctx.place(fd, rec, status=False)
        s.call(nr.fcntl, rec.fd, fcntl.F_SETFL, rec.flags & ~os.O_ASYNC, what="fcntl(F_SETFL)")

    def refers_to(self, rec: FifoFd) -> Any:
        return rec.path, rec.pipe

    def describe(self, rec: FifoFd, others) -> dict[str, Any]:
        return {"type": self.name, "path": rec.path, "end": rec.end}


FIFO = FifoKind()
