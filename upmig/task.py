"""Per-process kernel state: identity, cwd, umask, rlimits, credentials and
capabilities, personality, session and group leadership."""

from __future__ import annotations

import errno
import os
import resource
import struct

from upmig import _proc, fileid, rights
from upmig.errors import CantMigrate, Mismatch, RestoreError
from upmig.inject import Session
from upmig.kconst import (
    LINUX_CAPABILITY_VERSION_3,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_CAPBSET_DROP,
    PR_GET_CHILD_SUBREAPER,
    PR_GET_DUMPABLE,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_KEEPCAPS,
    PR_SET_NO_NEW_PRIVS,
)
from upmig.records import FileIdentity, Task
from upmig.syscalls import nr

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def capture(s: Session, pid: int) -> Task:
    status = _proc.parse_status(_proc.read_text(pid, "status"))
    stat = _proc.stat(pid)
    root = _proc.readlink(pid, "root")
    if root != "/":
        raise CantMigrate(f"runs chrooted in {root}; chroot is not supported yet", pid=pid)
    cwd = _proc.readlink(pid, "cwd")
    if cwd.endswith(" (deleted)"):
        raise CantMigrate(f"works in the deleted directory {cwd[:-10]}, which cannot be "
                          "recreated", pid=pid)
    dumpable = s.call(nr.prctl, PR_GET_DUMPABLE, what="prctl(PR_GET_DUMPABLE)")
    s.call(nr.prctl, PR_GET_CHILD_SUBREAPER, s.scratch, what="prctl(PR_GET_CHILD_SUBREAPER)")
    subreaper = int.from_bytes(s.read(s.scratch, 4), "little")
    cmdline = _proc.read_bytes(pid, "cmdline").split(b"\0")
    return Task(
        pid=pid,
        comm=_proc.read_text(pid, "comm").rstrip("\n"),
        cmdline=[a.decode("utf-8", "surrogateescape") for a in cmdline[:-1]],
        exe=_proc.readlink(pid, "exe"),
        cwd=cwd,
        root=root,
        umask=int(status["Umask"], 8),
        personality=int(_proc.read_text(pid, "personality"), 16),
        uids=[int(x) for x in status["Uid"].split()],
        gids=[int(x) for x in status["Gid"].split()],
        groups=[int(x) for x in status["Groups"].split()],
        rlimits=_proc.parse_limits(_proc.read_text(pid, "limits")),
        session_leader=stat.session == pid,
        group_leader=stat.pgrp == pid,
        dumpable=dumpable,
        caps=capabilities(status),
        no_new_privs=int(status.get("NoNewPrivs", "0")),
        subreaper=subreaper,
        seccomp=int(status.get("Seccomp", "0")),
    )


def capabilities(status: dict[str, str]) -> dict[str, int]:
    return {name: int(status[name], 16) for name in CAP_SETS}


def _str(s: Session, text: str, at: int = 0) -> int:
    """Put a NUL-terminated string into the scratch area; its address."""
    data = os.fsencode(text) + b"\0"
    s.write(s.scratch + at, data)
    return s.scratch + at


def restore_early(s: Session, rec: Task, held: fileid.Held, cwd: FileIdentity | None,
                  acting: rights.Acting, inherited_cwd: bool) -> None:
    """What must precede the files: cwd, umask, personality, subreaper. cwd: the
    identity of the working directory (see fileid.Held); inherited_cwd: its parent,
    rebuilt before it, has the same one."""
    _enter_cwd(s, rec, held, cwd, acting, inherited_cwd)
    s.call(nr.umask, rec.umask, what="umask")
    s.call(nr.personality, rec.personality, what="personality")
    if rec.subreaper:  # orphans below it come to it, not to init
        s.call(nr.prctl, PR_SET_CHILD_SUBREAPER, 1, what="prctl(PR_SET_CHILD_SUBREAPER)")


def _enter_cwd(s: Session, rec: Task, held: fileid.Held, ident: FileIdentity | None,
               acting: rights.Acting, inherited: bool) -> None:
    """Into its working directory, opened through no symlink and checked against its
    identity, with its own rights. A process can hold one it cannot reach or search
    (a daemon started in /root that then became www-data): upmig enters that one for
    it if its parent, which entered it with its own rights, has it too (fork passes
    it on), or if the process cannot search it (every lookup below it, and "..",
    needs that right), so that holding it gives nothing. One it could use but not
    reach, it could not have entered by itself: refused."""
    what, flags = "its working directory", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    fd = held.try_open(s, rec.pid, rec.cwd, flags, ident, what)
    try:
        rc = s.raw(nr.fchdir, fd) if fd >= 0 else fd  # fchdir wants the search right
        if rc == -errno.EACCES:
            with acting.as_upmig():
                if fd < 0:
                    fd = held.open(s, rec.pid, rec.cwd, flags, ident, what)
                s.call(nr.fchdir, fd, what=f"fchdir({rec.cwd})")
            if not inherited and s.raw(nr.chdir, _str(s, ".")) == 0:
                raise RestoreError(f"cannot reach its working directory {rec.cwd} with its "
                                   f"own rights (uid {rec.uids[3]}, gid {rec.gids[3]}), "
                                   "though it could use it once there", pid=rec.pid)
        elif rc < 0:
            raise RestoreError(f"cannot enter its working directory {rec.cwd}: "
                               f"{os.strerror(-rc)}", pid=rec.pid)
    finally:
        if fd >= 0:
            s.raw(nr.close, fd)


