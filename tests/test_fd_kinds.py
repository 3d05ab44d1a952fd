"""The registry of fd kinds (upmig/fds/): every kind has its record types, each with a
schema and a record kind of its own on the wire; restore phases come in the order
resume needs; and fds of this very test process are classified as dump would
(no ptrace, no victim: classify and capture read /proc, as for any process)."""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import tempfile
from pathlib import Path

import pytest

from upmig import _proc, files, image, schema, validate
from upmig.errors import CantMigrate
from upmig.fds import base, registry
from upmig.fds.epoll import EpollFd
from upmig.fds.eventfd import EventFd
from upmig.fds.ghost import GhostFd
from upmig.fds.inet import TcpFd, TcpListenerFd
from upmig.fds.inherit import InheritFd
from upmig.fds.inotify import InotifyFd
from upmig.fds.path import PathFd
from upmig.fds.pipe import PipeFd
from upmig.fds.unix import UnixListenerFd, UnixPairFd, UnixSocketFd
from upmig.records import Fd, Pipe, record_types

COMMON = {f.name for f in dataclasses.fields(Fd)}


# ---- the registry

def test_every_kind_has_record_types_of_its_own():
    seen: dict[type, base.Kind] = {}
    for kind in registry.KINDS:
        assert kind.records, kind.name
        for cls in kind.records:
            assert cls not in seen, f"{cls.__name__} is {seen[cls].name}'s and {kind.name}'s"
            seen[cls] = kind
    assert set(registry.HANDLERS) == set(seen)
    names = [cls.kind for cls in seen]
    assert len(set(names)) == len(names), names
    assert all(n.startswith("fd_") and n != "fd" for n in names)


def test_every_record_type_is_a_record_kind_on_the_wire():
    wire = record_types()
    for cls in registry.HANDLERS:
        assert issubclass(cls, Fd) and wire[cls.kind] is cls
    assert "fd" not in wire, "the base record is never in an image"


@pytest.mark.parametrize("cls", list(registry.HANDLERS), ids=lambda c: c.kind)
def test_every_field_of_every_fd_record_has_a_check(cls):
    """A new field without a check would go unvalidated."""
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(schema.FD_FIELDS) == COMMON
    assert set(cls.checks) == names - COMMON, cls.kind
    assert cls.kind in validate.SECTION_KINDS


def test_every_kind_implements_its_handler():
    for kind in registry.KINDS:
        for method in ("classify", "capture", "restore"):
            assert getattr(type(kind), method) is not getattr(base.Kind, method), \
                (kind.name, method)


