"""Run syscalls inside a frozen process, then put it back exactly as it was.

All signals are blocked while we work, so that nothing is delivered between our
single steps; a scratch page is mapped for syscall arguments and unmapped after.
The process's registers and signal mask are restored however the block ends."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from upmig import _native as nat
from upmig import _proc, critical, freeze
from upmig.errors import UpmigError
from upmig.kconst import AT_FDCWD, RESOLVE_NO_SYMLINKS
from upmig.syscalls import nr

ALL_SIGNALS = (1 << 64) - 1
SCRATCH = 16 * 4096
OPEN_HOW = struct.Struct("<QQQ")  # struct open_how: flags, mode, resolve


@dataclass
class Session:
    """An injector plus a scratch area in the target and a way to read it back."""

    inj: nat.Injector
    scratch: int
    mem_fd: int
    blocked: int = 0    # the thread's own signal mask, which injection replaced

    def call(self, nr: int, *args: int, what: str = "") -> int:
        return self.inj.call(nr, *args, what=what)

    def raw(self, nr: int, *args: int) -> int:
        return self.inj.raw(nr, *args)

    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self.mem_fd, size, addr)

    def write(self, addr: int, data: bytes) -> None:
        os.pwrite(self.mem_fd, data, addr)

    def open_path(self, path: str, flags: int, mode: int = 0) -> int:
        """openat2(path) in the process following no symlink on the way: the new fd, or
        -errno (-ELOOP where one is). The paths an image names are the canonical ones
        the kernel gave at dump: one that resolves through a symlink now is another
        file. openat2 takes only valid flags, and a mode only with O_CREAT/O_TMPFILE."""
        how = OPEN_HOW.pack(flags, mode, RESOLVE_NO_SYMLINKS)
        self.write(self.scratch, how + os.fsencode(path) + b"\0")
        return self.raw(nr.openat2, AT_FDCWD, self.scratch + len(how), self.scratch, len(how))


@contextmanager
def pinned_with(pid: int, cpu: int | None = None, tid: int = 0) -> Iterator[None]:
    """Run upmig on the target thread's CPU for a burst of injected syscalls: a ptrace
    round trip costs ~14 us on one CPU against 70-220 us across two (VM wake-ups)."""
    mine = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {_proc.stat(pid, tid).processor if cpu is None else cpu})
    except (OSError, ValueError):
        yield  # not allowed there: slower, not wrong
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def find_syscall_insn(mem_fd: int, start: int, end: int) -> int:
    """The address of a `syscall` instruction (0f 05) in [start, end) of the target."""
    code = os.pread(mem_fd, end - start, start)
    at = code.find(b"\x0f\x05")
    if at < 0:
        raise UpmigError(f"no syscall instruction in {start:#x}-{end:#x}")
    return start + at


@contextmanager
def session(pid: int, regs: bytes, gadget: int, mem_fd: int, tid: int = 0,
            scratch: int = 0) -> Iterator[Session]:
    """Inject into thread tid (default: the leader) of pid; regs are its registers.
    Without a scratch area of the caller's (shared by all threads), one is mapped."""
    tid = tid or pid
    inj = nat.Injector(tid, regs, gadget)
    owned = not scratch
    with critical.deferred():
        mask = nat.get_sigmask(tid)
        nat.set_sigmask(tid, ALL_SIGNALS)
    try:
        if owned:
            with critical.deferred():
                scratch = inj.call(nr.mmap, 0, SCRATCH, mmap.PROT_READ | mmap.PROT_WRITE,
                                   mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0,
                                   what="mmap(scratch)")
        yield Session(inj, scratch, mem_fd, mask)
    finally:
        with critical.deferred():  # never leave it half put back
            try:
                if owned and scratch:
                    inj.raw(nr.munmap, scratch, SCRATCH)
            finally:
                # Back into an interrupt stop with every signal still blocked, so that
                # none is delivered behind the dump's back; then its own mask.
                nat.set_regs(tid, regs)
                freeze.restop(pid, tid)
                nat.set_sigmask(tid, mask)
                for sig in inj.held_signals:  # say, a SIGSTOP sent meanwhile
                    os.kill(pid, sig)
