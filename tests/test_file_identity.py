"""Files are checked before they are used: what a process holds by path (its fds'
files and directories, its working directory, its executable) must be, on resume,
the file it held at dump. A file that changed type, was replaced, is cut below the
process's offset, or is reached through a symlink now is refused (exit 8, one line,
nothing left running); one with new contents only with --allow-changed-files.

The victim (tests/victims/heldfiles.py) holds data/a.txt (read, offset 6) on fd 3,
data/b.txt (read-write, offset 5) on fd 4, the directory sub on fd 5, and works in
work; each test changes one of them between dump and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

import upmig
from conftest import VICTIMS, build_victim, descendants, reap, run_upmig
from upmig import fileid
from upmig.errors import Mismatch
from upmig.records import MappedFile

REST_OF_A = b"the rest of a"


@pytest.fixture
def dumped(run_victim):
    """The victim, dumped (and so killed): (its Run, its image)."""
    def start(*args: str):
        r = run_victim([sys.executable, "-S", str(VICTIMS / "heldfiles.py"), *args])
        r.wait_output("READY\n")
        return r, r.dump()

    return start


def refused(r, img: Path, *flags: str) -> str:
    """Resume must refuse with exit 208 and one line, leaving nothing behind: that line."""
    res = run_upmig("resume", "--detach", *flags, str(img), check=False)
    if res.returncode == 0:  # resumed: it came to us (the subreaper); end it
        os.kill(r.pid, signal.SIGKILL)
        reap(r.pid)
    assert res.returncode == 208, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert not os.path.exists(f"/proc/{r.pid}"), "a half-built process is left"
    return res.stderr


def test_files_that_did_not_change_move(dumped):
    r, img = dumped()
    ids = {f["fd"]: f for f in json.loads(run_upmig("inspect", "--json", str(img)).stdout)
           ["fds"]}
    assert ids[3]["identity"]["size"] == len(b"alpha:") + len(REST_OF_A)
    assert ids[5]["identity"]["type"] == "directory"
    r.resume(img)
    assert r.finish() == 0, r.output()
    assert r.output() == f"READY\nREAD {REST_OF_A!r}\nPASS\n"
    assert (r.cwd / "data/b.txt").read_bytes() == b"bravo!"


def test_the_victims_checks_can_fail(dumped):
    r, img = dumped("break")
    r.resume(img)
    assert r.finish() == 1
    assert r.output() == "READY\nFAIL: offsets 7 and 5, expected 6 and 5\n"


def test_files_swapped_for_symlinks_to_root_files_are_refused(dumped, tmp_path):
    """The attack: the user whose job root dumps replaces the files it holds with
    symlinks to /etc/shadow (read) and to a root-only file (read-write). Resume must
    not open them, with --allow-changed-files either."""
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's own")
    secret.chmod(0o600)
    before = secret.stat()
    r, img = dumped()
    a, b = r.cwd / "data/a.txt", r.cwd / "data/b.txt"
    a.unlink()
    a.symlink_to("/etc/shadow")
    b.unlink()
    b.symlink_to(secret)
    for flags in ((), ("--allow-changed-files",)):
        assert refused(r, img, *flags) == f"upmig: pid {r.pid}: {a} (fd 3) is a symlink now\n"
    after = secret.stat()
    assert secret.read_bytes() == b"root's own"
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_file_cut_below_the_offset_is_refused(dumped):
    r, img = dumped()
    a = r.cwd / "data/a.txt"
    os.truncate(a, 3)
    for flags in ((), ("--allow-changed-files",)):
        assert refused(r, img, *flags) == (f"upmig: pid {r.pid}: {a} (fd 3) is 3 bytes now, "
                                           "shorter than the fd's offset 6\n")


def test_new_contents_are_refused_unless_allowed(dumped):
    """Rewritten in place (the same inode): refused, naming what changed; with
    --allow-changed-files the process reads the new contents from its offset."""
    r, img = dumped()
    a = r.cwd / "data/a.txt"
    was = a.stat()
    with open(a, "r+b") as f:
        f.write(b"alpha:new contents, and longer")
    os.utime(a, ns=(was.st_atime_ns, was.st_mtime_ns + 1_000_000_000))
    line = refused(r, img)
    assert line.startswith(f"upmig: pid {r.pid}: {a} (fd 3) changed since the dump (size 30, "
                           "was 19; modified ")
    assert line.endswith("); resume with --allow-changed-files to use it as it is now\n")
    assert f".{was.st_mtime_ns % 10**9:09d})" in line  # the mtime, to the nanosecond
    r.resume(img, "--allow-changed-files")
    assert r.finish() == 0, r.output()
    assert r.output() == f"READY\nREAD {b'new contents, and longer'!r}\nPASS\n"


def test_a_lookalike_copy_is_refused_on_the_same_boot(dumped):
    """Another file with the same size and mtime (a copy put in its place): on the
    same boot of the same machine its inode tells it apart."""
    r, img = dumped()
    a = r.cwd / "data/a.txt"
    shutil.copy2(a, r.cwd / "copy")
    os.replace(r.cwd / "copy", a)
    line = refused(r, img, "--allow-changed-files")
    assert line == f"upmig: pid {r.pid}: {a} (fd 3) is another file now: it was replaced " \
                   "since the dump\n"


def test_a_path_turned_into_a_symlink_to_the_same_file_is_refused(dumped):
    """The very same file (inode, size, mtime), but reached through a symlink now."""
    r, img = dumped()
    a = r.cwd / "data/a.txt"
    os.rename(a, r.cwd / "data/a.real")
    a.symlink_to("a.real")
    assert refused(r, img) == f"upmig: pid {r.pid}: {a} (fd 3) is a symlink now\n"


def test_a_directory_on_the_way_turned_into_a_symlink_is_refused(dumped):
    r, img = dumped()
    os.rename(r.cwd / "data", r.cwd / "data.real")
    (r.cwd / "data").symlink_to("data.real")
    assert refused(r, img) == (f"upmig: pid {r.pid}: {r.cwd}/data/a.txt (fd 3) resolves "
                               f"through the symlink {r.cwd}/data now\n")


def test_a_directory_replaced_by_a_file_is_refused(dumped):
    r, img = dumped()
    (r.cwd / "sub").rmdir()
    (r.cwd / "sub").write_bytes(b"not a directory")
    assert refused(r, img) == (f"upmig: pid {r.pid}: {r.cwd}/sub (fd 5) is a regular file "
                               "now, was a directory\n")


def test_a_working_directory_replaced_by_a_symlink_is_refused(dumped):
    r, img = dumped()
    os.rename(r.cwd / "work", r.cwd / "work.real")
    (r.cwd / "work").symlink_to("work.real")
    assert refused(r, img) == (f"upmig: pid {r.pid}: {r.cwd}/work (its working directory) "
                               "is a symlink now\n")


@pytest.fixture
def own_executable(run_victim, tmp_path):
    """A victim run from its own copy of its executable, dumped: (its Run, its image,
    the executable's path)."""
    exe = tmp_path / "bin" / "counter"
    exe.parent.mkdir()
    shutil.copy2(build_victim("counter"), exe)
    r = run_victim([str(exe)])
    r.wait_output("READY\n")
    return r, r.dump(), exe


def test_an_executable_reached_through_a_symlink_is_refused(own_executable, tmp_path):
    """The same bytes, but its directory is a symlink now."""
    r, img, exe = own_executable
    bin_dir = exe.parent
    os.rename(bin_dir, tmp_path / "bin.real")
    bin_dir.symlink_to("bin.real")
    assert refused(r, img) == (f"upmig: mapped file {exe} resolves through the symlink "
                               f"{bin_dir} now\n")


# ---- the second line: what the stub opens is checked again

def resume_in_process(img: Path, pid: int) -> upmig.Mismatch:
    """Resume (here, through the API) must fail with Mismatch, leaving nothing: it."""
    try:
        res = upmig.resume(str(img), pids="same")
    except upmig.Mismatch as e:
        err = e
    else:  # resumed (it is our child): end it
        os.kill(res.pid, signal.SIGKILL)
        reap(res.pid)
        raise AssertionError("resume did not refuse")
    assert err.exit_code == 8
    assert not os.path.exists(f"/proc/{pid}") and descendants(os.getpid()) == []
    return err


def test_a_symlink_the_first_check_missed_is_refused_by_the_open(dumped, monkeypatch):
    """Made as if the path became a symlink after the check before any process was
    made: the stub's openat2 (RESOLVE_NO_SYMLINKS) refuses it all the same."""
    r, img = dumped()
    a = r.cwd / "data/a.txt"
    os.rename(a, r.cwd / "data/a.real")
    a.symlink_to("a.real")
    monkeypatch.setattr(fileid, "_walk", lambda path: (os.stat(path), ""))  # blind to links
    err = resume_in_process(img, r.pid)
    assert str(err) == f"pid {r.pid}: {a} (fd 3) resolves through a symlink now"


def test_a_file_swapped_after_the_check_is_refused_by_the_open(dumped, monkeypatch):
    """A lookalike (same size and mtime) put in place right after the first check,
    with the image taken for another machine's (so its inode is no evidence): the
    fd the stub opens is not the file that was checked."""
    r, img = dumped()
    a = r.cwd / "data/a.txt"
    check = fileid.Held.check

    def check_then_swap(self, pid, path, *args, **kwargs):
        check(self, pid, path, *args, **kwargs)
        if path == str(a):
            shutil.copy2(a, r.cwd / "copy")
            os.replace(r.cwd / "copy", a)

    monkeypatch.setattr(fileid.Held, "check", check_then_swap)
    monkeypatch.setattr(fileid._proc, "boot_id", lambda: "another boot")
    err = resume_in_process(img, r.pid)
    assert str(err) == f"pid {r.pid}: {a} (fd 3) was replaced while resume was opening it"


def test_an_executable_behind_a_symlink_the_first_check_missed(own_executable, tmp_path,
                                                               monkeypatch):
    r, img, exe = own_executable
    os.rename(exe.parent, tmp_path / "bin.real")
    exe.parent.symlink_to("bin.real")
    monkeypatch.setattr(fileid, "_walk", lambda path: (os.stat(path), ""))  # blind to links
    err = resume_in_process(img, r.pid)
    assert str(err) == f"mapped file {exe} resolves through a symlink now"


def test_an_executable_swapped_after_the_check_is_refused_by_the_open(own_executable,
                                                                      monkeypatch):
    """The same bytes (a copy) put in its place right after its contents were checked:
    the stub maps only the very file that was checked."""
    r, img, exe = own_executable
    check_mapped = fileid.Held.check_mapped

    def check_then_swap(self, rec):
        check_mapped(self, rec)
        if rec.path == str(exe):
            shutil.copy2(exe, exe.parent / "copy")
            os.replace(exe.parent / "copy", exe)

    monkeypatch.setattr(fileid.Held, "check_mapped", check_then_swap)
    err = resume_in_process(img, r.pid)
    assert str(err) == f"mapped file {exe} was replaced while resume was opening it"


WATCHER = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("sub/watched")
ino = libc.inotify_init1(os.O_NONBLOCK)
assert libc.inotify_add_watch(ino, b"sub/watched", 0x100) == 1  # IN_CREATE
print("READY", flush=True)
time.sleep(60)
"""


def test_an_inotify_watch_redirected_by_a_symlink_is_refused(run_victim, tmp_path):
    """A watch shows the names of the files made in a directory: one moved by a
    symlink into a directory only root may read must not be added there."""
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    r = run_victim([sys.executable, "-c", WATCHER])
    r.wait_output("READY\n")
    img = r.dump()
    os.rename(r.cwd / "sub", r.cwd / "sub.real")
    (r.cwd / "sub").symlink_to(private)
    (private / "watched").mkdir()
    assert refused(r, img) == (f"upmig: {r.cwd}/sub/watched (watched by inotify on fd 3) "
                               "resolves through a symlink now\n")


def test_a_deleted_files_directory_turned_into_a_symlink_is_refused(run_victim, tmp_path):
    """The file travels in the image and is made again, nameless, in its directory:
    not in another one a symlink leads to."""
    r = run_victim([sys.executable, "-c", "import os, time\n"
                    "os.mkdir('sub'); f = open('sub/x.bin', 'w+b'); os.unlink('sub/x.bin')\n"
                    "print('READY', flush=True); time.sleep(60)"])
    r.wait_output("READY\n")
    img = r.dump()
    os.rename(r.cwd / "sub", r.cwd / "sub.real")
    (r.cwd / "sub").symlink_to(tmp_path)
    assert refused(r, img) == (f"upmig: the directory {r.cwd}/sub of the deleted file "
                               f"{r.cwd}/sub/x.bin resolves through a symlink now\n")


def test_a_mapped_file_that_is_a_fifo_or_device_is_not_opened(tmp_path):
    """An image (sealed with a stolen key, say) may name a FIFO or a device as a mapped
    file: the first check refuses it at once, without opening it (a FIFO's open would
    wait for a writer for ever)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        rec = MappedFile(path=path, size=0, mtime=0.0, build_id="", content_hash="0")
        with pytest.raises(Mismatch, match="not a regular file"):
            fileid.check(rec)
