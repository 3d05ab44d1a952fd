"""Freeze a process without SIGSTOP: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread.

`frozen(pid)` is a context manager whose release cannot be skipped: however the
body ends, every thread is detached (running again as before), or, if the caller
asked for it after a complete image, stopped or killed. If upmig itself dies, the
kernel detaches the threads and the process simply runs on."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from upmig import _native as nat
from upmig import _proc
from upmig.errors import AccessDenied, NoSuchProcess, UpmigError

WALL = 0x40000000
RESCANS = 20  # rounds of /proc/PID/task rescans before the thread set must have settled


@dataclass
class Frozen:
    pid: int
    tids: list[int] = field(default_factory=list)
    # What release() does: "run" (detach), "stop" (detach into a group stop), "kill".
    on_release: str = "run"
    # Called at release with killed=True/False: what the dump changed that must be
    # undone for a process that runs on (before it is let go), or let go of after a kill.
    cleanups: list[Callable[[bool], None]] = field(default_factory=list)


def list_tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise NoSuchProcess("no such process", pid=pid) from None


class _ThreadGone(Exception):
    """A thread (not the leader) exited while we froze it: the set is rescanned."""


def _seize(fz: Frozen, pid: int, tid: int) -> None:
    try:
        nat.ptrace(nat.PTRACE_SEIZE, tid, 0, nat.PTRACE_O_TRACESYSGOOD)
        fz.tids.append(tid)  # from here on it is ours to release
        nat.ptrace(nat.PTRACE_INTERRUPT, tid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            if tid != pid and _alive(pid):
                raise _ThreadGone() from None
            raise NoSuchProcess("exited while being frozen", pid=pid) from None
        if e.errno == errno.EPERM and tid != pid and _exiting(pid, tid):
            raise _ThreadGone() from None  # the kernel will not seize a dying thread
        if e.errno == errno.EPERM:
            tracer = _proc.parse_status(_proc.read_text(pid, "status")).get("TracerPid", "0")
            why = (f"is already traced by pid {tracer}" if tracer != "0"
                   else "cannot be traced (ptrace not permitted)")
            raise AccessDenied(why, pid=pid) from None
        raise


def restop(pid: int, tid: int) -> None:
    """Put a thread we moved about (injected syscalls) back into an interrupt stop:
    there the kernel redoes the syscall-restart fix-up of its registers when it goes
    on, and there it simply runs on if upmig dies."""
    nat.ptrace(nat.PTRACE_INTERRUPT, tid)
    nat.ptrace(nat.PTRACE_CONT, tid, 0, 0)
    _wait_stopped(pid, tid)


def _wait_stopped(pid: int, tid: int) -> None:
    """Wait for the interrupt stop; a signal that arrives first is delivered on the way."""
    while True:
        try:
            _, status = nat.waitpid(tid)
        except OSError as e:
            raise NoSuchProcess(f"exited while being frozen ({e.strerror})", pid=pid) from None
        if not os.WIFSTOPPED(status):
            if tid != pid and _alive(pid):
                raise _ThreadGone()
            raise NoSuchProcess("exited while being frozen", pid=pid)
        if status >> 16 == nat.PTRACE_EVENT_STOP:
            return
        # A signal-delivery stop: let the signal through, the interrupt trap follows.
        nat.ptrace(nat.PTRACE_CONT, tid, 0, os.WSTOPSIG(status))


def _exiting(pid: int, tid: int) -> bool:
    try:
        state = _proc.parse_status(_proc.read_text(pid, f"task/{tid}/status")).get("State", "")
    except UpmigError:
        return True
    return state.startswith(("Z", "X"))


def _alive(pid: int) -> bool:
    try:
        state = _proc.parse_status(_proc.read_text(pid, "status")).get("State", "")
    except UpmigError:
        return False
    return not state.startswith(("Z", "X"))


def _parent(pid: int) -> int:
    try:
        return int(_proc.parse_status(_proc.read_text(pid, "status"))["PPid"])
    except (UpmigError, KeyError):
        return -1


def _release(fz: Frozen) -> None:
    try:
        _let_go(fz)
    finally:
        for cleanup in fz.cleanups:
            if fz.on_release == "kill":
                cleanup(True)


def _let_go(fz: Frozen) -> None:
    if fz.on_release != "kill":
        for cleanup in fz.cleanups:
            cleanup(False)
    if fz.on_release == "kill":
        try:
            os.kill(fz.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # Wait until it is gone. If we are also its parent, leave the zombie for our
        # caller to reap (WNOWAIT); otherwise our wait hands it over to its parent.
        ours = _parent(fz.pid) == os.getpid()
        # The leader is reported only once its traced threads are reaped: them first.
        for tid in sorted(fz.tids, key=lambda t: t == fz.pid):
            try:
                if ours and tid == fz.pid:
                    os.waitid(os.P_PID, tid, os.WEXITED | os.WNOWAIT | WALL)
                else:
                    nat.waitpid(tid)
            except OSError:
                pass
        return
    if fz.on_release == "stop":
        # From an interrupt stop PTRACE_DETACH ignores its signal: queue a SIGSTOP,
        # which the process takes as soon as it runs.
        os.kill(fz.pid, signal.SIGSTOP)
    for tid in fz.tids:
        try:
            nat.ptrace(nat.PTRACE_DETACH, tid, 0, 0)
        except OSError:
            pass  # a thread that is gone needs no release


@contextmanager
def frozen(pid: int) -> Iterator[Frozen]:
    """Seize and stop every thread of pid, rescanning until no new thread appears."""
    fz = Frozen(pid)
    try:
        for _ in range(RESCANS):
            new = [t for t in list_tids(pid) if t not in fz.tids]
            if not new:
                break
            for tid in new:
                try:
                    _seize(fz, pid, tid)
                    _wait_stopped(pid, tid)
                except _ThreadGone:
                    if tid in fz.tids:
                        fz.tids.remove(tid)
        else:
            raise UpmigError(f"threads kept appearing after {RESCANS} rescans", pid=pid)
        yield fz
    finally:
        _release(fz)
