"""Real programs nobody here wrote, as they are: migrated at several moments, their
output must equal an uninterrupted run byte for byte."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios

import pytest

from conftest import (
    VICTIMS,
    assert_moved,
    descendants,
    migrate_at_random,
    moves_like_a_straight_run,
    stat_fields,
    straight_run,
    wait_for,
)

BC_INPUT = b"scale=2600; 4*a(1)\nquit\n"


def python_job() -> list[str]:
    return [sys.executable, "-S", str(VICTIMS / "pyjob.py")]


@pytest.mark.parametrize("seed", [1, 2])
def test_python_output_equals_straight_run(run_victim, tmp_path, seed):
    expected = straight_run(python_job(), tmp_path)
    r = run_victim(python_job())
    migrate_at_random(r, hops=3, seed=seed, spread=0.6)
    r.ends_as(expected)
    assert_moved(r)


@pytest.mark.parametrize("seed", [5])
def test_multiprocessing_pool_output_equals_straight_run(run_victim, tmp_path, seed):
    """python3's multiprocessing.Pool with fork: parent, threads, three workers, their
    pipes and shared semaphores move together."""
    moves_like_a_straight_run(run_victim, tmp_path,
                              [sys.executable, str(VICTIMS / "mppool.py"), "50"], seed=seed,
                              ends_with=b"DONE\n", spread=0.8)


def test_python_chain_of_five(run_victim, tmp_path):
    expected = straight_run(python_job(), tmp_path)
    r = run_victim(python_job())
    migrate_at_random(r, hops=5, seed=7, spread=0.3)
    assert r.hops == 5, "the job finished before five hops; make it longer"
    r.ends_as(expected)
    assert_moved(r)


@pytest.mark.skipif(not shutil.which("bc"), reason="bc is not installed")
@pytest.mark.parametrize("seed", [3, 4])
def test_bc_pi_equals_straight_run(run_victim, tmp_path, seed):
    expected = straight_run(["bc", "-l"], tmp_path, stdin=BC_INPUT)
    feed = tmp_path / "bc.in"
    feed.write_bytes(BC_INPUT)
    with open(feed, "rb") as stdin:  # a file: reopened at its offset after resume
        r = run_victim(["bc", "-l"], stdin=stdin)
    migrate_at_random(r, hops=3, seed=seed, spread=0.5)
    r.ends_as(expected)
    assert_moved(r)
    assert len(expected) > 2600


@pytest.mark.skipif(not shutil.which("bc"), reason="bc is not installed")
def test_bc_reading_a_pipe_gets_the_resumers_stdin(run_victim, tmp_path):
    """stdin was a pipe from outside: after resume it is `upmig resume`'s own stdin."""
    expected = straight_run(["bc", "-l"], tmp_path, stdin=BC_INPUT)
    r = run_victim(["bc", "-l"], stdin=subprocess.PIPE)
    r.proc.stdin.write(b"scale=2600; 4*a(1)\n")
    r.proc.stdin.flush()
    wait_for(lambda: _unread(r.proc.stdin) == 0 and stat_fields(r.pid)[0] == "R", 20,
             "bc to take the line and compute")
    img = r.dump()
    r.proc.stdin.close()
    with open(tmp_path / "rest.in", "wb") as f:
        f.write(b"quit\n")
    with open(tmp_path / "rest.in", "rb") as rest:
        r.resume(img, stdin=rest)
    r.ends_as(expected)
    assert_moved(r)


def _unread(pipe) -> int:
    """Bytes waiting in a pipe (FIONREAD works on either end)."""
    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4))[0]


INTERPRETERS = {
    "bash": ["bash", "-c", "s=0; for ((i=0;i<1500000;i++)); do s=$(( (s*31+i) % 1000003 )); "
             "if ((i%20000==0)); then echo $i $s; fi; done; echo done $s"],
    "perl": ["perl", "-e", "my $s=0; for my $i (0..15000000) { $s=($s*31+$i)%1000003; "
             "print \"$i $s\\n\" if $i%200000==0 } print \"done $s\\n\""],
    "awk": ["awk", "BEGIN{s=0; for(i=0;i<15000000;i++){s=(s*31+i)%1000003; "
            "if(i%200000==0) print i, s}; print \"done\", s}"],
}