def open_fd_limit(pid: int, rec: Task, needed: int) -> None:
    """While the fds are made: room for every fd number the process had, and for
    upmig's own above them (restore_limits puts the process's own limit back)."""
    _, hard = rec.rlimits.get("Max open files", [-1, -1])
    _, have = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    want = max(needed, have, hard if hard >= 0 else 0)
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (want, want))
    except (OSError, ValueError) as e:
        raise Mismatch(f"cannot allow the {needed} open files pid {rec.pid} needs here "
                       f"({e})") from None


def restore_limits(s: Session, pid: int, rec: Task) -> None:
    for name, (soft, hard) in rec.rlimits.items():
        res = _proc.LIMIT_NAMES[name]
        val = struct.pack("<qq", soft, hard)  # -1: RLIM_INFINITY (resource's), all ones
        s.write(s.scratch, val)
        r = s.raw(nr.prlimit64, 0, res, s.scratch, 0)
        if r < 0:
            raise Mismatch(f"limit '{name}' ({soft}/{hard}) of pid {pid} cannot be restored "
                           f"here ({os.strerror(-r)})")


def restore_creds(s: Session, pid: int, tid: int, rec: Task) -> None:
    """Last of the task state, in the thread tid that s drives (credentials belong to
    each thread): ids, then capabilities (dropping root ends our right to change the
    rest)."""
    caps = rec.caps or {}
    status = _proc.parse_status(_proc.read_text(pid, f"task/{tid}/status"))
    have = capabilities(status)
    for cap in range(64):  # the bounding set can only shrink: drop what it lacked
        if caps and have["CapBnd"] >> cap & 1 and not caps["CapBnd"] >> cap & 1:
            s.call(nr.prctl, PR_CAPBSET_DROP, cap, what=f"prctl(PR_CAPBSET_DROP, {cap})")
    keep = bool(caps) and rec.uids[0] != 0 and caps["CapPrm"] != 0
    if keep:  # a non-root process that holds capabilities keeps them across setresuid
        s.call(nr.prctl, PR_SET_KEEPCAPS, 1, what="prctl(PR_SET_KEEPCAPS)")
    groups = rec.groups
    if set(groups) != {int(g) for g in status["Groups"].split()}:
        # Only if they differ: without CAP_SETGID (a resumer that is not root, giving
        # the process its own ids: upmig.rights) even the same groups are refused.
        s.write(s.scratch, struct.pack(f"<{len(groups)}I", *groups))
        s.call(nr.setgroups, len(groups), s.scratch, what="setgroups")
    s.call(nr.setresgid, *rec.gids[:3], what="setresgid")
    s.call(nr.setresuid, *rec.uids[:3], what="setresuid")
    # setres[ug]id made the fs ids the effective ones; a process may have had others
    # (setfsuid), always ones it could set again: real, effective or saved.
    if rec.gids[3] != rec.gids[1]:
        _set_fs_id(s, pid, nr.setfsgid, rec.gids[3], "fsgid")
    if rec.uids[3] != rec.uids[1]:
        _set_fs_id(s, pid, nr.setfsuid, rec.uids[3], "fsuid")
    if caps:
        _set_caps(s, pid, caps)
    if keep:
        s.call(nr.prctl, PR_SET_KEEPCAPS, 0, what="prctl(PR_SET_KEEPCAPS)")
    # A change of uid makes the kernel reset the dumpable flag; put back what it was
    # (2, "suidsafe", is only ever set by the kernel).
    if rec.dumpable in (0, 1):
        s.call(nr.prctl, PR_SET_DUMPABLE, rec.dumpable, what="prctl(PR_SET_DUMPABLE)")
    if rec.no_new_privs:
        s.call(nr.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="prctl(PR_SET_NO_NEW_PRIVS)")


def _set_fs_id(s: Session, pid: int, call: int, want: int, what: str) -> None:
    s.raw(call, want)  # says the old one, changed or not: ask again
    if s.raw(call, rights.NO_ID) != want:
        raise Mismatch(f"the {what} {want} of pid {pid} cannot be given back here")


def _set_caps(s: Session, pid: int, caps: dict[str, int]) -> None:
    data = b"".join(struct.pack("<III", caps["CapEff"] >> sh & 0xFFFFFFFF,
                                caps["CapPrm"] >> sh & 0xFFFFFFFF,
                                caps["CapInh"] >> sh & 0xFFFFFFFF) for sh in (0, 32))
    s.write(s.scratch, struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0) + data)
    r = s.raw(nr.capset, s.scratch, s.scratch + 8)
    if r < 0:
        raise Mismatch(f"the capabilities of pid {pid} cannot be given here "
                       f"({os.strerror(-r)}): upmig lacks some of them")
    for cap in range(64):
        if caps["CapAmb"] >> cap & 1:
            s.call(nr.prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0,
                   what="prctl(PR_CAP_AMBIENT_RAISE)")
