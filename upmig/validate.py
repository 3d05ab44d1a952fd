"""Every record of an image is checked before anything uses it.

upmig.image hands each record to a Validator as it is read: where it may come (the
header first, SysV objects before the first process, a zombie's section empty),
how many of a kind there may be (so an image of a million VMAs is refused in a
moment, not after seconds and gigabytes), and every field against its schema
(upmig.schema). Once all are read, finish() checks what records say about each
other: the tree is a tree, every process has its task, mm, signals and threads,
every VMA, fd and pages record names something that exists, pages lie inside the
mappings they fill, and the files resume makes are not much bigger than what the
image stores for them.

A violation is Corrupt (exit 6), one line naming the record, its process and the
field, so resume and inspect never act on a field the code using it did not
expect (a KeyError deep in a restore stage, uid -1 meaning "unchanged" to
setresuid, a page written where no mapping is):

    image.upmig: record vma #3 of pid 42: start 0x0 is below vm.mmap_min_addr (0x10000)
"""

from __future__ import annotations

import bisect
from collections import Counter
from operator import attrgetter
from typing import Any

from upmig import schema, tree
from upmig._native import PAGE
from upmig.errors import CantMigrate, Corrupt
from upmig.fds import registry
from upmig.fds.epoll import EpollFd
from upmig.fds.fifo import FifoFd
from upmig.fds.ghost import GhostFd
from upmig.fds.inherit import InheritFd
from upmig.fds.pipe import PipeEnd, PipeFd
from upmig.fds.unix import UnixPairFd
from upmig.records import (
    MM,
    CowPages,
    Fd,
    FileIdentity,
    Ghost,
    Header,
    MappedFile,
    Pages,
    Pipe,
    Process,
    Signals,
    SysvSem,
    SysvShm,
    Task,
    Thread,
    Vma,
)

# ---- bounds: records beyond these are refused as they are read

MAX_MAP_COUNT = schema._sysctl("vm/max_map_count", 65530)
MAX_RECORDS = 1 << 22
MAX_RUNS = 1 << 23            # page runs in the whole image (a run is at least a page)
PER_IMAGE = {"header": 1, "process": 1 << 15, "sysv_shm": 1 << 15, "sysv_sem": 1 << 15}
PER_PROCESS = {               # a process has at most this many records of a kind
    "task": 1, "mm": 1, "signals": 1, "thread": 1 << 16,
    "vma": 2 * MAX_MAP_COUNT, "mapped_file": 2 * MAX_MAP_COUNT,
    "fd": schema.FD_MAX + 1,  # of every kind of fd together
    "file_identity": schema.FD_MAX + 2, "pipe": schema.FD_MAX + 1,
    "ghost": schema.FD_MAX + 1 + 2 * MAX_MAP_COUNT,
    "pages": 1 << 16, "cow_pages": 1 << 16,
}
BEFORE_PROCESSES = ("header", "sysv_shm", "sysv_sem", "pages")  # the tree's, not a process's
SECTION_KINDS = {"process", "task", "mm", "signals", "thread", "vma", "mapped_file", "pages",
                 "cow_pages", "file_identity", "pipe", "ghost", *registry.RECORDS}
# Ghost files and SysV segments are made at their full size on resume and filled with
# the bytes the image stores; the rest are holes. Holes cost nothing until touched,
# but a file of that size is left (a POSIX object in /dev/shm, a deleted file's
# directory) and a program touching its region commits memory. A real program's
# shared memory is mostly touched or modest, so its image stores most of it; a 4 TiB
# object claimed by a 1 MiB image is an attack or a bug. So holes are bounded by
# what the image stores. (A real process past these bounds is refused by its own
# dump, whose image does not verify, before it is killed.)
HOLES_FREE = 1 << 30          # holes any one object may have, whatever it stores
HOLES_TOTAL_FREE = 4 << 30    # holes all objects together may have
HOLES_PER_STORED = 16         # and more, this many bytes per byte stored
VSYSCALL = (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000)  # a thread may be stopped in it


