"""The fd table: one record per fd, by kind (regular file, directory, character
device, a pipe inside the process, eventfd, epoll, or an fd inherited from
whoever runs `upmig resume`). Pipes and event descriptors have modules of their
own (upmig.fds); this one decides what each fd is and puts every
one back at its number."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from upmig import _native as nat
from upmig import _proc, fileid, ghosts, sharing
from upmig.errors import CantMigrate, RestoreError
from upmig.fds import evfds, inet, inotify, locks, unix
from upmig.fds import owner as fdowner
from upmig.fds import pipe as pipes
from upmig.image import Records
from upmig.inject import Session
from upmig.records import Fd, FileIdentity, Ghost, Pipe, Task
from upmig.syscalls import nr

O_CLOEXEC = 0o2000000
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC, O_PATH = 0o100, 0o200, 0o400, 0o1000, 0o10000000
O_TMPFILE = 0o20200000  # __O_TMPFILE | O_DIRECTORY
O_NONBLOCK, O_RDWR, O_DIRECTORY, O_NOFOLLOW = 0o4000, 0o2, 0o200000, 0o400000
# The kernel's VALID_OPEN_FLAGS (x86-64 values): openat2 refuses any other bit.
VALID_OPEN_FLAGS = (0o3 | O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | 0o2000 | O_NONBLOCK  # APPEND
                    | 0o4010000 | 0o20000 | 0o40000 | 0o100000  # O_SYNC, ASYNC, DIRECT, LARGEFILE
                    | O_DIRECTORY | O_NOFOLLOW | 0o1000000 | O_CLOEXEC | O_PATH  # NOATIME
                    | O_TMPFILE)
F_DUPFD, F_SETFD, F_SETFL = 0, 2, 4
# Devices with no state of their own: reopened by path on the target.
PLAIN_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
MOVABLE_ANON = {"[eventfd]": "eventfd", "[eventpoll]": "epoll", "[timerfd]": "timerfd",
                "[signalfd]": "signalfd", "inotify": "inotify"}
PATH_TYPES = {"file", "dir", "chardev", "ghost", "fifo"}
BY_PATH = {"file", "dir", "chardev", "fifo"}  # opened again by their path on resume
# Made anew rather than opened: their status flags are set by hand.
CREATED_TYPES = {"pipe", "eventfd", "epoll", "timerfd", "signalfd", "inotify", "unix",
                 "unix_pair",
                 "unix_listen", "inet", "tcp_listen", "tcp"}
ANON_KINDS = {  # what anon_inode fds are, for the refusal
    "[eventfd]": "an eventfd", "[eventpoll]": "an epoll instance", "[timerfd]": "a timerfd",
    "[signalfd]": "a signalfd", "inotify": "an inotify instance", "[io_uring]": "io_uring",
    "[userfaultfd]": "a userfaultfd", "[pidfd]": "a pidfd", "[fanotify]": "fanotify",
}


def _kernel_fs_devices() -> set[int]:
    """Devices of /proc and /sys: their files describe this machine and this pid."""
    out = set()
    for path in ("/proc", "/sys"):
        try:
            out.add(os.stat(path).st_dev)
        except OSError:
            pass
    return out


def _is_tty(st: os.stat_result) -> bool:
    major = os.major(st.st_rdev)
    return stat.S_ISCHR(st.st_mode) and (major in (4, 5) or 136 <= major <= 143)


@dataclass
class _Seen:
    """One fd as /proc shows it, before it is classified."""

    fd: int
    target: str
    st: os.stat_result | None
    info_text: str
    info: dict[str, str]


def _classify(pid: int, e: _Seen, pipe_ends: dict[int, set[str]]) -> tuple[str, str]:
    """(type, note) of an fd, or raise CantMigrate saying why it cannot move."""
    fd, target, st = e.fd, e.target, e.st
    stdio = fd <= 2
    if target.startswith("pipe:") and st is not None and \
            pipe_ends[fileid.object_id(st)] == {"r", "w"}:
        return "pipe", ""
    if st is not None and stat.S_ISFIFO(st.st_mode) and target.startswith("/"):
        if pipe_ends[fileid.object_id(st)] == {"r", "w"}:
            return "fifo", ""
        raise CantMigrate(f"holds the FIFO {target} on fd {fd} without its other end, "
                          "which is outside the process; this is not supported", pid=pid)
    if target.startswith(("pipe:", "socket:")) or (st is not None and _is_tty(st)):
        what = ("a pipe" if target.startswith("pipe:") else
                "a socket" if target.startswith("socket:") else f"the terminal {target}")
        if stdio:
            return "inherit", f"{what}, re-attached to upmig resume's own fd {fd}"
        hint = ("sockets are not supported yet" if target.startswith("socket:")
                else "its other end is outside the process, and only fds 0-2 can be "
                     "re-attached to the resuming side" if target.startswith("pipe:")
                else "only fds 0-2 can be re-attached to the resuming side")
        raise CantMigrate(f"holds {what} on fd {fd}; {hint}", pid=pid)
    if target.startswith("anon_inode:"):
        kind = target[len("anon_inode:"):]
        if kind in MOVABLE_ANON:
            return MOVABLE_ANON[kind], ""
        what = ANON_KINDS.get(kind, f"the kernel object {kind}")
        raise CantMigrate(f"holds {what} on fd {fd}, which is not supported yet", pid=pid)
    in_memory = ghosts.lives_in_memory(target) and st is not None and stat.S_ISREG(st.st_mode)
    if target.endswith(" (deleted)") or in_memory:
        if st is not None and stat.S_ISREG(st.st_mode):
            return "ghost", ""
        raise CantMigrate(f"holds the deleted {target[:-10]} on fd {fd}, which is not a "
                          "regular file and cannot be recreated", pid=pid)
    if st is None or not target.startswith("/"):
        raise CantMigrate(f"holds {target} on fd {fd}, which upmig cannot move", pid=pid)
    if st.st_dev in _kernel_fs_devices():
        raise CantMigrate(f"holds the kernel file {target} on fd {fd}; /proc and /sys "
                          "files cannot be reopened elsewhere", pid=pid)
    if stat.S_ISREG(st.st_mode):
        return "file", ""
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    if stat.S_ISCHR(st.st_mode) and target in PLAIN_DEVICES:
        return "chardev", ""
    raise CantMigrate(f"holds the device or special file {target} on fd {fd}, which is not "
                      "supported yet", pid=pid)


def _look(pid: int) -> list[_Seen]:
    out = []
    for fd in _proc.fd_numbers(pid):
        target = _proc.readlink(pid, f"fd/{fd}")
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            st = None
        text = _proc.read_text(pid, f"fdinfo/{fd}")
        out.append(_Seen(fd, target, st, text, _proc.parse_fdinfo(text)))
    return out


def capture(pid: int, tids: list[int], repairs: inet.Repairs | None = None,
            tree: sharing.TreeFds | None = None) -> tuple[list[Fd], list[Pipe]]:
    """The fd records, and the pipes they share. tids: the process's threads; tree:
    the descriptions of the whole tree, for what it shares with other processes."""
    seen = _look(pid)
    sockets = {e.st.st_ino for e in seen if e.target.startswith("socket:") and e.st}
    if sockets and _proc.readlink(pid, "ns/net") != os.readlink("/proc/self/ns/net"):
        raise CantMigrate("holds sockets in another network namespace, which is not "
                          "supported yet", pid=pid)
    diags = unix.diag() if sockets else {}
    inside = sockets | set(tree.socket_first) if tree else sockets  # the tree's sockets
    pipe_ends: dict[int, set[str]] = {}
    for e in seen:
        if e.st is not None and stat.S_ISFIFO(e.st.st_mode):  # pipes, and FIFOs by path
            pipe_ends.setdefault(fileid.object_id(e.st), set()).update(
                pipes.ends(int(e.info["flags"], 8)))
    if tree:  # a pipe's ends may be in other processes of the tree
        pipe_ends.update({obj: tree.pipe_ends[obj] for obj in pipe_ends
                          if obj in tree.pipe_ends})
    inodes = {e.fd: e.st.st_ino for e in seen if e.st is not None}
    locked: set[tuple] = set()  # the locks seen so far
    out = []
    by_inode: dict[tuple[int, int], list[Fd]] = {}
    for e in seen:
        e.target = _named_again(pid, e)
        d = diags.get(e.st.st_ino) if e.st is not None and e.target.startswith("socket:") \
            else None
        if d and not (e.fd <= 2 and d.peer and d.peer not in inside):
            (ftype, extra), note = unix.classify(pid, e.fd, d, inside, diags), ""
            if ftype == "unix_pair" and d.peer not in sockets:
                _peer_elsewhere(pid, tree, d, extra, diags)
        elif e.target.startswith("socket:") and e.fd > 2 and d is None:
            (ftype, extra), note = inet.capture(pid, e.fd, repairs), ""
        else:
            ftype, note = _classify(pid, e, pipe_ends)
            extra = {}
        flags = int(e.info["flags"], 8)
        path = e.target.removesuffix(" (deleted)") if ftype == "ghost" else e.target
        rec = Fd(fd=e.fd, type=ftype, path=path if ftype in PATH_TYPES else "",
                 flags=flags & ~O_CLOEXEC, cloexec=bool(flags & O_CLOEXEC),
                 pos=int(e.info["pos"]), note=note or (e.target if ftype not in PATH_TYPES
                                                       and ftype != "inherit" else ""))
        if ftype.startswith(("unix", "inet", "tcp")):
            rec.obj, rec.extra = e.st.st_ino, extra  # sock_diag names sockets by inode
        elif ftype == "ghost":
            rec.obj = fileid.object_id(e.st)
        elif ftype in ("pipe", "fifo"):
            rec.obj, rec.extra = fileid.object_id(e.st), {"end": pipes.end(flags)}
        elif ftype == "eventfd":
            rec.extra = evfds.eventfd_extra(e.info)
        elif ftype == "epoll":
            rec.extra = evfds.epoll_extra(pid, e.fd, e.info_text, inodes)
        elif ftype == "timerfd":
            rec.extra = evfds.timerfd_extra(e.info)
        elif ftype == "signalfd":
            rec.extra = evfds.signalfd_extra(e.info)
        elif ftype == "inotify":
            rec.extra = inotify.capture(pid, e.fd, e.info_text)
        if ftype != "inherit" and e.st is not None:
            _link_shared(pid, rec, by_inode.setdefault((e.st.st_dev, e.st.st_ino), []))
            rec.desc = tree.desc.get((pid, e.fd), 0) if tree else 0
        if "lock" in e.info:
            _add_locks(pid, rec, e, locked)
        if flags & fdowner.O_ASYNC and ftype != "inherit" and rec.shared_with < 0:
            fdowner.capture(pid, rec, set(tids) | tree.tids if tree else set(tids),
                            tree.pgids if tree else {os.getpgid(pid)})
        out.append(rec)
    _one_description_per_end(pid, out)
    unix.capture_queues(pid, out, diags)
    return out, pipes.capture(pid, out, tree)


def _named_again(pid: int, e: _Seen) -> str:
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


def _peer_elsewhere(pid: int, tree: sharing.TreeFds, d: unix.Diag, extra: dict,
                    diags: dict[int, unix.Diag]) -> None:
    """A socket pair whose other end another process of the tree holds. If this one
    makes the pair on resume (it is the first to hold either end), it carries what
    the other end needs: its description, queue and shutdown state."""
    me, first, _ = tree.socket_first[d.ino]
    if first != pid or tree.pair_maker(d.ino, d.peer) != me:
        return  # made by an earlier process; this end is taken from it
    _, holder, fd = tree.socket_first[d.peer]
    extra.update(peer_desc=tree.desc[(holder, fd)], peer_shutdown=diags[d.peer].shutdown,
                 peer_queued=unix.queued(holder, fd, extra["type"], diags[d.peer].rqueue))


def _add_locks(pid: int, rec: Fd, e: _Seen, locked: set[tuple]) -> None:
    """A POSIX lock is listed on every fd of its file, a flock or OFD lock on every fd
    of its open file description: each is kept once, on the first fd listing it."""
    if e.st is None or rec.type not in ("file", "ghost"):
        raise CantMigrate(f"holds a lock through fd {e.fd} on {e.target}, which is not a "
                          "regular file; this is not supported", pid=pid)
    for lock in locks.capture(pid, e.fd, e.info_text, e.target):
        owner = e.st.st_ino if lock[0] == "POSIX" else rec.shared_with if \
            rec.shared_with >= 0 else rec.fd
        key = (e.st.st_dev, e.st.st_ino, owner, *lock)
        if key not in locked:
            locked.add(key)
            rec.extra.setdefault("locks", []).append(lock)


def _one_description_per_end(pid: int, recs: list[Fd]) -> None:
    """A pipe end opened twice (through /proc/PID/fd) would be two descriptions."""
    firsts: set[tuple[int, str]] = set()
    for r in recs:
        if r.type == "pipe" and r.shared_with < 0:
            key = (r.obj, r.extra["end"])
            if key in firsts:
                raise CantMigrate(f"holds one end of a pipe through two open file "
                                  f"descriptions (fd {r.fd}); this is not supported yet",
                                  pid=pid)
            firsts.add(key)


def _link_shared(pid: int, rec: Fd, descriptions: list[Fd]) -> None:
    """Fds sharing one open file description (dup, fork) must share it again.
    descriptions: one fd per description of this inode, in the order kcmp gives them,
    so that a thousand opens of one file cost a binary search each, not a scan."""
    lo, hi = 0, len(descriptions)
    while lo < hi:
        mid = (lo + hi) // 2
        order = nat.kcmp_file_order(pid, descriptions[mid].fd, rec.fd)
        if order == 0:
            rec.shared_with = descriptions[mid].fd
            return
        if order == 1:  # descriptions[mid] sorts before rec's
            lo = mid + 1
        else:
            hi = mid
    descriptions.insert(lo, rec)


def by_path(recs: list[Fd]) -> list[Fd]:
    """The fds that resume opens by their path (the first fd of each description):
    their files' identity is recorded at dump and checked on resume (upmig.fileid)."""
    return [r for r in recs if r.type in BY_PATH and r.shared_with < 0]


