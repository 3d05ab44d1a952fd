"""Files deleted while the process holds them open ("ghost" files).

Their contents travel in the image as data frames, copied by the C helper straight
from the deleted file (reached through /proc/PID/fd). Resume recreates each as an
unlinked file in its old directory (O_TMPFILE; a named file unlinked at once where
the filesystem lacks it), writes the contents back, and opens every fd onto it with
that fd's own flags and offset."""

from __future__ import annotations

import errno
import os

from upmig import _native as nat
from upmig import memmap
from upmig.errors import CantMigrate, RestoreError
from upmig.image import ImageWriter, Records
from upmig.inject import Session
from upmig.records import Fd, Ghost, Vma
from upmig.syscalls import nr

O_RDWR, O_CREAT, O_EXCL, O_TMPFILE = 0o2, 0o100, 0o200, 0o20200000
AT_FDCWD = -100
F_DUPFD_CLOEXEC = 1030


def target(ghost_id: int) -> str:
    return f"ghost:{ghost_id}"


def capture(pid: int, recs: list[Fd], vmas: list[Vma], limit: int | None) -> list[Ghost]:
    """A Ghost for each deleted file the process holds open (recs) or maps (vmas)."""
    out: dict[int, Ghost] = {}
    for ghost_id, path, source, where in _holders(pid, recs, vmas):
        if ghost_id in out:
            continue
        st = os.stat(source)
        if limit is not None and st.st_size > limit:
            raise CantMigrate(f"holds the deleted file {path} ({st.st_size} bytes) {where}, "
                              f"more than --ghost-limit ({limit} bytes)", pid=pid)
        out[ghost_id] = Ghost(id=ghost_id, path=path, size=st.st_size, mode=st.st_mode)
    return list(out.values())


def _holders(pid: int, recs: list[Fd], vmas: list[Vma]):
    """(ghost id, path, a /proc path that opens it, where it is held) for every fd and
    mapping of a deleted file."""
    for r in recs:
        if r.type == "ghost":
            yield r.obj, r.path, f"/proc/{pid}/fd/{r.fd}", f"on fd {r.fd}"
    for v in vmas:
        if v.role == "ghost":
            yield v.ghost, v.path, memmap.map_file(pid, v.start, v.end), \
                f"mapped at {v.start:#x}"


def write_contents(w: ImageWriter, pid: int, ghosts: list[Ghost], recs: list[Fd],
                   vmas: list[Vma]) -> None:
    sources = {}
    for ghost_id, _, source, _ in _holders(pid, recs, vmas):
        sources.setdefault(ghost_id, source)
    for g in ghosts:
        if not g.size:
            continue
        fd = os.open(sources[g.id], os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != g.size:
                raise CantMigrate(f"the deleted file {g.path} changed size during the dump",
                                  pid=pid)
            w.pages(pid, fd, [(0, g.size)], target=target(g.id))
        finally:
            os.close(fd)


def make_all(s: Session, pid: int, img: Records, spare: int) -> dict[int, int]:
    """Every deleted file recreated, at fds from spare up, out of the way of the
    process's own: Ghost id -> fd. They are needed before the memory is mapped."""
    out = {}
    for g in img.of(Ghost):
        made = make(s, pid, g, img)
        out[g.id] = s.call(nr.fcntl, made, F_DUPFD_CLOEXEC, spare, what="fcntl(F_DUPFD)")
        s.call(nr.close, made, what="close")
    return out


def make(s: Session, pid: int, g: Ghost, img: Records) -> int:
    """The file again, unlinked, filled: its fd in the process (any number)."""
    where = os.path.dirname(g.path) or "/"
    s.write(s.scratch, os.fsencode(where) + b"\0")
    fd = s.raw(nr.openat, AT_FDCWD, s.scratch, O_TMPFILE | O_RDWR, g.mode & 0o7777)
    if fd in (-errno.EOPNOTSUPP, -errno.EISDIR, -errno.EINVAL):
        fd = _named_then_unlinked(s, where, g)
    if fd < 0:
        raise RestoreError(f"cannot recreate the deleted file {g.path} in {where}: "
                           f"{os.strerror(-fd)}")
    base = nat.buffer_address(img.data)
    with nat.borrowed_fd(pid, fd) as mine:
        for pd in img.pages:  # straight from the mapped image, by the C helper
            if pd.target == target(g.id):
                nat.fill_pages(pid, mine, pd.sources(base), pd.runs)
        if os.fstat(mine).st_size != g.size:
            os.ftruncate(mine, g.size)
    return fd


def _named_then_unlinked(s: Session, where: str, g: Ghost) -> int:
    name = os.path.join(where, f".upmig-ghost-{g.id}-{os.getpid()}")
    s.write(s.scratch, os.fsencode(name) + b"\0")
    fd = s.raw(nr.openat, AT_FDCWD, s.scratch, O_RDWR | O_CREAT | O_EXCL, g.mode & 0o7777)
    if fd >= 0:
        s.call(nr.unlink, s.scratch, what=f"unlink({name})")
    return fd


def reopen(s: Session, tmp: int, flags: int) -> int:
    """Another open file description of the recreated file, with these flags."""
    s.write(s.scratch, f"/proc/self/fd/{tmp}".encode() + b"\0")
    fd = s.raw(nr.openat, AT_FDCWD, s.scratch, flags, 0)
    if fd < 0:
        raise RestoreError(f"cannot reopen a recreated deleted file: {os.strerror(-fd)}")
    return fd
