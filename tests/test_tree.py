"""Process trees: parents and children, groups and sessions, zombies, and what the
processes share (open files, pipes), moved together as one image."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    UPMIG,
    VICTIMS,
    assert_moved,
    build_victim,
    descendants,
    migrate_at_random,
    moves_like_a_straight_run,
    reap,
    run_upmig,
    stat_fields,
    straight_run,
    syscalls_of,
    wait_for,
)


def _relations(pid: int) -> list[tuple[int, int, int, int, str]]:
    """(pid, ppid, pgid, sid, state) of pid and every process below it."""
    out = []
    for p in [pid, *descendants(pid)]:
        st = stat_fields(p)
        out.append((p, int(st[1]), int(st[2]), int(st[3]), st[0]))
    return sorted(out)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_tree_moves_and_ends_as_a_straight_run(run_victim, tmp_path, seed):
    """Workers in their own group and session, a grandchild, a zombie, pipes with
    bytes in them: the report equals that of a run that was never moved."""
    moves_like_a_straight_run(run_victim, tmp_path, [str(build_victim("tree"))], seed=seed,
                              ends_with=b"DONE\n")


def _normal(rows, root: int) -> list[tuple]:
    """Relations with the root's parent, and the group and session it had from
    outside the tree, left out: those are upmig resume's after a move."""
    r = next(x for x in rows if x[0] == root)
    outside = {r[2], r[3]} - {root}
    return [(p, None if p == root else pp, "out" if g in outside else g,
             "out" if s in outside else s, st == "Z") for p, pp, g, s, st in rows]


def test_relations_are_rebuilt_exactly(run_victim):
    r = run_victim("tree", "5000")
    r.wait_output("READY\n")
    wait_for(lambda: sum(st == "Z" for *_, st in _relations(r.pid)) == 2, 5, "two zombies")
    before = _relations(r.pid)
    assert len(before) == 6
    img = r.dump()
    info = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    assert sorted(t["pid"] for t in info["tree"]) == [p for p, *_ in before]
    zombies = sorted(t["exit_status"] for t in info["tree"] if t.get("zombie"))
    assert zombies == [3 << 8, 7 << 8]
    r.resume(img)
    assert _normal(_relations(r.pid), r.pid) == _normal(before, r.pid)
    r.kill()


PIPELINE = "seq 1 50000000 | gzip -1 | sha256sum > out.txt"


@pytest.mark.parametrize("seed", [3])
def test_a_shell_pipeline_moves(run_victim, tmp_path, seed):
    """sh with three children joined by pipes full of bytes: the checksum it writes
    after the moves is the one an unmoved run writes."""
    straight = tmp_path / "straight"
    straight.mkdir()
    subprocess.run(["sh", "-c", PIPELINE], cwd=straight, check=True, timeout=120)
    r = run_victim(["sh", "-c", PIPELINE])
    wait_for(lambda: len(descendants(r.pid)) == 3, 10, "the pipeline")
    migrate_at_random(r, hops=2, seed=seed, spread=1.2)
    assert r.hops >= 1, "the pipeline finished too soon"
    assert r.finish(sig=0, timeout=120) == 0
    assert (r.cwd / "out.txt").read_text() == (straight / "out.txt").read_text()
    assert_moved(r)


