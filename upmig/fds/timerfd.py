"""timerfds: the clock, the remaining time (relative: it starts again from the
resume), the interval and the expirations not yet read, from /proc/PID/fdinfo."""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from upmig import schema
from upmig.fds.base import Kind, Rebuild, Scan, Seen, anon_inode
from upmig.kconst import CLOCK_BOOTTIME_ALARM, CLOCK_REALTIME_ALARM, TFD_IOC_SET_TICKS
from upmig.records import Fd
from upmig.syscalls import nr

ITIMERSPEC = struct.Struct("<qqqq")  # interval {sec, nsec}, value {sec, nsec}
TIMESPEC = re.compile(r"\(\s*(-?\d+),\s*(-?\d+)\)")
CLOCKS = (time.CLOCK_REALTIME, time.CLOCK_MONOTONIC, time.CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM,
          CLOCK_BOOTTIME_ALARM)
_TIMESPEC = schema.row(schema.INT64, schema.integer(0, 999999999, "nanoseconds"))


@dataclass(kw_only=True)
class TimerFd(Fd):
    """A timerfd, its clock and where its timer stands."""

    kind: ClassVar[str] = "fd_timerfd"
    checks: ClassVar[dict] = {"clock": schema.one_of(*CLOCKS), "ticks": schema.UINT64,
                              "value": _TIMESPEC, "interval": _TIMESPEC}
    clock: int
    ticks: int               # expirations not yet read
    value: list[int]         # [sec, nsec] to the next expiry; [0, 0]: disarmed
    interval: list[int]


class TimerFdKind(Kind):
    name = "timerfd"
    records = (TimerFd,)

    def classify(self, e: Seen, scan: Scan) -> bool:
        return anon_inode(e, "[timerfd]")

    def capture(self, e: Seen, scan: Scan) -> TimerFd:
        value = [int(x) for x in TIMESPEC.match(e.info["it_value"]).groups()]
        interval = [int(x) for x in TIMESPEC.match(e.info["it_interval"]).groups()]
        return TimerFd(**e.common(e.target), clock=int(e.info["clockid"]),
                       ticks=int(e.info["ticks"]), value=value, interval=interval)

    def restore(self, ctx: Rebuild, rec: TimerFd) -> None:
        s = ctx.s
        fd = s.call(nr.timerfd_create, rec.clock, rec.flags & os.O_NONBLOCK, what="timerfd_create")
        if any(rec.value):
            s.write(s.scratch, ITIMERSPEC.pack(*rec.interval, *rec.value))
            s.call(nr.timerfd_settime, fd, 0, s.scratch, 0, what="timerfd_settime")
        if rec.ticks:
            s.write(s.scratch, struct.pack("<Q", rec.ticks))
            s.call(nr.ioctl, fd, TFD_IOC_SET_TICKS, s.scratch, what="ioctl(TFD_IOC_SET_TICKS)")
        ctx.place(fd, rec)

    def describe(self, rec: TimerFd, others) -> dict[str, Any]:
        return {**super().describe(rec, others), "clock": rec.clock, "remaining": rec.value,
                "interval": rec.interval, "ticks": rec.ticks}


TIMERFD = TimerFdKind()
