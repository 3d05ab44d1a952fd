"""What every field of every record may hold: a small schema per record kind.

A check takes a value and returns None if it is fine, else a phrase saying what is
wrong with it, for upmig.validate to put after the field's name:

    start 0x0 is below vm.mmap_min_addr (0x10000)
    uids[1] 4294967295 is not a uid or gid (0..4294967294)
    extra lacks 'watches'

FIELDS gives each record kind's fields their checks (types, ranges, shapes), RULES
what involves several fields of one record. An fd record's are FD_FIELDS and
fd_rule (what every fd has) with its kind's own (the record's checks and its
handler's rule: upmig/fds/). What involves several records (cross-references) is
upmig.validate's."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any

from upmig import _proc, kconst, memmap, regs
from upmig._native import PAGE
from upmig.kconst import NSIG, SS_DISABLE
from upmig.records import Fd, Ghost, Pipe, Signals, Thread, Vma

Check = Callable[[Any], "str | None"]


def _sysctl(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


# ---- limits: of the kernel, of this machine, and of what resume can do sanely

MMAP_MIN_ADDR = _sysctl("vm/mmap_min_addr", 65536)  # nothing may be mapped below
USER_TOP = 0x7FFFFFFFF000      # the end of x86-64 user space (TASK_SIZE_MAX)
PID_MAX = 1 << 22              # PID_MAX_LIMIT: no pid or tid is larger
ID_MAX = (1 << 32) - 2         # uid/gid: (uid_t)-1 means "leave unchanged" to setresuid
FD_MAX = (1 << 20) - 1         # NR_OPEN: no fd number reaches it
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
S64 = 1 << 63
PATH_MAX = 4096
XSAVE_MIN = 512 + 64           # the legacy area and the XSAVE header
XSAVE_MAX = 1 << 16            # what PTRACE_GETREGSET is asked for (AMX needs ~11 KiB)
MAX_GROUPS = 16 * 4096 // 4    # written into the 16-page scratch area (inject.SCRATCH)
MAX_SEMS = 32000               # SEMMSL
SEM_MAX = 32767                # SEMVMX
ANON_NAME_MAX = 80             # ANON_VMA_NAME_MAX_LEN
MEMFD_NAME_MAX = 249           # MFD_NAME_MAX_LEN
SS_AUTODISARM = kconst.SS_AUTODISARM - (1 << 32)  # as the int32 the altstack's flags are in
ROLES = ("anon", "file", "ghost", "sysv", "heap", "stack", *memmap.VDSO_ROLES)
GHOST_TYPES = ("file", "memfd", "shmem", "posix")
REGS_SIZE = regs.Regs.SIZE     # sizeof(struct user_regs_struct)


# ---- the checks

def shown(v: Any) -> str:
    """A value for a message: its repr, cut short."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _a(v: Any) -> str:
    """A value's type, and the value, for a message."""
    name = type(v).__name__
    return "None" if v is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({shown(v)})"


def wrong_type(v: Any, want: str) -> str:
    return f"is {_a(v)}, not {want}"


def integer(lo: int, hi: int, what: str = "", hexa: bool = False) -> Check:
    show = hex if hexa else str
    span = f"{what} ({show(lo)}..{show(hi)})" if what else f"in {show(lo)}..{show(hi)}"

    def check(v):
        if type(v) is not int:
            return wrong_type(v, what or "an integer")
        if lo <= v <= hi:
            return None
        return f"{show(v)} is not {span}"
    return check


def number(lo: float, hi: float, what: str) -> Check:
    def check(v):
        if type(v) not in (int, float):
            return wrong_type(v, "a number")
        if lo <= v <= hi:  # false for NaN too
            return None
        return f"{v!r} is not {what}"
    return check


def boolean(v):
    return None if type(v) is bool else wrong_type(v, "true or false")


def one_of(*options: Any) -> Check:
    types = {type(o) for o in options}

    def check(v):
        if type(v) in types and v in options:
            return None
        return f"{shown(v)} is not one of {list(options)}"
    return check


