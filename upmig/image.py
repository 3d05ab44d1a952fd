"""The image file: one stream of checksummed frames.

Grammar (little-endian):

    image   := header frame* trailer seal
    header  := MAGIC (8 bytes) version:u32 reserved:u32
    frame   := type:u32 length:u32 payload[length] hash:u64
    type    := 1 RECORD  payload is msgpack [kind, {field: value}] (upmig.records)
             | 2 DATA    payload is page bytes belonging to the last "pages" record
             | 3 TRAILER payload is a RECORD body of kind "trailer"; the last frame
    seal    := key_id (8 bytes) tag (32 bytes)

Records come in order: the header, then one section per process of the tree, each
opened by its "process" record (the root first, a parent before its children) and
holding that process's records and page data.

Each frame's tail is its own hash (XXH64 over head and payload) chained onto the
previous tail (XXH64 of the frame hash seeded with it; the first is seeded with
XXH64 of the header). Frames can be hashed in parallel while dumping; every frame
can still be checked as it streams by, and the trailer's tail covers the whole
image: a cut, a flipped byte, a dropped or reordered frame are all caught before
anything is rebuilt.

Those hashes are not keyed: anyone can write an image they accept. What makes an
image trusted is its seal, a keyed BLAKE3 (upmig.keys) of every byte before the
tag: resume checks it first and refuses an image its own key did not seal. When
the seal is right the frame hashes are not checked again (the seal covers them);
when it is wrong they tell a corrupted image from one sealed with another key.
"""

from __future__ import annotations

import errno
import hmac
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from upmig import _native, critical
from upmig.errors import Corrupt, ImageError, NotSealed, Truncated, VersionTooNew
from upmig.keys import Key
from upmig.records import Pages, Process, Trailer, from_wire, to_wire

MAGIC = b"UPMIG\x00\x89\n"
VERSION = 5  # 2: per-thread state in Thread; 3: process trees (Process sections);
#             4: shared memory as Ghost files (no more "shmem" VMAs), CowPages; 5: seal
HEADER = struct.Struct("<8sII")
SEAL = struct.Struct("<8s32s")
TAG_BYTES = 32
FRAME_HEAD = struct.Struct("<II")
FRAME_TAIL = struct.Struct("<Q")
RECORD, DATA, TRAILER = 1, 2, 3
MAX_PAYLOAD = 1 << 26  # no record or data frame is larger; a bigger length is corruption
RUNS_PER_RECORD = 1 << 16  # a pages record of this many runs packs to ~1.5 MiB


def seal(chain: int, ftype: int, payload: bytes) -> tuple[bytes, int]:
    """One whole frame following a frame whose tail was chain; and its own tail."""
    head = FRAME_HEAD.pack(ftype, len(payload))
    chain = _native.chain_hash(chain, _native.frame_hash(head, payload))
    return head + payload + FRAME_TAIL.pack(chain), chain


class ImageWriter:
    """Writes records and page data to an open fd, keeping the hash chain."""

    def __init__(self, fd: int, key: Key, progress: Callable[[int], None] | None = None):
        self.fd = fd
        self.key = key
        self.records = 0
        self.data_bytes = 0
        self.progress = progress
        header = HEADER.pack(MAGIC, VERSION, 0)
        self._write(header)
        self.chain = _native.xxh64(header)
        self._pages = _native.PageWriter()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _frame(self, ftype: int, payload: bytes) -> None:
        frame, self.chain = seal(self.chain, ftype, payload)
        self._write(frame)

    def record(self, rec: Any) -> None:
        self._frame(RECORD, msgpack.packb(to_wire(rec), use_bin_type=True))
        self.records += 1

    def pages(self, pid: int, mem_fd: int, runs: list[tuple[int, int]], target: str = ""
              ) -> int:
        """Pages records for runs, each followed by its bytes copied straight from the
        target; records are kept well under MAX_PAYLOAD however fragmented memory is.
        With a target ("ghost:ID"), mem_fd is that file and runs are offsets in it."""
        total = 0
        for at in range(0, len(runs), RUNS_PER_RECORD):
            part = runs[at:at + RUNS_PER_RECORD]
            nbytes = sum(e - s for s, e in part)
            self.record(Pages(runs=[x for run in part for x in run], nbytes=nbytes,
                              target=target))
            stats = self._pages.dump(pid, mem_fd, part, self.fd, self.chain)
            self.chain = stats.hash
            self.data_bytes += stats.bytes
            total += stats.bytes
            if self.progress:
                self.progress(stats.bytes)
        return total

    def finish(self) -> None:
        """The trailer, then the seal over everything written (read back from the
        file: the pages went there straight from the process)."""
        trailer = Trailer(records=self.records + 1, data_bytes=self.data_bytes)
        self._frame(TRAILER, msgpack.packb(to_wire(trailer), use_bin_type=True))
        size = os.lseek(self.fd, 0, os.SEEK_CUR)
        with mmap.mmap(self.fd, size, prot=mmap.PROT_READ) as data:
            self._write(self.key.id + seal_tag(self.key, data, self.key.id))


