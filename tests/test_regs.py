"""The one view of a thread's general registers, regs.Regs: its fields by name sit at
the kernel's offsets, and its three forms (the wire bytes an image stores, the view,
the helper's buffer that injected syscalls run from) carry the same values."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest

from conftest import wait_for
from upmig import _native as nat
from upmig import _proc, freeze, inject
from upmig.regs import Regs
from upmig.syscalls import nr

WORDS = struct.Struct("<27Q")


def _distinct() -> tuple[Regs, list[int]]:
    """A Regs whose every field holds a value of its own."""
    r = Regs()
    values = [0x0101010101010101 * (i + 1) + i for i in range(len(Regs.fields()))]
    for name, v in zip(Regs.fields(), values, strict=True):
        setattr(r, name, v)
    return r, values


def test_fields_are_the_kernels_words_in_order():
    r, values = _distinct()
    assert Regs.SIZE == WORDS.size == len(bytes(r))
    assert list(WORDS.unpack(bytes(r))) == values
    assert Regs.fields()[:2] == ["r15", "r14"] and Regs.fields()[16] == "rip"


def test_fields_agree_with_python_ptrace():
    # An independent transcription of the same header: python-ptrace's ctypes struct.
    from ptrace.binding.linux_struct import user_regs_struct

    r, _ = _distinct()
    theirs = user_regs_struct.from_buffer_copy(bytes(r))
    assert [name for name, _ in theirs._fields_] == Regs.fields()
    assert {n: getattr(theirs, n) for n in Regs.fields()} == {n: getattr(r, n)
                                                              for n in Regs.fields()}


def test_wire_view_wire_round_trip():
    r, _ = _distinct()
    raw = bytes(r)
    again = Regs(raw)
    assert bytes(again) == raw and again == r
    again.rip += 2
    assert again != r and bytes(r) == raw  # a copy, not an alias of raw or of r


def test_negative_values_are_stored_as_the_kernel_would():
    r = Regs()
    r.rax = -4
    r.orig_rax = -1
    assert r.rax == 0xFFFFFFFFFFFFFFFC and r.signed("rax") == -4
    assert r.orig_rax == 0xFFFFFFFFFFFFFFFF and r.signed("orig_rax") == -1
    r.rax = 5
    assert r.signed("rax") == 5


def test_wrong_length_and_unknown_field_refused():
    with pytest.raises(ValueError, match="not 216"):
        Regs(bytes(215))
    with pytest.raises(AttributeError):
        Regs().xip  # noqa: B018
    with pytest.raises(AttributeError):
        Regs().xip = 1


def test_helper_buffer_holds_the_view():
    r, _ = _distinct()
    inj = nat.Injector(os.getpid(), bytes(r), gadget=0x1000)
    assert nat.regs_bytes(inj.regs) == bytes(r)
    inj.set_stack(0x7FFF0000)
    moved = Regs(nat.regs_bytes(inj.regs))
    assert moved.rsp == 0x7FFF0000
    moved.rsp = r.rsp
    assert moved == r  # set_stack changed rsp and nothing else


def _in_syscall(pid: int) -> list[int]:
    """What the kernel says a thread blocked in a syscall is doing: number, six
    arguments, stack pointer, program counter (/proc/PID/syscall); [] if it is not."""
    fields = _proc.read_text(pid, "syscall").split()
    return [int(f, 0) for f in fields] if len(fields) == 9 else []


def test_live_thread_through_all_three_forms():
    """A sleeping child's registers read through the view are what the kernel says it
    is doing (/proc/PID/syscall), and syscalls injected from them through the
    helper's buffer run in the child."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: _in_syscall(child.pid)[:1] == [nr.clock_nanosleep],
                 what="sleep to sleep")
        with freeze.frozen(child.pid) as tree:
            assert tree.tids == [child.pid]
            raw = nat.get_regs(child.pid)
            r = Regs(raw)
            assert [r.orig_rax, r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9, r.rsp, r.rip] \
                == _in_syscall(child.pid)
            mem_fd = os.open(f"/proc/{child.pid}/mem", os.O_RDWR)
            try:
                assert os.pread(mem_fd, 2, r.rip - 2) == b"\x0f\x05"  # syscall
                with inject.session(child.pid, raw, r.rip - 2, mem_fd) as s:
                    assert s.call(nr.getpid) == child.pid
                    assert s.call(nr.getppid) == os.getpid()
            finally:
                os.close(mem_fd)
            assert nat.get_regs(child.pid) == raw  # put back as it was
    finally:
        child.kill()
        child.wait()