def _rec(cls: type, fd: int, **fields) -> Fd:
    """A record of cls with fd number fd, its own fields filled with placeholders."""
    own = {f.name: None for f in dataclasses.fields(cls) if f.name not in COMMON
           and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return cls(fd=fd, flags=0, cloexec=False, pos=0, **(own | fields))


def test_restore_phases_order_the_kinds():
    """Connections before listeners share their port; files, pipes, ghosts and
    sockets before the epoll and inotify instances that may watch them."""
    watchers = {EpollFd, InotifyFd}
    for cls, kind in registry.HANDLERS.items():
        p = kind.phase_of(cls)
        assert p in (base.CONNECTIONS, base.OBJECTS, base.WATCHERS), cls.kind
        assert (p == base.WATCHERS) == (cls in watchers), cls.kind
    assert registry.phase(_rec(TcpFd, 9)) < registry.phase(_rec(TcpListenerFd, 3))
    recs = [_rec(EpollFd, 3), _rec(InotifyFd, 4), _rec(PipeFd, 5), _rec(TcpListenerFd, 6),
            _rec(TcpFd, 7), _rec(GhostFd, 8), _rec(PathFd, 2), _rec(EventFd, 10)]
    assert [r.fd for r in registry.in_restore_order(recs)] == [7, 2, 5, 6, 8, 10, 3, 4]


# ---- classification, on this process's own fds

def _seen(fd: int, as_fd: int | None = None) -> base.Seen:
    """Our fd as dump would see it (as_fd: as if it were at that number)."""
    text = _proc.read_text(os.getpid(), f"fdinfo/{fd}")
    return base.Seen(fd if as_fd is None else as_fd, os.readlink(f"/proc/self/fd/{fd}"),
                     os.stat(f"/proc/self/fd/{fd}"), text, _proc.parse_fdinfo(text))


def _scan(*seen: base.Seen) -> base.Scan:
    return base.Scan(os.getpid(), list(seen), set(), set())


def _kind(e: base.Seen, scan: base.Scan | None = None) -> str | None:
    kind = registry.classify(e, scan or _scan(e))
    return kind and kind.name


def _capture(e: base.Seen, scan: base.Scan | None = None) -> Fd:
    scan = scan or _scan(e)
    return registry.classify(e, scan).capture(e, scan)


def _refused(fd: int, kind: str, why: str) -> None:
    """Our fd (closed after) is of kind, which refuses it saying why."""
    try:
        e = _seen(fd)
        assert _kind(e) == kind
        with pytest.raises(CantMigrate, match=why):
            _capture(e)
    finally:
        os.close(fd)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_a_pipe_with_both_ends_inside(pipe):
    r, w = pipe
    scan = _scan(_seen(r), _seen(w))
    assert [_kind(e, scan) for e in scan.seen] == ["pipe", "pipe"]
    rec = _capture(scan.seen[0], scan)
    assert isinstance(rec, PipeFd) and rec.end == "r" and rec.note.startswith("pipe:[")


def test_a_pipe_leading_outside_is_inherited_at_stdio_and_refused_above(pipe):
    r, _ = pipe
    e = _seen(r, as_fd=0)
    assert _kind(e) == "inherit"
    rec = _capture(e)
    assert isinstance(rec, InheritFd) and "re-attached" in rec.note
    e = _seen(r)
    assert _kind(e) is None
    assert "its other end is outside the process" in files._refusal(1, e).why


def test_an_eventfd_and_its_count():
    fd = os.eventfd(5, os.EFD_SEMAPHORE)
    try:
        e = _seen(fd)
        rec = _capture(e)
        assert isinstance(rec, EventFd) and (rec.count, rec.semaphore) == (5, True)
    finally:
        os.close(fd)


def test_an_epoll_instance_watching_a_file_replaced_since_is_refused(pipe):
    r, w = pipe
    ep = select.epoll()
    try:
        ep.register(r, select.EPOLLIN)
        scan = _scan(_seen(ep.fileno()), _seen(r), _seen(w))
        rec = _capture(scan.seen[0], scan)
        assert isinstance(rec, EpollFd) and [w[0] for w in rec.watches] == [r]
        kept = os.dup(r)  # the watched file lives on (so does the watch), but its
        try:              # number is another file's now
            with open("/dev/null") as other:
                os.dup2(other.fileno(), r)
            scan = _scan(_seen(ep.fileno()), _seen(r), _seen(w), _seen(kept))
            with pytest.raises(CantMigrate, match="closed or replaced"):
                _capture(scan.seen[0], scan)
        finally:
            os.close(kept)
    finally:
        ep.close()


def test_kernel_objects_no_kind_takes_are_refused_by_name():
    e = base.Seen(7, "anon_inode:[io_uring]", None, "", {"flags": "02", "pos": "0"})
    assert _kind(e) is None
    assert files._refusal(1, e).why == "holds io_uring on fd 7, which is not supported yet"


def test_files_by_path(tmp_path):
    (tmp_path / "f").write_text("x")
    fds = [os.open(tmp_path / "f", os.O_RDONLY), os.open(tmp_path, os.O_RDONLY),
           os.open("/dev/null", os.O_RDWR)]
    try:
        recs = [_capture(e) for e in map(_seen, fds)]
        assert [(type(r), r.what, r.path) for r in recs] == [
            (PathFd, "file", str(tmp_path / "f")), (PathFd, "dir", str(tmp_path)),
            (PathFd, "chardev", "/dev/null")]
        assert files.by_path(recs) == recs
    finally:
        for fd in fds:
            os.close(fd)


def test_a_proc_file_is_refused():
    _refused(os.open("/proc/self/status", os.O_RDONLY), "file",
             "kernel file /proc/.* cannot be reopened")


def test_deleted_files_are_ghosts_but_a_deleted_directory_is_refused():
    fd, name = tempfile.mkstemp(dir="/tmp")
    try:
        os.unlink(name)
        e = _seen(fd)
        rec = _capture(e)
        assert isinstance(rec, GhostFd) and rec.path == name
    finally:
        os.close(fd)
    where = tempfile.mkdtemp(dir="/tmp")
    fd = os.open(where, os.O_RDONLY)
    os.rmdir(where)
    _refused(fd, "ghost", "not a regular file and cannot be recreated")


def test_a_fifo_without_its_other_end_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    _refused(os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK), "fifo",
             "without its other end")


def test_unix_sockets_by_state():
    a, b = socket.socketpair()
    lis = socket.socket(socket.AF_UNIX)
    lis.bind(b"\0upmig-test-fd-kinds-%d" % os.getpid())
    lis.listen(3)
    loose = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.send(b"queued")
    try:
        scan = _scan(*(_seen(s.fileno()) for s in (a, b, lis, loose)))
        recs = [_capture(e, scan) for e in scan.seen]
        assert [type(r) for r in recs] == [UnixPairFd, UnixPairFd, UnixListenerFd, UnixSocketFd]
        assert recs[0].peer == recs[1].ino and recs[1].queued == [b"queued"]
        assert recs[2].backlog == 3 and bytes.fromhex(recs[2].name).startswith(b"\0upmig")
        # a pair's end at fd 0 whose other end is not in the process: inherited
        alone = _seen(b.fileno(), as_fd=0)
        assert _kind(alone) == "inherit"
    finally:
        for s in (a, b, lis, loose):
            s.close()


# ---- describe, for inspect

def test_describe_says_what_a_pipe_end_holds():
    rec = _rec(PipeFd, 4, pipe=77, end="r", note="pipe:[123]")
    img = image.Records("", [rec, Pipe(id=77, size=65536, data=b"abc")], [])
    said = registry.handler(rec).describe(rec, base.ById(img))
    assert said == {"type": "pipe", "path": "pipe:[123]", "end": "r", "buffered": 3}


def test_inspect_lists_what_each_kind_describes(tmp_path):
    """summary's fd listing is the handlers' describe, with the fields every fd has."""
    from upmig import summary

    recs = [_rec(PathFd, 3, what="dir", path=str(tmp_path)), _rec(EventFd, 4, count=2,
                                                                   semaphore=False)]
    img = image.Records("", recs, [])
    listed = summary._fds(img, {})
    assert [(f["fd"], f["type"], f["path"]) for f in listed] == [
        (3, "dir", str(tmp_path)), (4, "eventfd", "")]
    assert listed[1]["count"] == 2 and set(listed[0]) == {"fd", "type", "path", "flags", "pos",
                                                          "cloexec"}
    assert Path(tmp_path).is_dir()
