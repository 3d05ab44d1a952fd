"""File locks the process holds: flock, POSIX record locks and open-file-description
(OFD) locks, read from /proc/PID/fdinfo and taken again on resume. If another process
has taken one meanwhile, resume fails and says which.

Only the kinds of fd that say they are lockable (a regular file by path, a ghost)
have a `locks` field; a lock on any other fd is refused."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from typing import TYPE_CHECKING, Any

from upmig import schema
from upmig.errors import CantMigrate, RestoreError
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.fds.base import Seen
    from upmig.inject import Session

LINE = re.compile(r"^lock:\s*\d+:\s*(\S+)\s+(\S+)\s+(\S+)\s+(-?\d+)\s+\S+\s+(\d+)\s+(\S+)",
                  re.M)
KINDS = {"FLOCK": "flock", "POSIX": "POSIX", "OFDLCK": "OFD"}
FLOCK_T = struct.Struct("<hhxxxxqqi4x")  # l_type, l_whence, l_start, l_len, l_pid
LOCK = schema.row(schema.one_of("FLOCK", "POSIX", "OFDLCK"), schema.boolean, schema.OFFSET,
                  schema.integer(-1, schema.S64 - 1, "a lock end (-1: EOF)"))
LOCKS = schema.list_of(LOCK, 1 << 16)  # the locks field's check


def capture(pid: int, fd: int, fdinfo: str, path: str) -> list[list]:
    """The locks fdinfo lists for fd, each [kind, write, start, end (-1: EOF)]."""
    out = []
    for m in LINE.finditer(fdinfo):
        kind, mode, access, _, start, end = m.groups()
        if kind not in KINDS:
            raise CantMigrate(f"holds a {kind.lower()} on {path} (fd {fd}), which is not "
                              "supported yet", pid=pid)
        if mode != "ADVISORY":
            raise CantMigrate(f"holds a mandatory lock on {path} (fd {fd}), which is not "
                              "supported", pid=pid)
        out.append([kind, access == "WRITE", int(start), -1 if end == "EOF" else int(end)])
    return out


def add(pid: int, rec: Any, e: Seen, lockable: bool,
        locked: set[tuple]) -> None:
    """Into rec.locks, the locks fdinfo lists for e. A POSIX lock is listed on every fd
    of its file, a flock or OFD lock on every fd of its open file description: each
    is kept once, on the first fd listing it (locked: the locks seen so far)."""
    if e.st is None or not lockable:
        raise CantMigrate(f"holds a lock through fd {e.fd} on {e.target}, which is not a "
                          "regular file; this is not supported", pid=pid)
    for lock in capture(pid, e.fd, e.info_text, e.target):
        owner = e.st.st_ino if lock[0] == "POSIX" else rec.shared_with if \
            rec.shared_with >= 0 else rec.fd
        key = (e.st.st_dev, e.st.st_ino, owner, *lock)
        if key not in locked:
            locked.add(key)
            rec.locks.append(lock)


def take(s: Session, r: Any) -> None:
    """Take fd r's locks again (r.locks, if its kind has them), without waiting."""
    for kind, write, start, end in getattr(r, "locks", ()):
        if kind == "FLOCK":
            rc = s.raw(nr.flock, r.fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        else:
            length = 0 if end < 0 else end - start + 1
            s.write(s.scratch, FLOCK_T.pack(fcntl.F_WRLCK if write else fcntl.F_RDLCK, os.SEEK_SET,
                                            start, length, 0))
            rc = s.raw(nr.fcntl, r.fd, fcntl.F_SETLK if kind == "POSIX" else fcntl.F_OFD_SETLK,
                       s.scratch)
        if rc in (-errno.EAGAIN, -errno.EACCES):
            span = "the whole file" if kind == "FLOCK" or (start == 0 and end < 0) else \
                f"bytes {start}-{'EOF' if end < 0 else end}"
            raise RestoreError(f"another process now holds a lock that conflicts with the "
                               f"{'write' if write else 'read'} {KINDS[kind]} lock on "
                               f"{span} of {r.path} (fd {r.fd})")
        if rc < 0:
            raise RestoreError(f"cannot lock {r.path} (fd {r.fd}) again: {os.strerror(-rc)}")
