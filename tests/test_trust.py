"""Resume as an attacker would try it. A user's job, dumped by root, comes back with
that user's rights and no more, whatever the user did to its files meanwhile and
whatever a rewritten image says; a resumer that is not root gives only its own.
Each attack is refused with its documented exit status and one stderr line, and
leaves nothing behind: no process, no file made or changed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import upmig.cli
import upmig.restore  # noqa: F401  (imported before upmig_as drops root: see there)
from conftest import build_victim, descendants, reap, run_upmig, straight_run, wait_for
from upmig import fileid, ghosts, image, keys
from upmig.fds.ghost import GhostFd
from upmig.fds.path import PathFd
from upmig.fds.unix import UnixListenerFd
from upmig.records import FileIdentity, Ghost, Pages, Task, Vma

EXIT_ACCESS, EXIT_IMAGE, EXIT_RESTORE, EXIT_MISMATCH = 204, 206, 207, 208  # resume's own
SHADOW = Path("/etc/shadow")


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid

    def become(self) -> None:
        """For preexec_fn: the rest of the process is this user's, with no groups."""
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)


def _tool(*argv: str) -> None:
    """useradd/userdel, again while another one holds the password files' lock
    (exit 10; tests of other checkouts may be adding users too)."""
    end = time.monotonic() + 30
    while True:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode == 0:
            return
        if r.returncode != 10 or time.monotonic() > end:
            raise AssertionError(f"{' '.join(argv)}: {r.stderr.strip()}")
        time.sleep(0.05)  # and again, until the deadline above


def processes_of(uid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if str(uid) in uids:
            out.append(int(name))
    return out


def shm_files_of(uid: int) -> list[str]:
    out = []
    for name in os.listdir("/dev/shm"):
        try:
            if os.lstat(f"/dev/shm/{name}").st_uid == uid:
                out.append(name)
        except FileNotFoundError:
            pass
    return out


def _end_all_of(uid: int) -> None:
    """Every process of the user's and every one this test made (all below us:
    victims, resumed processes, their orphans, whose zombies of the user's would
    keep it busy) killed and reaped."""
    def gone() -> bool:
        for pid in {*processes_of(uid), *descendants(os.getpid())}:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, os.WNOHANG)  # ours, or orphaned to us (the subreaper)
            except (ProcessLookupError, ChildProcessError):
                pass
        return not processes_of(uid)

    wait_for(gone, 10, f"the processes of uid {uid} to end")


def _remove_shm_of(uid: int) -> None:
    for leftover in shm_files_of(uid):
        os.unlink(f"/dev/shm/{leftover}")


@pytest.fixture
def user(open_tmp):
    """A fresh unprivileged user (no supplementary groups) whose home is in a
    directory everyone can reach; afterwards its processes (and the test's) are
    killed, its files in /dev/shm removed, the user deleted (its home goes with
    open_tmp)."""
    if os.geteuid() != 0:
        pytest.skip("making a user needs root")
    if not (shutil.which("useradd") and shutil.which("userdel")):
        pytest.skip("useradd/userdel (passwd) are missing")
    name = f"upmig{secrets.token_hex(4)}"
    home = open_tmp / "home"
    _tool("useradd", "--no-create-home", "--home-dir", str(home), "--shell",
          "/usr/sbin/nologin", "--user-group", name)
    pw = pwd.getpwnam(name)
    with contextlib.ExitStack() as undo:  # each step taken, whatever the one before did
        undo.callback(_tool, "userdel", name)
        undo.callback(_remove_shm_of, pw.pw_uid)
        undo.callback(_end_all_of, pw.pw_uid)
        home.mkdir(mode=0o700)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        yield User(name, pw.pw_uid, pw.pw_gid, home)


# ---- helpers

