"""Fds of files whose bytes travel in the image (upmig.ghosts): a regular file
deleted while held open, a memfd, a POSIX shared memory object (/dev/shm/NAME).

The file itself is made again before the memory is mapped (ghosts.make_all, at a
spare fd); each fd is another open file description of it, opened with the fd's own
flags and given its offset."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from upmig import fileid, ghosts, schema
from upmig.errors import CantMigrate, Mismatch, RestoreError
from upmig.fds import locks
from upmig.fds.base import Kind, Rebuild, Scan, Seen
from upmig.fds.path import open_flags
from upmig.kconst import AT_FDCWD
from upmig.records import Fd, Ghost
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.inject import Session



def _named(v: Any) -> str | None:
    return schema.text(schema.PATH_MAX)(v) or (None if v else "is empty")


@dataclass(kw_only=True)
class GhostFd(Fd):
    """A file with no name left (deleted, a memfd, a /dev/shm object)."""

    kind: ClassVar[str] = "fd_ghost"
    checks: ClassVar[dict] = {"path": _named, "ghost": schema.OBJECT, "locks": locks.LOCKS}
    path: str                # where it was, without " (deleted)"
    ghost: int               # its Ghost record's id
    locks: list[list] = field(default_factory=list)  # upmig.fds.locks


class GhostKind(Kind):
    name = "ghost"
    records = (GhostFd,)
    created = False

    def classify(self, e: Seen, scan: Scan) -> bool:
        in_memory = ghosts.lives_in_memory(e.target) and e.st is not None and \
            stat.S_ISREG(e.st.st_mode)
        return e.target.endswith(" (deleted)") or in_memory

    def capture(self, e: Seen, scan: Scan) -> GhostFd:
        if e.st is None or not stat.S_ISREG(e.st.st_mode):
            raise CantMigrate(f"holds the deleted {e.target[:-10]} on fd {e.fd}, which is not "
                              "a regular file and cannot be recreated", pid=scan.pid)
        return GhostFd(**e.common(), path=e.target.removesuffix(" (deleted)"),
                       ghost=fileid.object_id(e.st))

    def restore(self, ctx: Rebuild, rec: GhostFd) -> None:
        g = ctx.by_id.get(Ghost, rec.ghost)
        ctx.place(reopen(ctx.s, ctx.who, g, ctx.ghost_fds[rec.ghost], open_flags(rec.flags)),
                  rec, status=False)
        if not rec.flags & os.O_PATH:  # (an O_PATH fd has no offset)
            ctx.s.call(nr.lseek, rec.fd, rec.pos, os.SEEK_SET, what=f"lseek(fd {rec.fd})")

    def lockable(self, rec: GhostFd) -> bool:
        return True

    def refers_to(self, rec: GhostFd) -> Any:
        return rec.ghost

    def describe(self, rec: GhostFd, others) -> dict[str, Any]:
        g = others.get(Ghost, rec.ghost)
        return {"type": self.name, "path": rec.path, "deleted_bytes": g.size if g else 0}


def reopen(s: Session, pid: int, g: Ghost, tmp: int, flags: int) -> int:
    """Another open file description of g, recreated at tmp, with these flags. A POSIX
    object is opened by its name, as shm_open does (its O_NOFOLLOW kept), and must be
    the very object made. Any other is reached through the magic link
    /proc/self/fd/TMP, without O_NOFOLLOW: that would refuse it (ELOOP; with O_PATH,
    open the link itself), and only said how a path was to be looked up."""
    if g.type != "posix":
        s.write(s.scratch, f"/proc/self/fd/{tmp}".encode() + b"\0")
        fd = s.raw(nr.openat, AT_FDCWD, s.scratch, flags & ~os.O_NOFOLLOW, 0)
    else:
        fd = s.open_path(g.path, flags)
    if fd < 0:
        raise RestoreError(f"cannot reopen the recreated {g.path or 'shared memory'}: "
                           f"{os.strerror(-fd)}")
    here = s.inj.pid
    if g.type == "posix" and not os.path.samestat(os.stat(f"/proc/{here}/fd/{fd}"),
                                                  os.stat(f"/proc/{here}/fd/{tmp}")):
        raise Mismatch(f"{g.path} was replaced while resume was opening it", pid=pid)
    return fd


GHOST = GhostKind()
