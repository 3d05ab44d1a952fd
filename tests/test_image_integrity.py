"""Every damaged or forged image is refused with an ImageError, before anything is
rebuilt.

One real image (the counter victim, dumped with --leave-running) is cut at every
frame boundary and at random points, and has bytes flipped in its header, in every
frame head and tail and at random places in the payloads; upmig.image.load() with
the session's key must refuse each one with the right ImageError subclass. Images
changed and sealed again with another key, or with every tag left as it was, are
refused too. A few of them go through the command line: exit status 6 (resume's
own 206), one `upmig:` line, no process created."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import msgpack
import pytest

from conftest import ROOT, build_victim, run_upmig, wait_for
from upmig import _native, _proc, image, keys
from upmig.errors import Corrupt, ImageError, NotSealed, Truncated, VersionTooNew
from upmig.records import Pages, Vma

H, FH, FT = image.HEADER.size, image.FRAME_HEAD.size, image.FRAME_TAIL.size
DAMAGED = (Corrupt, Truncated, VersionTooNew)
STUB = ROOT / "upmig" / "upmig-stub"


def test_the_frame_format_is_the_helpers():
    """image.py frames what the C helper writes and checks: helper.h defines it."""
    assert image.FRAME_HEAD.size == _native.FRAME_HEAD
    assert image.FRAME_TAIL.size == _native.FRAME_TAIL
    assert (image.RECORD, image.DATA, image.TRAILER) == (1, 2, 3)  # the grammar above


# ---- the image under test

@pytest.fixture(scope="module")
def real_image(tmp_path_factory) -> bytes:
    """The bytes of a real image of the counter victim."""
    d = tmp_path_factory.mktemp("integrity")
    out = d / "stdout.txt"
    with open(out, "wb") as f:
        proc = subprocess.Popen([str(build_victim("counter"))], cwd=d, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT, close_fds=True)
    try:
        wait_for(lambda: "READY\n" in out.read_text(), 20, "READY")
        img = d / "counter.upmig"
        run_upmig("dump", str(proc.pid), "-o", str(img), "--leave-running")
        assert proc.poll() is None, "--leave-running must leave the victim running"
        return img.read_bytes()
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def frames(real_image) -> list[tuple[int, int, int]]:
    """(offset, type, payload length) of every frame, walked with the format's structs."""
    out = []
    off = H
    while off < len(real_image):
        ftype, length = image.FRAME_HEAD.unpack_from(real_image, off)
        out.append((off, ftype, length))
        off += FH + length + FT
    assert off == len(real_image), "the frames must tile the image exactly"
    return out


@pytest.fixture
def work(tmp_path, real_image) -> Path:
    p = tmp_path / "work.upmig"
    p.write_bytes(real_image)
    return p


def _load_fails(path: Path, key: keys.Key) -> ImageError | str:
    """The ImageError load() raised, or a description of what went wrong instead."""
    try:
        img = image.load(str(path), key=key)
    except ImageError as e:
        return e
    except Exception as e:  # noqa: BLE001 - that is what is being checked
        return f"{type(e).__name__}: {e}"
    img.close()
    return "load() succeeded"


def _not_mapped_or_open(path: Path) -> None:
    """load() must not leak the fd or the mapping of an image it refused."""
    name = str(path)
    with open("/proc/self/maps") as f:
        assert name not in f.read(), "a refused image is still mapped"
    for fd in os.listdir("/proc/self/fd"):
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") != name, "a refused image is still open"
        except FileNotFoundError:
            pass


# ---- the valid image

def test_frame_walk(real_image, frames, test_key):
    magic, version, reserved, key_id, _ = image.HEADER.unpack_from(real_image, 0)
    assert (magic, version, reserved, key_id) == (image.MAGIC, image.VERSION, 0, test_key.id)
    types = [t for _, t, _ in frames]
    assert types[0] == image.RECORD and types[-1] == image.TRAILER
    assert types.count(image.TRAILER) == 1
    assert image.DATA in types


