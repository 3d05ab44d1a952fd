"""Open file descriptions shared between the processes of a tree.

After fork, parent and child hold the same open file descriptions: one offset, one
set of status flags, one pipe end. Dump gives every description of the tree an id
(kcmp tells which fds are one description), the same in every process holding it.
Resume makes each description once, in the first process (in image order) that
holds it; every later holder takes a copy of that process's fd with pidfd_getfd,
from inside itself. A pipe is made whole in the first process holding either end;
an end only later processes hold is parked in it at a spare fd until they have
taken it, then closed.

An fd 0-2 that leads outside the tree (a pipe to whoever started the job, its
terminal) is re-attached to `upmig resume`'s own in every process that holds it."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Hashable
from dataclasses import dataclass, field

from upmig import _native as nat
from upmig import _proc, fileid
from upmig.errors import CantMigrate
from upmig.fds import pipe
from upmig.freeze import Frozen
from upmig.inject import Session
from upmig.syscalls import nr

# ---- dump

@dataclass
class _Held:
    """One fd of one process of the tree, and the object behind it."""

    pid: int
    fd: int
    obj: int      # fileid.object_id of what it refers to
    end: str      # for a pipe: "r" or "w"; a FIFO may be "rw"; else ""
    socket: int = 0  # for a socket: its inode (sock_diag's name for it)
    fifo: bool = False  # a FIFO by path (each open its own description, as is usual)


@dataclass
class TreeFds:
    """Every fd of the tree's processes, by open file description."""

    desc: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, fd) -> id
    pipe_ends: dict[int, set[str]] = field(default_factory=dict)  # pipe/FIFO -> ends held
    pipe_first: dict[int, int] = field(default_factory=dict)      # pipe -> first holder
    read_end: dict[int, tuple[int, int]] = field(default_factory=dict)  # pipe -> (pid, fd)
    end_desc: dict[tuple[int, str], int] = field(default_factory=dict)  # (pipe, end) -> id
    # socket inode -> (index of the first process holding it, that process, its fd)
    socket_first: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    tids: set[int] = field(default_factory=set)   # every thread of the tree
    pgids: set[int] = field(default_factory=set)  # every process group of the tree
    count: int = 0

    def pair_maker(self, ino: int, peer: int) -> int:
        """The index of the process that makes a socket pair on resume: the first
        holding either end."""
        return min(self.socket_first[ino][0], self.socket_first[peer][0])

    def ends_of(self, obj: int) -> dict[str, int]:
        return {e: self.end_desc[(obj, e)] for e in "rw" if (obj, e) in self.end_desc}


def scan(members: list[Frozen]) -> TreeFds:
    """Read every process's fd table (all are frozen) and name its descriptions."""
    tree = TreeFds()
    # Per object, one holder of each of its descriptions, in kcmp's order: a thousand
    # opens of one file cost a binary search each, not a scan.
    by_obj: dict[int, list[tuple[_Held, int]]] = {}
    for index, m in enumerate(members):
        tree.tids.update(m.tids)
        tree.pgids.add(os.getpgid(m.pid))
        for h in _fds(m.pid):
            if h.socket:
                tree.socket_first.setdefault(h.socket, (index, h.pid, h.fd))
            known = by_obj.setdefault(h.obj, [])
            i, same = _search(h, known)
            if same:
                found = known[i][1]
            else:
                tree.count += 1
                found = tree.count
                known.insert(i, (h, found))
            tree.desc[(h.pid, h.fd)] = found
            if h.end:  # a pipe, or a FIFO (opened read-write, it holds both ends)
                tree.pipe_ends.setdefault(h.obj, set()).update(h.end)
                tree.pipe_first.setdefault(h.obj, h.pid)
                if "r" in h.end:
                    tree.read_end.setdefault(h.obj, (h.pid, h.fd))
                if not h.fifo and tree.end_desc.setdefault((h.obj, h.end), found) != found:
                    raise CantMigrate(f"holds one end of a pipe through two open file "
                                      f"descriptions (fd {h.fd}); this is not supported "
                                      "yet", pid=h.pid)
    return tree


