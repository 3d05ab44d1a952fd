"""epoll instances: every registered fd with its events and data, read from
/proc/PID/fdinfo. Resume makes the instance with the other watchers, after the
fds they may watch, and registers the watches once every fd is in place (an epoll
instance may watch another)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from upmig import schema
from upmig.errors import CantMigrate
from upmig.fds.base import WATCHERS, Kind, Rebuild, Scan, Seen, anon_inode
from upmig.kconst import EPOLL_CTL_ADD
from upmig.records import Fd
from upmig.syscalls import nr

EPOLL_EVENT = struct.Struct("<IQ")   # struct epoll_event is packed on x86-64
WATCH = re.compile(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)"
                   r".*?\bino:\s*([0-9a-f]+)", re.M)


@dataclass(kw_only=True)
class EpollFd(Fd):
    """An epoll instance and what it watches."""

    kind: ClassVar[str] = "fd_epoll"
    checks: ClassVar[dict] = {"watches": schema.list_of(
        schema.row(schema.FD, schema.UINT32, schema.UINT64), schema.FD_MAX + 1)}
    watches: list[list[int]]  # [fd, events, data] each


class EpollKind(Kind):
    name = "epoll"
    records = (EpollFd,)
    phase = WATCHERS

    def classify(self, e: Seen, scan: Scan) -> bool:
        return anon_inode(e, "[eventpoll]")

    def capture(self, e: Seen, scan: Scan) -> EpollFd:
        """The kernel reports a watch under the fd number it was added with; that fd
        must still be the same file."""
        inodes = scan.memo("epoll.inodes", lambda: {
            o.fd: o.st.st_ino for o in scan.seen if o.st is not None})
        watches = []
        for m in WATCH.finditer(e.info_text):
            tfd, events, data, ino = int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16)
            if inodes.get(tfd) != ino:
                raise CantMigrate(f"its epoll instance on fd {e.fd} watches a file added as "
                                  f"fd {tfd}, which has since been closed or replaced; this "
                                  "cannot be registered again", pid=scan.pid)
            watches.append([tfd, events, data])
        return EpollFd(**e.common(e.target), watches=watches)

    def restore(self, ctx: Rebuild, rec: EpollFd) -> None:
        ctx.place(ctx.s.call(nr.epoll_create1, 0, what="epoll_create1"), rec)

    def finish(self, ctx: Rebuild, rec: EpollFd) -> None:
        """Register what the instance watched: every fd is in place now."""
        s = ctx.s
        for tfd, events, data in rec.watches:
            s.write(s.scratch, EPOLL_EVENT.pack(events, data))
            s.call(nr.epoll_ctl, rec.fd, EPOLL_CTL_ADD, tfd, s.scratch,
                   what=f"epoll_ctl(fd {rec.fd}, ADD, fd {tfd})")

    def describe(self, rec: EpollFd, others) -> dict[str, Any]:
        return {**super().describe(rec, others), "watches": [w[0] for w in rec.watches]}


EPOLL = EpollKind()
