"""Event descriptors: eventfd (its counter and mode) and epoll (every registered fd
with its events and data), read from /proc/PID/fdinfo and made again by syscalls
injected into the rebuilt process."""

from __future__ import annotations

import re
import struct

from upmig.errors import CantMigrate
from upmig.inject import Session
from upmig.records import Fd
from upmig.syscalls import nr

EFD_SEMAPHORE = 1
O_NONBLOCK = 0o4000
EPOLL_CTL_ADD = 1
EPOLL_EVENT = struct.Struct("<IQ")   # struct epoll_event is packed on x86-64
WATCH = re.compile(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)"
                   r".*?\bino:\s*([0-9a-f]+)", re.M)


def eventfd_extra(info: dict[str, str]) -> dict:
    return {"count": int(info["eventfd-count"], 16),
            "semaphore": int(info.get("eventfd-semaphore", "0"))}


def epoll_extra(pid: int, fd: int, fdinfo: str, inodes: dict[int, int]) -> dict:
    """Its watches, each [fd, events, data]. The kernel reports a watch under the fd
    number it was added with; that fd must still be the same file."""
    watches = []
    for m in WATCH.finditer(fdinfo):
        tfd, events, data, ino = int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16)
        if inodes.get(tfd) != ino:
            raise CantMigrate(f"its epoll instance on fd {fd} watches a file added as fd "
                              f"{tfd}, which has since been closed or replaced; this cannot "
                              "be registered again", pid=pid)
        watches.append([tfd, events, data])
    return {"watches": watches}


def create(s: Session, rec: Fd) -> int:
    """A new eventfd or epoll instance inside the process; its fd (any number)."""
    if rec.type == "eventfd":
        flags = (EFD_SEMAPHORE if rec.extra["semaphore"] else 0) | (rec.flags & O_NONBLOCK)
        fd = s.call(nr.eventfd2, 0, flags, what="eventfd2")
        count = rec.extra["count"]
        if count:  # eventfd2 takes only 32 bits: the counter is written in
            s.write(s.scratch, struct.pack("<Q", count))
            s.call(nr.write, fd, s.scratch, 8, what="write(eventfd)")
        return fd
    return s.call(nr.epoll_create1, 0, what="epoll_create1")


def add_watches(s: Session, rec: Fd) -> None:
    """Once every fd is in place: register what the epoll instance watched."""
    for tfd, events, data in rec.extra["watches"]:
        s.write(s.scratch, EPOLL_EVENT.pack(events, data))
        s.call(nr.epoll_ctl, rec.fd, EPOLL_CTL_ADD, tfd, s.scratch,
               what=f"epoll_ctl(fd {rec.fd}, ADD, fd {tfd})")