def text(max_len: int = 255) -> Check:
    def check(v):
        if type(v) is not str:
            return wrong_type(v, "a string")
        if len(v) > max_len:
            return f"is {len(v)} characters long, more than {max_len}"
        if "\0" in v:
            return f"{shown(v)} holds a NUL"
        return None
    return check


def path(v):
    """An absolute path (what a process holds is named from /)."""
    why = _path_text(v)
    if why is None and not v.startswith("/"):
        return f"{shown(v)} is not an absolute path"
    return why


_path_text = text(PATH_MAX)


def blob(lo: int, hi: int) -> Check:
    def check(v):
        if type(v) is not bytes:
            return wrong_type(v, "bytes")
        if lo <= len(v) <= hi:
            return None
        size = f"{lo}" if lo == hi else f"{lo}..{hi}"
        return f"is {len(v)} bytes long, not {size}"
    return check


def _at(i: Any, why: str) -> str:
    return f"[{i}]{why}" if why[0] in "[." else f"[{i}] {why}"


def list_of(item: Check, max_len: int, min_len: int = 0) -> Check:
    def check(v):
        if type(v) is not list:
            return wrong_type(v, "a list")
        if not min_len <= len(v) <= max_len:
            return f"has {len(v)} items, not {min_len}..{max_len}"
        for i, x in enumerate(v):
            why = item(x)
            if why:
                return _at(i, why)
        return None
    return check


def row(*items: Check) -> Check:
    """A list of a fixed shape: [sp, flags, size], say."""
    def check(v):
        if type(v) is not list:
            return wrong_type(v, f"a list of {len(items)}")
        if len(v) != len(items):
            return f"has {len(v)} items, not {len(items)}"
        for i, (x, item) in enumerate(zip(v, items, strict=True)):
            why = item(x)
            if why:
                return _at(i, why)
        return None
    return check


def all_of(*checks: Check) -> Check:
    """Each of checks, in order: what the first finds wrong, or None."""
    def check(v):
        for c in checks:
            why = c(v)
            if why:
                return why
        return None
    return check


def optional(inner: Check) -> Check:
    return lambda v: None if v is None else inner(v)


def dict_of(key: Check, value: Check, max_len: int) -> Check:
    def check(v):
        if type(v) is not dict:
            return wrong_type(v, "a map")
        if len(v) > max_len:
            return f"has {len(v)} entries, more than {max_len}"
        for k, x in v.items():
            why = key(k)
            if why:
                return f"key {why}"
            why = value(x)
            if why:
                return _at(repr(k), why)
        return None
    return check


def struct_of(required: dict[str, Check], optional_keys: dict[str, Check] | None = None
              ) -> Check:
    """A map with these keys (others are ignored, as unknown record fields are)."""
    also = optional_keys or {}

    def check(v):
        if type(v) is not dict:
            return wrong_type(v, "a map")
        for k in required:
            if k not in v:
                return f"lacks {k!r}"
        for k, item in (*required.items(), *also.items()):
            if k in v:
                why = item(v[k])
                if why:
                    return f".{k}{why}" if why[0] in "[." else f".{k} {why}"
        return None
    return check


def mapped_at(v):
    """Where a mapping begins or ends: in user space, page-aligned."""
    if type(v) is not int:
        return wrong_type(v, "an address")
    if v < MMAP_MIN_ADDR:
        return f"{v:#x} is below vm.mmap_min_addr ({MMAP_MIN_ADDR:#x})"
    if v > USER_TOP:
        return f"{v:#x} is above the end of user space ({USER_TOP:#x})"
    if v % PAGE:
        return f"{v:#x} is not page-aligned"
    return None


def hex_text(max_len: int) -> Check:
    def check(v):
        if type(v) is not str:
            return wrong_type(v, "a hex string")
        if len(v) > max_len or not re.fullmatch(r"[0-9a-f]*", v):
            return f"{shown(v)} is not hex of at most {max_len} digits"
        return None
    return check


