"""IPv4 and IPv6 sockets: TCP listeners (with their backlog and options), UDP
sockets (bound, or connected to a peer), sockets not yet bound or connected, and,
with --tcp-established, established TCP connections.

Dump looks at a copy of the socket in upmig (pidfd_getfd); resume makes the socket
again inside the process, then works on a copy of it from upmig: options, address,
then listen or connect as it did.

An established connection is put in TCP repair mode at dump time, so that from
then on it sends nothing: the process is killed and the connection closes without
a FIN or RST reaching the peer (or, if the process runs on, repair is turned off
again). Its sequence numbers, both queues, window and negotiated options are read
out; resume builds a socket in repair mode, sets them, "connects" it (no handshake
in repair mode) and turns repair off: the peer notices nothing."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from upmig import _native as nat
from upmig import schema
from upmig.errors import CantMigrate, RestoreError
from upmig.fds import unix
from upmig.fds.base import CONNECTIONS, Kind, Rebuild, Scan, Seen
from upmig.kconst import (
    SIOCINQ,
    SIOCOUTQ,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR,
    TCP_REPAIR_OPTIONS,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    TCP_SEND_QUEUE,
    TCP_TIMESTAMP,
    TCPI_OPT_SACK,
    TCPI_OPT_TIMESTAMPS,
    TCPI_OPT_WSCALE,
    TCPOPT_MAXSEG,
    TCPOPT_SACK_PERMITTED,
    TCPOPT_TIMESTAMP,
    TCPOPT_WINDOW,
)
from upmig.records import Fd
from upmig.syscalls import nr

if TYPE_CHECKING:
    from upmig.inject import Session

# (level, option) kept for every socket; the values are ints.
OPTIONS = {
    "SO_REUSEADDR": (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    "SO_REUSEPORT": (socket.SOL_SOCKET, socket.SO_REUSEPORT),
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "SO_BROADCAST": (socket.SOL_SOCKET, socket.SO_BROADCAST),
}
TCP_OPTIONS = {"TCP_NODELAY": (socket.SOL_TCP, socket.TCP_NODELAY)}
V6_OPTIONS = {"IPV6_V6ONLY": (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)}
TCP_INFO_BACKLOG = struct.Struct("<II")  # tcpi_unacked, tcpi_sacked of struct tcp_info
TCP_INFO_BACKLOG_AT = 24                 # for a listener: accept queue, and its backlog
TCP_STATES = {2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              8: "CLOSE_WAIT", 9: "LAST_ACK", 11: "CLOSING"}
REPAIR_WINDOW = struct.Struct("<5I")  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
KINDS = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}
ALL_OPTIONS = OPTIONS | TCP_OPTIONS | V6_OPTIONS
PORT = schema.integer(0, 65535, "a port")


def _sockaddr(v: Any) -> str | None:
    """[host, port] (IPv4) or [host, port, flowinfo, scope_id] (IPv6)."""
    if type(v) is not list or len(v) not in (2, 4):
        return schema.wrong_type(v, "an address ([host, port] or [host, port, flow, scope])")
    if type(v[0]) is not str:
        return "[0] " + schema.wrong_type(v[0], "an IP address")
    try:
        ipaddress.ip_address(v[0].split("%")[0])
    except ValueError:
        return f"[0] {schema.shown(v[0])} is not an IP address"
    for i, check in ((1, PORT), (2, schema.UINT32), (3, schema.UINT32))[:len(v) - 1]:
        why = check(v[i])
        if why:
            return f"[{i}] {why}"
    return None


@dataclass(kw_only=True)
class InetFd(Fd):
    """What every IPv4 or IPv6 socket has."""

    checks: ClassVar[dict] = {
        "protocol": schema.one_of(*KINDS.values()), "family": schema.one_of(2, 10),
        "name": _sockaddr, "peer": schema.optional(_sockaddr),
        "options": schema.dict_of(schema.one_of(*ALL_OPTIONS), schema.INT32, len(ALL_OPTIONS))}
    protocol: str            # tcp | udp
    family: int              # AF_INET | AF_INET6
    name: list               # its address (see _sockaddr)
    peer: list | None        # the address it is connected to
    options: dict[str, int]  # of OPTIONS, TCP_OPTIONS, V6_OPTIONS


@dataclass(kw_only=True)
class InetSocketFd(InetFd):
    """UDP (bound, or connected), or TCP neither listening nor connected."""

    kind: ClassVar[str] = "fd_inet"


@dataclass(kw_only=True)
class TcpListenerFd(InetFd):
    """A listening TCP socket."""

    kind: ClassVar[str] = "fd_tcp_listen"
    checks: ClassVar[dict] = {**InetFd.checks, "backlog": schema.BACKLOG}
    backlog: int


@dataclass(kw_only=True)
class TcpFd(InetFd):
    """An established connection, taken in repair mode (--tcp-established)."""

    kind: ClassVar[str] = "fd_tcp"
    checks: ClassVar[dict] = {
        **InetFd.checks, "recv_seq": schema.UINT32, "send_seq": schema.UINT32,
        "recv_queue": schema.blob(0, 1 << 26), "send_queue": schema.blob(0, 1 << 26),
        "mss": schema.UINT32, "tcpi_options": schema.integer(0, 255),
        "snd_wscale": schema.integer(0, 14), "rcv_wscale": schema.integer(0, 14),
        "timestamp": schema.UINT32, "window": schema.row(*[schema.UINT32] * 5)}
    recv_seq: int
    send_seq: int
    recv_queue: bytes
    send_queue: bytes
    mss: int
    tcpi_options: int
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: list[int]        # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup


NAMES = {InetSocketFd: "inet", TcpListenerFd: "tcp_listen", TcpFd: "tcp"}


class InetKind(Kind):
    name = "inet"
    records = (TcpFd, TcpListenerFd, InetSocketFd)

    def classify(self, e: Seen, scan: Scan) -> bool:
        """A socket sock_diag does not know as a unix one, but fds 0-2 (inherited)."""
        return e.target.startswith("socket:") and e.fd > 2 and \
            (e.st is None or e.st.st_ino not in unix.diags(scan))

    def capture(self, e: Seen, scan: Scan) -> InetFd:
        cls, fields = capture(scan.pid, e.fd, scan.repairs)
        return cls(**e.common(e.target), **fields)

    def phase_of(self, cls: type) -> int:
        return CONNECTIONS if cls is TcpFd else self.phase

    def restore(self, ctx: Rebuild, rec: InetFd) -> None:
        ctx.place(make(ctx.s, ctx.pid, rec), rec)

    def rule(self, rec: InetFd) -> tuple[str, str] | None:
        """Its addresses are of its family, its protocol of its record kind."""
        if not isinstance(rec, InetSocketFd) and rec.protocol != "tcp":
            return "protocol", f"{rec.protocol!r} is not 'tcp' for a {NAMES[type(rec)]} fd"
        if "SO_REUSEADDR" not in rec.options:
            return "options", "lacks 'SO_REUSEADDR'"
        version, size = (4, 2) if rec.family == 2 else (6, 4)
        for key in ("name", "peer"):
            addr = getattr(rec, key)
            if addr is not None and (len(addr) != size or ipaddress.ip_address(
                    addr[0].split("%")[0]).version != version):
                return key, f"is not an IPv{version} address"
        if isinstance(rec, TcpFd) and rec.peer is None:
            return "peer", "is missing: a connection has one"
        return None

    def refers_to(self, rec: InetFd) -> Any:
        return rec.name

    def describe(self, rec: InetFd, others) -> dict[str, Any]:
        return {"type": NAMES[type(rec)], "path": rec.note, "socket": rec.protocol,
                "name": show(rec.name), **({"peer": show(rec.peer)} if rec.peer else {}),
                **({"backlog": rec.backlog} if isinstance(rec, TcpListenerFd) else {}),
                **({"recv_queue": len(rec.recv_queue), "send_queue": len(rec.send_queue)}
                   if isinstance(rec, TcpFd) else {})}


INET = InetKind()


class Repairs:
    """Established connections put in repair mode by a dump, held by upmig until the
    process is released: killed, they close silently; running on, repair goes off."""

    def __init__(self) -> None:
        self.socks: list[tuple[socket.socket, int, int, str]] = []  # sock, reuse, rcv_nxt

    def add(self, s: socket.socket, reuse: int) -> None:
        """Put s in repair mode (from now on it sends nothing) and keep it."""
        s.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1)
        self.socks.append((s, reuse, 0, ""))

    def check_unchanged(self, pid: int) -> None:
        """A connection in repair mode still takes in (and acknowledges) what its peer
        sends: bytes that came after its queue was read would be lost. Without a
        network lock, refuse rather than lose them."""
        for s, _, seen, where in self.socks:
            s.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            if s.getsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF != seen:
                raise CantMigrate(f"received data on its TCP connection {where} while it "
                                  "was being dumped; try again when it is quieter", pid=pid)

    def release(self, killed: bool) -> None:
        for s, reuse, _, _ in self.socks:
            try:
                if not killed:  # repair off resets SO_REUSEADDR: put it back after
                    s.setsockopt(socket.SOL_TCP, TCP_REPAIR, 0)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
            except OSError:
                pass  # the others must still be let go
            finally:
                s.close()
        self.socks = []


def capture(pid: int, fd: int, repairs: Repairs | None) -> tuple[type[InetFd], dict]:
    """(record type, its own fields) of an inet socket, or CantMigrate saying why it
    cannot move. An established TCP connection is taken only with repairs
    (--tcp-established)."""
    s = socket.socket(fileno=nat.copy_fd(pid, fd))
    try:
        ftype, extra = _describe(pid, fd, s, repairs is not None)
        if ftype is TcpFd and repairs is not None:
            repairs.add(s, extra["options"]["SO_REUSEADDR"])
            s, sock = None, s
            extra |= _repair_state(pid, fd, sock)
            repairs.socks[-1] = (sock, extra["options"]["SO_REUSEADDR"], extra["recv_seq"],
                                 f"on fd {fd} ({show(extra['name'])} to "
                                 f"{show(extra['peer'])})")
        return ftype, extra
    finally:
        if s is not None:
            s.close()  # our copy only: the process's socket is untouched


def _repair_state(pid: int, fd: int, s: socket.socket) -> dict:
    """Sequence numbers, queues, window and options of a connection in repair mode."""
    out: dict = {}
    for name, queue, ioctl in (("recv", TCP_RECV_QUEUE, SIOCINQ), ("send", TCP_SEND_QUEUE,
                                                                    SIOCOUTQ)):
        s.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, queue)
        seq = s.getsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        size = struct.unpack("<i", fcntl.ioctl(s.fileno(), ioctl, b"\0" * 4))[0]
        data = b""
        if size:  # a peek always starts at the queue's head: one call takes it all
            try:
                data = s.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        if len(data) != size:
            raise CantMigrate(f"the {name} queue of the TCP connection on fd {fd} holds "
                              f"{size} bytes, {len(data)} could be read", pid=pid)
        out[f"{name}_seq"], out[f"{name}_queue"] = seq, data
    info = s.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 104)
    options, wscale = info[5], info[6]
    mss, = struct.unpack_from("<I", info, 16)
    out["mss"], out["tcpi_options"] = mss, options
    out["snd_wscale"], out["rcv_wscale"] = wscale & 0xF, wscale >> 4
    out["timestamp"] = s.getsockopt(socket.SOL_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
    out["window"] = list(REPAIR_WINDOW.unpack(
        s.getsockopt(socket.SOL_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.size)))
    return out


def _describe(pid: int, fd: int, s: socket.socket, established: bool
              ) -> tuple[type[InetFd], dict]:
    kind = KINDS.get(s.type)
    if kind is None or s.proto not in (0, socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        raise CantMigrate(f"holds a socket (family {s.family}, type {s.type}, protocol "
                          f"{s.proto}) on fd {fd}, which is not supported yet", pid=pid)
    extra: dict = {"protocol": kind, "family": int(s.family), "name": list(s.getsockname()),
                   "options": _options(s, kind)}
    try:
        extra["peer"] = list(s.getpeername())
    except OSError:
        extra["peer"] = None
    if kind == "tcp":
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            info = s.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 104)
            waiting, backlog = TCP_INFO_BACKLOG.unpack_from(info, TCP_INFO_BACKLOG_AT)
            if waiting:
                raise CantMigrate(f"has {waiting} connection(s) waiting to be accepted on "
                                  f"its TCP listener on fd {fd} ({show(extra['name'])}); "
                                  "they would be lost", pid=pid)
            extra["backlog"] = backlog
            return TcpListenerFd, extra
        state = s.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 104)[0]
        if state not in (TCP_ESTABLISHED, TCP_CLOSE):
            raise CantMigrate(f"has a TCP socket on fd {fd} ({show(extra['name'])}) in state "
                              f"{TCP_STATES.get(state, state)}; only established connections "
                              "can move", pid=pid)
        if extra["peer"] is not None:
            if not established:
                raise CantMigrate(f"has an established TCP connection on fd {fd} "
                                  f"({show(extra['name'])} to {show(extra['peer'])}); dump "
                                  "with --tcp-established to take it along", pid=pid)
            return TcpFd, extra
        return InetSocketFd, extra
    queued = _inq(s)
    if queued:
        raise CantMigrate(f"has {queued} bytes of datagrams waiting on its UDP socket on fd "
                          f"{fd} ({show(extra['name'])}); they cannot be sent again from "
                          "their senders", pid=pid)
    return InetSocketFd, extra


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


def make(s: Session, pid: int, r: InetFd) -> int:
    """The socket again inside the process: options, address, then listen or connect."""
    stype = socket.SOCK_STREAM if r.protocol == "tcp" else socket.SOCK_DGRAM
    fd = s.call(nr.socket, r.family, stype, 0, what="socket")
    if isinstance(r, TcpFd):
        with socket.socket(fileno=nat.copy_fd(pid, fd)) as mine:
            _rebuild_connection(mine, r)
        return fd
    for name, value in r.options.items():
        _set_int(s, fd, *ALL_OPTIONS[name], value)
    if r.name[1]:  # bound to a port, which its rebuilt connections may share
        _set_int(s, fd, *OPTIONS["SO_REUSEADDR"], 1)
        _call_addr(s, nr.bind, fd, r.family, r.name, r, "bind to")
        _set_int(s, fd, *OPTIONS["SO_REUSEADDR"], r.options["SO_REUSEADDR"])
    if isinstance(r, TcpListenerFd):
        s.call(nr.listen, fd, r.backlog, what=f"listen(fd {r.fd})")
    elif r.peer is not None:
        _call_addr(s, nr.connect, fd, r.family, r.peer, r, "connect to")
    return fd


def _set_int(s: Session, fd: int, level: int, opt: int, value: int) -> None:
    s.write(s.scratch, struct.pack("<i", value))
    s.call(nr.setsockopt, fd, level, opt, s.scratch, 4, what=f"setsockopt({level}, {opt})")


def _call_addr(s: Session, call: int, fd: int, family: int, addr: list, r: InetFd,
               what: str) -> None:
    raw = _sockaddr(family, addr)
    s.write(s.scratch, raw)
    rc = s.raw(call, fd, s.scratch, len(raw))
    if rc < 0:
        raise RestoreError(f"cannot {what} {show(addr)} for fd {r.fd}: {os.strerror(-rc)}")


def _rebuild_connection(s: socket.socket, r: TcpFd) -> None:
    """An established connection, rebuilt in repair mode from what dump read out."""
    s.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1)  # which also lets it share its listener's port
    if "IPV6_V6ONLY" in r.options:  # only before bind
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, r.options["IPV6_V6ONLY"])
    for queue, name in ((TCP_RECV_QUEUE, "recv"), (TCP_SEND_QUEUE, "send")):
        s.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, queue)
        start = (getattr(r, f"{name}_seq") - len(getattr(r, f"{name}_queue"))) & 0xFFFFFFFF
        s.setsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ, struct.pack("<I", start))
    try:
        s.bind(tuple(r.name))
        s.connect(tuple(r.peer))  # no handshake in repair mode
    except OSError as e:
        raise RestoreError(f"cannot rebuild the TCP connection of fd {r.fd} "
                           f"({show(r.name)} to {show(r.peer)}): {e.strerror}") from None
    opts = [(TCPOPT_MAXSEG, r.mss)]
    if r.tcpi_options & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, r.snd_wscale | r.rcv_wscale << 16))
    if r.tcpi_options & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERMITTED, 0))
    if r.tcpi_options & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    s.setsockopt(socket.SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("<II", *o) for o in opts))
    if r.tcpi_options & TCPI_OPT_TIMESTAMPS:
        s.setsockopt(socket.SOL_TCP, TCP_TIMESTAMP, struct.pack("<I", r.timestamp))
    for queue, name, force in ((TCP_SEND_QUEUE, "send", SO_SNDBUFFORCE),
                               (TCP_RECV_QUEUE, "recv", SO_RCVBUFFORCE)):
        data = getattr(r, f"{name}_queue")
        if not data:
            continue
        # The queue grew with buffers the kernel had tuned up: make room (it doubles
        # the value given) rather than block half way.
        s.setsockopt(socket.SOL_SOCKET, force, len(data) + (1 << 16))
        s.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, queue)
        view = memoryview(data)
        try:
            while view:
                view = view[s.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            raise RestoreError(f"the {name} queue of the TCP connection of fd {r.fd} "
                               f"({len(data)} bytes) does not fit back in") from None
    # The window last, once the queues are back (the kernel checks it against them).
    s.setsockopt(socket.SOL_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.pack(*r.window))
    for name, value in r.options.items():
        if name not in ("SO_REUSEADDR", "IPV6_V6ONLY"):  # see go_live; before bind
            level, opt = ALL_OPTIONS[name]
            s.setsockopt(level, opt, value)


def go_live(pid: int, recs: list[Fd]) -> None:
    """The very last step before the process runs: its connections leave repair mode.
    Until then a failed resume closes them silently; and a listener cannot bind next
    to a connection on its port once that is out of repair mode."""
    live = [r for r in recs if isinstance(r, TcpFd) and r.shared_with < 0]
    if not live:
        return
    for r in live:
        with socket.socket(fileno=nat.copy_fd(pid, r.fd)) as s:
            s.setsockopt(socket.SOL_TCP, TCP_REPAIR, 0)  # which resets SO_REUSEADDR: set it after
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, r.options["SO_REUSEADDR"])
