"""Unit tests of pure functions, on data built here (no process, no root): the test
harness's machine check, process tree checks (upmig.tree.check), the copy-on-write
split of page runs (memmap.split_cow), record validation (upmig.validate and
upmig.schema) and the image's frame parsing (upmig.image.load) of hand-made bytes."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import imagefuzz
import msgpack
import pytest

from conftest import unfit_machine
from upmig import image, keys, memmap, tree
from upmig.errors import CantMigrate, Corrupt, NotSealed, Truncated, VersionTooNew
from upmig.records import (
    MM,
    Header,
    MappedFile,
    Pages,
    Process,
    Signals,
    Task,
    Thread,
    Trailer,
    Vma,
    to_wire,
)
from upmig.validate import Validator

pytestmark = pytest.mark.pure

PAGE = 4096


# ---- conftest: which machines run the tests that move processes

def test_a_fit_machine_runs_everything():
    assert unfit_machine(0, "6.18.44-fc-v1272", "/usr/bin/cc") is None
    assert unfit_machine(0, "6.7.0", "/usr/bin/cc") is None
    assert unfit_machine(0, "6.10.3", "/usr/bin/cc") is None, "6.10 is newer than 6.7"
    assert unfit_machine(0, "7.0.0-rc1", "/usr/bin/cc") is None


@pytest.mark.parametrize("euid,release,cc,words", [
    (1000, "6.18.0", "/usr/bin/cc", "not root"),
    (0, "6.6.30", "/usr/bin/cc", "kernel 6.6.30 is older than 6.7"),
    (0, "5.15.0-91-generic", "/usr/bin/cc", "PAGEMAP_SCAN"),
    (0, "6.18.0", None, "no C compiler (cc)"),
])
def test_an_unfit_machine_is_told_why(euid, release, cc, words):
    why = unfit_machine(euid, release, cc)
    assert why is not None and words in why


def test_every_reason_is_given_at_once():
    why = unfit_machine(1000, "6.1.0", None)
    assert why.count(";") == 2


# ---- tree.check: the sessions, groups and terminals resume can rebuild

def proc(pid: int, ppid: int, pgid: int, sid: int, tty: int = 0) -> Process:
    return Process(pid=pid, ppid=ppid, pgid=pgid, sid=sid, tty=tty)


# A job started from a shell (session 10, group 20 of the shell's), its child leading
# a group of its own, and a grandchild in that group.
JOB = [proc(100, 10, 20, 10), proc(101, 100, 101, 10), proc(102, 101, 101, 10)]


@pytest.mark.parametrize("procs", [
    JOB,
    [proc(100, 1, 100, 100), proc(101, 100, 100, 100)],  # a daemon: its own session
    [proc(100, 10, 20, 10), proc(101, 100, 101, 101), proc(102, 101, 101, 101)],  # setsid
])
def test_trees_resume_can_rebuild_pass(procs):
    tree.check(procs, shell_job=False)


def _refused(procs: list[Process], shell_job: bool = False) -> CantMigrate:
    with pytest.raises(CantMigrate) as e:
        tree.check(procs, shell_job)
    return e.value


def test_a_group_led_from_outside_the_dump_is_refused():
    e = _refused([*JOB[:2], proc(102, 101, 30, 10)])
    assert e.pid == 102 and "process group 30" in e.why


def test_a_session_led_from_outside_that_is_not_the_roots_is_refused():
    e = _refused([*JOB[:2], proc(102, 101, 101, 11)])
    assert e.pid == 102 and "session 11" in e.why and "leader is not in the dump" in e.why


def test_a_session_member_whose_parent_is_outside_the_session_is_refused():
    # 101 leads session 101; 102 is in it, but its parent 100 is not
    e = _refused([proc(100, 10, 20, 10), proc(101, 100, 101, 101), proc(102, 100, 101, 101)])
    assert e.pid == 102 and "in session 101 but its parent is not" in e.why


def test_a_shells_terminal_needs_shell_job():
    procs = [proc(100, 10, 100, 10, tty=0x8800)]
    e = _refused(procs)
    assert e.pid == 100 and "--shell-job" in e.why
    tree.check(procs, shell_job=True)


def test_a_terminal_of_a_session_in_the_dump_is_refused_even_as_a_shell_job():
    procs = [proc(100, 10, 100, 10), proc(101, 100, 101, 101, tty=0x8801)]
    e = _refused(procs, shell_job=True)
    assert e.pid == 101 and "terminal of its own session" in e.why


# ---- memmap.split_cow: pages still shared with the parent come out of the runs

def vma(start: int, end: int, data_bytes: int) -> Vma:
    return Vma(start, end, "rw-p", 0, "", "anon", [], data_bytes=data_bytes)


def P(n: int) -> int:
    return 0x10000000 + n * PAGE


def test_split_cow_takes_the_common_pages_out():
    a, b = vma(P(0), P(16), 12 * PAGE), vma(P(32), P(40), 8 * PAGE)
    runs = {a.start: [(P(0), P(4)), (P(8), P(16))], b.start: [(P(32), P(40))]}
    same = [(P(2), P(10)), (P(12), P(13)), (P(15), P(34)), (P(39), P(50))]
    common = memmap.split_cow([a, b], runs, same)
    assert common == [(P(2), P(4)), (P(8), P(10)), (P(12), P(13)), (P(15), P(16)),
                      (P(32), P(34)), (P(39), P(40))]
    assert runs == {a.start: [(P(0), P(2)), (P(10), P(12)), (P(13), P(15))],
                    b.start: [(P(34), P(39))]}
    assert (a.cow_bytes, a.data_bytes) == (6 * PAGE, 6 * PAGE)
    assert (b.cow_bytes, b.data_bytes) == (3 * PAGE, 5 * PAGE)


def test_split_cow_with_nothing_in_common_changes_nothing():
    a = vma(P(0), P(8), 4 * PAGE)
    runs = {a.start: [(P(0), P(4))]}
    assert memmap.split_cow([a], runs, [(P(4), P(8)), (P(20), P(30))]) == []
    assert runs == {a.start: [(P(0), P(4))]} and (a.cow_bytes, a.data_bytes) == (0, 4 * PAGE)


def test_split_cow_skips_a_vma_without_runs_and_finds_a_late_range():
    """Many shared ranges before the runs: the search starts at the right one."""
    a, b = vma(P(0), P(4), 0), vma(P(100), P(104), 4 * PAGE)
    runs = {b.start: [(P(100), P(104))]}
    same = [(P(2 * i), P(2 * i + 1)) for i in range(52)]  # ... (P(102), P(103))
    assert memmap.split_cow([a, b], runs, same) == [(P(100), P(101)), (P(102), P(103))]
    assert runs == {b.start: [(P(101), P(102)), (P(103), P(104))]}
    assert a.cow_bytes == 0 and b.cow_bytes == 2 * PAGE


def test_split_cow_of_a_whole_run():
    a = vma(P(0), P(4), 4 * PAGE)
    runs = {a.start: [(P(0), P(4))]}
    assert memmap.split_cow([a], runs, [(0, P(100))]) == [(P(0), P(4))]
    assert runs == {a.start: []} and (a.cow_bytes, a.data_bytes) == (4 * PAGE, 0)


# ---- records built by hand: a tiny but whole image

PID = 4242
CODE = (0x400000, 0x401000)
DATA = (0x600000, 0x602000)
VDSO = (0x7FFFF7FC0000, 0x7FFFF7FC2000)
EXE = "/usr/bin/job"


def _regs(rip: int) -> bytes:
    words = [0] * 27
    words[16] = rip  # user_regs_struct.rip
    return struct.pack("<27Q", *words)


def good_records() -> list[imagefuzz.Item]:
    """A process with code, data (one page stored) and a vdso, blocked in nothing."""
    def it(rec, data=None):
        return imagefuzz.Item(rec, data)

    return [
        it(Header("x86_64", "6.18.0", "test", 1.8e9, "host", PAGE, PID)),
        it(Process(PID, 1, PID, PID, comm="job")),
        it(Task(PID, "job", [EXE], EXE, "/", "/", 0o22, 0, [0] * 4, [0] * 4, [],
                {"Max open files": [1024, 4096]}, True, True)),
        it(MM(CODE[0], CODE[1], DATA[0], DATA[1], DATA[1], DATA[1], 0x7FFFFFFDE000,
              0x7FFFFFFDF000, 0x7FFFFFFDF010, 0x7FFFFFFDF010, 0x7FFFFFFDF020, bytes(32))),
        it(Signals([[15, 0x401000 - 16, 0x04000000, 0x401000 - 32, 0]], [], [])),
        it(Thread(PID, _regs(CODE[0] + 0x10), bytes(576))),
        it(MappedFile(EXE, 4096, 0.0, "ab12", "")),
        it(Vma(*CODE, "r-xp", 0, EXE, "file", ["rd", "ex"])),
        it(Vma(*DATA, "rw-p", 0, "", "anon", ["rd", "wr"], data_bytes=PAGE)),
        it(Vma(*VDSO, "r-xp", 0, "", "vdso", ["rd", "ex"])),
        it(Pages([DATA[0], DATA[0] + PAGE], PAGE), b"\x5a" * PAGE),
    ]


def _at(items, kind: str, n: int = 0) -> int:
    return [i for i, x in enumerate(items) if x.rec.kind == kind][n]


def changed(items, kind: str, n: int = 0, **fields) -> list[imagefuzz.Item]:
    """items with the n-th record of kind changed."""
    i = _at(items, kind, n)
    out = list(items)
    out[i] = imagefuzz.Item(dataclasses.replace(items[i].rec, **fields), items[i].data)
    return out


def without(items, kind: str) -> list[imagefuzz.Item]:
    return [x for x in items if x.rec.kind != kind]


@pytest.fixture
def key() -> keys.Key:
    return keys.derive("unit-test-key", b"k" * 32)


def _sealed(items, path: Path, key: keys.Key) -> Path:
    imagefuzz.encode(items, str(path), key)
    return path


def test_the_hand_built_image_is_good(tmp_path, key):
    img = image.load(str(_sealed(good_records(), tmp_path / "good.upmig", key)), key=key)
    try:
        assert [r.kind for r in img.records] == [x.rec.kind for x in good_records()]
        assert img.sealed and [s.process.pid for s in img.processes()] == [PID]
        (pd,) = img.pages
        assert pd.runs == [(DATA[0], DATA[0] + PAGE)]
        assert b"".join(img.data[at:at + n] for at, n in pd.chunks) == b"\x5a" * PAGE
    finally:
        img.close()


# -- one record at a time (Validator.add): fields and rules within a record

def _added(recs: list) -> None:
    v = Validator("x.upmig")
    for rec in recs:
        v.add(rec)


def _field_refused(kind: str, message: str, **fields) -> None:
    """The good records up to the one of kind, that one changed: refused, naming the
    record and the field as `message` says."""
    items = changed(good_records(), kind, **fields)
    recs = [x.rec for x in items[:_at(items, kind) + 1]]
    with pytest.raises(Corrupt) as e:
        _added(recs)
    assert str(e.value).startswith("x.upmig: record "), str(e.value)
    assert message in str(e.value), str(e.value)


def test_the_good_records_pass_one_by_one():
    _added([x.rec for x in good_records()])


@pytest.mark.parametrize("kind,fields,message", [
    ("process", {"pid": 0}, "record process #0: pid 0 is not a pid (1..4194304)"),
    ("process", {"pid": "4242"}, "pid is a str ('4242'), not a pid"),
    ("process", {"zombie": 1}, "zombie is an int (1), not true or false"),
    ("process", {"exit_status": 0x137f}, "exit_status 0x137f is not a wait status"),
    ("task", {"uids": [0, 0, -1, 0]}, f"record task #0 of pid {PID}: uids[2] -1 is not a uid"),
    ("task", {"cwd": "relative/dir"}, "cwd 'relative/dir' is not an absolute path"),
    ("task", {"exe": "/bin/a\0b"}, "exe '/bin/a\\x00b' holds a NUL"),
    ("task", {"rlimits": {"Max open files": [8192, 4096]}},
     "rlimits 'Max open files': soft limit 8192 is above the hard limit 4096"),
    ("task", {"rlimits": {"Max wishes": [1, 1]}}, "rlimits key 'Max wishes' is not one of"),
    ("task", {"seccomp": 2}, "seccomp 2 is not 0"),
    ("mm", {"end_code": CODE[0] - PAGE}, "end_code 0x3ff000 is below start_code 0x400000"),
    ("mm", {"auxv": bytes(20)}, "auxv is 20 bytes long, not pairs of 8-byte words"),
    ("signals", {"actions": [[15, 0, 0, 0, 0], [15, 1, 0, 0, 0]]},
     "actions name a signal twice"),
    ("signals", {"actions": [[65, 0, 0, 0, 0]]}, "actions[0][0] 65 is not a signal number"),
    ("thread", {"regs": bytes(10)}, "regs is 10 bytes long, not 216"),
    ("thread", {"xsave": bytes(100)}, "xsave is 100 bytes long, not 576..65536"),
    ("thread", {"altstack": [0, 4, 0]}, "altstack[1] 0x4 is not a sigaltstack flag"),
    ("mapped_file", {"content_hash": "cd34"},
     "build_id and content_hash: one of them, not both"),
    ("mapped_file", {"build_id": "XYZ"}, "build_id 'XYZ' is not hex"),
    ("vma", {"start": 0}, "start 0x0 is below vm.mmap_min_addr"),
    ("vma", {"start": CODE[0] + 1}, "start 0x400001 is not page-aligned"),
    ("vma", {"end": CODE[0]}, "end 0x400000 is not above start 0x400000"),
    ("vma", {"perms": "rwzp"}, "perms 'rwzp' is not permissions like 'rw-p'"),
    ("vma", {"role": "heapish"}, "role 'heapish' is not one of"),
    ("vma", {"data_bytes": 2 * PAGE}, "data_bytes 8192 is more than the vma's 4096 bytes"),
    ("vma", {"vmflags": "rd ex"}, "vmflags is a str ('rd ex'), not a list"),
    ("pages", {"target": "elsewhere:1"}, "target 'elsewhere:1' is not"),
])
def test_a_bad_field_is_refused_naming_it(kind, fields, message):
    _field_refused(kind, message, **fields)


def test_a_record_before_the_header_is_refused():
    recs = [x.rec for x in good_records()]
    with pytest.raises(Corrupt, match=r"record process #0: the header comes first"):
        _added(recs[1:])


def test_a_second_task_is_refused():
    recs = [x.rec for x in good_records()]
    with pytest.raises(Corrupt, match=rf"pid {PID} has more than 1 task records"):
        _added([*recs, recs[2]])


# -- the records against each other (image.load, once all are read)

@pytest.mark.parametrize("change,message", [
    (lambda items: changed(items, "header", pid=PID + 1),
     f"record header #0: pid {PID + 1} is not the root process's ({PID})"),
    (lambda items: without(items, "task"), f"pid {PID}: has no task record"),
    (lambda items: without(items, "thread"), f"pid {PID}: has no thread record"),
    (lambda items: without(items, "mapped_file"),
     f"record vma #0 of pid {PID}: path '{EXE}' has no mapped_file record"),
    (lambda items: changed(items, "thread", regs=_regs(DATA[0])),
     f"record thread #0 of pid {PID}: regs: rip 0x600000 is not in an executable mapping"),
    (lambda items: changed(items, "vma", 1, data_bytes=2 * PAGE),
     f"record vma #1 of pid {PID}: data_bytes is 8192, but the image holds 4096"),
    (lambda items: changed(items, "vma", 0, start=CODE[0] - PAGE, end=DATA[0] + PAGE),
     f"record vma #1 of pid {PID}: start 0x600000 is below the end of the vma before it"),
    (lambda items: changed(items, "pages", runs=[CODE[1], CODE[1] + PAGE]),
     f"record pages #0 of pid {PID}: run 0x401000-0x402000 is not inside one vma"),
    (lambda items: changed(items, "pages", runs=[CODE[0], CODE[0] + PAGE]),
     "data_bytes is 0, but the image holds 4096"),
    (lambda items: [x for x in items if getattr(x.rec, "role", "") != "vdso"],
     f"pid {PID}: has 0 vdso mappings"),
    (lambda items: [*items, imagefuzz.Item(Process(PID + 1, 999, PID, PID, zombie=True),
                                           None)],
     "record process #1: ppid 999 is not a live process before it"),
])
def test_what_records_say_of_each_other_is_checked(tmp_path, key, change, message):
    path = _sealed(change(good_records()), tmp_path / "bad.upmig", key)
    with pytest.raises(Corrupt) as e:
        image.load(str(path), key=key).close()
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert message in str(e.value), str(e.value)


# ---- image frames: hand-made bytes

SALT = bytes(range(16))


class Frames:
    """An image's bytes made frame by frame, each sealed for where it lands."""

    def __init__(self, key: keys.Key, head: bytes | None = None):
        self.frame_key = key.frame_key(SALT)
        self.blob = head if head is not None else image.header(key, SALT)
        self.records = 0

    def add(self, ftype: int, payload: bytes) -> Frames:
        self.blob += image.frame(self.frame_key, len(self.blob), ftype, payload)
        return self

    def record(self, rec, data: bytes | None = None) -> Frames:
        self.records += 1
        self.add(image.RECORD, msgpack.packb(to_wire(rec), use_bin_type=True))
        return self.add(image.DATA, data) if data is not None else self

    def trailer(self, records: int | None = None, data_bytes: int = PAGE) -> bytes:
        want = self.records + 1 if records is None else records
        return self.add(image.TRAILER, msgpack.packb(to_wire(Trailer(want, data_bytes)),
                                                     use_bin_type=True)).blob


