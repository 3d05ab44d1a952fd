"""The key that seals images: resume trusts an image only if its own key sealed it.

A key file holds at least 32 secret bytes (made from /dev/urandom on first use;
any longer random file works, as with munge). Root's lives in /etc/upmig/key, a
user's in ~/.config/upmig/key; `--key-file` or UPMIG_KEY_FILE name another. The
nodes of a cluster share root's key, the way they share munge's. The bytes are
never used as they are: the sealing key and the key's public id are both derived
from them (BLAKE3's key derivation, one context string each)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import blake3

from upmig import _native
from upmig.errors import KeyProblem, from_oserror

ENV = "UPMIG_KEY_FILE"
ROOT_KEY = "/etc/upmig/key"
MIN_BYTES = 32
MAX_BYTES = 1 << 16  # a key file, not a data file: anything bigger is a mistake
SEAL_CONTEXT = "upmig 2026-12 image seal v1"
ID_CONTEXT = "upmig 2026-12 key id v1"
ID_BYTES = 8
FRAME_KEY_LABEL = b"upmig image frame key\0"


@dataclass(frozen=True)
class Key:
    """A loaded key: where it came from, its public id, and the sealing key."""

    path: str
    id: bytes                                        # safe to show and to store
    secret: bytes = field(repr=False)                # the 32-byte BLAKE3 key

    def frame_key(self, salt: bytes) -> bytes:
        """The key an image with this salt tags its frames with (upmig.image): each
        image its own, so that frame offsets are nonces never used twice."""
        return blake3.blake3(FRAME_KEY_LABEL + salt, key=self.secret).digest()


def default_path() -> str:
    """UPMIG_KEY_FILE, else root's key for root, else the user's own."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if os.geteuid() == 0:
        return ROOT_KEY
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(config, "upmig", "key")


def load(path: str | None = None, *, create: bool = False) -> Key:
    """The key at path (default_path() if None). create: make it first if it does not
    exist (dump does: the first dump on a machine makes its key)."""
    path = path or default_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        if not create:
            raise KeyProblem("no key here to check the image's seal; copy the key of the "
                             "machine that dumped it (or pass --key-file)", what=path) from None
        return _create(path)
    except OSError as e:
        raise from_oserror(e, "cannot read the key", phase="key", what=path) from None
    try:
        return _from_fd(path, fd)
    finally:
        os.close(fd)


def _from_fd(path: str, fd: int) -> Key:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise KeyProblem("the key is not a regular file", what=path)
    if st.st_uid not in (os.geteuid(), 0):
        raise KeyProblem(f"the key belongs to uid {st.st_uid}; only its user or root may "
                         "own a key", what=path)
    if st.st_mode & 0o077:
        raise KeyProblem(f"the key is open to other users (mode {st.st_mode & 0o777:o}); "
                         "chmod 600 it", what=path)
    if not MIN_BYTES <= st.st_size <= MAX_BYTES:
        raise KeyProblem(f"a key holds {MIN_BYTES} to {MAX_BYTES} random bytes; this one "
                         f"has {st.st_size}", what=path)
    return derive(path, os.pread(fd, st.st_size, 0))


def derive(path: str, material: bytes) -> Key:
    """The Key a key file's bytes make."""
    secret = blake3.blake3(material, derive_key_context=SEAL_CONTEXT).digest()
    key_id = blake3.blake3(material, derive_key_context=ID_CONTEXT).digest(ID_BYTES)
    return Key(path, key_id, secret)


def _create(path: str) -> Key:
    """A new random key at path, appearing whole or not at all (another upmig making
    the same key at once wins, and its key is used)."""
    where = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        fd = os.open(where, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise from_oserror(e, "cannot make a key", phase="key", what=path) from None
    try:
        material = os.urandom(MIN_BYTES)
        os.write(fd, material)
        os.fsync(fd)
        try:
            _native.link_fd(fd, path)
        except FileExistsError:
            return load(path)
        except OSError as e:
            raise from_oserror(e, "cannot make a key", phase="key", what=path) from None
    finally:
        os.close(fd)
    return derive(path, material)
