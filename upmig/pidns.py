"""A new PID namespace for `upmig resume --pidns`, where the image's PIDs are free.

The kernel gives a chosen PID in a namespace only once the namespace has a PID 1,
so upmig-init is started first as that PID 1. upmig then spawns the stub into the
namespace (setns to it for our next child only) and rebuilds it from out here, where
/proc and ptrace see it under its outer PID. Once the process runs, upmig-init is
told its PID and lives exactly as long as it does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from upmig import _native as nat
from upmig.errors import RestoreError, from_oserror
from upmig.kconst import CLONE_NEWPID

INIT = os.path.join(os.path.dirname(os.path.realpath(__file__)), "upmig-init")


class Namespace:
    def __init__(self) -> None:
        if not os.path.exists(INIT):
            raise RestoreError(f"{INIT} is missing (run make)")
        r, self.ctl = os.pipe()
        try:
            self.init = nat.spawn(INIT, 0, traceme=False, flags=CLONE_NEWPID, pass_fd=r)
        except OSError as e:
            os.close(self.ctl)
            raise from_oserror(e, "cannot make a PID namespace", phase="resume") from None
        finally:
            os.close(r)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Our next child is born in the namespace; our own PID does not change."""
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            theirs = os.open(f"/proc/{self.init}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                nat.setns(theirs, CLONE_NEWPID)
            finally:
                os.close(theirs)
            try:
                yield
            finally:
                nat.setns(own, CLONE_NEWPID)
        finally:
            os.close(own)

    def watch(self, pid_inside: int) -> None:
        """The process runs: PID 1 now lives as long as it does."""
        os.write(self.ctl, f"{pid_inside}\n".encode())
        os.close(self.ctl)
        self.ctl = -1

    def abandon(self) -> None:
        """Resume failed: PID 1 exits, and the kernel kills all left in the namespace."""
        if self.ctl >= 0:
            os.close(self.ctl)
            self.ctl = -1
        try:
            os.waitpid(self.init, 0)
        except ChildProcessError:
            pass

    def reap(self) -> None:
        """After the process exited, PID 1 follows; collect it."""
        try:
            os.waitpid(self.init, 0)
        except ChildProcessError:
            pass


def inner_pid(pid: int) -> int:
    """pid's PID as its own (innermost) namespace sees it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return pid
