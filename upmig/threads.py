"""Threads: each thread's own state, and the cloning of every thread on resume.

The kernel keeps much state per thread: registers and FPU state, the signal mask
and a private queue of pending signals, the alternate signal stack, clear_child_tid,
the robust futex list, rseq, the name, CPU affinity and credentials. Dump reads what
only the thread itself can ask for (clear_child_tid, its altstack) by injecting into
it. Resume clones each thread from the leader with clone3 (with its original TID)
under ptrace, so the new thread stops before running a single instruction, and then
sets its state from inside it."""

from __future__ import annotations

import errno
import os
import signal
import struct

from upmig import _native as nat
from upmig import _proc, regs
from upmig.errors import CantMigrate, Mismatch, RestoreError
from upmig.inject import Session
from upmig.kconst import (
    CLONE_FILES,
    CLONE_FS,
    CLONE_SIGHAND,
    CLONE_SYSVSEM,
    CLONE_THREAD,
    CLONE_VM,
    PR_GET_TID_ADDRESS,
    PR_SET_NAME,
    SS_DISABLE,
    SS_ONSTACK,
)
from upmig.records import Thread
from upmig.signals import STACK_T, signo
from upmig.syscalls import nr

THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
# struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
# tls, set_tid, set_tid_size, cgroup
CLONE_ARGS = struct.Struct("<11Q")
CLONE_ARGS_AT = 0x8000     # offset in the scratch area, clear of what other stages use
# What credentials are made of; threads with different ones are not supported yet.
CRED_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
               "NoNewPrivs", "Seccomp")


# ---- dump

def check_creds(pid: int, tids: list[int]) -> None:
    """Refuse threads whose credentials differ from the leader's (setuid in one
    thread by a raw syscall): resume gives every thread the leader's."""
    def creds(tid: int) -> list[str]:
        st = _proc.parse_status(_proc.read_text(pid, f"task/{tid}/status"))
        return [st.get(k, "") for k in CRED_FIELDS]

    leader = creds(pid)
    for tid in tids:
        mine = creds(tid)
        if mine != leader:
            what = [k for k, a, b in zip(CRED_FIELDS, mine, leader, strict=True) if a != b]
            raise CantMigrate(f"has a thread ({tid}) with other credentials than its main "
                              f"thread ({', '.join(what)}); this is not supported yet", pid=pid)


def capture(s: Session, pid: int, th: Thread) -> None:
    """Fill in th, whose registers were read before any injection, from inside the
    thread that s drives."""
    tid = th.tid
    th.blocked = s.blocked
    th.comm = _proc.read_text(pid, f"task/{tid}/comm").rstrip("\n")
    th.cpus = affinity(tid)
    th.robust_list = nat.get_robust_list(tid)
    s.call(nr.prctl, PR_GET_TID_ADDRESS, s.scratch, what="prctl(PR_GET_TID_ADDRESS)")
    th.clear_child_tid, = struct.unpack("<Q", s.read(s.scratch, 8))
    s.call(nr.sigaltstack, 0, s.scratch, what="sigaltstack")
    sp, flags, _, size = STACK_T.unpack(s.read(s.scratch, STACK_T.size))
    th.altstack = [sp, flags & ~SS_ONSTACK, size]


def capture_pending(recs: list[Thread]) -> None:
    """Each thread's private queue, read once all are stopped for good."""
    for th in recs:
        th.pending = nat.peek_siginfo(th.tid, shared=False)


def affinity(tid: int) -> list[int] | None:
    cpus = os.sched_getaffinity(tid)
    return None if len(cpus) == os.cpu_count() else sorted(cpus)


# ---- resume

def clone(s: Session, th: Thread, set_tid: bool) -> tuple[int, int]:
    """Clone a thread for th from the leader that s drives, stopped before its first
    instruction: (its TID inside the process, its TID as upmig sees it)."""
    return clone3(s.inj, s.write, s.scratch + CLONE_ARGS_AT, THREAD_FLAGS, 0,
                  th.tid if set_tid else 0, f"thread id {th.tid}")


def clone3(inj: nat.Injector, write, at: int, flags: int, exit_signal: int, want: int,
           what: str) -> tuple[int, int]:
    """clone3 injected through inj, its arguments written at `at` by write(addr, data);
    with the id `want` if not 0. The new task is traced, stopped before its first
    instruction: (its id as it sees itself, its id as upmig sees it)."""
    id_at = at + CLONE_ARGS.size
    write(id_at, struct.pack("<i", want))
    write(at, CLONE_ARGS.pack(flags, 0, 0, 0, exit_signal, 0, 0, 0, id_at if want else 0,
                              1 if want else 0, 0))
    inner = inj.raw(nr.clone3, at, CLONE_ARGS.size)
    if inner == -errno.EEXIST:
        raise Mismatch(f"{what} was taken meanwhile; try again, or resume with --pidns")
    if inner in (-errno.EPERM, -errno.EINVAL) and want:
        raise Mismatch(f"{what} cannot be chosen here ({os.strerror(-inner)}); "
                       "resume with --new-pids to take new ids")
    if inner < 0:
        raise OSError(-inner, f"clone3({what}): {os.strerror(-inner)}")
    outer = inj.cloned()
    if not outer:
        raise RestoreError(f"clone3({what}) made no ptrace event")
    wait_first_stop(outer)
    return inner, outer


def wait_first_stop(tid: int) -> None:
    """A thread cloned under ptrace starts in a stop (SIGSTOP, or an event stop)."""
    _, status = nat.waitpid(tid)
    if not os.WIFSTOPPED(status) or (os.WSTOPSIG(status) != signal.SIGSTOP
                                     and status >> 16 != nat.PTRACE_EVENT_STOP):
        raise RestoreError(f"a new thread did not stop as expected (status {status:#x})")


def restore(s: Session, th: Thread, tgid: int, tid: int) -> None:
    """From inside the thread s drives: its futex list, rseq, clear_child_tid, altstack,
    name and private pending signals. tgid and tid are ids as the process sees them."""
    regs.restore_thread_links(s, th)
    if th.clear_child_tid:
        s.call(nr.set_tid_address, th.clear_child_tid, what="set_tid_address")
    sp, flags, size = th.altstack
    if not flags & SS_DISABLE:
        s.write(s.scratch, STACK_T.pack(sp, flags, 0, size))
        s.call(nr.sigaltstack, s.scratch, 0, what="sigaltstack")
    if th.comm:
        s.write(s.scratch, os.fsencode(th.comm)[:15] + b"\0")
        s.call(nr.prctl, PR_SET_NAME, s.scratch, what="prctl(PR_SET_NAME)")
    # Queued by the thread itself: only then may a siginfo claim any sender (si_code).
    for info in th.pending:
        s.write(s.scratch, info)
        s.call(nr.rt_tgsigqueueinfo, tgid, tid, signo(info), s.scratch,
               what="rt_tgsigqueueinfo")


def restore_affinity(tid: int, th: Thread) -> None:
    """The CPUs it may run on: as before where they exist here, else all of them."""
    here = set(range(os.cpu_count() or 1))
    wanted = set(th.cpus or here) & here
    os.sched_setaffinity(tid, wanted or here)
