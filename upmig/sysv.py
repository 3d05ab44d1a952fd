"""SysV shared memory segments and semaphore sets the tree uses.

They belong to the IPC namespace, not to a process: dump records the segments the
tree attaches (and those a process of it made and holds only by id), with their
bytes, and the semaphore sets a process of the tree was the last to operate on
(GETPID), with their values. Resume makes each again under its old id (programs
keep ids in memory) through shm_next_id / sem_next_id, or takes the one still
there when it is the same (the same machine: a segment not removed outlives its
processes). Each process attaches its segments at their addresses (shmat); a
segment that was removed (IPC_RMID) is removed again once all are attached.

Not moved: SEM_UNDO adjustments (no interface reads them), creator ids and times."""

from __future__ import annotations

import mmap
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from upmig import _native as nat
from upmig import _proc, ghosts, memmap
from upmig.errors import CantMigrate, Mismatch, RestoreError, from_oserror
from upmig.image import PageData, PageSource
from upmig.inject import Session
from upmig.kconst import (
    GETALL,
    GETPID,
    IPC_CREAT,
    IPC_EXCL,
    IPC_RMID,
    IPC_SET,
    IPC_STAT,
    SETALL,
    SHM_DEST,
    SHM_EXEC,
    SHM_RDONLY,
    SHM_REMAP,
)
from upmig.records import SysvSem, SysvShm, Vma
from upmig.syscalls import nr

IPC_PERM = struct.Struct("<iIIIIH")  # key, uid, gid, cuid, cgid, mode (struct ipc64_perm)
STAT_SIZE = 256                      # room for shmid64_ds / semid64_ds
SHM_SEGSZ_AT, SHM_CTIME_AT = 48, 72  # shmid64_ds.shm_segsz, .shm_ctime
SEM_CTIME_AT, SEM_NSEMS_AT = 64, 80  # semid64_ds.sem_ctime, .sem_nsems


def target(shmid: int) -> str:
    return f"sysv:{shmid}"


# ---- dump

@dataclass
class Found:
    """What the tree uses, and where each segment's bytes can be read."""

    shm: list[SysvShm] = field(default_factory=list)
    sem: list[SysvSem] = field(default_factory=list)
    source: dict[int, str] = field(default_factory=dict)  # shmid -> a /proc path opening it


def capture(maps: dict[int, list[_proc.MapsLine]]) -> Found:
    """maps: each process of the tree's (all frozen)."""
    found = Found()
    mine = os.readlink("/proc/self/ns/ipc")
    pids = set(maps)
    for pid, lines in maps.items():
        for line in lines:
            if line.path.startswith("/SYSV"):
                if _proc.readlink(pid, "ns/ipc") != mine:
                    raise CantMigrate("uses SysV shared memory of another IPC namespace, "
                                      "which is not supported yet", pid=pid)
                found.source.setdefault(line.inode, memmap.map_file(pid, line.start, line.end))
    boot = _proc.boot_id()
    for row in _table("shm"):
        shmid = int(row["shmid"])
        if shmid in found.source or int(row["cpid"]) in pids:
            found.shm.append(SysvShm(id=shmid, key=int(row["key"]), size=int(row["size"]),
                                     mode=int(row["perms"], 8), uid=int(row["uid"]),
                                     gid=int(row["gid"]), ctime=int(row["ctime"]), boot=boot))
    for row in _table("sem"):
        semid, nsems = int(row["semid"]), int(row["nsems"])
        last = [p for p in (_sem(semid, i, GETPID) for i in range(nsems)) if p in pids]
        if last:
            found.sem.append(SysvSem(id=semid, key=int(row["key"]), mode=int(row["perms"], 8),
                                     uid=int(row["uid"]), gid=int(row["gid"]),
                                     values=_sem_values(semid, nsems), ctime=int(row["ctime"]),
                                     boot=boot, last_pid=last[0]))
    return found


