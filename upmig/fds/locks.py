"""File locks the process holds: flock, POSIX record locks and open-file-description
(OFD) locks, read from /proc/PID/fdinfo and taken again on resume. If another process
has taken one meanwhile, resume fails and says which."""

from __future__ import annotations

import errno
import os
import re
import struct

from upmig.errors import CantMigrate, RestoreError
from upmig.inject import Session
from upmig.records import Fd
from upmig.syscalls import nr

LINE = re.compile(r"^lock:\s*\d+:\s*(\S+)\s+(\S+)\s+(\S+)\s+(-?\d+)\s+\S+\s+(\d+)\s+(\S+)",
                  re.M)
KINDS = {"FLOCK": "flock", "POSIX": "POSIX", "OFDLCK": "OFD"}
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
F_SETLK, F_OFD_SETLK = 6, 37
F_RDLCK, F_WRLCK = 0, 1
FLOCK_T = struct.Struct("<hhxxxxqqi4x")  # l_type, l_whence, l_start, l_len, l_pid


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


def take(s: Session, r: Fd) -> None:
    """Take fd r's locks again, without waiting for anybody."""
    for kind, write, start, end in r.extra.get("locks", []):
        if kind == "FLOCK":
            rc = s.raw(nr.flock, r.fd, (LOCK_EX if write else LOCK_SH) | LOCK_NB)
        else:
            length = 0 if end < 0 else end - start + 1
            s.write(s.scratch, FLOCK_T.pack(F_WRLCK if write else F_RDLCK, os.SEEK_SET,
                                            start, length, 0))
            rc = s.raw(nr.fcntl, r.fd, F_SETLK if kind == "POSIX" else F_OFD_SETLK,
                       s.scratch)
        if rc in (-errno.EAGAIN, -errno.EACCES):
            span = "the whole file" if kind == "FLOCK" or (start == 0 and end < 0) else \
                f"bytes {start}-{'EOF' if end < 0 else end}"
            raise RestoreError(f"another process now holds a lock that conflicts with the "
                               f"{'write' if write else 'read'} {KINDS[kind]} lock on "
                               f"{span} of {r.path} (fd {r.fd})")
        if rc < 0:
            raise RestoreError(f"cannot lock {r.path} (fd {r.fd}) again: {os.strerror(-rc)}")
