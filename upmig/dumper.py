"""`upmig dump`: freeze, capture every kind of state, write one image, release.

The operation is STAGES, run in order on one `Dump`. The capture stages only
read: they return records, and PageSources saying where page bytes are, into
Dump.items in image order; one writer stage then writes them all. Every stage
registers on the operation's ExitStack what must happen however the dump ends:
files closed, the tree released (killed, stopped or running on, as the commit
decided; running on as before if the dump failed).

The process is precious: every check that can refuse runs before anything is
written; the image is written nameless (upmig.newfile) and sealed, and appears at
its path only when complete; on any failure it is gone and the process runs on.

Why the stages are in this order:
- The key, the cheap refusals and the hashing of mapped files come before the
  freeze, so a dump that cannot happen never stops the process.
- The output is opened before the freeze, and the guard that keeps signals from
  splitting the commit is registered before both: unwinding runs in reverse, so
  the freeze's release (the kill) happens inside it.
- The tree is captured from the top (a parent before its children) so that resume
  can rebuild it in that order; the SysV objects are the tree's and come first.
- Pending signals are read last in each process, every thread stopped, so one
  sent meanwhile is in the image."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from upmig import (
    __version__,
    _proc,
    critical,
    fileid,
    files,
    freeze,
    ghosts,
    image,
    inject,
    keys,
    memmap,
    regs,
    sharing,
    signals,
    sysv,
    task,
    threads,
    tree,
)
from upmig import _native as nat
from upmig.errors import CantMigrate, ImageError, NoSuchProcess, UpmigError, from_oserror
from upmig.fds import inet
from upmig.image import RUNS_PER_RECORD, ImageWriter, PageSource
from upmig.newfile import NewFile, Stream
from upmig.records import CowPages, Header, MappedFile, Process, Thread
from upmig.syscalls import nr

LEAVE = ("kill", "run", "stop")
STDOUT = "-"  # the image path that means standard output


@dataclass
class DumpResult:
    """What `upmig dump` did, for the command line and --json."""

    pid: int
    image: str
    image_bytes: int
    data_bytes: int
    vmas: int
    fds: int
    threads: int
    processes: int
    freeze_seconds: float   # seizing and stopping every thread
    frozen_seconds: float   # from stopped to released
    seconds: float


Progress = Callable[[str, int], None]


@dataclass
class Dump:
    """One dump: what was asked, and what has been taken so far."""

    pid: int
    image_path: str
    leave: str
    note: Progress
    ghost_limit: int | None
    tcp_established: bool
    shell_job: bool
    key_file: str | None
    undo: ExitStack
    commit_guard: ExitStack = field(default_factory=ExitStack)
    key: keys.Key | None = None
    known: dict[str, MappedFile] = field(default_factory=dict)  # hashed before the freeze
    out: NewFile | Stream | None = None
    fz: freeze.Tree | None = None
    repairs: inet.Repairs | None = None
    procs: list[Process] = field(default_factory=list)  # members first, then zombies
    maps: dict[int, list[_proc.MapsLine]] = field(default_factory=dict)  # read frozen
    items: list[Any] = field(default_factory=list)      # records and PageSources, in order
    written: set[int] = field(default_factory=set)      # ghosts whose bytes are in items
    vmas: int = 0
    fds: int = 0
    image_bytes: int = 0
    data_bytes: int = 0
    seizing: float = 0.0
    frozen_at: float = 0.0
    frozen: float = 0.0


def dump(pid: int, image_path: str, *, leave: str = "kill",
         progress: Progress | None = None, ghost_limit: int | None = None,
         tcp_established: bool = False, shell_job: bool = False,
         key_file: str | None = None) -> DumpResult:
    """Write an image of pid and all its descendants to image_path; then kill them
    (default), or leave them running ("run") or stopped ("stop"). On failure they run
    on untouched. ghost_limit: the most bytes a deleted-but-open file may hold (None:
    no limit). tcp_established: take established TCP connections along (TCP repair).
    shell_job: the tree's session and terminal belong to a shell outside it.
    key_file: the key that seals the image (upmig.keys; made if it does not exist).
    image_path "-" writes the image to standard output (a pipe or socket), which
    cannot be read back: with leave="kill" the process is killed once the last byte
    has gone out, so a reader that fails after that loses it."""
    if leave not in LEAVE:
        raise ValueError(f"leave must be one of {LEAVE}")
    began = time.perf_counter()
    with ExitStack() as undo:
        d = Dump(pid, image_path, leave, progress or (lambda step, n: None), ghost_limit,
                 tcp_established, shell_job, key_file, undo)
        undo.enter_context(d.commit_guard)  # first in, so last out: see the docstring
        for stage in STAGES:
            try:
                stage(d)
            except OSError as e:
                raise _explain(pid, e) from None
    fz = d.fz
    return DumpResult(pid, image_path, d.image_bytes, d.data_bytes, d.vmas, d.fds,
                      len(fz.tids), len(fz.members) + len(fz.zombies),
                      d.frozen_at - d.seizing, d.frozen, time.perf_counter() - began)


# ---- the stages of a dump

def load_key(d: Dump) -> None:
    d.key = keys.load(d.key_file, create=True)  # a key problem must not touch the process


def check_before_freezing(d: Dump) -> None:
    preflight(d.pid)


def identify_mapped(d: Dump) -> None:
    """Hashing data files is slow: done before the freeze, looked at again after."""
    for p in freeze.descendants(d.pid):
        d.known.update(_identify_mapped(p))


def open_output(d: Dump) -> None:
    try:
        d.out = Stream(1) if d.image_path == STDOUT else NewFile(d.image_path)
    except OSError as e:
        raise from_oserror(e, "cannot write the image", what=d.image_path) from None
    d.undo.callback(d.out.close)  # uncommitted, a new file is gone (it has no name)


def freeze_tree(d: Dump) -> None:
    d.seizing = time.perf_counter()
    d.fz = d.undo.enter_context(freeze.frozen(d.pid))
    d.frozen_at = time.perf_counter()


def take_tcp_repair(d: Dump) -> None:
    if d.tcp_established:
        d.repairs = inet.Repairs()
        d.fz.cleanups.append(d.repairs.release)


def capture_tree(d: Dump) -> None:
    """The tree's processes, checked as a whole, and what they share: the header,
    then the SysV objects, before any process's section."""
    for m in d.fz.members:
        preflight(m.pid)  # again, now that they are frozen
    d.procs = [tree.record(m.pid) for m in d.fz.members]
    d.procs += [tree.zombie_record(z) for z in d.fz.zombies]
    tree.check(d.procs, d.shell_job)
    uts = os.uname()
    d.items.append(Header(arch=uts.machine, kernel=uts.release, upmig_version=__version__,
                          created=time.time(), hostname=uts.nodename,
                          page_size=os.sysconf("SC_PAGE_SIZE"), pid=d.fz.pid))
    # Each process's maps, read once for what the tree shares (all are frozen).
    d.maps = {m.pid: _proc.parse_maps(_proc.read_text(m.pid, "maps")) for m in d.fz.members}
    ghosts.refuse_outsiders(d.maps)
    d.items += sysv.records_and_contents(sysv.capture(d.maps), d.undo)


