"""Freeze a process tree without SIGSTOP: PTRACE_SEIZE + PTRACE_INTERRUPT on every
thread of the process and of all its descendants.

`frozen(pid)` is a context manager whose release cannot be skipped: however the
body ends, every thread is detached (running again as before), or, if the caller
asked for it after a complete image, stopped or killed. If upmig itself dies, the
kernel detaches the threads and the processes simply run on.

The tree is frozen from the top: once every thread of a process is stopped it can
fork no more, so its children, read then, are all it has; each is frozen in turn.
Children that have exited but are not reaped (zombies) cannot be seized; they are
listed with their exit status."""

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
from upmig.kconst import WALL

RESCANS = 20  # rounds of /proc/PID/task rescans before the thread set must have settled


@dataclass
class Frozen:
    """One process of the tree, every thread of it stopped."""

    pid: int
    tids: list[int] = field(default_factory=list)


@dataclass
class Zombie:
    """A child of the tree that has exited but is not reaped: it cannot be seized."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    status: int   # as waitpid(2) would report it
    comm: str


@dataclass
class Tree:
    """The frozen processes, root first and every parent before its children."""

    pid: int
    members: list[Frozen] = field(default_factory=list)
    zombies: list[Zombie] = field(default_factory=list)
    # What release() does: "run" (detach), "stop" (detach into a group stop), "kill".
    on_release: str = "run"
    # Called at release with killed=True/False: what the dump changed that must be
    # undone for processes that run on (before they are let go), or let go of after a kill.
    cleanups: list[Callable[[bool], None]] = field(default_factory=list)

    @property
    def tids(self) -> list[int]:
        return [t for m in self.members for t in m.tids]

    def pids(self) -> set[int]:
        return {m.pid for m in self.members} | {z.pid for z in self.zombies}


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


def _release(tree: Tree) -> None:
    try:
        _let_go(tree)
    finally:
        for cleanup in tree.cleanups:
            if tree.on_release == "kill":
                cleanup(True)


def _let_go(tree: Tree) -> None:
    if tree.on_release != "kill":
        for cleanup in tree.cleanups:
            cleanup(False)
    if tree.on_release == "kill":
        _kill_all(tree)
        return
    for m in tree.members:
        if tree.on_release == "stop":
            # From an interrupt stop PTRACE_DETACH ignores its signal: queue a SIGSTOP,
            # which the process takes as soon as it runs.
            try:
                os.kill(m.pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
        for tid in m.tids:
            try:
                nat.ptrace(nat.PTRACE_DETACH, tid, 0, 0)
            except OSError:
                pass  # a thread that is gone needs no release


def _kill_all(tree: Tree) -> None:
    """Kill every process (none runs again, none sees another die), then wait until
    each is gone. Our own child (the root, if we started it) is left for our caller
    to reap (WNOWAIT); for the others our wait hands them over to their parent."""
    for m in tree.members:
        try:
            os.kill(m.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for m in tree.members:
        ours = _parent(m.pid) == os.getpid()
        # A leader is reported only once its traced threads are reaped: them first.
        for tid in sorted(m.tids, key=lambda t: t == m.pid):
            try:
                if ours and tid == m.pid:
                    os.waitid(os.P_PID, tid, os.WEXITED | os.WNOWAIT | WALL)
                else:
                    nat.waitpid(tid)
            except OSError:
                pass


def _freeze_process(tree: Tree, pid: int) -> None:
    """Seize and stop every thread of pid, rescanning until no new thread appears."""
    fz = Frozen(pid)
    tree.members.append(fz)
    for _ in range(RESCANS):
        new = [t for t in list_tids(pid) if t not in fz.tids]
        if not new:
            return
        for tid in new:
            try:
                _seize(fz, pid, tid)
                _wait_stopped(pid, tid)
            except _ThreadGone:
                if tid in fz.tids:
                    fz.tids.remove(tid)
    raise UpmigError(f"threads kept appearing after {RESCANS} rescans", pid=pid)


def children(pid: int) -> list[int]:
    """Children forked by any of its threads (each thread lists its own)."""
    out = []
    for tid in list_tids(pid):
        try:
            out += [int(c) for c in _proc.read_text(pid, f"task/{tid}/children").split()]
        except NoSuchProcess:
            if tid == pid:
                raise  # a thread may end meanwhile; the process may not
    return out


def descendants(pid: int) -> list[int]:
    """pid and every process below it as they are now (not frozen: a best guess)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += children(p)
        except UpmigError:
            pass
    return out


def zombie(pid: int) -> Zombie | None:
    """pid as a zombie, or None if it is alive (or gone altogether)."""
    try:
        st = _proc.stat(pid)
    except UpmigError:
        return None
    if st.state not in "ZX" or st.num_threads > 1:  # (a main thread gone, others running)
        return None
    return Zombie(pid, st.ppid, st.pgrp, st.session, st.exit_code, st.comm)


@contextmanager
def frozen(pid: int) -> Iterator[Tree]:
    """Seize and stop pid and all its descendants, every thread of each."""
    tree = Tree(pid)
    try:
        todo = [pid]
        while todo:
            child = todo.pop(0)
            if child != pid:
                z = zombie(child)
                if z:
                    tree.zombies.append(z)
                    continue
            try:
                _freeze_process(tree, child)
            except (NoSuchProcess, AccessDenied):
                # Seizing a process that has just exited fails with EPERM (or ESRCH).
                if child == pid or not zombie(child):
                    raise
                # It exited just now. As its tracer we hold its exit until we wait for
                # it; then its parent is told, and it is a zombie of the tree.
                for tid in tree.members.pop().tids:
                    try:
                        os.waitpid(tid, os.WNOHANG | WALL)
                    except ChildProcessError:
                        pass
                z = zombie(child)
                if z:
                    tree.zombies.append(z)
                continue
            todo += children(child)
        yield tree
    finally:
        _release(tree)
