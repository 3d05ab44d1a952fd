"""`upmig resume`: rebuild an image's process inside a fresh stub, under ptrace.

Stages, in order: verify the image and this machine (before any process exists),
spawn the stub, memory (vdso, mappings, pages, mm), files, task, signals, registers,
then let it go. If any stage fails the stub is killed: nothing half-alive remains."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from upmig import _native as nat
from upmig import (
    _proc,
    fileid,
    files,
    freeze,
    ghosts,
    image,
    inet,
    inject,
    keys,
    memmap,
    pidns,
    regs,
    rights,
    sharing,
    signals,
    sysv,
    task,
    threads,
    tree,
)
from upmig.errors import Corrupt, Mismatch, RestoreError, UpmigError, describe_oserror
from upmig.inject import SCRATCH, Session
from upmig.records import (
    MM,
    CowPages,
    Fd,
    FileIdentity,
    Ghost,
    Header,
    MappedFile,
    Signals,
    SysvSem,
    SysvShm,
    Task,
    Thread,
    Vma,
)
from upmig.syscalls import nr

STUB = Path(__file__).resolve().parent / "upmig-stub"
PID_WAIT_SECONDS = 5.0  # how long to wait for a dead process's PID to be reaped
MAP_FIXED_PRIVATE_ANON = 0x10 | 0x02 | 0x20


@dataclass
class ResumeResult:
    pid: int                # as seen here: for kill, wait, /proc
    pid_inside: int         # as the process sees itself
    same_pid: bool          # pid_inside is the original PID (and so are the TIDs)
    threads: int
    processes: int
    pidns_init: int         # PID 1 of its new PID namespace (--pidns), or 0
    seconds: float
    foreground: int = 0     # the group given our terminal's foreground, or 0


@dataclass
class Member:
    """A rebuilt thread: its record, its TID inside the process and here, and the
    session that drives it."""

    th: Thread
    inner: int
    outer: int
    s: Session


Notice = Callable[[str], None]
PIDS = ("same", "new", "pidns")


def resume(image_path: str, *, pids: str = "same", notice: Notice | None = None,
           on_ready: Callable[[int], None] | None = None, terminal: bool = False,
           key_file: str | None = None, allow_changed_files: bool = False
           ) -> ResumeResult:
    """Rebuild the process; it is left running detached from ptrace, a child of ours.

    pids: "same" gives every thread its original id and refuses if one is taken;
    "pidns" does so inside a new PID namespace; "new" takes whatever ids are free.
    on_ready(pid) is called just before it is let go (say, to forward signals).
    terminal: if our stdin is a terminal whose foreground we hold, give it to the
    process group of the tree that held its terminal's foreground (a --shell-job
    that leads its own group); ResumeResult.foreground says so.
    key_file: the key the image must be sealed with (default: upmig.keys.default_path).
    allow_changed_files: a regular file the processes hold may have another size or
    mtime than at dump (say, a log others append to); see fileid.Held."""
    if pids not in PIDS:
        raise ValueError(f"pids must be one of {PIDS}")
    began = time.perf_counter()
    say = notice or (lambda msg: None)
    img = image.load(image_path, key=keys.load(key_file))
    ns: pidns.Namespace | None = None
    try:
        head: Header = img.one(Header)
        sections = img.processes()
        if not sections or sections[0].process.zombie:
            raise Corrupt("the image holds no live process", what=image_path)
        live = [sec for sec in sections if not sec.process.zombie]
        rights.check_grantable([sec.one(Task) for sec in live])
        held = fileid.Held(allow_changed_files)
        _check_machine(img, head, live, held)
        _check_files(live, held)
        want = sections[0].process.pid
        if pids == "same":
            ids = [t.tid for sec in live for t in sec.of(Thread)]
            _wait_ids_free(want, ids + [sec.process.pid for sec in sections
                                        if sec.process.zombie], say)
        if pids == "pidns":
            ns = pidns.Namespace()

        def ready(pid: int) -> None:
            if ns:  # before it runs: from now on its namespace lives as long as it does
                ns.watch(pidns.inner_pid(pid))
            if on_ready:
                on_ready(pid)

        pid, ipc, reg = 0, None, sharing.Registry()
        try:
            pid = _spawn_stub(0 if pids == "new" else want, ns)
            contents = _contents(img)
            ipc = sysv.make_all(img.of(SysvShm), img.of(SysvSem), img.data, contents,
                                {sec.process.pid for sec in live})
            teams = _rebuild_tree(pid, img, pids != "new", ipc, reg, contents, held)
            fg = _foreground_group(sections, teams) if terminal else 0

            def go(root: int) -> None:
                ready(root)
                if fg:
                    os.tcsetpgrp(0, fg)

            _let_go(pid, teams, go)
        except BaseException as e:
            if pid:
                _kill_tree(pid)
            if ipc:
                sysv.undo(ipc)
            reg.remove_files()
            if isinstance(e, UpmigError):
                raise
            if isinstance(e, OSError):
                raise RestoreError(describe_oserror(e), what="resume failed") from None
            raise
        init = ns.init if ns else 0
        ns = None  # it is the process's now
    finally:
        if ns:
            ns.abandon()
        img.close()
    root = teams[0][0]
    if pids == "new" and root.inner != want:
        say(f"pid {want} is now pid {root.inner}")
    elif init:
        say(f"pid {want} runs in a new PID namespace; from here it is pid {pid}")
    return ResumeResult(pid, root.inner, root.inner == want, sum(map(len, teams)),
                        len(sections), init, time.perf_counter() - began, fg)


def _foreground_group(sections: list[image.Section], teams: list[list[Member]]) -> int:
    """The group (as we see it) of the tree that had its terminal's foreground and
    leads a group of its own again, if we can hand it ours; else 0."""
    try:
        if os.tcgetpgrp(0) != os.getpgrp():
            return 0  # we are in the background ourselves
    except OSError:
        return 0  # not a terminal, or not our controlling terminal
    outer = {team[0].th.tid: team[0].outer for team in teams}  # original pid -> here
    for sec in sections:
        p = sec.process
        if p.foreground and not p.zombie and p.pgid in outer:
            return outer[p.pgid]
    return 0


def take_terminal_back() -> None:
    """The foreground group has ended (or stopped): our own group leads again."""
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # we are in the background
    try:
        os.tcsetpgrp(0, os.getpgrp())
    except OSError:
        pass  # the terminal is gone
    finally:
        signal.signal(signal.SIGTTOU, old)


def forward_signals(pid: int) -> None:
    """From now on SIGTERM and SIGHUP sent to us go to pid; terminal signals
    (SIGINT, SIGQUIT) reach it directly, so we ignore them."""
    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    for s in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)


def wait(pid: int) -> int:
    """Wait for our resumed child; its exit status as a shell reports it."""
    forward_signals(pid)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


# ---- before any process exists

def _check_machine(img: image.Image, head: Header, live: list[image.Section],
                   held: fileid.Held) -> None:
    machine = os.uname().machine
    if head.arch != machine:
        raise Mismatch(f"image is for {head.arch}, this machine is {machine}")
    if head.page_size != nat.PAGE:
        raise Mismatch(f"image has {head.page_size}-byte pages, this machine {nat.PAGE}")
    for rec in img.of(MappedFile):
        held.check_mapped(rec)
    mine = memmap.VdsoBlock.of_pid(os.getpid())
    for sec in live:
        mine.check_same_shape(memmap.VdsoBlock.of(sec.of(Vma)))
    if not STUB.exists():
        raise RestoreError(f"the stub loader {STUB} is missing (run make)")


def _check_files(live: list[image.Section], held: fileid.Held) -> None:
    """Every file and directory the processes hold by path (fds, working directory),
    as it is here, against its identity at dump: refused before any process exists."""
    for sec in live:
        tsk: Task = sec.one(Task)
        ids = {i.fd: i for i in sec.of(FileIdentity)}
        held.check(tsk.pid, tsk.cwd, ids.get(-1), "its working directory")
        for r in files.by_path(sec.of(Fd)):
            held.check(tsk.pid, r.path, ids.get(r.fd), f"fd {r.fd}", r.pos)


def _wait_ids_free(pid: int, tids: list[int], say: Notice) -> None:
    """Every TID of the image must be free here. One held by a process that has
    exited (say, the dumped process itself, not yet reaped) is waited for."""
    deadline = time.monotonic() + PID_WAIT_SECONDS
    waited = False
    while True:
        taken = [t for t in tids if os.path.exists(f"/proc/{t}")]
        if not taken:
            return
        if time.monotonic() < deadline and all(_dying(t) for t in taken):
            if not waited:
                say(f"pid {pid} is still taken; waiting up to {PID_WAIT_SECONDS:.0f}s for it "
                    "to be released")
                waited = True
            time.sleep(0.05)
            continue
        raise Mismatch(_taken(pid, taken))


def _taken(pid: int, taken: list[int]) -> str:
    holder = _holder(taken[0])
    if pid in taken:
        what = f"pid {pid} is taken here{holder}"
    else:
        ids = ", ".join(map(str, taken[:5])) + (", ..." if len(taken) > 5 else "")
        what = f"thread id{'s' if len(taken) > 1 else ''} {ids} of pid {pid} taken here{holder}"
    return (f"{what}; programs keep their ids in memory (glibc caches every thread's), so "
            "resume it in a new PID namespace with --pidns (or with new ids, at its own "
            "risk, with --new-pids)")


def _holder(tid: int) -> str:
    try:
        st = _proc.parse_status(_proc.read_text(tid, "status"))
        name = repr(st["Name"])
        return f" by {name}" if st["Tgid"] == str(tid) else f" by pid {st['Tgid']} ({name})"
    except (UpmigError, KeyError):
        return ""


def _spawn_stub(want: int, ns: pidns.Namespace | None) -> int:
    """The stub as our child, stopped at exec; with PID `want` if > 0, inside ns if
    given."""
    try:
        with ns.entered() if ns else nullcontext():
            pid = nat.spawn(str(STUB), want, traceme=True)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise Mismatch(_taken(want, [want])) from None
        if want and e.errno in (errno.EPERM, errno.EINVAL):
            raise Mismatch(f"pid {want} cannot be chosen here ({e.strerror}); resume with "
                           "--new-pids to take new ids") from None
        raise RestoreError(f"cannot start the stub: {describe_oserror(e)}") from None
    try:
        _, status = nat.waitpid(pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP):
            raise RestoreError(f"the stub {STUB} did not start (status {status:#x})")
        nat.ptrace(nat.PTRACE_SETOPTIONS, pid, 0, nat.PTRACE_O_EXITKILL
                   | nat.PTRACE_O_TRACESYSGOOD | nat.PTRACE_O_TRACECLONE
                   | nat.PTRACE_O_TRACEFORK)
    except BaseException:
        _kill(pid)
        raise
    return pid


def _dying(pid: int) -> bool:
    """True if pid is held by a process that has exited (a zombie to be reaped soon)
    or by nothing we can see (a PID just being released)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _kill(pid: int) -> None:
    """Kill a half-built process and reap it, its threads (traced by us) first."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    except OSError:
        tids = []
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for tid in tids:
        try:
            nat.waitpid(tid)
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _kill_tree(root: int) -> None:
    """Kill a half-built tree: every process made so far, each reaped by us (we
    trace them all, and made the root)."""
    made = freeze.descendants(root)
    for p in made:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in reversed(made):
        _kill(p)


# ---- the stages

def _contents(img: image.Image) -> dict[str, list[image.PageData]]:
    """The bytes of the tree's ghost files and SysV segments, by pages target."""
    out: dict[str, list[image.PageData]] = {}
    for pd in img.pages:
        if pd.target:
            out.setdefault(pd.target, []).append(pd)
    return out


