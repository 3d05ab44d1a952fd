"""Files whose bytes travel in the image ("ghosts"): what a process holds or maps
whose contents a resume could find nowhere else.

- a regular file deleted while held open;
- a memfd;
- MAP_SHARED anonymous memory (one shmem file per mmap, inherited by fork);
- a POSIX shared memory object in /dev/shm (named, or unlinked like the ones
  behind POSIX semaphores).

Dump writes each once per tree, copied by the C helper straight from the file
(reached through /proc/PID/fd or /proc/PID/map_files), holes left out. Resume makes
each in the first process of the tree that holds it and writes the bytes back;
every later holder takes that fd (pidfd_getfd). Each process then maps the one file
where it mapped it and opens its fds onto it with their own flags and offsets:
memory shared between processes is shared again, not copied."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from contextlib import ExitStack

from upmig import _native as nat
from upmig import _proc, fileid, memmap
from upmig.errors import CantMigrate, Mismatch, RestoreError
from upmig.image import PageData, PageSource, Records
from upmig.inject import Session
from upmig.kconst import AT_FDCWD
from upmig.records import Fd, Ghost, Vma
from upmig.syscalls import nr

POSIX_SHM = "/dev/shm/"


def lives_in_memory(path: str) -> bool:
    """A file whose contents exist only in this machine's memory and travel in the
    image, to be given their name again: a memfd, or a POSIX shared memory object
    (/dev/shm/NAME, as shm_open names them). Any other file on a tmpfs, such as one
    in a directory under /dev/shm, is a file like those on disk: reopened by path
    and checked, never recreated from the image."""
    bare = path.removesuffix(" (deleted)")
    name = bare.removeprefix(POSIX_SHM)
    return bare.startswith("/memfd:") or (bare.startswith(POSIX_SHM) and "/" not in name
                                           and name not in ("", ".", ".."))


def target(ghost_id: int) -> str:
    return f"ghost:{ghost_id}"


def key(ghost_id: int) -> tuple[str, int]:
    """Its name in a sharing.Registry."""
    return ("ghost", ghost_id)


# ---- dump

def type_of(path: str, st: os.stat_result) -> str:
    """What a ghost is, from its path (without " (deleted)") and its stat."""
    if path in ("", "/dev/zero") or path.startswith("[anon_shmem:"):
        return "shmem"
    if path.startswith("/memfd:"):
        return "memfd"
    if lives_in_memory(path) and path.startswith(POSIX_SHM) and st.st_nlink:
        return "posix"
    return "file"


def capture(pid: int, recs: list[Fd], vmas: list[Vma], limit: int | None) -> list[Ghost]:
    """A Ghost for each such file the process holds open (recs) or maps (vmas)."""
    out: dict[int, Ghost] = {}
    for ghost_id, path, source, where in _holders(pid, recs, vmas):
        if ghost_id in out:
            continue
        st = os.stat(source)
        kind = type_of(path, st)
        if kind == "file" and limit is not None and st.st_size > limit:
            raise CantMigrate(f"holds the deleted file {path} ({st.st_size} bytes) {where}, "
                              f"more than --ghost-limit ({limit} bytes)", pid=pid)
        out[ghost_id] = Ghost(id=ghost_id, path="" if kind == "shmem" else path,
                              size=st.st_size, mode=st.st_mode, type=kind,
                              seals=_seals(source) if kind == "memfd" else 0,
                              uid=st.st_uid, gid=st.st_gid)
    return list(out.values())


def _seals(source: str) -> int:
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    finally:
        os.close(fd)


def _holders(pid: int, recs: list[Fd], vmas: list[Vma]):
    """(ghost id, path, a /proc path that opens it, where it is held) for every fd and
    mapping of a ghost."""
    from upmig.fds.ghost import GhostFd  # (which imports this module)

    for r in recs:
        if isinstance(r, GhostFd):
            yield r.ghost, r.path, f"/proc/{pid}/fd/{r.fd}", f"on fd {r.fd}"
    for v in vmas:
        if v.role == "ghost":
            yield v.ghost, v.path, memmap.map_file(pid, v.start, v.end), \
                f"mapped at {v.start:#x}"


def contents(pid: int, ghosts: list[Ghost], recs: list[Fd], vmas: list[Vma],
             written: set[int], opened: ExitStack) -> list[PageSource]:
    """Where the bytes of every ghost not written yet by an earlier process (written)
    are; the files are opened here and closed by opened."""
    sources = {}
    for ghost_id, _, source, _ in _holders(pid, recs, vmas):
        sources.setdefault(ghost_id, source)
    out = []
    for g in ghosts:
        if g.id in written:
            continue
        written.add(g.id)
        fd = os.open(sources[g.id], os.O_RDONLY | os.O_CLOEXEC)
        opened.callback(os.close, fd)
        if os.fstat(fd).st_size != g.size:
            raise CantMigrate(f"the file {g.path or 'of shared memory'} changed size "
                              "during the dump", pid=pid)
        out += file_contents(pid, fd, g.size, target(g.id))
    return out


def file_contents(pid: int, fd: int, size: int, tgt: str) -> list[PageSource]:
    """The bytes of the file open at fd (ours), holes left out, for target tgt; pid
    is only for the C helper's errors."""
    runs = memmap.data_extents(fd, size)
    return [PageSource(pid, fd, runs, tgt)] if runs else []