ADDRESS = integer(0, USER_TOP, "a user-space address", hexa=True)
PID = integer(1, PID_MAX, "a pid")
PID_OR_0 = integer(0, PID_MAX, "a pid or 0")
ID = integer(0, ID_MAX, "a uid or gid")
FD = integer(0, FD_MAX, "an fd number")
SIGNO = integer(1, NSIG, "a signal number")
UINT32 = integer(0, U32)
UINT64 = integer(0, U64)
INT32 = integer(-(1 << 31), (1 << 31) - 1)
INT64 = integer(-S64, S64 - 1)
SIZE = integer(0, S64 - 1, "a size")
OFFSET = integer(0, S64 - 1, "a file offset")
OBJECT = integer(0, U64, "an object id")
DESC = integer(0, S64 - 1, "a description id")
MODE = integer(0, 0o177777, "a file mode")
IPC_ID = integer(0, (1 << 31) - 1, "an IPC id")
NAME = text(64)
SIGINFO = blob(128, 128)
TIME = number(0, 1 << 34, "a time since 1970")
SECONDS = integer(0, S64 - 1, "a count of seconds")
ITIMER = row(integer(0, 2, "an itimer"), SECONDS, integer(0, 999999, "microseconds"),
             SECONDS, integer(0, 999999, "microseconds"))
RLIMIT = integer(-1, S64 - 1, "a limit (-1: unlimited)")
BACKLOG = integer(0, (1 << 31) - 1, "a backlog")
ASYNC = row(integer(0, 2, "an owner type"), PID_OR_0, integer(0, NSIG, "a signal number"))


PERMS = frozenset(f"{r}{w}{x}{p}" for r in "r-" for w in "w-" for x in "x-" for p in "ps")
_FLAGS = re.compile(r"(?:[a-z0-9]{2})*")


def _perms(v):
    if type(v) is str and v in PERMS:
        return None
    return f"{shown(v)} is not permissions like 'rw-p'"


_FLAG_LISTS: set[tuple[str, ...]] = set()  # lists seen good: VMAs share a few


def _vmflags(v):
    """Two-letter VmFlags from smaps."""
    if type(v) is not list:
        return wrong_type(v, "a list")
    if len(v) > 64:
        return f"has {len(v)} items, more than 64"
    try:
        if tuple(v) in _FLAG_LISTS:  # (only lists of strings get in)
            return None
    except TypeError:
        pass  # an unhashable item
    if all(type(x) is str and len(x) == 2 for x in v) and _FLAGS.fullmatch("".join(v)):
        if len(_FLAG_LISTS) < 1024:
            _FLAG_LISTS.add(tuple(v))
        return None
    return f"{shown(v)} are not two-letter VmFlags"


def _target(v):
    if type(v) is not str:
        return wrong_type(v, "a pages target")
    return None if pages_target(v) is not None else \
        f"{shown(v)} is not '', 'ghost:ID' or 'sysv:ID'"


def pages_target(v: str) -> tuple[str, int] | None:
    """("", 0), ("ghost", id) or ("sysv", id); None if malformed."""
    if v == "":
        return "", 0
    m = re.fullmatch(r"(ghost|sysv):(0|[1-9][0-9]{0,19})", v)
    if not m or int(m[2]) > U64:
        return None
    return m[1], int(m[2])


def _seccomp(v):
    if v == 0 and type(v) is int:
        return None
    return f"{shown(v)} is not 0: a seccomp filter is not restored (dump refuses one)"


ROLE = one_of(*ROLES)

