"""The fd table: one record per fd, by kind (regular file, directory, character
device, or an fd inherited from whoever runs `upmig resume`)."""

from __future__ import annotations

import os
import stat

from upmig import _native as nat
from upmig import _proc
from upmig.errors import CantMigrate, RestoreError
from upmig.inject import Session
from upmig.records import Fd
from upmig.syscalls import nr

O_CLOEXEC = 0o2000000
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC, O_PATH = 0o100, 0o200, 0o400, 0o1000, 0o10000000
AT_FDCWD = -100
F_SETFL = 4
# Devices with no state of their own: reopened by path on the target.
PLAIN_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
ANON_KINDS = {  # what anon_inode fds are, for the refusal
    "[eventfd]": "an eventfd", "[eventpoll]": "an epoll instance", "[timerfd]": "a timerfd",
    "[signalfd]": "a signalfd", "inotify": "an inotify instance", "[io_uring]": "io_uring",
    "[userfaultfd]": "a userfaultfd", "[pidfd]": "a pidfd", "[fanotify]": "fanotify",
}


def _kernel_fs_devices() -> set[int]:
    """Devices of /proc and /sys: their files describe this machine and this pid."""
    out = set()
    for path in ("/proc", "/sys"):
        try:
            out.add(os.stat(path).st_dev)
        except OSError:
            pass
    return out


def _is_tty(st: os.stat_result) -> bool:
    major = os.major(st.st_rdev)
    return stat.S_ISCHR(st.st_mode) and (major in (4, 5) or 136 <= major <= 143)


def _classify(pid: int, fd: int, target: str, st: os.stat_result | None) -> tuple[str, str]:
    """(type, note) of an fd, or raise CantMigrate saying why it cannot move."""
    stdio = fd <= 2
    if target.startswith(("pipe:", "socket:")) or (st is not None and _is_tty(st)):
        what = ("a pipe" if target.startswith("pipe:") else
                "a socket" if target.startswith("socket:") else f"the terminal {target}")
        if stdio:
            return "inherit", f"{what}, re-attached to upmig resume's own fd {fd}"
        hint = ("sockets are not supported yet" if target.startswith("socket:")
                else "only fds 0-2 can be re-attached to the resuming side")
        raise CantMigrate(f"holds {what} on fd {fd}; {hint}", pid=pid)
    if target.startswith("anon_inode:"):
        kind = target[len("anon_inode:"):]
        what = ANON_KINDS.get(kind, f"the kernel object {kind}")
        raise CantMigrate(f"holds {what} on fd {fd}, which is not supported yet", pid=pid)
    if target.endswith(" (deleted)"):
        raise CantMigrate(f"holds the deleted file {target[:-10]} on fd {fd}; deleted files "
                          "are not supported yet", pid=pid)
    if st is None or not target.startswith("/"):
        raise CantMigrate(f"holds {target} on fd {fd}, which upmig cannot move", pid=pid)
    if st.st_dev in _kernel_fs_devices():
        raise CantMigrate(f"holds the kernel file {target} on fd {fd}; /proc and /sys "
                          "files cannot be reopened elsewhere", pid=pid)
    if stat.S_ISREG(st.st_mode):
        return "file", ""
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    if stat.S_ISCHR(st.st_mode) and target in PLAIN_DEVICES:
        return "chardev", ""
    raise CantMigrate(f"holds the device or special file {target} on fd {fd}, which is not "
                      "supported yet", pid=pid)


def capture(pid: int) -> list[Fd]:
    try:
        fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        raise CantMigrate("vanished while its fds were read", pid=pid) from None
    out = []
    by_inode: dict[tuple[int, int], list[Fd]] = {}
    for fd in fds:
        target = _proc.readlink(pid, f"fd/{fd}")
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            st = None
        ftype, note = _classify(pid, fd, target, st)
        info = _proc.parse_fdinfo(_proc.read_text(pid, f"fdinfo/{fd}"))
        if "lock" in info:
            raise CantMigrate(f"holds a file lock (flock or POSIX) through fd {fd} on "
                              f"{target}; file locks are not supported yet", pid=pid)
        flags = int(info["flags"], 8)
        rec = Fd(fd=fd, type=ftype, path=target if ftype != "inherit" else "",
                 flags=flags & ~O_CLOEXEC, cloexec=bool(flags & O_CLOEXEC),
                 pos=int(info["pos"]), note=note)
        if ftype != "inherit" and st is not None:
            _link_shared(pid, rec, by_inode.setdefault((st.st_dev, st.st_ino), []))
        out.append(rec)
    return out


def _link_shared(pid: int, rec: Fd, same_inode: list[Fd]) -> None:
    """Fds sharing one open file description (dup, fork) must share it again."""
    for other in same_inode:
        if other.shared_with < 0 and nat.kcmp_file(pid, other.fd, rec.fd):
            rec.shared_with = other.fd
            break
    same_inode.append(rec)


def _open_flags(rec: Fd) -> int:
    return rec.flags & ~(O_CREAT | O_EXCL | O_TRUNC) | O_NOCTTY


def restore(s: Session, pid: int, recs: list[Fd]) -> None:
    """Open every fd at its number. Inherited fds are the stub's own 0-2 already."""
    wanted = {r.fd for r in recs}
    for r in recs:
        if r.type == "inherit":
            continue
        if r.shared_with >= 0:
            src = r.shared_with
        else:
            path = os.fsencode(r.path) + b"\0"
            s.write(s.scratch, path)
            src = s.raw(nr.openat, AT_FDCWD, s.scratch, _open_flags(r), 0)
            if src < 0:
                raise RestoreError(f"cannot reopen {r.path} for fd {r.fd}: "
                                   f"{os.strerror(-src)}")
        cloexec = O_CLOEXEC if r.cloexec else 0
        if src != r.fd:
            s.call(nr.dup3, src, r.fd, cloexec, what=f"dup3({src}, {r.fd})")
            if r.shared_with < 0:
                s.call(nr.close, src, what="close")
        elif cloexec:
            s.call(nr.fcntl, r.fd, 2, 1, what="fcntl(F_SETFD)")
        if r.shared_with < 0 and r.type != "chardev" and not r.flags & O_PATH:
            s.call(nr.lseek, r.fd, r.pos, 0, what=f"lseek(fd {r.fd})")
    for fd in range(3):  # stdio the process had closed
        if fd not in wanted:
            s.raw(nr.close, fd)