def refusal(res: subprocess.CompletedProcess, *codes: int) -> str:
    """The one stderr line of a refusal with one of codes."""
    assert res.returncode in codes, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("upmig: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


def nothing_left(user: User) -> None:
    """No process of the user's, none of ours (a stub, stopped or not), no file of
    the user's in /dev/shm."""
    assert processes_of(user.uid) == []
    assert descendants(os.getpid()) == []
    assert shm_files_of(user.uid) == []


def looks(path: Path) -> tuple:
    """What an attack on path would change."""
    st = os.lstat(path)
    return path.read_bytes(), st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_mode


def root_only_file(d: Path) -> Path:
    p = d / f"root-only-{secrets.token_hex(4)}"
    p.write_text("root's alone\n")
    p.chmod(0o600)
    return p


def resume_detached(img: Path) -> subprocess.CompletedProcess:
    """`upmig resume -d`: an attack that works leaves the process running (killed
    with the user's processes afterwards), not the test waiting for it."""
    return run_upmig("resume", "-d", str(img), check=False)


def rewrite(img: Path, out: Path, change: Callable[[object], None], key: keys.Key) -> Path:
    """img re-encoded with upmig's own writer and sealed with key, each record passed
    to change first."""
    src = image.load(str(img))
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # (mapped)
    try:
        w = image.ImageWriter(fd, key)
        pages = iter(src.pages)
        for rec in src.records:
            change(rec)
            w.record(rec)
            if isinstance(rec, Pages):
                for off, n in next(pages).chunks:
                    w.data(src.data[off:off + n])
        w.finish()
    finally:
        os.close(fd)
        src.close()
    return out


def new_key(path: Path) -> keys.Key:
    material = os.urandom(32)
    path.write_bytes(material)
    path.chmod(0o600)
    return keys.derive(str(path), material)


def forge(img: Path, change: Callable[[object], None], key: keys.Key) -> Path:
    """img rewritten with change. Sealed with a key of the attacker's, root's resume
    refuses it (exit 6) before anything is made; the image returned is sealed with
    key, as one who stole it could: what stands behind the seal must refuse it too."""
    attackers = new_key(img.parent / "attackers.key")
    res = resume_detached(rewrite(img, img.parent / "forged-own-key.upmig", change, attackers))
    assert "not sealed" in refusal(res, EXIT_IMAGE)
    return rewrite(img, img.parent / "forged.upmig", change, key)


def files_job(run_victim, user: User):
    """The user's job holding ~/a.txt to read and ~/b.txt to read and write."""
    a, b = user.home / "a.txt", user.home / "b.txt"
    for path, text in ((a, "the user's notes\n"), (b, "the user's log\n")):
        path.write_text(text)
        os.chown(path, *user.owner)
    r = run_victim("userfiles", str(a), str(b), preexec_fn=user.become, owner=user.owner,
                   where=user.home)
    r.wait_output("READY\n")
    return r, a, b


def shm_job(run_victim, user: User):
    """The user's job with a POSIX shared memory object of its own, open and mapped."""
    name = f"/upmig-test-{secrets.token_hex(4)}"
    r = run_victim("posixshm", name, preexec_fn=user.become, owner=user.owner,
                   where=user.home)
    r.wait_output("READY\n")
    return r, Path(f"/dev/shm{name}")


def unix_job(run_victim, user: User, sock: Path):
    r = run_victim("unixlisten", str(sock), preexec_fn=user.become, owner=user.owner,
                   where=user.home)
    r.wait_output("READY\n")
    return r


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":\t", 1) for line in f if ":\t" in line)}


# ---- the user's job moves with the user's rights

def test_a_users_job_moves_with_its_rights(run_victim, user):
    r, a, b = files_job(run_victim, user)
    r.hop()
    st = status(r.pid)
    assert st["Uid"].split() == [str(user.uid)] * 4
    assert st["Gid"].split() == [str(user.gid)] * 4 and st["Groups"] == ""
    assert int(st["CapEff"], 16) == 0
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"
    assert b.read_text() == "the user's log\nwritten by the job\n"


def test_a_users_posix_shm_object_is_made_again_as_the_user(run_victim, user):
    r, obj = shm_job(run_victim, user)
    img = r.dump()
    obj.unlink()  # as on another machine
    r.resume(img)
    st = os.stat(obj)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (user.uid, user.gid, 0o600)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"
    nothing_left(user)