def _rebuild_tree(root: int, img: image.Image, set_tid: bool, ipc: sysv.Made,
                  reg: sharing.Registry, contents: dict[str, list[image.PageData]],
                  held: fileid.Held) -> list[list[Member]]:
    """Every process made from the stub `root`, then rebuilt one by one; all left
    stopped under ptrace. The root's team comes first. ipc: the SysV objects, made;
    reg: where what the processes share is kept track of; held: their files, checked."""
    sections = img.processes()
    by_pid = {sec.process.pid: sec for sec in sections}
    born = tree.create(root, [sec.process for sec in sections], set_tid)
    t = _Tree(reg, contents, {b.rec.pid: b.outer for b in born}, ipc, held,
              {sec.process.pid: sec.one(Task).cwd for sec in sections if not sec.process.zombie})
    teams = [_rebuild(b, by_pid[b.rec.pid], set_tid, t) for b in born]
    for team in teams:  # every process has taken what it shares from the others
        team[0].s.inj.held_signals |= t.reg.close_parked(team[0].outer, team[0].s.inj.gadget)
    sysv.finish(ipc)
    return teams


@dataclass
class _Tree:
    """What the processes of a tree draw on from each other while they are rebuilt."""

    reg: sharing.Registry                   # descriptions and ghosts made so far
    contents: dict[str, list[image.PageData]]  # each ghost's bytes, by pages target
    outer: dict[int, int]                   # a process's PID in the image -> here
    ipc: sysv.Made                          # the SysV objects, made (upmig.sysv)
    held: fileid.Held                       # the files held by path, checked
    cwds: dict[int, str]                    # each process's working directory