def fill_file(pid: int, fd: int, source, pages: list[PageData]) -> None:
    """Write pages into the file open at fd (ours), straight from the image
    (source: its Image.source) by the C helper; pid is only for its errors."""
    for pd in pages:
        source.fill(pid, fd, pd)


def refuse_outsiders(maps: dict[int, list[_proc.MapsLine]]) -> None:
    """Memory the tree maps shared must not also be mapped by a process outside it:
    moving one side would split it. Refused, naming both. maps: each process's."""
    held: dict[tuple[str, int], tuple[int, str]] = {}
    for pid, lines in maps.items():
        for line in lines:
            if line.perms[3] == "s" and line.inode and _travels(line.path):
                held.setdefault((line.dev, line.inode), (pid, line.path))
    outsider = mapped_by(set(held), set(maps))
    if outsider:
        pid, key = outsider
        raise CantMigrate(f"shares memory ({_shown(held[key][1])}) with pid {pid}, which is "
                          "outside the tree; dump the process tree that holds both",
                          pid=held[key][0])


def mapped_by(keys: set[tuple[str, int]], but: set[int]) -> tuple[int, tuple[str, int]] | None:
    """A process (not in but, not upmig) that maps shared one of keys (maps's device
    "MM:mm", inode): (its pid, the key), or None. Every process's maps are read."""
    if not keys:
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in but or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/maps") as f:
                lines = _proc.parse_maps(f.read())
        except (OSError, ValueError):
            # Gone, or a kernel thread; a torn line (ValueError) is a process whose
            # address space is being torn down as it exits: it maps nothing for long.
            continue
        for line in lines:
            if line.perms[3] == "s" and (line.dev, line.inode) in keys:
                return int(name), (line.dev, line.inode)
    return None


def _travels(path: str) -> bool:
    bare = path.removesuffix(" (deleted)")
    return bare in ("", "/dev/zero") or bare.startswith(("[anon_shmem:", "/SYSV")) \
        or lives_in_memory(bare) or (path != bare and not path.startswith("/dev/"))


def _shown(path: str) -> str:
    bare = path.removesuffix(" (deleted)")
    return "anonymous shared memory" if bare in ("", "/dev/zero") else \
        f"SysV segment {bare}" if bare.startswith("/SYSV") else bare


# ---- resume

def make_all(s: Session, pid: int, inner: int, img: Records, spare: int, reg,
             source, contents: dict[str, list[PageData]]) -> dict[int, int]:
    """Every ghost of the process, at fds from spare up, out of the way of its own:
    Ghost id -> fd. Made here if no earlier process of the tree made it (reg, a
    sharing.Registry), else taken from that one. All are parked in reg, to be closed
    once every process has taken what it needs. They are needed before the memory is
    mapped. source: the image's Image.source; contents: its ghost pages, by target."""
    out = {}
    for g in img.of(Ghost):
        if key(g.id) in reg.made:
            made = reg.take(s, key(g.id))
        else:
            made = make(s, pid, g, source, contents.get(target(g.id), []), reg.files)
        out[g.id] = s.call(nr.fcntl, made, fcntl.F_DUPFD_CLOEXEC, spare, what="fcntl(F_DUPFD)")
        s.call(nr.close, made, what="close")
        first = key(g.id) not in reg.made
        reg.park(pid, inner, key(g.id), out[g.id])
        if first and g.type == "memfd" and g.seals not in (0, fcntl.F_SEAL_SEAL):
            reg.seal_later(pid, key(g.id), g.seals)
    return out


def make(s: Session, pid: int, g: Ghost, source, pages: list[PageData],
         made: list[tuple[str, int]]) -> int:
    """The file again, filled: its fd in the process (any number). The stub works
    with the process's filesystem rights (upmig.rights): it makes the file as the
    process would have. made: the POSIX objects made here (path, object id), to be
    removed if resume fails."""
    fd, fresh = _open_posix(s, pid, g, made) if g.type == "posix" else \
        ({"memfd": _make_memfd, "shmem": _make_shmem}.get(g.type, _make_deleted)(s, pid, g),
         True)
    with nat.borrowed_fd(pid, fd) as mine:
        if g.type == "posix":
            _check_same_object(mine, g, fresh)
            _owner_and_mode(s, fd, mine, g)
            os.ftruncate(mine, 0)  # the image's bytes, not what this one held since
        fill_file(pid, mine, source, pages)
        if os.fstat(mine).st_size != g.size:
            os.ftruncate(mine, g.size)
    return fd