def _table(what: str) -> list[dict[str, str]]:
    with open(f"/proc/sysvipc/{what}") as f:
        head, *rows = f.read().splitlines()
    names = head.split()
    return [dict(zip(names, r.split(), strict=False)) for r in rows if r.strip()]


def _sem(semid: int, num: int, cmd: int) -> int:
    return nat.syscall(nr.semctl, semid, num, cmd, 0, what=f"semctl({semid}, {num})")


def _sem_values(semid: int, nsems: int) -> list[int]:
    buf = bytearray(2 * max(nsems, 1))  # unsigned short[]
    nat.syscall(nr.semctl, semid, 0, GETALL, buf, what=f"semctl({semid}, GETALL)")
    return list(struct.unpack_from(f"<{nsems}H", buf))


def records_and_contents(found: Found, opened: ExitStack) -> list[Any]:
    """The records, then where each segment's bytes are: a process's attachment, or
    one of upmig's own for a segment no process attaches (its file stays open in
    opened after it is detached)."""
    out: list[Any] = [*found.shm, *found.sem]
    for seg in found.shm:
        if seg.id in found.source:
            out += _contents(seg, found.source[seg.id], opened)
            continue
        at = nat.syscall(nr.shmat, seg.id, 0, SHM_RDONLY, what=f"shmat({seg.id})")
        try:
            out += _contents(seg, memmap.map_file(os.getpid(), at, at + _pages(seg.size)),
                             opened)
        finally:
            nat.syscall(nr.shmdt, at, what="shmdt")
    return out


def _contents(seg: SysvShm, source: str, opened: ExitStack) -> list[PageSource]:
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    opened.callback(os.close, fd)
    return ghosts.file_contents(os.getpid(), fd, seg.size, target(seg.id))


def _pages(n: int) -> int:
    return -(-n // nat.PAGE) * nat.PAGE


# ---- resume

@dataclass
class Made:
    """What resume made (to be undone if it fails) and what to remove at the end."""

    shm: list[int] = field(default_factory=list)
    sem: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)  # segments to IPC_RMID at the end
    sizes: dict[int, int] = field(default_factory=dict)  # shmid -> size
    # A set's values are put back by the process that operated on it last (so it is
    # named again by GETPID, which is how the next dump finds the set): pid -> sets.
    values_by: dict[int, list[SysvSem]] = field(default_factory=dict)


def make_all(shms: list[SysvShm], sems: list[SysvSem], source,
             contents: dict[str, list[PageData]], live: set[int]) -> Made:
    """source: the image's Image.source, contents: its pages by target; live: the
    PIDs (in the image) of the tree's live processes."""
    made = Made()
    try:
        for seg in shms:
            _make_shm(seg, made, source, contents.get(target(seg.id), []))
        for sem in sems:
            _make_sem(sem, made)
            if sem.last_pid in live:
                made.values_by.setdefault(sem.last_pid, []).append(sem)
            else:
                _set_values(sem)
    except BaseException:
        undo(made)
        raise
    return made


def _make_shm(seg: SysvShm, made: Made, source, pages: list[PageData]) -> None:
    stat = _stat(nr.shmctl, seg.id)
    if stat is not None:  # still there: ours only if it is the very same one
        key, size = IPC_PERM.unpack_from(stat)[0], struct.unpack_from("<Q", stat, SHM_SEGSZ_AT)[0]
        ctime = struct.unpack_from("<q", stat, SHM_CTIME_AT)[0]
        if (key, size, ctime, _proc.boot_id()) != (seg.key, seg.size, seg.ctime, seg.boot):
            raise Mismatch(f"SysV shared memory id {seg.id} is taken here by another segment "
                           f"(key {key:#x}, {size} bytes)")
    else:
        _free_key(nr.shmget, seg.key, "shared memory")
        _next_id("shm", seg.id)
        got = nat.syscall(nr.shmget, seg.key, seg.size, IPC_CREAT | IPC_EXCL | 0o600,
                          what="shmget")
        made.shm.append(got)
        if got != seg.id:
            raise Mismatch(f"SysV shared memory id {seg.id} could not be had here (got {got})")
    _set_perm(nr.shmctl, seg.id, seg.uid, seg.gid, seg.mode)
    made.sizes[seg.id] = seg.size
    if seg.mode & SHM_DEST:
        made.removed.append(seg.id)
    at = nat.syscall(nr.shmat, seg.id, 0, 0, what=f"shmat({seg.id})")
    try:
        fd = os.open(memmap.map_file(os.getpid(), at, at + _pages(seg.size)),
                     os.O_RDWR | os.O_CLOEXEC)
        try:
            ghosts.fill_file(os.getpid(), fd, source, pages)
        finally:
            os.close(fd)
    finally:
        nat.syscall(nr.shmdt, at, what="shmdt")


