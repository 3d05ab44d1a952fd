"""Unix sockets: connected pairs with both ends inside the process (with the data
queued in them), listening sockets on a path or in the abstract namespace, and
unconnected ones.

What the kernel knows of each (type, state, name, peer, queue lengths, backlog)
comes from sock_diag over netlink. Queued data is read with MSG_PEEK from a copy of
the socket in upmig, stepping through the queue with SO_PEEK_OFF, so nothing is
taken from the process. Resume makes each anew inside the process (socketpair,
or socket + bind + listen) and sends the queued data back in from the other end.

A pair is made whole in the first process of the tree holding either end; the end
a later process holds is parked above the fd table for it (upmig.sharing), and its
queue and shutdown state travel in the maker's record (peer_*)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from upmig import _native as nat
from upmig import _proc, schema
from upmig.errors import CantMigrate, RestoreError
from upmig.fds.base import Kind, Rebuild, Scan, Seen
from upmig.kconst import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_PEEK_OFF,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOCK_DIAG_BY_FAMILY,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    UDIAG_SHOW_NAME,
    UDIAG_SHOW_PEER,
    UDIAG_SHOW_RQLEN,
    UNIX_DIAG_NAME,
    UNIX_DIAG_PEER,
    UNIX_DIAG_RQLEN,
    UNIX_DIAG_SHUTDOWN,
)
from upmig.records import Fd
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.inject import Session

NLMSG = struct.Struct("<IHHII")
UNIX_DIAG_REQ = struct.Struct("<BBHIIIII")
UNIX_DIAG_MSG = struct.Struct("<BBBBIII")
RTATTR = struct.Struct("<HH")
TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
         socket.SOCK_SEQPACKET: "seqpacket"}


def _sun_name(v: Any) -> str | None:
    """A unix socket's name, hex: abstract (a leading NUL), a path, or unbound."""
    if type(v) is not str:
        return schema.wrong_type(v, "a hex string")
    try:
        name = bytes.fromhex(v)
    except ValueError:
        return f"{schema.shown(v)} is not hex"
    if len(name) > 108:
        return f"is {len(name)} bytes long, more than a sun_path holds (108)"
    if name[:1] != b"\0" and b"\0" in name.rstrip(b"\0"):
        return "is a path with a NUL in it"
    return None


SHUTDOWN = schema.integer(0, 3, "a shutdown state")
QUEUE = schema.list_of(schema.blob(0, 1 << 26), 1 << 20)


@dataclass(kw_only=True)
class UnixFd(Fd):
    """What every unix socket has."""

    checks: ClassVar[dict] = {"sock_type": schema.one_of(*TYPES.values()), "name": _sun_name}
    sock_type: str           # stream | dgram | seqpacket
    name: str                # hex; "": unbound; an abstract name starts with a NUL


@dataclass(kw_only=True)
class UnixSocketFd(UnixFd):
    """Neither listening nor connected (bound or not)."""

    kind: ClassVar[str] = "fd_unix"


@dataclass(kw_only=True)
class UnixListenerFd(UnixFd):
    """A listening unix socket."""

    kind: ClassVar[str] = "fd_unix_listen"
    checks: ClassVar[dict] = {**UnixFd.checks, "backlog": schema.BACKLOG}
    backlog: int


@dataclass(kw_only=True)
class UnixPairFd(UnixFd):
    """An end of a connected pair whose other end is in the tree."""

    kind: ClassVar[str] = "fd_unix_pair"
    checks: ClassVar[dict] = {**UnixFd.checks, "ino": schema.OBJECT, "peer": schema.OBJECT,
                              "shutdown": SHUTDOWN, "queued": QUEUE, "peer_desc": schema.DESC,
                              "peer_shutdown": SHUTDOWN, "peer_queued": QUEUE}
    ino: int                 # its inode (sock_diag's name for it)
    peer: int                # the other end's
    shutdown: int            # as sock_diag gives it (1: no more reading, 2: writing)
    queued: list[bytes]      # what waits to be read on it (a dup's is [])
    # The other end, when a later process of the tree holds it and this fd's process
    # makes the pair: its description, shutdown state and queue.
    peer_desc: int = 0
    peer_shutdown: int = 0
    peer_queued: list[bytes] = field(default_factory=list)


@dataclass
class Diag:
    """What sock_diag says of one unix socket."""

    ino: int
    type: int
    state: int
    name: bytes        # b"" unbound; abstract names start with a NUL
    peer: int          # peer's inode, 0 if none
    rqueue: int        # listening: pending connections; else bytes queued to read
    wqueue: int        # listening: the backlog
    shutdown: int


