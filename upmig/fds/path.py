"""Fds reopened by their path: regular files, directories, and the character
devices with no state of their own (/dev/null and the like).

Dump records the path /proc gives and the file's identity (upmig.fileid); resume
opens the path again through no symlink, checks it is the same file, and seeks to
the old offset. Files under /proc and /sys describe the source machine and are
refused, as are other devices and special files."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, ClassVar

from upmig import schema
from upmig.errors import CantMigrate
from upmig.fds import locks
from upmig.fds.base import Kind, Rebuild, Scan, Seen
from upmig.kconst import O_LARGEFILE
from upmig.records import Fd
from upmig.syscalls import nr

# Devices with no state of their own: reopened by path on the target.
PLAIN_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
# The kernel's VALID_OPEN_FLAGS: openat2 refuses any other bit.
VALID_OPEN_FLAGS = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC
                    | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_ASYNC | os.O_DIRECT
                    | O_LARGEFILE | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME
                    | os.O_CLOEXEC | os.O_PATH | os.O_TMPFILE)
WHAT = ("file", "dir", "chardev")


@dataclass(kw_only=True)
class PathFd(Fd):
    """What is found by its path: a regular file, a directory, a device."""

    kind: ClassVar[str] = "fd_path"
    checks: ClassVar[dict] = {"what": schema.one_of(*WHAT), "path": schema.path,
                              "locks": locks.LOCKS}
    what: str                # file | dir | chardev
    path: str
    locks: list[list] = field(default_factory=list)  # upmig.fds.locks


def open_flags(flags: int) -> int:
    """flags but those that acted only at the fd's open, and only those openat2
    takes (with O_PATH: O_DIRECTORY and O_NOFOLLOW; any other bit is EINVAL)."""
    if flags & os.O_PATH:
        return flags & (os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    # A file made nameless with O_TMPFILE keeps that flag, O_DIRECTORY included: it
    # would make opening the recreated file fail with ENOTDIR.
    tmpfile = os.O_TMPFILE if flags & os.O_TMPFILE == os.O_TMPFILE else 0
    made = os.O_CREAT | os.O_EXCL | os.O_TRUNC | tmpfile
    return flags & VALID_OPEN_FLAGS & ~made | os.O_NOCTTY


def is_tty(st: os.stat_result) -> bool:
    major = os.major(st.st_rdev)
    return stat.S_ISCHR(st.st_mode) and (major in (4, 5) or 136 <= major <= 143)


def _kernel_fs_devices() -> set[int]:
    """Devices of /proc and /sys: their files describe this machine and this pid."""
    out = set()
    for where in ("/proc", "/sys"):
        try:
            out.add(os.stat(where).st_dev)
        except OSError:
            pass
    return out


class PathKind(Kind):
    name = "file"
    records = (PathFd,)
    created = False
    by_path = True

    def classify(self, e: Seen, scan: Scan) -> bool:
        return e.st is not None and e.target.startswith("/") and \
            not e.target.endswith(" (deleted)") and not is_tty(e.st)

    def capture(self, e: Seen, scan: Scan) -> PathFd:
        st, target = e.st, e.target
        if st.st_dev in scan.memo("path.kernel_fs", _kernel_fs_devices):
            raise CantMigrate(f"holds the kernel file {target} on fd {e.fd}; /proc and /sys "
                              "files cannot be reopened elsewhere", pid=scan.pid)
        what = "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) \
            else "chardev" if stat.S_ISCHR(st.st_mode) and target in PLAIN_DEVICES else None
        if what is None:
            raise CantMigrate(f"holds the device or special file {target} on fd {e.fd}, "
                              "which is not supported yet", pid=scan.pid)
        return PathFd(**e.common(), what=what, path=target)

    def restore(self, ctx: Rebuild, rec: PathFd) -> None:
        ctx.place(ctx.open_by_path(rec, rec.path, open_flags(rec.flags)), rec, status=False)
        if rec.pos and rec.what != "chardev" and not rec.flags & os.O_PATH:
            ctx.s.call(nr.lseek, rec.fd, rec.pos, os.SEEK_SET, what=f"lseek(fd {rec.fd})")

    def lockable(self, rec: PathFd) -> bool:
        return rec.what == "file"

    def rule(self, rec: PathFd) -> tuple[str, str] | None:
        if rec.what == "chardev" and rec.path not in PLAIN_DEVICES:
            return "path", f"{schema.shown(rec.path)} is not a device reopened by path " \
                f"({', '.join(sorted(PLAIN_DEVICES))})"
        if rec.locks and rec.what != "file":
            return "locks", f"are held on a {rec.what}: only a regular file's are taken again"
        return None

    def refers_to(self, rec: PathFd) -> Any:
        return rec.path

    def describe(self, rec: PathFd, others) -> dict[str, Any]:
        return {"type": rec.what, "path": rec.path}


PATH = PathKind()
