"""The image file: one stream of sealed frames.

Grammar (little-endian):

    image   := header record-frame* data-frame* trailer-frame
    header  := MAGIC (8 bytes) version:u32 reserved:u32 key_id (8 bytes) salt (16 bytes)
    frame   := type:u32 length:u32 payload[length] tag (16 bytes)
    type    := 1 RECORD  payload is msgpack [kind, {field: value}] (upmig.records)
             | 2 DATA    payload is page bytes of the oldest "pages" record still
                         owed some (each pages record's nbytes, in record order)
             | 3 TRAILER payload is a RECORD body of kind "trailer"; the last frame

Records come in order: the header, then one section per process of the tree, each
opened by its "process" record (the root first, a parent before its children) and
holding that process's records. All the page data follows all the records, in the
order of their pages records, which is the order resume uses it in (the tree's
SysV segments, then per process its ghost files' contents, then its memory): so
resume can check every record before it makes anything, then fill each process
straight from a stream as the bytes arrive (ResumeData).

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
import mmap
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from upmig import _native
from upmig.errors import (
    Corrupt,
    ImageError,
    NotSealed,
    RestoreError,
    Truncated,
    VersionTooNew,
    from_oserror,
)
from upmig.keys import Key
from upmig.newfile import enlarge_pipe
from upmig.records import Pages, Process, Trailer, from_wire, to_wire

MAGIC = b"UPMIG\x00\x89\n"
VERSION = 7  # 2: per-thread state in Thread; 3: process trees (Process sections);
#             4: shared memory as Ghost files (no more "shmem" VMAs), CowPages; 5: sealed frames;
#             6: every record before any page data (resume from a stream fills as it reads);
#             7: a record kind per kind of fd ("fd_pipe", "fd_epoll"...: upmig/fds/), with
#                typed fields, instead of one "fd" record with a type string and extras
HEADER = struct.Struct("<8sII8s16s")
FRAME_HEAD = struct.Struct("<II")  # type, length: _native.FRAME_HEAD bytes (a test checks)
FRAME_TAIL = struct.Struct(f"<{_native.FRAME_TAIL}s")
RECORD, DATA, TRAILER = _native.FRAME_RECORD, _native.FRAME_DATA, _native.FRAME_TRAILER
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
    order and nothing else. Records are written as they come; the bytes of pages
    records wait for finish(), which writes them all, in the order of their records,
    then the trailer."""

    def __init__(self, fd: int, key: Key, progress: Callable[[int], None] | None = None):
        self.fd = fd
        self.stream = not stat.S_ISREG(os.fstat(fd).st_mode)
        self.records = 0
        self.data_bytes = 0
        self.progress = progress
        salt = os.urandom(16)
        self.frame_key = key.frame_key(salt)
        self.off = 0  # where the next frame goes
        self._owed: list[tuple[PageSource, list[tuple[int, int]]] | bytes] = []
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
        """A record, or the pages records of a PageSource."""
        if isinstance(item, PageSource):
            self.pages(item)
        else:
            self.record(item)

    def pages(self, src: PageSource) -> None:
        """Pages records for src's runs, kept well under MAX_PAYLOAD however
        fragmented memory is; their bytes are copied at finish(), straight from where
        they are, by the C helper."""
        for at in range(0, len(src.runs), RUNS_PER_RECORD):
            part = src.runs[at:at + RUNS_PER_RECORD]
            nbytes = sum(e - s for s, e in part)
            self.record(Pages(runs=[x for run in part for x in run], nbytes=nbytes,
                              target=src.target))
            self._owed.append((src, part))

    def data(self, payload: bytes) -> None:
        """Page bytes for the last pages record, as given, for a tool that re-encodes
        an image (its pages records go through record()); written at finish()."""
        self._owed.append(bytes(payload))

    def finish(self) -> None:
        for owed in self._owed:
            if isinstance(owed, bytes):
                self._frame(DATA, owed)
                self.data_bytes += len(owed)
                continue
            src, part = owed
            stats = self._pages.dump(src.pid, src.fd, part, self.fd, self.off, self.stream)
            self.off += stats.bytes + stats.frames * (FRAME_HEAD.size + FRAME_TAIL.size)
            self.data_bytes += stats.bytes
            if self.progress:
                self.progress(stats.bytes)
        self._owed = []
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
    source: Any = field(repr=False, default=None)  # MappedPages or StreamedPages

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


