"""Files on a tmpfs: only a POSIX shared memory object (/dev/shm/NAME) or a memfd
travels in the image; a file in a directory under /dev/shm is a file like one on
disk, reopened by its path (it was once taken for a shared memory object, and the
image was then refused by resume)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import VICTIMS, run_upmig
from upmig import ghosts


@pytest.mark.parametrize("path,travels", [
    ("/dev/shm/obj", True),
    ("/dev/shm/obj (deleted)", True),
    ("/memfd:x (deleted)", True),
    ("/dev/shm/dir/log", False),
    ("/dev/shm/", False),
    ("/dev/shm/..", False),
    ("/tmp/log", False),
])
def test_what_lives_in_memory(path, travels):
    assert ghosts.lives_in_memory(path) is travels


@pytest.mark.parametrize("broken", [False, True])
def test_a_file_in_a_directory_under_dev_shm_moves(run_victim, broken):
    where = Path(tempfile.mkdtemp(prefix="upmig-test-", dir="/dev/shm"))
    name = f"{where.name}-obj"
    try:
        r = run_victim([sys.executable, "-S", str(VICTIMS / "tmpfsfile.py"), str(where), name,
                        *(["break"] if broken else [])])
        r.wait_output("READY\n")
        img = r.dump()
        held = run_upmig("inspect", "--json", str(img)).stdout
        assert str(where / "log") in held
        r.resume(img)
        assert r.finish() == (1 if broken else 0), r.output()
        assert r.output().endswith("FAIL: the log holds b'before\\nafter\\n'\n" if broken
                                   else "READY\nPASS\n")
    finally:
        shutil.rmtree(where, ignore_errors=True)
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