def _rebuild(b: tree.Born, img: image.Section, set_tid: bool, t: _Tree) -> list[Member]:
    """One process, from a bare stub into what its section of the image holds."""
    pid = b.outer
    stub_regs = nat.get_regs(pid)
    nat.set_sigmask(pid, (1 << 64) - 1)  # nothing is delivered while we work
    inj = nat.Injector(pid, stub_regs, b.gadget)
    inj.held_signals |= b.inj.held_signals  # a SIGSTOP while the tree was forked
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    # The stub and upmig share a CPU during the bursts of injected syscalls (threads
    # cloned from it inherit that); the bulk page copy in between runs unpinned.
    cpu = _proc.last_cpu(os.getpid())
    os.sched_setaffinity(pid, {cpu})
    tsk: Task = img.one(Task)
    try:
        vmas = img.of(Vma)
        with inject.pinned_with(pid, cpu):
            _clear_stub(pid, inj, mem_fd, vmas)
            scratch = memmap.free_gap([*vmas, *sysv.spans(vmas, t.ipc.sizes)], SCRATCH)
            inj.call(nr.mmap, scratch, SCRATCH, 3, MAP_FIXED_PRIVATE_ANON, -1, 0,
                     what="mmap(scratch)")
            inj.set_stack(scratch + SCRATCH - 64)
            s = Session(inj, scratch, mem_fd)
            task.open_fd_limit(pid, tsk, files.spare_fd(img) + 64 + len(img.of(Ghost)))
            sysv.attach(s, vmas, t.ipc.sizes)
            # From here to its fds, every path the image names is opened, created or
            # bound with the process's own filesystem rights, never with upmig's.
            acting = rights.Acting(s, pid, tsk)
            acting.take()
            ghost_fds = ghosts.make_all(s, pid, b.inner, img, files.spare_fd(img), t.reg,
                                        t.contents)
            memmap.map_vmas(s, vmas, ghost_fds, t.held)
        _fill_memory(pid, img)
        _copy_cow(pid, mem_fd, img, t.outer)
        with inject.pinned_with(pid, cpu):
            memmap.finish_vmas(s, vmas)
            # The executable is opened as the process, which must be allowed to run it;
            # PR_SET_MM_MAP itself wants CAP_CHECKPOINT_RESTORE, which acting keeps.
            memmap.restore_mm(s, img.one(MM), tsk.exe, t.held)
            inherited = t.cwds.get(b.rec.ppid) == tsk.cwd  # its parent's, entered before
            _stage_process(s, pid, b.inner, img, ghost_fds, t.reg, t.held, acting, inherited)
            acting.give_back()  # threads are cloned with upmig's rights; credentials last
            sysv.set_values(s, t.ipc, b.rec.pid)
            team = _stage_threads(s, pid, b.inner, img.of(Thread), set_tid)
            for m in team:  # credentials last: they may drop our rights over it
                task.restore_creds(m.s, pid, m.outer, tsk)
            inj.call(nr.munmap, scratch, SCRATCH, what="munmap(scratch)")
            for m in team:
                _stage_registers(m.outer, m.th)
        for m in team:
            threads.restore_affinity(m.outer, m.th)
        inet.go_live(pid, img.of(Fd))
    finally:
        os.close(mem_fd)
    return team


