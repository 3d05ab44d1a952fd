"""Event descriptors: eventfd (its counter and mode), epoll (every registered fd
with its events and data), timerfd (clock, remaining time, interval, unread
expirations) and signalfd (its mask), read from /proc/PID/fdinfo and made again by
syscalls injected into the rebuilt process."""

from __future__ import annotations

import re
import struct

from upmig.errors import CantMigrate
from upmig.inject import Session
from upmig.records import Fd
from upmig.syscalls import nr

TYPES = ("eventfd", "epoll", "timerfd", "signalfd", "inotify")
EFD_SEMAPHORE = 1
O_NONBLOCK = 0o4000
TFD_IOC_SET_TICKS = 0x40085400     # _IOW('T', 0, u64), with CONFIG_CHECKPOINT_RESTORE
ITIMERSPEC = struct.Struct("<qqqq")  # interval {sec, nsec}, value {sec, nsec}
TIMESPEC = re.compile(r"\(\s*(-?\d+),\s*(-?\d+)\)")
EPOLL_CTL_ADD = 1
EPOLL_EVENT = struct.Struct("<IQ")   # struct epoll_event is packed on x86-64
WATCH = re.compile(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)"
                   r".*?\bino:\s*([0-9a-f]+)", re.M)


def eventfd_extra(info: dict[str, str]) -> dict:
    return {"count": int(info["eventfd-count"], 16),
            "semaphore": int(info.get("eventfd-semaphore", "0"))}


def timerfd_extra(info: dict[str, str]) -> dict:
    """Remaining time (relative: it starts again from the resume) and interval."""
    value = [int(x) for x in TIMESPEC.match(info["it_value"]).groups()]
    interval = [int(x) for x in TIMESPEC.match(info["it_interval"]).groups()]
    return {"clock": int(info["clockid"]), "ticks": int(info["ticks"]),
            "value": value, "interval": interval}


def signalfd_extra(info: dict[str, str]) -> dict:
    return {"mask": int(info["sigmask"], 16)}


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
    if rec.type == "timerfd":
        return _timerfd(s, rec)
    if rec.type == "inotify":
        return s.call(nr.inotify_init1, rec.flags & O_NONBLOCK, what="inotify_init1")
    if rec.type == "signalfd":
        s.write(s.scratch, struct.pack("<Q", rec.extra["mask"]))
        return s.call(nr.signalfd4, -1, s.scratch, 8, rec.flags & O_NONBLOCK,
                      what="signalfd4")
    return s.call(nr.epoll_create1, 0, what="epoll_create1")


def _timerfd(s: Session, rec: Fd) -> int:
    x = rec.extra
    fd = s.call(nr.timerfd_create, x["clock"], rec.flags & O_NONBLOCK, what="timerfd_create")
    if any(x["value"]):
        s.write(s.scratch, ITIMERSPEC.pack(*x["interval"], *x["value"]))
        s.call(nr.timerfd_settime, fd, 0, s.scratch, 0, what="timerfd_settime")
    if x["ticks"]:
        s.write(s.scratch, struct.pack("<Q", x["ticks"]))
        s.call(nr.ioctl, fd, TFD_IOC_SET_TICKS, s.scratch, what="ioctl(TFD_IOC_SET_TICKS)")
    return fd


def add_watches(s: Session, rec: Fd) -> None:
    """Once every fd is in place: register what the epoll instance watched."""
    for tfd, events, data in rec.extra["watches"]:
        s.write(s.scratch, EPOLL_EVENT.pack(events, data))
        s.call(nr.epoll_ctl, rec.fd, EPOLL_CTL_ADD, tfd, s.scratch,
               what=f"epoll_ctl(fd {rec.fd}, ADD, fd {tfd})")
