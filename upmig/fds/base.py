"""What every kind of fd shares: the handler each kind provides (Kind), the fd as
/proc shows it at dump (Seen), what dump knows of the whole fd table (Scan), what
resume works with while it puts the table back (Rebuild), and the restore phases.

A kind's record is a dataclass deriving from upmig.records.Fd (the fields every fd
has: its number, status flags, offset, which fd it shares its open file description
with) with typed fields of its own, and a schema for them (`checks`). Its handler
says whether an fd is of its kind (classify), reads it (capture), makes it again in
the rebuilt process (restore, in its phase; finish, once every fd is in place) and
describes it for inspect (describe)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from upmig.records import Fd
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig import fileid, sharing
    from upmig.image import Records
    from upmig.inject import Session
    from upmig.records import FileIdentity

# Restore phases: a kind's fds are made in its phase, phase by phase, in fd order
# within one. Every fd is in place before any kind's finish() runs.
CONNECTIONS = 0  # TCP connections: bound next to their listener's port before it listens
OBJECTS = 1      # files, pipes, sockets, event fds: nothing of the table is needed first
WATCHERS = 2     # epoll and inotify instances, made after what they may watch


class Memo:
    """Facts a kind works out once for a whole fd table, not for every fd."""

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        memos = self.__dict__.setdefault("_memos", {})
        if key not in memos:
            memos[key] = compute()
        return memos[key]


# ---- dump

@dataclass
class Seen:
    """One fd as /proc shows it, before it is classified; shared_with and desc are
    worked out (upmig.files) before the kind captures it."""

    fd: int
    target: str                  # readlink of /proc/PID/fd/N
    st: os.stat_result | None
    info_text: str               # /proc/PID/fdinfo/N
    info: dict[str, str]
    shared_with: int = -1
    desc: int = 0

    @property
    def flags(self) -> int:
        return int(self.info["flags"], 8)

    def common(self, note: str = "") -> dict[str, Any]:
        """The fields of records.Fd, for a kind's record."""
        flags = self.flags
        return {"fd": self.fd, "flags": flags & ~os.O_CLOEXEC,
                "cloexec": bool(flags & os.O_CLOEXEC), "pos": int(self.info["pos"]),
                "shared_with": self.shared_with, "desc": self.desc, "note": note}


@dataclass
class Scan(Memo):
    """What dump knows of the process's fd table as a whole, for the kinds: the fds,
    the tree's descriptions (upmig.sharing), --tcp-established's repairs."""

    pid: int
    seen: list[Seen]
    tids: set[int]                     # the threads O_ASYNC may signal (the tree's)
    pgids: set[int]                    # and the process groups
    repairs: Any = None                # upmig.fds.inet.Repairs, or None
    tree: sharing.TreeFds | None = None


# ---- resume

class ById:
    """A process's records of a kind by id (Pipe, Ghost), for restore and describe:
    each kind indexed once, when first asked for."""

    def __init__(self, img: Records):
        self.img = img
        self._by: dict[type, dict[int, Any]] = {}

    def get(self, cls: type, key: int) -> Any:
        if cls not in self._by:
            self._by[cls] = {r.id: r for r in self.img.of(cls)}
        return self._by[cls].get(key)