FIELDS: dict[str, dict[str, Check]] = {
    "header": {"arch": text(64), "kernel": text(), "upmig_version": text(64),
               "created": TIME, "hostname": text(), "page_size": one_of(4096, 16384, 65536),
               "pid": PID},
    "process": {"pid": PID, "ppid": PID_OR_0, "pgid": PID_OR_0, "sid": PID_OR_0,
                "zombie": boolean, "exit_status": integer(0, 0xFFFF, "a wait status"),
                "comm": NAME, "tty": UINT32, "foreground": boolean},
    "task": {"pid": PID, "comm": NAME, "cmdline": list_of(text(1 << 21), 1 << 17),
             "exe": path, "cwd": path, "root": one_of("/"), "umask": integer(0, 0o777, "a umask"),
             "personality": UINT32, "uids": row(ID, ID, ID, ID), "gids": row(ID, ID, ID, ID),
             "groups": list_of(ID, MAX_GROUPS),
             "rlimits": dict_of(one_of(*_proc.LIMIT_NAMES), row(RLIMIT, RLIMIT),
                                len(_proc.LIMIT_NAMES)),
             "session_leader": boolean, "group_leader": boolean, "dumpable": integer(0, 2),
             "caps": optional(struct_of({name: UINT64 for name in
                                         ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")})),
             "no_new_privs": integer(0, 1), "subreaper": integer(0, 1),
             "seccomp": _seccomp},
    "mm": {**{name: ADDRESS for name in ("start_code", "end_code", "start_data", "end_data",
                                         "start_brk", "brk", "start_stack", "arg_start",
                                         "arg_end", "env_start", "env_end")},
           "auxv": blob(0, 4096)},
    "vma": {"start": mapped_at, "end": mapped_at, "perms": _perms, "offset": OFFSET,
            "path": text(PATH_MAX), "role": ROLE, "vmflags": _vmflags,
            "data_bytes": SIZE, "ghost": OBJECT, "cow_bytes": SIZE},
    "mapped_file": {"path": path, "size": SIZE, "mtime": number(-(1 << 40), 1 << 40, "a time"),
                    "build_id": hex_text(128), "content_hash": hex_text(16)},
    # Runs are checked where they are paired (upmig.image, upmig.validate): one call
    # per run here would cost more than everything else.
    "pages": {"runs": list_of(lambda v: None, 2 << 16), "nbytes": SIZE, "target": _target},
    "cow_pages": {"source": PID, "runs": list_of(lambda v: None, 2 << 16)},
    "file_identity": {"fd": integer(-1, FD_MAX, "an fd or -1 (the cwd)"), "mode": MODE,
                      "size": SIZE, "mtime_ns": INT64, "dev": UINT64, "ino": UINT64,
                      "rdev": UINT64, "boot": text(64)},
    "sysv_shm": {"id": IPC_ID, "key": INT32, "size": integer(1, S64 - 1, "a segment size"),
                 "mode": MODE, "uid": ID, "gid": ID, "ctime": INT64, "boot": text(64)},
    "sysv_sem": {"id": IPC_ID, "key": INT32, "mode": MODE, "uid": ID, "gid": ID,
                 "values": list_of(integer(0, SEM_MAX, "a semaphore value"), MAX_SEMS, 1),
                 "ctime": INT64, "boot": text(64), "last_pid": PID_OR_0},
    "ghost": {"id": OBJECT, "path": text(PATH_MAX), "size": SIZE, "mode": MODE,
              "type": one_of(*GHOST_TYPES), "seals": integer(0, 0x3F, "memfd seals"),
              "uid": ID, "gid": ID},
    "pipe": {"id": OBJECT, "size": integer(PAGE, 1 << 31, "a pipe size"),
             "data": blob(0, 1 << 31), "ends": dict_of(one_of("r", "w"), DESC, 2)},
    "signals": {"actions": list_of(row(SIGNO, UINT64, UINT64, UINT64, UINT64), NSIG),
                "pending_shared": list_of(SIGINFO, 1 << 16), "itimers": list_of(ITIMER, 3)},
    "thread": {"tid": PID, "regs": blob(REGS_SIZE, REGS_SIZE),
               "xsave": blob(XSAVE_MIN, XSAVE_MAX),
               "syscall": integer(-1, (1 << 31) - 1, "a syscall number or -1"),
               "syscall_result": INT64, "rseq": optional(row(ADDRESS, UINT32, UINT32)),
               "robust_list": optional(row(ADDRESS, SIZE)), "comm": NAME, "blocked": UINT64,
               "pending": list_of(SIGINFO, 1 << 16),
               "altstack": row(UINT64, integer(-(1 << 31), (1 << 31) - 1), UINT64),
               "clear_child_tid": ADDRESS,
               "cpus": optional(list_of(integer(0, 8191, "a CPU number"), 8192))},
}

# ---- rules over several fields of one record: (field, why) or None

def _vma_rule(v: Vma):
    size = v.end - v.start
    if size <= 0:
        return "end", f"{v.end:#x} is not above start {v.start:#x}"
    if v.offset % PAGE:
        return "offset", f"{v.offset:#x} is not page-aligned"
    if v.data_bytes > size or v.cow_bytes > size:
        name = "data_bytes" if v.data_bytes > size else "cow_bytes"
        return name, f"{getattr(v, name)} is more than the vma's {size} bytes"
    shared = v.perms[3] == "s"
    if (v.data_bytes or v.cow_bytes) and (shared or v.role in memmap.VDSO_ROLES):
        return "data_bytes", f"is not 0 in a {'shared' if shared else v.role} mapping, " \
            "whose contents are not stored with the process"
    return _role_rule(v, shared)


ROLE_SET = frozenset(ROLES)
# (perms, role) a VMA may have, and those whose pages the image may store (private,
# not the vdso's): _role_rule's and _vma_rule's verdicts, as sets for vma_fine.
_PERMS_ROLES = frozenset((p, r) for p in PERMS for r in ROLES
                         if not (r == "anon" and p[3] == "s") and not (r == "sysv" and p[3] == "p"))
_STORED = frozenset((p, r) for p, r in _PERMS_ROLES
                    if p[3] == "p" and r not in memmap.VDSO_ROLES)
_PAGE_MASK = PAGE - 1


def vma_fine(v: Vma) -> bool:
    """What FIELDS["vma"] and _vma_rule accept, at once: an image may hold a hundred
    thousand VMAs, and this is several times faster. False means "look closer" (the
    field-by-field checks then say what is wrong); it never accepts more than they
    do (tests/test_validate.py holds them to it)."""
    s, e, off, d, c = v.start, v.end, v.offset, v.data_bytes, v.cow_bytes
    if type(s) is not int or type(e) is not int or type(off) is not int \
            or type(d) is not int or type(c) is not int or type(v.ghost) is not int:
        return False
    if not (MMAP_MIN_ADDR <= s < e <= USER_TOP and 0 <= off < S64 and 0 <= v.ghost <= U64
            and 0 <= d <= e - s and 0 <= c <= e - s) or (s | e | off) & _PAGE_MASK:
        return False
    perms, role, name, flags = v.perms, v.role, v.path, v.vmflags
    if type(perms) is not str or type(role) is not str or (perms, role) not in _PERMS_ROLES \
            or ((d or c) and (perms, role) not in _STORED) or type(name) is not str:
        return False
    if name and (len(name) > PATH_MAX or "\0" in name or _role_rule(v, perms[3] == "s")):
        return False
    if not name and role == "file":
        return False
    try:
        return type(flags) is list and tuple(flags) in _FLAG_LISTS or _vmflags(flags) is None
    except TypeError:
        return False


def _role_rule(v: Vma, shared: bool):
    if v.role == "file":
        return path(v.path) and ("path", path(v.path))
    if v.role == "anon":
        if shared:  # shared anonymous memory is a ghost
            return "perms", f"{v.perms!r}: an anonymous mapping is private"
        named = v.path.startswith("[anon:") and v.path.endswith("]") and \
            len(v.path) <= ANON_NAME_MAX + 7
        return None if not v.path or named else \
            ("path", f"{shown(v.path)} is not '' or '[anon:NAME]'")
    if v.role == "sysv" and not shared:
        return "perms", f"{v.perms!r}: a SysV segment is mapped shared"
    if v.role in ("heap", "stack", *memmap.VDSO_ROLES) and v.path:
        return "path", f"{shown(v.path)} is not '' (a {v.role} has no file)"
    return None


def _mm_rule(m):
    for lo, hi in (("start_code", "end_code"), ("start_data", "end_data"), ("start_brk", "brk"),
                   ("arg_start", "arg_end"), ("env_start", "env_end")):
        if getattr(m, lo) > getattr(m, hi):
            return hi, f"{getattr(m, hi):#x} is below {lo} {getattr(m, lo):#x}"
    if len(m.auxv) % 16:
        return "auxv", f"is {len(m.auxv)} bytes long, not pairs of 8-byte words"
    return None


def _task_rule(t):
    for name, (soft, hard) in t.rlimits.items():
        if hard >= 0 and not 0 <= soft <= hard:
            return "rlimits", f"{name!r}: soft limit {soft} is above the hard limit {hard}"
    return None


DEADLY = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25, 26, 27, 29, 30, 31,
          *range(34, NSIG + 1)}  # signals whose default action ends a process


def _process_rule(p):
    status = p.exit_status
    sig = status & 0x7F
    if sig == 0 or (status >> 8 == 0 and sig in DEADLY):
        return None  # an exit(N), or a death by a signal that kills
    return "exit_status", f"{status:#x} is not a wait status of an exit or a deadly signal"


def fd_rule(f: Fd):
    """What every fd record must have right (its kind's handler checks the rest)."""
    if f.shared_with >= f.fd:
        return "shared_with", f"{f.shared_with} is not a lower fd than {f.fd}"
    return None


def _ghost_rule(g: Ghost):
    if g.type == "posix":
        name = g.path.removeprefix("/dev/shm/")
        plain = g.path.startswith("/dev/shm/") and name not in ("", ".", "..") and \
            "/" not in name and len(name) <= 255
        return None if plain else \
            ("path", f"{shown(g.path)} is not /dev/shm/NAME with a plain NAME")
    if g.type == "memfd":
        name = g.path.removeprefix("/memfd:")
        ok = g.path.startswith("/memfd:") and len(name.encode()) <= MEMFD_NAME_MAX
        return None if ok else ("path", f"{shown(g.path)} is not /memfd:NAME")
    if g.type == "shmem":
        if g.path:
            return "path", f"{shown(g.path)}: shared anonymous memory has no path"
        return None if g.size else ("size", "is 0: shared anonymous memory has a size")
    return path(g.path) and ("path", path(g.path))


def _pipe_rule(p: Pipe):
    if len(p.data) > p.size:
        return "data", f"holds {len(p.data)} bytes, more than the pipe's size {p.size}"
    return None


def signo_of(info: bytes) -> int:
    return struct.unpack_from("<i", info)[0]


def _siginfos(infos: list[bytes]) -> str | None:
    for i, info in enumerate(infos):
        if not 1 <= signo_of(info) <= NSIG:
            return f"[{i}] is a siginfo of signal {signo_of(info)}"
    return None


def _signals_rule(s: Signals):
    signos = [a[0] for a in s.actions]
    if len(set(signos)) != len(signos):
        return "actions", "name a signal twice"
    which = [t[0] for t in s.itimers]
    if len(set(which)) != len(which):
        return "itimers", "name an itimer twice"
    why = _siginfos(s.pending_shared)
    return ("pending_shared", why) if why else None


def _thread_rule(t: Thread):
    flags = t.altstack[1]
    if flags & ~(SS_DISABLE | SS_AUTODISARM):
        return "altstack", f"[1] {flags:#x} is not a sigaltstack flag"
    why = _siginfos(t.pending)
    return ("pending", why) if why else None


def _mapped_file_rule(m):
    if bool(m.build_id) == bool(m.content_hash):
        return "build_id", "and content_hash: one of them, not both, identifies the file"
    return None


# Every fd record's fields; each kind adds its own (its record's checks).
FD_FIELDS: dict[str, Check] = {
    "fd": FD, "flags": UINT32, "cloexec": boolean, "pos": OFFSET,
    "shared_with": integer(-1, FD_MAX, "an fd or -1"), "desc": DESC, "note": text(PATH_MAX),
    "async_owner": optional(ASYNC)}

FAST = {"vma": vma_fine}  # kinds an image holds by the hundred thousand

RULES: dict[str, Callable[[Any], tuple[str, str] | None]] = {
    "vma": _vma_rule, "mm": _mm_rule, "task": _task_rule, "process": _process_rule,
    "ghost": _ghost_rule, "pipe": _pipe_rule, "signals": _signals_rule,
    "thread": _thread_rule, "mapped_file": _mapped_file_rule,
}


def rip(t: Thread) -> int:
    return regs.Regs(t.regs).rip