def seal_tag(key: Key, frames, key_id: bytes) -> bytes:
    """The keyed hash of an image's frames (header to trailer) and its key id."""
    # The hash runs on a pool of threads made at its first use, which inherit this
    # thread's signal mask: made with the stop signals blocked, they never take one
    # meant for upmig (say, once Python's handlers are gone at exit).
    with critical.deferred():
        h = key.hasher()
        h.update(frames)
        h.update(key_id)
        return h.digest(TAG_BYTES)


@dataclass
class PageData:
    """A pages record and where its bytes sit in the mapped image."""

    runs: list[tuple[int, int]]
    chunks: list[tuple[int, int]]  # (offset in image, length)
    target: str = ""               # as in records.Pages

    def sources(self, base: int) -> list[tuple[int, int]]:
        """Its bytes as address ranges in upmig, the image being mapped at base."""
        return [(base + off, base + off + n) for off, n in self.chunks]


@dataclass
class Records:
    """Records in image order and their page data, the image being mapped at data."""

    path: str
    records: list[Any]
    pages: list[PageData]
    data: mmap.mmap | None = field(repr=False, default=None)

    def of(self, cls: type) -> list[Any]:
        return [r for r in self.records if isinstance(r, cls)]

    def one(self, cls: type) -> Any:
        found = self.of(cls)
        if len(found) != 1:
            raise Corrupt(f"expected one {cls.kind} record, found {len(found)}", what=self.path)
        return found[0]


@dataclass
class Section(Records):
    """One process of the tree: its Process record and every record up to the next."""

    process: Process | None = None


@dataclass
class Image(Records):
    """A verified image: all its records, and each process's share of them."""

    size: int = 0
    sections: list[Section] = field(default_factory=list)
    sealed: bool = False     # the key load() was given sealed it

    def processes(self) -> list[Section]:
        return self.sections

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None


def load(path: str, *, key: Key | None = None, checksums: bool = True) -> Image:
    """Open, check, then parse. Raises an ImageError subclass.
    key: refuse (NotSealed) an image this key did not seal; the image is then
    Image.sealed. Without a key the seal is not looked at; checksums=False then
    checks only the structure and the records (for an image this process has just
    written and hashed itself)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image: {e.strerror}", what=path) from None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER.size:
            raise Truncated(f"image is truncated ({size} bytes, not even a header)", what=path)
        data = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except OSError as e:
        raise ImageError(f"cannot read image: {e.strerror}", what=path) from None
    finally:
        os.close(fd)
    try:
        return _parse(path, data, key, checksums)
    except BaseException:
        data.close()
        raise


def sealed_by(img: Image, key: Key) -> bool:
    """Whether key sealed this (loaded) image."""
    return _seal_holds(img.data, img.size - SEAL.size, key)


def _parse(path: str, data: mmap.mmap, key: Key | None, checksums: bool) -> Image:
    magic, version, _ = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise Corrupt("not an upmig image (bad magic)", what=path)
    if version > VERSION:
        raise VersionTooNew(f"image format {version} is newer than this upmig reads "
                            f"({VERSION}); upgrade upmig", what=path)
    if version != VERSION:
        raise Corrupt(f"image format version {version} is older than this upmig reads ({VERSION}); "
                      "resume it with the upmig that made it", what=path)
    if len(data) < HEADER.size + SEAL.size:
        raise Truncated(f"image is truncated at byte {len(data)}", what=path)
    end = len(data) - SEAL.size  # where the frames end and the seal begins
    frames = memoryview(data)[:end]
    try:
        sealed = key is not None and _seal_holds(data, end, key)
        if (key is not None and not sealed) or (key is None and checksums):
            _check_frames(path, frames)
        if key is not None and not sealed:
            raise _not_sealed(path, data, end, key)
    finally:
        frames.release()
    img = _records(path, data, end)
    img.sealed = sealed
    return img


def _seal_holds(data: mmap.mmap, end: int, key: Key) -> bool:
    key_id, tag = SEAL.unpack_from(data, end)
    with memoryview(data)[:end] as frames:
        return hmac.compare_digest(seal_tag(key, frames, key_id), tag)


def _check_frames(path: str, frames: memoryview) -> None:
    seed = _native.xxh64(frames[:HEADER.size])
    rc, off, _ = _native.verify_frames(frames, HEADER.size, seed, MAX_PAYLOAD)
    if rc < 0:
        _verify_failed(path, rc, off, len(frames))


def _not_sealed(path: str, data: mmap.mmap, end: int, key: Key) -> NotSealed:
    """The frames are intact (checked): the seal is another key's, or was forged."""
    key_id, _ = SEAL.unpack_from(data, end)
    if key_id != key.id:
        return NotSealed(f"the image was not sealed with this machine's key ({key.path}, id "
                         f"{key.id.hex()}) but with key id {key_id.hex()}; resume it where "
                         "that key is, or share the key", what=path)
    return NotSealed(f"the image's seal does not match its contents: it was changed after "
                     f"it was sealed (key {key.path})", what=path)