def test_a_deleted_file_of_the_users_is_made_again_as_the_user(run_victim, user):
    path = user.home / "scratch.bin"
    r = run_victim("deleted", str(path), preexec_fn=user.become, owner=user.owner,
                   where=user.home)
    r.wait_output("READY\n")
    r.hop()
    held = os.stat(f"/proc/{r.pid}/fd/3")
    assert (held.st_uid, held.st_gid, held.st_nlink) == (user.uid, user.gid, 0)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_a_users_socket_is_bound_again_as_the_user(run_victim, user):
    """Its socket file, left behind by the dump, is removed and bound again by the
    process itself."""
    sock = user.home / "job.sock"
    r = unix_job(run_victim, user, sock)
    r.hop()
    assert os.lstat(sock).st_uid == user.uid
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_a_working_directory_the_user_cannot_use_is_kept(run_victim, user, open_tmp):
    """A job started by root in a directory of root's that then became the user (a
    daemon started from /root) holds a directory it can neither reach nor search:
    holding it gives nothing, and resume gives it back."""
    private = open_tmp / "root-private"
    private.mkdir(mode=0o700)
    r = run_victim("deleted", str(user.home / "scratch.bin"),
                   preexec_fn=lambda: (os.chdir(private), user.become()),
                   owner=user.owner, where=user.home)
    r.wait_output("READY\n")
    r.hop()
    assert os.readlink(f"/proc/{r.pid}/cwd") == str(private)
    assert r.finish() == 0, r.output()



def test_a_tree_of_root_and_the_user_moves(run_victim, user, open_tmp):
    """A root parent and its child that became the user (a server's master and
    worker), both in a directory the user can search but not reach, the child
    holding a root-only file the parent opened: what the child inherited comes back
    through its parent, with the parent's rights; what the child opens itself, with
    its own."""
    secret = root_only_file(open_tmp)
    inner = open_tmp / "root-private" / "inner"
    inner.mkdir(mode=0o755, parents=True)
    inner.parent.chmod(0o700)
    r = run_victim("dropper", str(user.uid), str(user.gid), str(secret),
                   preexec_fn=lambda: os.chdir(inner))
    r.wait_output("READY\n")
    wait_for(lambda: [processes_of(user.uid)] == [descendants(r.pid)] != [[]], 10,
             "the child to become the user")
    r.hop()
    (child,) = descendants(r.pid)
    assert status(child)["Uid"].split() == [str(user.uid)] * 4
    assert os.readlink(f"/proc/{child}/cwd") == str(inner)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"



def test_a_users_tree_sharing_memory_of_every_kind_moves(run_victim, user, tmp_path):
    """Shared anonymous memory (reopened through /proc/self/map_files), a memfd, a
    POSIX shm object (made again, by the user's process) and a named semaphore,
    shared by the user's three processes: they go on together as an unmoved run."""
    expected = straight_run([str(build_victim("sharedmem")), "1200"], tmp_path)
    r = run_victim("sharedmem", "1200", preexec_fn=user.become, owner=user.owner,
                   where=user.home)
    r.wait_output("READY\n")
    img = r.dump()
    for name in shm_files_of(user.uid):  # as on another machine
        os.unlink(f"/dev/shm/{name}")
    r.resume(img)
    r.ends_as(expected)


# ---- attacks

def test_symlink_swap_opens_nothing(run_victim, user, open_tmp):
    """The user swaps the files its job holds for symlinks to files only root may
    read or write. Root's resume must neither open nor write them: the fds are
    reopened with the user's rights (and, where file identity is checked, the
    swap is seen before that: exit 8)."""
    secret = root_only_file(open_tmp)
    r, a, b = files_job(run_victim, user)
    img = r.dump()
    for path, to in ((a, SHADOW if SHADOW.exists() else root_only_file(open_tmp)),
                     (b, secret)):
        path.unlink()
        path.symlink_to(to)
        os.lchown(path, *user.owner)
    before = looks(secret)
    line = refusal(resume_detached(img), EXIT_RESTORE, EXIT_MISMATCH)
    assert str(a) in line
    assert looks(secret) == before
    nothing_left(user)