def capture_processes(d: Dump) -> None:
    """Each live process's section, a parent before its children; then the zombies,
    each all in its Process record."""
    shared = sharing.scan(d.fz.members)
    live = {m.pid for m in d.fz.members}
    parents = {rec.pid: rec.ppid for rec in d.procs if rec.ppid in live and rec.pid in live}
    # Pages shared with the parent since fork, before any injection can touch one.
    cow = {pid: memmap.same_as_parent(pid, ppid, d.maps[pid]) for pid, ppid in parents.items()}
    for m, rec in zip(d.fz.members, d.procs, strict=False):
        d.items.append(rec)
        _capture_process(d, m, shared, parents.get(m.pid, 0), cow.get(m.pid, []))
    d.items += d.procs[len(d.fz.members):]


def write_image(d: Dump) -> None:
    w = ImageWriter(d.out.fd, d.key, progress=lambda n: d.note("pages", n))
    for item in d.items:
        w.write(item)
    w.finish()
    d.note("done", 0)
    d.image_bytes, d.data_bytes = w.off, w.data_bytes


def verify(d: Dump) -> None:
    """Read back what was written, when it is all that will be left of the process:
    every frame and record in place, the trailer right. (The seal's tags were made
    from these very bytes as they went out.) A stream cannot be read back; its
    reader checks every frame's seal."""
    if isinstance(d.out, NewFile):
        os.fsync(d.out.fd)
        if d.leave == "kill":
            d.note("verifying", 0)
            try:
                image.load(f"/proc/self/fd/{d.out.fd}").close()
            except ImageError as e:
                raise UpmigError(f"the image just written does not verify ({e.why}); the "
                                 "process was left running", pid=d.pid) from None
    if d.repairs:
        d.repairs.check_unchanged(d.pid)


