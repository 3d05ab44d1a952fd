"""`upmig resume`: rebuild an image's processes inside fresh stubs, under ptrace.

The operation is STAGES, run in order on one `Resume`; every process of the tree
then goes through PROCESS_STAGES (a parent before its children). A stage that
makes something registers how to unmake it on the operation's ExitStack, so a
failure at any stage unwinds exactly what was done and nothing half-alive remains;
once the processes are let go there is nothing left to undo.

Why the stages are in this order:
- Everything that can refuse without a process (the seal and records, the machine,
  the rights, the files, the ids) runs before the stub exists.
- From a stream, the page data is read as the processes are rebuilt, each frame
  checked before a byte of it is used (image.StreamedPages), and check_whole reads
  the trailer before anything runs: an image cut short or changed on the way is
  refused, and what was built is unmade. When the image's PIDs are taken here (by
  the very process being dumped into the stream, on this machine) the stream is
  read whole first.
- SysV objects are the tree's, made before any process: attaching them is memory.
- A process's ghost files exist before its memory is mapped (they are mapped), and
  everything it holds by path is opened with its own filesystem rights, from
  act_as_process to give_back_rights.
- Memory is filled by bulk copies on every CPU; the bursts of injected syscalls
  between them run with upmig on the stub's CPU (Stage.pinned), where a ptrace
  round trip is five times cheaper.
- Threads are cloned once the process-wide state is in place, with upmig's rights;
  credentials come after (they may drop our rights over it), registers last, once
  the scratch area the injected syscalls used is gone.
- What processes share (fds, ghosts) is taken from the first that made it; the
  copies parked for that are closed only when every process has taken its own."""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from upmig import _native as nat
from upmig import (
    _proc,
    fileid,
    files,
    ghosts,
    image,
    inject,
    keys,
    memmap,
    pidns,
    regs,
    rights,
    sharing,
    signals,
    stub,
    sysv,
    task,
    threads,
    tree,
)
from upmig.errors import Corrupt, Mismatch, from_oserror
from upmig.fds import inet
from upmig.inject import SCRATCH, Session
from upmig.kconst import MAP_FIXED
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

PIDS = ("same", "new", "pidns")
Notice = Callable[[str], None]


@dataclass
class ResumeResult:
    """What `upmig resume` made, for the command line and --json."""

    pid: int                # as seen here: for kill, wait, /proc
    pid_inside: int         # as the process sees itself
    same_pid: bool          # pid_inside is the original PID (and so are the TIDs)
    threads: int
    processes: int
    pidns_init: int         # PID 1 of its new PID namespace (--pidns), or 0
    seconds: float
    foreground: int = 0     # the group given our terminal's foreground, or 0


@dataclass
class ThreadBuild:
    """A rebuilt thread: its record, its TID inside the process and here, and the
    session that drives it."""

    th: Thread
    inner: int
    outer: int
    s: Session


@dataclass
class ProcessBuild:
    """One process of the tree on its way from a bare stub to its section of the
    image."""

    sec: image.Section
    born: tree.Born
    tsk: Task = field(init=False)
    vmas: list[Vma] = field(init=False)
    cpu: int = 0                       # upmig's and the stub's during pinned stages
    mem_fd: int = -1
    inj: nat.Injector | None = None
    s: Session | None = None           # injection with the scratch area
    scratch: int = 0
    acting: rights.Acting | None = None
    ghost_fds: dict[int, int] = field(default_factory=dict)
    threads: list[ThreadBuild] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tsk = self.sec.one(Task)
        self.vmas = self.sec.of(Vma)

    @property
    def pid(self) -> int:  # as we see it
        return self.born.outer

    @property
    def inner(self) -> int:  # as it sees itself
        return self.born.inner


@dataclass
class Resume:
    """One resume: what was asked, the image, and what has been made so far."""

    img: image.Image
    pids: str
    terminal: bool
    on_ready: Callable[[int], None] | None
    say: Notice
    held: fileid.Held
    undo: ExitStack
    sections: list[image.Section] = field(init=False)
    live: list[image.Section] = field(init=False)
    ns: pidns.Namespace | None = None
    root: int = 0                      # the first stub, as we see it
    ipc: sysv.Made | None = None
    reg: sharing.Registry = field(default_factory=sharing.Registry)
    contents: dict[str, list[image.PageData]] = field(default_factory=dict)
    procs: list[ProcessBuild] = field(default_factory=list)
    outer: dict[int, int] = field(default_factory=dict)  # PID in the image -> here
    foreground: int = 0

    def __post_init__(self) -> None:
        self.sections = self.img.processes()
        if not self.sections or self.sections[0].process.zombie:
            raise Corrupt("the image holds no live process", what=self.img.path)
        self.live = [sec for sec in self.sections if not sec.process.zombie]

    @property
    def want(self) -> int:  # the root's PID in the image
        return self.sections[0].process.pid

    @property
    def set_tid(self) -> bool:
        return self.pids != "new"