def test_rewritten_fd_path_cannot_reach_a_root_file(run_victim, user, open_tmp, test_key):
    """An image rewritten to hold a root-only file open for writing in place of the
    user's own, with that file's very identity (its stat: anyone who can reach it
    can read that), so that the file checks pass: the stub opens it as the user,
    who may not."""
    secret = root_only_file(open_tmp)
    st = os.stat(secret)
    r, _, b = files_job(run_victim, user)
    img = r.dump()
    aimed: set[int] = set()

    def aim(rec):
        if isinstance(rec, PathFd) and rec.path == str(b):
            rec.path = str(secret)
            aimed.add(rec.fd)
        elif isinstance(rec, FileIdentity) and rec.fd in aimed:  # (they follow the fds)
            rec.mode, rec.size, rec.mtime_ns = st.st_mode, st.st_size, st.st_mtime_ns
            rec.dev, rec.ino = st.st_dev, st.st_ino

    forged = forge(img, aim, test_key)
    before = looks(secret)
    line = refusal(resume_detached(forged), EXIT_RESTORE)
    assert str(secret) in line and "Permission denied" in line
    assert looks(secret) == before
    nothing_left(user)


def _retarget(old: int, new: int, path: str) -> Callable[[object], None]:
    """Every record of the ghost old made to name the file at path, as ghost new."""
    def change(rec):
        if isinstance(rec, Ghost) and rec.id == old:
            rec.id, rec.path = new, path
        elif isinstance(rec, GhostFd) and rec.ghost == old:
            rec.ghost, rec.path = new, path
        elif isinstance(rec, Vma) and rec.role == "ghost" and rec.ghost == old:
            rec.ghost, rec.path = new, path
        elif isinstance(rec, Pages) and rec.target == ghosts.target(old):
            rec.target = ghosts.target(new)
    return change


def _only_ghost(img: Path) -> Ghost:
    loaded = image.load(str(img))
    try:
        (g,) = loaded.of(Ghost)
    finally:
        loaded.close()
    assert g.type == "posix"
    return g


def test_posix_shm_record_cannot_overwrite_a_root_file_in_dev_shm(run_victim, user, test_key):
    """The ghost record of the user's shared memory object rewritten to name a
    root-owned file in /dev/shm, with that file's very identity (so that it passes
    for the object, still there on the same machine): root's resume would empty and
    fill it. The stub opens it as the user, who may not."""
    target = Path(f"/dev/shm/upmig-root-{secrets.token_hex(4)}")
    target.write_text("root's own\n")
    try:
        target.chmod(0o644)
        r, obj = shm_job(run_victim, user)
        img = r.dump()
        obj.unlink()
        g = _only_ghost(img)
        forged = forge(img, _retarget(g.id, fileid.object_id(os.stat(target)), str(target)),
                       test_key)
        before = looks(target)
        line = refusal(resume_detached(forged), EXIT_IMAGE, EXIT_RESTORE)
        assert str(target) in line
        assert looks(target) == before
        nothing_left(user)
    finally:
        target.unlink()


def test_posix_shm_record_cannot_make_a_file_outside_dev_shm(run_victim, user, test_key):
    """The ghost record rewritten to make its object in /etc: root's resume would
    create it there, owned by whoever the record says. The stub creates it as the
    user, who may not (and a checked image refuses the name: exit 6)."""
    target = Path(f"/etc/upmig-attack-{secrets.token_hex(4)}")
    r, obj = shm_job(run_victim, user)
    img = r.dump()
    obj.unlink()
    g = _only_ghost(img)
    forged = forge(img, _retarget(g.id, g.id, str(target)), test_key)
    try:
        line = refusal(resume_detached(forged), EXIT_IMAGE, EXIT_RESTORE)
        assert str(target) in line
        assert not os.path.lexists(target)
        nothing_left(user)
    finally:
        if os.path.lexists(target):
            target.unlink()


def test_posix_shm_object_of_another_user_is_not_made_for_it(run_victim, user, test_key):
    """The record says the object belonged to root: a user's process could not have
    made that, so resume refuses rather than give it root's ownership."""
    r, obj = shm_job(run_victim, user)
    img = r.dump()
    obj.unlink()

    def rootowned(rec):
        if isinstance(rec, Ghost):
            rec.uid = rec.gid = 0

    forged = forge(img, rootowned, test_key)
    try:
        line = refusal(resume_detached(forged), EXIT_RESTORE)
        assert str(obj) in line and "uid 0" in line
        assert not obj.exists()
        nothing_left(user)
    finally:
        if os.path.lexists(obj):  # root's, if the attack worked
            obj.unlink()



