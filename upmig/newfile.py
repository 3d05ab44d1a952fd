"""A file that appears at its path whole or not at all.

It is made nameless (O_TMPFILE) in the directory it will live in and linked into
place only when complete, so a writer killed at any moment, even by SIGKILL,
leaves nothing behind. Where the filesystem refuses O_TMPFILE it gets a hidden
name, `.NAME.partial-PID`, which the next NewFile in that directory removes once
PID has gone."""

from __future__ import annotations

import errno
import fcntl
import os
import re

from upmig import _native

PARTIAL = re.compile(r"^\..+\.partial-(\d+)$")


class NewFile:
    """fd is open read-write on the new file; commit() puts it at path."""

    def __init__(self, path: str, mode: int = 0o600):
        self.path = os.path.abspath(path)
        self.dir, tail = os.path.split(self.path)
        self.partial = os.path.join(self.dir, f".{tail}.partial-{os.getpid()}")
        self.named = False  # it has the partial name (no O_TMPFILE here)
        remove_stale_partials(self.dir)
        try:
            self.fd = os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              mode)
            self.named = True

    def commit(self) -> None:
        """Put the file at its path, replacing what was there, in one step."""
        if not self.named:
            # linkat cannot replace a file: link under the partial name, then rename
            # (a kill in between leaves a partial that the next writer removes).
            _native.link_fd(self.fd, self.partial)
            self.named = True
        os.rename(self.partial, self.path)
        self.named = False

    def close(self) -> None:
        """Close it; if it was never committed, it is gone."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.named:
            _unlink(self.partial)
            self.named = False

    def __enter__(self) -> NewFile:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def remove_stale_partials(directory: str) -> None:
    """Remove partial files of ours whose writer has gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    me = os.geteuid()
    for name in names:
        m = PARTIAL.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid == me:
                os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


PIPE_SIZES = (8 << 20, 1 << 20)  # root may go past pipe-max-size; anyone up to it


def enlarge_pipe(fd: int) -> None:
    """Fewer, larger reads and writes, and fewer wake-ups, if fd is a pipe."""
    for size in PIPE_SIZES:
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            pass  # not a pipe, or too big for us: it only goes slower


class Stream:
    """An output that is already open and has no name: standard output, a pipe or a
    socket. There is nothing to commit: each byte went out as it was written."""

    def __init__(self, fd: int):
        self.fd = fd
        self.path = "stdout" if fd == 1 else f"fd {fd}"
        if os.isatty(fd):
            raise OSError(errno.ENOTTY, "will not write an image to a terminal")
        enlarge_pipe(fd)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass  # not ours to close
