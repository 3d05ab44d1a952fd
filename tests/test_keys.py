"""The key that seals images: where it lives, how it is made, and what resume and
dump say when it is missing or unsafe (exit 9, one line)."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import run_upmig
from upmig import keys
from upmig.errors import KeyProblem


def test_default_paths(monkeypatch, tmp_path):
    monkeypatch.delenv(keys.ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert keys.default_path() == "/etc/upmig/key"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keys.default_path() == str(tmp_path / ".config" / "upmig" / "key")
    monkeypatch.setenv(keys.ENV, "/somewhere/else")
    assert keys.default_path() == "/somewhere/else"


def test_made_on_first_use_private_and_stable(tmp_path):
    path = tmp_path / "new" / "dir" / "key"
    made = keys.load(str(path), create=True)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == keys.MIN_BYTES
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = keys.load(str(path))
    assert (again.id, again.secret) == (made.id, made.secret)
    assert made.secret != path.read_bytes(), "the file's bytes are never the key itself"


def test_different_files_make_different_keys(tmp_path):
    a = keys.derive("a", b"x" * 32)
    b = keys.derive("b", b"x" * 31 + b"y")
    assert a.id != b.id and a.secret != b.secret


@pytest.mark.parametrize("mode,size,words", [
    (0o644, 32, "open to other users"),
    (0o600, 8, "32 to 65536 random bytes"),
])
def test_unsafe_key_is_refused(tmp_path, mode, size, words):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(size))
    path.chmod(mode)
    with pytest.raises(KeyProblem, match=words) as e:
        keys.load(str(path))
    assert e.value.exit_code == 9


def test_cli_refuses_with_exit_9(tmp_path):
    missing = tmp_path / "nokey"
    r = run_upmig("resume", "--key-file", str(missing), str(tmp_path / "any.upmig"),
                  check=False)
    assert r.returncode == 209 and r.stderr.count("\n") == 1  # resume's own 9
    assert f"upmig: {missing}: no key here" in r.stderr
    loose = tmp_path / "loose"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o640)
    r = run_upmig("dump", "1", "-o", str(tmp_path / "x.upmig"), "--key-file", str(loose),
                  check=False)
    assert r.returncode == 9 and "chmod 600" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.upmig").exists()
