"""Shared harness: build victims, start them, drive upmig's command line.

The pytest process makes itself a child subreaper, so processes resumed with
--detach become its children and are reaped here (PID 1 reaps only every few
seconds on these machines, which would keep PIDs taken).

Tests wait on conditions, never for a fixed time: wait_for() a predicate, and on
top of it wait_running() (the process goes round its loop), wait_in_syscall() (it
is blocked in a given call), tcp_of() (what the kernel says of its connections).
A machine that cannot move processes (not root, a kernel older than 6.7, no cc)
skips every test not marked `pure`, once, saying why."""

from __future__ import annotations

import ctypes
import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from upmig import keys
from upmig.syscalls import name as syscall_name

ROOT = Path(__file__).resolve().parent.parent
VICTIMS = ROOT / "tests" / "victims"
BUILD = ROOT / "tests" / ".build"
UPMIG = [sys.executable, "-m", "upmig"]
PR_SET_CHILD_SUBREAPER = 36
MIN_KERNEL = (6, 7)  # PAGEMAP_SCAN


def unfit_machine(euid: int, release: str, cc: str | None) -> str | None:
    """Why this machine cannot run the tests that move processes, or None."""
    why = []
    if euid != 0:
        why.append("not root (ptrace of any process, clone3 with a chosen PID and "
                   "PR_SET_MM_MAP need it)")
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m or (int(m[1]), int(m[2])) < MIN_KERNEL:
        why.append(f"kernel {release} is older than 6.7 (upmig needs PAGEMAP_SCAN)")
    if not cc:
        why.append("no C compiler (cc) to build the test victims")
    return "; ".join(why) or None


def pytest_configure(config):
    config.addinivalue_line("markers", "pure: needs no process to move (runs on any machine)")
    config.upmig_unfit = unfit_machine(os.geteuid(), os.uname().release, shutil.which("cc"))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Every upmig the tests run seals and checks images with this session's own key,
    # not the machine's (/etc/upmig/key is neither needed nor made).
    where = Path(tempfile.mkdtemp(prefix="upmig-test-key-"))
    key = where / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    os.environ[keys.ENV] = str(key)
    config.upmig_key_dir = where


def pytest_report_header(config):
    if config.upmig_unfit:
        return f"upmig: only tests marked pure run here: {config.upmig_unfit}"
    return None


def pytest_collection_modifyitems(config, items):
    if not config.upmig_unfit:
        return
    skip = pytest.mark.skip(reason=config.upmig_unfit)
    for item in items:
        if item.get_closest_marker("pure") is None:
            item.add_marker(skip)


def pytest_unconfigure(config):
    where = getattr(config, "upmig_key_dir", None)
    if where:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def test_key() -> keys.Key:
    """The key every upmig of this test session seals and checks images with."""
    return keys.load(os.environ[keys.ENV])


def build_victim(name: str, *defines: str) -> Path:
    """Compile tests/victims/NAME.c (once per set of defines) and return the binary."""
    src = VICTIMS / f"{name}.c"
    out = BUILD / (name + "".join(f".{d}" for d in defines))
    newest = max(src.stat().st_mtime, (VICTIMS / "victim.h").stat().st_mtime)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    BUILD.mkdir(exist_ok=True)
    extra = []
    first = src.read_text().splitlines()[0]
    if first.startswith("// cflags:"):
        extra = first.split(":", 1)[1].split()
    subprocess.run(["cc", "-O1", "-g", "-Wall", "-Wextra", *[f"-D{d}" for d in defines],
                    "-o", str(out), str(src), *extra], check=True)
    return out


