"""The command line contract: help, exit statuses, one `upmig:` line per failure, no
image (and no partial file) when a dump fails, and a refused process left running
untraced."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from conftest import run_upmig, wait_for
from upmig import _proc

NO_PID = 999999  # above any pid_max this suite runs with (checked in the test)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return _proc.parse_status(f.read())


def _runs_untraced(r) -> None:
    """The process is alive, nobody traces it, and it is back asleep (not stopped)."""
    def ok() -> bool:
        st = _status(r.pid)
        return st["TracerPid"] == "0" and st["State"].startswith("S")

    assert r.proc.poll() is None, f"pid {r.pid} died: {r.output()}"
    wait_for(ok, 10, f"pid {r.pid} sleeping and untraced")
    assert r.proc.poll() is None


def _one_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("upmig: ")
    return lines[0]


def _leftovers(d, keep=("stdout.txt",)) -> list[str]:
    return sorted(n for n in os.listdir(d) if n not in keep)


# ---- help and usage

def test_help_lists_commands_and_exit_statuses():
    r = run_upmig("--help")
    out = r.stdout
    for cmd in ("dump", "resume", "inspect"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), f"{cmd} not listed:\n{out}"
    assert "exit status" in out
    for code in (*range(10), 130):
        assert re.search(rf"(^|\s){code}\s+\S", out, re.M), f"exit status {code} missing"
    for words in ("no such process", "access denied", "cannot move", "corrupt", "too new",
                  "not sealed", "key is missing", "interrupted"):
        assert words in out


def test_dump_help_mentions_modes_and_an_example():
    out = run_upmig("dump", "--help").stdout
    assert "--leave-running" in out and "--leave-stopped" in out and "-o" in out
    assert "example" in out
    assert re.search(r"upmig dump \d+ -o \S+", out)


def test_resume_help_says_how_its_own_failures_differ():
    out = run_upmig("resume", "--help").stdout
    for code in (201, 202, 204, 206, 207, 208, 209, 230):
        assert re.search(rf"^\s+{code}\s+\S", out, re.M), f"exit status {code} missing"
    assert "--status-fd" in out and '"running"' in out


@pytest.mark.parametrize("cmd", ["resume", "inspect"])
def test_other_help_has_an_example(cmd):
    out = run_upmig(cmd, "--help").stdout
    assert "example" in out and f"upmig {cmd} " in out and "--json" in out


def test_version():
    r = run_upmig("--version")
    assert re.fullmatch(r"upmig \d+\.\d+\S*\n", r.stdout)


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["dump", str(NO_PID)],                                         # no -o
    ["dump", "notapid", "-o", "x.upmig"],
    ["dump", str(NO_PID), "-o", "x.upmig", "--leave-running", "--leave-stopped"],
    ["resume"],
    ["inspect"],
])
def test_bad_command_line_exits_2(argv, tmp_path):
    r = run_upmig(*argv, check=False)
    assert r.returncode == (202 if argv[:1] == ["resume"] else 2), r.stderr
    assert "Traceback" not in r.stderr
    assert "usage:" in r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "x.upmig"))


# ---- dump failures that write nothing

@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_dump_no_such_process(tmp_path, json_flag):
    assert not os.path.exists(f"/proc/{NO_PID}")
    out = tmp_path / "x.upmig"
    r = run_upmig("dump", *json_flag, str(NO_PID), "-o", str(out), check=False)
    assert r.returncode == 3, r.stderr
    line = _one_line(r)
    assert f"pid {NO_PID}" in line
    assert r.stdout == ""
    assert os.listdir(tmp_path) == [], "no image and no partial file"


# chmod cannot stop root; a missing directory and /proc (which creates no file) can.
@pytest.mark.parametrize("target,absent", [
    ("/nonexistent-dir/x.upmig", "/nonexistent-dir"),
    ("/proc/x.upmig", "/proc/x.upmig"),
])
def test_dump_into_unwritable_place_leaves_process_alone(run_victim, target, absent):
    r = run_victim(["sleep", "30"])
    wait_for(lambda: _status(r.pid)["State"].startswith("S"), 10, "sleep to sleep")
    res = run_upmig("dump", str(r.pid), "-o", target, check=False)
    assert res.returncode != 0
    assert target in _one_line(res)
    assert res.stdout == ""
    assert not os.path.exists(absent)
    where = os.path.dirname(target)
    if os.path.isdir(where):  # no partial image either
        assert not [n for n in os.listdir(where) if "x.upmig" in n]
    _runs_untraced(r)
    assert _leftovers(r.cwd) == []


# ---- inspect

@pytest.fixture
def counter_image(run_victim):
    r = run_victim("counter")
    r.wait_output("READY\n")
    img = r.dump("--leave-running")
    return r, img


def test_inspect_text(counter_image):
    r, img = counter_image
    res = run_upmig("inspect", str(img))
    out = res.stdout
    assert res.stderr == ""
    assert f"pid {r.pid}" in out
    assert re.search(rf"^thread\s+tid {r.pid}\b", out, re.M), out
    assert re.search(r"^\s+[0-9a-f]+-[0-9a-f]+ [r-][w-][x-][ps] .*\[(heap|stack)\]\s*$", out,
                     re.M), out
    m = re.search(r"^fds\s+(\d+)\s*$", out, re.M)
    assert m, out
    fd_lines = re.findall(r"^\s+(\d+) (file|dir|chardev|inherit)\s", out, re.M)
    assert len(fd_lines) == int(m.group(1)) >= 4
    assert {fd for fd, _ in fd_lines} >= {"0", "1", "2", "3"}
    assert str(r.cwd / "counter.log") in out
    assert re.search(r"^signals\s", out, re.M)


def test_inspect_json(counter_image):
    r, img = counter_image
    res = run_upmig("inspect", "--json", str(img))
    assert res.stderr == ""
    s = json.loads(res.stdout)
    assert {"process", "threads", "vmas", "fds", "signals", "totals"} <= set(s)
    assert s["process"]["pid"] == r.pid
    assert [t["tid"] for t in s["threads"]] == [r.pid]
    assert s["totals"]["stored_bytes"] == sum(v["stored"] for v in s["vmas"])
    assert s["totals"]["stored_bytes"] > 0
    assert s["totals"]["vmas"] == len(s["vmas"])
    assert s["totals"]["mapped_bytes"] == sum(v["end"] - v["start"] for v in s["vmas"])
    assert any(v["what"] == "[stack]" for v in s["vmas"])
    fds = {f["fd"]: f for f in s["fds"]}
    assert set(fds) >= {0, 1, 2, 3}
    assert fds[3]["path"] == str(r.cwd / "counter.log")
    assert "15" in s["signals"]["handled"]   # counter handles SIGTERM (JSON keys)
    assert s["image_bytes"] == img.stat().st_size


# ---- processes upmig refuses

TICKER = """
import itertools, socket, sys, time
srv = socket.create_server(("127.0.0.1", 0))    # an established TCP connection: refused
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
print("READY", flush=True)
for i in itertools.count():
    time.sleep(0.02)
    print(i, flush=True)
