"""Whose rights the stub works with while it rebuilds a process, and which
credentials upmig resume may give the process.

An image is data from outside, and the stub starts as upmig resume's child with
its credentials: root's, as a rule. So every path an image names (fds, the cwd,
the executable and mapped files, ghosts made again in their directory or in
/dev/shm, FIFOs, unix socket names) is opened, created or bound by the stub with
the process's own filesystem rights: its fsuid, fsgid and supplementary groups,
and those of the filesystem capabilities (FS_CAPS) it held. What the process
could not have opened, created or bound itself, resume refuses.

Only these change. upmig's other rights stay in force, because the stub needs
them and none of them is about paths: PR_SET_MM_MAP (with the executable) and
clone3's set_tid want CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, pidfd_getfd from
another process of the tree CAP_SYS_PTRACE, TCP repair CAP_NET_ADMIN. Going back
is always allowed: setfsuid and setfsgid to the stub's real ids need no
capability, and CAP_SETGID, which setgroups wants, is not a filesystem one.

The kernel ties fsuid and capabilities: setfsuid from 0 to another id takes
FS_CAPS out of the effective set; back to 0 puts in those of them that are
permitted. Acting sets the effective set explicitly after either.

The credentials themselves (task.restore_creds) are given only as the resumer can
grant them: root gives what a sealed image says; anyone else only their own ids
and capabilities they hold, and check_grantable refuses the rest before any
process exists."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from upmig import _proc
from upmig.errors import AccessDenied
from upmig.inject import Session
from upmig.kconst import (
    CAP_CHECKPOINT_RESTORE,
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_LINUX_IMMUTABLE,
    CAP_MAC_OVERRIDE,
    CAP_MKNOD,
    CAP_SETGID,
    CAP_SETPCAP,
    CAP_SETUID,
    CAP_SYS_ADMIN,
    LINUX_CAPABILITY_VERSION_3,
)
from upmig.records import Task
from upmig.syscalls import nr

# What setfsuid(non-zero) takes out of root's effective set (measured on 6.18: the
# kernel's CAP_FS_SET).
FS_CAPS = sum(1 << cap for cap in (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER,
                                   CAP_FSETID, CAP_LINUX_IMMUTABLE, CAP_MKNOD, CAP_MAC_OVERRIDE))
NO_ID = 0xFFFFFFFF  # setfsuid(-1) changes nothing and says what the fsuid is
ARGS_AT = 12 * 4096  # where in the scratch area a switch puts its arguments: clear of
#                      the paths and structures the steps between switches put there


@dataclass(frozen=True)
class Rights:
    """What the kernel checks a thread's path operations against."""

    fsuid: int
    fsgid: int
    groups: tuple[int, ...]  # sorted, as the kernel keeps them
    effective: int           # effective capabilities


