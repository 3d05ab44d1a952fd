"""Per-process kernel state: identity, cwd, umask, rlimits, creds, personality, comm,
session and group leadership, clear_child_tid."""

from __future__ import annotations

import os
import struct

from upmig import _proc
from upmig.errors import CantMigrate
from upmig.inject import Session
from upmig.records import Task

SYS_umask, SYS_chdir, SYS_setsid, SYS_setpgid = 95, 80, 112, 109
SYS_personality, SYS_prctl, SYS_prlimit64 = 135, 157, 302
SYS_setgroups, SYS_setresuid, SYS_setresgid, SYS_set_tid_address = 116, 117, 119, 218
PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_NAME, PR_GET_TID_ADDRESS = 3, 4, 15, 40
RLIM_INFINITY = (1 << 64) - 1


def capture(s: Session, pid: int) -> Task:
    status = _proc.parse_status(_proc.read_text(pid, "status"))
    stat = _proc.parse_stat(_proc.read_text(pid, "stat"))
    root = _proc.readlink(pid, "root")
    if root != "/":
        raise CantMigrate(f"runs chrooted in {root}; chroot is not supported yet", pid=pid)
    s.call(SYS_prctl, PR_GET_TID_ADDRESS, s.scratch, what="prctl(PR_GET_TID_ADDRESS)")
    clear_child_tid, = struct.unpack("<Q", s.read(s.scratch, 8))
    dumpable = s.call(SYS_prctl, PR_GET_DUMPABLE, what="prctl(PR_GET_DUMPABLE)")
    cmdline = _proc.read_bytes(pid, "cmdline").split(b"\0")
    return Task(
        pid=pid,
        comm=_proc.read_text(pid, "comm").rstrip("\n"),
        cmdline=[a.decode("utf-8", "surrogateescape") for a in cmdline[:-1]],
        exe=_proc.readlink(pid, "exe"),
        cwd=_proc.readlink(pid, "cwd"),
        root=root,
        umask=int(status["Umask"], 8),
        personality=int(_proc.read_text(pid, "personality"), 16),
        uids=[int(x) for x in status["Uid"].split()],
        gids=[int(x) for x in status["Gid"].split()],
        groups=[int(x) for x in status["Groups"].split()],
        rlimits=_proc.parse_limits(_proc.read_text(pid, "limits")),
        session_leader=int(stat[6]) == pid,
        group_leader=int(stat[5]) == pid,
        clear_child_tid=clear_child_tid,
        dumpable=dumpable,
        cpus=_affinity(pid),
    )


def _affinity(pid: int) -> list[int] | None:
    cpus = os.sched_getaffinity(pid)
    return None if len(cpus) == os.cpu_count() else sorted(cpus)


def restore_affinity(pid: int, rec: Task) -> None:
    """The CPUs it may run on: as before where they exist here, else all of them."""
    here = set(range(os.cpu_count() or 1))
    wanted = set(rec.cpus or here) & here
    os.sched_setaffinity(pid, wanted or here)


def _str(s: Session, text: str, at: int = 0) -> int:
    """Put a NUL-terminated string into the scratch area; its address."""
    data = os.fsencode(text) + b"\0"
    s.write(s.scratch + at, data)
    return s.scratch + at


def restore_early(s: Session, rec: Task) -> None:
    """What needs the stub's privileges or must precede the files: cwd, umask, ids."""
    s.call(SYS_chdir, _str(s, rec.cwd), what=f"chdir({rec.cwd})")
    s.call(SYS_umask, rec.umask, what="umask")
    if rec.session_leader:
        s.call(SYS_setsid, what="setsid")
    elif rec.group_leader:
        s.call(SYS_setpgid, 0, 0, what="setpgid")
    s.call(SYS_personality, rec.personality, what="personality")
    s.call(SYS_prctl, PR_SET_NAME, _str(s, rec.comm), what="prctl(PR_SET_NAME)")
    if rec.clear_child_tid:
        s.call(SYS_set_tid_address, rec.clear_child_tid, what="set_tid_address")


def restore_limits(s: Session, pid: int, rec: Task) -> None:
    for name, (soft, hard) in rec.rlimits.items():
        res = _proc.LIMIT_NAMES[name]
        val = struct.pack("<QQ", RLIM_INFINITY if soft < 0 else soft,
                          RLIM_INFINITY if hard < 0 else hard)
        s.write(s.scratch, val)
        r = s.raw(SYS_prlimit64, 0, res, s.scratch, 0)
        if r < 0:
            raise CantMigrate(f"limit '{name}' ({soft}/{hard}) cannot be restored here "
                              f"(error {-r}: {os.strerror(-r)})", pid=pid)


def restore_creds(s: Session, rec: Task) -> None:
    """Last of the task state: dropping root ends our right to change the rest."""
    groups = rec.groups
    s.write(s.scratch, struct.pack(f"<{len(groups)}I", *groups))
    s.call(SYS_setgroups, len(groups), s.scratch, what="setgroups")
    s.call(SYS_setresgid, *rec.gids[:3], what="setresgid")
    s.call(SYS_setresuid, *rec.uids[:3], what="setresuid")
    # A change of uid makes the kernel clear the dumpable flag; put back what it was.
    s.call(SYS_prctl, PR_SET_DUMPABLE, rec.dumpable, what="prctl(PR_SET_DUMPABLE)")
