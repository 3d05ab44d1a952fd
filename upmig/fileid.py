"""The identity of a file a process maps (its executable, its libraries): what must
be the same on the target for the restored mappings to be the ones it had."""

from __future__ import annotations

import mmap
import os
import struct

from upmig import _native
from upmig.errors import Mismatch
from upmig.records import MappedFile

PT_NOTE = 4
NT_GNU_BUILD_ID = 3


def elf_build_id(f) -> str:
    """The hex GNU build-id of an ELF64 file, or "" if it has none."""
    head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return ""
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        phdr = f.read(40)
        if len(phdr) < 40:
            return ""  # cut short inside its headers: identified by contents instead
        ptype, _, offset, _, _, filesz = struct.unpack("<IIQQQQ", phdr)
        if ptype != PT_NOTE:
            continue
        f.seek(offset)
        notes = f.read(filesz)
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name_end = pos + 12 + ((namesz + 3) & ~3)
            if ntype == NT_GNU_BUILD_ID and notes[pos + 12:pos + 12 + namesz] == b"GNU\0":
                return notes[name_end:name_end + descsz].hex()
            pos = name_end + ((descsz + 3) & ~3)
    return ""


def content_hash(f, size: int) -> str:
    if size == 0:
        return "0"
    with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        return f"{_native.xxh64(m):016x}"


def identify(path: str) -> MappedFile:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        build_id = elf_build_id(f)
        digest = "" if build_id else content_hash(f, st.st_size)
    return MappedFile(path=path, size=st.st_size, mtime=st.st_mtime, build_id=build_id,
                      content_hash=digest)


def still(rec: MappedFile | None) -> MappedFile | None:
    """rec if its file looks unchanged since it was identified (size, mtime), else None."""
    if rec is None:
        return None
    try:
        st = os.stat(rec.path)
    except OSError:
        return None
    return rec if (st.st_size, st.st_mtime) == (rec.size, rec.mtime) else None


def check(rec: MappedFile) -> None:
    """Raise Mismatch naming the file if the target's copy is not the one dumped."""
    try:
        here = identify(rec.path)
    except OSError as e:
        raise Mismatch(f"mapped file {rec.path} cannot be opened here: {e.strerror}") from None
    if here.size != rec.size:
        raise Mismatch(f"mapped file {rec.path} differs here (size {here.size}, "
                       f"image has {rec.size})")
    if (here.build_id, here.content_hash) != (rec.build_id, rec.content_hash):
        what = "build-id" if rec.build_id else "contents"
        raise Mismatch(f"mapped file {rec.path} differs here ({what} changed)")


def object_id(st: os.stat_result) -> int:
    """One number for a file object (a pipe, a FIFO, a deleted file) across the whole
    process: its inode number is unique only within its filesystem."""
    return _native.xxh64(struct.pack("<QQ", st.st_dev, st.st_ino)) >> 1
