"""The address space: VMAs, which pages to store, the mm fields, and rebuilding them.

Dump side: list_vmas() classifies /proc/PID/maps (refusing what cannot move),
page_runs() asks PAGEMAP_SCAN which pages differ from their backing, and the
image writer streams those runs through the C helper. Restore side: see the
functions below `# ---- restore`."""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass

from upmig import _native as nat
from upmig import _proc, fileid
from upmig.errors import CantMigrate, Corrupt, Mismatch
from upmig.kconst import (
    AT_FDCWD,
    MADV_WIPEONFORK,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PR_SET_MM,
    PR_SET_MM_MAP,
    PR_SET_VMA,
    PR_SET_VMA_ANON_NAME,
)
from upmig.records import MM, CowPages, Vma
from upmig.syscalls import nr

# PAGEMAP_SCAN: pages that are present or swapped, neither file pages nor the zero page.
# For a private mapping that is exactly what differs from its backing.
_NOT_FILE_NOT_ZERO = nat.PAGE_IS_FILE | nat.PAGE_IS_PFNZERO
_IN_MEMORY = nat.PAGE_IS_PRESENT | nat.PAGE_IS_SWAPPED
VDSO_ROLES = ("vvar", "vvar_vclock", "vdso")


def role_of(m: _proc.MapsLine) -> str:
    path = m.path
    if path in ("[heap]", "[stack]"):
        return path[1:-1]
    if path in ("[vdso]", "[vvar]", "[vvar_vclock]"):
        return path[1:-1]
    shared = m.perms[3] == "s"
    if path.startswith("/SYSV"):
        return "sysv"  # a SysV segment: see upmig.sysv
    if path == "/dev/zero (deleted)" and shared:
        return "ghost"  # shared anonymous memory: its shmem file travels (upmig.ghosts)
    if path == "" or path.startswith(("[anon:", "[anon_shmem:")):
        return "ghost" if shared else "anon"
    if path.startswith(("/memfd:", "/dev/shm/")):
        return "ghost"  # memory-backed: its bytes are nowhere else
    if path.endswith(" (deleted)") and not path.startswith(("/dev/", "/SYSV")):
        return "ghost"  # a regular file deleted since
    return "file"


def _refusal(m: _proc.MapsLine, role: str) -> str | None:
    path = m.path
    if path.startswith("[") and role not in ("heap", "stack", "vdso", "vvar", "vvar_vclock",
                                             "anon", "ghost"):
        return f"has the mapping {path}, which upmig cannot move"
    if role == "file" and (path.startswith("/dev/") or path.startswith("anon_inode:")):
        return f"maps the device {path}; mapped devices are not supported"
    return None


def list_vmas(pid: int) -> list[Vma]:
    maps = _proc.parse_maps(_proc.read_text(pid, "maps"))
    smaps = _proc.read_text(pid, "smaps")
    vmflags = _proc.parse_smaps_vmflags(smaps)
    vmas = []
    for m in maps:
        if m.path == "[vsyscall]":
            continue  # a fixed kernel page, the same on every machine
        role = role_of(m)
        why = _refusal(m, role)
        if why:
            raise CantMigrate(why, pid=pid)
        ghost = role == "ghost"
        path = m.path.removesuffix(" (deleted)") if ghost else m.path
        vmas.append(Vma(start=m.start, end=m.end, perms=m.perms, offset=m.offset,
                        path="" if ghost and path in ("", "/dev/zero") else path
                        if role in ("file", "ghost", "sysv") or path.startswith("[anon")
                        else "",
                        role=role, vmflags=vmflags.get(m.start, []),
                        ghost=fileid.object_id(os.stat(map_file(pid, m.start, m.end)))
                        if ghost else m.inode if role == "sysv" else 0))
    return vmas


def is_readable(v: Vma) -> bool:
    return v.perms[0] == "r"


def map_file(pid: int, start: int, end: int) -> str:
    """The /proc path that opens the file a mapping maps (deleted or not)."""
    return f"/proc/{pid}/map_files/{start:x}-{end:x}"


