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
from dataclasses import dataclass
from pathlib import Path

from upmig import _native as nat
from upmig import _proc, fileid, files, image, inject, memmap, regs, signals, task
from upmig.errors import Mismatch, RestoreError, UpmigError, describe_oserror
from upmig.inject import SCRATCH, Session
from upmig.records import MM, Fd, Header, MappedFile, Signals, Task, Thread, Vma
from upmig.syscalls import nr

STUB = Path(__file__).resolve().parent / "upmig-stub"
PID_WAIT_SECONDS = 5.0  # how long to wait for a dead process's PID to be reaped
MAP_FIXED_PRIVATE_ANON = 0x10 | 0x02 | 0x20


@dataclass
class ResumeResult:
    pid: int
    same_pid: bool
    seconds: float


Notice = Callable[[str], None]


def resume(image_path: str, *, notice: Notice | None = None,
           on_ready: Callable[[int], None] | None = None) -> ResumeResult:
    """Rebuild the process; it is left running detached from ptrace, a child of ours.
    on_ready(pid) is called just before it is let go (say, to forward signals)."""
    began = time.perf_counter()
    say = notice or (lambda msg: None)
    img = image.load(image_path)
    try:
        head: Header = img.one(Header)
        _check_machine(img, head)
        want = img.one(Task).pid
        pid = _spawn_stub(want, say)
        try:
            _rebuild(pid, img, on_ready)
        except BaseException as e:
            _kill(pid)
            if isinstance(e, UpmigError):
                raise
            if isinstance(e, OSError):
                raise RestoreError(describe_oserror(e), what="resume failed") from None
            raise
    finally:
        img.close()
    return ResumeResult(pid, pid == want, time.perf_counter() - began)


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

def _check_machine(img: image.Image, head: Header) -> None:
    machine = os.uname().machine
    if head.arch != machine:
        raise Mismatch(f"image is for {head.arch}, this machine is {machine}")
    if head.page_size != nat.PAGE:
        raise Mismatch(f"image has {head.page_size}-byte pages, this machine {nat.PAGE}")
    for rec in img.of(MappedFile):
        fileid.check(rec)
    mine = memmap.VdsoBlock.of_pid(os.getpid())
    theirs = memmap.VdsoBlock.of(img.of(Vma))
    mine.check_same_shape(theirs)
    if not STUB.exists():
        raise RestoreError(f"the stub loader {STUB} is missing (run make)")


def _spawn_stub(want: int, say: Notice) -> int:
    """The stub as our child, stopped at exec; with PID `want` if it can be had."""
    deadline = time.monotonic() + PID_WAIT_SECONDS
    waited = False
    set_tid = want
    while True:
        try:
            pid = nat.spawn(str(STUB), set_tid, traceme=True)
            break
        except OSError as e:
            if e.errno == errno.EEXIST and time.monotonic() < deadline and _dying(want):
                if not waited:
                    say(f"pid {want} is still taken; waiting up to {PID_WAIT_SECONDS:.0f}s "
                        "for it to be released")
                    waited = True
                time.sleep(0.05)
                continue
            if set_tid and e.errno in (errno.EEXIST, errno.EPERM, errno.EINVAL):
                why = "is taken" if e.errno == errno.EEXIST else "cannot be chosen here"
                say(f"pid {want} {why}; the process gets a new pid")
                set_tid = 0
                continue
            raise RestoreError(f"cannot start the stub: {describe_oserror(e)}") from None
    _, status = nat.waitpid(pid)
    if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP):
        _kill(pid)
        raise RestoreError(f"the stub {STUB} did not start (status {status:#x})")
    nat.ptrace(nat.PTRACE_SETOPTIONS, pid, 0, nat.PTRACE_O_EXITKILL | nat.PTRACE_O_TRACESYSGOOD)
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
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# ---- the stages

