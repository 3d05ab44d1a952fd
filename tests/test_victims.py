"""End to end: each self-checking victim is dumped, killed, resumed, and then
verifies its own state (see tests/victims/README.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import (
    READS,
    feed_after_resume,
    stat_fields,
    wait_for,
    wait_in_syscall,
    wait_running,
)

SIMPLE = ["counter", "memory", "brk", "fpu", "privmap", "files"]


@pytest.mark.parametrize("name", SIMPLE)
def test_victim_survives_migration(run_victim, name):
    r = run_victim(name)
    r.wait_output("READY\n")
    wait_running(r.pid)  # dumped in its loop
    r.hop()
    wait_running(r.pid)  # and it goes round it after resume
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


@pytest.mark.parametrize("name", ["counter", "memory", "fpu"])
def test_victim_chain_of_five(run_victim, name):
    r = run_victim(name)
    r.wait_output("READY\n")
    for _ in range(5):
        wait_running(r.pid)
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
    r.wait_output("ALARM\n", timeout=15)  # it fires in the resumed process
    os.kill(r.pid, signal.SIGUSR1)
    wait_for(lambda: not _pending(r.pid) & (1 << (signal.SIGUSR1 - 1)), 10,
             "SIGUSR1 to be taken")
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nALARM\nPASS\n"


def _pending(pid: int) -> int:
    """The signals pending for the process as a whole (ShdPnd), as a bit mask."""
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("ShdPnd:\t", 1)[1].split("\n", 1)[0], 16)


def test_blocked_in_read_on_stdin(run_victim):
    r = run_victim("readblock", stdin=subprocess.PIPE)
    feed_after_resume(r, b"hello upmig\n")
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nGOT hello upmig\nPASS\n"


def test_blocked_in_nanosleep(run_victim):
    r = run_victim("sleeper")
    r.wait_output("READY\n")
    wait_in_syscall(r.pid, "nanosleep", "clock_nanosleep")
    r.hop()
    r.wait_output("SLEPT\n", timeout=15)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nSLEPT\nPASS\n"


def test_leave_running_then_resume_the_checkpoint(run_victim):
    # memory keeps all its state in memory, so the checkpoint is complete on its own
    # (a file the process goes on writing after the checkpoint is not in the image).
    r = run_victim("memory")
    r.wait_output("READY\n")
    wait_running(r.pid)
    img = r.dump("--leave-running")
    wait_running(r.pid)                    # it went on
    assert r.finish() == 0 and r.output() == "READY\nPASS\n"
    # The checkpoint resumes too, from the moment of the dump: its stdout was written
    # since (and is written again here), which resume accepts only when told to.
    (r.cwd / "stdout.txt").write_text("READY\n")
    r.resume(img, "--allow-changed-files")
    wait_running(r.pid)
    assert r.finish() == 0, r.output()


def test_blocked_in_pause(run_victim):
    r = run_victim("waiter", "pause")
    r.wait_output("READY\n")
    wait_in_pause(r.pid)
    r.hop()
    # Any return from pause() but SIGTERM's ends it with FAIL: blocked in pause() again
    # after resume, it came back into the call without one.
    wait_in_pause(r.pid)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def wait_in_pause(pid: int) -> None:
    """waiter (pause) is in its pause(): a SIGTERM sent before, between its check of the
    flag and the call, would be taken and then waited for in vain."""
    wait_in_syscall(pid, "pause", "rt_sigsuspend")


def test_blocked_in_poll_on_stdin(run_victim):
    r = run_victim("waiter", "poll", stdin=subprocess.PIPE)
    feed_after_resume(r, b"ping\n")
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nGOT ping\nPASS\n"


def test_leave_stopped_then_continue(run_victim):
    r = run_victim("counter")
    r.wait_output("READY\n")
    r.dump("--leave-stopped")
    wait_for_state(r.pid, "T")
    os.kill(r.pid, signal.SIGCONT)
    wait_running(r.pid)
    assert r.finish() == 0 and r.output() == "READY\nPASS\n"


def wait_for_state(pid: int, state: str) -> None:
    def has_state():
        return stat_fields(pid)[0] == state

    wait_for(has_state, 10, f"state {state}")


def proc_view(pid: int) -> dict:
    """What the kernel says about a process, field by field, for before/after checks."""
    status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines()
                  if ":\t" in line)
    keep = ("Name", "Umask", "Uid", "Gid", "Groups", "Cpus_allowed_list", "SigBlk", "SigIgn",
            "SigCgt", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    return {
        **{k: status[k] for k in keep},
        "cmdline": open(f"/proc/{pid}/cmdline", "rb").read(),
        "environ": open(f"/proc/{pid}/environ", "rb").read(),
        "exe": os.readlink(f"/proc/{pid}/exe"),
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "limits": open(f"/proc/{pid}/limits").read(),
        "personality": open(f"/proc/{pid}/personality").read(),
        "auxv": open(f"/proc/{pid}/auxv", "rb").read(),
        "maps": merged([(*(int(x, 16) for x in line.split()[0].split("-")),
                          line.split()[1] + " " + (line.split(None, 5)[5:] or [""])[0])
                         for line in open(f"/proc/{pid}/maps").read().splitlines()]),
        "stat_mm": stat_fields(pid)[23:26] + stat_fields(pid)[42:49],
    }


def test_task_state_is_the_same_after_resume(run_victim, open_tmp):
    """A process run as another user, with its own umask, limits, affinity, name and
    personality looks the same to the kernel after resume."""
    import resource

    def become_someone_else():
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 900))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.sched_setaffinity(0, {0})
        os.setgroups([100, 65534])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)

    argv = [str(__import__("conftest").build_victim("waiter")), "pause"]
    r = run_victim(["setarch", "x86_64", "-R", *argv], preexec_fn=become_someone_else,
                   owner=(65534, 65534), where=open_tmp)
    r.wait_output("READY\n")
    before = proc_view(r.pid)
    r.hop()
    after = proc_view(r.pid)
    for key in before:
        assert after[key] == before[key], key
    assert before["Uid"].split()[0] == "65534" and before["Umask"] == "0027"
    wait_in_pause(r.pid)
    assert r.finish() == 0, r.output()


def test_shared_anonymous_memory_of_one_process(run_victim):
    from conftest import VICTIMS

    r = run_victim([sys.executable, "-S", str(VICTIMS / "shmem.py")])
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


SIGNAL_KEEPER = """
import signal, sys
signal.signal(signal.SIGTRAP, lambda *a: None)
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGWINCH})
print("READY", flush=True)
signal.sigwait({signal.SIGTERM})
"""


def signal_masks(pid: int) -> dict[str, str]:
    lines = open(f"/proc/{pid}/status").read().splitlines()
    return {k: v for k, v in (line.split(":\t", 1) for line in lines if ":\t" in line)
            if k in ("SigBlk", "SigIgn", "SigCgt")}


def test_dump_leaves_signal_dispositions_untouched(run_victim):
    """Injecting syscalls must not disturb SIGTRAP (a forced trap would reset its
    handler) nor anything else, in the live process and in the image."""
    r = run_victim([sys.executable, "-c", SIGNAL_KEEPER])
    r.wait_output("READY\n")
    before = signal_masks(r.pid)
    assert int(before["SigCgt"], 16) & (1 << 4)      # SIGTRAP handled
    img = r.dump("--leave-running")
    assert signal_masks(r.pid) == before
    os.kill(r.pid, signal.SIGKILL)
    r.proc.wait()
    r.resume(img)
    assert signal_masks(r.pid) == before


def test_leave_running_while_blocked_in_read(run_victim):
    """After a checkpoint the live process is back in its read(), which then
    returns the data (not -ERESTARTSYS, not EINTR)."""
    r = run_victim("readblock", stdin=subprocess.PIPE)
    r.wait_output("READY\n")
    wait_in_syscall(r.pid, "read")
    r.dump("--leave-running")
    r.dump("--leave-running")
    r.proc.stdin.write(b"hello upmig\n")
    r.proc.stdin.flush()
    r.wait_output("GOT hello upmig\n")
    assert r.finish() == 0, r.output()


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) is missing")
def test_reduced_capabilities_and_no_new_privs_stay_reduced(run_victim):
    """A root process that gave up capabilities must not get them back by moving."""
    from conftest import build_victim

    argv = ["setpriv", "--bounding-set", "-net_raw,-sys_ptrace", "--inh-caps", "+kill",
            "--no-new-privs", str(build_victim("waiter")), "pause"]
    r = run_victim(argv)
    r.wait_output("READY\n")
    before = proc_view(r.pid)
    assert before["NoNewPrivs"] == "1"
    r.hop()
    assert proc_view(r.pid) == before
    wait_in_pause(r.pid)
    assert r.finish() == 0, r.output()


RSEQ_USER = """
import ctypes, os, signal
libc = ctypes.CDLL(None)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.sched_setaffinity(0, {0})
print("READY", libc.sched_getcpu(), flush=True)
signal.sigwait({signal.SIGUSR1})
os.sched_setaffinity(0, {1})
print("NOW", libc.sched_getcpu(), flush=True)
"""


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two CPUs")
def test_rseq_keeps_sched_getcpu_right(run_victim):
    """glibc reads sched_getcpu() from its rseq area: the resumed process must be
    registered again, or the kernel stops updating it."""
    r = run_victim([sys.executable, "-c", RSEQ_USER])
    r.wait_output("READY 0\n")
    r.hop()
    os.kill(r.pid, signal.SIGUSR1)
    r.wait_output("NOW ")
    assert r.finish(sig=0) == 0
    assert r.output() == "READY 0\nNOW 1\n"


NAMED_AND_LOCKED = """
import ctypes, mmap, signal
libc = ctypes.CDLL(None, use_errno=True)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
named = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
named[:5] = b"named"
addr = ctypes.addressof(ctypes.c_char.from_buffer(named))
# Names need CONFIG_ANON_VMA_NAME; without it only the mlock part is tested.
libc.prctl(0x53564D41, 0, ctypes.c_ulong(addr), ctypes.c_ulong(8 * 4096),
           ctypes.c_char_p(b"upmig-test"))