def diag() -> dict[int, Diag]:
    """Every unix socket of this network namespace, by inode."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       4) as nl:  # NETLINK_SOCK_DIAG
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                                 UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN, 0, 0)
        nl.send(NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        out: dict[int, Diag] = {}
        while True:
            buf = nl.recv(1 << 16)
            off = 0
            while off + NLMSG.size <= len(buf):
                length, kind, _, _, _ = NLMSG.unpack_from(buf, off)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code, = struct.unpack_from("<i", buf, off + NLMSG.size)
                    raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
                d = _parse(buf[off + NLMSG.size:off + length])
                out[d.ino] = d
                off += (length + 3) & ~3


def _parse(msg: bytes) -> Diag:
    _, stype, state, _, ino, _, _ = UNIX_DIAG_MSG.unpack_from(msg, 0)
    d = Diag(ino, stype, state, b"", 0, 0, 0, 0)
    off = UNIX_DIAG_MSG.size
    while off + RTATTR.size <= len(msg):
        alen, atype = RTATTR.unpack_from(msg, off)
        data = msg[off + RTATTR.size:off + alen]
        if atype == UNIX_DIAG_NAME:
            d.name = data
        elif atype == UNIX_DIAG_PEER:
            d.peer, = struct.unpack_from("<I", data)
        elif atype == UNIX_DIAG_RQLEN:
            d.rqueue, d.wqueue = struct.unpack_from("<II", data)
        elif atype == UNIX_DIAG_SHUTDOWN:
            d.shutdown = data[0]
        off += (alen + 3) & ~3
    return d


# ---- dump

def diags(scan: Scan) -> dict[int, Diag]:
    """sock_diag's view of every unix socket, once the process is seen to hold a
    socket (of any family) in upmig's network namespace."""
    def compute() -> dict[int, Diag]:
        if _proc.readlink(scan.pid, "ns/net") != os.readlink("/proc/self/ns/net"):
            raise CantMigrate("holds sockets in another network namespace, which is not "
                              "supported yet", pid=scan.pid)
        return diag()
    return scan.memo("unix.diags", compute)


def _sockets(scan: Scan) -> set[int]:
    """The process's own sockets, by inode."""
    return scan.memo("unix.sockets", lambda: {
        e.st.st_ino for e in scan.seen if e.target.startswith("socket:") and e.st})


def _inside(scan: Scan) -> set[int]:
    """The sockets of the tree (of the process, with no tree)."""
    return scan.memo("unix.inside", lambda: _sockets(scan) | set(scan.tree.socket_first)
                     if scan.tree else _sockets(scan))


class UnixKind(Kind):
    name = "unix"
    records = (UnixPairFd, UnixListenerFd, UnixSocketFd)

    def classify(self, e: Seen, scan: Scan) -> bool:
        """A unix socket, unless it is fds 0-2 connected outside (inherited)."""
        if not e.target.startswith("socket:") or e.st is None:
            return False
        d = diags(scan).get(e.st.st_ino)
        return d is not None and not (e.fd <= 2 and d.peer and d.peer not in _inside(scan))

    def capture(self, e: Seen, scan: Scan) -> UnixFd:
        d, pid = diags(scan)[e.st.st_ino], scan.pid
        kind = TYPES.get(d.type)
        if kind is None:
            raise CantMigrate(f"holds a unix socket of type {d.type} on fd {e.fd}, which is "
                              "not supported", pid=pid)
        common = {**e.common(e.target), "sock_type": kind, "name": d.name.hex()}
        if d.state == TCP_LISTEN:
            if d.rqueue:
                raise CantMigrate(f"has {d.rqueue} connection(s) waiting to be accepted on "
                                  f"its listening unix socket on fd {e.fd}; they would be "
                                  "lost", pid=pid)
            return UnixListenerFd(**common, backlog=d.wqueue)
        if d.peer:
            return self._pair(e, scan, d, common)
        if d.state == TCP_ESTABLISHED and kind != "dgram":
            raise CantMigrate(f"holds a unix socket on fd {e.fd} whose peer has gone; this is "
                              "not supported yet", pid=pid)
        if d.rqueue:
            raise CantMigrate(f"has datagrams waiting on its unix socket on fd {e.fd}, which "
                              "cannot be sent again from their senders", pid=pid)
        return UnixSocketFd(**common)

    def _pair(self, e: Seen, scan: Scan, d: Diag, common: dict) -> UnixPairFd:
        pid, everything = scan.pid, diags(scan)
        if d.peer not in _inside(scan):
            raise CantMigrate(f"holds a unix socket on fd {e.fd} connected to a process "
                              f"outside (peer socket {d.peer}); this is not supported", pid=pid)
        if everything[d.peer].peer != d.ino:
            raise CantMigrate(f"holds a datagram socket on fd {e.fd} connected one way to "
                              "another of its sockets; this is not supported yet", pid=pid)
        rec = UnixPairFd(**common, ino=d.ino, peer=d.peer, shutdown=d.shutdown, queued=[])
        if rec.shared_with < 0:  # what waits to be read on it, left in place
            rec.queued = queued(pid, e.fd, rec.sock_type, d.rqueue)
        if d.peer not in _sockets(scan):
            _peer_elsewhere(pid, scan.tree, d, rec, everything)
        return rec

    def restore(self, ctx: Rebuild, rec: UnixFd) -> None:
        if not isinstance(rec, UnixPairFd):
            ctx.place(make_socket(ctx.s, rec), rec)
        elif rec.ino not in ctx.made:
            ctx.made |= {rec.ino, rec.peer}
            ends = ctx.memo("unix.pairs", lambda: {
                r.ino: r for r in ctx.img.of(UnixPairFd) if r.shared_with < 0})
            _make_pair(ctx, rec, ends.get(rec.peer))

    def refers_to(self, rec: UnixFd) -> Any:
        return rec.ino if isinstance(rec, UnixPairFd) else rec.name

    def describe(self, rec: UnixFd, others) -> dict[str, Any]:
        out = {"type": "unix_pair" if isinstance(rec, UnixPairFd) else "unix_listen"
               if isinstance(rec, UnixListenerFd) else "unix", "path": rec.note,
               "socket": rec.sock_type}
        if isinstance(rec, UnixPairFd):
            return {**out, "queued": sum(len(m) for m in rec.queued)}
        return {**out, "name": _show(bytes.fromhex(rec.name)),
                **({"backlog": rec.backlog} if isinstance(rec, UnixListenerFd) else {})}