def resume(image_path: str, *, pids: str = "same", notice: Notice | None = None,
           on_ready: Callable[[int], None] | None = None, terminal: bool = False,
           key_file: str | None = None, allow_changed_files: bool = False
           ) -> ResumeResult:
    """Rebuild the process; it is left running detached from ptrace, a child of ours.

    image_path: a file, or "-" for standard input (upmig.image.load).
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
    with ExitStack() as always:
        img = image.load(image_path, key=keys.load(key_file), pages_later=True)
        always.callback(img.close)
        with ExitStack() as undo:
            r = Resume(img, pids, terminal, on_ready, notice or (lambda msg: None),
                       fileid.Held(allow_changed_files), undo)
            try:
                for stage in STAGES:
                    stage(r)
            except OSError as e:
                raise from_oserror(e, phase="resume") from None
            undo.pop_all()  # it runs: nothing to undo
    return _result(r, time.perf_counter() - began)


def _result(r: Resume, seconds: float) -> ResumeResult:
    root = r.procs[0].threads[0]
    init = r.ns.init if r.ns else 0
    if r.pids == "new" and root.inner != r.want:
        r.say(f"pid {r.want} is now pid {root.inner}")
    elif init:
        r.say(f"pid {r.want} runs in a new PID namespace; from here it is pid {r.root}")
    return ResumeResult(r.root, root.inner, root.inner == r.want,
                        sum(len(p.threads) for p in r.procs), len(r.sections), init, seconds,
                        r.foreground)


# ---- the stages of a resume

def check_rights(r: Resume) -> None:
    """No process may come back with privileges its resumer cannot grant."""
    rights.check_grantable([sec.one(Task) for sec in r.live])


def check_machine(r: Resume) -> None:
    head: Header = r.img.one(Header)
    machine = os.uname().machine
    if head.arch != machine:
        raise Mismatch(f"image is for {head.arch}, this machine is {machine}")
    if head.page_size != nat.PAGE:
        raise Mismatch(f"image has {head.page_size}-byte pages, this machine {nat.PAGE}")
    for rec in r.img.of(MappedFile):
        r.held.check_mapped(rec)
    mine = memmap.VdsoBlock.of_pid(os.getpid())
    for sec in r.live:
        mine.check_same_shape(memmap.VdsoBlock.of(sec.of(Vma)))
    stub.check_present()


def check_files(r: Resume) -> None:
    """Every file and directory the processes hold by path (fds, working directory),
    as it is here, against its identity at dump: refused before any process exists."""
    for sec in r.live:
        tsk: Task = sec.one(Task)
        ids = {i.fd: i for i in sec.of(FileIdentity)}
        r.held.check(tsk.pid, tsk.cwd, ids.get(-1), "its working directory")
        for rec in files.by_path(sec.of(Fd)):
            r.held.check(tsk.pid, rec.path, ids.get(rec.fd), f"fd {rec.fd}", rec.pos)


def reserve_ids(r: Resume) -> None:
    """The original ids free here, or a new PID namespace where they are."""
    if r.pids == "same":
        ids = [t.tid for sec in r.live for t in sec.of(Thread)]
        ids += [sec.process.pid for sec in r.sections if sec.process.zombie]
        if isinstance(r.img.source, image.StreamedPages) and stub.any_taken(ids):
            # Its PIDs may be freed only by the dump at the other end of the stream,
            # once it has written the last byte (a move on one machine): take it all.
            r.img.source = r.img.source.read_all(r.img)
        stub.wait_ids_free(r.want, ids, r.say)
    elif r.pids == "pidns":
        r.ns = pidns.Namespace()
        r.undo.callback(r.ns.abandon)  # until the process runs, and it is its own


def make_sysv(r: Resume) -> None:
    """The tree's SysV objects, with their contents, before any process."""
    for pd in r.img.pages:
        if pd.target:
            r.contents.setdefault(pd.target, []).append(pd)
    r.ipc = sysv.make_all(r.img.of(SysvShm), r.img.of(SysvSem), r.img.source, r.contents,
                          {sec.process.pid for sec in r.live})
    r.undo.callback(sysv.undo, r.ipc)


def spawn_stub(r: Resume) -> None:
    r.undo.callback(r.reg.remove_files)  # the POSIX objects made: after the kill below
    r.root = stub.spawn(0 if r.pids == "new" else r.want, r.ns)
    r.undo.callback(stub.kill_tree, r.root)


