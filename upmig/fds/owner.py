"""Signal-driven I/O (O_ASYNC): the owner a descriptor signals, and with which signal.
Both belong to the open file description, so dump reads them from a copy of it in
upmig; resume sets them again from inside the process, then turns O_ASYNC on."""

from __future__ import annotations

import fcntl
import struct
from typing import TYPE_CHECKING

from upmig import _native as nat
from upmig.errors import CantMigrate
from upmig.kconst import F_GETOWN_EX, F_OWNER_PGRP, F_SETOWN_EX
from upmig.records import Fd
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.inject import Session

OWNER = struct.Struct("<ii")  # struct f_owner_ex: type (F_OWNER_TID/PID/PGRP), pid


def capture(pid: int, rec: Fd, tids: set[int], pgids: set[int]) -> None:
    """Into rec.async_owner: [owner type, owner pid, signal] of an O_ASYNC fd. The
    owner must be moved too: a thread (or process) of the tree (tids), or one of its
    process groups (pgids)."""
    with nat.borrowed_fd(pid, rec.fd) as mine:
        kind, owner = OWNER.unpack(fcntl.fcntl(mine, F_GETOWN_EX, bytes(OWNER.size)))
        rec.async_owner = [kind, owner, fcntl.fcntl(mine, fcntl.F_GETSIG)]
    ours = owner == 0 or owner in (pgids if kind == F_OWNER_PGRP else tids)
    if not ours:
        raise CantMigrate(f"signals I/O on fd {rec.fd} (O_ASYNC) to {owner}, which is not "
                          "part of it; this is not supported", pid=pid)


def restore(s: Session, rec: Fd) -> None:
    kind, owner, sig = rec.async_owner
    s.write(s.scratch, OWNER.pack(kind, owner))
    s.call(nr.fcntl, rec.fd, F_SETOWN_EX, s.scratch, what=f"fcntl(fd {rec.fd}, F_SETOWN_EX)")
    s.call(nr.fcntl, rec.fd, fcntl.F_SETSIG, sig, what=f"fcntl(fd {rec.fd}, F_SETSIG)")
    s.call(nr.fcntl, rec.fd, fcntl.F_SETFL, rec.flags, what=f"fcntl(fd {rec.fd}, F_SETFL)")
