"""The stub loader's life on the resume side: the ids it must be given, started as
our traced child, emptied down to its vdso, and killed with all it became if
resume fails.

The stub (csrc/stub.c) is a tiny static program linked far from where programs
live; it stops at exec, and everything a process is gets injected into it."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext

from upmig import _native as nat
from upmig import _proc, freeze, inject, memmap, pidns
from upmig.errors import Mismatch, NoSuchProcess, RestoreError, UpmigError, from_oserror
from upmig.inject import Session
from upmig.records import Vma
from upmig.syscalls import nr

PATH = os.path.join(os.path.dirname(os.path.realpath(__file__)), "upmig-stub")
PID_WAIT_SECONDS = 5.0  # how long to wait for a dead process's PID to be reaped


def check_present() -> None:
    if not os.path.exists(PATH):
        raise RestoreError(f"the stub loader {PATH} is missing (run make)")


# ---- ids

def any_taken(tids: list[int]) -> bool:
    return any(os.path.exists(f"/proc/{t}") for t in tids)


def wait_ids_free(pid: int, tids: list[int], say: Callable[[str], None]) -> None:
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


def _dying(pid: int) -> bool:
    """True if pid is held by a process that has exited (a zombie to be reaped soon)
    or by nothing we can see (a PID just being released)."""
    try:
        return _proc.stat(pid).state in "ZX"
    except NoSuchProcess:
        return True


# ---- start, empty, kill

def spawn(want: int, ns: pidns.Namespace | None) -> int:
    """The stub as our child, stopped at exec; with PID `want` if > 0, inside ns if
    given."""
    try:
        with ns.entered() if ns else nullcontext():
            pid = nat.spawn(PATH, want, traceme=True)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise Mismatch(_taken(want, [want])) from None
        if want and e.errno in (errno.EPERM, errno.EINVAL):
            raise Mismatch(f"pid {want} cannot be chosen here ({e.strerror}); resume with "
                           "--new-pids to take new ids") from None
        raise from_oserror(e, "cannot start the stub", phase="resume") from None
    try:
        _, status = nat.waitpid(pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP):
            raise RestoreError(f"the stub {PATH} did not start (status {status:#x})")
        nat.ptrace(nat.PTRACE_SETOPTIONS, pid, 0, nat.PTRACE_O_EXITKILL
                   | nat.PTRACE_O_TRACESYSGOOD | nat.PTRACE_O_TRACECLONE
                   | nat.PTRACE_O_TRACEFORK)
    except BaseException:
        kill(pid)
        raise
    return pid


def clear(pid: int, inj: nat.Injector, mem_fd: int, vmas: list[Vma]) -> None:
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


def kill(pid: int) -> None:
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


def kill_tree(root: int) -> None:
    """Kill a half-built tree: every process made so far, each reaped by us (we
    trace them all, and made the root)."""
    made = freeze.descendants(root)
    for p in made:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in reversed(made):
        kill(p)