def _verify_failed(path: str, rc: int, off: int, size: int) -> None:
    if rc == -errno.ENODATA:
        raise Truncated(f"image is truncated at byte {size} (a frame at {off} is cut short "
                        "or the trailer is missing)", what=path)
    if rc == -errno.EBADMSG:
        raise Corrupt(f"image is corrupt: checksum mismatch in the frame at byte {off}",
                      what=path)
    raise Corrupt(f"image is corrupt: bad frame at byte {off}", what=path)


def _records(path: str, data: mmap.mmap, end: int) -> Image:
    """Every record and where each pages record's bytes are; frames end at end."""
    records: list[Any] = []
    pages: list[PageData] = []
    sections: list[Section] = []
    off = HEADER.size
    want = 0  # data bytes still owed to the last pages record
    while True:
        if off + FRAME_HEAD.size > end:
            raise Truncated(f"image is truncated at byte {len(data)}", what=path)
        ftype, length = FRAME_HEAD.unpack_from(data, off)
        body = off + FRAME_HEAD.size
        if ftype not in (RECORD, DATA, TRAILER) or length > MAX_PAYLOAD:
            raise Corrupt(f"image is corrupt: bad frame at byte {off}", what=path)
        if body + length + FRAME_TAIL.size > end:
            raise Truncated(f"image is truncated at byte {len(data)}", what=path)
        if ftype == DATA:
            if not pages or length > want:
                raise Corrupt(f"unexpected page data at byte {off}", what=path)
            pages[-1].chunks.append((body, length))  # shared with its section's list
            want -= length
        else:
            if want:
                raise Corrupt(f"page data missing before byte {off}", what=path)
            rec = _decode(path, data[body:body + length], off)
            if ftype == TRAILER:
                if not isinstance(rec, Trailer) or rec.records != len(records) + 1:
                    raise Corrupt("trailer does not match the records", what=path)
                if body + length + FRAME_TAIL.size != end:
                    raise Corrupt("image has bytes between its trailer and its seal",
                                  what=path)
                for sec in sections:
                    sec.data = data
                return Image(path, records, pages, data, len(data), sections)
            records.append(rec)
            if isinstance(rec, Process):
                sections.append(Section(path, [], [], None, rec))
            if sections:
                sections[-1].records.append(rec)
            if isinstance(rec, Pages):
                runs = _runs(path, rec, off)
                pages.append(PageData(runs, [], rec.target))
                if sections:
                    sections[-1].pages.append(pages[-1])
                want = rec.nbytes
        off = body + length + FRAME_TAIL.size


def _runs(path: str, rec: Pages, off: int) -> list[tuple[int, int]]:
    """The runs of a pages record, checked: page-aligned, ordered, summing to nbytes."""
    flat = rec.runs
    ok = isinstance(flat, list) and len(flat) % 2 == 0 and isinstance(rec.nbytes, int)
    runs = list(zip(flat[0::2], flat[1::2], strict=True)) if ok else []
    aligned = 0xFFF if not rec.target else 0  # file contents end where the file does
    ok = ok and isinstance(rec.target, str) and all(
        isinstance(a, int) and isinstance(b, int) and a < b and not (a | b) & aligned
        for a, b in runs)
    if not ok or sum(b - a for a, b in runs) != rec.nbytes:
        raise Corrupt(f"malformed pages record at byte {off}", what=path)
    return runs


def _decode(path: str, payload: bytes, off: int) -> Any:
    try:
        kind, body = msgpack.unpackb(payload, raw=False)
        return from_wire(kind, body)
    except Exception as e:  # any malformed record is the same fault to the user
        raise Corrupt(f"unreadable record at byte {off} ({type(e).__name__})",
                      what=path) from None