def _open_flags(rec: Fd) -> int:
    """rec's flags but those that acted only at its open, and only those openat2 takes
    (with O_PATH: O_DIRECTORY and O_NOFOLLOW; any other bit is EINVAL)."""
    if rec.flags & O_PATH:
        return rec.flags & (O_PATH | O_DIRECTORY | O_NOFOLLOW)
    # A file made nameless with O_TMPFILE keeps that flag, O_DIRECTORY included: it
    # would make opening the recreated file fail with ENOTDIR.
    tmpfile = O_TMPFILE if rec.flags & O_TMPFILE == O_TMPFILE else 0
    return rec.flags & VALID_OPEN_FLAGS & ~(O_CREAT | O_EXCL | O_TRUNC | tmpfile) | O_NOCTTY


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
    who = img.one(Task).pid  # its PID in the image, for the messages
    ids: dict[int, FileIdentity] = {i.fd: i for i in img.of(FileIdentity)}
    ghost_by_id: dict[int, Ghost] = {g.id: g for g in img.of(Ghost)}

    def open_by_path(r: Fd, flags: int) -> int:
        return held.open(s, who, r.path, flags, ids.get(r.fd), f"fd {r.fd}", r.pos)

    pipe_recs: list[Pipe] = img.of(Pipe)
    fifo_fds: dict[int, int] = {}   # FIFO inode -> an fd holding both its ends meanwhile
    wanted = {r.fd for r in recs}
    spare = spare_fd(img) + len(ghost_fds)  # where a new fd can wait out of the way
    pipes_by_id = {p.id: p for p in pipe_recs}
    primary = {(r.obj, r.extra["end"]): r for r in recs
               if r.type == "pipe" and r.shared_with < 0}
    # Connections first: they share their local port with a listener, and a port
    # can be bound next to a listener's only before it listens.
    recs = sorted(recs, key=lambda r: r.type != "tcp")
    made: set[int] = set()  # pipes and socket pairs made so far
    sockets = {r.obj: r for r in recs if r.type == "unix_pair" and r.shared_with < 0}
    taken = {r.fd for r in recs if r.shared_with < 0 and r.desc in reg.made}
    for r in recs:
        if r.type == "inherit":
            continue
        if r.shared_with >= 0:  # a dup: one open file description with an earlier fd
            s.call(nr.dup3, r.shared_with, r.fd, O_CLOEXEC if r.cloexec else 0,
                   what=f"dup3({r.shared_with}, {r.fd})")
            continue
        if r.fd in taken:  # made by an earlier process of the tree: share it
            _place(s, reg.take(s, r.desc), r)
            continue
        if r.type == "unix_pair":
            if r.obj not in made:
                made |= {r.obj, r.extra["peer"]}
                _make_pair(s, pid, r, sockets.get(r.extra["peer"]), spare,
                           lambda desc, fd: reg.park(pid, inner, desc, fd))
            continue
        if r.type in ("unix", "unix_listen"):
            _place(s, unix.make_socket(s, r), r)
            continue
        if r.type in ("inet", "tcp_listen", "tcp"):
            _place(s, inet.make(s, pid, r), r)
            continue
        if r.type == "fifo":
            if r.obj not in fifo_fds:  # both ends held open (O_RDWR never blocks) and
                # filled while the fds are made
                made_fifo = open_by_path(r, O_RDWR | O_NONBLOCK)
                pipes.fill_fifo(s, pid, made_fifo, pipes_by_id.get(r.obj))
                fifo_fds[r.obj] = s.call(nr.fcntl, made_fifo, F_DUPFD, spare, what="fcntl")
                s.call(nr.close, made_fifo, what="close")
            src = open_by_path(r, _open_flags(r) | O_NONBLOCK)
            _place(s, src, r)
            s.call(nr.fcntl, r.fd, F_SETFL, r.flags & ~fdowner.O_ASYNC, what="fcntl(F_SETFL)")
            continue
        if r.type == "ghost":
            src = ghosts.reopen(s, who, ghost_by_id[r.obj], ghost_fds[r.obj], _open_flags(r))
            _place(s, src, r)
            if not r.flags & O_PATH:  # (an O_PATH fd has no offset)
                s.call(nr.lseek, r.fd, r.pos, 0, what=f"lseek(fd {r.fd})")
            continue
        if r.type == "pipe":
            if r.obj not in made:  # both ends at once, at their first fd
                made.add(r.obj)
                pipe = pipes_by_id[r.obj]
                ends = [primary.get((r.obj, e)) for e in "rw"]
                _make_pipe(s, pid, pipe, ends, spare, lambda e, fd, p=pipe:
                           reg.park(pid, inner, p.ends[e], fd))
            continue
        if r.type in evfds.TYPES:
            _place(s, evfds.create(s, r), r)
            continue
        src = open_by_path(r, _open_flags(r))
        _place(s, src, r)
        if r.pos and r.type != "chardev" and not r.flags & O_PATH:
            s.call(nr.lseek, r.fd, r.pos, 0, what=f"lseek(fd {r.fd})")
    for fd in fifo_fds.values():
        s.call(nr.close, fd, what="close")
    for fd in range(3):  # stdio the process had closed (before locks: closing drops them)
        if fd not in wanted:
            s.raw(nr.close, fd)
    for r in recs:  # for the later processes of the tree
        if r.shared_with < 0 and r.type != "inherit":
            reg.add(r.desc, inner, r.fd)
    for r in recs:  # the process's locks, once it is the only one they can belong to
        locks.take(s, r)
    for r in recs:  # signal-driven I/O last: no signal for the making of the others
        if "async" in r.extra:
            fdowner.restore(s, r)
    for r in recs:  # every fd an epoll instance watched is in place now
        if r.type == "epoll" and r.shared_with < 0 and r.fd not in taken:
            evfds.add_watches(s, r)
        if r.type == "inotify" and r.shared_with < 0 and r.fd not in taken:
            inotify.restore(s, pid, r)