def test_valid_image_round_trip(tmp_path, real_image, frames, test_key):
    p = tmp_path / "ok.upmig"
    p.write_bytes(real_image)
    img = image.load(str(p), key=test_key)
    try:
        kinds = {r.kind for r in img.records}
        assert {"header", "task", "mm", "signals", "thread", "vma", "fd_path",
                "pages"} <= kinds
        assert "trailer" not in kinds
        assert img.size == len(real_image)
        # Every RECORD frame is one record, in order.
        assert len(img.records) == sum(t == image.RECORD for _, t, _ in frames)
        assert img.pages, "the counter victim has dirty pages"
        pages = img.of(Pages)
        assert len(pages) == len(img.pages)
        for rec, pd in zip(pages, img.pages, strict=True):
            run_bytes = sum(e - s for s, e in pd.runs)
            assert sum(n for _, n in pd.chunks) == run_bytes == rec.nbytes
            for s, e in pd.runs:
                assert s < e and s % 4096 == 0 and e % 4096 == 0
            for at, n in pd.chunks:
                assert 0 < at and at + n <= img.size
        data_frames = [(off + FH, n) for off, t, n in frames if t == image.DATA]
        assert [c for pd in img.pages for c in pd.chunks] == data_frames
        # The data frames hold what the image maps there.
        at, n = data_frames[0]
        assert img.data[at:at + n] == real_image[at:at + n]
        # The pages stored are what the vma records account for.
        assert sum(v.data_bytes for v in img.of(Vma)) == sum(p.nbytes for p in pages)
    finally:
        img.close()
    assert img.data is None


# ---- truncation

def _truncation_points(size: int, frames: list[tuple[int, int, int]]) -> list[int]:
    cuts = set(range(0, 21))
    for off, _, length in frames:
        for b in (off, off + FH, off + FH + length, off + FH + length + FT):
            cuts.update((b - 1, b, b + 1))
    cuts.update(random.Random(0x5EED).sample(range(1, size), 200))
    return sorted(c for c in cuts if 0 <= c < size)


def test_truncated_everywhere_is_refused(work, real_image, frames, test_key):
    cuts = _truncation_points(len(real_image), frames)
    assert len(cuts) > 300
    bad = []
    # Cutting the same file shorter and shorter: each prefix is a cut image.
    for n in reversed(cuts):
        os.truncate(work, n)
        got = _load_fails(work, test_key)
        if not isinstance(got, Truncated):
            bad.append(f"cut at {n}: {got!r}")
    assert not bad, f"{len(bad)} of {len(cuts)} cuts not refused as Truncated:\n" + \
        "\n".join(bad[:20])
    _not_mapped_or_open(work)


def test_truncated_message_says_so(work, real_image, frames):
    last = frames[-1][0]          # just the trailer missing
    os.truncate(work, last)
    with pytest.raises(Truncated, match="truncated") as e:
        image.load(str(work))
    assert e.value.what == str(work)
    assert e.value.exit_code == 6


def test_empty_image_is_truncated(work):
    os.truncate(work, 0)
    with pytest.raises(Truncated):
        image.load(str(work))


def test_missing_image(tmp_path):
    with pytest.raises(ImageError, match="cannot open image"):
        image.load(str(tmp_path / "nope.upmig"))


# ---- corruption

