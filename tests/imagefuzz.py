"""Image fuzzing: mutants of a real image, and a harness that feeds them to upmig.

A mutant is either well-formed (the image's records decoded, one field changed to a
boundary, wrongly typed or cross-reference-breaking value, or one record dropped,
doubled or moved, then written again with upmig's own ImageWriter and sealed with
the key upmig resumes with) or raw (the image's bytes flipped, cut or its frames
reordered, or the image sealed with another key). Every mutant must end in a clean
refusal (a documented exit status, one `upmig:` line on stderr, no traceback) or in a
correct resume (the victim then passes its own check), without a hang and without
leaving anything behind (processes, /dev/shm objects, SysV objects, files).

The victim is tests/victims/kitchen.c: a small tree holding a little of every kind of
state, so that every record kind is in the image.

    python tests/imagefuzz.py [-n 2000] [--raw 200] [--seed 1] [--subprocess-every 10]

runs a longer fuzz (`make fuzz N=20000 SEED=7`) and prints the figures; the test
(tests/test_fuzz.py) runs a fixed, seeded share of it.

Fields the fuzzer may only break, never change to another valid value, are the
"semantic" ones: any value in range is a legal state the process could have had
(a register, a file offset, a signal mask), so no validation can tell a changed one
from the original; such a mutant would resume "correctly" into a victim that then
fails its check, which is no fault of upmig's. They get wrongly typed or impossible
values only."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from conftest import UPMIG, build_victim, descendants  # noqa: E402
from upmig import image, keys  # noqa: E402
from upmig.fds import registry  # noqa: E402
from upmig.records import Fd, Pages, Process  # noqa: E402

HANG_SECONDS = 10
DOCUMENTED = {"inspect": {0, 6}, "resume": {0, 206, 207, 208}}  # what each may exit with here


# ---- decoding and encoding

@dataclass
class Item:
    """One record of an image, and the page bytes that follow it (pages records)."""

    rec: Any
    data: bytes | None = None


def decode(path: str) -> list[Item]:
    img = image.load(path)
    try:
        pages = iter(img.pages)
        out = []
        for rec in img.records:
            data = None
            if isinstance(rec, Pages):
                pd = next(pages)
                data = b"".join(img.data[at:at + n] for at, n in pd.chunks)
            out.append(Item(rec, data))
        return out
    finally:
        img.close()


def encode(items: list[Item], path: str, key: keys.Key) -> None:
    """Written again by upmig's own writer, sealed with key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        w = image.ImageWriter(fd, key)
        for it in items:
            w.record(it.rec)
            if it.data is not None:
                w.data(it.data)
        w.finish()
    finally:
        os.close(fd)


# ---- well-formed mutants: what a field may be changed to

TYPES = ["x", None, 1.5, True, b"\x00", [], {}]  # one of another type than the field's
NEGATIVE = -(1 << 63)
PID_LIMIT = 1 << 22


def _other_type(v: Any, rnd: random.Random) -> Any:
    choices = [t for t in TYPES if type(t) is not type(v)]
    return copy.deepcopy(rnd.choice(choices))


def _semantic(v, rnd, ctx):
    """Only what no process could have had: another type, or an impossible number."""
    if isinstance(v, int) and not isinstance(v, bool) and rnd.random() < 0.4:
        return NEGATIVE
    if isinstance(v, str) and v and rnd.random() < 0.4:
        return v + "\x00x"
    return _other_type(v, rnd)


def _text(v, rnd, ctx):  # shown, never acted on: anything goes but a NUL
    return rnd.choice(["", "x" * 5000, "\u00e9\u00e8", v + "\x00", 0, None])


def _id(v, rnd, ctx):
    return rnd.choice([0, -1, 1, PID_LIMIT + 1, 1 << 31, 1 << 32, (1 << 64) - 1, NEGATIVE,
                       PID_LIMIT - 7, *ctx.pids, "x", None])


def _ppid(v, rnd, ctx):
    """Not another process of the tree: being another's child is a state it could have."""
    own = getattr(ctx.rec, "pid", 0)
    return rnd.choice([0, -1, own, PID_LIMIT + 1, PID_LIMIT - 7, 1 << 32, "x", None])


def _uid(v, rnd, ctx):
    return rnd.choice([-1, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, "0", None, 1.0])


def _fd(v, rnd, ctx):
    return rnd.choice([-1, -2, 1 << 20, 1 << 31, (1 << 64) - 1, *ctx.fds, "3", None])