def load(path: str, *, key: Key | None = None, pages_later: bool = False) -> Image:
    """Open, check, then parse and validate. Raises an ImageError subclass.
    path: a file, or "-" for standard input (a file, a pipe or a socket: a stream is
    read whole into memory, up to its trailer, before anything of it is used).
    key: refuse an image this key did not seal (NotSealed: another key's; Corrupt: a
    frame that does not match its tag); the image is then Image.sealed. Without a
    key only the structure and the records are checked (inspect, or an image this
    process has just written).
    pages_later (resume): from a stream, read only the records now, every frame
    checked, and leave the page data in the stream for Image.source to put where
    it belongs as it is read; the caller must then call source.finish(), which
    reads and checks the trailer, before it relies on the image being whole."""
    what = "stdin" if path == STDIN else path
    try:
        fd = 0 if path == STDIN else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise from_oserror(e, "cannot open image", phase="image", what=path) from None
    try:
        if pages_later and key is not None and _is_stream(what, fd):
            return _load_records(what, fd, key)
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
    img.source = MappedPages(data)
    return img


def _is_stream(what: str, fd: int) -> bool:
    try:
        return not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as e:
        raise from_oserror(e, "cannot read image", phase="image", what=what) from None


class MappedPages:
    """Page data of an image in memory (mapped, or read whole): any pages record's
    bytes, in any order."""

    def __init__(self, data: Any):
        self.base = _native.buffer_address(data)

    def fill(self, pid: int, fd: int, pd: PageData) -> None:
        """pd's bytes into pid's memory (fd -1), or at its offsets in the file fd."""
        if pd.runs:
            _native.fill_pages(pid, fd, pd.sources(self.base), pd.runs)

    def finish(self) -> None:
        pass  # checked whole when it was loaded


class StreamedPages:
    """Page data still in a stream: each pages record's bytes in record order, each
    frame checked before any of its bytes is written (upmig.image's grammar puts
    them in the order resume uses them)."""

    def __init__(self, what: str, fd: int, frame_key: bytes, parse: _Parser, off: int,
                 head: bytes | None, ended: bool = False):
        self.what, self.fd, self.frame_key, self.parse = what, fd, frame_key, parse
        self.off = off      # where the next frame starts
        self.head = head    # that frame's head, if already read
        self.ended = ended  # the trailer has been read

    def fill(self, pid: int, fd: int, pd: PageData) -> None:
        if not pd.runs:
            return
        owed = self.parse.owed
        if not owed or owed[0][0] is not pd:
            raise Corrupt("the image's page data is not in the order resume uses it",
                          what=self.what)
        rc, off = _native.fill_from_stream(self.fd, pid, fd, pd.runs, self.frame_key,
                                           MAX_PAYLOAD, self.head, self.off)
        self.head = None
        if rc < 0:
            _stream_failed(self.what, -rc, off)
        self.off = off
        self.parse.owed.pop(0)
        self.parse.data_bytes += rc

    def read_all(self, img: Image) -> MappedPages:
        """Before any page is used: the rest of the stream read into memory and
        checked whole (when the process cannot be built as it comes, say because its
        PID is only freed once its dump has written the last byte). img holds the
        memory from now on."""
        if self.head is None or self.parse.owed[:1] == [] or self.parse.owed_at:
            raise Corrupt("the image stream was used before it was read whole", what=self.what)
        # Laid out at the image's own offsets, so that every frame's tag checks.
        got = _native.StreamedImage(self.fd, bytes(self.off) + self.head,
                                    MAX_PAYLOAD, _memory(), head_in_prefix=True)
        img.holder = got
        if got.error == errno.EFBIG:
            raise ImageError(f"the image stream is larger than this machine's memory "
                             f"({_memory() >> 20} MiB)", what=self.what)
        rc, bad = _native.verify_frames(got.buf, self.off, self.frame_key, MAX_PAYLOAD)
        if rc < 0:
            _verify_failed(self.what, rc, bad, len(got.buf))
        _walk(self.parse, got.buf, self.off)
        self.ended = True
        return MappedPages(got.buf)

    def finish(self) -> None:
        """The trailer: every frame came, and no more."""
        if self.ended:
            return
        ftype, payload = _next_frame(self.what, self.fd, self.frame_key, self.off, self.head)
        if ftype != TRAILER:
            raise Corrupt(f"unexpected frame at byte {self.off} (page data nothing is "
                          "owed)", what=self.what)
        self.parse.trailer(payload, self.off)
        self.ended = True


