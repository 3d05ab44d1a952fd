"""End to end: each self-checking victim is dumped, killed, resumed, and then
verifies its own state (see tests/victims/README.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

SIMPLE = ["counter", "memory", "brk", "fpu", "privmap", "files"]


@pytest.mark.parametrize("name", SIMPLE)
def test_victim_survives_migration(run_victim, name):
    r = run_victim(name)
    r.wait_output("READY\n")
    time.sleep(0.2)
    r.hop()
    time.sleep(0.2)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


@pytest.mark.parametrize("name", ["counter", "memory", "fpu"])
def test_victim_chain_of_five(run_victim, name):
    r = run_victim(name)
    r.wait_output("READY\n")
    for _ in range(5):
        time.sleep(0.1)
        r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_victim_checks_can_fail(run_victim):
    """The BREAK build corrupts state before verifying: the harness must see FAIL."""
    r = run_victim("memory", defines=("BREAK",))
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 1
    assert "FAIL" in r.output()


def test_signals_handlers_alarm_pending_altstack(run_victim):
    r = run_victim("signals")
    r.wait_output("READY\n")
    r.hop()                     # within the alarm(3) window
    time.sleep(4)               # the alarm fires in the resumed process
    os.kill(r.pid, signal.SIGUSR1)
    time.sleep(0.2)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_blocked_in_read_on_stdin(run_victim):
    r = run_victim("readblock", stdin=subprocess.PIPE)
    r.wait_output("READY\n")
    time.sleep(0.2)             # now blocked in read(0)
    img = r.dump()
    rd, wr = os.pipe()
    r.resume(img, stdin=rd)     # fd 0 is re-attached to the resumer's stdin
    os.close(rd)
    time.sleep(0.2)
    os.write(wr, b"hello upmig\n")
    r.wait_output("GOT hello upmig\n")
    os.close(wr)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nGOT hello upmig\nPASS\n"


def test_blocked_in_nanosleep(run_victim):
    r = run_victim("sleeper")
    r.wait_output("READY\n")
    time.sleep(0.5)
    r.hop()
    r.wait_output("SLEPT\n", timeout=15)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nSLEPT\nPASS\n"


def test_leave_running_then_resume_the_checkpoint(run_victim):
    # memory keeps all its state in memory, so the checkpoint is complete on its own
    # (a file the process goes on writing after the checkpoint is not in the image).
    r = run_victim("memory")
    r.wait_output("READY\n")
    time.sleep(0.2)
    img = r.dump("--leave-running")
    time.sleep(0.2)
    assert r.proc.poll() is None           # it went on
    assert r.finish() == 0 and r.output() == "READY\nPASS\n"
    # The checkpoint resumes too, from the moment of the dump.
    (r.cwd / "stdout.txt").write_text("READY\n")
    r.resume(img)
    time.sleep(0.2)
    assert r.finish() == 0, r.output()