def _ref(v, rnd, ctx):
    n = v if isinstance(v, int) else 0
    return rnd.choice([-1, n + 1, n ^ (1 << 40), (1 << 64) - 1, NEGATIVE, "1", None])


def _addr(v, rnd, ctx):
    return rnd.choice([0, 4096, v + 1, 0x7FFFFFFFF000, 1 << 47, (1 << 64) - 4096, -4096,
                       1 << 46, "0x1000", None])


def _aligned(v, rnd, ctx):  # an offset: only broken, a moved one is a semantic change
    return rnd.choice([v + 1, -4096, NEGATIVE, (1 << 64) - 4096, "0", None])


def _size(v, rnd, ctx):
    return rnd.choice([-1, v + 1, v * 1024 + 4096, 1 << 42, 1 << 62, (1 << 64) - 1,
                       NEGATIVE, "1", None])


def _float(v, rnd, ctx):
    return rnd.choice([float("nan"), float("inf"), -1.0, 1e300, "yesterday", None, -1 << 62])


def _path(v, rnd, ctx):
    return rnd.choice(["", "relative/x", "/nonexistent-upmig-fuzz/x", f"{v}\x00x",
                       "/" + "x" * 5000, "/dev/shm/../../tmp/upmig-fuzz", "/dev/shm/a/b",
                       "/dev/shm/upmig-fuzz-renamed",
                       "/memfd:" + "x" * 300, 0, None])


def _bytes(v, rnd, ctx):
    return rnd.choice([b"", v[:-1], v + b"\x00", v[:100], bytes(len(v) + 64), "x", None])


def _runs(v, rnd, ctx):
    if not isinstance(v, list) or len(v) < 2:
        return _other_type(v, rnd)
    n = v[1] - v[0]
    if getattr(ctx.rec, "target", ""):  # offsets in a file: a run moved inside it is fine
        return rnd.choice([[], v[:-1], [1 << 46, (1 << 46) + n, *v[2:]], [v[1], v[0], *v[2:]],
                           [v[0] + 1, v[1] + 1, *v[2:]], [-n, 0, *v[2:]]])
    return rnd.choice([[], v[:-1], [0, n, *v[2:]], [1 << 46, (1 << 46) + n, *v[2:]],
                       [v[0] + 1, v[1] + 1, *v[2:]], [v[1], v[0], *v[2:]],
                       [0x7FFFFFFFF000, 0x7FFFFFFFF000 + n, *v[2:]], v + v[:2],
                       [*v[:1], "x", *v[2:]]])


def _target(v, rnd, ctx):
    return rnd.choice(["ghost:1", f"ghost:{(1 << 64) - 1}", "sysv:999999", "bogus", "ghost:-1",
                       "ghost:", "", v.replace("ghost", "sysv") if isinstance(v, str) else "",
                       v.replace("sysv", "ghost") if isinstance(v, str) else "", 7])


def _row(v, rnd, ctx):
    """A fixed-shape list ([sp, flags, size]...): its shape or an element broken."""
    if not isinstance(v, list) or not v:
        return _other_type(v, rnd)
    i = rnd.randrange(len(v))
    return rnd.choice([[], v[:-1], [*v, 0], [*v[:i], "x", *v[i + 1:]],
                       [*v[:i], NEGATIVE, *v[i + 1:]], [*v[:i], None, *v[i + 1:]]])


def _rows(v, rnd, ctx):
    """A list of rows (signal actions, itimers): a row broken or doubled, a bad number."""
    if not isinstance(v, list) or not v:
        return rnd.choice([None, "x", [[]], [[65, 0, 0, 0, 0]], [[0, 0, 0, 0, 0]]])
    i = rnd.randrange(len(v))
    return rnd.choice([[*v, v[i]], [*v[:i], _row(v[i], rnd, ctx), *v[i + 1:]],
                       [*v[:i], [-1, *v[i][1:]], *v[i + 1:]],
                       [*v[:i], [65, *v[i][1:]], *v[i + 1:]], [*v[:i], "x", *v[i + 1:]]])


def _siginfos(v, rnd, ctx):
    bad_signo = (65).to_bytes(4, "little") + bytes(124)
    return rnd.choice([[b""], [bytes(127)], ["x"], [bad_signo], [bytes(129)], None, "x"])