def good_frames(key: keys.Key) -> Frames:
    f = Frames(key)
    for x in good_records():
        f.record(x.rec, x.data)
    return f


def _load(tmp_path: Path, blob: bytes, key: keys.Key | None = None) -> None:
    path = tmp_path / "hand.upmig"
    path.write_bytes(blob)
    image.load(str(path), key=key).close()


def test_hand_made_frames_load(tmp_path, key):
    blob = good_frames(key).trailer()
    _load(tmp_path, blob, key)
    _load(tmp_path, blob)  # the structure alone, as inspect reads any image


def test_the_writer_and_hand_made_frames_agree(tmp_path, key):
    """The same records, salt and key make the same bytes whoever writes them (the
    writer's salt is its own: only the frames after the header are compared)."""
    written = _sealed(good_records(), tmp_path / "w.upmig", key).read_bytes()
    salt = written[image.HEADER.size - 16:image.HEADER.size]
    f = Frames(key, written[:image.HEADER.size])
    f.frame_key = key.frame_key(salt)
    for x in good_records():
        f.record(x.rec, x.data)
    assert f.trailer() == written


HEAD = image.HEADER.size


@pytest.mark.parametrize("cut", [0, 10, HEAD - 1])
def test_less_than_a_header_is_truncated(tmp_path, key, cut):
    with pytest.raises(Truncated, match="not even a header"):
        _load(tmp_path, good_frames(key).trailer()[:cut], key)


