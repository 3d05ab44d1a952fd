"""The state records an image holds: plain dataclasses, one per kind of state.

Dump modules fill them, upmig.image (de)serialises them, restore reads them. A new
kind of state is one new record here plus a dump and a restore function; a new kind
of fd is one module in upmig/fds/, its record deriving from Fd here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass
class Header:
    """The image's first record: the machine and upmig that wrote it."""

    kind: ClassVar[str] = "header"
    arch: str
    kernel: str
    upmig_version: str
    created: float
    hostname: str
    page_size: int
    pid: int


@dataclass
class Process:
    """Opens one process's records: all that follow, up to the next Process, are its
    own. The root comes first; a parent always comes before its children."""

    kind: ClassVar[str] = "process"
    pid: int
    ppid: int                # its parent; for the root, the parent outside the tree
    pgid: int                # its process group and session, as ids on the source
    sid: int
    zombie: bool = False     # exited, not yet reaped: only this record, no others
    exit_status: int = 0     # a zombie's wait status, as waitpid(2) gives it
    comm: str = ""
    tty: int = 0             # its controlling terminal (tty_nr), or 0
    foreground: bool = False  # its group was its terminal's foreground group


@dataclass
class Task:
    """Per-process kernel state other than memory, signals and files."""

    kind: ClassVar[str] = "task"
    pid: int
    comm: str
    cmdline: list[str]
    exe: str
    cwd: str
    root: str
    umask: int
    personality: int
    uids: list[int]          # real, effective, saved, fs
    gids: list[int]
    groups: list[int]
    rlimits: dict[str, list[int]]   # name -> [soft, hard]; -1 is unlimited
    session_leader: bool
    group_leader: bool
    dumpable: int = 1
    caps: dict[str, int] | None = None  # CapInh/CapPrm/CapEff/CapBnd/CapAmb
    no_new_privs: int = 0
    subreaper: int = 0       # PR_SET_CHILD_SUBREAPER: orphans below it are reparented to it
    seccomp: int = 0         # seccomp mode: 0 off, 1 strict, 2 filter (dump refuses 1, 2)


@dataclass
class MM:
    """The mm fields PR_SET_MM_MAP restores, and the auxv."""

    kind: ClassVar[str] = "mm"
    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    auxv: bytes


@dataclass
class Vma:
    """One memory mapping of the process, as /proc/PID/maps and smaps show it."""

    kind: ClassVar[str] = "vma"
    start: int
    end: int
    perms: str               # as in /proc/PID/maps: "rw-p"
    offset: int
    path: str                # backing file, [heap]/[stack]/[vdso]..., or ""
    role: str                # anon | file | ghost | sysv | heap | stack | vdso | vvar...
    vmflags: list[str]       # two-letter VmFlags from smaps
    data_bytes: int = 0      # bytes of page contents stored in the image
    ghost: int = 0           # role "ghost": the Ghost it maps; role "sysv": the shmid
    cow_bytes: int = 0       # bytes of pages the same as the parent's (CowPages)


@dataclass
class MappedFile:
    """The identity of a mapped file, checked on the target before anything is mapped."""

    kind: ClassVar[str] = "mapped_file"
    path: str
    size: int
    mtime: float
    build_id: str            # hex ELF build-id, or ""
    content_hash: str        # hex xxh64 of the contents when there is no build-id


@dataclass
class Pages:
    """Runs of page contents; their bytes follow as data frames, in this order."""

    kind: ClassVar[str] = "pages"
    runs: list[int]          # flat [start0, end0, start1, end1, ...]
    nbytes: int
    target: str = ""         # "": process memory; "ghost:ID": offsets in that Ghost file


@dataclass
class CowPages:
    """Runs of private pages that were one physical page with the parent's at the same
    addresses (copy-on-write since fork): their bytes are the parent's, not stored
    again. The parent's section comes first; resume copies them from it."""

    kind: ClassVar[str] = "cow_pages"
    source: int              # the parent's PID (as in its Process record)
    runs: list[int]          # flat [start0, end0, start1, end1, ...]


@dataclass
class SysvShm:
    """A SysV shared memory segment the tree attaches (or made and holds by id); its
    bytes follow in pages records whose target is "sysv:ID". Written before the
    first process's section: it belongs to the tree, not to one process."""

    kind: ClassVar[str] = "sysv_shm"
    id: int                  # shmid, kept on resume (programs hold it)
    key: int                 # 0: IPC_PRIVATE (or removed)
    size: int
    mode: int                # permissions, with SHM_DEST (0o1000) if it was removed
    uid: int
    gid: int
    ctime: int = 0           # with boot: the same one still there (same machine, boot)?
    boot: str = ""           # /proc/sys/kernel/random/boot_id at dump


@dataclass
class SysvSem:
    """A SysV semaphore set a process of the tree was the last to operate on."""

    kind: ClassVar[str] = "sysv_sem"
    id: int
    key: int
    mode: int
    uid: int
    gid: int
    values: list[int]
    ctime: int = 0
    boot: str = ""
    last_pid: int = 0        # the process of the tree that operated on it last


@dataclass(kw_only=True)
class Fd:
    """What every fd has. Each kind of fd has a record of its own deriving from this
    one, with typed fields of its own: see upmig/fds/ (a kind per module) and
    upmig.fds.registry. This one is never in an image itself."""

    kind: ClassVar[str] = "fd"
    fd: int
    flags: int               # open(2) status flags from fdinfo, without O_CLOEXEC
    cloexec: bool
    pos: int
    shared_with: int = -1    # lowest fd sharing this open file description, or -1
    desc: int = 0            # its open file description, the same id in every process
                             # of the tree that holds it (see upmig.sharing); 0: inherit
    note: str = ""           # for inspect: what /proc called it, if not a path
    async_owner: list[int] | None = None  # O_ASYNC: [owner type, pid, signal] (fds.owner)


