"""Pure parsers of /proc text. Each takes the text (testable without a process);
read_* helpers fetch it and turn a vanished process into NoSuchProcess."""

from __future__ import annotations

import os
from dataclasses import dataclass

from upmig.errors import AccessDenied, NoSuchProcess


def read_text(pid: int, name: str) -> str:
    return read_bytes(pid, name).decode("utf-8", "surrogateescape")


def read_bytes(pid: int, name: str) -> bytes:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NoSuchProcess("no such process", pid=pid) from None
    except PermissionError:
        raise AccessDenied(f"cannot read {path}", pid=pid) from None
    except ProcessLookupError:
        raise NoSuchProcess("process exited", pid=pid) from None


def readlink(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"/proc/{pid}/{name} vanished", pid=pid) from None
    except PermissionError:
        raise AccessDenied(f"cannot read /proc/{pid}/{name}", pid=pid) from None


def boot_id() -> str:
    """This boot of this machine, a random id: inode numbers and IPC ids seen at dump
    still mean the same objects only if it is the same."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@dataclass
class MapsLine:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str


def lines(text: str) -> list[str]:
    """Lines as the kernel ends them: only at "\n" (paths may hold \r, \f, U+2028...)."""
    return [line for line in text.split("\n") if line]


def parse_maps(text: str) -> list[MapsLine]:
    out = []
    for line in lines(text):
        parts = line.split(None, 5)
        start, end = parts[0].split("-")
        out.append(MapsLine(int(start, 16), int(end, 16), parts[1], int(parts[2], 16),
                            parts[3], int(parts[4]), parts[5] if len(parts) > 5 else ""))
    return out


def parse_smaps_vmflags(text: str) -> dict[int, list[str]]:
    """VMA start -> its VmFlags list."""
    flags: dict[int, list[str]] = {}
    start = None
    for line in lines(text):
        if line.startswith("VmFlags:"):
            if start is not None:
                flags[start] = line.split()[1:]
        elif line and line[0] in "0123456789abcdef" and "-" in line.split(None, 1)[0]:
            start = int(line.split("-", 1)[0], 16)
    return flags


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat upmig reads (proc(5)'s numbers after each)."""

    pid: int            # 1
    comm: str           # 2, whole: it may hold spaces and parentheses
    state: str          # 3: R, S, D, T, t, Z, X...
    ppid: int           # 4
    pgrp: int           # 5
    session: int        # 6
    tty_nr: int         # 7: its controlling terminal, 0 if none
    tpgid: int          # 8: the terminal's foreground process group
    num_threads: int    # 20
    start_time: int     # 22: clock ticks after boot
    start_code: int     # 26
    end_code: int       # 27
    start_stack: int    # 28
    processor: int      # 39: the CPU it last ran on
    start_data: int     # 45
    end_data: int       # 46
    start_brk: int      # 47
    arg_start: int      # 48
    arg_end: int        # 49
    env_start: int      # 50
    env_end: int        # 51
    exit_code: int      # 52: as waitpid reports it, for a zombie


def parse_stat(text: str) -> Stat:
    """/proc/PID/stat's text. comm is whatever lies between the first "(" and the
    last ")": a name may hold both, and no field after it holds either."""
    lp, rp = text.index("("), text.rindex(")")
    rest = text[rp + 2:].split()

    def field(n: int) -> int:  # proc(5)'s field n; rest starts at field 3
        return int(rest[n - 3])

    return Stat(pid=int(text[:lp]), comm=text[lp + 1:rp], state=rest[0], ppid=field(4),
                pgrp=field(5), session=field(6), tty_nr=field(7), tpgid=field(8),
                num_threads=field(20), start_time=field(22), start_code=field(26),
                end_code=field(27), start_stack=field(28), processor=field(39),
                start_data=field(45), end_data=field(46), start_brk=field(47),
                arg_start=field(48), arg_end=field(49), env_start=field(50),
                env_end=field(51), exit_code=field(52))


def stat(pid: int, tid: int = 0) -> Stat:
    """/proc/PID/stat, or a thread's own (task/TID/stat); NoSuchProcess if gone."""
    return parse_stat(read_text(pid, f"task/{tid}/stat" if tid else "stat"))


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in lines(text):
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


LIMIT_NAMES = {  # /proc/PID/limits row -> RLIMIT_* number
    "Max cpu time": 0, "Max file size": 1, "Max data size": 2, "Max stack size": 3,
    "Max core file size": 4, "Max resident set": 5, "Max processes": 6,
    "Max open files": 7, "Max locked memory": 8, "Max address space": 9,
    "Max file locks": 10, "Max pending signals": 11, "Max msgqueue size": 12,
    "Max nice priority": 13, "Max realtime priority": 14, "Max realtime timeout": 15,
}


def parse_limits(text: str) -> dict[str, list[int]]:
    """name -> [soft, hard], -1 for unlimited."""
    out = {}
    for line in lines(text)[1:]:
        name = line[:26].strip()
        if name not in LIMIT_NAMES:
            continue
        soft, hard = line[26:].split()[:2]
        out[name] = [-1 if soft == "unlimited" else int(soft),
                     -1 if hard == "unlimited" else int(hard)]
    return out


def parse_fdinfo(text: str) -> dict[str, str]:
    out = {}
    for line in lines(text):
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def parse_auxv(data: bytes) -> list[tuple[int, int]]:
    words = memoryview(data).cast("Q")
    return [(words[i], words[i + 1]) for i in range(0, len(words) - 1, 2)]


def fd_numbers(pid: int) -> list[int]:
    """The fds a process has open now."""
    try:
        return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        raise NoSuchProcess("vanished while its fds were read", pid=pid) from None
