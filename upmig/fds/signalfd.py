"""signalfds: the mask of signals they read, from /proc/PID/fdinfo."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from upmig import schema, signals
from upmig.fds.base import Kind, Rebuild, Scan, Seen, anon_inode
from upmig.records import Fd
from upmig.syscalls import nr


@dataclass(kw_only=True)
class SignalFd(Fd):
    """A signalfd and the signals it takes."""

    kind: ClassVar[str] = "fd_signalfd"
    checks: ClassVar[dict] = {"mask": schema.UINT64}
    mask: int


class SignalFdKind(Kind):
    name = "signalfd"
    records = (SignalFd,)

    def classify(self, e: Seen, scan: Scan) -> bool:
        return anon_inode(e, "[signalfd]")

    def capture(self, e: Seen, scan: Scan) -> SignalFd:
        return SignalFd(**e.common(e.target), mask=int(e.info["sigmask"], 16))

    def restore(self, ctx: Rebuild, rec: SignalFd) -> None:
        s = ctx.s
        s.write(s.scratch, struct.pack("<Q", rec.mask))
        ctx.place(s.call(nr.signalfd4, -1, s.scratch, 8, rec.flags & os.O_NONBLOCK,
                         what="signalfd4"), rec)

    def describe(self, rec: SignalFd, others) -> dict[str, Any]:
        return {**super().describe(rec, others), "signals": signals.mask_list(rec.mask)}


SIGNALFD = SignalFdKind()