UNIX = UnixKind()


def _peer_elsewhere(pid: int, tree: Any, d: Diag, rec: UnixPairFd,
                    everything: dict[int, Diag]) -> None:
    """A socket pair whose other end another process of the tree holds. If this one
    makes the pair on resume (it is the first to hold either end), it carries what
    the other end needs: its description, queue and shutdown state."""
    me, first, _ = tree.socket_first[d.ino]
    if first != pid or tree.pair_maker(d.ino, d.peer) != me:
        return  # made by an earlier process; this end is taken from it
    _, holder, fd = tree.socket_first[d.peer]
    rec.peer_desc, rec.peer_shutdown = tree.desc[(holder, fd)], everything[d.peer].shutdown
    rec.peer_queued = queued(holder, fd, rec.sock_type, everything[d.peer].rqueue)


def queued(pid: int, fd: int, kind: str, expected: int) -> list[bytes]:
    """What waits to be read on the socket pid holds at fd, read with MSG_PEEK from a
    copy; expected: the byte count sock_diag gives (checked for stream sockets)."""
    with nat.borrowed_fd(pid, fd) as mine:
        got = _peek_all(pid, fd, kind, mine)
    if kind != "dgram" and sum(len(m) for m in got) != expected:
        raise CantMigrate(f"the unix socket on fd {fd} has {expected} bytes queued, but "
                          f"{sum(len(m) for m in got)} could be read", pid=pid)
    return got


def _peek_all(pid: int, fd_there: int, kind: str, fd: int) -> list[bytes]:
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        out = []
        try:
            while True:
                try:
                    data, anc, flags, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4),
                                                    socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return out
                if anc:
                    _close_passed(anc)
                    raise CantMigrate(f"has descriptors in flight (SCM_RIGHTS) on the unix "
                                      f"socket on fd {fd_there}; this is not supported",
                                      pid=pid)
                if flags & socket.MSG_TRUNC:
                    raise CantMigrate(f"has a message over 1 MiB queued on fd {fd_there}",
                                      pid=pid)
                if not data and kind != "dgram":
                    return out  # the peer has shut down: end of stream (seqpacket too)
                out.append(data)
        finally:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    finally:
        s.close()