def _make_sem(sem: SysvSem, made: Made) -> None:
    nsems = len(sem.values)
    stat = _stat(nr.semctl, sem.id)
    if stat is not None:  # still there: ours only if it is the very same one
        key, have = IPC_PERM.unpack_from(stat)[0], struct.unpack_from("<Q", stat, SEM_NSEMS_AT)[0]
        ctime = struct.unpack_from("<q", stat, SEM_CTIME_AT)[0]
        if (key, have, ctime, _proc.boot_id()) != (sem.key, nsems, sem.ctime, sem.boot):
            raise Mismatch(f"SysV semaphore id {sem.id} is taken here by another set "
                           f"(key {key:#x}, {have} semaphores)")
    else:
        _free_key(nr.semget, sem.key, "semaphore set")
        _next_id("sem", sem.id)
        got = nat.syscall(nr.semget, sem.key, nsems, IPC_CREAT | IPC_EXCL | 0o600, what="semget")
        made.sem.append(got)
        if got != sem.id:
            raise Mismatch(f"SysV semaphore id {sem.id} could not be had here (got {got})")
    _set_perm(nr.semctl, sem.id, sem.uid, sem.gid, sem.mode)


def _set_values(sem: SysvSem) -> None:
    values = bytearray(struct.pack(f"<{len(sem.values)}H", *sem.values) or bytes(2))
    nat.syscall(nr.semctl, sem.id, 0, SETALL, values, what=f"semctl({sem.id}, SETALL)")


def set_values(s: Session, made: Made, pid: int) -> None:
    """From inside the process whose image PID is pid: the values of the sets it
    operated on last."""
    for sem in made.values_by.get(pid, []):
        s.write(s.scratch, struct.pack(f"<{len(sem.values)}H", *sem.values))
        s.call(nr.semctl, sem.id, 0, SETALL, s.scratch, what=f"semctl({sem.id}, SETALL)")


def _ctl(ctl: int, ipc_id: int, cmd: int, arg: int | bytearray = 0) -> int:
    """shmctl or semctl (which takes a semaphore number first: 0) of one id."""
    name = {IPC_RMID: "IPC_RMID", IPC_SET: "IPC_SET", IPC_STAT: "IPC_STAT"}.get(cmd, cmd)
    what = f"{'semctl' if ctl == nr.semctl else 'shmctl'}({ipc_id}, {name})"
    if ctl == nr.semctl:
        return nat.syscall(ctl, ipc_id, 0, cmd, arg, what=what)
    return nat.syscall(ctl, ipc_id, cmd, arg, what=what)


def _stat(ctl: int, ipc_id: int) -> bytes | None:
    buf = bytearray(STAT_SIZE)
    try:
        _ctl(ctl, ipc_id, IPC_STAT, buf)
    except OSError:
        return None  # EINVAL/EIDRM: no such id here
    return bytes(buf)