class Validator:
    """Fed every record of an image in order (add), then the image itself (finish)."""

    def __init__(self, path: str):
        self.path = path
        self.records = 0
        self.runs = 0
        self.pid: int | None = None     # the process whose section is being read
        self.allowed = {"header"}       # the kinds of record that may come next
        self.top: dict[str, list] = {}  # the records before the first process, by kind
        self.sections: list[dict[str, list]] = []  # each process's records, by kind
        self.here = self.top            # where the next record goes
        self.processes: list[Process] = []
        self.pages: list[tuple[Pages, int | None, int]] = []  # each, with its pid and index

    def fail(self, where: str, why: str) -> Corrupt:
        return Corrupt(f"{where}: {why}", what=self.path)

    def where(self, kind: str, index: int, pid: int | None = None) -> str:
        return f"record {kind} #{index}" + (f" of pid {pid}" if pid is not None else "")

    def add(self, rec: Any) -> None:
        """Check one record, just read, before the next is."""
        kind = rec.kind
        recs = self.processes if kind == "process" else self.here.setdefault(kind, [])
        index = len(recs)
        fast = schema.FAST.get(kind)
        if fast and kind in self.allowed and index < PER_PROCESS[kind] and \
                self.records < MAX_RECORDS and fast(rec):
            recs.append(rec)  # the bulk of a big image: what is wrong is worked out below
            self.records += 1
            return
        pid = None if kind == "process" else self.pid
        try:
            if kind not in self.allowed:
                raise _Bad(self._misplaced(kind))
            _fields(rec)
            self._bounds(kind, rec, index)
        except _Bad as e:
            raise self.fail(self.where(kind, index, pid), str(e)) from None
        recs.append(rec)
        self.records += 1
        if isinstance(rec, Fd):  # every kind's, in order, for the cross-references
            self.here.setdefault("fd", []).append(rec)
        if kind == "header":
            self.allowed = {*BEFORE_PROCESSES, "process"} - {"header"}
        elif kind == "process":
            self.pid, self.here = rec.pid, {}
            self.sections.append(self.here)
            self.allowed = {"process"} if rec.zombie else SECTION_KINDS
        elif kind == "pages":
            self.pages.append((rec, pid, index))

    def _misplaced(self, kind: str) -> str:
        if self.records == 0 or kind == "header":
            return "the header comes first, and only there"
        if self.pid is None:
            return "comes before any process record"
        if kind in BEFORE_PROCESSES:
            return "comes after the first process record"
        return f"pid {self.pid} is a zombie: it has no records but its process record"

    def _bounds(self, kind: str, rec: Any, index: int) -> None:
        if self.records >= MAX_RECORDS:
            raise _Bad(f"the image has more than {MAX_RECORDS} records")
        if kind == "pages" and self.pid is None and \
                schema.pages_target(rec.target)[0] != "sysv":
            raise _Bad(f"target {rec.target!r}: only a SysV segment's pages come before the "
                       "processes")
        if kind in ("pages", "cow_pages"):
            self.runs += len(rec.runs) // 2
            if self.runs > MAX_RUNS:
                raise _Bad(f"the image has more than {MAX_RUNS} page runs")
        if index >= PER_IMAGE.get(kind, MAX_RECORDS):
            raise _Bad(f"the image has more than {PER_IMAGE[kind]} {kind} records")
        if index >= PER_PROCESS.get(kind, MAX_RECORDS):
            raise _Bad(f"pid {self.pid} has more than {PER_PROCESS[kind]} {kind} records")
        if isinstance(rec, Fd) and len(self.here.get("fd", ())) >= PER_PROCESS["fd"]:
            raise _Bad(f"pid {self.pid} has more than {PER_PROCESS['fd']} fd records")

    def finish(self, img) -> None:
        """Cross-references, once every record has been read (img: an image.Image)."""
        _CrossCheck(self, img).run()


class _Bad(Exception):
    """What is wrong with the record being added (named by Validator.add)."""


def _fd_rule(handler: registry.Kind):
    def rule(f: Fd):
        return schema.fd_rule(f) or handler.rule(f)
    return rule


