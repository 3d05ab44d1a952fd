"""inotify instances: every watch is added again on resume, by path, under its old
watch descriptor number (programs keep those numbers).

fdinfo gives each watch as a file handle; dump turns it into a path with
open_by_handle_at on the watch's filesystem. Resume adds the watches in wd order;
where the old numbers had gaps, it burns numbers with a throwaway watch, since the
kernel hands them out one after another. Events queued but not yet read cannot be
read without taking them from the process, so an instance holding some is refused;
events of the time the process was away are not delivered."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from upmig import _native as nat
from upmig import schema
from upmig.errors import CantMigrate, Mismatch, RestoreError
from upmig.fds.base import WATCHERS, Kind, Rebuild, Scan, Seen, anon_inode
from upmig.kconst import IN_MASK_CREATE, IN_MODIFY
from upmig.records import Fd
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.inject import Session

WATCH = re.compile(r"^inotify wd:(\d+) ino:[0-9a-f]+ sdev:([0-9a-f]+) mask:([0-9a-f]+) "
                   r"ignored_mask:[0-9a-f]+ fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) "
                   r"f_handle:([0-9a-f]+)", re.M)
BURNERS = ("/dev/null", "/", "/proc")  # throwaway watches that burn wd numbers
MAX_WATCH_NUMBER = 1 << 16     # each missing number below costs two syscalls


def _increasing(watches: list[list]) -> str | None:
    wds = [w[0] for w in watches]
    return None if wds == sorted(set(wds)) else "are not in increasing watch-number order"


@dataclass(kw_only=True)
class InotifyFd(Fd):
    """An inotify instance and its watches."""

    kind: ClassVar[str] = "fd_inotify"
    checks: ClassVar[dict] = {"watches": schema.all_of(schema.list_of(schema.row(
        schema.integer(1, MAX_WATCH_NUMBER, "a watch number"), schema.UINT32, schema.path),
        MAX_WATCH_NUMBER), _increasing)}
    watches: list[list]      # [wd, mask, path] each, by wd


class InotifyKind(Kind):
    name = "inotify"
    records = (InotifyFd,)
    phase = WATCHERS

    def classify(self, e: Seen, scan: Scan) -> bool:
        return anon_inode(e, "inotify")

    def capture(self, e: Seen, scan: Scan) -> InotifyFd:
        return InotifyFd(**e.common(e.target), watches=capture(scan.pid, e.fd, e.info_text))

    def restore(self, ctx: Rebuild, rec: InotifyFd) -> None:
        ctx.place(ctx.s.call(nr.inotify_init1, rec.flags & os.O_NONBLOCK, what="inotify_init1"),
                  rec)

    def finish(self, ctx: Rebuild, rec: InotifyFd) -> None:
        restore(ctx.s, ctx.pid, rec)

    def describe(self, rec: InotifyFd, others) -> dict[str, Any]:
        return {**super().describe(rec, others), "watches": [w[0] for w in rec.watches]}


INOTIFY = InotifyKind()


def capture(pid: int, fd: int, fdinfo: str) -> list[list]:
    """The watches [[wd, mask, path], ...] of the inotify instance on fd."""
    _refuse_unread(pid, fd)
    watches = []
    for m in WATCH.finditer(fdinfo):
        wd, sdev, mask = int(m[1]), int(m[2], 16), int(m[3], 16)
        handle = bytes.fromhex(m[6])[:int(m[4], 16)]
        path = _path_of(sdev, int(m[5], 16), handle)
        if path is None:
            raise CantMigrate(f"watches (inotify, fd {fd}, wd {wd}) a file upmig cannot find "
                              "the path of", pid=pid)
        watches.append([wd, mask, path])
    return sorted(watches)


def _refuse_unread(pid: int, fd: int) -> None:
    with nat.borrowed_fd(pid, fd) as mine:
        queued = _unread(mine)
    if queued:
        raise CantMigrate(f"has {queued} bytes of inotify events unread on fd {fd}; they "
                          "cannot be read without taking them from it", pid=pid)


def _path_of(sdev: int, handle_type: int, handle: bytes) -> str | None:
    """The path of a file from its handle, through a mount of its filesystem."""
    major, minor = sdev >> 20, sdev & 0xFFFFF
    for mount in _mounts_of(major, minor):
        try:
            mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fd = nat.open_by_handle(mfd, handle_type, handle, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        finally:
            os.close(mfd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if not path.endswith(" (deleted)"):
            return path
    return None


def _mounts_of(major: int, minor: int) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == f"{major}:{minor}":
                out.append(fields[4].replace("\\040", " "))
    return out


def restore(s: Session, pid: int, rec: InotifyFd) -> None:
    """Once the new instance is at rec.fd: its watches, each under its old number
    (a new instance hands out 1, 2, 3, ... and never reuses one soon)."""
    _add_all(s, rec)
    # Burnt numbers left IN_IGNORED events behind. The queue was empty at dump time,
    # and what happened to the files while the process was away is not its to see.
    with nat.borrowed_fd(pid, rec.fd) as mine:
        while queued := _unread(mine):
            os.read(mine, queued)


def _unread(fd: int) -> int:
    """Bytes of events waiting to be read."""
    import termios  # for FIONREAD: not at every start

    return struct.unpack("<i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]


def _add_all(s: Session, rec: InotifyFd) -> None:
    ours: set[int] = set()
    next_wd = 1
    for wd, mask, path in rec.watches:
        while next_wd < wd:
            next_wd = _burn(s, rec, ours) + 1
        got = _add(s, rec, path, mask)
        if got != wd:
            raise RestoreError(f"inotify watch {wd} on {path} (fd {rec.fd}) came back as "
                               f"{got}")
        ours.add(got)
        next_wd = got + 1


def _add(s: Session, rec: InotifyFd, path: str, mask: int) -> int:
    """Watch path again. It is opened first (O_PATH) through no symlink on its way,
    and the watch added through /proc/self/fd: a path redirected by a symlink would
    show the process the names of files in a directory it may not read. (The path
    itself is not followed either: a file watched through a symlink to it was dumped
    by its own path.)"""
    at = s.open_path(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if at == -errno.ELOOP:
        raise Mismatch(f"{path} (watched by inotify on fd {rec.fd}) resolves through a "
                       "symlink now")
    if at < 0:
        raise RestoreError(f"cannot watch {path} again (inotify, fd {rec.fd}): "
                           f"{os.strerror(-at)}")
    try:
        s.write(s.scratch, f"/proc/self/fd/{at}".encode() + b"\0")
        wd = s.raw(nr.inotify_add_watch, rec.fd, s.scratch, mask)
    finally:
        s.call(nr.close, at, what="close")
    if wd < 0:
        raise RestoreError(f"cannot watch {path} again (inotify, fd {rec.fd}): "
                           f"{os.strerror(-wd)}")
    return wd


def _burn(s: Session, rec: InotifyFd, ours: set[int]) -> int:
    """Take and drop one watch number; the number."""
    for burner in BURNERS:
        # IN_MASK_CREATE: fail rather than change a watch the process really has
        s.write(s.scratch, os.fsencode(burner) + b"\0")
        got = s.raw(nr.inotify_add_watch, rec.fd, s.scratch, IN_MODIFY | IN_MASK_CREATE)
        if got >= 0:
            s.call(nr.inotify_rm_watch, rec.fd, got, what="inotify_rm_watch")
            return got
    raise RestoreError(f"cannot give the inotify watches of fd {rec.fd} their numbers again")