def _set_perm(ctl: int, ipc_id: int, uid: int, gid: int, mode: int) -> None:
    buf = bytearray(STAT_SIZE)
    struct.pack_into("<IIIIIH", buf, 0, 0, uid, gid, 0, 0, mode & 0o777)
    _ctl(ctl, ipc_id, IPC_SET, buf)


def _free_key(get: int, key: int, what: str) -> None:
    if not key:
        return
    try:
        other = nat.syscall(get, key, 0, 0, what="")  # size 0: whatever its size
    except OSError:
        return  # ENOENT: free
    raise Mismatch(f"the SysV {what} key {key:#x} is taken here (by id {other})")


def _next_id(what: str, ipc_id: int) -> None:
    try:
        with open(f"/proc/sys/kernel/{what}_next_id", "w") as f:
            f.write(str(ipc_id))
    except OSError as e:
        raise from_oserror(e, f"cannot choose the SysV {what} id {ipc_id}",
                           phase="resume") from None


def undo(made: Made) -> None:
    """Remove what resume made (it failed)."""
    for shmid in made.shm:
        _remove(nr.shmctl, shmid)
    for semid in made.sem:
        _remove(nr.semctl, semid)
    made.shm.clear()
    made.sem.clear()


def finish(made: Made) -> None:
    """Every process has attached its segments: remove those that were removed."""
    for shmid in made.removed:
        _remove(nr.shmctl, shmid)


def _remove(ctl: int, ipc_id: int) -> None:
    try:
        _ctl(ctl, ipc_id, IPC_RMID)
    except OSError:
        pass  # gone already


def _attachments(vmas: list[Vma]) -> dict[tuple[int, int], list[Vma]]:
    """(shmid, address attached at) -> the vmas of that attachment."""
    bases: dict[tuple[int, int], list[Vma]] = {}
    for v in vmas:
        if v.role == "sysv":
            bases.setdefault((v.ghost, v.start - v.offset), []).append(v)
    return bases


@dataclass
class Span:
    """An address range [start, end) a SysV segment occupies."""

    start: int
    end: int


def spans(vmas: list[Vma], sizes: dict[int, int]) -> list[Span]:
    """Where each segment lies whole while attach() attaches it: nothing of upmig's
    (its scratch area) may be there, or the unmapping of the gaps takes it too."""
    return [Span(base, base + _pages(sizes[shmid])) for shmid, base in _attachments(vmas)
            if shmid in sizes]


def attach(s: Session, vmas: list[Vma], sizes: dict[int, int]) -> None:
    """Attach the process's segments where it had them, before anything else is
    mapped (a segment spans its whole size; parts the process had unmapped are
    unmapped again, and each piece gets its own protection)."""
    for (shmid, base), parts in _attachments(vmas).items():
        if shmid not in sizes:
            raise RestoreError(f"the image maps SysV segment {shmid} but does not hold it")
        size = _pages(sizes[shmid])
        # Attached read-write if any part may write (mprotect'ed read-only since, say).
        flags = SHM_REMAP | (0 if any("mw" in v.vmflags for v in parts) else SHM_RDONLY) \
            | (SHM_EXEC if any(v.perms[2] == "x" for v in parts) else 0)
        s.call(nr.shmat, shmid, base, flags, what=f"shmat({shmid}, {base:#x})")
        at = base
        for v in sorted(parts, key=lambda v: v.start):
            if v.start > at:
                s.call(nr.munmap, at, v.start - at, what="munmap(SysV gap)")
            if memmap.prot_of(v.perms) != _attach_prot(flags):
                s.call(nr.mprotect, v.start, v.end - v.start, memmap.prot_of(v.perms),
                       what="mprotect(SysV)")
            at = v.end
        if at < base + size:
            s.call(nr.munmap, at, base + size - at, what="munmap(SysV tail)")


def _attach_prot(flags: int) -> int:
    return (mmap.PROT_READ | (0 if flags & SHM_RDONLY else mmap.PROT_WRITE)
            | (mmap.PROT_EXEC if flags & SHM_EXEC else 0))