@pytest.mark.parametrize("cut", [HEAD, HEAD + 3, HEAD + 9, -17, -1])
def test_a_stream_cut_short_is_truncated(tmp_path, key, cut):
    with pytest.raises(Truncated):
        _load(tmp_path, good_frames(key).trailer()[:cut], key)


def test_bad_magic(tmp_path, key):
    blob = good_frames(key).trailer()
    with pytest.raises(Corrupt, match=r"not an upmig image \(bad magic\)"):
        _load(tmp_path, b"UPMIX" + blob[5:])


def _header(key: keys.Key, version: int = image.VERSION, reserved: int = 0) -> bytes:
    return image.HEADER.pack(image.MAGIC, version, reserved, key.id, SALT)


def test_a_newer_format_is_too_new(tmp_path, key):
    f = Frames(key, _header(key, version=image.VERSION + 1))
    with pytest.raises(VersionTooNew, match=f"image format {image.VERSION + 1} is newer"):
        _load(tmp_path, f.trailer(0, 0))


def test_an_older_format_is_refused(tmp_path, key):
    f = Frames(key, _header(key, version=image.VERSION - 1))
    with pytest.raises(Corrupt, match="older than this upmig reads"):
        _load(tmp_path, f.trailer(0, 0))


def test_the_reserved_header_word_must_be_zero(tmp_path, key):
    f = Frames(key, _header(key, reserved=1))
    for x in good_records():
        f.record(x.rec, x.data)
    with pytest.raises(Corrupt, match="bad header"):
        _load(tmp_path, f.trailer(), key)


