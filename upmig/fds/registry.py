"""Every kind of fd upmig can move, in the order they are asked whether an fd is
theirs (the first to say yes captures it): sockets before pipes before what is
found by its path. A new kind is a module in upmig/fds/ and a line here."""

from __future__ import annotations

from upmig.fds import (
    epoll,
    eventfd,
    fifo,
    ghost,
    inet,
    inherit,
    inotify,
    path,
    pipe,
    signalfd,
    timerfd,
    unix,
)
from upmig.fds.base import Kind, Scan, Seen
from upmig.records import Fd

KINDS: tuple[Kind, ...] = (
    unix.UNIX,          # sockets sock_diag knows, but fds 0-2 connected outside
    inet.INET,          # the other sockets, but fds 0-2
    pipe.PIPE,          # pipes with both ends inside
    fifo.FIFO,          # FIFOs by path
    inherit.INHERIT,    # fds 0-2 leading outside: a pipe, a socket, a terminal
    eventfd.EVENTFD,
    epoll.EPOLL,
    timerfd.TIMERFD,
    signalfd.SIGNALFD,
    inotify.INOTIFY,
    ghost.GHOST,        # deleted files, memfds, /dev/shm objects
    path.PATH,          # what is found by its path: regular files, directories, devices
)

HANDLERS: dict[type, Kind] = {cls: kind for kind in KINDS for cls in kind.records}
RECORDS: dict[str, type[Fd]] = {cls.kind: cls for cls in HANDLERS}


def classify(e: Seen, scan: Scan) -> Kind | None:
    """The kind of fd e is, or None: no kind can move it."""
    for kind in KINDS:
        if kind.classify(e, scan):
            return kind
    return None


def handler(rec: Fd) -> Kind:
    return HANDLERS[type(rec)]


def phase(rec: Fd) -> int:
    return HANDLERS[type(rec)].phase_of(type(rec))


def in_restore_order(recs: list[Fd]) -> list[Fd]:
    """recs by restore phase, in fd order within one."""
    return sorted(recs, key=lambda r: (phase(r), r.fd))