def make_tree(r: Resume) -> None:
    """Every process forked from the root stub (zombies made and left dead), each
    stopped as a bare stub of its own."""
    by_pid = {sec.process.pid: sec for sec in r.sections}
    born = tree.create(r.root, [sec.process for sec in r.sections], r.set_tid)
    r.outer = {b.rec.pid: b.outer for b in born}
    r.procs = [ProcessBuild(by_pid[b.rec.pid], b) for b in born]


def rebuild_processes(r: Resume) -> None:
    for p in r.procs:
        with ExitStack() as done:  # what this process's stages hold only meanwhile
            pinned: ExitStack | None = None
            for st in PROCESS_STAGES:
                if st.pinned and pinned is None:
                    pinned = done.enter_context(ExitStack())
                    pinned.enter_context(inject.pinned_with(p.pid, p.cpu))
                elif not st.pinned and pinned is not None:
                    pinned.close()
                    pinned = None
                st.run(r, p, done)


def check_whole(r: Resume) -> None:
    """An image read from a stream as it was used: its trailer says every frame came.
    (A file was checked whole before anything was made.)"""
    r.img.source.finish()


def close_parked(r: Resume) -> None:
    """Every process has taken what it shares from the others: the fds parked for
    that go."""
    for p in r.procs:
        p.inj.held_signals |= r.reg.close_parked(p.pid, p.inj.gadget)


def finish_sysv(r: Resume) -> None:
    sysv.finish(r.ipc)


def give_terminal(r: Resume) -> None:
    """The group (as we see it) of the tree that had its terminal's foreground and
    leads a group of its own again, if we can hand it ours."""
    if not r.terminal:
        return
    try:
        if os.tcgetpgrp(0) != os.getpgrp():
            return  # we are in the background ourselves
    except OSError:
        return  # not a terminal, or not our controlling terminal
    for sec in r.sections:
        p = sec.process
        if p.foreground and not p.zombie and p.pgid in r.outer:
            r.foreground = r.outer[p.pgid]
            return


def let_go(r: Resume) -> None:
    """All set: let every thread go, the root's last."""
    if r.ns:  # before it runs: from now on its namespace lives as long as it does
        r.ns.watch(pidns.inner_pid(r.root))
    if r.on_ready:
        r.on_ready(r.root)
    if r.foreground:
        os.tcsetpgrp(0, r.foreground)
    for p in reversed(r.procs):
        for t in p.threads:
            try:
                nat.ptrace(nat.PTRACE_DETACH, t.outer, 0, 0)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
                # A thread let go before has ended the process (or exec'd): it ran, and
                # what it did is its own business, not a failed resume. This thread dies
                # still traced by us: reap it, or its leader is never reported.
                if t.outer != p.pid:
                    try:
                        nat.waitpid(t.outer)
                    except OSError:
                        pass
        for sig in {sig for t in p.threads for sig in t.s.inj.held_signals}:
            try:
                os.kill(p.pid, sig)  # a SIGSTOP that came meanwhile
            except ProcessLookupError:
                pass


STAGES: tuple[Callable[[Resume], None], ...] = (
    check_rights,
    check_machine,
    check_files,
    reserve_ids,
    make_sysv,
    spawn_stub,
    make_tree,
    rebuild_processes,
    check_whole,
    close_parked,
    finish_sysv,
    give_terminal,
    let_go,
)


# ---- the stages of one process

