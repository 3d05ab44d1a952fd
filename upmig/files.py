"""The fd table: what each fd is, and every one back at its number.

What an fd can be is the business of its kind (upmig/fds/, listed in
upmig.fds.registry): this module asks the kinds which one an fd is (refusing, with
the reason, one no kind takes), links fds sharing one open file description, and
hands over what is common to every kind: file locks (fds.locks) and the O_ASYNC
owner (fds.owner). On resume it has each kind make its fds in the kind's phase,
then dups them, closes the stdio the process had closed, takes the locks, sets the
owners and lets the kinds finish (epoll and inotify watches)."""

from __future__ import annotations

import os
import stat

from upmig import _native as nat
from upmig import _proc, fileid, sharing
from upmig.errors import CantMigrate
from upmig.fds import inet, inherit, locks, owner, pipe, registry
from upmig.fds.base import ById, Rebuild, Scan, Seen
from upmig.fds.path import is_tty
from upmig.image import Records
from upmig.inject import Session
from upmig.records import Fd, FileIdentity, Pipe, Task
from upmig.syscalls import nr

ANON_KINDS = {  # what anon_inode fds are, for the refusal
    "[eventfd]": "an eventfd", "[eventpoll]": "an epoll instance", "[timerfd]": "a timerfd",
    "[signalfd]": "a signalfd", "inotify": "an inotify instance", "[io_uring]": "io_uring",
    "[userfaultfd]": "a userfaultfd", "[pidfd]": "a pidfd", "[fanotify]": "fanotify",
}


# ---- dump

def _look(pid: int) -> list[Seen]:
    out = []
    for fd in _proc.fd_numbers(pid):
        target = _proc.readlink(pid, f"fd/{fd}")
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            st = None
        text = _proc.read_text(pid, f"fdinfo/{fd}")
        out.append(Seen(fd, target, st, text, _proc.parse_fdinfo(text)))
    return out


def capture(pid: int, tids: list[int], repairs: inet.Repairs | None = None,
            tree: sharing.TreeFds | None = None) -> tuple[list[Fd], list[Pipe]]:
    """The fd records, and the pipes they share. tids: the process's threads; tree:
    the descriptions of the whole tree, for what it shares with other processes."""
    seen = _look(pid)
    scan = Scan(pid, seen, set(tids) | tree.tids if tree else set(tids),
                tree.pgids if tree else {os.getpgid(pid)}, repairs, tree)
    locked: set[tuple] = set()  # the locks seen so far
    by_inode: dict[tuple[int, int], list[Seen]] = {}
    out = []
    for e in seen:
        e.target = _named_again(pid, e)
        kind = registry.classify(e, scan)
        if kind is None:
            raise _refusal(pid, e)
        if kind.shares and e.st is not None:
            _link_shared(pid, e, by_inode.setdefault((e.st.st_dev, e.st.st_ino), []))
            e.desc = tree.desc.get((pid, e.fd), 0) if tree else 0
        rec = kind.capture(e, scan)
        if "lock" in e.info:
            locks.add(pid, rec, e, kind.lockable(rec), locked)
        if e.flags & os.O_ASYNC and kind.shares and rec.shared_with < 0:
            owner.capture(pid, rec, scan.tids, scan.pgids)
        out.append(rec)
    return out, pipe.buffers(pid, out, tree)


def _refusal(pid: int, e: Seen) -> CantMigrate:
    """Why no kind of fd takes e."""
    fd, target, st = e.fd, e.target, e.st
    if target.startswith(("pipe:", "socket:")) or (st is not None and is_tty(st)):
        what = inherit.outside(e)
        hint = ("sockets are not supported yet" if target.startswith("socket:")
                else "its other end is outside the process, and only fds 0-2 can be "
                     "re-attached to the resuming side" if target.startswith("pipe:")
                else "only fds 0-2 can be re-attached to the resuming side")
        return CantMigrate(f"holds {what} on fd {fd}; {hint}", pid=pid)
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:"):]
        what = ANON_KINDS.get(name, f"the kernel object {name}")
        return CantMigrate(f"holds {what} on fd {fd}, which is not supported yet", pid=pid)
    return CantMigrate(f"holds {target} on fd {fd}, which upmig cannot move", pid=pid)


