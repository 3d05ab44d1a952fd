"""upmig benchmark: dump and resume processes with 64 MiB, 512 MiB, 1 GiB and 2 GiB
of touched random memory, prove every resumed copy intact, and set the figures
against what this machine itself can move (bench/limits.c); then what sealing
images costs against the 1 GiB dump and resume; then the cost of
threads: a 64 MiB process with 1, 16 and 256 threads; then descriptors: a process
with 10,000 open fds of mixed kinds, and a server with 1,000 established TCP
connections moved with --tcp-established (each client answered afterwards); then a
tree of 100 processes of 8 MiB, half of each copy-on-write shared since fork.

    .venv/bin/python bench/bench.py [--sizes 64,512,1024,2048] [--quick] [--fixed]

Timings are only printed: the exit status is non-zero only when something broke
(a command failed, or a resumed process's memory differs from the original)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BUILD = BENCH / ".build"
UPMIG = Path(sys.executable).with_name("upmig")  # the console script users run
IMAGE_DIR = "/dev/shm"  # tmpfs: the disk must not be what is measured
MIB = 1 << 20
LIMIT_MIB = 1024
FIXED_TARGET = 0.100  # seconds, CLI wall time of dump and of resume -d of a tiny process
FIXED_REPS = 5
THREAD_COUNTS = (1, 16, 256)
THREAD_MIB = 64
PER_THREAD_TARGET = 0.001  # seconds per extra thread, on each side
FD_COUNT, TCP_COUNT = 10_000, 1_000
FD_TARGET = 1.0  # seconds, dump and resume each, for either
VICTIMS = ROOT / "tests" / "victims"
ECHO_SERVER = VICTIMS / "asyncecho.py"
TREE_PROCS, TREE_MIB, TREE_TARGET = 100, 8, 2.0
DUMP_RATIO_TARGET = 0.6  # of process_vm_readv, for 2 GiB
SEAL_MIB = 1024  # sealing is measured against the dump and resume of this size
STREAM_MIB, STREAM_RATIO_TARGET = 1024, 0.35  # dump -o - | resume -, end to end
PR_SET_CHILD_SUBREAPER = 36


class Broken(Exception):
    """Something that must work did not: the run fails, whatever the timings."""


@dataclass
class Trip:
    """One process's dump and resume."""
    dump: dict  # `upmig dump --json`
    resume: dict  # `upmig resume -d --json`
    dump_wall: float
    resume_wall: float


def build(name: str, where: Path = BENCH) -> Path:
    src, out = where / f"{name}.c", BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(out), str(src)],
                       check=True)
    return out


