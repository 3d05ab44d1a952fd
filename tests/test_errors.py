"""The one error map: errors.from_oserror picks the class by errno and phase and
names the call as a person reads it; upmig._native's OSErrors carry that name."""

from __future__ import annotations

import errno

import pytest

from upmig import _native as nat
from upmig import syscalls
from upmig.errors import (
    AccessDenied,
    ImageError,
    KeyProblem,
    NoSuchProcess,
    RestoreError,
    UpmigError,
    call_failed,
    from_oserror,
)


def test_call_failed_is_an_oserror_of_its_errnos_own_class():
    e = call_failed(errno.ESRCH, "ptrace(PTRACE_SEIZE)", 42)
    assert isinstance(e, ProcessLookupError) and e.errno == errno.ESRCH
    assert isinstance(call_failed(errno.EPERM, "kcmp(KCMP_VM)"), PermissionError)


@pytest.mark.parametrize("err, cls", [(errno.EPERM, AccessDenied), (errno.EACCES, AccessDenied),
                                      (errno.ESRCH, NoSuchProcess), (errno.EIO, UpmigError)])
def test_dump_phase_sorts_by_errno(err, cls):
    u = from_oserror(call_failed(err, "ptrace(PTRACE_GETREGSET)", 43), pid=42, phase="dump")
    assert type(u) is cls
    if cls is NoSuchProcess:
        assert str(u) == "pid 42: exited during the dump"
    else:
        assert str(u).startswith("pid 42 dump failed: ptrace(PTRACE_GETREGSET) (pid 43): ")


def test_eperm_mid_dump_is_access_denied_exit_4():
    u = from_oserror(PermissionError(errno.EACCES, "Permission denied", "/proc/42/mem"),
                     pid=42, phase="dump")
    assert isinstance(u, AccessDenied) and u.exit_code == 4
    assert str(u) == "pid 42 dump failed: /proc/42/mem: Permission denied"


def test_the_call_is_named_once_when_made_on_the_process_itself():
    u = from_oserror(call_failed(errno.EIO, "injected mmap", 42), pid=42, phase="dump")
    assert str(u) == "pid 42 dump failed: injected mmap: Input/output error"


@pytest.mark.parametrize("err", [errno.EPERM, errno.ESRCH, errno.EACCES, errno.ENOMEM])
def test_every_resume_failure_is_a_restore_error(err):
    u = from_oserror(call_failed(err, "injected openat2", 4242), phase="resume")
    assert type(u) is RestoreError and u.exit_code == 7
    assert str(u).startswith("pid 4242 resume failed: injected openat2: ")


def test_what_was_being_done_comes_before_the_call():
    u = from_oserror(call_failed(errno.EPERM, "clone3"), "cannot make a PID namespace",
                     phase="resume")
    assert str(u) == "resume failed: cannot make a PID namespace: clone3: Operation not permitted"


def test_a_file_is_no_process():
    """EACCES on a file (the image, the key) is not access to a process refused."""
    img = from_oserror(PermissionError(errno.EACCES, "Permission denied", "/x/job.upmig"),
                       "cannot open image", phase="image", what="/x/job.upmig")
    assert type(img) is ImageError
    assert str(img) == "/x/job.upmig: cannot open image: Permission denied"
    key = from_oserror(PermissionError(errno.EACCES, "Permission denied", "/k"),
                       "cannot read the key", phase="key", what="/k")
    assert type(key) is KeyProblem
    out = from_oserror(PermissionError(errno.EACCES, "Permission denied", "/x"),
                       "cannot write the image", what="/x/job.upmig")
    assert type(out) is UpmigError and out.exit_code == 1


def test_anywhere_else_names_the_file_at_the_head():
    u = from_oserror(FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/x"))
    assert type(u) is UpmigError and str(u) == "/etc/x: No such file or directory"
    gone = from_oserror(call_failed(errno.ESRCH, "kcmp(KCMP_VM)", 42))
    assert type(gone) is NoSuchProcess and str(gone) == "pid 42: kcmp(KCMP_VM): No such process"


def test_native_errors_name_the_ptrace_request():
    with pytest.raises(ProcessLookupError) as e:
        nat.ptrace(nat.PTRACE_GETREGS, 999999)  # beyond pid_max
    assert e.value.call == "ptrace(PTRACE_GETREGS)" and e.value.pid == 999999
    assert nat.request_name(nat.PTRACE_SEIZE) == "ptrace(PTRACE_SEIZE)"
    assert nat.request_name(0x4299) == "ptrace(0x4299)"


def test_native_kcmp_raises_rather_than_answering():
    """-errno used to read as "not shared"."""
    with pytest.raises(ProcessLookupError) as e:
        nat.kcmp(999999, 1, nat.KCMP_VM)
    assert e.value.call == "kcmp(KCMP_VM)"


def test_injected_syscalls_are_named():
    assert syscalls.name(9) == "mmap" and syscalls.name(999) == "999"
    assert nat._injected(9) == "injected mmap"
    assert nat._injected(9, "mmap(scratch)") == "injected mmap(scratch)"