def _named_again(pid: int, e: Seen) -> str:
    """The path of a file /proc calls deleted that still has a name: an O_TMPFILE file
    given one with linkat (/proc shows "DIR/#INODE (deleted)"), or a file unlinked
    under this name but linked under another. Copied as if deleted, it would come
    back as another file; found in the same directory, it is reopened there."""
    if not (e.target.endswith(" (deleted)") and e.st is not None and
            stat.S_ISREG(e.st.st_mode) and e.st.st_nlink > 0):
        return e.target
    where = os.path.dirname(e.target)
    try:
        with os.scandir(where) as entries:
            for entry in entries:
                if entry.inode() == e.st.st_ino and \
                        entry.stat(follow_symlinks=False).st_dev == e.st.st_dev:
                    return entry.path
    except OSError:
        pass
    raise CantMigrate(f"holds {e.target[:-10]} on fd {e.fd}, which has a name again outside "
                      f"{where} (a hard link, or an O_TMPFILE file given a name with linkat); "
                      "upmig cannot find it, and a copy would not be the same file", pid=pid)


def _link_shared(pid: int, e: Seen, descriptions: list[Seen]) -> None:
    """Fds sharing one open file description (dup, fork) must share it again.
    descriptions: one fd per description of this inode, in the order kcmp gives them,
    so that a thousand opens of one file cost a binary search each, not a scan."""
    lo, hi = 0, len(descriptions)
    while lo < hi:
        mid = (lo + hi) // 2
        order = nat.kcmp_file_order(pid, descriptions[mid].fd, e.fd)
        if order == 0:
            e.shared_with = descriptions[mid].fd
            return
        if order == 1:  # descriptions[mid] sorts before e's
            lo = mid + 1
        else:
            hi = mid
    descriptions.insert(lo, e)


def by_path(recs: list[Fd]) -> list[Fd]:
    """The fds that resume opens by their path (the first fd of each description):
    their files' identity is recorded at dump and checked on resume (upmig.fileid)."""
    return [r for r in recs if registry.handler(r).by_path and r.shared_with < 0]


# ---- resume

def spare_fd(img: Records) -> int:
    """A number above every fd of the process, where upmig's own can wait."""
    return max((r.fd for r in img.of(Fd)), default=2) + 1


def restore(s: Session, pid: int, img: Records, ghost_fds: dict[int, int],
            reg: sharing.Registry, inner: int, held: fileid.Held) -> None:
    """Put every fd at its number. Inherited fds are the stub's own 0-2 already.
    ghost_fds: the ghost files, recreated (upmig.ghosts.make_all; parked in reg).
    reg: the descriptions earlier processes of the tree made (taken, not made
    again), to which this one's are added; inner: the process's PID as it sees it;
    held: the files opened by path, checked already (each open is checked again)."""
    recs: list[Fd] = img.of(Fd)
    ctx = Rebuild(s, pid, inner, img.one(Task).pid, img, reg, held, ghost_fds,
                  spare_fd(img) + len(ghost_fds),
                  {i.fd: i for i in img.of(FileIdentity)}, ById(img))
    own = [r for r in recs if r.shared_with < 0 and not isinstance(r, inherit.InheritFd)]
    taken = {r.fd for r in own if r.desc in reg.made}
    for r in registry.in_restore_order(own):
        if r.fd in taken:  # made by an earlier process of the tree: share it
            ctx.place(reg.take(s, r.desc), r, status=registry.handler(r).created)
        else:
            registry.handler(r).restore(ctx, r)
    for r in recs:
        if r.shared_with >= 0:  # a dup: one open file description with an earlier fd
            s.call(nr.dup3, r.shared_with, r.fd, os.O_CLOEXEC if r.cloexec else 0,
                   what=f"dup3({r.shared_with}, {r.fd})")
    ctx.close_meanwhile()
    wanted = {r.fd for r in recs}
    for fd in range(3):  # stdio the process had closed (before locks: closing drops them)
        if fd not in wanted:
            s.raw(nr.close, fd)
    for r in own:  # for the later processes of the tree
        reg.add(r.desc, inner, r.fd)
    for r in recs:  # the process's locks, once it is the only one they can belong to
        locks.take(s, r)
    for r in recs:  # signal-driven I/O last: no signal for the making of the others
        if r.async_owner is not None:
            owner.restore(s, r)
    for r in own:  # every fd the kinds' finish() may refer to is in place now
        if r.fd not in taken:
            registry.handler(r).finish(ctx, r)
