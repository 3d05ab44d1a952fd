"""The one exception hierarchy of upmig, and the one map from OSError into it. The
CLI prints str(error) as one line and exits with the class's exit_code, so scripts
can tell the failures apart.

An OSError becomes an UpmigError in one place, from_oserror(), which picks the class
by errno and by the phase the error came in, and names the call that failed as a
person reads it: "ptrace(PTRACE_GETREGSET)", "injected mmap". upmig._native makes
its OSErrors with call_failed(), which carries that name and the process."""

from __future__ import annotations

import errno
import os


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


def call_failed(err: int, call: str, pid: int | None = None, strerror: str | None = None
                ) -> OSError:
    """The OSError of a call that failed with errno err: of err's own subclass, as
    Python makes them (ProcessLookupError for ESRCH...), carrying the call's name and
    the process (or thread) it was made on, for from_oserror to name."""
    e = OSError(err, strerror or os.strerror(err))
    e.call = call  # type: ignore[attr-defined]
    e.pid = pid  # type: ignore[attr-defined]
    return e


# What each phase calls its failures, and the class of those it does not sort.
_PHASES: dict[str | None, tuple[str | None, type[UpmigError]]] = {
    "dump": ("dump failed", UpmigError),
    "resume": ("resume failed", RestoreError),
    "image": (None, ImageError),
    "key": (None, KeyProblem),
    None: (None, UpmigError),
}


def from_oserror(e: OSError, call: str | None = None, pid: int | None = None,
                 phase: str | None = None, *, what: str | None = None) -> UpmigError:
    """The UpmigError an OSError stands for.

    call: what was being done, if the OSError does not say (upmig._native's name
    their call); pid: the process being worked on; phase: "dump", "resume",
    "image", "key" or None (anywhere); what: the thing that failed, if not the phase (an
    image's path, say). Every failure of resume is a RestoreError (nothing was left
    running); elsewhere ESRCH means the process is gone (NoSuchProcess), EPERM or
    EACCES on a process that access to it was refused (AccessDenied); the rest is
    the phase's own: ImageError, KeyProblem, or UpmigError."""
    label, cls = _PHASES[phase]
    what = what or label
    by = getattr(e, "pid", None)  # the process or thread the call was made on
    if pid is None:
        pid, by = by, None
    own = getattr(e, "call", None)
    if what is None:
        what = e.filename  # it names the file, at the head
    elif not own and e.filename != what:
        own = e.filename
    named = ": ".join(str(c) for c in (call, own) if c)
    if by is not None and by != pid:
        named = f"{named} (pid {by})"
    why = f"{named}: {e.strerror or e}" if named else str(e.strerror or e)
    if phase == "resume":
        return RestoreError(why, pid=pid, what=what)
    if e.errno == errno.ESRCH and pid is not None:
        return NoSuchProcess("exited during the dump" if phase == "dump" else why, pid=pid)
    if e.errno in (errno.EPERM, errno.EACCES) and _on_a_process(e, pid):
        return AccessDenied(why, pid=pid, what=what)
    return cls(why, pid=pid, what=what)


def _on_a_process(e: OSError, pid: int | None) -> bool:
    """The call was made on a process (ptrace, an injected syscall, /proc/PID/...),
    not on a file, say the image."""
    if e.filename:
        return str(e.filename).startswith("/proc/")
    return pid is not None