def _ids4(v, rnd, ctx):
    if not isinstance(v, list) or not v:
        return _other_type(v, rnd)
    i = rnd.randrange(len(v))
    bad = rnd.choice([-1, (1 << 32) - 1, 1 << 32, "0", None])
    return rnd.choice([[], v[:-1], [*v, 0], [*v[:i], bad, *v[i + 1:]]])


def _rlimits(v, rnd, ctx):
    if not isinstance(v, dict) or not v:
        return _other_type(v, rnd)
    name = rnd.choice(sorted(v))
    soft, hard = v[name]
    bad = rnd.choice([[-2, hard], [soft], [soft, hard, 0], ["x", hard], [5, 3],
                      [-1, 1 << 20], None])
    return rnd.choice([{**v, name: bad}, {**v, "Max bogus": [1, 1]}, {1: [1, 1]} if False
                       else {**v, name: bad}])


def _exit_status(v, rnd, ctx):
    """Stopped, killed by SIGSTOP or SIGCHLD, signal 69, exit and signal at once..."""
    return rnd.choice([0x7F, 0x13, 0x11, 0x45, 0x0709, 0x10000, -1, "7", None])


def _enum(options):
    def pick(v, rnd, ctx):
        return rnd.choice([*options, "", "bogus", 7, None])
    return pick


def _extra(v, rnd, ctx):
    """A map (a Pipe's ends): a key dropped, a value broken."""
    if not isinstance(v, dict) or not v:
        return rnd.choice([None, "x", [], {"r": "r"}, {"x": 1}])
    key = rnd.choice(sorted(v))
    if rnd.random() < 0.3:
        return {k: x for k, x in v.items() if k != key}
    return {**v, key: rnd.choice([-1, NEGATIVE, "x", None, [], 1.5])}


def _bool(v, rnd, ctx):
    return rnd.choice([0, 1, "true", None, 2])


FIELDS: dict[str, dict[str, Any]] = {
    "header": {"arch": _enum(["aarch64"]), "kernel": _text, "upmig_version": _text,
               "created": _float, "hostname": _text, "page_size": _enum([16384, 0, 4095]),
               "pid": _id},
    "process": {"pid": _id, "ppid": _ppid, "pgid": _id, "sid": _id, "zombie": _bool,
                "comm": _text, "exit_status": _exit_status},
    "task": {"pid": _id, "comm": _text, "exe": _path, "cwd": _path, "root": _path,
             "uids": _ids4, "gids": _ids4, "rlimits": _rlimits},
    "mm": {"auxv": _bytes},
    "vma": {"start": _addr, "end": _addr, "offset": _aligned, "path": _path,
            "role": _enum(["anon", "file", "ghost", "sysv", "heap", "stack", "vdso"]),
            "perms": _enum(["rw", "rw-q", "rwxps", "r--p\x00"]),
            "data_bytes": _size, "ghost": _ref, "cow_bytes": _size},
    "mapped_file": {"path": _path, "mtime": _float},
    "pages": {"runs": _runs, "nbytes": _size, "target": _target},
    "cow_pages": {"source": _id, "runs": _runs},
    "sysv_shm": {"id": _ref, "size": _size, "uid": _uid, "gid": _uid, "boot": _text},
    "sysv_sem": {"id": _semantic, "uid": _uid, "gid": _uid, "last_pid": _id, "boot": _text},
    "ghost": {"id": _ref, "path": _path, "size": _size, "uid": _uid, "gid": _uid,
              "type": _enum(["file", "memfd", "shmem", "posix"])},
    "pipe": {"id": _ref, "size": _size, "ends": _extra},
    "signals": {"actions": _rows, "pending_shared": _siginfos, "itimers": _rows},
    "thread": {"tid": _id, "regs": _bytes, "xsave": _bytes, "rseq": _row,
               "robust_list": _row, "comm": _text, "pending": _siginfos, "altstack": _row},
}
# Every kind of fd record: the fields every fd has, and its own that are references,
# paths or rows (the others are semantic: a queue, a count, an address).
_FD = {"fd": _fd, "shared_with": _fd, "note": _text, "desc": _ref, "async_owner": _row}
_FD_OWN = {"fd_path": {"path": _path, "locks": _rows},
           "fd_ghost": {"path": _path, "ghost": _ref, "locks": _rows},
           "fd_pipe": {"pipe": _ref}, "fd_fifo": {"path": _path, "pipe": _ref},
           "fd_epoll": {"watches": _rows}, "fd_inotify": {"watches": _rows},
           "fd_unix_pair": {"ino": _ref, "peer": _ref, "peer_desc": _ref}}