def _load_records(what: str, fd: int, key: Key) -> Image:
    """A stream's records, each frame checked, up to its first page data."""
    enlarge_pipe(fd)
    head = _read_exactly(what, fd, HEADER.size, 0)
    _, salt = _check_header(what, head, key)
    frame_key = key.frame_key(salt)
    parse = _Parser(what)
    off = HEADER.size
    while True:
        fhead = _read_exactly(what, fd, FRAME_HEAD.size, off)
        ftype, length = FRAME_HEAD.unpack(fhead)
        if ftype == DATA:
            parse.records_done()
            source = StreamedPages(what, fd, frame_key, parse, off, fhead)
            break
        ftype, payload = _next_frame(what, fd, frame_key, off, fhead)
        if ftype == TRAILER:
            parse.trailer(payload, off)
            source = StreamedPages(what, fd, frame_key, parse, off, None, ended=True)
            break
        parse.record(payload, off)
        off += FRAME_HEAD.size + length + FRAME_TAIL.size
    img = parse.image(None, 0)
    img.sealed = True
    img.source = source
    return img


def _next_frame(what: str, fd: int, frame_key: bytes, off: int, head: bytes | None
                ) -> tuple[int, bytes]:
    """The frame at off of a stream (its head already read, or not), checked."""
    head = head or _read_exactly(what, fd, FRAME_HEAD.size, off)
    ftype, length = FRAME_HEAD.unpack(head)
    if ftype not in (RECORD, DATA, TRAILER) or length > MAX_PAYLOAD:
        raise Corrupt(f"image is corrupt: bad frame at byte {off}", what=what)
    rest = _read_exactly(what, fd, length + FRAME_TAIL.size, off)
    payload, tag = rest[:length], rest[length:]
    import hmac  # here: it brings OpenSSL's hashlib (~3 ms), which only streams need

    if not hmac.compare_digest(_native.frame_tag(frame_key, off, head, payload), tag):
        _stream_failed(what, errno.EBADMSG, off)
    return ftype, payload


def _read_exactly(what: str, fd: int, n: int, off: int) -> bytes:
    out = bytearray(n)  # a frame may be 64 MiB in small pieces: no quadratic joining
    view, got = memoryview(out), 0
    while got < n:
        try:
            k = os.readv(fd, [view[got:]])
        except OSError as e:
            raise ImageError(f"cannot read image: {e.strerror}", what=what) from None
        if not k:
            _stream_failed(what, errno.ENODATA, off)
        got += k
    return bytes(out)


def _stream_failed(what: str, err: int, off: int) -> None:
    if err == errno.ENODATA:
        raise Truncated(f"image is truncated: the stream ended in the frame at byte {off}",
                        what=what)
    if err == errno.EBADMSG:
        raise Corrupt(f"image is corrupt or was changed after it was sealed: the frame at "
                      f"byte {off} does not match its seal", what=what)
    if err == errno.EINVAL:
        raise Corrupt(f"image is corrupt: unexpected frame at byte {off}", what=what)
    raise RestoreError(f"writing page data from the image stream: {os.strerror(err)}")


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
        raise from_oserror(e, "cannot read image", phase="image", what=what) from None
    return data, data


