"""Every record of an image is validated before anything uses it (upmig.validate).

A real image (the kitchen victim: a little of every kind of state) is decoded, one
thing in it is made wrong, and it is written again with upmig's own writer: load()
must refuse it with Corrupt, naming the record, its process and the field. The
cases are the ones found crashing or misleading upmig before validation existed."""

from __future__ import annotations

import dataclasses
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import imagefuzz
import pytest

from conftest import build_victim, run_upmig, wait_for
from upmig import image, keys, schema, validate
from upmig.errors import Corrupt
from upmig.fds import registry
from upmig.fds.path import PathFd
from upmig.records import Pages, Vma, record_types

KIND = dict(record_types())


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[imagefuzz.Item]:
    """The records of a real image of the kitchen victim (left running, then ended:
    it removes its POSIX shm and SysV objects itself)."""
    d = tmp_path_factory.mktemp("validate")
    out = d / "stdout.txt"
    with open(out, "wb") as f:
        proc = subprocess.Popen([str(build_victim("kitchen"))], cwd=d, stdin=subprocess.PIPE,
                                stdout=f, stderr=subprocess.STDOUT, close_fds=True,
                                start_new_session=True)
    try:
        wait_for(lambda: out.read_bytes() == b"READY\n", 20, "READY")
        img = d / "kitchen.upmig"
        run_upmig("dump", str(proc.pid), "-o", str(img), "--leave-running")
        return imagefuzz.decode(str(img))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        proc.stdin.close()
        assert out.read_bytes() == b"READY\nPASS\n"


def _seal(items: list[imagefuzz.Item], path: Path) -> None:
    """Written with upmig's writer, sealed with the tests' key (conftest's UPMIG_KEY_FILE)."""
    imagefuzz.encode(items, str(path), keys.load())


def _nth(items: list[imagefuzz.Item], kind: str, n: int = 0, where=lambda r: True) -> int:
    """The index in items of the n-th record of kind for which where() holds."""
    return [i for i, it in enumerate(items) if it.rec.kind == kind and where(it.rec)][n]


def _changed(items, i: int, **fields) -> list[imagefuzz.Item]:
    out = list(items)
    out[i] = imagefuzz.Item(dataclasses.replace(items[i].rec, **fields), items[i].data)
    return out


def _changed_all(items, kind: str, where, **fields) -> list[imagefuzz.Item]:
    """Every record of kind for which where() holds changed (a ghost in every holder)."""
    return [imagefuzz.Item(dataclasses.replace(it.rec, **fields), it.data)
            if it.rec.kind == kind and where(it.rec) else it for it in items]


def _refused(tmp_path: Path, items, pattern: str) -> str:
    path = tmp_path / "bad.upmig"
    _seal(items, path)
    with pytest.raises(Corrupt) as e:
        image.load(str(path)).close()
    assert e.value.exit_code == 6
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert re.search(pattern, msg), msg
    return msg


def _root(items) -> int:
    return items[_nth(items, "process")].rec.pid


# ---- the schema covers everything

def test_every_field_of_every_record_has_a_check():
    """A new field (or kind) must come with its check, or it would go unvalidated."""
    for kind, cls in KIND.items():
        if kind == "trailer":  # checked by upmig.image itself
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        checked = {**schema.FD_FIELDS, **cls.checks} if kind in registry.RECORDS else \
            schema.FIELDS.get(kind, {})
        assert set(checked) == names, kind


def test_the_real_image_validates(items, tmp_path):
    path = tmp_path / "ok.upmig"
    _seal(items, path)
    img = image.load(str(path))
    try:
        kinds = {r.kind for r in img.records}
        # (an established TCP connection moves only with --tcp-established: test_fds)
        assert kinds == set(KIND) - {"trailer", "fd_tcp"}, "the victim's image holds every kind"
    finally:
        img.close()


# ---- what was found crashing upmig, or accepted and then misbehaving

def test_a_pid_past_pid_max(items, tmp_path):
    i = _nth(items, "process")
    _refused(tmp_path, _changed(items, i, pid=2**40),
             r"record process #0: pid 1099511627776 is not a pid \(1\.\.4194304\)")


