"""Multi-threaded processes: self-checking thread victims, real threaded programs, and
what happens to thread ids (kept, refused when taken, --pidns, --new-pids)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import upmig
from conftest import (
    ROOT,
    UPMIG,
    VICTIMS,
    assert_moved,
    build_victim,
    descendants,
    feed_after_resume,
    migrate_at_random,
    reap,
    run_upmig,
    stat_fields,
    straight_run,
    syscalls_of,
    untraced,
    wait_for,
    wait_running,
)

MODES = [("mutex", "4"), ("condvar",), ("futex",), ("sigmask",), ("many", "64")]


def _tids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("args", MODES, ids=[m[0] for m in MODES])
def test_threaded_victim_survives_migration(run_victim, args):
    r = run_victim("threads", *args)
    r.wait_output("READY\n")
    tids = _tids(r.pid)
    _settled(r.pid, args[0])
    r.hop()
    assert _tids(r.pid) == tids, "every thread has its own TID again"
    _settled(r.pid, args[0])
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


WAITING = {"futex", "sigmask", "many"}  # modes whose threads only wait, once set up


def _settled(pid: int, mode: str) -> None:
    """Every thread blocked in its call (main in sigwait, the others parked), or, in
    the modes that work, the threads going round their loops."""
    if mode in WAITING:
        wait_for(lambda: all(syscalls_of(pid).values()), 10, "every thread to block")
    else:
        wait_running(pid)


def test_thread_names_are_kept(run_victim):
    r = run_victim("threads", "many", "8")
    r.wait_output("READY\n")

    def names() -> list[str]:
        return [Path(f"/proc/{r.pid}/task/{t}/comm").read_text() for t in _tids(r.pid)]

    before = names()
    assert before[1:] == [f"park-{i}\n" for i in range(8)]
    r.hop()
    assert names() == before
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_thread_blocked_in_poll_then_read_gets_the_resumers_stdin(run_victim):
    r = run_victim("threads", "io", stdin=subprocess.PIPE)
    feed_after_resume(r, b"hello threads\n")
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nGOT hello threads\nPASS\n"


CHURN = """
import threading, time
n = 0
def tick():
    global n
    n += 1
