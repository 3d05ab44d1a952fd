"""`upmig dump`: freeze, capture every kind of state, write one image, release.

The process is precious: every check that can refuse runs before anything is
written; the image is written nameless (upmig.newfile) and sealed, and appears at
its path only when complete; on any failure it is gone and the process runs on."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from upmig import (
    __version__,
    _proc,
    critical,
    fileid,
    files,
    freeze,
    ghosts,
    image,
    inet,
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
from upmig.errors import CantMigrate, ImageError, NoSuchProcess, UpmigError, describe_oserror
from upmig.image import RUNS_PER_RECORD, ImageWriter
from upmig.newfile import NewFile, Stream
from upmig.records import CowPages, Header, MappedFile, Thread
from upmig.syscalls import nr

LEAVE = ("kill", "run", "stop")
STDOUT = "-"  # the image path that means standard output


@dataclass
class DumpResult:
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
    note = progress or (lambda step, n: None)
    key = keys.load(key_file, create=True)  # a key problem must not touch the process
    preflight(pid)
    known: dict[str, MappedFile] = {}
    for p in freeze.descendants(pid):  # hashing data files is slow: do it before freezing
        known.update(_identify_mapped(p))
    commit = ExitStack()
    out: NewFile | Stream | None = None
    try:
        # Inside the cleanup's reach: a signal just after the open must not leave the
        # file behind (and it has no name until it is committed: SIGKILL leaves nothing).
        try:
            out = Stream(1) if image_path == STDOUT else NewFile(image_path)
        except OSError as e:
            raise UpmigError(f"cannot write the image: {e.strerror}",
                             what=image_path) from None
        seizing = time.perf_counter()
        with freeze.frozen(pid) as fz:
            frozen_at = time.perf_counter()
            repairs = inet.Repairs() if tcp_established else None
            if repairs:
                fz.cleanups.append(repairs.release)
            try:
                size, data, nvma, nfd = _capture_and_write(fz, out.fd, key, note, known,
                                                           ghost_limit, repairs, shell_job)
                if isinstance(out, NewFile):
                    os.fsync(out.fd)
                if leave == "kill" and isinstance(out, NewFile):
                    # The image is all that will be left of it. (A stream cannot be
                    # read back; its reader checks every frame's seal.)
                    note("verifying", 0)
                    _verify(f"/proc/self/fd/{out.fd}", pid)
                if repairs:
                    repairs.check_unchanged(pid)
            except OSError as e:
                raise _explain(pid, e) from None
            # The commit: from the link to the kill, a signal to upmig must not
            # leave an image and a live process both, nor neither; one that comes
            # meanwhile is too late to stop it.
            commit.enter_context(critical.deferred(drain=True))
            out.commit()
            fz.on_release = leave
            note("committed", 0)
            frozen = time.perf_counter() - frozen_at
    finally:
        if out is not None:
            out.close()
        commit.close()
    return DumpResult(pid, image_path, size, data, nvma, nfd, len(fz.tids),
                      len(fz.members) + len(fz.zombies), frozen_at - seizing, frozen,
                      time.perf_counter() - began)


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
            if nat.lib.up_kcmp(pid, ppid, kind, 0, 0) == 0:
                raise CantMigrate(f"shares {what} with its parent pid {ppid} (vfork or "
                                  "clone); this is not supported yet", pid=pid)


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


def _verify(path: str, pid: int) -> None:
    """Read back what was written: every frame and record in place, the trailer
    right. (The checksums were computed from these very bytes as they went out.)"""
    try:
        image.load(path).close()
    except ImageError as e:
        raise UpmigError(f"the image just written does not verify ({e.why}); the process "
                         "was left running", pid=pid) from None


def _capture_and_write(fz: freeze.Tree, fd: int, key: keys.Key, note: Progress,
                       known: dict[str, MappedFile], ghost_limit: int | None,
                       repairs: inet.Repairs | None, shell_job: bool
                       ) -> tuple[int, int, int, int]:
    for m in fz.members:
        preflight(m.pid)  # again, now that they are frozen
    procs = [tree.record(m.pid) for m in fz.members]
    procs += [tree.zombie_record(z) for z in fz.zombies]
    tree.check(procs, shell_job)
    # Each process's maps, read once for what the tree shares (all are frozen).
    maps = {m.pid: _proc.parse_maps(_proc.read_text(m.pid, "maps")) for m in fz.members}
    ghosts.refuse_outsiders(maps)
    ipc = sysv.capture(maps)
    shared = sharing.scan(fz.members)
    w = ImageWriter(fd, key, progress=lambda n: note("pages", n))
    uts = os.uname()
    w.record(Header(arch=uts.machine, kernel=uts.release, upmig_version=__version__,
                    created=time.time(), hostname=uts.nodename,
                    page_size=os.sysconf("SC_PAGE_SIZE"), pid=fz.pid))
    sysv.write(w, ipc)  # the tree's, before any process's section
    nvma = nfd = 0
    written: set[int] = set()  # ghosts whose bytes are in the image already
    live = {m.pid for m in fz.members}
    parents = {rec.pid: rec.ppid for rec in procs if rec.ppid in live and rec.pid in live}
    cow = {pid: memmap.same_as_parent(pid, ppid, maps[pid]) for pid, ppid in parents.items()}
    for m, rec in zip(fz.members, procs, strict=False):
        w.record(rec)
        v, f = _capture_process(w, m, note, known, ghost_limit, repairs, shared, written,
                                parents.get(m.pid, 0), cow.get(m.pid, []))
        nvma, nfd = nvma + v, nfd + f
    for rec in procs[len(fz.members):]:
        w.record(rec)  # a zombie is all in its Process record
    w.finish()
    note("done", 0)
    return w.off, w.data_bytes, nvma, nfd


def _capture_process(w: ImageWriter, fz: freeze.Frozen, note: Progress,
                     known: dict[str, MappedFile], ghost_limit: int | None,
                     repairs: inet.Repairs | None, shared: sharing.TreeFds,
                     written: set[int], parent: int, cow: list[tuple[int, int]]
                     ) -> tuple[int, int]:
    """One live process's records and page data; (vmas, fds) written. written: the
    ghosts whose bytes an earlier process of the tree has written; parent: its
    parent's PID if that is in the tree (and so in the image before it), else 0;
    cow: the pages it shares with that parent (memmap.same_as_parent)."""
    pid = fz.pid
    others = [t for t in fz.tids if t != pid]
    threads.check_creds(pid, others)
    note("registers", 0)
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        leader = regs.capture(pid, mem_fd)  # before injection moves the registers about
        note("state", 0)
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
        fds, pipe_recs = files.capture(pid, fz.tids, repairs, shared)
        held = fileid.capture_held(pid, [r.fd for r in files.by_path(fds)])
        ghost_recs = ghosts.capture(pid, fds, vmas, ghost_limit)
        mapped = sorted({v.path for v in vmas if v.role == "file"} | {tsk.exe})
        identities = [fileid.still(known.get(p)) or fileid.identify(p) for p in mapped]
        note("pages", 0)
        runs = memmap.page_runs(pid, vmas)
        same = memmap.split_cow(vmas, runs, cow)
        for rec in (tsk, mm, sig, *thread_recs, *identities, *vmas):
            w.record(rec)
        readable = [r for v in vmas if memmap.is_readable(v) for r in runs.get(v.start, [])]
        hidden = [r for v in vmas if not memmap.is_readable(v) for r in runs.get(v.start, [])]
        if readable:
            w.pages(pid, -1, readable)
        if hidden:
            w.pages(pid, mem_fd, hidden)  # /proc/PID/mem reads what mprotect hides
        for at in range(0, len(same), RUNS_PER_RECORD):  # records of bounded size
            part = same[at:at + RUNS_PER_RECORD]
            w.record(CowPages(source=parent, runs=[x for run in part for x in run]))
        for rec in (*fds, *held, *pipe_recs, *ghost_recs):
            w.record(rec)
        ghosts.write_contents(w, pid, ghost_recs, fds, vmas, written)
        return len(vmas), len(fds)
    finally:
        os.close(mem_fd)


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
    # The process is frozen by us: ESRCH can only mean it was killed meanwhile.
    if e.errno == errno.ESRCH or _gone(pid):
        return NoSuchProcess("exited during the dump", pid=pid)
    return UpmigError(describe_oserror(e), pid=pid, what="dump failed")


def _gone(pid: int) -> bool:
    try:
        state = _proc.parse_status(_proc.read_text(pid, "status")).get("State", "")
    except UpmigError:
        return True
    return state.startswith(("Z", "X"))