def _close_passed(anc: list) -> None:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for fd in struct.unpack(f"<{len(data) // 4}i", data[:len(data) // 4 * 4]):
                os.close(fd)


# ---- resume

def _sockaddr(name: bytes) -> bytes:
    return struct.pack("<H", socket.AF_UNIX) + name


def make_pair(s: Session, kind: str) -> tuple[int, int]:
    s.call(nr.socketpair, socket.AF_UNIX, _sock_type(kind), 0, s.scratch, what="socketpair")
    a, b = struct.unpack("<ii", s.read(s.scratch, 8))
    return a, b


def _make_pair(ctx: Rebuild, r: UnixPairFd, peer: UnixPairFd | None) -> None:
    """A socket pair, with what each end had queued to read. The peer's end is this
    process's (peer) or goes to a later process of the tree: parked above the fds
    under its description."""
    a, b = make_pair(ctx.s, r.sock_type)
    if peer is not None:
        ctx.place_two(a, r, b, peer)
        _fill_pair(ctx.pid, r, b=peer.fd, b_queued=peer.queued, b_shutdown=peer.shutdown)
        return
    if not r.peer_desc:
        raise RestoreError(f"the image is inconsistent: fd {r.fd} of pid {ctx.who} is a "
                           "socket pair whose other end is nowhere")
    away = ctx.move_aside(b)
    ctx.place(a, r)
    _fill_pair(ctx.pid, r, b=away, b_queued=r.peer_queued, b_shutdown=r.peer_shutdown)
    ctx.park(r.peer_desc, away)


def _fill_pair(pid: int, r: UnixPairFd, *, b: int, b_queued: list[bytes],
               b_shutdown: int) -> None:
    """Each end's queue sent in from the other, then each end's shutdown state."""
    fill(pid, r.fd, b, r.sock_type, b_queued)
    fill(pid, b, r.fd, r.sock_type, r.queued)
    shut(pid, r.fd, r.shutdown)
    shut(pid, b, b_shutdown)


def fill(pid: int, sender: int, receiver: int, kind: str, queued: list[bytes]) -> None:
    """Send what the end at fd receiver had queued to read, from its peer at fd
    sender (both fds of pid)."""
    send = socket.socket(fileno=nat.copy_fd(pid, sender))
    recv = socket.socket(fileno=nat.copy_fd(pid, receiver))
    try:
        total = sum(len(m) for m in queued)
        if total:  # room for it all: the queue may have grown past the defaults
            send.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, total + len(queued) * 1024 + 65536)
            recv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, total + len(queued) * 1024 + 65536)
        try:
            for msg in queued:
                view = memoryview(msg)
                sent = send.send(view, socket.MSG_DONTWAIT)
                while kind == "stream" and sent < len(view):
                    view = view[sent:]
                    sent = send.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise RestoreError(f"the data queued on a unix socket ({total} bytes) does not "
                               "fit back in") from None
    finally:
        send.close()
        recv.close()


def shut(pid: int, fd: int, how: int) -> None:
    """An end's shutdown state (sock_diag's), once the data is through both ways."""
    if how:
        with socket.socket(fileno=nat.copy_fd(pid, fd)) as sk:
            sk.shutdown({1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}[how])


def make_socket(s: Session, r: UnixFd) -> int:
    """An unconnected or listening unix socket, bound to its name if it had one."""
    fd = s.call(nr.socket, socket.AF_UNIX, _sock_type(r.sock_type), 0, what="socket(AF_UNIX)")
    name = bytes.fromhex(r.name)
    if name:
        if not name.startswith(b"\0"):
            _clear_stale(s, os.fsdecode(name.rstrip(b"\0")))
        addr = _sockaddr(name)  # bound with the process's own rights (upmig.rights)
        s.write(s.scratch, addr)
        rc = s.raw(nr.bind, fd, s.scratch, len(addr))
        if rc < 0:
            raise RestoreError(f"cannot bind the unix socket of fd {r.fd} to "
                               f"{_show(name)}: {os.strerror(-rc)}")
    if isinstance(r, UnixListenerFd):
        s.call(nr.listen, fd, r.backlog, what=f"listen(fd {r.fd})")
    return fd


def _clear_stale(s: Session, path: str) -> None:
    """A socket file left by the dumped process (or a copy of it) is in the way of the
    bind; one that somebody still listens on is not ours to remove. The process
    removes it itself, with its own rights: the path is the image's."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        s.write(s.scratch, os.fsencode(path) + b"\0")
        rc = s.raw(nr.unlink, s.scratch)
        if rc < 0 and rc != -errno.ENOENT:
            raise RestoreError(f"cannot remove the stale unix socket {path}: "
                               f"{os.strerror(-rc)}") from None
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:  # a dgram socket: cannot tell; leave it
            return
    else:
        raise RestoreError(f"the unix socket {path} is in use by another process")
    finally:
        probe.close()


def _show(name: bytes) -> str:
    return "@" + name[1:].decode(errors="replace") if name.startswith(b"\0") else \
        name.decode(errors="replace")


def _sock_type(kind: str) -> int:
    return {v: k for k, v in TYPES.items()}[kind]
