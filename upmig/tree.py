"""Process trees: who is whose parent, process groups and sessions, zombies.

Dump side: one Process record per process, and the refusals for relations resume
could not rebuild. Resume side: every process is forked (clone3, with its original
PID) from its parent while both are still bare stubs, so parent links come for
free; a session leader calls setsid() before it forks anything, so its children
are born into its session; once all exist, each joins its process group. Zombies
are made last: forked like the others, then let go to exit the way they did.

Ids outside the tree (the session and group of whoever started the job) cannot be
recreated: processes that were in them are put in `upmig resume`'s own."""

from __future__ import annotations

import os
import resource
import signal
import struct
import time
from dataclasses import dataclass

from upmig import _native as nat
from upmig import _proc, pidns, threads
from upmig.errors import CantMigrate, RestoreError, UpmigError
from upmig.freeze import Zombie
from upmig.records import Process
from upmig.regs import Regs
from upmig.syscalls import nr

ZOMBIE_SECONDS = 5.0   # how long a made zombie may take to exit


# ---- dump

def record(pid: int) -> Process:
    st = _proc.stat(pid)
    return Process(pid=pid, ppid=st.ppid, pgid=st.pgrp, sid=st.session, comm=st.comm,
                   tty=st.tty_nr, foreground=st.tty_nr != 0 and st.tpgid == st.pgrp)


def zombie_record(z: Zombie) -> Process:
    return Process(pid=z.pid, ppid=z.ppid, pgid=z.pgid, sid=z.sid, zombie=True,
                   exit_status=z.status, comm=z.comm)


def check(procs: list[Process], shell_job: bool) -> None:
    """Refuse sessions, groups and terminals that resume could not rebuild."""
    root = procs[0]
    by_pid = {p.pid: p for p in procs}
    for p in procs:
        parent = by_pid.get(p.ppid) if p is not root else None
        if p.tty and p.sid not in by_pid and not shell_job:
            raise CantMigrate(
                f"has a controlling terminal that belongs to session {p.sid} outside the "
                "dump (started from an interactive shell?); dump it with --shell-job to "
                "re-attach it to the terminal of upmig resume", pid=p.pid)
        if p.tty and p.sid in by_pid:
            raise CantMigrate("has a controlling terminal of its own session; terminals "
                              "are not supported yet", pid=p.pid)
        if p.sid in by_pid:
            if p.sid != p.pid and (parent is None or parent.sid != p.sid):
                raise CantMigrate(f"is in session {p.sid} but its parent is not; "
                                  "upmig cannot rebuild that yet", pid=p.pid)
        elif p.sid != root.sid or (parent is not None and parent.sid != root.sid):
            raise CantMigrate(f"is in session {p.sid}, whose leader is not in the dump "
                              "and is not the dumped tree's own; upmig cannot rebuild "
                              "that", pid=p.pid)
        if p.pgid not in by_pid and p.pgid != root.pgid:
            raise CantMigrate(f"is in process group {p.pgid}, whose leader is not in the "
                              "dump and is not the dumped tree's own; upmig cannot "
                              "rebuild that", pid=p.pid)


# ---- resume

@dataclass
class Born:
    """A process of the tree as made here: still a bare stub, stopped under ptrace."""

    rec: Process
    outer: int          # its PID as upmig sees it
    inner: int          # its PID as it sees itself
    gadget: int         # a syscall instruction in it
    inj: nat.Injector


def create(root: int, procs: list[Process], set_tid: bool) -> list[Born]:
    """Fork every other process of procs (root first, parents before children) from
    its parent, starting from the stub `root`; give each its session and group;
    make the zombies. On failure the caller kills what was made (see made())."""
    regs = nat.get_regs(root)
    gadget = Regs(regs).rip
    nat.set_sigmask(root, (1 << 64) - 1)  # inherited: nothing is delivered while we work
    first = Born(procs[0], root, pidns.inner_pid(root), gadget,
                 nat.Injector(root, regs, gadget))
    made = {procs[0].pid: first}
    _lead(first)
    for p in procs[1:]:
        if p.ppid not in made:
            raise RestoreError(f"pid {p.pid}: its parent {p.ppid} is not in the image")
        made[p.pid] = b = _fork(made[p.ppid], p, set_tid)
        _lead(b)
    for b in made.values():
        _join_group(b, made, first)
    zombies = [b for b in made.values() if b.rec.zombie]
    for b in zombies:
        _die(b)
    for b in zombies:
        _wait_zombie(b)
    for parent in {b.rec.ppid for b in zombies}:
        _drain_sigchld(made[parent])
    return [b for b in made.values() if not b.rec.zombie]


