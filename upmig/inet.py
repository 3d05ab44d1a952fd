"""IPv4 and IPv6 sockets that hold no connection: TCP listeners (with their backlog
and options), UDP sockets (bound, or connected to a peer), and sockets not yet
bound or connected. Established TCP connections are refused for now.

Dump looks at a copy of the socket in upmig (pidfd_getfd); resume makes the socket
again inside the process, sets its options, binds it to the same address and port,
and listens or connects as it did."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from upmig import _native as nat
from upmig.errors import CantMigrate, RestoreError
from upmig.inject import Session
from upmig.pipes import pidfd
from upmig.records import Fd
from upmig.syscalls import nr

SOL_SOCKET, SOL_TCP, SOL_IPV6 = 1, 6, 41
# (level, option) kept for every socket; the values are ints.
OPTIONS = {
    "SO_REUSEADDR": (SOL_SOCKET, socket.SO_REUSEADDR),
    "SO_REUSEPORT": (SOL_SOCKET, socket.SO_REUSEPORT),
    "SO_KEEPALIVE": (SOL_SOCKET, socket.SO_KEEPALIVE),
    "SO_BROADCAST": (SOL_SOCKET, socket.SO_BROADCAST),
}
TCP_OPTIONS = {"TCP_NODELAY": (SOL_TCP, socket.TCP_NODELAY)}
V6_OPTIONS = {"IPV6_V6ONLY": (SOL_IPV6, socket.IPV6_V6ONLY)}
TCP_INFO_BACKLOG = struct.Struct("<II")  # tcpi_unacked, tcpi_sacked of struct tcp_info
TCP_INFO_BACKLOG_AT = 24                 # for a listener: accept queue, and its backlog
SIOCINQ = 0x541B
KINDS = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


def capture(pid: int, fd: int) -> tuple[str, dict]:
    """(fd type, extra) of an inet socket, or CantMigrate saying why it cannot move."""
    with pidfd(pid) as pfd:
        s = socket.socket(fileno=nat.pidfd_getfd(pfd, fd, pid))
    try:
        return _describe(pid, fd, s)
    finally:
        s.close()  # our copy only: the process's socket is untouched


def _describe(pid: int, fd: int, s: socket.socket) -> tuple[str, dict]:
    kind = KINDS.get(s.type)
    if kind is None or s.proto not in (0, socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        raise CantMigrate(f"holds a socket (family {s.family}, type {s.type}, protocol "
                          f"{s.proto}) on fd {fd}, which is not supported yet", pid=pid)
    extra: dict = {"kind": kind, "family": int(s.family), "name": list(s.getsockname()),
                   "options": _options(s, kind)}
    try:
        extra["peer"] = list(s.getpeername())
    except OSError:
        extra["peer"] = None
    if kind == "tcp":
        if s.getsockopt(SOL_SOCKET, socket.SO_ACCEPTCONN):
            info = s.getsockopt(SOL_TCP, socket.TCP_INFO, 104)
            waiting, backlog = TCP_INFO_BACKLOG.unpack_from(info, TCP_INFO_BACKLOG_AT)
            if waiting:
                raise CantMigrate(f"has {waiting} connection(s) waiting to be accepted on "
                                  f"its TCP listener on fd {fd} ({show(extra['name'])}); "
                                  "they would be lost", pid=pid)
            extra["backlog"] = backlog
            return "tcp_listen", extra
        if extra["peer"] is not None:
            raise CantMigrate(f"has an established TCP connection on fd {fd} "
                              f"({show(extra['name'])} to {show(extra['peer'])}); this is "
                              "not supported yet", pid=pid)
        return "inet", extra
    queued = _inq(s)
    if queued:
        raise CantMigrate(f"has {queued} bytes of datagrams waiting on its UDP socket on fd "
                          f"{fd} ({show(extra['name'])}); they cannot be sent again from "
                          "their senders", pid=pid)
    return "inet", extra


def _inq(s: socket.socket) -> int:
    buf = fcntl.ioctl(s.fileno(), SIOCINQ, b"\0" * 4)
    return struct.unpack("<i", buf)[0]


def _options(s: socket.socket, kind: str) -> dict[str, int]:
    wanted = dict(OPTIONS)
    if kind == "tcp":
        wanted |= TCP_OPTIONS
    if s.family == socket.AF_INET6:
        wanted |= V6_OPTIONS
    return {name: s.getsockopt(level, opt) for name, (level, opt) in wanted.items()}


def show(addr: list | None) -> str:
    if not addr:
        return "nothing"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- resume

def _sockaddr(family: int, addr: list) -> bytes:
    if family == socket.AF_INET:
        return struct.pack("<H", family) + struct.pack(">H", addr[1]) + \
            ipaddress.IPv4Address(addr[0]).packed + b"\0" * 8
    host = addr[0].split("%")[0]
    return struct.pack("<H", family) + struct.pack(">HI", addr[1], addr[2]) + \
        ipaddress.IPv6Address(host).packed + struct.pack("<I", addr[3])


def make(s: Session, r: Fd) -> int:
    """The socket again inside the process: options, address, then listen or connect."""
    x = r.extra
    stype = socket.SOCK_STREAM if x["kind"] == "tcp" else socket.SOCK_DGRAM
    fd = s.call(nr.socket, x["family"], stype, 0, what="socket")
    options = dict(OPTIONS) | TCP_OPTIONS | V6_OPTIONS
    for name, value in x["options"].items():
        level, opt = options[name]
        s.write(s.scratch, struct.pack("<i", value))
        s.call(nr.setsockopt, fd, level, opt, s.scratch, 4, what=f"setsockopt({name})")
    if x["name"][1]:  # bound to a port
        _call_addr(s, nr.bind, fd, x["family"], x["name"], r, "bind to")
    if r.type == "tcp_listen":
        s.call(nr.listen, fd, x["backlog"], what=f"listen(fd {r.fd})")
    elif x["peer"] is not None:
        _call_addr(s, nr.connect, fd, x["family"], x["peer"], r, "connect to")
    return fd


def _call_addr(s: Session, call: int, fd: int, family: int, addr: list, r: Fd,
               what: str) -> None:
    raw = _sockaddr(family, addr)
    s.write(s.scratch, raw)
    rc = s.raw(call, fd, s.scratch, len(raw))
    if rc < 0:
        raise RestoreError(f"cannot {what} {show(addr)} for fd {r.fd}: {os.strerror(-rc)}")
