"""The image file: one stream of sealed frames.

Grammar (little-endian):

    image   := header frame* trailer
    header  := MAGIC (8 bytes) version:u32 reserved:u32 key_id (8 bytes) salt (16 bytes)
    frame   := type:u32 length:u32 payload[length] tag (16 bytes)
    type    := 1 RECORD  payload is msgpack [kind, {field: value}] (upmig.records)
             | 2 DATA    payload is page bytes belonging to the last "pages" record
             | 3 TRAILER payload is a RECORD body of kind "trailer"; the last frame

Records come in order: the header, then one section per process of the tree, each
opened by its "process" record (the root first, a parent before its children) and
holding that process's records and page data.

The seal: every frame's tag is a GMAC (AES-256-GCM) of its head and payload, with
the frame's offset in the image as nonce, under a key of the image's own, derived
from the sealing key (upmig.keys) and the header's random salt. So without the
key no frame can be changed, moved, dropped or added, nor the salt or the trailer
(which ends the image and counts its records); the header's key id says whose key
sealed it. Frames are tagged in parallel as the pages are copied, while they are
in the cache, and checked in parallel on every CPU before anything is rebuilt.
GMAC rather than a keyed BLAKE3: on the CPUs this runs on (AES-NI and PCLMULQDQ,
AVX2 only) it is two to three times as fast, and it replaces the unkeyed checksum
the frames had, so sealing costs little more than that did.

Every record is then validated as it is read, and the records against each other once
all are (upmig.validate): a well-formed image whose contents are wrong is refused as
Corrupt too, naming the record and field, before inspect or resume use any of it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from upmig import _native
from upmig.errors import Corrupt, ImageError, NotSealed, Truncated, VersionTooNew
from upmig.keys import Key
from upmig.records import Pages, Process, Trailer, from_wire, to_wire

MAGIC = b"UPMIG\x00\x89\n"
VERSION = 5  # 2: per-thread state in Thread; 3: process trees (Process sections);
#             4: shared memory as Ghost files (no more "shmem" VMAs), CowPages; 5: sealed frames
HEADER = struct.Struct("<8sII8s16s")
FRAME_HEAD = struct.Struct("<II")
FRAME_TAIL = struct.Struct(f"<{_native.FRAME_TAIL}s")
RECORD, DATA, TRAILER = 1, 2, 3
MAX_PAYLOAD = 1 << 26  # no record or data frame is larger; a bigger length is corruption
RUNS_PER_RECORD = 1 << 16  # a pages record of this many runs packs to ~1.5 MiB


def frame(frame_key: bytes, off: int, ftype: int, payload: bytes) -> bytes:
    """One whole frame, to sit at offset off of an image whose frame key is frame_key."""
    head = FRAME_HEAD.pack(ftype, len(payload))
    return head + payload + _native.frame_tag(frame_key, off, head, payload)


def header(key: Key, salt: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, key.id, salt)


@dataclass
class PageSource:
    """Bytes for the image that the writer copies from where they are, never through
    Python: runs of a frozen process's memory (fd -1: process_vm_readv; else its
    /proc/PID/mem, which reads what mprotect hides), or, with a target ("ghost:ID",
    "sysv:ID"), runs of offsets in the file open at fd. The fd stays open until the
    image is written; pid names the process in errors."""

    pid: int
    fd: int
    runs: list[tuple[int, int]]
    target: str = ""


class ImageWriter:
    """Writes records and page data to an open fd, sealing each frame with key: a
    file (from its start), or a stream (a pipe or socket), which gets every byte in
    order and nothing else."""

    def __init__(self, fd: int, key: Key, progress: Callable[[int], None] | None = None):
        self.fd = fd
        self.stream = not stat.S_ISREG(os.fstat(fd).st_mode)
        self.records = 0
        self.data_bytes = 0
        self.progress = progress
        salt = os.urandom(16)
        self.frame_key = key.frame_key(salt)
        self.off = 0  # where the next frame goes
        self._write(header(key, salt))
        self._pages = _native.PageWriter(self.frame_key)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.off += len(data)

    def _frame(self, ftype: int, payload: bytes) -> None:
        self._write(frame(self.frame_key, self.off, ftype, payload))

    def record(self, rec: Any) -> None:
        self._frame(RECORD, msgpack.packb(to_wire(rec), use_bin_type=True))
        self.records += 1

    def write(self, item: Any) -> None:
        """A record, or the bytes a PageSource names."""
        if isinstance(item, PageSource):
            self.pages(item)
        else:
            self.record(item)

    def pages(self, src: PageSource) -> int:
        """Pages records for src's runs, each followed by its bytes copied straight
        from where they are by the C helper; records are kept well under MAX_PAYLOAD
        however fragmented memory is."""
        total = 0
        for at in range(0, len(src.runs), RUNS_PER_RECORD):
            part = src.runs[at:at + RUNS_PER_RECORD]
            nbytes = sum(e - s for s, e in part)
            self.record(Pages(runs=[x for run in part for x in run], nbytes=nbytes,
                              target=src.target))
            stats = self._pages.dump(src.pid, src.fd, part, self.fd, self.off, self.stream)
            self.off += stats.bytes + stats.frames * (FRAME_HEAD.size + FRAME_TAIL.size)
            self.data_bytes += stats.bytes
            total += stats.bytes
            if self.progress:
                self.progress(stats.bytes)
        return total

    def data(self, payload: bytes) -> None:
        """Page bytes for the last pages record, as given: for a tool that re-encodes
        an image (its pages records go through record())."""
        self._frame(DATA, payload)
        self.data_bytes += len(payload)

    def finish(self) -> None:
        trailer = Trailer(records=self.records + 1, data_bytes=self.data_bytes)
        self._frame(TRAILER, msgpack.packb(to_wire(trailer), use_bin_type=True))


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
    data: Any = field(repr=False, default=None)  # the image's bytes: a buffer

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
    holder: Any = field(repr=False, default=None)  # what data lives in: closed by close()

    def processes(self) -> list[Section]:
        return self.sections

    def close(self) -> None:
        self.data = None
        for sec in self.sections:
            sec.data = None
        if self.holder is not None:
            self.holder.close()
            self.holder = None


STDIN = "-"  # the path that means: the image comes on standard input
PIPE_SIZE = 1 << 20  # the most an unprivileged process may ask for


def load(path: str, *, key: Key | None = None) -> Image:
    """Open, check, then parse and validate. Raises an ImageError subclass.
    path: a file, or "-" for standard input (a file, a pipe or a socket: a stream is
    read whole into memory, up to its trailer, before anything of it is used).
    key: refuse an image this key did not seal (NotSealed: another key's; Corrupt: a
    frame that does not match its tag); the image is then Image.sealed. Without a
    key only the structure and the records are checked (inspect, or an image this
    process has just written)."""
    what = "stdin" if path == STDIN else path
    try:
        fd = 0 if path == STDIN else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image: {e.strerror}", what=path) from None
    try:
        holder, data = _read(what, fd, key)
    finally:
        if fd != 0:
            os.close(fd)
    try:
        img = _parse(what, data, key)
    except BaseException:
        data = None
        holder.close()
        raise
    img.holder = holder
    return img


def _read(what: str, fd: int, key: Key | None) -> tuple[Any, Any]:
    """(what holds the image's bytes, the bytes as a buffer): a file mapped, or a
    stream read into memory."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _read_stream(what, fd, key)
        if st.st_size < HEADER.size:
            raise Truncated(f"image is truncated ({st.st_size} bytes, not even a header)",
                            what=what)
        data = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    except OSError as e:
        raise ImageError(f"cannot read image: {e.strerror}", what=what) from None
    return data, data


def _read_stream(what: str, fd: int, key: Key | None) -> tuple[Any, Any]:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # fewer, larger reads
    except OSError:
        pass  # not a pipe, or a smaller limit: it only goes slower
    head = b""
    while len(head) < HEADER.size:
        part = os.read(fd, HEADER.size - len(head))
        if not part:
            raise Truncated(f"image is truncated ({len(head)} bytes, not even a header)",
                            what=what)
        head += part
    _check_header(what, head, key)  # before gigabytes of someone else's stream are read
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = _native.StreamedImage(fd, head, MAX_PAYLOAD, memory)
    if got.error == errno.EFBIG:
        got.close()
        raise ImageError(f"the image stream is larger than this machine's memory "
                         f"({memory >> 20} MiB)", what=what)
    # A stream that ended early or went astray is read as far as it came: the walk
    # of its frames then says what is wrong, and where.
    return got, got.buf


def sealed_by(img: Image, key: Key) -> bool:
    """Whether key sealed this (loaded) image."""
    _, _, _, key_id, salt = HEADER.unpack_from(img.data, 0)
    if key_id != key.id:
        return False
    rc, _ = _native.verify_frames(img.data, HEADER.size, key.frame_key(salt), MAX_PAYLOAD)
    return rc >= 0


def _check_header(path: str, data: Any, key: Key | None) -> tuple[bytes, bytes]:
    """The header's key id and salt, once magic, version and key id are right."""
    magic, version, reserved, key_id, salt = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise Corrupt("not an upmig image (bad magic)", what=path)
    if version > VERSION:
        raise VersionTooNew(f"image format {version} is newer than this upmig reads "
                            f"({VERSION}); upgrade upmig", what=path)
    if version != VERSION:
        raise Corrupt(f"image format version {version} is older than this upmig reads ({VERSION}); "
                      "resume it with the upmig that made it", what=path)
    if reserved:  # the one header field no tag covers: it must be what it was
        raise Corrupt("image is corrupt: bad header", what=path)
    if key is not None and key_id != key.id:
        raise NotSealed(f"the image was not sealed with this machine's key ({key.path}, id "
                        f"{key.id.hex()}) but with key id {key_id.hex()}; resume it where "
                        "that key is, or share the key", what=path)
    return key_id, salt


def _parse(path: str, data: Any, key: Key | None) -> Image:
    if len(data) < HEADER.size:
        raise Truncated(f"image is truncated ({len(data)} bytes, not even a header)",
                        what=path)
    _, salt = _check_header(path, data, key)
    frame_key = key.frame_key(salt) if key is not None else None
    rc, off = _native.verify_frames(data, HEADER.size, frame_key, MAX_PAYLOAD)
    if rc < 0:
        _verify_failed(path, rc, off, len(data))
    img = _records(path, data)
    img.sealed = key is not None
    return img


def _verify_failed(path: str, rc: int, off: int, size: int) -> None:
    if rc == -errno.ENODATA:
        raise Truncated(f"image is truncated at byte {size} (a frame at {off} is cut short "
                        "or the trailer is missing)", what=path)
    if rc == -errno.EBADMSG:
        raise Corrupt(f"image is corrupt or was changed after it was sealed: the frame at "
                      f"byte {off} does not match its seal", what=path)
    if rc == -errno.EMSGSIZE:
        raise Corrupt(f"image has bytes after its trailer (from byte {off})", what=path)
    raise Corrupt(f"image is corrupt: bad frame at byte {off}", what=path)


def _records(path: str, data: Any) -> Image:
    """Every record, and where each pages record's bytes are."""
    # Imported here: the schema names the state modules' constants, and they import this.
    from upmig.validate import Validator

    check = Validator(path)
    end = len(data)
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
                    raise Corrupt("image has bytes after its trailer", what=path)
                for sec in sections:
                    sec.data = data
                img = Image(path, records, pages, data, len(data), sections)
                check.finish(img)
                return img
            check.add(rec)
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