def commit(d: Dump) -> None:
    """From the link to the kill, a signal to upmig must not leave an image and a
    live process both, nor neither; one that comes meanwhile is too late to stop it."""
    d.commit_guard.enter_context(critical.deferred(drain=True))
    d.out.commit()
    d.fz.on_release = d.leave
    d.note("committed", 0)
    d.frozen = time.perf_counter() - d.frozen_at


STAGES: tuple[Callable[[Dump], None], ...] = (
    load_key,
    check_before_freezing,
    identify_mapped,
    open_output,
    freeze_tree,
    take_tcp_repair,
    capture_tree,
    capture_processes,
    write_image,
    verify,
    commit,
)


# ---- one process

def preflight(pid: int) -> None:
    """Cheap refusals before the process is even frozen."""
    if pid == os.getpid():
        raise CantMigrate("is upmig itself", pid=pid)
    status = _proc.parse_status(_proc.read_text(pid, "status"))
    if status.get("State", "").startswith(("Z", "X")):
        if int(status.get("Threads", "1")) > 1:
            raise CantMigrate("its main thread has exited (pthread_exit) while other threads "
                              "run on; this is not supported yet", pid=pid)
        raise NoSuchProcess("is a zombie (it has exited)", pid=pid)
    if status.get("Seccomp", "0") != "0":
        raise CantMigrate("runs under a seccomp filter, which is not supported yet", pid=pid)
    if _proc.read_text(pid, "timers").strip():
        raise CantMigrate("has POSIX timers (timer_create), which are not supported yet",
                          pid=pid)
    for ns in ("pid", "mnt"):
        if _proc.readlink(pid, f"ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
            raise CantMigrate(f"runs in another {ns} namespace, which is not supported yet",
                              pid=pid)
    ppid = int(status.get("PPid", "0"))
    if ppid > 0:
        for kind, what in ((nat.KCMP_VM, "memory"), (nat.KCMP_FILES, "its file table")):
            if _shares(pid, ppid, kind):
                raise CantMigrate(f"shares {what} with its parent pid {ppid} (vfork or "
                                  "clone); this is not supported yet", pid=pid)


def _shares(pid: int, ppid: int, kind: int) -> bool:
    try:
        return nat.kcmp(pid, ppid, kind) == 0
    except (PermissionError, ProcessLookupError):
        # EPERM: a parent we may not look at (init, when a user dumps a daemon). A
        # process we may trace shares neither with it: a change of credentials
        # makes it undumpable until it execs, and exec leaves neither shared.
        # ESRCH: the parent has just exited.
        return False


def _identify_mapped(pid: int) -> dict[str, MappedFile]:
    maps = _proc.parse_maps(_proc.read_text(pid, "maps"))
    paths = {m.path for m in maps if m.path.startswith("/") and memmap.role_of(m) == "file"}
    found = {}
    for path in paths:
        try:
            found[path] = fileid.identify(path)
        except OSError:
            pass  # gone or odd: looked at again, and refused if need be, while frozen
    return found


def _capture_process(d: Dump, fz: freeze.Frozen, shared: sharing.TreeFds, parent: int,
                     cow: list[tuple[int, int]]) -> None:
    """One live process's records and page sources, into d.items. parent: its
    parent's PID if that is in the tree (and so in the image before it), else 0;
    cow: the pages it shares with that parent (memmap.same_as_parent)."""
    pid = fz.pid
    others = [t for t in fz.tids if t != pid]
    threads.check_creds(pid, others)
    d.note("registers", 0)
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    d.undo.callback(os.close, mem_fd)  # the writer reads hidden pages through it
    leader = regs.capture(pid, mem_fd)  # before injection moves the registers about
    d.note("state", 0)
    vdso = [m for m in _proc.parse_maps(_proc.read_text(pid, "maps")) if m.path == "[vdso]"]
    if not vdso:
        raise CantMigrate("has no [vdso] mapping; upmig needs one", pid=pid)
    gadget = inject.find_syscall_insn(mem_fd, vdso[0].start, vdso[0].end)
    with inject.pinned_with(pid), inject.session(pid, leader.regs, gadget, mem_fd) as s:
        sig = signals.capture(s, pid)
        tsk = task.capture(s, pid)
        threads.capture(s, pid, leader)
        brk = s.call(nr.brk, 0, what="brk(0)")
        thread_recs = [leader, *_capture_threads(s, pid, others)]
    # Pending signals last, every thread stopped: one sent meanwhile is in the image.
    threads.capture_pending(thread_recs)
    sig.pending_shared = nat.peek_siginfo(pid, shared=True)
    mm = memmap.capture_mm(pid, brk)
    vmas = memmap.list_vmas(pid)      # again: the scratch page is gone now
    fds, pipe_recs = files.capture(pid, fz.tids, d.repairs, shared)
    held = fileid.capture_held(pid, [r.fd for r in files.by_path(fds)])
    ghost_recs = ghosts.capture(pid, fds, vmas, d.ghost_limit)
    mapped = sorted({v.path for v in vmas if v.role == "file"} | {tsk.exe})
    identities = [fileid.still(d.known.get(p)) or fileid.identify(p) for p in mapped]
    d.note("pages", 0)
    runs = memmap.page_runs(pid, vmas)
    same = memmap.split_cow(vmas, runs, cow)
    d.items += [tsk, mm, sig, *thread_recs, *identities, *vmas, *fds, *held, *pipe_recs,
                *ghost_recs]
    # The page data in the order resume uses it: its ghost files exist before its
    # memory is mapped and filled.
    d.items += ghosts.contents(pid, ghost_recs, fds, vmas, d.written, d.undo)
    readable = [r for v in vmas if memmap.is_readable(v) for r in runs.get(v.start, [])]
    hidden = [r for v in vmas if not memmap.is_readable(v) for r in runs.get(v.start, [])]
    if readable:
        d.items.append(PageSource(pid, -1, readable))
    if hidden:
        d.items.append(PageSource(pid, mem_fd, hidden))  # /proc/PID/mem reads past mprotect
    for at in range(0, len(same), RUNS_PER_RECORD):  # records of bounded size
        part = same[at:at + RUNS_PER_RECORD]
        d.items.append(CowPages(source=parent, runs=[x for run in part for x in run]))
    d.vmas += len(vmas)
    d.fds += len(fds)


def _capture_threads(s: inject.Session, pid: int, tids: list[int]) -> list[Thread]:
    """Every thread but the leader, each from inside itself; the leader's scratch
    area (the memory is shared) holds the syscalls' arguments."""
    out = []
    for tid in tids:
        th = regs.capture(tid, s.mem_fd)
        with inject.pinned_with(pid, tid=tid), \
                inject.session(pid, th.regs, s.inj.gadget, s.mem_fd, tid, s.scratch) as ts:
            threads.capture(ts, pid, th)
        out.append(th)
    return out


def _explain(pid: int, e: OSError) -> UpmigError:
    # The process is frozen by us: whatever the error, it may have been killed meanwhile.
    if _gone(pid):
        return NoSuchProcess("exited during the dump", pid=pid)
    return from_oserror(e, pid=pid, phase="dump")


def _gone(pid: int) -> bool:
    try:
        state = _proc.parse_status(_proc.read_text(pid, "status")).get("State", "")
    except UpmigError:
        return True
    return state.startswith(("Z", "X"))