def _rebuild(pid: int, img: image.Image, on_ready: Callable[[int], None] | None) -> None:
    stub_regs = nat.get_regs(pid)
    nat.set_sigmask(pid, (1 << 64) - 1)  # nothing is delivered while we work
    inj = nat.Injector(pid, stub_regs, regs.decode(stub_regs).rip)
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    # The stub and upmig share a CPU during the bursts of injected syscalls; the bulk
    # page copy in between runs unpinned, on every CPU.
    cpu = _proc.last_cpu(os.getpid())
    os.sched_setaffinity(pid, {cpu})
    try:
        vmas = img.of(Vma)
        with inject.pinned_with(pid, cpu):
            _clear_stub(pid, inj, mem_fd, vmas)
            scratch = memmap.free_gap(vmas, SCRATCH)
            inj.call(nr.mmap, scratch, SCRATCH, 3, MAP_FIXED_PRIVATE_ANON, -1, 0,
                     what="mmap(scratch)")
            inj.set_stack(scratch + SCRATCH - 64)
            s = Session(inj, scratch, mem_fd)
            memmap.map_vmas(s, vmas)
        _fill_memory(pid, img)
        with inject.pinned_with(pid, cpu):
            memmap.finish_vmas(s, vmas)
            memmap.restore_mm(s, img.one(MM), img.one(Task).exe)
            _stage_task(s, pid, img, mem_fd)
            inj.call(nr.munmap, scratch, SCRATCH, what="munmap(scratch)")
            _stage_registers(pid, img.one(Thread), img.one(Signals).blocked)
        task.restore_affinity(pid, img.one(Task))
    finally:
        os.close(mem_fd)
    if on_ready:
        on_ready(pid)
    nat.ptrace(nat.PTRACE_DETACH, pid, 0, 0)
    for sig in inj.held_signals:  # a SIGSTOP sent while we worked
        os.kill(pid, sig)


def _stage_task(s: Session, pid: int, img: image.Image, mem_fd: int) -> None:
    """Files, task state and signals; credentials last, as they drop our rights."""
    tsk: Task = img.one(Task)
    task.restore_limits(s, pid, tsk)  # before the fds: RLIMIT_NOFILE bounds their numbers
    task.restore_early(s, tsk)
    files.restore(s, pid, img.of(Fd))
    regs.restore_thread_links(s, img.one(Thread))
    signals.restore(s, pid, img.one(Signals))
    if pid != tsk.pid and tsk.clear_child_tid:
        # glibc caches the thread's TID where clear_child_tid points.
        os.pwrite(mem_fd, pid.to_bytes(4, "little"), tsk.clear_child_tid)
    task.restore_creds(s, pid, tsk)


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


def _fill_memory(pid: int, img: image.Image) -> None:
    """Page contents straight from the mapped image into the target."""
    base = nat.buffer_address(img.data)
    for pd in img.pages:
        src = [(base + off, base + off + n) for off, n in pd.chunks]
        nat.fill_pages(pid, -1, src, pd.runs)


def _stage_registers(pid: int, th: Thread, blocked: int) -> None:
    here = nat.get_regset(pid, nat.NT_X86_XSTATE)
    _check_xsave(th.xsave, here)
    # The kernel takes only an area of its own size; the header's xstate_bv says
    # which parts of a shorter saved area are valid, the rest is zero.
    nat.set_regset(pid, nat.NT_X86_XSTATE, th.xsave.ljust(len(here), b"\0"))
    nat.set_regs(pid, regs.for_restore(th.regs))
    nat.set_sigmask(pid, blocked)


def _check_xsave(saved: bytes, here: bytes) -> None:
    """The CPU here must have every state component the image's XSAVE area uses."""
    xcr0_here = int.from_bytes(here[464:472], "little")
    used = int.from_bytes(saved[512:520], "little")
    if used & ~xcr0_here or len(saved) > len(here):
        raise Mismatch(f"this CPU lacks register state the process uses (XSAVE features "
                       f"{used:#x}, CPU has {xcr0_here:#x})")


def stderr_notice(msg: str) -> None:
    print(f"upmig: {msg}", file=sys.stderr, flush=True)