def test_an_unknown_frame_type(tmp_path, key):
    f = Frames(key).add(7, b"what")
    with pytest.raises(Corrupt, match=f"bad frame at byte {HEAD}"):
        _load(tmp_path, f.trailer(1, 0))


def test_a_frame_longer_than_any_may_be(tmp_path, key):
    blob = Frames(key).blob + struct.pack("<II", image.RECORD, image.MAX_PAYLOAD + 1)
    with pytest.raises(Corrupt, match=f"bad frame at byte {HEAD}"):
        _load(tmp_path, blob + bytes(64))


def test_page_data_with_no_pages_record_before_it(tmp_path, key):
    f = Frames(key).record(good_records()[0].rec).add(image.DATA, b"\0" * PAGE)
    with pytest.raises(Corrupt, match="unexpected page data"):
        _load(tmp_path, f.trailer())


def test_more_page_data_than_the_pages_record_says(tmp_path, key):
    f = Frames(key)
    for x in good_records():
        f.record(x.rec, x.data)
    f.add(image.DATA, b"\0" * PAGE)
    with pytest.raises(Corrupt, match="unexpected page data"):
        _load(tmp_path, f.trailer(), key)


def test_page_data_missing_before_the_next_record(tmp_path, key):
    f = Frames(key)
    for x in good_records():
        f.record(x.rec)  # the pages record's bytes never come
    with pytest.raises(Corrupt, match="page data missing"):
        _load(tmp_path, f.trailer(data_bytes=0), key)