def _make_pipe(s: Session, pid: int, pipe: Pipe, ends: list[Fd | None], spare: int,
               park) -> None:
    """A pipe whose ends go to ends' fds ([read, write]); an end this process does not
    hold (another process of the tree does) is parked above the fds: park(end, fd)."""
    rd, wr = pipes.create(s, pid, pipe)
    rd_rec, wr_rec = ends
    if rd_rec and wr_rec:
        _place_two(s, rd, rd_rec, wr, wr_rec, spare)
        return
    (keep, rec), (away, end) = ((rd, rd_rec), (wr, "w")) if rd_rec else ((wr, wr_rec), (rd, "r"))
    parked = s.call(nr.fcntl, away, F_DUPFD, spare, what="fcntl(F_DUPFD)")
    s.call(nr.close, away, what="close")
    park(end, parked)
    _place(s, keep, rec)


def _make_pair(s: Session, pid: int, r: Fd, peer: Fd | None, spare: int, park) -> None:
    """A socket pair, with what each end had queued to read. The peer's end is this
    process's (peer) or goes to a later process of the tree: parked above the fds
    under its description, park(desc, fd)."""
    a, b = unix.make_pair(s, r.extra["type"])
    if peer is not None:
        _place_two(s, a, r, b, peer, spare)
        _fill_pair(pid, r, b=peer.fd, b_queued=peer.extra["queued"],
                   b_shutdown=peer.extra["shutdown"])
        return
    if "peer_desc" not in r.extra:
        raise RestoreError(f"the image is inconsistent: fd {r.fd} of pid {pid} is a socket "
                           "pair whose other end is nowhere")
    away = s.call(nr.fcntl, b, F_DUPFD, spare, what="fcntl(F_DUPFD)")
    s.call(nr.close, b, what="close")
    _place(s, a, r)
    _fill_pair(pid, r, b=away, b_queued=r.extra["peer_queued"],
               b_shutdown=r.extra["peer_shutdown"])
    park(r.extra["peer_desc"], away)