def _corruption_cases(size: int, frames: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(position, xor mask): every byte of the header and of every frame head and tail
    with 0xFF and 0x01, and 400 random payload bytes (alternating masks)."""
    cases = [(i, m) for i in range(H) for m in (0xFF, 0x01)]
    payload = []
    for off, _, length in frames:
        tail = off + FH + length
        for i in (*range(off, off + FH), *range(tail, tail + FT)):
            cases += [(i, 0xFF), (i, 0x01)]
        payload += range(off + FH, tail)
    picks = random.Random(0xC0FFEE).sample(payload, min(400, len(payload)))
    cases += [(i, 0xFF if k % 2 else 0x01) for k, i in enumerate(picks)]
    return cases


def _frame_at(frames: list[tuple[int, int, int]], pos: int) -> tuple[int, int, int]:
    for f in frames:
        if f[0] <= pos < f[0] + FH + f[2] + FT:
            return f
    raise AssertionError(f"no frame holds byte {pos}")


def _expected(pos: int, mask: int, frames: list[tuple[int, int, int]]) -> tuple[tuple, str]:
    """What a flip at pos must be reported as: (allowed classes, text in the message)."""
    if pos < 8:
        return (Corrupt,), "bad magic"
    if pos < 12:                                 # version: 1 ^ mask
        new = image.VERSION ^ (mask << (8 * (pos - 8)))
        return ((VersionTooNew,), "upgrade") if new > image.VERSION else \
            ((Corrupt,), "version")
    if pos < 16:                                 # reserved: must be zero
        return (Corrupt,), "bad header"
    if pos < 24:                                 # key id: not ours
        return (NotSealed,), "not sealed with this machine's key"
    if pos < H:                                  # salt: another frame key, no tag fits
        return (Corrupt,), f"frame at byte {H}"
    off, _, length = _frame_at(frames, pos)
    if off <= pos < off + 4:                     # frame type
        return (Corrupt,), f"frame at byte {off}"
    if pos < off + FH:                           # frame length: too long reads as a cut
        return (Corrupt, Truncated), ""
    return (Corrupt,), f"frame at byte {off}"    # payload or tag: does not match its seal


def test_flipped_bytes_are_refused(work, real_image, frames, test_key):
    cases = _corruption_cases(len(real_image), frames)
    assert len(cases) > 1000
    bad = []
    with open(work, "r+b", buffering=0) as f:
        for pos, mask in cases:
            f.seek(pos)
            f.write(bytes([real_image[pos] ^ mask]))
            got = _load_fails(work, test_key)
            f.seek(pos)
            f.write(real_image[pos:pos + 1])
            classes, text = _expected(pos, mask, frames)
            if not isinstance(got, classes) or text not in str(got):
                bad.append(f"byte {pos} ^ {mask:#x}: {got!r} ({got}); wanted "
                           f"{[c.__name__ for c in classes]} saying {text!r}")
    assert not bad, f"{len(bad)} of {len(cases)} flips not refused as expected:\n" + \
        "\n".join(bad[:20])
    # Flipped back, the image is whole again: the failures were the flips.
    image.load(str(work), key=test_key).close()
    _not_mapped_or_open(work)


def _reframe(real_image: bytes, frames, order: list[int]) -> bytes:
    """The header and the frames with the given indexes, bytes unchanged."""
    parts = [real_image[:H]]
    for i in order:
        off, _, length = frames[i]
        parts.append(real_image[off:off + FH + length + FT])
    return b"".join(parts)


def test_dropped_reordered_duplicated_frames(work, real_image, frames, test_key):
    n = len(frames)
    data_i = next(i for i, (_, t, _) in enumerate(frames) if t == image.DATA)
    variants = {
        "drop the first record": list(range(1, n)),
        "drop a middle record": [i for i in range(n) if i != n // 2],
        "drop a data frame": [i for i in range(n) if i != data_i],
        "swap two records": [1, 0, *range(2, n)],
        "duplicate a record": [0, 0, *range(1, n)],
        "trailer twice": [*range(n), n - 1],
        "trailer only": [n - 1],
    }
    bad = []
    for what, order in variants.items():
        work.write_bytes(_reframe(real_image, frames, order))
        got = _load_fails(work, test_key)
        if not isinstance(got, DAMAGED):
            bad.append(f"{what}: {got!r}")
    assert not bad, "\n".join(bad)


def test_garbage_after_the_trailer(work, real_image):
    for extra in (b"\0", b"x" * 7, real_image[H:H + 64]):
        work.write_bytes(real_image + extra)
        with pytest.raises(Corrupt, match="bytes after its trailer"):
            image.load(str(work))


def test_newer_version(work, real_image):
    data = bytearray(real_image)
    struct.pack_into("<8sI", data, 0, image.MAGIC, image.VERSION + 1)
    work.write_bytes(bytes(data))           # nothing else fixed: the version is read first
    with pytest.raises(VersionTooNew) as e:
        image.load(str(work))
    msg = str(e.value)
    assert "upgrade" in msg and str(image.VERSION + 1) in msg
    assert e.value.exit_code == 6


def _resealed(real_image: bytes, frames, key: keys.Key, change) -> bytes:
    """The image with change(index, ftype, payload) applied to every frame's payload,
    each frame sealed again under key (any key: a test's own, or a stolen one)."""
    salt = os.urandom(16)
    out = bytearray(image.header(key, salt))
    frame_key = key.frame_key(salt)
    for i, (off, ftype, length) in enumerate(frames):
        payload = change(i, ftype, real_image[off + FH:off + FH + length])
        out += image.frame(frame_key, len(out), ftype, payload)
    return bytes(out)


def test_record_that_is_not_msgpack_with_a_good_seal(work, real_image, frames, test_key):
    """A frame whose seal is right but whose record is nonsense (a writer bug, or a
    key holder's mischief) is still refused as Corrupt, not with a random exception."""
    for bad in (b"\xc1", msgpack.packb(["no-such-kind", {}]), msgpack.packb(["task", {}]),
                msgpack.packb(42)):
        work.write_bytes(_resealed(real_image, frames, test_key,
                                   lambda i, t, p, bad=bad: bad if i == 0 else p))
        with pytest.raises(Corrupt, match="unreadable record"):
            image.load(str(work), key=test_key)


# ---- the seal

def test_sealed_with_the_sessions_key(work, test_key):
    img = image.load(str(work), key=test_key)
    assert img.sealed
    img.close()
    assert image.HEADER.unpack_from(work.read_bytes(), 0)[3] == test_key.id


def test_another_keys_image_is_refused_naming_both_keys(work, test_key, tmp_path):
    other = keys.derive(str(tmp_path / "other"), os.urandom(32))
    with pytest.raises(NotSealed) as e:
        image.load(str(work), key=other)
    assert e.value.exit_code == 6
    assert test_key.id.hex() in str(e.value) and other.id.hex() in str(e.value)
    _not_mapped_or_open(work)


def _other_uid(_i, ftype, payload):
    if ftype != image.RECORD:
        return payload
    kind, body = msgpack.unpackb(payload, raw=False)
    if kind == "task":
        body["uids"] = [4321] * 4
    return msgpack.packb([kind, body], use_bin_type=True)


def test_resealed_with_another_key_and_our_id_is_refused(work, real_image, frames, test_key,
                                                          tmp_path):
    """Someone without the key rewrites the image with upmig's own code, seals it
    with a key of theirs and puts our key id in the header: no frame verifies."""
    forger = keys.Key(test_key.path, test_key.id, os.urandom(32))
    work.write_bytes(_resealed(real_image, frames, forger, _other_uid))
    image.load(str(work)).close()  # well-formed: only the seal can tell
    with pytest.raises(Corrupt, match=f"frame at byte {H} does not match its seal"):
        image.load(str(work), key=test_key)


def test_a_frame_moved_from_another_image_is_refused(work, real_image, frames, test_key):
    """Two images sealed with one key: a frame of one, at the same place in the
    other, does not verify there (each image has a key of its own)."""
    twin = _resealed(real_image, frames, test_key, lambda i, t, p: p)
    image.load(str(work), key=test_key).close()
    off, _, length = frames[len(frames) // 2]
    end = off + FH + length + FT
    work.write_bytes(real_image[:off] + twin[off:end] + real_image[end:])
    with pytest.raises(Corrupt, match=f"frame at byte {off}"):
        image.load(str(work), key=test_key)


def test_cli_resume_refuses_another_keys_image(work, tmp_path):
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    before = _stub_children()
    r = run_upmig("resume", "--key-file", str(other), str(work), check=False)
    assert _stub_children() == before
    line = _one_error_line(r, work, 206)  # resume's own 6
    assert "not sealed with this machine's key" in line


def test_cli_inspect_says_whose_seal(work, tmp_path, test_key):
    r = run_upmig("inspect", "--json", str(work))
    seal = json.loads(r.stdout)["seal"]
    assert seal == {"key_id": test_key.id.hex(), "key": test_key.path, "sealed_by_my_key": True}
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    text = run_upmig("inspect", "--key-file", str(other), str(work)).stdout
    assert f"key id {test_key.id.hex()}: NOT sealed with this user's key {other}" in text


# ---- the command line on damaged images

def _stub_children() -> set[int]:
    """Processes running (or dead but unreaped) the stub whose parent is us: a stub
    left behind by a resume is reparented to this process, the subreaper."""
    me = os.getpid()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                st = _proc.parse_stat(f.read())
        except OSError:
            continue
        if st.ppid != me:
            continue
        try:
            exe = os.readlink(f"/proc/{name}/exe")
        except OSError:
            exe = ""   # a zombie has no exe; its comm stays
        if st.comm == STUB.name or exe.endswith(STUB.name):
            found.add(int(name))
    return found


def _bad_files(d: Path, real_image: bytes, frames) -> dict[str, Path]:
    data_off = next(off for off, t, _ in frames if t == image.DATA)
    files: dict[str, bytes | None] = {
        "cut-in-header": real_image[:10],
        "cut-in-data": real_image[:data_off + FH + 100],
        "no-trailer": real_image[:frames[-1][0]],
        "bad-magic": b"X" + real_image[1:],
        "bad-payload": _flip(real_image, data_off + FH + 4096),
        "bad-tail": _flip(real_image, frames[3][0] + FH + frames[3][2] + 2),
        "empty": b"",
        "missing": None,
        "too-new": _newer(real_image),
    }
    out = {}
    for name, content in files.items():
        p = d / f"{name}.upmig"
        if content is not None:
            p.write_bytes(content)
        out[name] = p
    non_image = d / "true.upmig"
    shutil.copyfile("/bin/true", non_image)
    out["non-image"] = non_image
    return out


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]


def _newer(data: bytes) -> bytes:
    b = bytearray(data)
    struct.pack_into("<8sI", b, 0, image.MAGIC, image.VERSION + 1)
    return bytes(b)


BAD = ["cut-in-header", "cut-in-data", "no-trailer", "bad-magic", "bad-payload", "bad-tail",
       "empty", "non-image", "missing", "too-new"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, real_image, frames) -> dict[str, Path]:
    return _bad_files(tmp_path_factory.mktemp("bad"), real_image, frames)


def _one_error_line(r: subprocess.CompletedProcess, path: Path, code: int = 6) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("upmig: ")
    assert str(path) in lines[0]
    assert r.stdout == ""
    return lines[0]


# Damage that leaves the structure whole: inspect shows such an image, as it shows
# anyone's, and says the seal does not hold; only resume must refuse it.
UNSEALED = ["bad-payload", "bad-tail"]


@pytest.mark.parametrize("name", [n for n in BAD if n not in UNSEALED])
def test_cli_inspect_refuses(bad_files, name):
    path = bad_files[name]
    line = _one_error_line(run_upmig("inspect", str(path), check=False), path)
    if name == "too-new":
        assert "upgrade" in line
    _one_error_line(run_upmig("inspect", "--json", str(path), check=False), path)


@pytest.mark.parametrize("name", UNSEALED)
def test_cli_inspect_shows_a_damaged_image_as_not_sealed(bad_files, name):
    r = run_upmig("inspect", "--json", str(bad_files[name]))
    assert json.loads(r.stdout)["seal"]["sealed_by_my_key"] is False


@pytest.mark.parametrize("name", BAD)
def test_cli_resume_refuses_before_any_process_exists(bad_files, name):
    path = bad_files[name]
    before = _stub_children()
    try:
        r = run_upmig("resume", str(path), check=False, timeout=30)
        # Anything the resume left behind has been handed to us, the subreaper.
        leaked = _stub_children() - before
    finally:
        for pid in _stub_children() - before:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    assert not leaked, f"resume of a bad image left stub processes {leaked}"
    line = _one_error_line(r, path, 206)
    if name == "too-new":
        assert "upgrade" in line


def test_stub_detection_sees_a_stub(tmp_path):
    """The leak check above can see a stub child: run one by hand (it exits at once,
    staying a zombie until reaped, which is enough to be seen) and look."""
    before = _stub_children()
    proc = subprocess.Popen([str(STUB)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)
    try:
        wait_for(lambda: proc.pid in _stub_children() - before, 5, "the stub to be seen")
    finally:
        proc.kill()
        assert proc.wait(timeout=10) in (2, -signal.SIGKILL)
