"""How upmig ends: never a partial image, even when killed with SIGKILL; a signal
after the commit never turns a finished dump into a failure or into death by that
signal; SIGINT, from the first moment on, gives one line and exit status 130;
resume's own failures are told from its process's exit status."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import upmig.image
from conftest import ROOT, UPMIG, wait_for
from upmig import newfile


def _writing_into(pid: int, where: Path) -> bool:
    """pid holds a file in where open (the nameless image being written)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{where}/"):
                return True
        except OSError:
            pass
    return False


def _dump(pid: int, img: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([*UPMIG, "dump", str(pid), "-o", str(img), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _caught(pid: int, sig: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(text.split("SigCgt:\t", 1)[1].split()[0], 16)
    return bool(mask >> (sig - 1) & 1)


def test_sigkill_while_writing_leaves_no_file(run_victim, tmp_path):
    r = run_victim("memory")
    r.wait_output("READY\n")
    out = tmp_path / "out"
    out.mkdir()
    p = _dump(r.pid, out / "x.upmig", "--leave-running")
    try:
        wait_for(lambda: _writing_into(p.pid, out) or p.poll() is not None, 30,
                 "the dump to write its image")
        assert p.poll() is None, "the dump ended before it could be caught writing"
        p.kill()
    finally:
        p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert os.listdir(out) == [], "a dump killed while writing left a file behind"


def test_partials_of_dead_writers_are_removed(tmp_path, monkeypatch):
    """Where O_TMPFILE is refused the image has a hidden name while it is written:
    the next image written into that directory removes it if its writer is gone."""
    real_open = os.open

    def no_tmpfile(path, flags, mode=0o777, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", no_tmpfile)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".old.upmig.partial-{gone.pid}"
    stale.write_bytes(b"half an image")
    mine = tmp_path / f".mine.upmig.partial-{os.getpid()}"  # a live writer's: kept
    with newfile.NewFile(str(tmp_path / "new.upmig")) as f:
        assert f.named
        os.write(f.fd, b"whole")
        assert not stale.exists()
        f.commit()
    assert (tmp_path / "new.upmig").read_bytes() == b"whole"
    assert sorted(os.listdir(tmp_path)) == ["new.upmig"] + ([mine.name] if mine.exists()
                                                             else [])
    with newfile.NewFile(str(tmp_path / "never.upmig")) as f:
        os.write(f.fd, b"dropped")
    assert sorted(os.listdir(tmp_path)) == ["new.upmig"]


@pytest.mark.parametrize("leave", ["--leave-running", None])
def test_signal_after_the_commit_is_not_a_failure(run_victim, tmp_path, leave):
    """SIGTERM as soon as the image is at its path: the dump has happened, and upmig
    says so (exit 0, or 130 naming the image written), never dying by the signal."""
    outcomes = []
    for i in range(6):
        r = run_victim("memory")
        r.wait_output("READY\n")
        img = tmp_path / f"t{i}.upmig"
        p = _dump(r.pid, img, *([leave] if leave else []))
        try:
            wait_for(lambda p=p, img=img: img.exists() or p.poll() is not None, 60,
                     "the image to be committed")
            p.send_signal(signal.SIGTERM)
        finally:
            _, err = p.communicate(timeout=30)
        outcomes.append(p.returncode)
        assert p.returncode in (0, 130), (p.returncode, err)
        assert "Traceback" not in err and err.count("\n") <= 1, err
        if p.returncode == 130:
            assert f"after the image {img} was written" in err
        upmig.image.load(str(img)).close()
        if leave:
            r.kill()
        else:
            wait_for(lambda r=r: not Path(f"/proc/{r.pid}").exists() or
                     Path(f"/proc/{r.pid}/stat").read_text().split(") ")[1][0] in "ZX",
                     20, "the dumped process to be killed")
            r.proc.wait(timeout=10)
    assert -signal.SIGTERM not in outcomes


def test_sigint_from_the_start_gives_one_line_and_130(run_victim, tmp_path):
    """^C at every moment of a dump's start: the stop handlers are in place before
    the heavy imports, so each is one line and 130 (or a finished dump)."""
    r = run_victim("sleeper")
    r.wait_output("READY\n")
    seen_130 = 0
    for i, delay in enumerate(x / 1000 for x in range(0, 150, 10)):
        img = tmp_path / f"s{i}.upmig"
        p = _dump(r.pid, img, "--leave-running")
        try:
            wait_for(lambda p=p: _caught(p.pid, signal.SIGTERM) or p.poll() is not None, 20,
                     "upmig's handlers")
            time.sleep(delay)  # the thing under test: ^C from the first moment to mid-dump
            p.send_signal(signal.SIGINT)
        finally:
            _, err = p.communicate(timeout=30)
        assert "Traceback" not in err, err
        assert p.returncode in (0, 130), (p.returncode, err)
        if p.returncode == 130:
            seen_130 += 1
            assert err.count("\n") == 1 and err.startswith("upmig: interrupted"), err
            assert not img.exists() or "after the image" in err
    assert seen_130 >= 3, "SIGINT never landed before the dump finished"
    r.wait_output("SLEPT\n")  # its 3 s sleep, cut by none of this
    assert r.finish() == 0 and r.output().endswith("PASS\n")


# Exits with resume's own status for an unusable image, once the file "go" is there.
EXITS_206 = """
import os, time
print("READY", flush=True)
while not os.path.exists("go"):
    time.sleep(0.01)
os._exit(206)
"""


def _resume_reporting(img: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list]:
    """`upmig resume --status-fd` and the JSON lines it wrote there."""
    rd, wr = os.pipe()
    try:
        res = subprocess.run([*UPMIG, "resume", "--status-fd", str(wr), *flags, str(img)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             pass_fds=(wr,))
        os.close(wr)
        wr = -1
        with os.fdopen(rd) as f:
            rd = -1
            lines = [json.loads(line) for line in f]
    finally:
        for fd in (rd, wr):
            if fd >= 0:
                os.close(fd)
    return res, lines


def test_status_fd_tells_the_process_status_from_resumes_own(run_victim, tmp_path):
    """The same exit status, 206, from the resumed process and from a resume that
    refuses a cut image: only the "running" line tells them apart."""
    r = run_victim([sys.executable, "-c", EXITS_206])
    r.wait_output("READY\n")
    img = r.dump()
    cut = tmp_path / "cut.upmig"
    cut.write_bytes(img.read_bytes()[:-100])
    refused, said = _resume_reporting(cut)
    assert refused.returncode == 206, refused.stderr
    assert [line["status"] for line in said] == ["failed"]
    assert said[0]["exit_status"] == 206 and said[0]["error"] in refused.stderr
    (r.cwd / "go").touch()
    ran, said = _resume_reporting(img)
    assert ran.returncode == 206 and ran.stderr == ""
    assert [line["status"] for line in said] == ["running", "exited"]
    assert said[0]["pid"] == r.pid and said[1]["exit_status"] == 206


def test_resumes_own_failures_are_out_of_the_way(tmp_path):
    """200 + the status dump would give: a bad command line, a missing key."""
    bad_fd = subprocess.run([*UPMIG, "resume", "--status-fd", "987", "x.upmig"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad_fd.returncode == 202 and "not an open fd" in bad_fd.stderr
    no_key = subprocess.run([*UPMIG, "resume", "--key-file", str(tmp_path / "none"),
                             str(tmp_path / "x.upmig")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert no_key.returncode == 209, no_key.stderr