@pytest.mark.parametrize("pid", [0, -1])
def test_pid_zero_or_negative(items, tmp_path, pid):
    i = _nth(items, "process", 1)
    _refused(tmp_path, _changed(items, i, pid=pid), rf"record process #1: pid {pid} is not a pid")


def test_an_epoll_fd_with_broken_watches(items, tmp_path):
    i = _nth(items, "fd_epoll")
    _refused(tmp_path, _changed(items, i, watches={}),
             rf"record fd_epoll #0 of pid {_root(items)}: watches is a dict \(\{{\}}\), not a list")
    _refused(tmp_path, _changed(items, i, watches=[[3, 1]]),
             r"record fd_epoll #0 of pid \d+: watches\[0\] has 2 items, not 3")


def test_an_epoll_watch_of_an_fd_that_is_not_there(items, tmp_path):
    i = _nth(items, "fd_epoll")
    _refused(tmp_path, _changed(items, i, watches=[[999, 1, 0]]),
             r"record fd_epoll #0 of pid \d+: watches\[0\] fd 999 is not another fd of the "
             "process")


def test_a_socket_pair_whose_other_end_is_nowhere(items, tmp_path):
    """Its peer is in no fd of the process, and it carries nothing to make it with."""
    i = _nth(items, "fd_unix_pair")
    _refused(tmp_path, _changed(items, i, peer=12345),
             r"record fd_unix_pair #0 of pid \d+: peer_desc is 0: its other end is in no fd")


def test_an_fd_record_of_no_kind(items, tmp_path):
    """A kind this upmig does not know is an unreadable record, not a crash."""
    i = _nth(items, "fd_pipe")
    rec = items[i].rec
    bogus = type("BogusFd", (type(rec),), {"kind": "fd_bogus"})(**vars(rec))
    _refused(tmp_path, [*items[:i], imagefuzz.Item(bogus), *items[i + 1:]],
             r"unreadable record at byte \d+ \(KeyError\)")


def test_empty_registers(items, tmp_path):
    i = _nth(items, "thread")
    _refused(tmp_path, _changed(items, i, regs=b""),
             rf"record thread #0 of pid {_root(items)}: regs is 0 bytes long, not 216")


@pytest.mark.parametrize("size", [0, 100, 575])
def test_an_xsave_area_too_small_for_its_header(items, tmp_path, size):
    i = _nth(items, "thread")
    _refused(tmp_path, _changed(items, i, xsave=bytes(size)),
             rf"xsave is {size} bytes long, not 576\.\.65536")


def test_empty_uids(items, tmp_path):
    i = _nth(items, "task")
    _refused(tmp_path, _changed(items, i, uids=[]), r"record task #0 of pid \d+: uids has 0 items")


@pytest.mark.parametrize(("uid", "shown"), [(2**32, "4294967296"), (-1, "-1"),
                                            (2**32 - 1, "4294967295")])
def test_a_uid_setresuid_would_truncate_or_ignore(items, tmp_path, uid, shown):
    """2**32 became uid 0; -1 (and 2**32 - 1) meant "leave it", the resumer's."""
    i = _nth(items, "task")
    _refused(tmp_path, _changed(items, i, uids=[0, uid, 0, 0]),
             rf"uids\[1\] {shown} is not a uid or gid \(0\.\.4294967294\)")


def test_created_yesterday(items, tmp_path):
    _refused(tmp_path, _changed(items, 0, created="yesterday"),
             r"record header #0: created is a str \('yesterday'\), not a number")


def test_a_cwd_with_a_nul(items, tmp_path):
    i = _nth(items, "task")
    _refused(tmp_path, _changed(items, i, cwd="/tmp\0/etc"), r"cwd '/tmp\\x00/etc' holds a NUL")


@pytest.mark.parametrize("target", ["ghost:12345", "sysv:999999"])
def test_pages_aimed_at_a_ghost_or_segment_that_is_not_there(items, tmp_path, target):
    i = _nth(items, "pages", where=lambda r: r.target.startswith(target.split(":")[0]))
    _refused(tmp_path, _changed(items, i, target=target),
             rf"target '{target}' names no record of the image")


def test_a_vma_whose_pages_do_not_come(items, tmp_path):
    """data_bytes says there are pages, but no pages record brings them."""
    i = _nth(items, "pages", where=lambda r: not r.target)
    _refused(tmp_path, items[:i] + items[i + 1:],
             r"record vma #\d+ of pid \d+: data_bytes is \d+, but the image holds 0 for it")