def _let_go(root: int, teams: list[list[Member]], on_ready: Callable[[int], None]) -> None:
    """All set: let every thread go, the root's last."""
    on_ready(root)
    for team in reversed(teams):
        pid = team[0].outer
        for m in team:
            try:
                nat.ptrace(nat.PTRACE_DETACH, m.outer, 0, 0)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
                # A thread let go before has ended the process (or exec'd): it ran, and
                # what it did is its own business, not a failed resume. This thread dies
                # still traced by us: reap it, or its leader is never reported.
                if m.outer != pid:
                    try:
                        nat.waitpid(m.outer)
                    except OSError:
                        pass
        for sig in {sig for m in team for sig in m.s.inj.held_signals}:  # a SIGSTOP meanwhile
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _stage_process(s: Session, pid: int, tgid: int, img: image.Records,
                   ghost_fds: dict[int, int], reg: sharing.Registry, held: fileid.Held,
                   acting: rights.Acting, inherited_cwd: bool) -> None:
    """What the threads share: limits, cwd and ids, files, signal dispositions; the
    stub acting with the process's filesystem rights. inherited_cwd: its parent in
    the tree has the same working directory."""
    tsk: Task = img.one(Task)
    cwd = next((i for i in img.of(FileIdentity) if i.fd == -1), None)
    task.restore_early(s, tsk, held, cwd, acting, inherited_cwd)
    files.restore(s, pid, img, ghost_fds, reg, tgid, held)
    task.restore_limits(s, pid, tsk)  # after the fds: upmig's own wait above the process's
    signals.restore(s, tgid, img.one(Signals))


