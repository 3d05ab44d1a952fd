"""The one exception hierarchy of upmig. The CLI prints str(error) as one line and
exits with the class's exit_code, so scripts can tell the failures apart."""

from __future__ import annotations


class UpmigError(Exception):
    """Any expected failure: says what failed and why, for one stderr line."""

    exit_code = 1

    def __init__(self, why: str, *, pid: int | None = None, what: str | None = None):
        self.pid = pid
        self.what = what
        self.why = why
        super().__init__(why)

    def __str__(self) -> str:
        parts = []
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        if self.what:
            parts.append(self.what)
        head = " ".join(parts)
        return f"{head}: {self.why}" if head else self.why


class NoSuchProcess(UpmigError):
    """The process does not exist, or it exited while being worked on."""

    exit_code = 3


class AccessDenied(UpmigError):
    """The kernel refused access (ptrace, /proc) to the process."""

    exit_code = 4


class CantMigrate(UpmigError):
    """The process holds state upmig cannot move (yet); nothing was written."""

    exit_code = 5

    def __str__(self) -> str:
        # Reasons read as a sentence about the process: "pid 42 has 3 threads; ..."
        return f"pid {self.pid} {self.why}" if self.pid is not None else self.why


class ImageError(UpmigError):
    """The image cannot be used: unreadable, truncated, corrupt or too new."""

    exit_code = 6


class Truncated(ImageError):
    """The image ends before its trailer."""


class Corrupt(ImageError):
    """A checksum or a record of the image is wrong."""


class VersionTooNew(ImageError):
    """The image was written by a newer upmig with a format this one cannot read."""


class NotSealed(ImageError):
    """The image was not sealed with the key resume trusts (or was changed since)."""


class RestoreError(UpmigError):
    """Rebuilding the process failed; nothing was left running."""

    exit_code = 7


class Mismatch(RestoreError):
    """The target machine differs from the source in a way that matters (a file, the vdso)."""

    exit_code = 8


class KeyProblem(UpmigError):
    """The key that seals images is missing, unreadable or unsafe."""

    exit_code = 9


class Interrupted(UpmigError):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped upmig; what it did was undone."""

    exit_code = 130


def describe_oserror(e: OSError) -> str:
    """One line for an OSError, naming the file or call it came from."""
    if e.filename:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)