FIELDS.update({kind: {**_FD, **_FD_OWN.get(kind, {})} for kind in registry.RECORDS})
# Records whose absence no validation could notice (a thread, an fd, a VMA nothing
# refers to: a process can have fewer) are never dropped.
DROPPABLE = {"header", "process", "task", "mm", "signals", "mapped_file", "pages",
             "cow_pages", "sysv_shm", "ghost", "pipe"}


@dataclass
class Context:
    """What a cross-reference breaker may pick from: ids and fds of the image."""

    pids: list[int]
    fds: list[int]
    rec: Any = None  # the record being changed


def _context(items: list[Item]) -> Context:
    pids = sorted({it.rec.pid for it in items if isinstance(it.rec, Process)})
    fds = sorted({it.rec.fd for it in items if isinstance(it.rec, Fd)})
    return Context(pids, fds)


def well_formed(items: list[Item], rnd: random.Random) -> tuple[list[Item], str]:
    """A mutant of the decoded image and what was done to it."""
    out = list(items)
    if rnd.random() < 0.15:
        return _record_op(out, rnd)
    kinds = sorted({it.rec.kind for it in items})
    kind = rnd.choice(kinds)
    which = [i for i, it in enumerate(items) if it.rec.kind == kind]
    i = rnd.choice(which)
    rec = items[i].rec
    names = [f.name for f in fields(rec)]
    name = rnd.choice(names)
    change = FIELDS.get(kind, {}).get(name, _semantic)
    old = getattr(rec, name)
    new = change(copy.deepcopy(old), rnd, replace(_context(items), rec=rec))
    out[i] = Item(replace(rec, **{name: new}), items[i].data)
    return out, f"{kind} #{which.index(i)} {name}: {_short(old)} -> {_short(new)}"


def _record_op(items: list[Item], rnd: random.Random) -> tuple[list[Item], str]:
    i = rnd.randrange(len(items))
    kind = items[i].rec.kind
    op = rnd.choice(["drop", "double", "swap"])
    rec = items[i].rec
    if op == "drop" and kind in DROPPABLE and not getattr(rec, "target", "") and \
            not getattr(rec, "zombie", False):
        # (a ghost's or segment's pages dropped are holes: zeros it could have held; a
        # zombie dropped, a child the process could not have had)
        return items[:i] + items[i + 1:], f"drop record {i} ({kind})"
    if op == "swap" and i + 1 < len(items):
        items[i], items[i + 1] = items[i + 1], items[i]
        return items, f"swap records {i} ({kind}) and {i + 1} ({items[i].rec.kind})"
    return items[:i + 1] + items[i:], f"double record {i} ({kind})"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _named_objects(items: list[Item]) -> set[str]:
    """The POSIX shm objects a mutant's ghosts would make, not there now."""
    return {it.rec.path for it in items if it.rec.kind == "ghost" and it.rec.type == "posix"
            and isinstance(it.rec.path, str) and it.rec.path.startswith("/dev/shm/")
            and "\0" not in it.rec.path and not os.path.lexists(it.rec.path)}


# ---- raw mutants

def raw(blob: bytes, rnd: random.Random, items: list[Item], path: str
        ) -> tuple[bytes, str]:
    """The image's bytes damaged: flipped, cut, frames dropped or reordered; or the
    image sealed with another key (which inspect reads, and resume refuses)."""
    frames = _frames(blob)
    what = rnd.choice(["flip", "cut", "drop", "swap", "garbage", "other key"])
    if what == "other key":
        encode(items, path, keys.derive("(another machine's)", rnd.randbytes(32)))
        return Path(path).read_bytes(), "sealed with another key"
    if what == "flip":
        at = rnd.randrange(len(blob))
        return blob[:at] + bytes([blob[at] ^ (1 << rnd.randrange(8))]) + blob[at + 1:], \
            f"flip a bit of byte {at}"
    if what == "cut":
        at = rnd.randrange(len(blob))
        return blob[:at], f"cut at {at}"
    if what == "garbage":
        return blob + rnd.randbytes(rnd.randrange(1, 64)), "garbage after the trailer"
    i = rnd.randrange(len(frames) - 1)
    order = list(range(len(frames)))
    if what == "drop":
        del order[i]
    else:
        order[i], order[i + 1] = order[i + 1], order[i]
    body = b"".join(blob[frames[j][0]:frames[j][1]] for j in order)
    return blob[:image.HEADER.size] + body, f"{what} frame {i}"


