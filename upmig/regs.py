"""General registers and the XSAVE area of a stopped thread, and the fix-up that lets
a thread caught inside a syscall restart it correctly in its new life.

`Regs` is the one view of the general registers, by name (r.rip, r.rax). It wraps the
C helper's struct user_regs_struct, whose layout cffi checks against <sys/user.h>;
bytes(r) is the kernel's PTRACE_GETREGS form, which an image stores
(records.Thread.regs) and _native.Injector runs injected syscalls from."""

from __future__ import annotations

import os
import struct

from upmig import _native as nat
from upmig.errors import Mismatch
from upmig.inject import Session
from upmig.records import Thread
from upmig.syscalls import nr

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
RESTART_CODES = {-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK}
EINTR = 4
WORD = 1 << 64


class Regs:
    """A thread's general registers by field name. A value set is taken modulo 2**64,
    so that r.rax = -EINTR stores what the kernel would; signed() reads one back."""

    __slots__ = ("_struct",)
    SIZE = nat.REGS_SIZE

    def __init__(self, raw: bytes | None = None) -> None:
        """Zeroed, or the registers in raw (bytes(r) form); ValueError if raw has
        another length."""
        object.__setattr__(self, "_struct", nat.new_regs(raw))

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):  # not a register (and _struct itself, before __init__)
            raise AttributeError(name)
        return getattr(self._struct, name)

    def __setattr__(self, name: str, value: int) -> None:
        setattr(self._struct, name, value % WORD)

    def __bytes__(self) -> bytes:
        return nat.regs_bytes(self._struct)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Regs) and bytes(self) == bytes(other)

    def __repr__(self) -> str:
        return f"Regs(rip={self.rip:#x}, rsp={self.rsp:#x}, rax={self.rax:#x})"

    def signed(self, name: str) -> int:
        """A field as the signed long the kernel means by it (rax = -errno, say)."""
        v = getattr(self._struct, name)
        return v - WORD if v >= WORD >> 1 else v

    @staticmethod
    def fields() -> list[str]:
        """The register names, in the kernel's order."""
        return nat.regs_fields()


def capture(tid: int, mem_fd: int) -> Thread:
    """A stopped thread's registers; mem_fd (its process's /proc/PID/mem) is for
    reading its rseq critical-section descriptor."""
    raw = nat.get_regs(tid)
    r = Regs(raw)
    orig, rax = r.signed("orig_rax"), r.signed("rax")
    rseq = nat.get_rseq(tid)
    if rseq and orig < 0:
        raw = _abort_rseq_cs(raw, rseq[0], mem_fd)
    return Thread(tid=tid, regs=raw, xsave=nat.get_regset(tid, nat.NT_X86_XSTATE),
                  syscall=orig if orig >= 0 else -1, syscall_result=rax, rseq=rseq)


RSEQ_CS_PTR = 8                        # offset of rseq_cs in struct rseq
RSEQ_CS = struct.Struct("<IIQQQ")      # version, flags, start_ip, post_commit_offset, abort_ip


def _abort_rseq_cs(raw: bytes, area: int, mem_fd: int) -> bytes:
    """A thread stopped inside an rseq critical section goes on at its abort handler,
    as the kernel would send it there on its way back to user space. (Injected
    syscalls return to user space elsewhere, where the kernel only clears rseq_cs.)"""
    try:
        cs, = struct.unpack("<Q", os.pread(mem_fd, 8, area + RSEQ_CS_PTR))
        if not cs:
            return raw
        _, _, start, length, abort = RSEQ_CS.unpack(os.pread(mem_fd, RSEQ_CS.size, cs))
    except (OSError, struct.error):
        return raw  # an unreadable descriptor: the kernel would kill it; leave it be
    r = Regs(raw)
    if (r.rip - start) % WORD < length:
        r.rip = abort
        return bytes(r)
    return raw


def restore_thread_links(s: Session, th: Thread) -> None:
    """Re-register rseq and the robust futex list, which glibc set up at start."""
    if th.robust_list:
        s.call(nr.set_robust_list, *th.robust_list, what="set_robust_list")
    if th.rseq:
        area, size, sig = th.rseq
        s.call(nr.rseq, area, size, 0, sig, what="rseq")


def in_syscall(th: Thread) -> bool:
    """Stopped inside th.syscall (to be restarted), not just returning from it."""
    return th.syscall >= 0 and th.syscall_result in RESTART_CODES


def for_restore(raw: bytes) -> bytes:
    """The registers to give a rebuilt thread.

    A thread interrupted in a syscall shows rax = -ERESTART* and rip past the
    `syscall` instruction. We re-execute that syscall from scratch (rip back 2,
    rax = its number) and clear orig_rax so the kernel does no fix-up of its own:
    that is what the kernel itself does for every code but RESTARTBLOCK, whose
    restart state (say, a nanosleep's deadline) lived in the old kernel, so we
    restart the original call with its original arguments instead. Only a thread
    that was already in restart_syscall cannot be restarted: it gets -EINTR."""
    r = Regs(raw)
    orig, rax = r.signed("orig_rax"), r.signed("rax")
    if orig >= 0 and rax in RESTART_CODES:
        if orig == nr.restart_syscall:
            r.rax = -EINTR
        else:
            r.rax = orig
            r.rip -= 2
    r.orig_rax = -1
    return bytes(r)


def restore(tid: int, th: Thread) -> None:
    """Give a rebuilt thread its registers last: the XSAVE area, the general
    registers (for_restore) and its signal mask."""
    here = nat.get_regset(tid, nat.NT_X86_XSTATE)
    check_xsave(th.xsave, here)
    # The kernel takes only an area of its own size; the header's xstate_bv says
    # which parts of a shorter saved area are valid, the rest is zero.
    nat.set_regset(tid, nat.NT_X86_XSTATE, th.xsave.ljust(len(here), b"\0"))
    nat.set_regs(tid, for_restore(th.regs))
    nat.set_sigmask(tid, th.blocked)


# Offsets in the XSAVE area as PTRACE_GETREGSET gives it: the kernel puts the XCR0
# it exposes to user space in the first word of the legacy area's software-reserved
# bytes (464, USER_XSTATE_XCR0_WORD), and the XSAVE header starts at 512 with
# XSTATE_BV, the components the saved area holds (Intel SDM vol. 1, 13.4).
XSAVE_SW_XCR0 = slice(464, 472)
XSAVE_HEADER_BV = slice(512, 520)


def check_xsave(saved: bytes, here: bytes) -> None:
    """The CPU here must have every state component the image's XSAVE area uses."""
    xcr0_here = int.from_bytes(here[XSAVE_SW_XCR0], "little")
    used = int.from_bytes(saved[XSAVE_HEADER_BV], "little")
    if used & ~xcr0_here or len(saved) > len(here):
        raise Mismatch(f"this CPU lacks register state the process uses (XSAVE features "
                       f"{used:#x}, CPU has {xcr0_here:#x})")
