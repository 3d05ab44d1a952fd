"""The image as a stream: `dump -o -` writes it to a pipe, `resume -` and `inspect -`
read it from one, with no file anywhere; a stream cut short, changed or gone is
refused before any process runs, and the source is left as it was."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess

from conftest import UPMIG, descendants, run_upmig, wait_for
from upmig import _proc


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("upmig: "), stderr
    return lines[0]


def _runs_untraced(r) -> None:
    def ok() -> bool:
        with open(f"/proc/{r.pid}/status") as f:
            st = _proc.parse_status(f.read())
        return st["TracerPid"] == "0" and st["State"].startswith("S")

    wait_for(ok, 10, f"pid {r.pid} sleeping and untraced")
    assert r.proc.poll() is None, r.output()


def _untouched(r) -> None:
    """r's process runs on as it was: untraced, and its own check passes."""
    _runs_untraced(r)
    os.kill(r.pid, signal.SIGTERM)
    assert r.proc.wait(timeout=10) == 0
    assert r.output() == "READY\nPASS\n"


def _stream_of(r, *flags: str) -> bytes:
    """The image of r's process as dump writes it to a pipe."""
    got = subprocess.run([*UPMIG, "dump", str(r.pid), "-o", "-", *flags], capture_output=True,
                         timeout=60)
    assert got.returncode == 0, got.stderr.decode()
    return got.stdout


def _resume_from(data: bytes, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*UPMIG, "resume", *flags, "-"], input=data, capture_output=True,
                          timeout=60)


def test_dump_into_resume_through_a_pipe(run_victim):
    r = run_victim("memory")
    r.wait_output("READY\n")
    r.cmdline = open(f"/proc/{r.pid}/cmdline", "rb").read()
    before = set(os.listdir(r.cwd))
    dump = subprocess.Popen([*UPMIG, "dump", str(r.pid), "-o", "-", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r.resumer = subprocess.Popen([*UPMIG, "resume", "-"], stdin=dump.stdout,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dump.stdout.close()  # the resumer's now
    assert dump.wait(timeout=60) == 0
    said = json.loads(dump.stderr.read())  # stdout was the image: the result goes to stderr
    assert said["image"] == "-" and said["data_bytes"] > 32 << 20
    assert r.proc.wait(timeout=10) == -signal.SIGKILL  # the original is gone...
    wait_for(r._alive_again, 20, "the resumed process")  # ...and the same pid runs again
    assert set(os.listdir(r.cwd)) == before  # no image file anywhere
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"  # it re-read all its memory and found it intact


def _others_like(r) -> list[int]:
    """Processes of ours (we are the subreaper: a failed resume's orphans would come to
    us) but r's own, running r's program or the stub: what a failed resume would
    have left behind."""
    mine = open(f"/proc/{r.pid}/cmdline", "rb").read()
    found = []
    for pid in descendants(os.getpid()):
        if pid != r.pid:
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if cmd == mine or exe.endswith("upmig-stub"):
                found.append(pid)
    return found


def test_a_stream_cut_short_is_refused_and_the_source_runs_on(run_victim):
    r = run_victim("memory")
    r.wait_output("READY\n")
    data = _stream_of(r, "--leave-running")
    # In the header, in the records, in the page data (the process is half built
    # then), in the trailer.
    for cut in (10, 4000, len(data) // 2, len(data) - 1):
        res = _resume_from(data[:cut], "--new-pids")
        assert res.returncode == 206, res.stderr  # resume's own 6
        assert "stdin: image is truncated" in _one_line(res.stderr.decode())
        assert _others_like(r) == []
    _untouched(r)


def test_a_changed_stream_is_refused_by_its_seal(run_victim):
    r = run_victim("memory")
    r.wait_output("READY\n")
    clean = _stream_of(r, "--leave-running")
    for at in (200, len(clean) // 2):  # a record; page data, met with a half-built process
        data = bytearray(clean)
        data[at] ^= 1
        res = _resume_from(bytes(data), "--new-pids")
        assert res.returncode == 206, res.stderr  # resume's own 6
        assert "does not match its seal" in _one_line(res.stderr.decode())
        assert _others_like(r) == []
    _runs_untraced(r)


def test_a_stream_is_read_up_to_its_trailer_and_no_further(run_victim, tmp_path):
    """What follows an image in a stream is not upmig's (a socket may carry more)."""
    r = run_victim("counter")
    r.wait_output("READY\n")
    img = tmp_path / "img.upmig"
    img.write_bytes(_stream_of(r, "--leave-running"))
    sh = f"(cat {img}; echo after) | sh -c '{' '.join(UPMIG)} inspect - >/dev/null && cat'"
    got = subprocess.run(["sh", "-c", sh], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout == "after\n"


def test_inspect_reads_a_stream_and_a_redirected_file(run_victim, tmp_path):
    r = run_victim("counter")
    r.wait_output("READY\n")
    data = _stream_of(r, "--leave-running")
    piped = subprocess.run([*UPMIG, "inspect", "--json", "-"], input=data, capture_output=True,
                           timeout=60, check=True)
    img = tmp_path / "img.upmig"
    img.write_bytes(data)
    with open(img, "rb") as f:  # stdin a regular file: mapped like any image file
        redirected = subprocess.run([*UPMIG, "inspect", "--json", "-"], stdin=f,
                                    capture_output=True, timeout=60, check=True)
    by_path = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    for out in (piped, redirected):
        got = json.loads(out.stdout)
        assert got["image"] == "stdin"
        assert got["processes"] == by_path["processes"]
        assert got["seal"]["sealed_by_my_key"] is True


def test_a_reader_that_goes_away_leaves_the_process_running(run_victim):
    r = run_victim("memory")  # 32 MiB: far more than a pipe holds
    r.wait_output("READY\n")
    dump = subprocess.Popen([*UPMIG, "dump", str(r.pid), "-o", "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    dump.stdout.read(4096)
    dump.stdout.close()  # the reader is gone: the kill must not happen
    assert dump.wait(timeout=60) not in (0, 5)
    assert "Broken pipe" in _one_line(dump.stderr.read().decode())
    _untouched(r)


def test_no_image_is_written_to_a_terminal(run_victim):
    r = run_victim("counter")
    r.wait_output("READY\n")
    main, tty = pty.openpty()
    try:
        res = subprocess.run([*UPMIG, "dump", str(r.pid), "-o", "-"], stdout=tty,
                             stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(tty)
        os.close(main)
    assert res.returncode != 0
    assert "terminal" in _one_line(res.stderr.decode())
    _runs_untraced(r)