def page_runs(pid: int, vmas: list[Vma]) -> dict[int, list[tuple[int, int]]]:
    """VMA start -> the runs of its pages whose contents must travel."""
    runs: dict[int, list[tuple[int, int]]] = {}
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for v in vmas:
            if v.role in VDSO_ROLES or v.perms[3] == "s":
                continue  # a shared mapping's file (or its Ghost) holds the contents
            found = nat.pagemap_scan(pm, v.start, v.end, _NOT_FILE_NOT_ZERO,
                                     _NOT_FILE_NOT_ZERO, _IN_MEMORY)
            if found:
                runs[v.start] = found
                v.data_bytes = sum(e - s for s, e in found)
    finally:
        os.close(pm)
    return runs


def same_as_parent(pid: int, parent: int, maps: list[_proc.MapsLine]
                   ) -> list[tuple[int, int]]:
    """The private pages pid (whose maps are given) still shares with its parent
    since fork: one physical page at the same address in both. Both frozen; to be
    asked before any page of either is read, since reading (process_vm_readv pins
    pages) unshares them."""
    mine = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    theirs = os.open(f"/proc/{parent}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Only the pages that will travel are compared (PAGEMAP_SCAN reads no page):
        # not the untouched rest of a huge reservation.
        present = [run for m in maps
                   if m.perms[3] == "p" and m.path not in ("[vsyscall]", "[vvar]", "[vdso]",
                                                           "[vvar_vclock]")
                   for run in nat.pagemap_scan(mine, m.start, m.end, _NOT_FILE_NOT_ZERO,
                                               _NOT_FILE_NOT_ZERO, _IN_MEMORY)]
        return nat.same_pages(mine, theirs, present) if present else []
    finally:
        os.close(mine)
        os.close(theirs)


def split_cow(vmas: list[Vma], runs: dict[int, list[tuple[int, int]]],
              same: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Take out of runs the pages that are the same as the parent's (same, from
    same_as_parent); return them."""
    out: list[tuple[int, int]] = []
    for v in vmas:
        if v.start not in runs:
            continue
        common = _common(runs[v.start], same)
        if common:
            runs[v.start] = _without(runs[v.start], common)
            v.cow_bytes = sum(e - s for s, e in common)
            v.data_bytes -= v.cow_bytes
            out += common
    return out


def _common(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two sorted lists of disjoint ranges."""
    out, i, j = [], 0, bisect.bisect_right(b, (a[0][0], 0)) - 1 if a else 0
    j = max(j, 0)
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _without(runs: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """runs less taken (sorted ranges, each of taken inside one of runs)."""
    out, i = [], 0
    for s, e in runs:
        at = s
        while i < len(taken) and taken[i][0] < e:
            if taken[i][0] > at:
                out.append((at, taken[i][0]))
            at = taken[i][1]
            i += 1
        if at < e:
            out.append((at, e))
    return out


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Where a file has data (offsets), from its holes: a sparse shmem or tmpfs file
    travels without its holes. (Pagemap would miss pages in the page cache that no
    one maps.)"""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: no data past pos
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        runs.append((data, hole))
        pos = hole
    return runs


def capture_mm(pid: int, brk: int) -> MM:
    st = _proc.stat(pid)
    return MM(start_code=st.start_code, end_code=st.end_code, start_data=st.start_data,
              end_data=st.end_data, start_brk=st.start_brk, brk=brk, start_stack=st.start_stack,
              arg_start=st.arg_start, arg_end=st.arg_end, env_start=st.env_start,
              env_end=st.env_end, auxv=_proc.read_bytes(pid, "auxv"))


@dataclass
class VdsoBlock:
    """Where [vvar], [vvar_vclock] and [vdso] sit: role -> (start, end)."""

    parts: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, vmas: list[Vma]) -> VdsoBlock:
        return cls({v.role: (v.start, v.end) for v in vmas if v.role in VDSO_ROLES})

    @classmethod
    def of_pid(cls, pid: int) -> VdsoBlock:
        maps = _proc.parse_maps(_proc.read_text(pid, "maps"))
        return cls({m.path[1:-1]: (m.start, m.end) for m in maps
                    if m.path[1:-1] in VDSO_ROLES and m.path[0] == "["})

    def sizes(self) -> dict[str, int]:
        return {k: e - s for k, (s, e) in self.parts.items()}

    def check_same_shape(self, image: VdsoBlock) -> None:
        """Raise Mismatch unless the image's block has the same parts and sizes."""
        if self.sizes() != image.sizes():
            raise Mismatch(f"the vdso here ({self.sizes()}) differs from the image's "
                           f"({image.sizes()}): the kernels are too different")


# ---- restore

MADVISE = {"dd": mmap.MADV_DONTDUMP, "dc": mmap.MADV_DONTFORK, "wf": MADV_WIPEONFORK,
           "hg": mmap.MADV_HUGEPAGE, "nh": mmap.MADV_NOHUGEPAGE}  # VmFlags -> advice


def prot_of(perms: str) -> int:
    return ((mmap.PROT_READ if perms[0] == "r" else 0) | (mmap.PROT_WRITE if perms[1] == "w" else 0)
            | (mmap.PROT_EXEC if perms[2] == "x" else 0))


def move_vdso(s, here: VdsoBlock, there: VdsoBlock, taken: list) -> None:
    """Move this process's vdso block to where the image had it, all parts together
    and at their relative offsets (the vdso finds its data pages by offset). taken:
    what a temporary spot must avoid (objects with start and end)."""
    here.check_same_shape(there)
    lo_here = min(s0 for s0, _ in here.parts.values())
    lo_there = min(s0 for s0, _ in there.parts.values())
    span = max(e for _, e in here.parts.values()) - lo_here
    if lo_here == lo_there:
        return
    if abs(lo_here - lo_there) < span:  # overlapping: go through a free spot first
        tmp = free_gap(taken, span)
        s.call(nr.mmap, tmp, span, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
               -1, 0, what="mmap(vdso on the way)")
        _mremap_block(s, here, lo_here, tmp)
        here = VdsoBlock({k: (a - lo_here + tmp, b - lo_here + tmp)
                          for k, (a, b) in here.parts.items()})
        lo_here = tmp
    _mremap_block(s, here, lo_here, lo_there)


def _mremap_block(s, block: VdsoBlock, lo: int, new_lo: int) -> None:
    for role in VDSO_ROLES:
        if role in block.parts:
            a, b = block.parts[role]
            s.call(nr.mremap, a, b - a, b - a, MREMAP_MAYMOVE | MREMAP_FIXED, new_lo + a - lo,
                   what=f"mremap([{role}])")


def free_gap(vmas: list, size: int, start: int = 1 << 33) -> int:
    """An address where size bytes overlap none of vmas (anything with start, end)."""
    at = start
    for v in sorted(vmas, key=lambda v: v.start):
        if v.end <= at:
            continue
        if v.start >= at + size:
            break
        at = v.end
    return at


class FileOpener:
    """Opens each backing file once in the target; closes them all at the end.
    held: the mapped files as checked before (fileid.Held): each is opened through no
    symlink and must be the very file checked."""

    def __init__(self, s, held: fileid.Held):
        self.s = s
        self.held = held
        self.fds: dict[tuple[str, int], int] = {}

    def fd(self, path: str, mode: int) -> int:
        key = (path, mode)
        if key not in self.fds:
            self.fds[key] = self.held.open_mapped(self.s, path, mode | os.O_CLOEXEC)
        return self.fds[key]

    def ghost(self, fd: int, mode: int) -> int:
        """A file resume made (fd), opened again with mode through /proc/self/fd."""
        key = (f"/proc/self/fd/{fd}", mode)
        if key not in self.fds:
            self.s.write(self.s.scratch, os.fsencode(key[0]) + b"\0")
            self.fds[key] = self.s.call(nr.openat, AT_FDCWD, self.s.scratch, mode | os.O_CLOEXEC, 0,
                                        what=f"open({key[0]})")
        return self.fds[key]

    def close(self) -> None:
        for fd in self.fds.values():
            self.s.raw(nr.close, fd)
        self.fds.clear()


def map_vmas(s, vmas: list[Vma], ghost_fds: dict[int, int], held: fileid.Held) -> None:
    """mmap every VMA at its address; writable for now where page data goes in.
    ghost_fds: the recreated deleted files, by Ghost id, as fds of the process;
    held: the mapped files, checked (see FileOpener)."""
    files = FileOpener(s, held)
    try:
        for v in vmas:
            if v.role in VDSO_ROLES or v.role == "sysv":  # attached already (upmig.sysv)
                continue
            shared = v.perms[3] == "s"
            prot = prot_of(v.perms)
            if v.data_bytes or v.cow_bytes:
                prot |= mmap.PROT_READ | mmap.PROT_WRITE
            flags = MAP_FIXED | (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
            if "gd" in v.vmflags:
                flags |= MAP_GROWSDOWN
            fd, off = -1, 0
            if v.role == "ghost":  # made read-write; a mapping that may not write gets
                # a read-only open (a memfd's F_SEAL_WRITE needs no writable mapping)
                writes = shared and "mw" in v.vmflags
                fd = ghost_fds[v.ghost] if writes else files.ghost(ghost_fds[v.ghost], os.O_RDONLY)
                off = v.offset
            elif v.role == "file":
                mode = os.O_RDWR if shared and "mw" in v.vmflags else os.O_RDONLY
                fd, off = files.fd(v.path, mode), v.offset
            else:
                flags |= mmap.MAP_ANONYMOUS
            s.call(nr.mmap, v.start, v.end - v.start, prot, flags, fd, off,
                   what=f"mmap({v.start:#x}, {v.path or v.role})")
            if v.role == "anon" and v.path:  # a name given with PR_SET_VMA_ANON_NAME
                name = v.path[v.path.index(":") + 1:-1]
                s.write(s.scratch, os.fsencode(name) + b"\0")
                s.call(nr.prctl, PR_SET_VMA, PR_SET_VMA_ANON_NAME, v.start, v.end - v.start,
                       s.scratch, what="prctl(PR_SET_VMA_ANON_NAME)")
    finally:
        files.close()


def finish_vmas(s, vmas: list[Vma]) -> None:
    """Final protections and the madvise flags, once the pages are in."""
    for v in vmas:
        if v.role in VDSO_ROLES:
            continue
        if (v.data_bytes or v.cow_bytes) and \
                prot_of(v.perms) != prot_of(v.perms) | mmap.PROT_READ | mmap.PROT_WRITE:
            s.call(nr.mprotect, v.start, v.end - v.start, prot_of(v.perms), what="mprotect")
        for flag in v.vmflags:
            if flag in MADVISE:
                s.call(nr.madvise, v.start, v.end - v.start, MADVISE[flag], what="madvise")
        if "lo" in v.vmflags and prot_of(v.perms):  # (mlockall marks PROT_NONE areas too)
            s.call(nr.mlock, v.start, v.end - v.start, what="mlock")


def restore_mm(s, mm: MM, exe: str, held: fileid.Held) -> None:
    """PR_SET_MM_MAP: code/data/brk/stack/arg/env boundaries, auxv, and /proc/PID/exe
    (opened through no symlink, the very file checked: see fileid.Held)."""
    auxv_at, map_at = s.scratch + 8192, s.scratch + 4096  # the path takes up to 4 KiB
    exe_fd = held.open_mapped(s, exe, os.O_RDONLY | os.O_CLOEXEC)
    s.write(auxv_at, mm.auxv)
    try:
        packed = struct.pack("<11QQII", mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                             mm.start_brk, mm.brk, mm.start_stack, mm.arg_start, mm.arg_end,
                             mm.env_start, mm.env_end, auxv_at, len(mm.auxv), exe_fd)
        s.write(map_at, packed)
        s.call(nr.prctl, PR_SET_MM, PR_SET_MM_MAP, map_at, len(packed), 0,
               what="prctl(PR_SET_MM_MAP)")
    finally:
        s.raw(nr.close, exe_fd)


def fill(pid: int, source, pages: list) -> None:
    """Page contents straight from the image (source: its Image.source, mapped or a
    stream) into the process. pages: its image.PageData; those with a target are a
    ghost file's or a SysV segment's contents, not memory (upmig.ghosts, upmig.sysv)."""
    for pd in pages:
        if not pd.target:
            source.fill(pid, -1, pd)


def copy_cow(pid: int, mem_fd: int, cow: list[CowPages], outer: dict[int, int],
             what: str) -> None:
    """Pages the process shared with its parent at dump: from the parent, rebuilt
    before it (and not running yet). outer: PIDs in the image -> here."""
    for rec in cow:
        runs = list(zip(rec.runs[0::2], rec.runs[1::2], strict=True))
        if rec.source not in outer or any(a >= b or (a | b) % nat.PAGE for a, b in runs):
            raise Corrupt(f"a cow_pages record of pid {pid} is malformed", what=what)
        src = os.open(f"/proc/{outer[rec.source]}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            nat.copy_same_addresses(outer[rec.source], src, pid, mem_fd, runs)
        finally:
            os.close(src)