def test_a_working_directory_the_user_cannot_reach_is_not_entered(run_victim, user, open_tmp):
    """One it could use once there, but not reach, it could not have entered: root
    does not enter it for it."""
    inner = open_tmp / "root-private" / "inner"
    inner.mkdir(mode=0o755, parents=True)
    inner.parent.chmod(0o700)
    r = run_victim("waiter", "pause", preexec_fn=lambda: (os.chdir(inner), user.become()),
                   owner=user.owner, where=user.home)
    r.wait_output("READY\n")
    line = refusal(resume_detached(r.dump()), EXIT_RESTORE)
    assert str(inner) in line and "cannot reach" in line
    nothing_left(user)


def test_a_deleted_file_record_cannot_make_a_file_in_a_root_directory(run_victim, user, test_key):
    """A deleted file is made again in its directory: rewritten to /etc, the user's
    process may not make it there."""
    path = user.home / "scratch.bin"
    r = run_victim("deleted", str(path), preexec_fn=user.become, owner=user.owner,
                   where=user.home)
    r.wait_output("READY\n")
    img = r.dump()
    target = f"/etc/upmig-attack-{secrets.token_hex(4)}"

    def aim(rec):
        if isinstance(rec, (Ghost, GhostFd)) and rec.path == str(path):
            rec.path = target

    line = refusal(resume_detached(forge(img, aim, test_key)), EXIT_IMAGE, EXIT_RESTORE)
    assert target in line and "/etc" in line
    assert not os.path.lexists(target)
    nothing_left(user)


@pytest.mark.parametrize("stale", [False, True], ids=["new", "stale"])
def test_a_socket_record_cannot_bind_or_clear_a_root_path(run_victim, user, open_tmp,
                                                          test_key, stale):
    """The job's socket name rewritten to a path in root's directory: root's resume
    would bind there, first removing a stale socket file of root's it found there.
    The process binds, and removes, with its own rights."""
    import socket

    target = open_tmp / f"root-{secrets.token_hex(4)}.sock"
    if stale:  # bound, then closed: nobody listens on it
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(str(target))
    before = os.lstat(target).st_ino if stale else None
    sock = user.home / "job.sock"
    r = unix_job(run_victim, user, sock)
    img = r.dump()

    def aim(rec):
        if isinstance(rec, UnixListenerFd):
            rec.name = os.fsencode(str(target)).hex()

    line = refusal(resume_detached(forge(img, aim, test_key)), EXIT_IMAGE, EXIT_RESTORE)
    assert str(target) in line
    assert (os.lstat(target).st_ino if stale else os.path.lexists(target)) == \
        (before if stale else False)
    nothing_left(user)


# ---- a resumer that is not root

PR_SET_KEEPCAPS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 8, 47, 2
CAP_CHECKPOINT_RESTORE = 40


def _drop_to(user: User, checkpoint_restore: bool) -> None:
    """This process becomes the user's, keeping CAP_CHECKPOINT_RESTORE (ambient,
    so that the stub it starts has it too) if asked."""
    libc = ctypes.CDLL(None, use_errno=True)
    if checkpoint_restore:
        assert libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0
    user.become()
    if checkpoint_restore:
        high = 1 << (CAP_CHECKPOINT_RESTORE - 32)
        head = struct.pack("<Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
        data = struct.pack("<6I", 0, 0, 0, high, high, high)  # effective, permitted, inh.
        assert libc.capset(head, data) == 0, ctypes.get_errno()
        assert libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_CHECKPOINT_RESTORE,
                          0, 0) == 0, ctypes.get_errno()


def upmig_as(user: User, *args: str, key: Path, checkpoint_restore: bool = False
             ) -> subprocess.CompletedProcess:
    """upmig run by the user, with its key: forked from this interpreter, which the
    user could not start (it may live under /root); what upmig imports is imported
    already."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 99
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            signal.alarm(120)  # a hang ends the child, and the test with a failure
            _drop_to(user, checkpoint_restore)
            os.chdir(user.home)
            os.environ[keys.ENV] = str(key)
            code = upmig.cli.main(list(args))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with open(out_r, "rb") as out, open(err_r, "rb") as err:
        stdout, stderr = out.read(), err.read()
    _, wstatus = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(wstatus),
                                       stdout.decode(), stderr.decode())


@pytest.fixture
def users_key(user) -> tuple[Path, keys.Key]:
    """The user's own key (its file, and the key): what its images are sealed with."""
    path = user.home / "upmig.key"
    key = new_key(path)
    os.chown(path, *user.owner)
    return path, key