locked = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
laddr = ctypes.addressof(ctypes.c_char.from_buffer(locked))
assert libc.mlock(ctypes.c_void_p(laddr), ctypes.c_size_t(4 * 4096)) == 0
print("READY", flush=True)
signal.sigwait({signal.SIGUSR1})
print("PASS" if named[:5] == b"named" else "FAIL", flush=True)
"""


def merged(areas: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Adjacent areas that only differ in where the kernel split them, as one:
    the kernel merges like anonymous mappings made side by side on resume."""
    out: list[tuple[int, int, str]] = []
    for start, end, what in areas:
        if out and out[-1][1] == start and out[-1][2] == what:
            out[-1] = (out[-1][0], end, what)
        else:
            out.append((start, end, what))
    return out


def vmflags_of(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, "perms name VmFlags") of every mapping, from smaps."""
    out, head = [], None
    for line in open(f"/proc/{pid}/smaps").read().splitlines():
        if line.startswith("VmFlags:"):
            start, end, what = head
            out.append((start, end, f"{what} {' '.join(sorted(line.split()[1:]))}"))
        elif "-" in line.split(None, 1)[0] and not line.split(None, 1)[0].endswith(":"):
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            head = (start, end, f"{parts[1]} {parts[5] if len(parts) > 5 else ''}")
    return merged(out)


def test_named_and_locked_memory(run_victim):
    """mlock()ed memory stays locked; anonymous memory names (where the kernel has
    them) stay too: both show in smaps, compared before and after."""
    r = run_victim([sys.executable, "-c", NAMED_AND_LOCKED])
    r.wait_output("READY\n")
    before = vmflags_of(r.pid)
    assert any(" lo" in f" {flags}" for _, _, flags in before)
    r.hop()
    assert vmflags_of(r.pid) == before
    os.kill(r.pid, signal.SIGUSR1)
    assert r.finish(sig=0) == 0 and r.output() == "READY\nPASS\n"


def test_blocked_in_read_on_a_terminal(run_victim):
    """stdin is a terminal: dumped while reading it, resumed on another terminal."""
    import pty

    master, slave = pty.openpty()
    r = run_victim("readblock", stdin=slave)
    os.close(slave)
    r.wait_output("READY\n")
    wait_in_syscall(r.pid, *READS)
    img = r.dump()
    master2, slave2 = pty.openpty()
    r.resume(img, stdin=slave2)
    os.close(slave2)
    wait_in_syscall(r.pid, *READS)  # back in its read
    os.write(master2, b"hello upmig\n")
    r.wait_output("GOT hello upmig\n")
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nGOT hello upmig\nPASS\n"
    os.close(master)
    os.close(master2)


def test_sigterm_to_upmig_resume_reaches_the_process(run_victim):
    r = run_victim("counter")
    r.wait_output("READY\n")
    r.hop()  # returns once the process is let go, after upmig forwards signals to it
    r.resumer.send_signal(signal.SIGTERM)  # to upmig, which passes it on
    assert r.resumer.wait(timeout=30) == 0, r.output()
    assert r.output() == "READY\nPASS\n"
