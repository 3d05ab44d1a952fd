"""Failure paths: the process under migration is left as it was, a failed resume
leaves nothing behind, and the user gets one line, never a traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import upmig
import upmig.image
from conftest import ROOT, UPMIG, run_upmig, stat_fields, wait_for, wait_running


def stub_pids() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "exe").endswith("upmig-stub"):
                    out.add(int(d.name))
            except OSError:
                pass
    return out


def is_running_untraced(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return "TracerPid:\t0\n" in status and "\nState:\tZ" not in status


def test_process_exits_during_dump(run_victim, tmp_path):
    r = run_victim("memory")
    r.wait_output("READY\n")
    img = tmp_path / "gone.upmig"

    def kill_midway(step, nbytes):
        if step == "pages":
            os.kill(r.pid, signal.SIGKILL)

    with pytest.raises(upmig.NoSuchProcess, match="exited during the dump"):
        upmig.dump(r.pid, str(img), progress=kill_midway)
    assert not img.exists()
    assert not list(tmp_path.glob(".gone.upmig.partial-*"))


def test_image_that_does_not_fit_leaves_process_running(run_victim, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        r = run_victim("memory")  # ~60 MiB of data: cannot fit in 1 MiB
        r.wait_output("READY\n")
        res = run_upmig("dump", str(r.pid), "-o", str(small / "x.upmig"), check=False)
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1 and "No space left" in res.stderr
        assert "Traceback" not in res.stderr
        assert os.listdir(small) == []
        assert is_running_untraced(r.pid)
        wait_running(r.pid)
        assert r.finish() == 0 and r.output() == "READY\nPASS\n"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_changed_mapped_file_is_refused_by_name(run_victim):
    r = run_victim("privmap")
    r.wait_output("READY\n")
    img = r.dump()
    data = r.cwd / "data.bin"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    before = stub_pids()
    res = run_upmig("resume", str(img), check=False)
    assert res.returncode == 208  # resume's own 8
    assert res.stderr.strip().startswith("upmig: mapped file") and "data.bin" in res.stderr
    assert res.stderr.count("\n") == 1
    assert stub_pids() == before
    assert not Path(f"/proc/{r.pid}").exists()


def test_missing_open_file_fails_resume_and_leaves_nothing(run_victim):
    r = run_victim("files")
    r.wait_output("READY\n")
    img = r.dump()
    (r.cwd / "app.log").unlink()
    res = run_upmig("resume", str(img), check=False)
    assert res.returncode == 208, res.stderr  # found before any process is made
    assert res.stderr == f"upmig: pid {r.pid}: {r.cwd}/app.log (fd 3) is not here\n"
    assert "Traceback" not in res.stderr
    # resume has ended: whatever it made exists by now (and nothing may).
    assert not Path(f"/proc/{r.pid}").exists()
    assert not stub_pids()


def test_dump_of_zombie_or_self_is_refused():
    p = subprocess.Popen(["true"])
    try:
        wait_for(lambda: stat_fields(p.pid)[0] == "Z", 10, "true to exit (not reaped: a zombie)")
        res = run_upmig("dump", str(p.pid), "-o", "/tmp/never.upmig", check=False)
        assert res.returncode == 3 and "zombie" in res.stderr
    finally:
        p.wait()


def test_file_lease_is_refused_and_process_runs_on(run_victim):
    r = run_victim([sys.executable, "-c", "import fcntl, time\n"
                    "open('leased', 'w').close(); f = open('leased')\n"
                    "fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_RDLCK)\n"
                    "print('READY', flush=True); time.sleep(60)"])
    r.wait_output("READY\n")
    res = r.refused()
    assert res.stderr == (f"upmig: pid {r.pid} holds a lease on {r.cwd}/leased (fd 3), which "
                          "is not supported yet\n")
    assert not (r.cwd / "x.upmig").exists()
    assert is_running_untraced(r.pid)


def test_upmig_terminated_mid_dump_leaves_process_running(run_victim, tmp_path):
    """SIGTERM to upmig at any moment of a dump: it cleans up (no partial image) and
    the process runs on correctly, whether or not the dump got to finish."""
    r = run_victim("memory")
    r.wait_output("READY\n")
    for i, delay in enumerate([0.02, 0.06, 0.1, 0.14, 0.2, 0.3]):
        img = tmp_path / f"t{i}.upmig"
        p = subprocess.Popen([*UPMIG, "dump", str(r.pid), "-o", str(img), "--leave-running"],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)  # the thing under test: SIGTERM at this moment of the dump
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        assert p.returncode in (0, 130, -signal.SIGTERM), err
        assert "Traceback" not in err
        assert not list(tmp_path.glob(f".t{i}.upmig.partial-*"))
        if p.returncode == 130 and "after the image" not in err:
            assert not img.exists()
        if img.exists():  # finished, or interrupted too late to undo: a whole image
            upmig.image.load(str(img)).close()
        wait_for(lambda: is_running_untraced(r.pid), 10, "the process to be let go")
    assert r.finish() == 0 and r.output() == "READY\nPASS\n"


@pytest.mark.parametrize("setup,words", [
    ("import os; os.mkdir('gone'); os.chdir('gone'); os.rmdir('../gone')",
     "works in the deleted directory"),
    ("f = open('/proc/self/status')", "holds the kernel file /proc/"),
])
def test_state_that_cannot_be_recreated_is_refused(run_victim, setup, words):
    r = run_victim([sys.executable, "-c", f"{setup}\nimport time\n"
                    "print('READY', flush=True); time.sleep(60)"])
    r.wait_output("READY\n")
    res = r.refused()
    assert words in res.stderr and res.stderr.count("\n") == 1
    assert is_running_untraced(r.pid)


def test_sigstop_during_a_dump_is_not_lost(run_victim, tmp_path):
    """A SIGSTOP (which cannot be blocked) sent at any moment of a dump still stops
    the process: upmig holds it back while it works and sends it again after."""
    r = run_victim("memory")
    r.wait_output("READY\n")
    for i, delay in enumerate([0.0, 0.09, 0.1, 0.11, 0.12, 0.14]):
        p = subprocess.Popen([*UPMIG, "dump", str(r.pid), "-o", str(tmp_path / f"s{i}.upmig"),
                              "--leave-running"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)  # the thing under test: SIGSTOP at this moment of the dump
        os.kill(r.pid, signal.SIGSTOP)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        wait_for(lambda: "\nState:\tT" in Path(f"/proc/{r.pid}/status").read_text(), 5,
                 "the process to be stopped")
        os.kill(r.pid, signal.SIGCONT)
    assert r.finish() == 0 and r.output() == "READY\nPASS\n"


INJECT_AT_NOTHING = """
import sys
from upmig import _native as nat, freeze, inject
pid = int(sys.argv[1])
with freeze.frozen(pid):
    try:
        with inject.session(pid, nat.get_regs(pid), 1 << 46, -1):  # no code at 64 TiB
            print("ran")
    except OSError as e:
        print(e.errno)
"""


def test_a_syscall_injected_where_there_is_no_code_fails(run_victim):
    """Its instruction faults (SIGSEGV): the helper took that for a signal sent to the
    process, held it back and ran the instruction again, for ever (a resume hung so)."""
    r = run_victim("counter")
    r.wait_output("READY\n")
    done = subprocess.run([sys.executable, "-c", INJECT_AT_NOTHING, str(r.pid)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.stdout == f"{errno.EFAULT}\n", done.stderr
    assert is_running_untraced(r.pid), "the process is let go as it was"
    assert r.finish() == 0 and r.output().endswith("PASS\n")