def handed_to(user: User, img: Path, key: keys.Key, change=lambda rec: None) -> Path:
    """img as the user holds it: re-sealed with its key (after change, if any: the
    user can write any image it likes and seal it), readable by it."""
    out = rewrite(img, user.home / f"{img.stem}-users.upmig", change, key)
    os.chown(out, *user.owner)
    return out


def test_a_user_cannot_resume_a_root_process(run_victim, user, users_key):
    """Neither an image root sealed (the user's key did not: exit 6), nor the same
    sealed with the user's key (it may seal what it likes): upmig resume run by the
    user cannot make a root process (exit 4)."""
    path, key = users_key
    r = run_victim("waiter", "pause")
    r.wait_output("READY\n")
    img = r.dump()
    roots = user.home / "root.upmig"
    shutil.copy(img, roots)
    os.chown(roots, *user.owner)
    line = refusal(upmig_as(user, "resume", "-d", str(roots), key=path,
                            checkpoint_restore=True), EXIT_IMAGE)
    assert "not sealed" in line
    line = refusal(upmig_as(user, "resume", "-d", str(handed_to(user, img, key)), key=path,
                            checkpoint_restore=True), EXIT_ACCESS)
    assert "uids 0,0,0,0" in line and f"uid {user.uid}" in line
    nothing_left(user)


def test_a_user_resumes_its_own_job_only_as_itself(run_victim, user, users_key):
    """Its own job comes back as itself (given CAP_CHECKPOINT_RESTORE, without which
    upmig rebuilds nothing: refused at once); rewritten to run as root, refused."""
    path, key = users_key
    r, _, b = files_job(run_victim, user)
    img = r.dump()

    def as_root(rec):
        if isinstance(rec, Task):
            rec.uids, rec.gids, rec.groups = [0] * 4, [0] * 4, [0]

    forged = handed_to(user, img, key, as_root)
    line = refusal(upmig_as(user, "resume", "-d", str(forged), key=path,
                            checkpoint_restore=True), EXIT_ACCESS)
    assert "uids 0,0,0,0" in line
    own = handed_to(user, img, key)
    line = refusal(upmig_as(user, "resume", "-d", str(own), key=path), EXIT_ACCESS)
    assert "CAP_CHECKPOINT_RESTORE" in line
    nothing_left(user)
    res = upmig_as(user, "resume", "-d", str(own), key=path, checkpoint_restore=True)
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout)
    st = status(pid)
    assert st["Uid"].split() == [str(user.uid)] * 4 and st["Groups"] == ""
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapAmb"], 16) == 0
    os.kill(pid, signal.SIGTERM)
    assert reap(pid) == 0
    assert r.output() == "READY\nPASS\n"
    assert b.read_text() == "the user's log\nwritten by the job\n"


def test_rewritten_to_run_as_root_only_the_seal_refuses(run_victim, user):
    """Root gives what a sealed image says: a user's job rewritten to run as root
    (uids, gids, groups 0, every capability) is refused because root's key did not
    seal it, and nothing else; it is exactly what the seal is for."""
    r, _, _ = files_job(run_victim, user)
    img = r.dump()

    def as_root(rec):
        if isinstance(rec, Task):
            rec.uids, rec.gids, rec.groups = [0] * 4, [0] * 4, [0]
            rec.caps = {k: (1 << 41) - 1 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                    "CapAmb")}

    attackers = new_key(img.parent / "attackers.key")
    line = refusal(resume_detached(rewrite(img, img.parent / "forged.upmig", as_root,
                                           attackers)), EXIT_IMAGE)
    assert "not sealed" in line
    nothing_left(user)


def test_a_root_job_keeps_the_filesystem_ids_it_took(run_victim, user):
    """A root process working with the user's filesystem rights (setfsuid, as NFS
    servers do) gets them back; its files are reopened with them."""
    r = run_victim("fsuid", str(user.uid), str(user.gid), owner=user.owner, where=user.home)
    r.wait_output("READY\n")
    r.hop()
    st = status(r.pid)
    assert st["Uid"].split() == ["0", "0", "0", str(user.uid)]
    assert st["Gid"].split() == ["0", "0", "0", str(user.gid)]
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"