@pytest.mark.parametrize("name", sorted(INTERPRETERS))
def test_interpreter_output_equals_straight_run(run_victim, tmp_path, name):
    argv = INTERPRETERS[name]
    if not shutil.which(argv[0]):
        pytest.skip(f"{argv[0]} is not installed")
    expected = straight_run(argv, tmp_path)
    r = run_victim(argv)
    migrate_at_random(r, hops=3, seed=11, spread=0.25)
    r.ends_as(expected)
    assert_moved(r)


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _reply(c) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = c.recv(1 << 16)
        assert chunk, "redis closed the connection"
        data += chunk
    return data


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_redis_keeps_its_data_and_its_open_connection(run_victim):
    """redis-server as it is (its own background threads, epoll, a pipe, a TCP
    listener): filled with keys, one client connection held open across the move with
    --tcp-established; that same connection gets right answers afterwards, new
    clients connect, and every key is there."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    r = run_victim(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", "."])
    wait_for(lambda: "Ready to accept connections" in r.output(), 20, "redis to start")
    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.sendall(b"".join(_resp(b"SET", b"key:%d" % i, b"value-%d" % (i * i))
                          for i in range(2000)))
    got = b""
    while got.count(b"+OK\r\n") < 2000:
        got += held.recv(1 << 16)
    assert len(os.listdir(f"/proc/{r.pid}/task")) > 1, "redis runs threads of its own"
    r.hop("--tcp-established")
    held.sendall(_resp(b"GET", b"key:1999"))
    assert _reply(held) == b"$%d\r\nvalue-%d\r\n" % (len(b"value-%d" % 1999**2), 1999**2)
    held.sendall(_resp(b"INCR", b"counter"))
    assert _reply(held) == b":1\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as new:
        new.sendall(_resp(b"DBSIZE"))
        assert _reply(new) == b":2001\r\n"
        new.sendall(_resp(b"GET", b"key:7"))
        assert _reply(new) == b"$8\r\nvalue-49\r\n"
    held.close()
    assert r.finish() == 0, r.output()
    assert_moved(r)


NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
NGINX_CONF = """
worker_processes 2;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{ listen 127.0.0.1:{port}; root {d}/www; }}
}}
"""


def _get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read()


@pytest.mark.skipif(not NGINX, reason="nginx is not installed")
def test_nginx_master_and_workers_serve_and_reload(run_victim, tmp_path):
    """nginx as Debian ships it, a master and 2 workers (a listener they share,
    socket-pair channels between master and workers, signal-driven I/O, shared
    memory): after the move clients get the same file, and the master still
    manages its workers — a HUP reload replaces them and they serve."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "www").mkdir()
    blob = os.urandom(300_000)
    (tmp_path / "www" / "blob.bin").write_bytes(blob)
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=tmp_path, port=port))
    r = run_victim([NGINX, "-c", str(conf), "-p", str(tmp_path)])
    wait_for(lambda: len(descendants(r.pid)) == 2, 20, "nginx's two workers")
    wait_for(lambda: _answers(port), 20, "nginx to answer")
    assert _get(port, "/blob.bin") == blob
    workers = sorted(descendants(r.pid))
    r.hop()
    assert sorted(descendants(r.pid)) == workers
    for _ in range(4):
        assert _get(port, "/blob.bin") == blob
    os.kill(r.pid, signal.SIGHUP)
    wait_for(lambda: set(descendants(r.pid)).isdisjoint(workers)
             and len(descendants(r.pid)) == 2, 20, "new workers after the reload")
    assert _get(port, "/blob.bin") == blob
    assert "emerg" not in (tmp_path / "error.log").read_text()
    assert r.finish(signal.SIGQUIT) == 0, (tmp_path / "error.log").read_text()
    assert_moved(r)


def _answers(port: int) -> bool:
    try:
        _get(port, "/")
    except OSError as e:
        return "403" in str(e) or "404" in str(e)
    return True