print("READY", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    ts = [threading.Thread(target=tick) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    if n % 4000 == 0:
        print(n, flush=True)
"""


def test_threads_created_and_ending_during_the_freeze(run_victim):
    """Threads come and go all the time: every dump must catch a settled set, and the
    process must run on after each --leave-running dump and after a migration."""
    r = run_victim([sys.executable, "-c", CHURN])
    r.wait_output("READY\n")
    for _ in range(4):
        wait_running(r.pid)
        r.dump("--leave-running")
    seen = r.output().count("\n")
    wait_for(lambda: r.output().count("\n") > seen + 2, 20, "it to go on creating threads")
    r.hop()
    seen = r.output().count("\n")
    wait_for(lambda: r.output().count("\n") > seen + 2, 20, "the resumed one to go on")
    lines = r.output().split()[1:]
    assert lines == [str(4000 * (i + 1)) for i in range(len(lines))]
    r.kill()


def test_join_on_a_sleeping_thread_completes_after_resume(run_victim):
    r = run_victim("threads", "join")
    r.wait_output("READY\n")
    r.hop()            # main is in pthread_join, the other thread in nanosleep (3 s)
    assert "JOINED" not in r.output()
    r.wait_output("JOINED\n", timeout=10)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nJOINED\nPASS\n"


def test_threaded_chain_dump_resume_dump_resume(run_victim):
    r = run_victim("threads", "mutex", "8")
    r.wait_output("READY\n")
    for _ in range(3):
        wait_running(r.pid)
        r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_threaded_victim_checks_can_fail(run_victim):
    r = run_victim("threads", "mutex", "2", defines=("BREAK",))
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 1
    assert "FAIL: thread 0: TLS index is 99" in r.output()


def test_inspect_lists_every_thread_with_its_syscall(run_victim):
    r = run_victim("threads", "futex")
    r.wait_output("READY\n")
    wait_for(lambda: sorted(map(str, syscalls_of(r.pid).values())) ==
             ["futex"] * 4 + ["rt_sigtimedwait"], 10, "main in sigwait, the others in futex")
    img = r.dump("--leave-running")
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    threads = s["threads"]
    assert [t["tid"] for t in threads] == _tids(r.pid), "leader first, then by TID"
    # main in sigwait: the kernel ends rt_sigtimedwait with EINTR on any stop, and
    # glibc calls it again
    assert threads[0]["state"] == "returning -EINTR from rt_sigtimedwait()"
    assert [t["state"] for t in threads[1:]] == ["in futex()"] * 4
    assert all(t["comm"] == "threads" for t in threads)
    assert all(15 in t["blocked"] for t in threads), "SIGTERM is blocked in every thread"
    text = run_upmig("inspect", str(img)).stdout
    assert "threads   5\n" in text
    for t in threads[1:]:
        assert f"thread    tid {t['tid']} 'threads' in futex()" in text


def _stopped_original(run_victim, *args):
    """A threaded victim dumped with --leave-stopped: it keeps every TID taken."""
    r = run_victim("threads", *args)
    r.wait_output("READY\n")
    img = r.dump("--leave-stopped")
    wait_for(lambda: "T (stopped)" in Path(f"/proc/{r.pid}/status").read_text(), 10,
             "the original to stop")
    return r, img


def _stubs() -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == "upmig-stub":
                    out.append(int(p))
            except OSError:
                pass
    return out


def test_taken_tids_are_refused_naming_pidns(run_victim):
    r, img = _stopped_original(run_victim, "mutex", "3")
    res = run_upmig("resume", str(img), check=False)
    assert res.returncode == 208, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"pid {r.pid} is taken here by 'threads'" in res.stderr
    assert "--pidns" in res.stderr
    assert not _stubs(), "nothing was started"


def test_pidns_gives_the_original_ids_when_they_are_taken(run_victim):
    r, img = _stopped_original(run_victim, "mutex", "3")
    tids = _tids(r.pid)
    res = run_upmig("resume", "--pidns", "--detach", "--json", str(img))
    info = json.loads(res.stdout)
    pid, init = info["pid"], info["pidns_init"]
    try:
        assert info["pid_inside"] == r.pid and info["same_pid"] and pid != r.pid
        assert info["threads"] == len(tids)
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"NSpid:\t{pid}\t{r.pid}\n" in status
        inside = [int(Path(f"/proc/{pid}/task/{t}/status").read_text()
                      .split("NSpid:")[1].split("\n")[0].split()[-1]) for t in _tids(pid)]
        assert sorted(inside) == tids, "every thread has its original TID in the namespace"
        assert Path(f"/proc/{init}/comm").read_text().strip() == "upmig-init"
        wait_running(pid)
        os.kill(pid, signal.SIGTERM)   # the victim checks its TIDs against gettid()
        assert reap(pid, timeout=20) == 0, r.output()
        assert r.output() == "READY\nPASS\n"
        assert reap(init, timeout=10) == 0, "PID 1 leaves with the process"
    finally:
        for p in (pid, init):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_pidns_in_wait_mode_exits_with_the_process_status(run_victim):
    r, img = _stopped_original(run_victim, "futex")
    err = r.cwd / "resume.err"
    with open(err, "w") as errf:
        p = subprocess.Popen([*UPMIG, "resume", "--pidns", str(img)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=errf)
    try:
        wait_for(lambda: "from here it is pid" in err.read_text(), 20, "the resume notice")
        pid = int(err.read_text().split("from here it is pid ")[1].split()[0])
        # Let go: upmig passes signals on by then (it starts before the process does).
        wait_for(lambda: untraced(pid), 10, "the process to be let go")
        p.send_signal(signal.SIGTERM)  # passed on to the process, which checks and exits
        assert p.wait(timeout=30) == 0, err.read_text()
        assert r.output() == "READY\nPASS\n"
    finally:
        if p.poll() is None:
            p.kill()


def test_new_pids_runs_under_new_ids_and_says_so(run_victim):
    r = run_victim("counter")
    r.wait_output("READY\n")
    img = r.dump("--leave-stopped")
    res = run_upmig("resume", "--new-pids", "--detach", str(img))
    new = int(res.stdout)
    try:
        assert new != r.pid
        assert f"pid {r.pid} is now pid {new}" in res.stderr
        wait_running(new)
        os.kill(new, signal.SIGTERM)
        assert reap(new) == 0
    finally:
        try:
            os.kill(new, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- real threaded programs, as they are

def python_threads_job() -> list[str]:
    return [sys.executable, "-S", str(VICTIMS / "pythreads.py")]


@pytest.mark.parametrize("seed", [21, 22])
def test_python_threads_output_equals_straight_run(run_victim, tmp_path, seed):
    expected = straight_run(python_threads_job(), tmp_path)
    r = run_victim(python_threads_job())
    migrate_at_random(r, hops=3, seed=seed, spread=0.6)
    assert r.hops >= 2, "the job finished too soon; make it longer"
    r.ends_as(expected)
    assert_moved(r)


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
@pytest.mark.parametrize("seed", [31, 32])
def test_node_output_equals_straight_run(run_victim, tmp_path, seed):
    """node as it is: V8 and libuv threads, an epoll event loop, eventfds, pipes."""
    job = ["node", str(VICTIMS / "nodejob.js")]
    expected = straight_run(job, tmp_path)
    r = run_victim(job)
    wait_for(lambda: r.output(), 20, "node to get going")
    assert len(_tids(r.pid)) > 4
    migrate_at_random(r, hops=3, seed=seed, spread=0.4)
    assert r.hops >= 2, "the job finished too soon; make it longer"
    r.ends_as(expected)
    assert_moved(r)


FORKER = """
import subprocess, threading, time
forked = threading.Event()
threading.Thread(target=lambda: (subprocess.Popen(["sleep", "60"]), forked.set()),
                 daemon=True).start()
forked.wait()  # Popen returns once the child has exec'd
print("READY", flush=True)
time.sleep(60)
"""


def test_a_child_forked_by_another_thread_moves_with_it(run_victim):
    """The child of a thread other than the main one is part of the tree."""
    r = run_victim([sys.executable, "-c", FORKER])
    r.wait_output("READY\n")
    child = descendants(r.pid)
    assert len(child) == 1
    r.hop()
    assert int(stat_fields(child[0])[1]) == r.pid  # its parent again
    assert Path(f"/proc/{child[0]}/cmdline").read_bytes() == b"sleep\x0060\x00"
    r.kill()


QUITTER = """
import os, threading, time
deadline = time.monotonic() + 1.0
for _ in range(32):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("READY", deadline, flush=True)
while time.monotonic() < deadline:  # the thing under test: a deadline it polls for
    time.sleep(0.001)
os._exit(7)
"""


def test_a_process_that_exits_as_soon_as_it_runs_is_a_good_resume(run_victim):
    """Its threads are let go one by one; once one has run, the process may be gone
    before the last is let go. That is its own exit, not a failed resume."""
    r = run_victim([sys.executable, "-c", QUITTER])
    wait_for(lambda: r.output().endswith("\n"), 20, "READY")
    deadline = float(r.output().split()[1])
    img = r.dump()
    # Past its deadline (CLOCK_MONOTONIC, the same clock here, goes on while it is an image)
    wait_for(lambda: time.monotonic() > deadline, 10, "its deadline to pass")
    res = subprocess.run([*UPMIG, "resume", str(img)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 7, res.stderr
    assert res.stderr == ""


def test_library_dump_by_the_parent_of_a_threaded_process(tmp_path):
    """upmig.dump() called by the process's own parent leaves it a zombie for the
    caller to reap, threads and all."""
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen([str(build_victim("threads")), "futex"], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    wait_for(lambda: "READY" in (tmp_path / "out").read_text(), 10, "READY")
    res = upmig.dump(p.pid, str(tmp_path / "t.upmig"))
    assert res.threads == 5
    assert p.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize("how", ["migrated", "left-running"])
def test_thread_caught_in_an_rseq_critical_section_goes_to_its_abort_handler(run_victim,
                                                                            how):
    r = run_victim("rseqcs")
    r.wait_output("READY\n")
    wait_running(r.pid)
    if how == "migrated":
        r.hop()
    else:
        r.dump("--leave-running")
    wait_running(r.pid)
    assert r.finish(timeout=10) == 0, r.output()
    assert r.output() == "READY\nPASS\n"


SOCKET_AND_THREADS = """
import socket, threading, time
# An established TCP connection: refused, but only found once every thread is captured.
srv = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
counts = [0] * 4
def work(i):
    while True:
        counts[i] += 1
        time.sleep(0.001)
for i in range(4):
    threading.Thread(target=work, args=(i,), daemon=True).start()
print("READY", flush=True)
while True:
    time.sleep(0.05)
    print(sum(counts), flush=True)
"""


def test_a_refused_threaded_process_has_every_thread_released(run_victim):
    r = run_victim([sys.executable, "-c", SOCKET_AND_THREADS])
    wait_for(lambda: r.output().count("\n") >= 3, 10, "it to count")
    tids = _tids(r.pid)
    assert len(tids) == 5
    res = r.refused()
    assert "TCP connection" in res.stderr, res.stderr
    assert not list(r.cwd.glob("*.upmig*")), "no image and no partial file"
    for t in tids:
        st = Path(f"/proc/{r.pid}/task/{t}/status").read_text()
        assert "TracerPid:\t0\n" in st and "State:\tt" not in st, f"thread {t}: {st[:200]}"
    last = int(r.output().split()[-1])
    wait_for(lambda: int(r.output().split()[-1]) > last + 100, 10, "the threads to go on")