def _memory() -> int:
    """The most an image read into memory may take: all of this machine's."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_stream(what: str, fd: int, key: Key | None) -> tuple[Any, Any]:
    enlarge_pipe(fd)
    head = b""
    while len(head) < HEADER.size:
        part = os.read(fd, HEADER.size - len(head))
        if not part:
            raise Truncated(f"image is truncated ({len(head)} bytes, not even a header)",
                            what=what)
        head += part
    _check_header(what, head, key)  # before gigabytes of someone else's stream are read
    memory = _memory()
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


class _Parser:
    """Builds an Image from its frames as they come, checking their order: every
    record (each validated as it is read), then the page data, each DATA frame
    belonging to the oldest pages record still owed bytes, then the trailer."""

    def __init__(self, path: str):
        # Imported here: the schema names the state modules' constants, and they import this.
        from upmig.validate import Validator

        self.path = path
        self.check = Validator(path)
        self.records: list[Any] = []
        self.pages: list[PageData] = []
        self.sections: list[Section] = []
        self.owed: list[tuple[PageData, int]] = []  # pages records still owed data, oldest first
        self.owed_at = 0                             # how much of owed[0] has come
        self.data_bytes = 0
        self.in_data = False

    def record(self, payload: bytes, off: int) -> None:
        if self.in_data:
            raise Corrupt(f"a record at byte {off} after page data", what=self.path)
        rec = _decode(self.path, payload, off)
        if isinstance(rec, Trailer):
            raise Corrupt(f"a trailer record at byte {off} that is not the last frame",
                          what=self.path)
        self.check.add(rec)
        self.records.append(rec)
        if isinstance(rec, Process):
            self.sections.append(Section(self.path, [], [], None, rec))
        if self.sections:
            self.sections[-1].records.append(rec)
        if isinstance(rec, Pages):
            pd = PageData(_runs(self.path, rec, off), [], rec.target)
            self.pages.append(pd)  # shared with its section's list
            if self.sections:
                self.sections[-1].pages.append(pd)
            if rec.nbytes:
                self.owed.append((pd, rec.nbytes))

    def records_done(self) -> None:
        """Every record is in: check them against each other."""
        if not self.in_data:
            self.in_data = True
            self.check.finish(self.image(None, 0))

    def data(self, body: int, length: int, off: int) -> PageData:
        """A DATA frame whose payload is at body (of a mapped image, or 0): the pages
        record it belongs to."""
        if not self.owed or self.owed_at + length > self.owed[0][1] or not length:
            raise Corrupt(f"unexpected page data at byte {off}", what=self.path)
        self.records_done()
        pd, nbytes = self.owed[0]
        pd.chunks.append((body, length))
        self.owed_at += length
        self.data_bytes += length
        if self.owed_at == nbytes:
            self.owed.pop(0)
            self.owed_at = 0
        return pd

    def trailer(self, payload: bytes, off: int) -> None:
        self.records_done()
        rec = _decode(self.path, payload, off)
        if self.owed:
            raise Corrupt(f"page data missing before byte {off}", what=self.path)
        if not isinstance(rec, Trailer) or rec.records != len(self.records) + 1 or \
                rec.data_bytes != self.data_bytes:
            raise Corrupt("trailer does not match the records", what=self.path)

    def image(self, data: Any, size: int) -> Image:
        for sec in self.sections:
            sec.data = data
        return Image(self.path, self.records, self.pages, data, size, self.sections)


def _records(path: str, data: Any) -> Image:
    """Every record, and where each pages record's bytes are, in a mapped image."""
    parse = _Parser(path)
    _walk(parse, data, HEADER.size)
    return parse.image(data, len(data))


def _walk(parse: _Parser, data: Any, off: int) -> None:
    """Feed the frames of data from off, up to its trailer at its very end, to parse."""
    path, end = parse.path, len(data)
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
            parse.data(body, length, off)
        elif ftype == RECORD:
            parse.record(data[body:body + length], off)
        else:
            parse.trailer(data[body:body + length], off)
            if body + length + FRAME_TAIL.size != end:
                raise Corrupt("image has bytes after its trailer", what=path)
            return
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