def _stage_threads(s: Session, pid: int, tgid: int, recs: list[Thread],
                   set_tid: bool) -> list[Member]:
    """Clone every thread from the leader, then give each its own state."""
    leader, *others = recs
    team = [Member(leader, tgid, pid, s)]
    for th in others:
        inner, outer = threads.clone(s, th, set_tid)
        ts = Session(nat.Injector(outer, nat.get_regs(outer), s.inj.gadget), s.scratch,
                     s.mem_fd)
        team.append(Member(th, inner, outer, ts))
    for m in team:
        threads.restore(m.s, m.th, tgid, m.inner)
        if m.inner != m.th.tid and m.th.clear_child_tid:
            # glibc caches each thread's TID where its clear_child_tid points.
            os.pwrite(s.mem_fd, m.inner.to_bytes(4, "little"), m.th.clear_child_tid)
    return team


def _clear_stub(pid: int, inj: nat.Injector, mem_fd: int, vmas: list[Vma]) -> None:
    """Empty the stub's address space but for its vdso block, moved to the image's
    place, and switch injection to a syscall instruction in that vdso."""
    mine = _proc.parse_maps(_proc.read_text(pid, "maps"))
    here = memmap.VdsoBlock.of_pid(pid)
    there = memmap.VdsoBlock.of(vmas)
    stub_maps = [m for m in mine if not m.path.startswith("[v")]
    lo = min(a for a, _ in there.parts.values())
    hi = max(b for _, b in there.parts.values())
    for m in stub_maps:
        if m.path == "[stack]":
            inj.call(nr.munmap, m.start, m.end - m.start, what="munmap(stub stack)")
        elif m.start < hi and lo < m.end:
            raise RestoreError(f"the image's vdso at {lo:#x} overlaps the stub loader; "
                               "relink the stub elsewhere (Makefile STUB_BASE)")
    memmap.move_vdso(Session(inj, 0, mem_fd), here, there, [*vmas, *mine])
    start, end = there.parts["vdso"]
    inj.move_to(inject.find_syscall_insn(mem_fd, start, end))
    for m in stub_maps:
        if m.path != "[stack]":
            inj.call(nr.munmap, m.start, m.end - m.start, what="munmap(stub)")


def _fill_memory(pid: int, img: image.Records) -> None:
    """Page contents straight from the mapped image into the target."""
    base = nat.buffer_address(img.data)
    for pd in img.pages:
        if pd.target:  # a ghost file's contents: see upmig.ghosts
            continue
        nat.fill_pages(pid, -1, pd.sources(base), pd.runs)


def _copy_cow(pid: int, mem_fd: int, img: image.Records, outer: dict[int, int]) -> None:
    """Pages the process shared with its parent at dump: from the parent, rebuilt
    before it (and not running yet)."""
    for rec in img.of(CowPages):
        runs = list(zip(rec.runs[0::2], rec.runs[1::2], strict=True))
        if rec.source not in outer or any(a >= b or (a | b) % nat.PAGE for a, b in runs):
            raise Corrupt(f"a cow_pages record of pid {img.process.pid} is malformed",
                          what=img.path)
        src = os.open(f"/proc/{outer[rec.source]}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            nat.copy_same_addresses(outer[rec.source], src, pid, mem_fd, runs)
        finally:
            os.close(src)


def _stage_registers(tid: int, th: Thread) -> None:
    here = nat.get_regset(tid, nat.NT_X86_XSTATE)
    _check_xsave(th.xsave, here)
    # The kernel takes only an area of its own size; the header's xstate_bv says
    # which parts of a shorter saved area are valid, the rest is zero.
    nat.set_regset(tid, nat.NT_X86_XSTATE, th.xsave.ljust(len(here), b"\0"))
    nat.set_regs(tid, regs.for_restore(th.regs))
    nat.set_sigmask(tid, th.blocked)


def _check_xsave(saved: bytes, here: bytes) -> None:
    """The CPU here must have every state component the image's XSAVE area uses."""
    xcr0_here = int.from_bytes(here[464:472], "little")
    used = int.from_bytes(saved[512:520], "little")
    if used & ~xcr0_here or len(saved) > len(here):
        raise Mismatch(f"this CPU lacks register state the process uses (XSAVE features "
                       f"{used:#x}, CPU has {xcr0_here:#x})")


def stderr_notice(msg: str) -> None:
    print(f"upmig: {msg}", file=sys.stderr, flush=True)