def test_ghost_pages_before_the_start_of_the_file(items, tmp_path):
    i = _nth(items, "pages", where=lambda r: r.target.startswith("ghost:"))
    _refused(tmp_path, _changed(items, i, runs=[-4096, 0]),
             r"run -0x1000-0x0 is not within the \d+ bytes of ghost:\d+")


def test_page_zero(items, tmp_path):
    i = _nth(items, "vma")
    msg = _refused(tmp_path, _changed(items, i, start=0),
                   rf"record vma #0 of pid {_root(items)}: start 0x0 is below "
                   rf"vm.mmap_min_addr \({schema.MMAP_MIN_ADDR:#x}\)")
    assert "mmap_min_addr" in msg


def test_a_mapped_file_without_its_identity(items, tmp_path):
    """A file VMA whose MappedFile record is gone would be mapped unchecked."""
    i = _nth(items, "mapped_file", where=lambda r: "libc" in r.path)
    _refused(tmp_path, items[:i] + items[i + 1:],
             r"record vma #\d+ of pid \d+: path '.*libc.*' has no mapped_file record")


def test_a_posix_ghost_of_four_tebibytes(items, tmp_path):
    _refused(tmp_path, _changed_all(items, "ghost", lambda r: r.type == "posix", size=4 << 40),
             r"ghost:\d+ \(ghost\): size 4398046511104 is \d+ bytes more than the image "
             "stores for it")


@pytest.mark.parametrize("path", ["/dev/shm/../../etc/cron.d/x", "/etc/passwd", "/dev/shm/a/b",
                                  "/dev/shm/.."])
def test_a_posix_ghost_outside_dev_shm(items, tmp_path, path):
    _refused(tmp_path, _changed_all(items, "ghost", lambda r: r.type == "posix", path=path),
             r"is not /dev/shm/NAME with a plain NAME")


def test_a_device_reopened_by_path(items, tmp_path):
    i = _nth(items, "fd_path", where=lambda r: r.what == "chardev")
    _refused(tmp_path, _changed(items, i, path="/dev/mem"),
             r"path '/dev/mem' is not a device reopened by path")


def test_cow_pages_from_a_process_that_is_not_the_parent(items, tmp_path):
    i = _nth(items, "cow_pages")
    _refused(tmp_path, _changed(items, i, source=items[i].rec.source + 1),
             r"record cow_pages #0 of pid \d+: source \d+ is not its parent")


def test_a_dup_of_an_fd_that_comes_later(items, tmp_path):
    i = _nth(items, "fd_path", 1)
    _refused(tmp_path, _changed(items, i, shared_with=items[i].rec.fd + 1),
             r"shared_with \d+ is not a lower fd")


def test_a_pipe_without_its_record(items, tmp_path):
    i = _nth(items, "pipe")
    _refused(tmp_path, items[:i] + items[i + 1:], r"names no pipe record|has no pipe record")


def test_a_thread_that_would_run_outside_its_code(items, tmp_path):
    i = _nth(items, "thread")
    regs = bytearray(items[i].rec.regs)
    regs[128:136] = (0x1000).to_bytes(8, "little")
    _refused(tmp_path, _changed(items, i, regs=bytes(regs)),
             r"regs: rip 0x1000 is not in an executable mapping")


def test_records_in_the_wrong_place(items, tmp_path):
    first = _nth(items, "process")
    _refused(tmp_path, [items[0], items[first + 1], *items[1:first + 1], *items[first + 2:]],
             r"comes before any process record")
    shm = _nth(items, "sysv_shm")
    _refused(tmp_path, [*items[:shm], *items[shm + 1:first + 1], items[shm], *items[first + 1:]],
             r"record sysv_shm #0 of pid \d+: comes after the first process record")


# ---- bounds

def test_too_many_vmas_are_refused_as_they_come(items, tmp_path, monkeypatch):
    """Refused at the first VMA past the cap: not after reading them all."""
    monkeypatch.setitem(validate.PER_PROCESS, "vma", 50)
    _refused(tmp_path, _with_vmas(items, 60), r"record vma #50 of pid \d+: pid \d+ has more "
                                              r"than 50 vma records")