@dataclass(frozen=True)
class _Creds:
    """A thread's credentials as /proc shows them."""

    uids: list[int]          # real, effective, saved, fs
    gids: list[int]
    groups: tuple[int, ...]
    caps: dict[str, int]     # CapInh, CapPrm, CapEff, CapBnd, CapAmb

    @classmethod
    def of(cls, status_text: str) -> _Creds:
        st = _proc.parse_status(status_text)
        return cls([int(x) for x in st["Uid"].split()], [int(x) for x in st["Gid"].split()],
                   tuple(sorted({int(x) for x in st["Groups"].split()})),
                   {name: int(st[name], 16) for name in
                    ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")})

    def rights(self) -> Rights:
        return Rights(self.uids[3], self.gids[3], self.groups, self.caps["CapEff"])


def _thread_creds(pid: int, tid: int) -> _Creds:
    return _Creds.of(_proc.read_text(pid, f"task/{tid}/status"))


def _own_creds() -> _Creds:
    with open("/proc/thread-self/status") as f:
        return _Creds.of(f.read())


def of_process(rec: Task, stub: _Creds) -> Rights:
    """The process's filesystem rights, as far as the stub holds them: its fs ids and
    groups, its filesystem capabilities (an image without capabilities: those of
    fsuid 0, as the kernel would give), the stub's other capabilities."""
    fs_caps = rec.caps["CapEff"] if rec.caps else FS_CAPS if rec.uids[3] == 0 else 0
    effective = stub.caps["CapEff"] & ~FS_CAPS | fs_caps & FS_CAPS & stub.caps["CapPrm"]
    return Rights(rec.uids[3], rec.gids[3], tuple(sorted(set(rec.groups))), effective)


class Acting:
    """The stub's leader thread working with the process's filesystem rights (take)
    or with upmig's again (give_back). Its other threads are cloned after give_back:
    task.restore_creds then gives every thread the process's whole credentials."""

    def __init__(self, s: Session, pid: int, rec: Task):
        self.s, self.pid = s, pid
        self.stub = _thread_creds(pid, pid)
        self.upmig = self.stub.rights()
        self.process = of_process(rec, self.stub)

    def take(self) -> None:
        self._switch(self.upmig, self.process)

    def give_back(self) -> None:
        self._switch(self.process, self.upmig)

    @contextmanager
    def as_upmig(self) -> Iterator[None]:
        """One step with upmig's own rights (a failure kills the stub: no finally)."""
        self.give_back()
        yield
        self.take()

    def _switch(self, now: Rights, to: Rights) -> None:
        """Groups first (setgroups needs CAP_SETGID, which no fsuid change touches),
        then the fs ids, then the effective set the fsuid change disturbed."""
        if now == to:
            return
        s, at = self.s, self.s.scratch + ARGS_AT
        if to.groups != now.groups:
            s.write(at, struct.pack(f"<{len(to.groups)}I", *to.groups))
            self._check(s.raw(nr.setgroups, len(to.groups), at), to, "setgroups")
        if to.fsgid != now.fsgid:
            s.raw(nr.setfsgid, to.fsgid)  # says the old one, changed or not: ask again
            self._check(0 if s.raw(nr.setfsgid, NO_ID) == to.fsgid else -1, to, "setfsgid")
        if to.fsuid != now.fsuid:
            s.raw(nr.setfsuid, to.fsuid)
            self._check(0 if s.raw(nr.setfsuid, NO_ID) == to.fsuid else -1, to, "setfsuid")
        caps = self.stub.caps
        s.write(at, struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0) + b"".join(
            struct.pack("<III", to.effective >> sh & 0xFFFFFFFF, caps["CapPrm"] >> sh &
                        0xFFFFFFFF, caps["CapInh"] >> sh & 0xFFFFFFFF) for sh in (0, 32)))
        self._check(s.raw(nr.capset, at, at + 8), to, "capset")

    def _check(self, rc: int, to: Rights, call: str) -> None:
        if rc < 0:
            raise AccessDenied(f"the stub cannot take the filesystem rights of uid "
                               f"{to.fsuid}, gid {to.fsgid} ({call} refused)", pid=self.pid)


# ---- what the resumer may grant

def check_grantable(tasks: list[Task]) -> None:
    """Refuse, before any process exists, what upmig resume could not do or give. It
    rebuilds nothing without CAP_CHECKPOINT_RESTORE (PR_SET_MM_MAP, chosen PIDs).
    Without CAP_SETUID and CAP_SETGID it gives only its own ids and groups, and no
    capabilities it lacks, nor keeps in the bounding set what the process had
    dropped without CAP_SETPCAP. Root gives what the image says."""
    me = _own_creds()
    eff = me.caps["CapEff"]
    if not (eff >> CAP_CHECKPOINT_RESTORE & 1 or eff >> CAP_SYS_ADMIN & 1):
        raise AccessDenied(f"upmig resume, run by uid {me.uids[0]}, needs "
                           "CAP_CHECKPOINT_RESTORE (or root) to rebuild a process")
    if eff >> CAP_SETUID & 1 and eff >> CAP_SETGID & 1:
        return  # root: what root lacks here is this machine's (task.restore_creds says)
    for t in tasks:
        _same_ids(t, me)
        if not t.caps:
            continue
        extra = (t.caps["CapPrm"] | t.caps["CapEff"] | t.caps["CapAmb"]) & ~me.caps["CapPrm"]
        if extra:
            raise AccessDenied(f"held capabilities upmig resume lacks ({_caps(extra)}); "
                               "only a resumer that holds them can give them", pid=t.pid)
        dropped = me.caps["CapBnd"] & ~t.caps["CapBnd"]
        if dropped and not eff >> CAP_SETPCAP & 1:
            raise AccessDenied(f"had dropped {_caps(dropped)} from its bounding set, which "
                               "upmig resume cannot do without CAP_SETPCAP", pid=t.pid)


def _same_ids(t: Task, me: _Creds) -> None:
    if set(t.uids) == {me.uids[0]} and set(t.gids) == {me.gids[0]} and \
            tuple(sorted(set(t.groups))) == me.groups:
        return
    raise AccessDenied(f"ran as uids {_ids(t.uids)}, gids {_ids(t.gids)}, groups "
                       f"{_ids(t.groups) or 'none'}; upmig resume runs as uid {me.uids[0]} "
                       "without CAP_SETUID and CAP_SETGID and can give only its own ids: "
                       "resume it as root", pid=t.pid)


def _ids(ids: list[int] | tuple[int, ...]) -> str:
    return ",".join(map(str, ids))


CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore")


def _caps(mask: int) -> str:
    return ", ".join(CAP_NAMES[cap] if cap < len(CAP_NAMES) else f"capability {cap}"
                     for cap in range(64) if mask >> cap & 1)