def _fill_pair(pid: int, r: Fd, *, b: int, b_queued: list[bytes], b_shutdown: int) -> None:
    """Each end's queue sent in from the other, then each end's shutdown state."""
    kind = r.extra["type"]
    unix.fill(pid, r.fd, b, kind, b_queued)
    unix.fill(pid, b, r.fd, kind, r.extra["queued"])
    unix.shut(pid, r.fd, r.extra["shutdown"])
    unix.shut(pid, b, b_shutdown)


def _place_two(s: Session, a: int, a_rec: Fd, b: int, b_rec: Fd, spare: int) -> None:
    """Place two new fds (the ends of a pipe or a socket pair)."""
    if b == a_rec.fd:  # b sits where a goes: move it aside first
        moved = s.call(nr.fcntl, b, F_DUPFD, spare, what="fcntl(F_DUPFD)")
        s.call(nr.close, b, what="close")
        b = moved
    _place(s, a, a_rec)
    _place(s, b, b_rec)


def _place(s: Session, src: int, r: Fd) -> None:
    """Move a new fd to its number, with its close-on-exec and status flags."""
    cloexec = O_CLOEXEC if r.cloexec else 0
    if src != r.fd:
        s.call(nr.dup3, src, r.fd, cloexec, what=f"dup3({src}, {r.fd})")
        s.call(nr.close, src, what="close")
    elif cloexec:
        s.call(nr.fcntl, r.fd, F_SETFD, 1, what="fcntl(F_SETFD)")
    if r.type in CREATED_TYPES:  # O_ASYNC waits for its owner: see fdowner
        s.call(nr.fcntl, r.fd, F_SETFL, r.flags & ~fdowner.O_ASYNC,
               what=f"fcntl(fd {r.fd}, F_SETFL)")