@dataclass
class Rebuild(Memo):
    """One process's fd table being put back, in the stub that becomes it."""

    s: Session
    pid: int                        # as upmig sees it
    inner: int                      # as it sees itself
    who: int                        # its PID in the image, for the messages
    img: Records                    # its records
    reg: sharing.Registry           # descriptions the tree's processes made so far
    held: fileid.Held               # files held by path, checked already
    ghost_fds: dict[int, int]       # Ghost id -> the recreated file's fd (upmig.ghosts)
    spare: int                      # fds from here up are out of the table's way
    identities: dict[int, FileIdentity]
    by_id: ById                     # its Pipe and Ghost records
    made: set[Hashable] = field(default_factory=set)  # pipes, socket pairs made so far
    open_meanwhile: dict[Hashable, int] = field(default_factory=dict)  # closed at the end

    def place(self, src: int, rec: Fd, status: bool = True) -> None:
        """Move a new fd to its number, with its close-on-exec flag; and its status
        flags if status (a made fd: an opened one has them from its open). O_ASYNC
        waits for its owner (upmig.fds.owner)."""
        s, cloexec = self.s, os.O_CLOEXEC if rec.cloexec else 0
        if src != rec.fd:
            s.call(nr.dup3, src, rec.fd, cloexec, what=f"dup3({src}, {rec.fd})")
            s.call(nr.close, src, what="close")
        elif cloexec:
            s.call(nr.fcntl, rec.fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC, what="fcntl(F_SETFD)")
        if status:
            s.call(nr.fcntl, rec.fd, fcntl.F_SETFL, rec.flags & ~os.O_ASYNC,
                   what=f"fcntl(fd {rec.fd}, F_SETFL)")

    def place_two(self, a: int, a_rec: Fd, b: int, b_rec: Fd) -> None:
        """Place two new fds (the ends of a pipe or a socket pair)."""
        if b == a_rec.fd:  # b sits where a goes: move it aside first
            b = self.move_aside(b)
        self.place(a, a_rec)
        self.place(b, b_rec)

    def move_aside(self, fd: int) -> int:
        """fd moved above the table (from spare up): its new number."""
        moved = self.s.call(nr.fcntl, fd, fcntl.F_DUPFD, self.spare, what="fcntl(F_DUPFD)")
        self.s.call(nr.close, fd, what="close")
        return moved

    def park(self, desc: Hashable, fd: int) -> None:
        """fd (above the table) is for a later process of the tree, under desc."""
        self.reg.park(self.pid, self.inner, desc, fd)

    def open_by_path(self, rec: Fd, path: str, flags: int) -> int:
        """path opened in the process and checked against rec's identity record."""
        return self.held.open(self.s, self.who, path, flags, self.identities.get(rec.fd),
                              f"fd {rec.fd}", rec.pos)

    def close_meanwhile(self) -> None:
        for fd in self.open_meanwhile.values():
            self.s.call(nr.close, fd, what="close")
        self.open_meanwhile.clear()


# ---- the handler

class Kind:
    """The handler of one kind of fd. A subclass sets name, records (its record
    types), phase, and implements classify, capture, restore and describe."""

    name: ClassVar[str]
    records: ClassVar[tuple[type[Fd], ...]]
    phase: ClassVar[int] = OBJECTS
    shares: ClassVar[bool] = True  # its fds are open file descriptions of the tree's own
    created: ClassVar[bool] = True  # made anew, not opened: status flags set by hand
    by_path: ClassVar[bool] = False  # opened by path: the file's identity is checked

    def classify(self, e: Seen, scan: Scan) -> bool:
        """Whether e is of this kind. Kinds are asked in the registry's order; the
        first to say yes captures it (and may still refuse it, saying why)."""
        raise NotImplementedError

    def capture(self, e: Seen, scan: Scan) -> Fd:
        """e's record, or CantMigrate saying why it cannot move."""
        raise NotImplementedError

    def restore(self, ctx: Rebuild, rec: Fd) -> None:
        """Make rec's fd again and place it at its number (ctx.place)."""
        raise NotImplementedError

    def finish(self, ctx: Rebuild, rec: Fd) -> None:
        """Once every fd is in place, its locks taken and owners set: what refers to
        other fds (an epoll instance's watches). Not called for an fd taken from an
        earlier process of the tree, which did it."""

    def phase_of(self, cls: type[Fd]) -> int:
        """The phase its fds of record type cls are made in."""
        return self.phase

    def lockable(self, rec: Fd) -> bool:
        """Whether rec may hold file locks (it then has a locks field: fds.locks)."""
        return False

    def rule(self, rec: Fd) -> tuple[str, str] | None:
        """What involves several fields of rec: (field, why it is wrong), or None."""
        return None

    def refers_to(self, rec: Fd) -> Any:
        """What the fd is of (a path, a pipe, a socket): fds sharing one open file
        description must agree on it (upmig.validate)."""
        return None

    def describe(self, rec: Fd, others: ById) -> dict[str, Any]:
        """For inspect: its "type", its "path" (or what it is), then what it holds."""
        return {"type": self.name, "path": rec.note}


def anon_inode(e: Seen, name: str) -> bool:
    """Whether e is an anonymous inode of this name ("[eventfd]", "inotify")."""
    return e.target == f"anon_inode:{name}"