"""

THREADS = """
import ctypes, threading, time
libc = ctypes.CDLL(None, use_errno=True)
changed = threading.Event()
def other_uid():  # a raw setresuid changes this thread's credentials only
    assert libc.syscall(117, 65534, 65534, 65534) == 0
    changed.set()
    time.sleep(60)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
threading.Thread(target=other_uid, daemon=True).start()
changed.wait()
print("READY", flush=True)
time.sleep(60)
"""


def test_refuses_a_tcp_connection_and_the_process_runs_on(run_victim):
    r = run_victim([sys.executable, "-c", TICKER])
    r.wait_output("READY\n")
    img = r.cwd / "sock.upmig"
    res = run_upmig("dump", str(r.pid), "-o", str(img), check=False)
    assert res.returncode == 5, res.stderr
    line = _one_line(res)
    assert f"pid {r.pid}" in line and "established TCP connection" in line
    assert res.stdout == ""
    assert _leftovers(r.cwd) == [], "no image and no partial file"
    # Released as it was: untraced, and still doing its work.
    _runs_untraced(r)
    seen = len(r.output())
    wait_for(lambda: len(r.output()) > seen + 20, 10, "the ticker to go on ticking")
    assert r.proc.poll() is None


def test_refuses_a_thread_with_other_credentials(run_victim):
    r = run_victim([sys.executable, "-c", THREADS])
    r.wait_output("READY\n")
    assert _status(r.pid)["Threads"] == "3"
    odd = max(int(t) for t in os.listdir(f"/proc/{r.pid}/task"))
    img = r.cwd / "threads.upmig"
    res = run_upmig("dump", str(r.pid), "-o", str(img), check=False)
    assert res.returncode == 5, res.stderr
    assert res.stderr == (f"upmig: pid {r.pid} has a thread ({odd}) with other credentials than "
                          "its main thread (Uid, CapPrm, CapEff); this is not supported yet\n")
    assert res.stdout == ""
    assert _leftovers(r.cwd) == []
    _runs_untraced(r)
    assert _status(r.pid)["Threads"] == "3"


# ---- a mapped file with an odd name

ODD_MAPPER = """
import mmap, time
f = open("we\\rird.bin", "w+b")
f.write(b"x" * 4096)
f.flush()
m = mmap.mmap(f.fileno(), 4096)
print("READY", flush=True)
time.sleep(60)
"""


def test_dump_that_fails_inside_leaves_process_running(run_victim):
    """Whatever the dump of this process does, it ends released and with no partial
    file."""
    r = run_victim([sys.executable, "-c", ODD_MAPPER])
    r.wait_output("READY\n")
    img = r.cwd / "odd.upmig"
    run_upmig("dump", str(r.pid), "-o", str(img), "--leave-running", check=False)
    assert not [n for n in os.listdir(r.cwd) if ".partial-" in n]
    _runs_untraced(r)


def test_dump_of_a_process_mapping_an_oddly_named_file(run_victim):
    r = run_victim([sys.executable, "-c", ODD_MAPPER])
    r.wait_output("READY\n")
    img = r.cwd / "odd.upmig"
    res = run_upmig("dump", str(r.pid), "-o", str(img), "--leave-running", check=False)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0, res.stderr
    s = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    assert any(v["what"].endswith("/we\rird.bin") for v in s["vmas"])


def test_library_functions_survive_their_own_imports(tmp_path):
    """upmig.dump/resume/inspect stay functions after use (a submodule of the same
    name would replace them on first import)."""
    import upmig

    with pytest.raises(upmig.ImageError):
        upmig.inspect(str(tmp_path / "none.upmig"))
    with pytest.raises(upmig.NoSuchProcess):
        upmig.dump(2**22 + 1, str(tmp_path / "x.upmig"))
    with pytest.raises(upmig.ImageError):
        upmig.resume(str(tmp_path / "none.upmig"))
    assert all(callable(f) for f in (upmig.dump, upmig.resume, upmig.inspect))
