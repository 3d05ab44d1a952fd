"""Fds 0-2 that lead outside the process: a pipe or socket to whoever started it,
its terminal. They cannot move; resume re-attaches them to its own fds 0-2, which
the stub has already (and so does every process of the tree holding them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from upmig.fds.base import Kind, Rebuild, Scan, Seen
from upmig.fds.path import is_tty
from upmig.records import Fd


@dataclass(kw_only=True)
class InheritFd(Fd):
    """An fd 0-2 leading outside the tree: the resuming side's own takes its place."""

    kind: ClassVar[str] = "fd_inherit"
    checks: ClassVar[dict] = {}


def outside(e: Seen) -> str:
    """What e leads to, for the messages: a pipe, a socket, a terminal."""
    return "a pipe" if e.target.startswith("pipe:") else \
        "a socket" if e.target.startswith("socket:") else f"the terminal {e.target}"


class InheritKind(Kind):
    name = "inherit"
    records = (InheritFd,)
    shares = False
    created = False

    def classify(self, e: Seen, scan: Scan) -> bool:
        return e.fd <= 2 and (e.target.startswith(("pipe:", "socket:")) or (
            e.st is not None and is_tty(e.st)))

    def capture(self, e: Seen, scan: Scan) -> InheritFd:
        return InheritFd(**e.common(f"{outside(e)}, re-attached to upmig resume's own fd "
                                    f"{e.fd}"))

    def restore(self, ctx: Rebuild, rec: InheritFd) -> None:
        """The stub's own fd is there already."""

    def rule(self, rec: InheritFd) -> tuple[str, str] | None:
        if rec.fd > 2:
            return "fd", f"{rec.fd}: only fds 0-2 are inherited from the resumer"
        if rec.async_owner is not None:
            return "async_owner", "is set on an fd that is the resumer's own"
        return None


INHERIT = InheritKind()