# Each kind's fields fetched at once, and checked in order.
_SCHEMA = {kind: (attrgetter(*checks), tuple(checks.items()), schema.RULES.get(kind))
           for kind, checks in schema.FIELDS.items()}
_SCHEMA.update({kind: (attrgetter(*checks), tuple(checks.items()), _fd_rule(registry.HANDLERS[cls]))
                for kind, cls in registry.RECORDS.items()
                for checks in ({**schema.FD_FIELDS, **cls.checks},)})


def _fields(rec: Any) -> None:
    fast = schema.FAST.get(rec.kind)
    if fast and fast(rec):
        return
    getter, checks, rule = _SCHEMA[rec.kind]
    for (name, check), value in zip(checks, getter(rec), strict=True):
        why = check(value)
        if why is not None:
            raise _Bad(_field(name, why))
    broken = rule(rec) if rule else None
    if broken:
        raise _Bad(_field(*broken))


def _field(name: str, why: str) -> str:
    return f"{name}{why}" if why[0] in "[." else f"{name} {why}"


def _pairs(flat: list) -> list[tuple[int, int]] | None:
    """Runs [start0, end0, ...] as pairs, if they are page-aligned non-empty ranges."""
    if len(flat) % 2:
        return None
    runs = list(zip(flat[0::2], flat[1::2], strict=True))
    for a, b in runs:
        if type(a) is not int or type(b) is not int or not 0 <= a < b or (a | b) % PAGE:
            return None
    return runs