def measure_limits(work: Path, reps: int) -> dict[str, tuple[float, str]]:
    """{key: (GB/s, what)} from bench/limits.c."""
    r = subprocess.run([str(build("limits")), str(LIMIT_MIB), str(reps), str(work)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise Broken(f"limits failed ({r.returncode}): {r.stderr.strip()}")
    limits = {}
    for line in r.stdout.splitlines():
        key, gbs, what = line.split(" ", 2)
        limits[key] = (float(gbs), what)
    return limits


def upmig(*args: str) -> tuple[dict, float]:
    """Run the upmig command line (with --json); its answer and its wall time."""
    out, wall = upmig_text(*args)
    return json.loads(out), wall


def upmig_text(*args: str) -> tuple[str, float]:
    """Run the upmig command line; what it printed and its wall time."""
    began = time.perf_counter()
    r = subprocess.run([str(UPMIG), *args], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - began
    if r.returncode != 0:
        raise Broken(f"upmig {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout, wall


def wait_line(path: Path, prefixes: tuple[str, ...], skip: int, alive: Callable[[], bool],
              timeout: float = 120.0) -> str:
    """The first complete line after the first `skip` lines that starts with a prefix;
    gives up at once if alive() says the process writing it has died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text(errors="replace")
        for line in text.split("\n")[skip:-1]:
            if line.startswith(prefixes):
                return line
        if not alive():
            raise Broken(f"{path.stem} died before saying {'/'.join(prefixes)}: {text!r}")
        time.sleep(0.01)
    raise Broken(f"timed out waiting for {'/'.join(prefixes)} in {path.name}")


def is_running(pid: int) -> bool:
    """Reaps pid if it has ended: only for our own children."""
    return os.waitpid(pid, os.WNOHANG)[0] == 0


def kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def clean_up(original: subprocess.Popen, resumed: int | None, *files: Path) -> None:
    """Whatever happened on a trip: none of its processes or files is left."""
    original.kill()
    original.wait()
    if resumed is not None:
        kill_and_reap(resumed)
    for f in files:
        f.unlink(missing_ok=True)


def migrate(hog_bin: Path, mib: int, work: Path, threads: int = 1) -> Trip:
    """Start a hog of `mib` MiB, dump it (killing it), resume it, check its memory.
    Whatever happens, no process and no image is left behind."""
    out, img = work / f"hog{mib}.out", work / f"hog{mib}.upmig"
    resumed = None
    with open(out, "wb") as f:
        hog = subprocess.Popen([str(hog_bin), str(mib), str(threads)], stdin=subprocess.DEVNULL,
                               stdout=f, stderr=subprocess.STDOUT, cwd=work)
    try:
        ready = wait_line(out, ("READY",), 0, lambda: hog.poll() is None)
        dumped, dump_wall = upmig("dump", str(hog.pid), "-o", str(img), "--json")
        # The original must be gone before resume: its PID is wanted back, and its
        # memory would otherwise sit beside the image and the resumed copy.
        if hog.wait(timeout=30) != -signal.SIGKILL:
            raise Broken(f"the dumped hog ended with {hog.returncode}, not SIGKILL")
        back, resume_wall = upmig("resume", "-d", "--json", str(img))
        resumed = back["pid"]  # our child: we are its subreaper
        img.unlink()  # free the tmpfs pages before the check walks all memory
        os.kill(resumed, signal.SIGUSR1)
        said = wait_line(out, ("OK", "BAD"), 1, lambda: is_running(resumed))
        if said != "OK" + ready[len("READY"):]:
            raise Broken(f"{mib} MiB hog after resume: {said!r}, before dump: {ready!r}")
        if back["threads"] != threads or dumped["threads"] != threads:
            raise Broken(f"{threads}-thread hog: dumped {dumped['threads']} threads, "
                         f"resumed {back['threads']}")
        return Trip(dumped, back, dump_wall, resume_wall)
    finally:
        clean_up(hog, resumed, img, out)


def fixed_trip(work: Path) -> tuple[float, float]:
    """CLI wall times of `upmig dump PID -o IMAGE` and `upmig resume -d IMAGE` of a
    sleeping `sleep`, the tiniest process there is; the resumed one must sleep on."""
    img = work / "sleep.upmig"
    victim = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    resumed = None
    try:
        wait_asleep(victim.pid)
        _, dump_wall = upmig_text("dump", str(victim.pid), "-o", str(img))
        if victim.wait(timeout=30) != -signal.SIGKILL:
            raise Broken(f"the dumped sleep ended with {victim.returncode}, not SIGKILL")
        out, resume_wall = upmig_text("resume", "-d", str(img))
        resumed = int(out)
        wait_asleep(resumed)
        if Path(f"/proc/{resumed}/cmdline").read_bytes().split(b"\0")[:2] != [b"sleep", b"1000"]:
            raise Broken(f"resumed pid {resumed} is not the sleep that was dumped")
        return dump_wall, resume_wall
    finally:
        clean_up(victim, resumed, img)


def wait_asleep(pid: int, timeout: float = 10.0) -> None:
    """Until pid sleeps (state S in /proc/PID/stat)."""
    end = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
        if time.monotonic() > end:
            raise Broken(f"pid {pid} never went to sleep")
        time.sleep(0.001)


def fixed_rows(work: Path) -> list[str]:
    loads = [os.getloadavg()[0]]
    trips = [fixed_trip(work) for _ in range(FIXED_REPS)]
    loads.append(os.getloadavg()[0])
    dump, resume = (statistics.median(t[i] for t in trips) for i in (0, 1))
    return [
        f"| fixed cost, tiny process (`sleep`), CLI wall time, median of {FIXED_REPS} "
        "| time | target |",
        "|:---|---:|---:|",
        f"| `upmig dump PID -o IMAGE` | {dump * 1000:.0f} ms "
        f"| < {FIXED_TARGET * 1000:.0f} ms {mark(dump < FIXED_TARGET)} |",
        f"| `upmig resume -d IMAGE` | {resume * 1000:.0f} ms "
        f"| < {FIXED_TARGET * 1000:.0f} ms {mark(resume < FIXED_TARGET)} |",
        "",
        f"load average (1 min) {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs "
        "while these ran: other work on the machine shows here first.",
    ]


def gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def size_row(mib: int, trips: list[Trip], limits: dict) -> tuple[str, dict]:
    """A markdown table row for one size (medians over its trips), and its figures."""
    def med(field):
        return statistics.median(field(t) for t in trips)

    data = med(lambda t: t.dump["data_bytes"])
    image = med(lambda t: t.dump["image_bytes"])
    touched = mib * MIB
    dump_s, resume_s = med(lambda t: t.dump["seconds"]), med(lambda t: t.resume["seconds"])
    dump_gbs, resume_gbs = gbs(data, dump_s), gbs(data, resume_s)
    fig = {"dump_x": dump_gbs / limits["readv"][0], "resume_x": resume_gbs / limits["writev"][0],
           "dump_s": dump_s, "resume_s": resume_s}
    image_ok = image <= touched * 1.01 + 64 * 1024
    same = all(t.resume["same_pid"] for t in trips)
    row = (f"| {mib} MiB | {dump_s:.3f} s | {dump_gbs:.2f} | {fig['dump_x']:.2f}× "
           f"| {med(lambda t: t.dump['frozen_seconds']):.3f} s | {resume_s:.3f} s "
           f"| {resume_gbs:.2f} | {fig['resume_x']:.2f}× "
           f"| {image / touched:.4f} {mark(image_ok)} | ✓{' same pid' if same else ''} |")
    return row, fig


def stream_trip(hog_bin: Path, mib: int, work: Path) -> tuple[float, dict, dict]:
    """`upmig dump PID -o - | upmig resume -d -` of a hog of mib MiB: the pipeline's
    wall time until the resumed process runs, dump's and resume's --json; the
    resumed hog's memory is checked like a file trip's."""
    out = work / f"stream{mib}.out"
    resumed = None
    with open(out, "wb") as f:
        hog = subprocess.Popen([str(hog_bin), str(mib), "1"], stdin=subprocess.DEVNULL,
                               stdout=f, stderr=subprocess.STDOUT, cwd=work)
    try:
        ready = wait_line(out, ("READY",), 0, lambda: hog.poll() is None)
        # The dump kills the hog while resume waits for its PID: reap it meanwhile.
        reaper = threading.Thread(target=hog.wait, daemon=True)
        reaper.start()
        began = time.perf_counter()
        dump = subprocess.Popen([str(UPMIG), "dump", str(hog.pid), "-o", "-", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        back = subprocess.Popen([str(UPMIG), "resume", "-d", "--json", "-"], stdin=dump.stdout,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        dump.stdout.close()  # the resumer's now
        said_back, err_back = back.communicate(timeout=600)
        wall = time.perf_counter() - began
        said_dump = dump.stderr.read()
        dump.stderr.close()
        if dump.wait(timeout=60) or back.returncode:
            raise Broken(f"dump | resume of {mib} MiB failed ({dump.returncode}, "
                         f"{back.returncode}): {said_dump!r} {err_back!r}")
        reaper.join(timeout=30)
        if hog.returncode != -signal.SIGKILL:
            raise Broken(f"the streamed hog ended with {hog.returncode}, not SIGKILL")
        resumed = json.loads(said_back)["pid"]
        os.kill(resumed, signal.SIGUSR1)
        said = wait_line(out, ("OK", "BAD"), 1, lambda: is_running(resumed))
        if said != "OK" + ready[len("READY"):]:
            raise Broken(f"{mib} MiB hog after a streamed move: {said!r}, before: {ready!r}")
        return wall, json.loads(said_dump), json.loads(said_back)
    finally:
        clean_up(hog, resumed, out)


def stream_rows(hog: Path, work: Path, limits: dict, reps: int) -> list[str]:
    trips = [stream_trip(hog, STREAM_MIB, work) for _ in range(reps)]
    wall = statistics.median(t[0] for t in trips)
    data = statistics.median(t[1]["data_bytes"] for t in trips)
    x = gbs(data, wall) / limits["readv"][0]
    return [
        "| image through a pipe, no file | end to end | GB/s | × readv | dump | resume |",
        "|:---|---:|---:|---:|---:|---:|",
        f"| `upmig dump PID -o - \\| upmig resume -d -`, {STREAM_MIB} MiB "
        f"| {wall:.3f} s | {gbs(data, wall):.2f} | {x:.2f}× {mark(x >= STREAM_RATIO_TARGET)} "
        f"| {statistics.median(t[1]['seconds'] for t in trips):.3f} s "
        f"| {statistics.median(t[2]['seconds'] for t in trips):.3f} s |",
        "",
        f"End to end: wall time from starting both commands to resume's return with the "
        f"process running, {'median of ' + str(reps) if reps > 1 else 'one run'}; target "
        f"≥ {STREAM_RATIO_TARGET}× process_vm_readv. On one machine the hog's PID is freed "
        "only when the dump has written its last byte, so resume reads the rest of the "
        "stream into memory before building (between machines, or with --pidns, it fills "
        "the process as the stream comes); its time includes waiting for the dump.",
    ]


def seal_rows(work: Path, figs: dict, reps: int) -> list[str]:
    """What sealing costs, set against the dump and resume of 1 GiB measured above:
    every frame's tag (GMAC) is made by dump's copy threads as they write, in place
    of the unkeyed XXH64 frames had before, and checked by resume on every CPU."""
    import mmap

    from upmig import _native, image, keys

    key = keys.derive("bench", os.urandom(32))
    salt = os.urandom(16)
    frame_key = key.frame_key(salt)
    path = work / "seal.upmig"
    with open(path, "wb") as f:  # an image of 1 MiB data frames (a made-up record layout)
        f.write(image.header(key, salt))
        block = os.urandom(MIB)
        for _ in range(SEAL_MIB):
            f.write(image.frame(frame_key, f.tell(), image.DATA, block))
        f.write(image.frame(frame_key, f.tell(), image.TRAILER, b""))

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def check(threads: int) -> None:
        rc, _ = _native.verify_frames(data, image.HEADER.size, frame_key, image.MAX_PAYLOAD,
                                      threads)
        if rc < 0:
            raise Broken(f"the made-up image does not verify ({rc})")

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
            one = best(lambda: check(1))
            every = best(lambda: check(0))
            xxh = best(lambda: _native.xxh64(data))
    finally:
        path.unlink()
    fig = figs.get(SEAL_MIB)
    threads = _native.copy_threads(SEAL_MIB * MIB)
    dump_extra = (one - xxh) / threads  # dump's copy threads tag instead of hashing

    def share(extra: float, of: str) -> str:
        return f"{extra / fig[of] * 100:.0f}%" if fig else "n/a"

    return [
        f"| sealing {SEAL_MIB} MiB (best of {reps}) | time | GB/s | share |",
        "|:---|---:|---:|---:|",
        f"| GMAC tags, one thread | {one:.3f} s | {gbs(SEAL_MIB * MIB, one):.2f} | |",
        f"| XXH64, one thread (what the frames had before) | {xxh:.3f} s "
        f"| {gbs(SEAL_MIB * MIB, xxh):.2f} | |",
        f"| dump: extra for tags over XXH64, over {threads} copy threads | {dump_extra:.3f} s "
        f"| | {share(dump_extra, 'dump_s')} of the {SEAL_MIB} MiB dump |",
        f"| resume: the tags checked on every CPU, before anything is built | {every:.3f} s "
        f"| {gbs(SEAL_MIB * MIB, every):.2f} | |",
        f"| resume: extra for that over XXH64 on one thread (before) | {every - xxh:.3f} s "
        f"| | {share(every - xxh, 'resume_s')} of the {SEAL_MIB} MiB resume |",
    ]


def thread_rows(hog: Path, work: Path, reps: int) -> list[str]:
    """Dump and resume of a 64 MiB hog with 1, 16 and 256 threads; the cost of each
    thread beyond the first is the difference from the 1-thread hog, per thread."""
    med: dict[int, dict[str, float]] = {}
    for n in THREAD_COUNTS:
        note(f"{THREAD_MIB} MiB, {n} thread(s): {reps} trip(s)...")
        trips = [migrate(hog, THREAD_MIB, work, n) for _ in range(reps)]
        med[n] = {k: statistics.median(f(t) for t in trips) for k, f in (
            ("dump", lambda t: t.dump["seconds"]), ("freeze", lambda t: t.dump["freeze_seconds"]),
            ("frozen", lambda t: t.dump["frozen_seconds"]),
            ("resume", lambda t: t.resume["seconds"]))}
    rows = ["| threads | freeze | frozen | dump | per thread | resume | per thread |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    one = med[1]
    for n in THREAD_COUNTS:
        m = med[n]
        cells = [f"{m['freeze'] * 1000:.1f} ms", f"{m['frozen'] * 1000:.0f} ms",
                 f"{m['dump'] * 1000:.0f} ms"]
        for side in ("dump", "resume"):
            if side == "resume":
                cells.append(f"{m['resume'] * 1000:.0f} ms")
            if n == 1:
                cells.append("")
                continue
            per = (m[side] - one[side]) / (n - 1)
            cells.append(f"{per * 1000:.2f} ms {mark(per < PER_THREAD_TARGET)}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return rows + ["", f"{THREAD_MIB} MiB touched in all; extra threads wait in pause(). "
                   "freeze: seizing and stopping every thread; frozen: until released; "
                   "per thread: (time - time with 1 thread) / (threads - 1), target "
                   f"< {PER_THREAD_TARGET * 1000:.0f} ms on each side; median of {reps}."]


def fd_trip(work: Path) -> tuple[dict, dict]:
    """A fdhog with FD_COUNT fds: dumped, resumed, and every fd checked by itself."""
    return checked_trip(work, [str(build("fdhog")), str(FD_COUNT)], signal.SIGUSR1,
                        ("OK", "BAD"), f"OK {FD_COUNT}")


def checked_trip(work: Path, argv: list[str], ask: int, answers: tuple[str, str], good: str
                 ) -> tuple[dict, dict]:
    """Run argv until it says READY; dump it, resume it (once its whole tree is gone
    and reaped), send it `ask` and wait for one of its answers, which must be good."""
    name = Path(argv[0]).name
    out, img = work / f"{name}.out", work / f"{name}.upmig"
    resumed = None
    with open(out, "wb") as f:
        root = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, cwd=work)
    try:
        wait_line(out, ("READY",), 0, lambda: root.poll() is None)
        kids = Path(f"/proc/{root.pid}/task/{root.pid}/children").read_text().split()
        dumped, _ = upmig("dump", str(root.pid), "-o", str(img), "--json")
        root.wait(timeout=30)
        while any(os.path.exists(f"/proc/{k}") for k in kids):
            reap_orphans()  # they come to us: their PIDs are wanted back
            time.sleep(0.001)
        back, _ = upmig("resume", "-d", "--json", str(img))
        resumed = back["pid"]
        os.kill(resumed, ask)
        said = wait_line(out, answers, 1, lambda: is_running(resumed))
        if said != good:
            raise Broken(f"{name} after resume: {said!r}")
        return dumped, back
    finally:
        clean_up(root, resumed, img)
        reap_orphans()


def tcp_trip(work: Path) -> tuple[dict, dict]:
    """The asyncio echo server with TCP_COUNT clients, each answered before and after."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * TCP_COUNT)), hard))
    out, img = work / "echo.out", work / "echo.upmig"
    resumed, clients = None, []
    with open(out, "wb") as f:
        srv = subprocess.Popen([sys.executable, "-S", str(ECHO_SERVER)],
                               stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                               cwd=work)
    try:
        port = int(wait_line(out, ("READY",), 0, lambda: srv.poll() is None).split()[1])
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30)
                   for _ in range(TCP_COUNT)]
        _ask_all(clients, b"before", b"1")
        dumped, _ = upmig("dump", str(srv.pid), "-o", str(img), "--tcp-established", "--json")
        srv.wait(timeout=30)
        back, _ = upmig("resume", "-d", "--json", str(img))
        resumed = back["pid"]
        _ask_all(clients, b"after", b"2")
        return dumped, back
    finally:
        for c in clients:
            c.close()
        clean_up(srv, resumed, img)


def _ask_all(clients: list, word: bytes, n: bytes) -> None:
    for i, c in enumerate(clients):
        c.sendall(b"%s %d\n" % (word, i))
    for i, c in enumerate(clients):
        want = b"%s %s %d\n" % (n, word, i)
        got = b""
        while len(got) < len(want):
            chunk = c.recv(100)
            if not chunk:
                raise Broken(f"client {i}: the server closed the connection")
            got += chunk
        if got != want:
            raise Broken(f"client {i} got {got!r}, wanted {want!r}")


def fd_rows(work: Path) -> list[str]:
    rows = ["| process | dump | frozen | resume | target |", "|:---|---:|---:|---:|---:|"]
    for what, trip in ((f"{FD_COUNT:,} fds of mixed kinds", fd_trip),
                       (f"{TCP_COUNT:,} established TCP connections", tcp_trip)):
        note(f"{what}...")
        dumped, back = trip(work)
        ok = dumped["seconds"] < FD_TARGET and back["seconds"] < FD_TARGET
        rows.append(f"| {what} | {dumped['seconds']:.3f} s | {dumped['frozen_seconds']:.3f} s "
                    f"| {back['seconds']:.3f} s | < {FD_TARGET:.0f} s each {mark(ok)} |")
    return rows + ["", "fds: per 10, 4 regular files each opened on its own, a pipe holding "
                   "bytes, an eventfd, a unix socket pair with data queued, a dup; the "
                   "resumed process checks every one. TCP: tests/victims/asyncecho.py; "
                   "every client gets its answer on the same connection after resume."]


def tree_trip(work: Path) -> tuple[dict, dict]:
    """TREE_PROCS processes of TREE_MIB MiB each, the second half of each worker's
    written since fork, the first still shared copy-on-write with the parent:
    dumped, resumed, and every process's memory checked by itself."""
    return checked_trip(work, [str(build("cowtree", VICTIMS)), str(TREE_PROCS), str(TREE_MIB)],
                        signal.SIGTERM, ("PASS", "FAIL"), f"PASS {TREE_PROCS}")


def reap_orphans() -> None:
    """Reap every process reparented to us (we are a subreaper) that has ended."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def tree_rows(work: Path) -> list[str]:
    note(f"a tree of {TREE_PROCS} processes x {TREE_MIB} MiB...")
    dumped, back = tree_trip(work)
    total = dumped["seconds"] + back["seconds"]
    touched = TREE_PROCS * TREE_MIB * MIB
    unshared = (TREE_MIB + (TREE_PROCS - 1) * TREE_MIB / 2) * MIB
    return ["| tree | dump | frozen | resume | total | image | image / unshared memory |",
            "|:---|---:|---:|---:|---:|---:|---:|",
            f"| {TREE_PROCS} processes × {TREE_MIB} MiB | {dumped['seconds']:.3f} s "
            f"| {dumped['frozen_seconds']:.3f} s | {back['seconds']:.3f} s "
            f"| {total:.3f} s {mark(total < TREE_TARGET)} | {dumped['image_bytes'] / MIB:.0f} MiB "
            f"of {touched / MIB:.0f} MiB | {dumped['image_bytes'] / unshared:.3f} "
            f"{mark(dumped['image_bytes'] < unshared * 1.05)} |",
            "", f"tests/victims/cowtree.c: a parent fills {TREE_MIB} MiB, forks "
            f"{TREE_PROCS - 1} workers that each rewrite the second half of theirs; the first "
            "half stays copy-on-write shared and must be stored once (image ≈ "
            f"{unshared / MIB:.0f} MiB). Every process checks all its memory after resume. "
            f"total: dump + resume, upmig's own timings; target < {TREE_TARGET:.0f} s."]


def run(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    """Every measurement; (report lines, failures)."""
    if args.fixed:
        note(f"fixed cost: {FIXED_REPS} trips of a sleep...")
        return [f"upmig {upmig_version()} on {machine()}", "", *fixed_rows(work)], []
    hog = build("hog")
    failures: list[str] = []

    note(f"measuring this machine's limits ({LIMIT_MIB} MiB, best of {args.limit_reps})...")
    limits = measure_limits(work, args.limit_reps)
    note(f"fixed cost: {FIXED_REPS} trips of a sleep...")
    fixed = fixed_rows(work)

    rows, figs = [], {}
    for mib in args.sizes:
        note(f"{mib} MiB: {args.reps} trip(s)...")
        try:
            row, figs[mib] = size_row(mib, [migrate(hog, mib, work) for _ in range(args.reps)],
                                      limits)
        except (Broken, subprocess.TimeoutExpired) as e:
            failures.append(f"{mib} MiB: {e}")
            row = f"| {mib} MiB | FAILED |" + " |" * 8
        rows.append(row)

    seals = seal_rows(work, figs, max(args.reps, 2))

    note(f"{STREAM_MIB} MiB through a pipe: {args.reps} trip(s)...")
    try:
        streams = stream_rows(hog, work, limits, args.reps)
    except (Broken, subprocess.TimeoutExpired) as e:
        failures.append(f"stream: {e}")
        streams = [f"stream: FAILED ({e})"]

    try:
        threads = thread_rows(hog, work, args.reps)
    except (Broken, subprocess.TimeoutExpired) as e:
        failures.append(f"threads: {e}")
        threads = [f"threads: FAILED ({e})"]

    try:
        fds = fd_rows(work)
    except (Broken, subprocess.TimeoutExpired) as e:
        failures.append(f"descriptors: {e}")
        fds = [f"descriptors: FAILED ({e})"]

    try:
        trees = tree_rows(work)
    except (Broken, subprocess.TimeoutExpired) as e:
        failures.append(f"tree: {e}")
        trees = [f"tree: FAILED ({e})"]

    reps = f"median of {args.reps}" if args.reps > 1 else "one run"
    out = [
        f"upmig {upmig_version()} on {machine()}",
        "",
        "| touched memory | dump | dump GB/s | × readv | frozen | resume | resume GB/s "
        "| × writev | image / touched | intact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
        *rows,
        "",
        f"Random content, image on tmpfs ({IMAGE_DIR}); {reps} per size. dump and resume are "
        "upmig's own timings (--json `seconds`); GB/s = data_bytes / seconds (GB = 1e9 B); "
        "× readv and × writev are that throughput over process_vm_readv (reused buffer) and "
        "process_vm_writev (unpopulated memory) below. image / touched target: "
        "≤ 1.01 + 64 KiB. intact: the resumed hog re-read all its memory and found every word.",
        "",
        *fixed,
        "",
        f"| machine limit ({LIMIT_MIB} MiB, best of {args.limit_reps}, bench/limits.c) "
        "| GB/s |",
        "|:---|---:|",
        *(f"| {what} | {v:.2f} |" for v, what in limits.values()),
        "",
        *seals,
        "",
        *streams,
        "",
        *threads,
        "",
        *fds,
        "",
        *trees,
    ]
    if 2048 in figs:
        x = figs[2048]["dump_x"]
        out += ["", f"dump of 2 GiB: {x:.2f}× process_vm_readv "
                    f"(target ≥ {DUMP_RATIO_TARGET}×) {mark(x >= DUMP_RATIO_TARGET)}"]
    return out, failures


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def upmig_version() -> str:
    from upmig import __version__

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return __version__ + (f" (git {head.stdout.strip()})" if head.returncode == 0 else "")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Linux {platform.release()}, {cpu}, {os.cpu_count()} CPUs, "
            f"{ram:.0f} GiB RAM")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,512,1024,2048",
                   help="touched memory sizes in MiB, comma-separated "
                        "(default 64,512,1024,2048)")
    p.add_argument("--quick", action="store_true",
                   help="64 MiB only and fewer repetitions, for a fast look")
    p.add_argument("--fixed", action="store_true",
                   help="only the fixed cost: dump and resume of a tiny process")
    a = p.parse_args()
    a.command = " ".join([os.path.relpath(sys.executable, ROOT),
                          os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    try:
        a.sizes = [int(s) for s in ("64" if a.quick else a.sizes).split(",")]
    except ValueError:
        a.sizes = []
    if not a.sizes or min(a.sizes) <= 0:
        p.error("--sizes takes positive MiB numbers separated by commas, e.g. 64,512")
    a.reps, a.limit_reps = (1, 2) if a.quick else (3, 3)
    return a


def main() -> int:
    args = parse_args()
    # SIGTERM unwinds like ^C, through every finally: no hog or image is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Processes resumed with --detach are reparented to us, so we can reap them
    # (and their PIDs are free again at once for the next resume).
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    work = Path(tempfile.mkdtemp(prefix="upmig-bench-", dir=IMAGE_DIR))
    key = work / "key"  # images sealed with a key of the run's own (not the machine's)
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    os.environ["UPMIG_KEY_FILE"] = str(key)
    try:
        report, failures = run(args, work)
    except (Broken, subprocess.TimeoutExpired) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"$ {args.command}\n")
    print("\n".join(report))
    for f in failures:
        print(f"\nFAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