def test_a_job_on_a_shells_terminal_needs_shell_job(tmp_path):
    """A job whose controlling terminal is its shell's: refused with the reason,
    then moved with --shell-job (its stdin re-attached to upmig resume's)."""
    out = tmp_path / "count.txt"
    shell = subprocess.Popen([sys.executable, str(VICTIMS / "shelljob.py"), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    inner = 0  # the stand-in shell, in a session of its own
    try:
        job = int(shell.stdout.readline())
        inner = int(stat_fields(job)[1])
        wait_for(lambda: out.exists() and out.read_text().count("\n") > 5, 10, "counting")
        img = tmp_path / "job.upmig"
        res = run_upmig("dump", str(job), "-o", str(img), check=False)
        assert res.returncode == 5 and "--shell-job" in res.stderr, res.stderr
        run_upmig("dump", str(job), "-o", str(img), "--shell-job")
        wait_for(lambda: not os.path.exists(f"/proc/{job}"), 10, "the job reaped by its shell")
        counted = out.read_text().count("\n")
        pid = int(run_upmig("resume", "--detach", str(img)).stdout)
        assert pid == job
        wait_for(lambda: out.read_text().count("\n") > counted + 5, 10, "counting on")
        os.kill(pid, signal.SIGKILL)
        reap(pid)
        numbers = [int(n) for n in out.read_text().split()]
        assert numbers == list(range(len(numbers)))  # on from where it was, none twice
    finally:
        if inner:
            os.kill(inner, signal.SIGKILL)
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


@pytest.mark.parametrize("seed", [8, 9])
def test_socket_pairs_between_processes_move_with_their_queues(run_victim, tmp_path, seed):
    """Stream, datagram and seqpacket pairs between a parent and its child (the
    stream's both ends also in the parent), requests queued ahead: the answers
    after moves equal an unmoved run's."""
    moves_like_a_straight_run(run_victim, tmp_path,
                              [sys.executable, "-S", str(VICTIMS / "pairtree.py"), "400"],
                              seed=seed, ends_with=b"DONE 0\n", spread=0.9)


def test_a_shell_job_leading_its_group_gets_the_terminal_of_resume(tmp_path):
    """A job the shell made the terminal's foreground group: resumed with --shell-job
    by an upmig resume that holds its own terminal's foreground, the job gets it
    (and reads what is typed), rather than being stopped for reading from the
    background."""
    out = tmp_path / "job.txt"
    shell = subprocess.Popen([sys.executable, str(VICTIMS / "shelljob.py"), str(out),
                              "--own-group"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    inner = 0
    try:
        job = int(shell.stdout.readline())
        inner = int(stat_fields(job)[1])
        wait_for(lambda: out.exists() and "listening" in out.read_text(), 10, "the job")
        img = tmp_path / "job.upmig"
        run_upmig("dump", str(job), "-o", str(img), "--shell-job")
        wait_for(lambda: not os.path.exists(f"/proc/{job}"), 10, "the job reaped by its shell")
        resumer, term = pty.fork()  # upmig resume leads a session on a terminal of its own
        if resumer == 0:
            os.chdir(ROOT)
            os.execv(UPMIG[0], [*UPMIG, "resume", str(img)])
        try:
            wait_for(lambda: _foreground_of(job) == job, 20, "the job in the foreground")
            os.write(term, b"hello\n")
            wait_for(lambda: "got hello" in out.read_text(), 10, "the job reading the terminal")
        finally:
            os.kill(job, signal.SIGKILL)
            reap(resumer, timeout=20)
            os.close(term)
    finally:
        if inner:
            os.kill(inner, signal.SIGKILL)
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def _foreground_of(pid: int) -> int:
    """The foreground group of pid's controlling terminal (tpgid), or 0."""
    try:
        return int(stat_fields(pid)[5])
    except (OSError, ValueError):
        return 0


FIFO_TWICE = """
import os, signal  # {mode}
os.mkfifo("f")
mine = os.open("f", os.O_RDWR | os.O_NONBLOCK)
os.write(mine, b"queued once")
if os.fork() == 0:
    theirs = os.open("f", os.{mode} | os.O_NONBLOCK)  # its own open of the FIFO
    signal.pause()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # waited for, never missed
print("READY", flush=True)
signal.sigwait({signal.SIGTERM})
print(os.read(mine, 100), flush=True)
"""


@pytest.mark.parametrize("mode", ["O_RDWR", "O_RDONLY"])
def test_a_fifo_opened_by_two_processes_keeps_its_bytes_once(run_victim, mode):
    """One FIFO, opened on its own by a parent and by its child (both ends, or only
    the read end, its write end being the parent's): the bytes in it are put back
    once, not once per process."""
    r = run_victim([sys.executable, "-c", FIFO_TWICE.replace("{mode}", mode)])
    r.wait_output("READY\n")
    r.hop()
    child, = descendants(r.pid)  # pauses for ever: ended here, once its parent has
    assert r.finish() == 0
    assert r.output() == "READY\nb'queued once'\n"
    os.kill(child, signal.SIGKILL)  # (orphaned, it came to us, the subreaper)
    reap(child)


SUBREAPER = """
import ctypes, os, signal
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def orphan(*_):  # a child that leaves a grandchild behind, to us
    if os.fork() == 0:
        if os.fork() == 0:
            signal.pause()
        os._exit(0)
    os.wait()


orphan()
signal.signal(signal.SIGUSR1, orphan)
print("READY", flush=True)
while True:
    signal.pause()
"""


def test_a_subreaper_still_takes_in_orphans(run_victim):
    """A root that is a child subreaper, with an orphan it took in: after the move
    the orphan is still its child, and a new orphan comes to it too."""
    r = run_victim([sys.executable, "-c", SUBREAPER])
    r.wait_output("READY\n")
    wait_for(lambda: len(_live_children(r.pid)) == 1, 10, "the first orphan")
    r.hop()
    assert len(_live_children(r.pid)) == 1
    before = set(_live_children(r.pid))
    os.kill(r.pid, signal.SIGUSR1)

    def new_orphan() -> bool:  # the middle child is gone; its child, in pause(), came to us
        new = set(_live_children(r.pid)) - before
        return len(new) == 1 and \
            set(syscalls_of(min(new)).values()) in ({"pause"}, {"rt_sigsuspend"})

    wait_for(new_orphan, 10, "the new orphan to be the subreaper's child")
    r.kill()


def _live_children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if _proc_state(int(k)) not in ("Z", "")]


def _proc_state(pid: int) -> str:
    try:
        return stat_fields(pid)[0]
    except OSError:
        return ""


ORPHAN_LEFT = """
import os, signal, sys, time
child = os.fork()
if child == 0:
    n = 0
    while True:                 # counts on, whatever becomes of its parent
        with open("count.txt", "a") as f:
            f.write(f"{n}\\n")
        n += 1
        time.sleep(0.02)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the parent leaves its child
print("READY", flush=True)
signal.pause()
"""


def test_in_a_pid_namespace_orphans_outlive_their_parent(run_victim):
    """Resumed with --pidns, a child its parent leaves behind runs on (as it would
    on the source), and the namespace ends only when it does."""
    r = run_victim([sys.executable, "-c", ORPHAN_LEFT])
    r.wait_output("READY\n")
    count = r.cwd / "count.txt"
    wait_for(lambda: count.exists() and count.read_text().count("\n") > 3, 10, "counting")
    img = r.dump()
    info = json.loads(run_upmig("resume", "--pidns", "--detach", "--json", str(img)).stdout)
    root, init = info["pid"], info["pidns_init"]
    child = descendants(root)[0]
    os.kill(root, signal.SIGTERM)
    assert reap(root, timeout=10) == 0
    seen = count.read_text().count("\n")
    wait_for(lambda: count.read_text().count("\n") > seen + 5, 10, "the orphan counting on")
    assert os.path.exists(f"/proc/{init}"), "the namespace lives while its orphan does"
    os.kill(child, signal.SIGKILL)
    assert reap(init, timeout=10) == 0, "PID 1 leaves with the last process"


SHARING_VICTIMS = {
    # Anonymous MAP_SHARED memory, a memfd, a POSIX shm object and a POSIX named
    # semaphore shared by a parent and two workers.
    "sharedmem": b"seals 0x6\nsealed 0xe sealed contents\nDONE\n",
    # shmget + fork, both sides writing and reading, turns taken through a SysV
    # semaphore set; a segment removed but attached; ids, key, mode checked at the end.
    "sysvshm": b"segment A ok\nDONE\n",
}


@pytest.mark.parametrize(("name", "seed"), [("sharedmem", 4), ("sharedmem", 5), ("sysvshm", 6),
                                            ("sysvshm", 7)])
def test_shared_memory_stays_shared(run_victim, tmp_path, name, seed):
    """Processes that can only go on together if their memory is still shared: after
    moves they still hand the rounds back and forth, and the report equals an
    unmoved run's."""
    moves_like_a_straight_run(run_victim, tmp_path, [str(build_victim(name))], seed=seed,
                              ends_with=SHARING_VICTIMS[name])


def test_shared_memory_is_stored_once_and_travels(run_victim, tmp_path):
    """Three processes map one 1 MiB shared region: its bytes are in the image once.
    The POSIX shm object travels too: resumed where /dev/shm lacks it (as on another
    machine), it is made again with its bytes and the job ends as an unmoved run."""
    victim = str(build_victim("sharedmem"))
    expected = straight_run([victim, "1200"], tmp_path)
    r = run_victim("sharedmem", "1200")
    r.wait_output("READY\n")
    tree = sorted([r.pid, *descendants(r.pid)])
    img = r.dump()
    info = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    mapped = [v for p in info["processes"] for v in p["vmas"]
              if v["what"] == "[shared anonymous]" and v["size"] == 1 << 20]
    assert len(mapped) == 3 and all(v["stored"] == 0 for v in mapped)
    shmem = [g for g in info["ghosts"] if g["type"] == "shmem"]
    assert len(shmem) == 1 and sorted(shmem[0]["held_by"]) == tree
    assert 256 << 10 <= shmem[0]["stored"] < 1 << 20  # the quarter the parent filled, once
    posix = [g for g in info["ghosts"] if g["type"] == "posix"]
    assert [g["path"] for g in posix] == [f"/dev/shm/upmig-victim-shm-{r.pid}"]
    os.unlink(posix[0]["path"])
    r.resume(img)
    r.ends_as(expected)
    assert not os.path.exists(posix[0]["path"])  # the job unlinked the one made again


def test_copy_on_write_pages_are_stored_once(run_victim):
    """Eight processes of 4 MiB each, half of it still shared with the parent since
    fork: that half is in the image once, and every process's memory checks out
    after the move."""
    r = run_victim("cowtree", "8", "4")
    r.wait_output("READY\n")
    img = r.dump()
    info = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    workers = info["processes"][1:]
    assert len(workers) == 7
    for p in workers:
        assert p["totals"]["same_as_parent_bytes"] >= 2 << 20, p["process"]
    assert info["image_bytes"] < (4 + 7 * 2 + 4) << 20  # not 8 x 4 MiB
    r.resume(img)
    assert r.finish() == 0
    assert r.output().endswith("PASS 8\n"), r.output()


def test_sysv_objects_are_made_again_under_their_ids(run_victim):
    """Dumped, then every SysV object removed (as on another machine): resume makes
    them again with the same ids, key and mode."""
    others = _sysv_rows(0)["sem"]
    r = run_victim("sysvshm", "100000")
    r.wait_output("READY\n")
    before = _sysv_rows(r.pid, others)
    assert len(before["shm"]) == 2 and len(before["sem"]) == 2
    img = r.dump()
    for shmid in before["shm"]:
        subprocess.run(["ipcrm", "-m", str(shmid)], check=False)
    for semid in before["sem"]:
        subprocess.run(["ipcrm", "-s", str(semid)], check=True)
    r.resume(img)
    after = _sysv_rows(r.pid, others)
    assert after == before
    again = json.loads(run_upmig("inspect", "--json", str(r.dump("--leave-running"))).stdout)
    assert sorted(m["id"] for m in again["sysv"]["sem"]) == sorted(before["sem"]), \
        "the next dump finds the sets again, the idle one too"
    r.kill()
    for shmid in after["shm"]:
        subprocess.run(["ipcrm", "-m", str(shmid)], check=False)
    for semid in after["sem"]:
        subprocess.run(["ipcrm", "-s", str(semid)], check=False)


def _sysv_rows(pid: int, others=()) -> dict[str, dict[int, tuple]]:
    """The segments the tree of pid attaches, and the key-less semaphore sets but
    others: id -> (key, mode, size or nsems)."""
    attached = {int(line.split()[4]) for p in ([pid, *descendants(pid)] if pid else [])
                for line in Path(f"/proc/{p}/maps").read_text().splitlines() if "/SYSV" in line}
    rows: dict[str, dict[int, tuple]] = {"shm": {}, "sem": {}}
    for kind in rows:
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            key, ipc_id, mode, size = line.split()[:4]
            if kind == "shm" and int(ipc_id) in attached or \
                    kind == "sem" and int(key) == 0 and int(ipc_id) not in others:
                rows[kind][int(ipc_id)] = (int(key), mode, int(size))
    return rows


def test_a_posix_shm_object_the_original_still_uses_is_not_overwritten(run_victim):
    """Dumped with --leave-running and resumed beside it (--pidns): resume refuses to
    put the image's bytes into the object the running original maps, and leaves
    nothing behind."""
    r = run_victim("sharedmem", "100000")
    r.wait_output("READY\n")
    img = r.dump("--leave-running")
    # (the original goes on writing its stdout: that change is allowed here)
    res = run_upmig("resume", "--pidns", "--detach", "--allow-changed-files", str(img),
                    check=False)
    assert res.returncode != 0
    assert f"/dev/shm/upmig-victim-shm-{r.pid} is in use here by pid" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1, "one line"
    assert os.path.exists(f"/dev/shm/upmig-victim-shm-{r.pid}")
    r.kill()
    os.unlink(f"/dev/shm/upmig-victim-shm-{r.pid}")


SHARED_COUNTER = """
import mmap, os, sys, time
counter = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS
print("READY", flush=True)
time.sleep(60)
"""


def test_memory_shared_with_a_process_outside_the_tree_is_refused(run_victim, tmp_path):
    """The outsider would keep one half: refused, naming both, and left running."""
    r = run_victim([sys.executable, "-c", SHARED_COUNTER])
    r.wait_output("READY\n")
    maps = Path(f"/proc/{r.pid}/maps").read_text().splitlines()
    region = next(m.split()[0] for m in maps if "/dev/zero" in m)
    outsider = subprocess.Popen(  # maps the same shmem file through map_files
        [sys.executable, "-c", "import mmap, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR); m = mmap.mmap(fd, 4096); "
         "print('MAPPED', flush=True); time.sleep(60)", f"/proc/{r.pid}/map_files/{region}"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert outsider.stdout.readline() == "MAPPED\n"
        res = r.refused()
        assert "shares memory (anonymous shared memory) with pid" in res.stderr, res.stderr
        assert str(r.pid) in res.stderr and str(outsider.pid) in res.stderr
        assert os.path.exists(f"/proc/{r.pid}"), "left running"
    finally:
        outsider.kill()
        outsider.wait()


def test_a_sysv_segment_partly_unmapped_where_resume_works(run_victim):
    """A segment attached at 8 GiB with all but its first 64 KiB unmapped: resume's
    scratch area went to the first gap above 8 GiB, inside the segment, and was taken
    away when the segment was attached whole and its gaps unmapped again."""
    r = run_victim("sysvpart")
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 0
    assert r.output() == "READY\nPASS\n", r.output()