def _make_deleted(s: Session, pid: int, g: Ghost) -> int:
    """Unlinked, in its old directory (reached through no symlink)."""
    where = os.path.dirname(g.path) or "/"
    fd = s.open_path(where, os.O_TMPFILE | os.O_RDWR, g.mode & 0o7777)
    if fd in (-errno.EOPNOTSUPP, -errno.EISDIR, -errno.EINVAL):
        fd = _named_then_unlinked(s, where, g)
    if fd == -errno.ELOOP:
        raise Mismatch(f"the directory {where} of the deleted file {g.path} resolves "
                       "through a symlink now")
    if fd < 0:
        raise RestoreError(f"cannot recreate the deleted file {g.path} in {where}: "
                           f"{os.strerror(-fd)}")
    return fd


def _make_memfd(s: Session, pid: int, g: Ghost) -> int:
    """Sealable unless it was not; its seals go on once every process has mapped it
    (F_SEAL_FUTURE_WRITE forbids new writable mappings)."""
    s.write(s.scratch, os.fsencode(g.path[len("/memfd:"):]) + b"\0")
    flags = os.MFD_CLOEXEC | (0 if g.seals == fcntl.F_SEAL_SEAL else os.MFD_ALLOW_SEALING)
    return s.call(nr.memfd_create, s.scratch, flags, what=f"memfd_create({g.path})")


def _make_shmem(s: Session, pid: int, g: Ghost) -> int:
    """MAP_SHARED anonymous memory is a shmem file of its first mmap's size: mmap one,
    keep its file (through map_files), let the mapping go."""
    at = s.call(nr.mmap, 0, g.size, mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0,
                what="mmap(shared anonymous memory)")
    try:
        s.write(s.scratch, f"/proc/self/map_files/{at:x}-{at + g.size:x}".encode() + b"\0")
        return s.call(nr.openat, AT_FDCWD, s.scratch, os.O_RDWR, 0,
                      what="open(/proc/self/map_files)")
    finally:
        s.call(nr.munmap, at, g.size, what="munmap")


def _open_posix(s: Session, pid: int, g: Ghost, made: list[tuple[str, int]]
                ) -> tuple[int, bool]:
    """Made where it was (and listed in made, to be removed if resume fails); or,
    when it is still there (the same machine), that one: (its fd, made here).
    Through no symlink."""
    fd = s.open_path(g.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, g.mode & 0o7777)
    fresh = fd >= 0
    if fresh:
        with nat.borrowed_fd(pid, fd) as mine:  # what to remove: this file, no other
            made.append((g.path, fileid.object_id(os.fstat(mine))))
    elif fd == -errno.EEXIST:
        fd = s.open_path(g.path, os.O_RDWR)
    if fd < 0:
        raise RestoreError(f"cannot make the POSIX shared memory object {g.path}: "
                           f"{os.strerror(-fd)}")
    return fd, fresh


def _owner_and_mode(s: Session, fd: int, mine: int, g: Ghost) -> None:
    """The object's recorded owner and mode, given by the process itself (the stub
    works with its rights): an owner it could not have given, say another user's
    object it must make again here, is refused, never given by upmig as root."""
    st = os.fstat(mine)
    if (st.st_uid, st.st_gid) != (g.uid, g.gid):
        rc = s.raw(nr.fchown, fd, g.uid, g.gid)  # before fchmod: it may clear set-id bits
        if rc < 0:
            raise RestoreError(f"the POSIX shared memory object {g.path} belonged to uid "
                               f"{g.uid}, gid {g.gid}, which the process cannot give it: "
                               f"{os.strerror(-rc)}")
    if st.st_mode & 0o7777 != g.mode & 0o7777:
        rc = s.raw(nr.fchmod, fd, g.mode & 0o7777)
        if rc < 0:
            raise RestoreError(f"cannot give the POSIX shared memory object {g.path} its "
                               f"mode {g.mode & 0o7777:o}: {os.strerror(-rc)}")


def _check_same_object(mine: int, g: Ghost, fresh: bool) -> None:
    """One still there must be the image's, and nobody's now (say, the original,
    left running): its bytes are about to be put back."""
    if fresh:
        return
    st = os.fstat(mine)
    if fileid.object_id(st) != g.id:
        raise RestoreError(f"{g.path} exists here and is not the shared memory object "
                           "the image holds; remove it (or resume where it is not used)")
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"  # as maps shows it
    user = mapped_by({(dev, st.st_ino)}, set())
    if user:
        raise RestoreError(f"{g.path} is in use here by pid {user[0]} (the original, still "
                           "running?); stop it or remove the object first")


def _named_then_unlinked(s: Session, where: str, g: Ghost) -> int:
    name = os.path.join(where, f".upmig-ghost-{g.id}-{os.getpid()}")
    fd = s.open_path(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, g.mode & 0o7777)
    if fd >= 0:
        s.write(s.scratch, os.fsencode(name) + b"\0")
        s.call(nr.unlink, s.scratch, what=f"unlink({name})")
    return fd