def _args_at(b: Born) -> int:
    """Room for syscall arguments: below the stub's stack pointer (it runs no code)."""
    return b.inj.regs.rsp - 1024


def _fork(parent: Born, p: Process, set_tid: bool) -> Born:
    inner, outer = threads.clone3(parent.inj, lambda at, data: _poke(parent, at, data),
                                  _args_at(parent), 0, signal.SIGCHLD,
                                  p.pid if set_tid else 0, f"pid {p.pid}")
    return Born(p, outer, inner, parent.gadget,
                nat.Injector(outer, nat.get_regs(outer), parent.gadget))


def _poke(b: Born, at: int, data: bytes) -> None:
    with open(f"/proc/{b.outer}/mem", "r+b", buffering=0) as mem:
        mem.seek(at)
        mem.write(data)


def _lead(b: Born) -> None:
    """A session or group leader becomes one before it forks anything."""
    if b.rec.sid == b.rec.pid:
        b.inj.call(nr.setsid, what=f"setsid (pid {b.rec.pid})")
    elif b.rec.pgid == b.rec.pid:
        b.inj.call(nr.setpgid, 0, 0, what=f"setpgid (pid {b.rec.pid})")


def _join_group(b: Born, made: dict[int, Born], root: Born) -> None:
    """Into its group, now that every group's leader exists. A group from outside
    the tree is the root's, that is, upmig resume's own."""
    pgid = b.rec.pgid
    if pgid == b.rec.pid:
        return
    leader = made.get(pgid)
    want_outer = leader.outer if leader else os.getpgid(root.outer)
    if os.getpgid(b.outer) == want_outer:
        return
    want = leader.inner if leader else want_outer
    b.inj.call(nr.setpgid, 0, want, what=f"setpgid(0, {want}) (pid {b.rec.pid})")


def _die(b: Born) -> None:
    """Let a zombie-to-be go, straight into the exit it made on the source."""
    status = b.rec.exit_status
    r = Regs(nat.get_regs(b.outer))
    r.rip, r.orig_rax = b.gadget, -1
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        r.rax, r.rdi, r.rsi = nr.kill, b.inner, sig
        # A core dump would land here, or in the machine's crash reporter.
        b.inj.call(nr.prlimit64, 0, resource.RLIMIT_CORE, _zero_limit(b), 0,
                   what="prlimit(RLIMIT_CORE)")
    else:
        r.rax, r.rdi = nr.exit_group, os.WEXITSTATUS(status)
    nat.set_sigmask(b.outer, 0)
    nat.set_regs(b.outer, bytes(r))
    nat.ptrace(nat.PTRACE_DETACH, b.outer, 0, 0)


def _zero_limit(b: Born) -> int:
    _poke(b, _args_at(b), bytes(16))
    return _args_at(b)


def _wait_zombie(b: Born) -> None:
    deadline = time.monotonic() + ZOMBIE_SECONDS
    while time.monotonic() < deadline:
        try:
            state = _proc.stat(b.outer).state
        except UpmigError:
            break
        if state == "Z":
            return
        time.sleep(0.002)
    raise RestoreError(f"pid {b.rec.pid} did not become a zombie again")


def _drain_sigchld(b: Born) -> None:
    """The zombies just made told their parent: take that SIGCHLD back (the image
    says whether one was pending)."""
    at = _args_at(b)
    _poke(b, at, struct.pack("<QQQ", 1 << (signal.SIGCHLD - 1), 0, 0))
    b.inj.raw(nr.rt_sigtimedwait, at, 0, at + 8, 8)