def test_the_vma_cap_is_a_multiple_of_max_map_count():
    assert validate.PER_PROCESS["vma"] == 2 * int(Path("/proc/sys/vm/max_map_count").read_text())


def test_a_hundred_thousand_vmas_or_ten_thousand_fds_validate(items, tmp_path):
    """Big real processes are accepted (and what validating them costs is shown)."""
    path = tmp_path / "big.upmig"
    for what, many in (("100,000 VMAs", _with_vmas(items, 100_000)),
                       ("10,000 fds", _with_fds(items, 10_000))):
        _seal(many, path)
        print(f"validating {what}: {_time_validation(path):.3f} s of CPU")


def _time_validation(path: Path) -> float:
    """CPU seconds to validate the image's records again (once read)."""
    img = image.load(str(path))
    try:
        began = time.process_time()
        v = validate.Validator(str(path))
        for rec in img.records:
            v.add(rec)
        v.finish(img)
        return time.process_time() - began
    finally:
        img.close()


FREE = 0x100000000000  # no mapping of the victim is near


def _with_vmas(items, n: int) -> list[imagefuzz.Item]:
    """n more (untouched, anonymous) VMAs in the root process."""
    extra = [imagefuzz.Item(Vma(start=FREE + k * 8192, end=FREE + k * 8192 + 4096,
                                perms="rw-p", offset=0, path="", role="anon",
                                vmflags=["rd", "wr", "mr", "mw", "me", "ac"]))
             for k in range(n)]
    at = _nth(items, "vma", where=lambda v: v.start > FREE)
    return [*items[:at], *extra, *items[at:]]


def _with_fds(items, n: int) -> list[imagefuzz.Item]:
    extra = [imagefuzz.Item(PathFd(fd=1000 + k, what="chardev", path="/dev/null",
                                   flags=0o100000, cloexec=False, pos=0)) for k in range(n)]
    at = _nth(items, "pipe")  # the root's first, after its fds
    return [*items[:at], *extra, *items[at:]]


# ---- the fast path never accepts what the checks refuse

def test_vma_fine_accepts_no_more_than_the_field_checks(items):
    vmas = [it.rec for it in items if isinstance(it.rec, Vma)]
    assert all(schema.vma_fine(v) for v in vmas), "real VMAs take the fast path"
    changes = imagefuzz.FIELDS["vma"]
    rnd = random.Random(11)
    ctx = imagefuzz.Context([], [])
    tried = 0
    for v in vmas:
        for name in [f.name for f in dataclasses.fields(Vma)]:
            for _ in range(8):
                change = changes.get(name, imagefuzz._semantic)
                bad = dataclasses.replace(v, **{name: change(getattr(v, name), rnd, ctx)})
                slow_ok = _slow_ok(bad)
                assert not schema.vma_fine(bad) or slow_ok, (name, bad)
                tried += 1
    assert tried > 1000


def _slow_ok(v: Vma) -> bool:
    for name, check in schema.FIELDS["vma"].items():
        if check(getattr(v, name)) is not None:
            return False
    return schema.RULES["vma"](v) is None


def test_pages_of_a_sysv_segment_only_before_the_processes(items, tmp_path):
    i = _nth(items, "pages", where=lambda r: not r.target)
    first = _nth(items, "process")
    moved = [*items[:first], items[i], *[it for k, it in enumerate(items[first:], first)
                                         if k != i]]
    _refused(tmp_path, moved, r"record pages #\d+: target '': only a SysV segment's pages come "
                              "before the processes")
    assert isinstance(items[i].rec, Pages)


def test_inspect_and_resume_say_it_in_one_line(items, tmp_path):
    """Through the command line: exit 6 (resume: 206), one line naming the record, no
    process made."""
    i = _nth(items, "vma")
    path = tmp_path / "bad.upmig"
    _seal(_changed(items, i, start=0), path)
    for command in ("inspect", "resume"):
        r = run_upmig(command, str(path), check=False)
        assert r.returncode == {"inspect": 6, "resume": 206}[command], r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert re.match(rf"upmig: {path}: record vma #0 of pid \d+: start 0x0 is below "
                        r"vm.mmap_min_addr", r.stderr), r.stderr