def take_stub(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """Stop all signals, open its memory, and share a CPU with it."""
    stub_regs = nat.get_regs(p.pid)
    nat.set_sigmask(p.pid, (1 << 64) - 1)  # nothing is delivered while we work
    p.inj = nat.Injector(p.pid, stub_regs, p.born.gadget)
    p.inj.held_signals |= p.born.inj.held_signals  # a SIGSTOP while the tree was forked
    p.mem_fd = os.open(f"/proc/{p.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    done.callback(os.close, p.mem_fd)
    # Threads cloned from it inherit this CPU.
    p.cpu = _proc.stat(os.getpid()).processor
    os.sched_setaffinity(p.pid, {p.cpu})


def clear_stub(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    stub.clear(p.pid, p.inj, p.mem_fd, p.vmas)


def map_scratch(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """A page area for injected syscalls' arguments, where the image has nothing."""
    p.scratch = memmap.free_gap([*p.vmas, *sysv.spans(p.vmas, r.ipc.sizes)], SCRATCH)
    p.inj.call(nr.mmap, p.scratch, SCRATCH, mmap.PROT_READ | mmap.PROT_WRITE,
               MAP_FIXED | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0,
               what="mmap(scratch)")
    p.inj.set_stack(p.scratch + SCRATCH - 64)
    p.s = Session(p.inj, p.scratch, p.mem_fd)


def raise_fd_limit(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """Room for its fds and for the ghosts parked above them."""
    task.open_fd_limit(p.pid, p.tsk, files.spare_fd(p.sec) + 64 + len(p.sec.of(Ghost)))


def attach_sysv(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    sysv.attach(p.s, p.vmas, r.ipc.sizes)


def act_as_process(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """From here to its fds, every path the image names is opened, created or bound
    with the process's own filesystem rights, never with upmig's."""
    p.acting = rights.Acting(p.s, p.pid, p.tsk)
    p.acting.take()


def make_ghosts(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    p.ghost_fds = ghosts.make_all(p.s, p.pid, p.inner, p.sec, files.spare_fd(p.sec), r.reg,
                                  r.img.source, r.contents)


def map_memory(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    memmap.map_vmas(p.s, p.vmas, p.ghost_fds, r.held)


def fill_memory(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    memmap.fill(p.pid, r.img.source, p.sec.pages)


def copy_cow(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    memmap.copy_cow(p.pid, p.mem_fd, p.sec.of(CowPages), r.outer, r.img.path)


def finish_memory(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """Protections and advice, then the mm fields. The executable is opened as the
    process, which must be allowed to run it; PR_SET_MM_MAP itself wants
    CAP_CHECKPOINT_RESTORE, which acting keeps."""
    memmap.finish_vmas(p.s, p.vmas)
    memmap.restore_mm(p.s, p.sec.one(MM), p.tsk.exe, r.held)


def restore_process(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """What the threads share: working directory and ids, files, limits, signal
    dispositions."""
    cwd = next((i for i in p.sec.of(FileIdentity) if i.fd == -1), None)
    parent = next((q for q in r.procs if q.sec.process.pid == p.born.rec.ppid), None)
    inherited = parent is not None and parent.tsk.cwd == p.tsk.cwd  # entered before
    task.restore_early(p.s, p.tsk, r.held, cwd, p.acting, inherited)
    files.restore(p.s, p.pid, p.sec, p.ghost_fds, r.reg, p.inner, r.held)
    task.restore_limits(p.s, p.pid, p.tsk)  # after the fds: upmig's own wait above its own
    signals.restore(p.s, p.inner, p.sec.one(Signals))


def give_back_rights(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    p.acting.give_back()  # threads are cloned with upmig's rights


def set_sysv_values(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    sysv.set_values(p.s, r.ipc, p.born.rec.pid)


def clone_threads(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    """Every thread cloned from the leader, then each given its own state."""
    leader, *others = p.sec.of(Thread)
    p.threads = [ThreadBuild(leader, p.inner, p.pid, p.s)]
    for th in others:
        inner, outer = threads.clone(p.s, th, r.set_tid)
        ts = Session(nat.Injector(outer, nat.get_regs(outer), p.inj.gadget), p.scratch,
                     p.mem_fd)
        p.threads.append(ThreadBuild(th, inner, outer, ts))
    for t in p.threads:
        threads.restore(t.s, t.th, p.inner, t.inner)
        if t.inner != t.th.tid and t.th.clear_child_tid:
            # glibc caches each thread's TID where its clear_child_tid points.
            os.pwrite(p.mem_fd, t.inner.to_bytes(4, "little"), t.th.clear_child_tid)


def restore_creds(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    for t in p.threads:  # they may drop our rights over it: after all the rest
        task.restore_creds(t.s, p.pid, t.outer, p.tsk)


def unmap_scratch(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    p.inj.call(nr.munmap, p.scratch, SCRATCH, what="munmap(scratch)")


def set_registers(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    for t in p.threads:
        regs.restore(t.outer, t.th)


def restore_affinity(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    for t in p.threads:
        threads.restore_affinity(t.outer, t.th)


def tcp_go_live(r: Resume, p: ProcessBuild, done: ExitStack) -> None:
    inet.go_live(p.pid, p.sec.of(Fd))


@dataclass(frozen=True)
class Stage:
    """One step of rebuilding a process (PROCESS_STAGES)."""

    run: Callable[[Resume, ProcessBuild, ExitStack], None]
    pinned: bool  # a burst of injected syscalls: upmig runs on the stub's CPU


PROCESS_STAGES: tuple[Stage, ...] = (
    Stage(take_stub, False),
    Stage(clear_stub, True),
    Stage(map_scratch, True),
    Stage(raise_fd_limit, True),
    Stage(attach_sysv, True),
    Stage(act_as_process, True),
    Stage(make_ghosts, True),
    Stage(map_memory, True),
    Stage(fill_memory, False),
    Stage(copy_cow, False),
    Stage(finish_memory, True),
    Stage(restore_process, True),
    Stage(give_back_rights, True),
    Stage(set_sysv_values, True),
    Stage(clone_threads, True),
    Stage(restore_creds, True),
    Stage(unmap_scratch, True),
    Stage(set_registers, True),
    Stage(restore_affinity, False),
    Stage(tcp_go_live, False),
)