def _frames(blob: bytes) -> list[tuple[int, int]]:
    out, off = [], image.HEADER.size
    while off < len(blob):
        _, length = image.FRAME_HEAD.unpack_from(blob, off)
        end = off + image.FRAME_HEAD.size + length + image.FRAME_TAIL.size
        out.append((off, end))
        off = end
    return out


# ---- the harness

class Hung(Exception):
    pass


@dataclass
class Outcome:
    mutant: str
    result: str          # "refused-resume N" (N: its exit status), "resumed", or
    #                      where it failed: "inspect crashed", "hung"...
    failure: str = ""    # why this mutant failed the fuzz, if it did
    detail: str = ""
    raw: bool = False    # a raw mutant (bytes), not a well-formed one (records)


@dataclass
class Figures:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failure]

    def count(self, result: str, raw: bool | None = None) -> int:
        return sum(o.result.startswith(result) and raw in (None, o.raw)
                   for o in self.outcomes)

    def summary(self) -> str:
        refused = Counter(o.result.split()[1] for o in self.outcomes
                          if o.result.startswith("refused"))
        fails = Counter(o.failure for o in self.failures())
        raw = sum(o.raw for o in self.outcomes)
        unencodable = self.count("unencodable")
        ran = len(self.outcomes) - unencodable
        return (f"{ran} mutants ({ran - raw} well-formed, {raw} raw) in {self.seconds:.1f} s: "
                f"{sum(refused.values())} "
                f"refused (by exit status: {dict(sorted(refused.items()))}), "
                f"{self.count('resumed')} resumed"
                + (f"; FAILURES {dict(fails)}" if fails else "; no failures")
                + (f"; {unencodable} could not be encoded" if unencodable else ""))


class Victim:
    """The kitchen victim, dumped once (and killed); its named objects removed, so each
    mutant starts from a machine without them."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "victim"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = self.dir / "stdout.txt"
        exe = build_victim("kitchen")
        with open(self.out, "wb") as f:  # stdin a pipe from us: an fd it inherits
            proc = subprocess.Popen([str(exe)], cwd=self.dir, stdin=subprocess.PIPE,
                                    stdout=f, stderr=subprocess.STDOUT, close_fds=True,
                                    start_new_session=True)
        self.pid = proc.pid
        try:
            _wait(lambda: self.out.read_bytes() == b"READY\n", 20, "the victim's READY")
            self.image = str(workdir / "kitchen.upmig")
            r = subprocess.run([*UPMIG, "dump", str(self.pid), "-o", self.image],
                               capture_output=True, text=True, timeout=60)
            if r.returncode:
                raise RuntimeError(f"dump of the fuzz victim failed: {r.stderr}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdin.close()
            for kid in descendants(os.getpid()):
                _kill_and_reap(kid)
        self.ready = self.out.read_bytes()
        self.out_times = (os.stat(self.out).st_atime_ns, os.stat(self.out).st_mtime_ns)
        self.key = 0x4B490000 | (self.pid & 0xFFFF)
        self.shm = Path(f"/dev/shm/upmig-kitchen-{self.pid}")
        self.files = set(os.listdir(self.dir))
        self.remove_objects()

    def reset(self) -> None:
        """Its stdout as it was at the dump (a resumed victim writes on from there),
        mtime and all: resume checks the files the process holds."""
        self.out.write_bytes(self.ready)
        os.utime(self.out, ns=self.out_times)

    def remove_objects(self) -> list[str]:
        """Remove the victim's POSIX shm object and SysV objects; what was there."""
        found = []
        if self.shm.exists():
            self.shm.unlink()
            found.append(str(self.shm))
        for what in ("shm", "sem"):
            for ipc_id in _sysv_ids(what, self.key):
                _rmid(what, ipc_id)
                found.append(f"SysV {what} id {ipc_id}")
        return found

    def leftovers(self) -> list[str]:
        extra = sorted(set(os.listdir(self.dir)) - self.files)
        for name in extra:
            os.unlink(self.dir / name)
        return self.remove_objects() + [f"file {n}" for n in extra]


