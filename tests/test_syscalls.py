"""Syscall numbers by name (from the helper's <sys/syscall.h>) agree with the running
kernel and with python-ptrace's table, and every name upmig uses exists."""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path

import pytest

from upmig import syscalls
from upmig.syscalls import nr

UPMIG = Path(__file__).resolve().parent.parent / "upmig"


def _syscall(num: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(num), *(ctypes.c_long(a) for a in args))


def test_numbers_run_their_calls_in_the_kernel():
    assert _syscall(nr.getpid) == os.getpid()
    assert _syscall(nr.getppid) == os.getppid()
    assert _syscall(nr.gettid) == threading.get_native_id()
    assert _syscall(nr.getpgid, 0) == os.getpgid(0)
    assert _syscall(nr.getuid) == os.getuid()
    old = _syscall(nr.umask, 0o027)
    try:
        assert os.umask(old) == 0o027
    finally:
        os.umask(old)


def test_known_numbers():
    # The x86-64 ABI never renumbers: these are fixed for good.
    assert (nr.read, nr.write, nr.mmap, nr.restart_syscall) == (0, 1, 9, 219)
    assert (nr.timerfd_create, nr.pidfd_open, nr.clone3, nr.openat2) == (283, 434, 435, 437)


def test_numbers_agree_with_python_ptrace():
    # An independent table (it also lists the x32 ABI's calls, from 512 on).
    from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES

    theirs = {name: num for num, name in SYSCALL_NAMES.items() if num < 512}
    ours = {name: getattr(nr, name) for name in theirs if hasattr(nr, name)}
    assert len(ours) > 300
    assert ours == {name: theirs[name] for name in ours}


def test_name_by_number():
    assert syscalls.name(9) == "mmap"
    assert syscalls.name(nr.rt_sigtimedwait) == "rt_sigtimedwait"
    assert syscalls.name(283) == "timerfd_create"  # python-ptrace's table says "timerfd"
    assert syscalls.name(100_000) == "100000"
    assert syscalls.name(-1) == "-1"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no x86-64 syscall named mmapp"):
        nr.mmapp  # noqa: B018


def test_every_name_upmig_uses_exists():
    used = {m for p in UPMIG.rglob("*.py")
            for m in re.findall(r"\bnr\.([a-z_0-9]+)", p.read_text())}
    assert "mmap" in used
    missing = sorted(n for n in used if not hasattr(nr, n))
    assert not missing