def _fds(pid: int) -> list[_Held]:
    out = []
    for fd in _proc.fd_numbers(pid):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            target = _proc.readlink(pid, f"fd/{fd}")
        except OSError:
            continue  # what cannot be stat'ed is refused, with its reason, by files
        end, fifo = "", stat.S_ISFIFO(st.st_mode) and target.startswith("/")
        if stat.S_ISFIFO(st.st_mode):
            info = _proc.parse_fdinfo(_proc.read_text(pid, f"fdinfo/{fd}"))
            end = "".join(sorted(pipe.ends(int(info["flags"], 8))))
        out.append(_Held(pid, fd, fileid.object_id(st), end,
                         st.st_ino if target.startswith("socket:") else 0, fifo))
    return out


def _search(h: _Held, known: list[tuple[_Held, int]]) -> tuple[int, bool]:
    """Where h's description is in known (True), or would go (False)."""
    lo, hi = 0, len(known)
    while lo < hi:
        mid = (lo + hi) // 2
        k = known[mid][0]
        order = nat.kcmp_file_order(k.pid, k.fd, h.fd, h.pid)
        if order == 0:
            return mid, True
        if order == 1:  # known[mid] sorts before h's
            lo = mid + 1
        else:
            hi = mid
    return lo, False


# ---- resume

class Registry:
    """The descriptions made so far on resume, and the pipe ends parked for others."""

    def __init__(self) -> None:
        # A description's id (or an upmig.ghosts key) -> (holder's own PID, its fd).
        self.made: dict[Hashable, tuple[int, int]] = {}
        self.parked: dict[int, list[int]] = {}       # holder as we see it -> fds
        self.seals: dict[int, list[tuple[int, int]]] = {}  # holder -> (fd, memfd seals)
        # Named files made (POSIX shm), with their object ids: removed if resume fails.
        self.files: list[tuple[str, int]] = []

    def remove_files(self) -> None:
        """Resume failed: the named files it made go; a path that names another file
        now (the process's owner may have changed it meanwhile) is left alone."""
        for path, obj in self.files:
            try:
                if fileid.object_id(os.lstat(path)) == obj:
                    os.unlink(path)
            except OSError:
                pass
        self.files.clear()

    def add(self, desc: Hashable, inner: int, fd: int) -> None:
        if desc:
            self.made.setdefault(desc, (inner, fd))

    def park(self, outer: int, inner: int, desc: Hashable, fd: int) -> None:
        self.parked.setdefault(outer, []).append(fd)
        self.add(desc, inner, fd)

    def seal_later(self, outer: int, desc: Hashable, seals: int) -> None:
        """Seals for a memfd once every process has mapped it (parked by then)."""
        self.seals.setdefault(outer, []).append((self.made[desc][1], seals))

    def take(self, s: Session, desc: Hashable) -> int:
        """A copy, in the process s drives, of the description made earlier: an fd
        at whatever number the kernel gives (close-on-exec)."""
        holder, fd = self.made[desc]
        pidfd = s.call(nr.pidfd_open, holder, 0, what=f"pidfd_open({holder})")
        try:
            return s.call(nr.pidfd_getfd, pidfd, fd, 0, what=f"pidfd_getfd({holder}, {fd})")
        finally:
            s.raw(nr.close, pidfd)

    def close_parked(self, outer: int, gadget: int) -> set[int]:
        """Seal a process's memfds and close its parked fds, its registers and mask
        already final; the signals that arrived meanwhile, to be sent again."""
        fds, seals = self.parked.pop(outer, []), self.seals.pop(outer, [])
        if not fds:
            return set()
        regs, mask = nat.get_regs(outer), nat.get_sigmask(outer)
        nat.set_sigmask(outer, (1 << 64) - 1)
        try:
            inj = nat.Injector(outer, regs, gadget)
            for fd, bits in seals:
                inj.call(nr.fcntl, fd, fcntl.F_ADD_SEALS, bits,
                         what=f"fcntl(F_ADD_SEALS, {bits:#x})")
            for fd in fds:
                inj.call(nr.close, fd, what=f"close(parked fd {fd})")
        finally:
            nat.set_regs(outer, regs)
            nat.set_sigmask(outer, mask)
        return inj.held_signals