def _sysv_ids(what: str, key: int) -> list[int]:
    with open(f"/proc/sysvipc/{what}") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return [int(r[1]) for r in rows if r and int(r[0]) & 0xFFFFFFFF == key]


def _rmid(what: str, ipc_id: int) -> None:
    from upmig import _native as nat
    from upmig.syscalls import nr

    if what == "shm":
        nat.syscall(nr.shmctl, ipc_id, 0, 0, what="shmctl(IPC_RMID)")
    else:
        nat.syscall(nr.semctl, ipc_id, 0, 0, 0, what="semctl(IPC_RMID)")


def _wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise Hung(f"timed out waiting for {what}")
        time.sleep(0.01)  # a poll, with the deadline above


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.005)  # a poll, with the deadline above


class Harness:
    """Runs mutants against the victim's image: inspect, then resume, then the
    victim's own check; and looks for leftovers after each."""

    def __init__(self, workdir: Path, key: keys.Key, subprocess_every: int = 10):
        self.work = workdir
        self.key = key  # what upmig seals and resumes with here (UPMIG_KEY_FILE)
        self.victim = Victim(workdir)
        self.items = decode(self.victim.image)
        self.blob = Path(self.victim.image).read_bytes()
        self.subprocess_every = subprocess_every
        self.count = 0
        self.before = set(descendants(os.getpid()))
        self.named: set[str] = set()  # POSIX shm objects the mutant would make elsewhere

    def fuzz(self, well: int, raw_count: int, seed: int,
             report=lambda o: None) -> Figures:
        rnd = random.Random(seed)
        figs = Figures()
        began = time.monotonic()
        path = str(self.work / "mutant.upmig")
        for k in range(well + raw_count):
            if k < well:
                items, what = well_formed(self.items, rnd)
                try:
                    encode(items, path, self.key)
                except (OverflowError, TypeError, ValueError) as e:
                    # msgpack cannot hold it (an int past 64 bits): no image can
                    figs.outcomes.append(Outcome(what, "unencodable", detail=str(e)))
                    continue
                self.named = _named_objects(items)
            else:
                blob, what = raw(self.blob, rnd, self.items, path)
                Path(path).write_bytes(blob)
                self.named = set()
            o = replace(self.one(path, what), raw=k >= well)
            figs.outcomes.append(o)
            report(o)
        figs.seconds = time.monotonic() - began
        return figs

    def one(self, path: str, what: str) -> Outcome:
        self.count += 1
        real = self.subprocess_every and self.count % self.subprocess_every == 0
        run = self._subprocess if real else self._in_process
        watchdog = _Watchdog(HANG_SECONDS + 5)
        try:
            with _alarm(HANG_SECONDS):
                code, out, err = run("inspect", path)
                o = self._judge("inspect", code, err, what)
                if o.failure:
                    return o
                self.victim.reset()
                code, out, err = run("resume", path)
                o = self._judge("resume", code, err, what)
                if not o.failure and code == 0:
                    o = self._check_victim(out, what)
            return self._no_leftovers(o)
        except Hung as e:
            return self._no_leftovers(Outcome(what, "hung", "hang", str(e)))
        finally:
            watchdog.stop()

    def _argv(self, command: str, path: str) -> list[str]:
        if command == "inspect":  # its text and its JSON, in turn
            return [command, path] if self.count % 2 else [command, "--json", path]
        return [command, "--detach", "--json", path]

    def _in_process(self, command: str, path: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        argv = self._argv(command, path)
        try:
            with _the_program() as cli, contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(err):
                code = cli.main(argv)
        except Hung:
            raise
        except BaseException as e:  # noqa: BLE001 - a crash is what is looked for
            err.write("Traceback (in process):\n" + "".join(
                traceback.format_exception(type(e), e, e.__traceback__)))
            code = 1
        return code, out.getvalue(), err.getvalue()

    def _subprocess(self, command: str, path: str) -> tuple[int, str, str]:
        argv = self._argv(command, path)
        try:
            r = subprocess.run([*UPMIG, *argv], capture_output=True, text=True,
                               timeout=HANG_SECONDS)
        except subprocess.TimeoutExpired:
            raise Hung(f"upmig {command} ran over {HANG_SECONDS} s") from None
        return r.returncode, r.stdout, r.stderr

    def _judge(self, command: str, code: int, err: str, what: str) -> Outcome:
        lines = err.splitlines()
        if "Traceback" in err:
            return Outcome(what, f"{command} crashed", "traceback", err[-3000:])
        if code not in DOCUMENTED[command]:
            return Outcome(what, f"{command} exit {code}", "exit status", err)
        if code and (len(lines) != 1 or not lines[0].startswith("upmig: ")):
            return Outcome(what, f"{command} exit {code}", "not one line", err)
        if code:
            return Outcome(what, f"refused-{command} {code}", detail=lines[0])
        return Outcome(what, f"{command} ok")

    def _check_victim(self, out: str, what: str) -> Outcome:
        pid = json.loads(out)["pid"]
        os.kill(pid, signal.SIGTERM)
        status = None
        end = time.monotonic() + HANG_SECONDS
        while status is None and time.monotonic() < end:
            got, st = os.waitpid(pid, os.WNOHANG)
            status = st if got else None
            if status is None:
                time.sleep(0.005)  # a poll, with the deadline above
        if status is None:
            _kill_and_reap(pid)
            return Outcome(what, "resumed", "victim hung", "no exit after SIGTERM")
        said = self.victim.out.read_bytes()
        if os.waitstatus_to_exitcode(status) != 0 or said != self.victim.ready + b"PASS\n":
            return Outcome(what, "resumed", "victim failed",
                           f"status {status:#x}, said {said!r}")
        return Outcome(what, "resumed")

    def _no_leftovers(self, o: Outcome) -> Outcome:
        left = []
        for pid in set(descendants(os.getpid())) - self.before:
            # A process killed by a failed resume whose parent was killed too is a zombie
            # handed to the nearest subreaper (us) to reap, as any orphan is: not a
            # leftover. A live one is.
            if _state(pid) not in ("Z", "gone"):
                left.append(f"process {pid} ({_state(pid)})")
            _kill_and_reap(pid)
        left += self.victim.leftovers()
        for name in self.named - {str(self.victim.shm)}:
            if os.path.exists(name):  # (the mutant's own name: not there before)
                os.unlink(name)
                left.append(name)
        if left and not o.failure:
            return replace(o, failure="leftovers", detail=", ".join(left))
        return o


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _the_program():
    """upmig.cli, to call main() in this process. It is the program, not a library:
    importing it takes SIGINT, SIGTERM and SIGHUP, and main() returns with them
    blocked. Here both are given back after each call: a blocked SIGTERM would be
    inherited by every victim the tests start afterwards, which then never end."""
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        from upmig import cli
        yield cli
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _alarm(seconds: float):
    def fire(signum, frame):
        raise Hung(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Watchdog:
    """If the alarm cannot interrupt (a helper call blocked in C), kill what upmig
    started, which unblocks it."""

    def __init__(self, seconds: float):
        self.done = threading.Event()
        me = os.getpid()
        self.thread = threading.Thread(target=self._run, args=(seconds, me), daemon=True)
        self.thread.start()

    def _run(self, seconds: float, me: int) -> None:
        if not self.done.wait(seconds):
            for pid in descendants(me):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fuzz upmig with mutants of a real image.")
    p.add_argument("-n", type=int, default=2000, help="well-formed mutants")
    p.add_argument("--raw", type=int, default=None, help="raw mutants (default n/10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--subprocess-every", type=int, default=10,
                   help="run every Nth mutant through a real `upmig` process")
    p.add_argument("-v", "--verbose", action="store_true", help="print every mutant")
    a = p.parse_args(argv)
    ctypes_prctl_subreaper()
    with tempfile.TemporaryDirectory(prefix="upmig-fuzz-") as d:
        key = Path(d) / "key"  # a key of the run's own, as the tests have
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        os.environ[keys.ENV] = str(key)
        h = Harness(Path(d), keys.load(str(key)), a.subprocess_every)

        def report(o: Outcome) -> None:
            if a.verbose or o.failure:
                print(f"{'FAIL ' + o.failure if o.failure else o.result}: {o.mutant}"
                      f"{': ' + o.detail if o.failure or a.verbose else ''}", flush=True)

        figs = h.fuzz(a.n, a.n // 10 if a.raw is None else a.raw, a.seed, report)
    print(figs.summary())
    return 1 if figs.failures() else 0


def ctypes_prctl_subreaper() -> None:
    """Resumed processes come to us to be reaped (as in the tests' conftest)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


if __name__ == "__main__":
    sys.exit(main())
