"""eventfds: the counter and the mode (semaphore or not), read from
/proc/PID/fdinfo; resume makes one and writes the counter in."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from upmig import schema
from upmig.fds.base import Kind, Rebuild, Scan, Seen, anon_inode
from upmig.records import Fd
from upmig.syscalls import nr


@dataclass(kw_only=True)
class EventFd(Fd):
    """An eventfd and its counter."""

    kind: ClassVar[str] = "fd_eventfd"
    checks: ClassVar[dict] = {"count": schema.integer(0, schema.U64 - 1, "an eventfd count"),
                              "semaphore": schema.boolean}
    count: int
    semaphore: bool


class EventFdKind(Kind):
    name = "eventfd"
    records = (EventFd,)

    def classify(self, e: Seen, scan: Scan) -> bool:
        return anon_inode(e, "[eventfd]")

    def capture(self, e: Seen, scan: Scan) -> EventFd:
        return EventFd(**e.common(e.target), count=int(e.info["eventfd-count"], 16),
                       semaphore=e.info.get("eventfd-semaphore", "0") == "1")

    def restore(self, ctx: Rebuild, rec: EventFd) -> None:
        s = ctx.s
        flags = (os.EFD_SEMAPHORE if rec.semaphore else 0) | (rec.flags & os.O_NONBLOCK)
        fd = s.call(nr.eventfd2, 0, flags, what="eventfd2")
        if rec.count:  # eventfd2 takes only 32 bits: the counter is written in
            s.write(s.scratch, struct.pack("<Q", rec.count))
            s.call(nr.write, fd, s.scratch, 8, what="write(eventfd)")
        ctx.place(fd, rec)

    def describe(self, rec: EventFd, others) -> dict[str, Any]:
        return {**super().describe(rec, others), "count": rec.count}


EVENTFD = EventFdKind()