@dataclass
class FileIdentity:
    """What a file the process holds by path was at dump (an fd's regular file,
    directory, FIFO or device; its working directory), read while it was frozen:
    resume refuses a file that is not this one any more (see upmig.fileid.Held)."""

    kind: ClassVar[str] = "file_identity"
    fd: int                  # the fd holding it (the first of its description), or -1: the cwd
    mode: int                # st_mode: its type and permissions
    size: int
    mtime_ns: int
    dev: int                 # st_dev and st_ino: compared only on the same boot (boot)
    ino: int
    rdev: int = 0            # a device's number
    boot: str = ""           # /proc/sys/kernel/random/boot_id at dump


@dataclass
class Ghost:
    """A file whose bytes travel in the image, in pages records whose target is
    "ghost:ID" (written once per tree, by the first process holding it): a regular
    file deleted while held open, a memfd, shared anonymous memory, a POSIX shared
    memory object in /dev/shm."""

    kind: ClassVar[str] = "ghost"
    id: int                  # fileid.object_id on the source, the same in every holder
    path: str                # where it was, without " (deleted)"; a memfd's "/memfd:NAME"
    size: int
    mode: int
    type: str = "file"       # file (deleted) | memfd | shmem (MAP_SHARED anonymous) | posix
    seals: int = 0           # a memfd's F_GET_SEALS
    uid: int = 0             # owner (a POSIX shm object is made again with it)
    gid: int = 0


@dataclass
class Pipe:
    """A pipe with both ends inside the tree, and the bytes buffered in it; in the
    records of the first process holding either end."""

    kind: ClassVar[str] = "pipe"
    id: int                  # its inode number on the source
    size: int                # capacity (F_GETPIPE_SZ)
    data: bytes
    ends: dict = field(default_factory=dict)  # "r"/"w" -> the end's description id


@dataclass
class Signals:
    """Signal state shared by every thread; each thread's own is in its Thread."""

    kind: ClassVar[str] = "signals"
    actions: list[list[int]]     # [signo, handler, flags, restorer, mask]
    pending_shared: list[bytes]  # raw siginfo_t, 128 bytes each
    itimers: list[list[int]]     # [which, interval_sec, interval_usec, value_sec, value_usec]


@dataclass
class Thread:
    """One thread's own state. The image holds the leader's first, then the others by TID."""

    kind: ClassVar[str] = "thread"
    tid: int
    regs: bytes              # struct user_regs_struct as the kernel gave it
    xsave: bytes             # NT_X86_XSTATE
    syscall: int = -1        # the syscall it was stopped in or returning from, or -1
    syscall_result: int = 0  # rax at the stop (-ERESTART* while in a syscall)
    rseq: list[int] | None = None        # [area, size, signature] if registered
    robust_list: list[int] | None = None  # [head, len] if set
    comm: str = ""
    blocked: int = 0                     # its signal mask
    pending: list[bytes] = field(default_factory=list)  # its private queue, raw siginfo_t
    altstack: list[int] = field(default_factory=lambda: [0, 2, 0])  # [sp, flags, size]
    clear_child_tid: int = 0
    cpus: list[int] | None = None        # CPU affinity; None means every CPU


@dataclass
class Trailer:
    """The image's last record: how many came before it and their page bytes."""

    kind: ClassVar[str] = "trailer"
    records: int
    data_bytes: int


RECORD_TYPES: dict[str, type] = {  # and each fd kind's: see record_types()
    cls.kind: cls for cls in (Header, Process, Task, MM, Vma, MappedFile, Pages, CowPages,
                              FileIdentity, Pipe, Ghost, SysvShm, SysvSem, Signals, Thread, Trailer)
}


def to_wire(rec: Any) -> list:
    """[kind, {field: value}] for msgpack."""
    return [rec.kind, {f.name: getattr(rec, f.name) for f in fields(rec)}]


_ALL: dict[str, type] = {}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def record_types() -> dict[str, type]:
    """Every kind of record an image may hold: RECORD_TYPES and the fd kinds' records
    (upmig.fds.registry: they derive from Fd here, so they are looked up once this
    module is loaded, not while it is)."""
    if not _ALL:
        from upmig.fds.registry import RECORDS
        _FIELD_NAMES.update({cls: tuple(f.name for f in fields(cls))
                             for cls in (*RECORD_TYPES.values(), *RECORDS.values())})
        _ALL.update(RECORD_TYPES | RECORDS)
    return _ALL


def from_wire(kind: str, body: dict) -> Any:
    """Rebuild a record; unknown fields (from a newer minor version) are ignored,
    missing ones raise KeyError/TypeError for the caller to report."""
    cls = (_ALL or record_types())[kind]
    return cls(**{name: body[name] for name in _FIELD_NAMES[cls] if name in body})


__all__ = ["Header", "Process", "Task", "MM", "Vma", "MappedFile", "Pages", "CowPages", "Fd",
           "FileIdentity", "Pipe", "Ghost", "SysvShm", "SysvSem",
           "Signals", "Thread", "Trailer", "RECORD_TYPES", "record_types", "to_wire",
           "from_wire"]