def test_a_pages_record_whose_runs_do_not_add_up(tmp_path, key):
    items = changed(good_records(), "pages", nbytes=2 * PAGE)
    f = Frames(key)
    for x in items:
        f.record(x.rec, x.data)
    with pytest.raises(Corrupt, match="malformed pages record"):
        _load(tmp_path, f.trailer(), key)


@pytest.mark.parametrize("off", [-1, 1])
def test_a_trailer_that_miscounts_the_records(tmp_path, key, off):
    f = good_frames(key)
    with pytest.raises(Corrupt, match="trailer does not match the records"):
        _load(tmp_path, f.trailer(f.records + 1 + off), key)


def test_bytes_after_the_trailer(tmp_path, key):
    with pytest.raises(Corrupt, match="after its trailer"):
        _load(tmp_path, good_frames(key).trailer() + b"\0" * 24, key)


def test_a_record_that_is_not_msgpack(tmp_path, key):
    f = Frames(key).add(image.RECORD, b"\xc1not msgpack")
    with pytest.raises(Corrupt, match=f"unreadable record at byte {HEAD}"):
        _load(tmp_path, f.trailer(1, 0))


def test_a_record_of_no_known_kind(tmp_path, key):
    f = Frames(key).add(image.RECORD, msgpack.packb(["wish", {"a": 1}]))
    with pytest.raises(Corrupt, match="unreadable record"):
        _load(tmp_path, f.trailer(1, 0))


def test_a_changed_byte_does_not_match_its_seal(tmp_path, key):
    blob = bytearray(good_frames(key).trailer())
    blob[-PAGE // 2] ^= 1  # in the page data, well before the trailer
    with pytest.raises(Corrupt, match="does not match its seal"):
        _load(tmp_path, bytes(blob), key)
    _load(tmp_path, bytes(blob))  # without the key only the structure is checked


def test_another_keys_image_is_not_sealed(tmp_path, key):
    other = keys.derive("another", os.urandom(32))
    with pytest.raises(NotSealed, match=key.id.hex()):
        _load(tmp_path, good_frames(other).trailer(), key)