class _CrossCheck:
    """What the records of a whole image say about each other."""

    def __init__(self, v: Validator, img):
        self.v = v
        self.img = img
        self.sections = img.sections
        self.kinds = {id(sec): kinds for sec, kinds in zip(img.sections, v.sections, strict=True)}
        self.live = [s for s in self.sections if not s.process.zombie]
        self.vmas: dict[int, list[Vma]] = {}   # pid -> its vmas, for its children's cow pages
        self.ids: set[int] = {s.process.pid for s in self.sections}  # pids and tids seen
        self.ghosts: dict[int, Ghost] = {}
        self.shm = {s.id: s for s in self.everywhere(SysvShm)}

    def of(self, sec, cls: type) -> list:
        """A section's records of a kind (as sec.of(cls), without a pass over them all)."""
        return self.kinds[id(sec)].get(cls.kind, [])

    def everywhere(self, cls: type) -> list:
        """The records of a kind that come before the processes (SysV objects)."""
        return self.v.top.get(cls.kind, [])

    def fail(self, where: str, why: str) -> Corrupt:
        return self.v.fail(where, why)

    def run(self) -> None:
        if not self.sections:
            raise self.fail("the image", "holds no process")
        self._tree()
        self._sysv()
        for sec in self.live:
            self._process(sec)
        self._descriptions()
        self._pipe_records()
        self._contents()

    # -- the tree

    def _tree(self) -> None:
        procs = [s.process for s in self.sections]
        root = procs[0]
        head: Header = self.img.records[0]
        if root.zombie:
            raise self.fail("record process #0", f"pid {root.pid}, the root, is a zombie")
        if head.pid != root.pid:
            raise self.fail("record header #0", f"pid {head.pid} is not the root process's "
                                                f"({root.pid})")
        seen: dict[int, Process] = {}
        for i, p in enumerate(procs):
            if p.pid in seen:
                raise self.fail(f"record process #{i}", f"pid {p.pid} comes twice")
            parent = seen.get(p.ppid)
            if i and (parent is None or parent.zombie):
                raise self.fail(f"record process #{i}", f"ppid {p.ppid} is not a live process "
                                                        "before it in the image")
            seen[p.pid] = p
        try:
            tree.check(procs, shell_job=True)  # what dump itself would refuse
        except CantMigrate as e:
            i = next(i for i, p in enumerate(procs) if p.pid == e.pid)
            raise self.fail(f"record process #{i} (pid {e.pid})", e.why) from None

    def _sysv(self) -> None:
        for kind, recs in (("sysv_shm", self.everywhere(SysvShm)),
                           ("sysv_sem", self.everywhere(SysvSem))):
            ids, keys = set(), set()
            for i, r in enumerate(recs):
                if r.id in ids or (r.key and r.key in keys):
                    raise self.fail(f"record {kind} #{i}", f"id {r.id} or key {r.key:#x} "
                                                           "comes twice")
                ids.add(r.id)
                keys.add(r.key)

    # -- one process

    def _process(self, sec) -> None:
        pid = sec.process.pid
        of = f" of pid {pid}"
        for cls in (Task, MM, Signals):
            if len(self.of(sec, cls)) != 1:
                raise self.fail(f"pid {pid}", f"has no {cls.kind} record")
        task: Task = self.of(sec, Task)[0]
        if task.pid != pid:
            raise self.fail(f"record task #0{of}", f"pid {task.pid} is not its process's")
        self._threads(sec, pid)
        vmas = self.of(sec, Vma)
        self._vmas(sec, pid, vmas, task)
        self.vmas[pid] = vmas
        self._pages(sec, pid, vmas)
        self._threads_run(sec, pid, vmas)
        self._fds(sec, pid)

    def _threads(self, sec, pid: int) -> None:
        threads = self.of(sec, Thread)
        if not threads:
            raise self.fail(f"pid {pid}", "has no thread record")
        if threads[0].tid != pid:
            raise self.fail(f"record thread #0 of pid {pid}", f"tid {threads[0].tid} is not "
                                                               "the main thread's (it comes first)")
        for i, t in enumerate(threads[1:], 1):
            if t.tid in self.ids:
                raise self.fail(f"record thread #{i} of pid {pid}", f"tid {t.tid} is taken by "
                                                                     "another thread or process")
            self.ids.add(t.tid)

    def _threads_run(self, sec, pid: int, vmas: list[Vma]) -> None:
        """A thread goes on where it stopped: in code, in an executable mapping."""
        starts = [v.start for v in vmas]
        for i, t in enumerate(self.of(sec, Thread)):
            rip = schema.rip(t)
            at = _containing(starts, vmas, rip, rip + 1)
            if not (at >= 0 and vmas[at].perms[2] == "x") and \
                    not VSYSCALL[0] <= rip < VSYSCALL[1]:
                raise self.fail(f"record thread #{i} of pid {pid}", f"regs: rip {rip:#x} is "
                                                                     "not in an executable mapping")

    def _vmas(self, sec, pid: int, vmas: list[Vma], task: Task) -> None:
        of = f" of pid {pid}"
        files = self._unique(self.of(sec, MappedFile), "path", of)
        ghosts = self._unique(self.of(sec, Ghost), "id", of)
        for g in ghosts.values():
            if self.ghosts.setdefault(g.id, g) != g:
                raise self.fail(f"ghost {g.id}{of}", "differs from the same ghost's record in "
                                                    "an earlier process")
        self.vdso = [v for v in vmas if v.role in schema.memmap.VDSO_ROLES]
        roles = Counter(v.role for v in self.vdso)
        for role in ("vdso", "vvar", "vvar_vclock"):
            if roles[role] > 1 or (role == "vdso" and roles[role] != 1):
                raise self.fail(f"pid {pid}", f"has {roles[role]} {role} mappings")
        for i, v in enumerate(vmas):
            where = f"record vma #{i}{of}"
            if i and v.start < vmas[i - 1].end:
                raise self.fail(where, f"start {v.start:#x} is below the end of the vma before "
                                       f"it ({vmas[i - 1].end:#x}): vmas come in order, apart")
            if v.role == "file" and v.path not in files:
                raise self.fail(where, f"path {v.path!r} has no mapped_file record (its "
                                       "identity, checked before it is mapped)")
            if v.role == "ghost" and v.ghost not in ghosts:
                raise self.fail(where, f"ghost {v.ghost} names no ghost record of pid {pid}")
            if v.role == "sysv":
                self._sysv_vma(where, v, vmas)
        if task.exe not in files:
            raise self.fail(f"record task #0{of}", f"exe {task.exe!r} has no mapped_file record")

    def _sysv_vma(self, where: str, v: Vma, vmas: list[Vma]) -> None:
        """The segment is attached whole at start - offset before anything else is
        mapped (upmig.sysv.attach): only the vdso block is there already."""
        seg = self.shm.get(v.ghost)
        if seg is None:
            raise self.fail(where, f"ghost {v.ghost} names no sysv_shm record")
        base, size = v.start - v.offset, -(-seg.size // PAGE) * PAGE
        if v.offset + v.end - v.start > size:
            raise self.fail(where, f"offset {v.offset:#x} and size {v.end - v.start:#x} go "
                                   f"past the SysV segment's {seg.size} bytes")
        if base < schema.MMAP_MIN_ADDR:
            raise self.fail(where, f"the segment would be attached at {base:#x}, below "
                                   "vm.mmap_min_addr")
        for other in self.vdso:
            if other.start < base + size and base < other.end:
                raise self.fail(where, f"the segment, attached whole at {base:#x}, would "
                                       f"cover the [{other.role}] at {other.start:#x}")

    def _unique(self, recs: list, key: str, of: str) -> dict:
        out = {}
        for i, r in enumerate(recs):
            k = getattr(r, key)
            if k in out:
                raise self.fail(f"record {r.kind} #{i}{of}", f"{key} {k!r} comes twice")
            out[k] = r
        return out

    def _pages(self, sec, pid: int, vmas: list[Vma]) -> None:
        """Pages fill private mappings of the process, each page once, as much of each
        VMA as its data_bytes and cow_bytes say."""
        starts = [v.start for v in vmas]
        stored, same = [0] * len(vmas), [0] * len(vmas)
        every: list[tuple[int, int]] = []
        for i, (rec, pd) in enumerate(zip(self.of(sec, Pages), sec.pages, strict=True)):
            if not rec.target:
                where = f"record pages #{i} of pid {pid}"
                self._runs_in(where, pd.runs, vmas, starts, stored)
                every += pd.runs
        parent = sec.process.ppid
        for i, rec in enumerate(self.of(sec, CowPages)):
            where = f"record cow_pages #{i} of pid {pid}"
            runs = _pairs(rec.runs)
            if runs is None:
                raise self.fail(where, "runs are not page-aligned ranges")
            if rec.source != parent or parent not in self.vmas:
                raise self.fail(where, f"source {rec.source} is not its parent, rebuilt before it")
            theirs = self.vmas[parent]
            self._runs_in(where, runs, theirs, [v.start for v in theirs], [0] * len(theirs))
            self._runs_in(where, runs, vmas, starts, same)
            every += runs
        every.sort()
        for (_, b), (c, _) in zip(every, every[1:], strict=False):
            if c < b:
                raise self.fail(f"pid {pid}", f"has pages at {c:#x} twice")
        for i, v in enumerate(vmas):
            if (stored[i], same[i]) != (v.data_bytes, v.cow_bytes):
                name, said, got = ("data_bytes", v.data_bytes, stored[i]) \
                    if stored[i] != v.data_bytes else ("cow_bytes", v.cow_bytes, same[i])
                raise self.fail(f"record vma #{i} of pid {pid}", f"{name} is {said}, but the "
                                                                   f"image holds {got} for it")

    def _runs_in(self, where: str, runs, vmas: list[Vma], starts: list[int],
                 tally: list[int]) -> None:
        for a, b in runs:
            i = _containing(starts, vmas, a, b)
            if i < 0:
                raise self.fail(where, f"run {a:#x}-{b:#x} is not inside one vma")
            v = vmas[i]
            if v.perms[3] == "s" or v.role in schema.memmap.VDSO_ROLES:
                raise self.fail(where, f"run {a:#x}-{b:#x} is in a {v.role} mapping whose "
                                       "contents are not the process's to store")
            tally[i] += b - a

    def fd_where(self, sec, f: Fd) -> str:
        """"record fd_pipe #2 of pid 42": f by its kind and its index among them."""
        i = next(i for i, r in enumerate(self.kinds[id(sec)][f.kind]) if r is f)
        return f"record {f.kind} #{i} of pid {sec.process.pid}"

    def _fds(self, sec, pid: int) -> None:
        of = f" of pid {pid}"
        ghosts = {g.id for g in self.of(sec, Ghost)}
        by_fd: dict[int, Fd] = {}
        ends: set[tuple[int, str]] = set()
        for f in self.of(sec, Fd):
            if f.fd in by_fd:
                where = self.fd_where(sec, f)
                raise self.fail(where, f"fd {f.fd} comes twice")
            first = by_fd.get(f.shared_with)
            if f.shared_with >= 0 and (first is None or first.shared_with >= 0):
                raise self.fail(self.fd_where(sec, f), f"shared_with {f.shared_with} is not an "
                                                       "fd before it, holding its own description")
            if first is not None and _description(first) != _description(f):
                raise self.fail(self.fd_where(sec, f), f"shares fd {first.fd}'s description, "
                                                       "but not its kind, object, flags or offset")
            if isinstance(f, GhostFd) and f.ghost not in ghosts:
                raise self.fail(self.fd_where(sec, f), f"ghost {f.ghost} names no ghost record "
                                                       f"of pid {pid}")
            if isinstance(f, PipeFd) and f.shared_with < 0:
                if (f.pipe, f.end) in ends:
                    raise self.fail(self.fd_where(sec, f), "holds a pipe end another fd holds "
                                                           "through another description")
                ends.add((f.pipe, f.end))
            by_fd[f.fd] = f
        for i, rec in enumerate(self.of(sec, FileIdentity)):
            if rec.fd != -1 and rec.fd not in by_fd:
                raise self.fail(f"record file_identity #{i}{of}", f"fd {rec.fd} is not an fd "
                                                                  "of the process")
        self._unique(self.of(sec, FileIdentity), "fd", of)
        for f in self.of(sec, EpollFd):
            for k, (tfd, *_rest) in enumerate(f.watches):
                if tfd not in by_fd or tfd == f.fd:
                    raise self.fail(self.fd_where(sec, f), f"watches[{k}] fd {tfd} is not "
                                                           "another fd of the process")

    # -- what processes share

    def _descriptions(self) -> None:
        """Each pipe, socket pair and open file description is made by the first process
        holding it and taken by the others (upmig.sharing): what the making process
        needs must be in its records, and a taken fd must be of what was made."""
        made: dict[int, str] = {}  # description id -> the type of fd it was made as
        for sec in self.live:
            fds = self.of(sec, Fd)
            pipes = {p.id: p for p in self.of(sec, Pipe)}
            ends = {(f.pipe, f.end) for f in fds if isinstance(f, PipeFd) and f.shared_with < 0}
            pairs = {f.ino: f for f in fds if isinstance(f, UnixPairFd) and f.shared_with < 0}
            new: dict[int, str] = {}
            for f in fds:
                if f.shared_with >= 0 or isinstance(f, InheritFd):
                    continue
                if f.desc in made:
                    if made[f.desc] != f.kind:
                        raise self.fail(self.fd_where(sec, f), f"desc {f.desc} is a "
                                        f"{made[f.desc]} made by an earlier process, not a "
                                        f"{f.kind}")
                    continue
                if isinstance(f, PipeFd):
                    self._pipe_made(self.fd_where(sec, f), f, pipes, ends, new)
                if isinstance(f, UnixPairFd):
                    self._pair_made(self.fd_where(sec, f), f, pairs, new)
                if f.desc:
                    new[f.desc] = f.kind
            made.update(new)

    def _pipe_records(self) -> None:
        """A pipe record is of a pipe or FIFO its process holds, the first in the tree
        to hold it (the others take it made, or find the FIFO filled); and a FIFO's
        first holder has one."""
        before: set[int] = set()  # pipes and FIFOs earlier processes hold
        for sec in self.live:
            of = f" of pid {sec.process.pid}"
            fds = self.of(sec, Fd)
            held = {f.pipe for f in fds if isinstance(f, PipeEnd)}
            pipes = self._unique(self.of(sec, Pipe), "id", of)
            for i, p in enumerate(pipes.values()):
                if p.id not in held or p.id in before:
                    raise self.fail(f"record pipe #{i}{of}", f"id {p.id} is no pipe or FIFO "
                                                            "this process is the first to hold")
            for f in fds:
                if isinstance(f, FifoFd) and f.pipe not in before and f.pipe not in pipes:
                    raise self.fail(self.fd_where(sec, f), f"pipe {f.pipe}: the FIFO has no pipe "
                                                           "record in its first holder's records")
            before |= held

    def _pipe_made(self, where: str, f: PipeFd, pipes: dict[int, Pipe], ends: set,
                   new: dict[int, str]) -> None:
        pipe = pipes.get(f.pipe)
        if pipe is None:
            raise self.fail(where, f"pipe {f.pipe} names no pipe record of this process, nor "
                                   "one an earlier process made")
        other = "w" if f.end == "r" else "r"
        if (f.pipe, other) not in ends:  # a later process holds it: parked under its id
            if other not in pipe.ends:
                raise self.fail(where, f"the pipe's {other!r} end is held by no fd of this "
                                       "process, and its pipe record has no id for it")
            if pipe.ends[other]:
                new[pipe.ends[other]] = PipeFd.kind

    def _pair_made(self, where: str, f: UnixPairFd, pairs: dict[int, UnixPairFd],
                   new: dict[int, str]) -> None:
        peer = pairs.get(f.peer)
        if peer is not None:
            if peer.peer != f.ino:
                raise self.fail(where, f"peer {f.peer} has another peer")
            return
        if not f.peer_desc:
            raise self.fail(where, "peer_desc is 0: its other end is in no fd of this process "
                                   "(which would make the pair for the process holding it)")
        new[f.peer_desc] = UnixPairFd.kind

    def _contents(self) -> None:
        """The pages of ghosts and SysV segments: of objects the image holds, inside
        them; and no object much bigger than what is stored for it (HOLES_*)."""
        objects: dict[str, Any] = {f"ghost:{i}": g for i, g in self.ghosts.items()}
        objects.update({f"sysv:{i}": s for i, s in self.shm.items()})
        stored = Counter()
        for (rec, pid, index), pd in zip(self.v.pages, self.img.pages, strict=True):
            if not rec.target:
                continue
            where = self.v.where("pages", index, pid)
            obj = objects.get(rec.target)
            if obj is None:
                raise self.fail(where, f"target {rec.target!r} names no record of the image")
            for a, b in pd.runs:
                if a < 0 or b > obj.size:
                    raise self.fail(where, f"run {a:#x}-{b:#x} is not within the {obj.size} "
                                           f"bytes of {rec.target}")
                if a % PAGE or (b % PAGE and b != obj.size):  # as SEEK_DATA/SEEK_HOLE find them
                    raise self.fail(where, f"run {a:#x}-{b:#x} is not page-aligned (but at the "
                                           f"end of {rec.target})")
                stored[rec.target] += b - a
        holes = 0
        for name, obj in objects.items():
            extra = obj.size - stored[name]
            holes += extra
            if extra > max(HOLES_FREE, HOLES_PER_STORED * stored[name]):
                raise self.fail(f"{name} ({obj.kind})", f"size {obj.size} is {extra} bytes more "
                                                        "than the image stores for it")
        total = sum(stored.values())
        if holes > max(HOLES_TOTAL_FREE, HOLES_PER_STORED * total):
            raise self.fail("the image", f"its ghosts and SysV segments are {holes} bytes more "
                                         f"than it stores for them ({total})")


def _description(f: Fd) -> tuple:
    """What fds sharing one open file description have the same."""
    return f.kind, registry.handler(f).refers_to(f), f.flags, f.pos, f.desc


def _containing(starts: list[int], vmas: list[Vma], a: int, b: int) -> int:
    """The index of the vma holding [a, b), or -1 (starts: the vmas' starts, sorted)."""
    i = bisect.bisect_right(starts, a) - 1
    return i if i >= 0 and b <= vmas[i].end else -1