def run_upmig(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run([*UPMIG, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"upmig {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def wait_for(pred, timeout: float = 20, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # a poll, with the deadline above


def _scheduled(pid: int) -> tuple[int, int]:
    """(ns on a CPU, times put on one) of all pid's threads together, from schedstat."""
    ns = runs = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            on_cpu, _, slices = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
        ns, runs = ns + int(on_cpu), runs + int(slices)
    return ns, runs


def wait_running(pid: int, runs: int = 5, cpu_ms: int = 20, timeout: float = 20) -> None:
    """pid goes on from now: its threads are put on a CPU `runs` more times (a loop
    that sleeps goes round) or spend cpu_ms more there (a busy loop). Where a fixed
    sleep hoped a victim had worked a while, this sees it has."""
    ns0, runs0 = _scheduled(pid)

    def went_on() -> bool:
        ns, n = _scheduled(pid)
        return n >= runs0 + runs or ns >= ns0 + cpu_ms * 1_000_000

    wait_for(went_on, timeout, f"pid {pid} to run on")


def syscalls_of(pid: int) -> dict[int, str | None]:
    """Each thread of pid: the syscall it is blocked in (by name), or None (running,
    or stopped outside any)."""
    out: dict[int, str | None] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            first = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        out[int(tid)] = syscall_name(int(first)) if first.isdigit() else None
    return out


def wait_in_syscall(pid: int, *names: str, timeout: float = 20) -> None:
    """A thread of pid is blocked in one of the syscalls names (glibc picks among
    pause and rt_sigsuspend, poll and ppoll, nanosleep and clock_nanosleep)."""
    wait_for(lambda: any(c in names for c in syscalls_of(pid).values()), timeout,
             f"pid {pid} to block in {' or '.join(names)}")


def untraced(pid: int) -> bool:
    """Every thread of pid is let go by its tracer (and it has not ended)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            st = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            if "TracerPid:\t0\n" not in st or "\nState:\tZ" in st:
                return False
    except (FileNotFoundError, ProcessLookupError):
        return False
    return True


TCP_STATES = {1: "ESTABLISHED", 6: "TIME_WAIT", 8: "CLOSE_WAIT", 10: "LISTEN"}


def tcp_of(pid: int) -> list[dict]:
    """pid's TCP sockets as /proc/net/tcp{,6} show them: local and remote port, state,
    bytes in the send and receive queues."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            held.add(int(link[8:-1]))
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if int(f[9]) in held:
                tx, rx = (int(x, 16) for x in f[4].split(":"))
                st = int(f[3], 16)
                out.append({"port": int(f[1].rsplit(":", 1)[1], 16),
                            "peer_port": int(f[2].rsplit(":", 1)[1], 16),
                            "state": TCP_STATES.get(st, str(st)), "send_queue": tx,
                            "recv_queue": rx})
    return out


def reap(pid: int, timeout: float = 10) -> int | None:
    """Reap pid if it is our child (directly or through the subreaper); its status."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got:
            return status
        time.sleep(0.01)  # a poll, with the deadline above
    raise AssertionError(f"pid {pid} did not exit")


def descendants(pid: int) -> list[int]:
    """Every process below pid, as they are now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tids:
            try:
                kids = [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


def straight_run(argv: list[str], tmp_path: Path, stdin: bytes | None = None) -> bytes:
    r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       cwd=tmp_path, check=True, timeout=120)
    return r.stdout


def migrate_at_random(run, hops: int, seed: int, spread: float) -> None:
    rnd = random.Random(seed)
    for _ in range(hops):
        # The thing under test, not a wait: a moment the job did not choose.
        time.sleep(rnd.uniform(0.05, spread))
        if (run.resumer or run.proc).poll() is not None or not _running(run.pid):
            return  # it finished before we got to it: the comparison still holds
        try:
            run.hop()
        except AssertionError as e:
            if "no such process" in str(e) and not _running(run.pid):
                return  # it finished as we got to it: so does the comparison
            raise


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: [0] state, [1] ppid, [2] pgrp,
    [3] session, [4] tty_nr, [5] tpgid, ... (proc(5)'s field n is [n - 3])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _running(pid: int) -> bool:
    """Not ended (a zombie waits for its parent, upmig resume say, to notice)."""
    try:
        return stat_fields(pid)[0] not in "ZX"
    except OSError:
        return False


def moves_like_a_straight_run(run_victim, tmp_path: Path, argv: list[str], *, seed: int,
                              ends_with: bytes, spread: float = 1.0) -> None:
    """argv run straight must end with ends_with; run again, said READY and moved at
    random up to twice (at least once), it must write the very same output."""
    expected = straight_run(argv, tmp_path)
    assert expected.endswith(ends_with), expected[-200:]
    r = run_victim(argv)
    r.wait_output("READY\n")
    migrate_at_random(r, hops=2, seed=seed, spread=spread)
    r.ends_as(expected)
    assert_moved(r)


def assert_moved(r) -> None:
    """r was dumped and resumed at least once, and what ended (ends_as, finish) was
    the resumed process, whose status `upmig resume` passed on: a job that ended
    before its first hop passes an output comparison without moving at all."""
    assert r.hops >= 1, "it never moved: the job ended before its first hop"
    assert (r.cwd / f"hop{r.hops - 1}.upmig").exists(), "the last hop's image"
    assert r.resumer is not None and r.resumer.returncode is not None, \
        "the process that ended was not the resumed one"


READS = ("read", "poll", "ppoll")  # how the victims wait for their stdin


def feed_after_resume(r, data: bytes) -> None:
    """Dump r while it is blocked reading stdin, resume it with a new pipe as the
    resumer's stdin (fd 0 is re-attached to it), write data, and see it arrive."""
    r.wait_output("READY\n")
    wait_in_syscall(r.pid, *READS)
    img = r.dump()
    rd, wr = os.pipe()
    r.resume(img, stdin=rd)
    os.close(rd)
    wait_in_syscall(r.pid, *READS)  # back in its call, not yet past it
    os.write(wr, data)
    r.wait_output(f"GOT {data.decode()}")
    os.close(wr)


def no_terminal() -> None:
    """Give up the controlling terminal (of whoever ran the tests from a terminal):
    a job on a shell's terminal is dumped only with --shell-job, which its own
    tests ask for."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return  # none to give up
    try:
        fcntl.ioctl(fd, termios.TIOCNOTTY)
    except OSError:
        pass
    finally:
        os.close(fd)


class Run:
    """One victim's life: started here, then any number of dump/resume hops.

    Its stdout is the regular file `stdout.txt` in its own directory, so it keeps
    writing to the same file after every resume."""

    def __init__(self, argv: list[str], cwd: Path, stdin=subprocess.DEVNULL, preexec_fn=None,
                 pass_fds=(), owner: tuple[int, int] | None = None):
        self.cwd = cwd
        self.out_path = cwd / "stdout.txt"
        if owner:  # a victim that runs as another user: resume opens its stdout as it
            self.out_path.touch()
            os.chown(self.out_path, *owner)
        def setup() -> None:
            no_terminal()
            if preexec_fn:
                preexec_fn()

        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=stdin,
                                     stdout=open(self.out_path, "wb"),
                                     stderr=subprocess.STDOUT, close_fds=True,
                                     preexec_fn=setup, pass_fds=pass_fds)
        self.pid = self.proc.pid
        self.cmdline = b""  # read once it has exec'd: how we recognise it when rebuilt
        self.resumer: subprocess.Popen | None = None  # `upmig resume` in wait mode
        self.hops = 0

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 20) -> None:
        wait_for(lambda: text in self.output(), timeout, f"{text!r} in output")

    def image(self) -> Path:
        return self.cwd / f"hop{self.hops}.upmig"

    def dump(self, *flags: str) -> Path:
        img = self.image()
        if not self.cmdline:
            self.cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        below = descendants(self.pid)
        run_upmig("dump", str(self.pid), "-o", str(img), *flags)
        if not {"--leave-running", "--leave-stopped"} & set(flags):
            self._reap_killed()
            for pid in below:  # orphaned by the kill, they came to us (the subreaper)
                reap(pid)
        return img

    def refused(self, *flags: str) -> subprocess.CompletedProcess:
        """A dump that must be refused (exit 5); its result, to check the reason."""
        res = run_upmig("dump", str(self.pid), "-o", str(self.cwd / "x.upmig"), *flags,
                        check=False)
        assert res.returncode == 5, res.stderr
        return res

    def _reap_killed(self) -> None:
        if self.resumer is not None:
            assert self.resumer.wait(timeout=10) == 128 + signal.SIGKILL
            self.resumer = None
        elif self.proc.returncode is None:
            assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def resume(self, img: Path, *flags: str, stdin=subprocess.DEVNULL) -> None:
        """`upmig resume IMAGE` in wait mode; the process is its child."""
        self.resumer = subprocess.Popen([*UPMIG, "resume", *flags, str(img)], cwd=ROOT,
                                        stdin=stdin,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        close_fds=True)
        wait_for(lambda: self._alive_again(), 20, "the resumed process")
        self.hops += 1

    def _alive_again(self) -> bool:
        if self.resumer is not None and self.resumer.poll() is not None:
            err = self.resumer.stderr.read().decode()
            raise AssertionError(f"resume exited {self.resumer.returncode}: {err}")
        try:  # rebuilt (its own cmdline, not the resumer's or the stub's) and let go
            with open(f"/proc/{self.pid}/status") as f:
                traced = "TracerPid:\t0\n" not in f.read()
            rebuilt = Path(f"/proc/{self.pid}/cmdline").read_bytes() == self.cmdline
            return rebuilt and not traced
        except (FileNotFoundError, ProcessLookupError):
            return False

    def hop(self, *flags: str) -> None:
        self.resume(self.dump(*flags))

    def finish(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process and return its exit status (shell style)."""
        if sig:
            os.kill(self.pid, sig)
        if self.resumer is not None:
            return self.resumer.wait(timeout=timeout)
        rc = self.proc.wait(timeout=timeout)
        return rc if rc >= 0 else 128 - rc

    def ends_as(self, expected: bytes, timeout: float = 120) -> None:
        """It ends by itself, with status 0, having written exactly `expected`."""
        assert self.finish(sig=0, timeout=timeout) == 0
        assert self.out_path.read_bytes() == expected

    def kill(self) -> None:
        kids = descendants(self.pid)  # a tree's other processes too
        for child in kids:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (self.proc, self.resumer):
            if p is not None and p.poll() is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for child in kids:  # orphaned: they come to us, the subreaper
            end = time.monotonic() + 5
            while os.path.exists(f"/proc/{child}") and time.monotonic() < end:
                try:
                    os.waitpid(child, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.005)  # a poll, with the deadline above


@pytest.fixture
def open_tmp():
    """A directory that every user can reach (pytest's tmp_path is root's alone), for
    victims that run as another user: resume opens their files with their rights."""
    d = Path(tempfile.mkdtemp(prefix="upmig-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run_victim(tmp_path):
    """Start a victim by name (or an argv); everything started is killed at the end.
    owner=(uid, gid): its directory and stdout are that user's, made in where (a
    directory the user can reach: tmp_path is root's alone)."""
    runs: list[Run] = []

    def start(name_or_argv, *args: str, stdin=subprocess.DEVNULL, defines=(),
              preexec_fn=None, pass_fds=(), owner: tuple[int, int] | None = None,
              where: Path | None = None) -> Run:
        if isinstance(name_or_argv, str):
            argv = [str(build_victim(name_or_argv, *defines)), *args]
        else:
            argv = list(name_or_argv)
        d = (where or tmp_path) / f"run{len(runs)}"
        d.mkdir(exist_ok=True)
        if owner:
            os.chown(d, *owner)
        r = Run(argv, d, stdin=stdin, preexec_fn=preexec_fn, pass_fds=pass_fds, owner=owner)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.kill()
        # The POSIX object sharedmem.c makes, left behind if a test failed before
        # its own unlink.
        Path(f"/dev/shm/upmig-victim-shm-{r.pid}").unlink(missing_ok=True)
